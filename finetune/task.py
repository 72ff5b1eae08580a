"""``task``: one class per image (multiclass: softmax, cross-entropy) or several (multilabel: a sigmoid per class,
binary cross-entropy, labels from a CSV). What the multi-label task changes in a run's config, and what it refuses,
decided here before anything is built."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

TASKS = ("multiclass", "multilabel")
# What the module logs per task (finetune/models/metrics.py) beyond loss and acc
TASK_METRICS = {"multiclass": ("balanced_acc", "macro_f1"), "multilabel": ("map", "micro_f1", "macro_f1")}
# The multi-label monitor when the config keeps the default val/acc (exact match: every label of an image right),
# which is too strict to pick epochs by on small data: mean average precision, threshold-free.
MULTILABEL_MONITOR = "val/map"


def check_task(cfg: DictConfig) -> None:
    """The task's value, the monitors it can log, and the settings multi-label cannot use."""
    task = str(cfg.task)
    if task not in TASKS:
        raise FinetuneError(f"task={task} must be multiclass (one class per image) or multilabel (several, from a "
                            f"CSV with a labels column or one 0/1 column per class).")
    other = next(t for t in TASKS if t != task)
    only_other = set(TASK_METRICS[other]) - set(TASK_METRICS[task])
    monitors = {"monitor": cfg.monitor, "scheduler.monitor": cfg.scheduler.get("monitor"),
                **{f"callbacks.{name}.monitor": cb.get("monitor") for name, cb in (cfg.get("callbacks") or {}).items()
                   if cb is not None and hasattr(cb, "get")}}
    for key, value in monitors.items():
        if value and str(value).split("/")[-1] in only_other:
            raise FinetuneError(f"{key}={value} is logged with task={other} only; with task={task} choose one of "
                                f"val/loss, val/acc, {', '.join('val/' + m for m in TASK_METRICS[task])}.")
    if task != "multilabel":
        return
    if str(cfg.data.sampler) == "balanced":
        raise FinetuneError("data.sampler=balanced draws each class equally often, which is not defined when an image "
                            "has several classes (task=multilabel). Use data.sampler=uniform, and "
                            "loss.class_weights=balanced to weigh each class's positive labels instead.")
    if float(OmegaConf.select(cfg, "regularization.label_smoothing", default=0.0) or 0.0) > 0:
        log.warning("regularization.label_smoothing=%s is not applied with task=multilabel: the binary cross-entropy "
                    "trains on the 0/1 labels as they are.", cfg.regularization.label_smoothing)
    for key in ("calibrate", "open_set.fit"):
        if str(OmegaConf.select(cfg, key)).lower() == "true":
            raise FinetuneError(f"{key}=true works with task=multiclass only: a multi-label model gets per-class "
                                f"thresholds tuned on validation instead. Leave {key} at auto (skipped) or false.")


def task_monitor(cfg: DictConfig) -> str:
    """The metric a run follows: ``monitor``, or val/map where task=multilabel keeps the default val/acc (the run,
    the sweep summary and the value Hydra's sweepers optimise all use this)."""
    if str(OmegaConf.select(cfg, "task", default="multiclass")) == "multilabel" and cfg.monitor == "val/acc":
        return MULTILABEL_MONITOR
    return str(cfg.monitor)


def with_task_defaults(cfg: DictConfig) -> DictConfig:
    """``cfg`` (a copy) with the multi-label monitor (val/map) in place of the default val/acc, said in the log."""
    if task_monitor(cfg) != str(cfg.monitor):
        log.info("task=multilabel: best.ckpt, early stopping and the plateau rule follow %s (mean average precision) "
                 "instead of val/acc (exact match); pass monitor=val/micro_f1 or another to change it.",
                 MULTILABEL_MONITOR)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.monitor = MULTILABEL_MONITOR
        return cfg
    return cfg

"""The checks of a composed config that need neither torch nor Lightning, so every command runs them first and
a typo'd value or a missing data folder is answered in well under a second, each failure naming its key.

What needs the libraries (Trainer arguments, precision and accelerator, optimizer and scheduler targets built on
a dummy parameter, augmentations) is in ``config.py``, which runs these checks first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.config_keys import check_known_keys
from finetune.errors import FinetuneError, close_matches

# Everything the LightningModule logs; monitors must name one of these.
LOGGED_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/balanced_acc", "val/macro_f1", "val/map",
                  "val/micro_f1")


def _check_monitor(key: str, value: Any) -> None:
    if value not in LOGGED_METRICS:
        raise FinetuneError(
            f"{key}={value} is not a metric that training logs; choose one of {', '.join(LOGGED_METRICS)}."
            f"{close_matches(str(value), LOGGED_METRICS)}"
        )


def _whole(value: Any, lo: int, hi: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)


def _number(value: Any, lo: float, hi: float | None = None, open_lo: bool = False) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return (value > lo if open_lo else value >= lo) and (hi is None or value <= hi)


def _optional(check: Callable[[Any], bool], *also: Any) -> Callable[[Any], bool]:
    """``check``, or None / one of ``also`` (e.g. "auto")."""
    return lambda v: v is None or (isinstance(v, (str, bool)) and v in also) or check(v)


def _devices(value: Any) -> bool:
    """Lightning's forms: auto, N >= 1, -1 (all), a list of device indices, or "0,1" / "-1"."""
    if value == "auto" or value == -1 or _whole(value, 1):
        return True
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip(",").split(",")]
        return value.strip() == "-1" or (all(p.isdigit() for p in parts) and (len(parts) > 1 or int(parts[0]) > 0))
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_whole(v, 0) for v in value)


_FLAG = "must be true or false"
# (key, check, what the value must be): types and ranges of the common keys, checked before any heavy work
# so that a typo'd number fails in a second with its key named, not deep inside Lightning or torch.
VALUE_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", lambda v: _whole(v, 0, 2**32 - 1), "must be a whole number in [0, 4294967295]"),
    ("trainer.max_epochs", _optional(lambda v: v == -1 or _whole(v, 1)),
     "must be a whole number of epochs >= 1 (or -1: no epoch limit, with trainer.max_time or trainer.max_steps)"),
    ("trainer.min_epochs", _optional(lambda v: _whole(v, 0)), "must be a whole number >= 0 or null"),
    ("trainer.max_steps", lambda v: _whole(v, -1), "must be a whole number of steps >= 1 (or -1: no step limit)"),
    ("trainer.min_steps", _optional(lambda v: _whole(v, 0)), "must be a whole number >= 0 or null"),
    ("trainer.devices", _devices,
     "must be auto, a number of devices >= 1, -1 (all), or a list of device indices such as [0,1]"),
    ("trainer.num_nodes", lambda v: _whole(v, 1), "must be a whole number >= 1"),
    ("trainer.accumulate_grad_batches", lambda v: _whole(v, 1), "must be a whole number >= 1"),
    ("trainer.check_val_every_n_epoch", _optional(lambda v: _whole(v, 1)), "must be a whole number >= 1 or null"),
    ("trainer.log_every_n_steps", _optional(lambda v: _whole(v, 1)), "must be a whole number >= 1"),
    ("trainer.num_sanity_val_steps", _optional(lambda v: _whole(v, -1)), "must be a whole number >= 0 (-1: all)"),
    ("trainer.gradient_clip_val", _optional(lambda v: _number(v, 0)), "must be a number >= 0 or null"),
    *((f"trainer.limit_{s}_batches", _optional(lambda v: _whole(v, 0) or _number(v, 0, 1)),
       "must be a fraction in [0, 1] of the batches, a whole number of batches, or null") for s in
      ("train", "val", "test", "predict")),
    ("data.batch_size", lambda v: v == "auto" or _whole(v, 1),
     "must be a positive integer, or auto (the largest batch a GPU's memory holds; 32 on a CPU)"),
    ("lr_reference_batch", _optional(lambda v: _whole(v, 1)),
     "must be a positive integer (the batch optimizer.lr was set for) or null (= data.batch_size)"),
    ("data.eval_batch_size", _optional(lambda v: _whole(v, 1)),
     "must be a positive integer or null (= data.batch_size)"),
    ("data.num_workers", _optional(lambda v: _whole(v, 0), "auto"),
     "must be auto or a whole number >= 0 (0: load in the main process)"),
    ("data.image_size", _optional(lambda v: _whole(v, 8)),
     "must be an integer >= 8 (pixels of the square input) or null (the backbone's own)"),
    ("data.crop_pct", _optional(lambda v: _number(v, 0, 1, open_lo=True)), "must be in (0, 1] or null"),
    ("data.split_seed", lambda v: _whole(v, 0, 2**32 - 1), "must be a whole number in [0, 4294967295]"),
    ("data.val_fraction", lambda v: _number(v, 0) and v < 1, "must be a number in [0, 1)"),
    ("data.test_fraction", lambda v: _number(v, 0) and v < 1, "must be a number in [0, 1)"),
    ("data.preload", _optional(lambda v: isinstance(v, bool), "auto"), "must be auto, true or false"),
    ("data.pin_memory", _optional(lambda v: isinstance(v, bool), "auto"), "must be auto, true or false"),
    ("data.normalize_on_device", lambda v: isinstance(v, bool), _FLAG),
    ("data.preload_max_gb", lambda v: _number(v, 0), "must be a number of GB >= 0"),
    ("data.validate", lambda v: isinstance(v, bool), _FLAG),
    ("data.min_image_side", lambda v: _whole(v, 1), "must be a whole number of pixels >= 1"),
    ("data.imbalance_ratio", lambda v: _number(v, 1), "must be a number >= 1"),
    ("data.sampler", lambda v: v in ("uniform", "balanced"), "must be uniform or balanced"),
    ("ddp_timeout_s", _optional(lambda v: _number(v, 0)), "must be a number of seconds >= 0 or null (torch's default)"),
    ("loss.class_weights", lambda v: v in ("auto", "balanced", "none") or (
        isinstance(v, (list, tuple, ListConfig)) and all(_number(w, 0) for w in v)),
     "must be auto, balanced, none, or a list of one weight >= 0 per class"),
    ("policy.cache", lambda v: isinstance(v, bool) or str(v).lower() in ("auto", "false", "off", "no"),
     "must be auto or false"),
    ("policy.cache_views", lambda v: _whole(v, 0), "must be a whole number >= 0"),
    ("policy.head_l2", lambda v: _number(v, 0), "must be a number >= 0"),
    ("policy.lr_decay", lambda v: _number(v, 0, open_lo=True), "must be a number > 0 (LR multiplier per group)"),
    ("policy.probe_epochs", lambda v: _whole(v, 0), "must be a whole number of epochs >= 0"),
    ("policy.unfreeze_every", lambda v: _whole(v, 1), "must be a whole number of epochs >= 1"),
    ("policy.stage", _optional(lambda v: _whole(v, 0), "auto"), "must be auto or a stage index >= 0"),
    ("policy.top_stages", lambda v: _whole(v, 0), "must be a whole number of stages >= 0"),
    ("policy.measure.max_per_class", lambda v: _whole(v, 1), "must be a whole number >= 1"),
    ("policy.measure.max_images", lambda v: _whole(v, 1), "must be a whole number >= 1"),
    ("policy.measure.folds", lambda v: _whole(v, 2), "must be a whole number >= 2"),
    ("policy.measure.seed", lambda v: _whole(v, 0, 2**32 - 1), "must be a whole number in [0, 4294967295]"),
    ("policy.measure.enabled", _optional(lambda v: isinstance(v, bool), "auto"), "must be auto, true or false"),
    *((f"policy.{k}", lambda v: isinstance(v, bool), _FLAG)
      for k in ("frozen_bn_eval", "train_stages", "head_warm_start")),
    ("policy.thresholds.small_max_per_class", lambda v: _number(v, 0),
     "must be a number of images per class >= 0 (below it the data counts as small)"),
    ("policy.thresholds.similar_max_gap", lambda v: _number(v, 0, 1), "must be an accuracy gap in [0, 1]"),
    ("callbacks.early_stopping.patience", lambda v: _whole(v, 0), "must be a whole number of epochs >= 0"),
    ("callbacks.early_stopping.min_delta", lambda v: _number(v, 0), "must be a number >= 0"),
    ("recipe.name", lambda v: v in ("auto", "off"), "must be auto or off (recipe=auto|off)"),
    ("calibrate", lambda v: str(v).lower() in ("auto", "true", "false"),
     "must be auto (fit a temperature when there is a validation split), true or false"),
    ("open_set.fit", lambda v: str(v).lower() in ("auto", "true", "false"),
     "must be auto (fit a threshold when there is a validation split), true or false"),
    ("open_set.score", lambda v: str(v).lower() in ("knn", "msp", "energy"), "must be knn, msp or energy"),
    ("open_set.reject", lambda v: _number(v, 0, 1, open_lo=True) and float(v) < 1,
     "must be a share of known validation images in (0, 1), e.g. 0.05"),
    ("recipe.budget", lambda v: v in ("fast", "best") or _whole(v, 1),
     "must be fast, best or a number of training images to see (e.g. recipe.budget=20000)"),
    *((f"recipe.{k}", lambda v: _whole(v, 1), "must be a whole number >= 1")
      for k in ("min_epochs", "max_epochs", "size_step", "min_size", "image_sample", "augment_min_epochs",
                "budget_size", "shrink_below_epochs")),
    ("recipe.shrink_max", lambda v: _number(v, 0, 1, open_lo=True), "must be a fraction in (0, 1]"),
    ("recipe.max_stretch", lambda v: _number(v, 1), "must be a factor >= 1 (budgets a large-data run may see)"),
    ("recipe.step_budget_checks", lambda v: _whole(v, 1), "must be a whole number of validation checks >= 1"),
    ("recipe.step_budget_saves", lambda v: _whole(v, 1), "must be a whole number of last.ckpt saves >= 1"),
    *((f"recipe.upsample.{d}", lambda v: _number(v, 1), "must be a factor >= 1") for d in ("cpu", "gpu")),
    *((f"recipe.lr.{d}", lambda v: _number(v, 0, open_lo=True), "must be a learning rate > 0")
      for d in ("near", "far")),
    ("recipe.lr_far_gap", lambda v: _number(v, 0, 1), "must be an accuracy gap in [0, 1]"),
    ("recipe.flip_max_drop", lambda v: _number(v, 0, 1), "must be an accuracy drop in [0, 1]"),
    ("recipe.no_holdout_max_per_class", lambda v: _whole(v, 0), "must be a whole number of images per class >= 0"),
    ("ensemble.size", lambda v: _whole(v, 1), "must be a positive integer (1 = no ensemble)"),
    ("ensemble.snapshots", lambda v: isinstance(v, bool), _FLAG),
    ("report", lambda v: isinstance(v, bool), _FLAG),
    ("tta", lambda v: v is None or OmegaConf.is_list(v) or isinstance(v, list),
     "must be a list, e.g. tta=[hflip] or tta=[hflip,five_crop]"),
    *((f"model.{k}", lambda v: isinstance(v, bool), _FLAG) for k in ("channels_last", "compile")),
]

_ABSENT = object()


def check_values(cfg: DictConfig) -> None:
    """Each rule of VALUE_RULES whose key the config has."""
    for key, check, requirement in VALUE_RULES:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, default=_ABSENT)
        except OmegaConfBaseException as e:  # a bad ${...} interpolation the user wrote
            raise FinetuneError(f"{key} could not be read: {str(e).splitlines()[0]}. Fix its ${{...}} reference "
                                f"(`--cfg job` prints the config).") from None
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if value is not _ABSENT and not check(value):
            shown = "''" if value == "" else value
            raise FinetuneError(f"{key}={shown} {requirement}.")


def check_train_config(cfg: DictConfig) -> None:
    """What ``finetune`` (and ``finetune-advise``) can check from the config alone, without torch or Lightning:
    unknown keys, value types and ranges, metric names, and the combinations that are refused."""
    from finetune.task import check_task

    check_known_keys(cfg)
    check_values(cfg)
    _check_monitor("monitor", cfg.monitor)
    check_task(cfg)
    if cfg.monitor_mode not in ("min", "max"):
        raise FinetuneError(f"monitor_mode={cfg.monitor_mode} must be min or max.")
    if cfg.score_checkpoint not in ("auto", "best", "last"):
        raise FinetuneError(f"score_checkpoint={cfg.score_checkpoint} must be auto, best or last.")
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and cb.get("monitor") is not None:
            _check_monitor(f"callbacks.{name}.monitor", cb.monitor)
    if cfg.scheduler.get("_target_") and cfg.scheduler.get("monitor") is not None:
        _check_monitor("scheduler.monitor", cfg.scheduler.monitor)
    if cfg.policy.head_solver not in ("lbfgs", "optimizer"):
        raise FinetuneError(f"policy.head_solver={cfg.policy.head_solver} must be lbfgs or optimizer.")
    if float(cfg.data.val_fraction) + float(cfg.data.test_fraction) >= 1:
        raise FinetuneError("data.val_fraction + data.test_fraction must leave training images (sum < 1).")
    _check_combinations(cfg)


def _check_combinations(cfg: DictConfig) -> None:
    """Settings that are each valid but do not work together (or on this kind of machine)."""
    views = cfg.policy.cache_views
    if not (isinstance(views, int) and views >= 0):
        raise FinetuneError(f"policy.cache_views={views} must be a whole number >= 0.")
    if str(cfg.optimizer._target_).endswith("LBFGS"):
        if any(tag in str(cfg.trainer.precision) for tag in ("16",)):
            raise FinetuneError(
                f"optimizer=lbfgs does not work with trainer.precision={cfg.trainer.precision}: its line search "
                f"needs exact losses and gradients (Lightning refuses mixed precision with L-BFGS). "
                f"Use trainer.precision=32-true or another optimizer."
            )
        if cfg.policy.name in ("lp_ft", "gradual"):
            raise FinetuneError(
                f"optimizer=lbfgs does not fit policy={cfg.policy.name}, which unfreezes layers during training "
                f"(L-BFGS keeps one fixed set of parameters). Use another optimizer or a fixed policy."
            )
    if cfg.trainer.get("sync_batchnorm") and str(cfg.trainer.accelerator) == "cpu":
        raise FinetuneError(
            "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is CUDA-only). On CPU leave it false, "
            "or keep BatchNorm on its pretrained statistics with regularization.trainable_bn=eval."
        )
    if cfg.lr_scaling not in ("none", "linear", "sqrt"):
        raise FinetuneError(f"lr_scaling={cfg.lr_scaling} must be none, linear or sqrt.")
    warmup = cfg.scheduler.warmup_epochs
    if not (isinstance(warmup, int) and warmup >= 0):
        raise FinetuneError(f"scheduler.warmup_epochs={warmup} must be a whole number of epochs >= 0.")
    checks = cfg.scheduler.get("checks_per_epoch")  # plateau.yaml's keys; other schedules have none
    if checks is not None and not (isinstance(checks, int) and not isinstance(checks, bool) and checks >= 1):
        raise FinetuneError(f"scheduler.checks_per_epoch={checks} must be a whole number >= 1 (validation checks "
                            f"per epoch, each one a chance for the plateau rule to act).")
    anneal = cfg.scheduler.get("final_anneal")
    if anneal is not None and not (isinstance(anneal, (int, float)) and not isinstance(anneal, bool)
                                   and 0 <= anneal < 1):
        raise FinetuneError(f"scheduler.final_anneal={anneal} must be a fraction of the run in [0, 1) (0 = none).")
    _check_ensemble(cfg)


def _check_ensemble(cfg: DictConfig) -> None:
    size = cfg.ensemble.size
    if not (isinstance(size, int) and size >= 1):
        raise FinetuneError(f"ensemble.size={size} must be a positive integer (1 = no ensemble).")
    if cfg.ensemble.snapshots:
        if not str(cfg.scheduler._target_ or "").endswith("cosine_restarts"):
            raise FinetuneError(
                "ensemble.snapshots=true takes a snapshot at the end of each LR cycle, so it needs scheduler="
                "cosine_restarts (set scheduler.cycle_epochs so that several cycles fit in trainer.max_epochs)."
            )
        if size > 1:
            raise FinetuneError("ensemble.snapshots=true and ensemble.size>1 together are not supported; choose one.")


def check_data_root(root: Any, key: str = "data.root") -> Path:
    """The image folder (or CSV) is set and exists: the first thing a training run needs from the file system,
    checked before torch is imported. The same messages as ``scan_dataset``, which reads the folder later."""
    if root in (None, "", "???"):
        raise FinetuneError(
            f"{key} is not set. Pass the image folder, e.g. `finetune {key}=path/to/images` "
            f"(class sub-folders, train/val/test folders, or a CSV with path,label columns)."
        )
    path = Path(str(root)).expanduser()
    if not path.exists():
        raise FinetuneError(f"{key}={path} does not exist. Check the path (relative paths start from {Path.cwd()}).")
    if path.is_file() and path.suffix.lower() != ".csv":
        raise FinetuneError(f"{key}={path} is a file but not a .csv; pass a folder of images or a CSV of path,label.")
    return path


def check_run_dir_outside_data(run_dir: Any, data_root: Any) -> None:
    """A run folder among the images (run_dir_in_data) is refused before anything is written: its checkpoints and
    logs would be mixed into the data, and the next scan would read it as a class with no images. ``run_dir``
    None: the default outputs/<date>/<time> under the current folder."""
    from finetune.run_folder import run_dir_in_data

    if not run_dir_in_data(run_dir if run_dir not in (None, "") else Path.cwd() / "outputs", data_root):
        return
    where = (f"run_dir={run_dir} is" if run_dir not in (None, "") else
             f"The run's default folder (outputs/<date>/<time> in the current folder, {Path.cwd()}) is")
    raise FinetuneError(f"{where} inside data.root={data_root}: the run's checkpoints and logs would be mixed with "
                        f"the images, and the next run would read its folder as a class. Pass a run_dir outside "
                        f"the data (e.g. run_dir={Path(str(data_root)).expanduser().absolute().parent / 'runs'}"
                        f"/NAME){'' if run_dir not in (None, '') else ', or start finetune from another folder'}.")

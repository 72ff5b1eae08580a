"""Check a composed config before any heavy work, and build the Lightning pieces it names.

Hydra already refuses unknown keys (struct mode); what it cannot know is which Trainer arguments,
metric keys and ``_target_`` classes are valid, so that is checked here, each failure naming its key.
"""

from __future__ import annotations

import difflib
import errno
import functools
import inspect
import logging
import math
import os
import pydoc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import FinetuneError, close_matches

log = logging.getLogger(__name__)

# Everything the LightningModule logs; monitors must name one of these.
LOGGED_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
# Keys of a scheduler config that Lightning or finetune read (the rest goes to the scheduler class).
LIGHTNING_SCHEDULER_KEYS = ("monitor", "interval", "frequency")
WARMUP_KEYS = ("warmup_epochs", "warmup_start_factor")


def resolve_run_dir(cfg: DictConfig, purpose: str = "a run writes its checkpoints, logs and report there") -> Path:
    """cfg.run_dir, else Hydra's output dir, else a fresh outputs/<time> folder (library calls); created.
    ``purpose`` completes the error message: what the folder is for."""
    from finetune.run_files import is_hydra_fallback

    if cfg.get("run_dir"):
        path = Path(str(cfg.run_dir)).expanduser()
    elif HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
        if is_hydra_fallback(path):  # the default outputs/<date>/<time> could not be written
            raise FinetuneError(f"The current folder {Path.cwd()} is not writable, and the run's default folder "
                                f"(outputs/<date>/<time>) is in it. Pass run_dir=DIR, a folder you can write to.")
    else:
        from datetime import datetime

        path = Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    link = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if link is not None:
        raise FinetuneError(f"run_dir={path} cannot be created: {link} is a symbolic link to {os.readlink(link)}, "
                            f"which does not exist. Create that folder, or pass another run_dir.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "a file is in the way" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror or e
        raise FinetuneError(f"run_dir={path} cannot be created ({what}): {purpose}. Pass run_dir=DIR, a folder you "
                            f"can write to.") from None
    return path.resolve()


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
    ("data.batch_size", lambda v: _whole(v, 1), "must be a positive integer"),
    ("data.eval_batch_size", _optional(lambda v: _whole(v, 1)), "must be a positive integer or null (= data.batch_size)"),
    ("data.num_workers", _optional(lambda v: _whole(v, 0), "auto"), "must be auto or a whole number >= 0 (0: load in the main process)"),
    ("data.image_size", _optional(lambda v: _whole(v, 8)), "must be an integer >= 8 (pixels of the square input) or null (the backbone's own)"),
    ("data.crop_pct", _optional(lambda v: _number(v, 0, 1, open_lo=True)), "must be in (0, 1] or null"),
    ("data.split_seed", lambda v: _whole(v, 0, 2**32 - 1), "must be a whole number in [0, 4294967295]"),
    ("data.val_fraction", lambda v: _number(v, 0) and v < 1, "must be a number in [0, 1)"),
    ("data.test_fraction", lambda v: _number(v, 0) and v < 1, "must be a number in [0, 1)"),
    ("data.preload", _optional(lambda v: isinstance(v, bool), "auto"), "must be auto, true or false"),
    ("data.pin_memory", _optional(lambda v: isinstance(v, bool), "auto"), "must be auto, true or false"),
    ("data.preload_max_gb", lambda v: _number(v, 0), "must be a number of GB >= 0"),
    ("data.validate", lambda v: isinstance(v, bool), _FLAG),
    ("data.min_image_side", lambda v: _whole(v, 1), "must be a whole number of pixels >= 1"),
    ("data.imbalance_ratio", lambda v: _number(v, 1), "must be a number >= 1"),
    ("policy.cache", lambda v: isinstance(v, bool) or str(v).lower() in ("auto", "false", "off", "no"), "must be auto or false"),
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
    *((f"policy.{k}", lambda v: isinstance(v, bool), _FLAG) for k in ("frozen_bn_eval", "train_stages", "head_warm_start")),
    ("policy.thresholds.small_max_per_class", lambda v: _number(v, 0),
     "must be a number of images per class >= 0 (below it the data counts as small)"),
    ("policy.thresholds.similar_max_gap", lambda v: _number(v, 0, 1), "must be an accuracy gap in [0, 1]"),
    ("callbacks.early_stopping.patience", lambda v: _whole(v, 0), "must be a whole number of epochs >= 0"),
    ("callbacks.early_stopping.min_delta", lambda v: _number(v, 0), "must be a number >= 0"),
    ("ensemble.size", lambda v: _whole(v, 1), "must be a positive integer (1 = no ensemble)"),
    ("ensemble.snapshots", lambda v: isinstance(v, bool), _FLAG),
    ("report", lambda v: isinstance(v, bool), _FLAG),
    ("tta", lambda v: v is None or OmegaConf.is_list(v) or isinstance(v, list),
     "must be a list, e.g. tta=[hflip] or tta=[hflip,five_crop]"),
    *((f"model.{k}", lambda v: isinstance(v, bool), _FLAG) for k in ("channels_last", "compile")),
]


def _validate_values(cfg: DictConfig) -> None:
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
    _check_precision(cfg.trainer.get("precision"))
    _check_accelerator(cfg.trainer.get("accelerator"))


_ABSENT = object()


def _check_precision(precision: Any) -> None:
    """Lightning's own list of precision values (the Trainer refuses anything else, but only once built)."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    try:
        with warnings.catch_warnings():  # the Trainer repeats its own warnings (e.g. precision=16) when built
            warnings.simplefilter("ignore")
            _convert_precision_to_unified_args(precision)
    except ValueError:
        choices = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
        raise FinetuneError(
            f"trainer.precision={precision} is not a precision Lightning knows; use one of {', '.join(choices)}."
            f"{close_matches(str(precision), choices)}"
        ) from None


def _check_accelerator(accelerator: Any) -> None:
    """A known accelerator that this machine has: `trainer=gpu` on a CPU-only machine fails here, not in fit."""
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    if accelerator is None or not isinstance(accelerator, str) or accelerator == "auto":
        return
    known = sorted({*AcceleratorRegistry.available_accelerators(), "gpu", "auto"})
    if accelerator not in known:
        raise FinetuneError(
            f"trainer.accelerator={accelerator} is not an accelerator Lightning knows; use one of {', '.join(known)}."
            f"{close_matches(accelerator, known)}"
        )
    if accelerator == "gpu":
        available = CUDAAccelerator.is_available() or MPSAccelerator.is_available()
    else:
        available = AcceleratorRegistry.get(accelerator).is_available()
    if not available:
        raise FinetuneError(
            f"trainer.accelerator={accelerator}: this machine has no such device (torch sees no "
            f"{'GPU' if accelerator == 'gpu' else accelerator.upper()}). Train on the CPU with trainer=cpu "
            f"(or trainer.accelerator=auto, which picks what is there)."
        )


# --------------------------------------------------------------------------- keys nothing reads

# Where any key is valid: timm's keyword arguments, and groups whose entries are checked elsewhere (Trainer
# arguments against its signature, optimizer/scheduler keys against their _target_, callbacks and loggers are
# {name: {_target_: ...}} entries of the user's choosing).
FREE_FORM_KEYS = ("model.kwargs", "trainer", "optimizer", "scheduler", "callbacks", "logger", "hparams_search")
# The config groups each command composes (their options' YAML files give the keys finetune reads).
COMMAND_GROUPS = {"train": ("data", "policy", "model", "augment", "optimizer", "scheduler", "regularization",
                            "trainer", "logger", "callbacks", "hparams_search"),
                  "preview": ("data", "model", "augment")}


def _conf_yaml(relative: str) -> dict[str, Any]:
    import importlib.resources

    import yaml

    text = (importlib.resources.files("finetune.conf") / relative).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    data.pop("defaults", None)
    data.pop("hydra", None)
    return data


def _union(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _union(into[key], value)
        elif isinstance(value, dict) or key not in into:
            into[key] = dict(value) if isinstance(value, dict) else value
    return into


@functools.cache
def known_keys(command: str) -> dict[str, Any]:
    """The key tree a command's config may have: its own YAML's keys, and for each group the union of the keys
    of every option of that group (``data``: data/*.yaml; ``policy``: policy/*.yaml, with base.yaml's)."""
    import importlib.resources

    tree = _conf_yaml(f"{command}.yaml")
    for group in COMMAND_GROUPS.get(command, ()):
        merged: dict[str, Any] = {}
        for option in sorted((importlib.resources.files("finetune.conf") / group).iterdir(), key=lambda f: f.name):
            if option.name.endswith(".yaml"):
                _union(merged, _conf_yaml(f"{group}/{option.name}"))
        tree[group] = merged
    return tree


def check_known_keys(cfg: DictConfig, command: str = "train") -> None:
    """Refuse a key that nothing reads: ``+data.foo=1`` (or ``+policy.lr_decy=0.5``: Hydra's own advice for a
    misspelled key is the '+', which adds it) would otherwise be accepted and silently change nothing."""
    _check_keys(cfg, known_keys(command), "", command)


def _check_keys(node: DictConfig, known: dict[str, Any], prefix: str, command: str) -> None:
    for key in node:
        path = f"{prefix}{key}"
        if path in FREE_FORM_KEYS:
            continue
        if key not in known:
            where = f"under {prefix[:-1]}" if prefix else "at the top level"
            names = sorted(str(k) for k in known)
            closest = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            fix = (f"Set an existing key without '+', e.g. {prefix}{closest[0]}=..., or remove {path}." if closest
                   else f"Remove {path} (a '+' adds a key; an existing one is set without it).")
            raise FinetuneError(
                f"{path} is not a key that finetune{'-' + command if command != 'train' else ''} reads ({where}), so "
                f"setting it would change nothing.{close_matches(str(key), names, prefix=prefix)} The keys "
                f"{where} are: {', '.join(names)}. {fix}"
            )
        child = node._get_node(key)
        if isinstance(known[key], dict) and isinstance(child, DictConfig) and not child._is_none():
            _check_keys(child, known[key], f"{path}.", command)


def validate_train_config(cfg: DictConfig) -> None:
    """Fail fast on values Hydra cannot check: Trainer arguments, monitored keys, targets."""
    check_known_keys(cfg)
    trainer_args = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    for key in cfg.trainer:
        if key not in trainer_args:
            raise FinetuneError(
                f"trainer.{key} is not an argument of lightning.pytorch.Trainer.{close_matches(str(key), trainer_args)} "
                f"Remove it or use one of the Trainer's arguments."
            )
    _validate_values(cfg)
    from finetune.models.backbone import weight_source

    weight_source(str(cfg.model.backbone), cfg.model.get("weights"))  # a missing weights file fails here, not later
    _check_monitor("monitor", cfg.monitor)
    if cfg.monitor_mode not in ("min", "max"):
        raise FinetuneError(f"monitor_mode={cfg.monitor_mode} must be min or max.")
    if cfg.get("score_checkpoint", "auto") not in ("auto", "best", "last"):
        raise FinetuneError(f"score_checkpoint={cfg.score_checkpoint} must be auto, best or last.")
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and cb.get("monitor") is not None:
            _check_monitor(f"callbacks.{name}.monitor", cb.monitor)
    _warn_without_checkpoints(cfg)
    if cfg.scheduler.get("_target_") and cfg.scheduler.get("monitor") is not None:
        _check_monitor("scheduler.monitor", cfg.scheduler.monitor)
    if cfg.policy.get("head_solver", "lbfgs") not in ("lbfgs", "optimizer"):
        raise FinetuneError(f"policy.head_solver={cfg.policy.head_solver} must be lbfgs or optimizer.")
    if float(cfg.data.val_fraction) + float(cfg.data.test_fraction) >= 1:
        raise FinetuneError("data.val_fraction + data.test_fraction must leave training images (sum < 1).")
    _validate_recipe(cfg)


def _warn_without_checkpoints(cfg: DictConfig) -> None:
    """``~callbacks.model_checkpoint ~callbacks.last_checkpoint`` trains a model that is gone at exit: say so first."""
    saved = {str(name): str(cb.get("filename")) for name, cb in (cfg.get("callbacks") or {}).items()
             if cb is not None and str(cb.get("_target_", "")).endswith("ModelCheckpoint")}
    if not saved:
        log.warning("No checkpoint callback (callbacks.model_checkpoint and callbacks.last_checkpoint were removed): "
                    "this run saves no weights, so it cannot be resumed, evaluated or used for predictions.")
    elif "last" not in saved.values():
        log.warning("No callbacks.last_checkpoint: this run writes no checkpoints/last.ckpt, so `finetune resume=RUN` "
                    "cannot continue it if it stops.")


def _validate_recipe(cfg: DictConfig) -> None:
    """Optimizer, scheduler, regularization, ensemble and TTA values that no schema can check."""
    from finetune.data.mixing import build_batch_mixer
    from finetune.data.transforms import Preprocessing, train_transform
    from finetune.inference import check_tta
    from finetune.recipe.regularization import Regularization

    Regularization.from_config(OmegaConf.to_container(cfg.get("regularization") or {}, resolve=True))
    augment = OmegaConf.to_container(cfg.get("augment") or {}, resolve=True)
    train_transform(Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0), augment)  # names and parameters
    build_batch_mixer(augment, 2)
    views = cfg.policy.get("cache_views", 0)
    if not (isinstance(views, int) and views >= 0):
        raise FinetuneError(f"policy.cache_views={views} must be a whole number >= 0.")
    check_tta(cfg.get("tta"))
    _check_optimizer(cfg.optimizer)
    _check_call_arguments("scheduler", cfg.scheduler, skip=(*LIGHTNING_SCHEDULER_KEYS, *WARMUP_KEYS))
    _check_schedule(cfg)
    optimizer = str(cfg.optimizer.get("_target_", ""))
    if optimizer.endswith("LBFGS"):
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
    if cfg.get("lr_scaling", "none") not in ("none", "linear", "sqrt"):
        raise FinetuneError(f"lr_scaling={cfg.lr_scaling} must be none, linear or sqrt.")
    warmup = cfg.scheduler.get("warmup_epochs", 0)
    if not (isinstance(warmup, int) and warmup >= 0):
        raise FinetuneError(f"scheduler.warmup_epochs={warmup} must be a whole number of epochs >= 0.")
    ensemble = cfg.get("ensemble") or {}
    size = ensemble.get("size", 1)
    if not (isinstance(size, int) and size >= 1):
        raise FinetuneError(f"ensemble.size={size} must be a positive integer (1 = no ensemble).")
    if ensemble.get("snapshots", False):
        if not str(cfg.scheduler.get("_target_", "")).endswith("cosine_restarts"):
            raise FinetuneError(
                "ensemble.snapshots=true takes a snapshot at the end of each LR cycle, so it needs "
                "scheduler=cosine_restarts (set scheduler.cycle_epochs so that several cycles fit in trainer.max_epochs)."
            )
        if size > 1:
            raise FinetuneError("ensemble.snapshots=true and ensemble.size>1 together are not supported; choose one.")


# Scheduler arguments that are lengths (epochs, or steps for interval=step): torch accepts 0 or a negative
# number for some of them and the schedule then divides by zero or runs backwards, in fit.
SCHEDULE_LENGTHS = ("T_max", "step_size", "cycle_epochs", "cycle_mult", "T_0", "T_mult", "total_steps", "epochs",
                    "steps_per_epoch", "total_iters")
# Schedules that do not need the run's length: what to suggest when trainer.max_epochs=-1.
ENDLESS_SCHEDULES = "scheduler=plateau, step, multistep, exponential, inverse_time, cosine_restarts or none"


def _check_schedule(cfg: DictConfig) -> None:
    """(Issue 14) A schedule that needs the run's length when it has none (trainer.max_epochs=-1: Lightning's
    "no limit"), lengths that are not >= 1, and whatever torch refuses when it builds the scheduler, all before
    any data is read; a schedule that ends before the run does is a warning."""
    node = cfg.scheduler
    target = str(node.get("_target_") or "")
    name = target.rsplit(".", 1)[-1]
    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    raw = OmegaConf.to_container(node, resolve=False)
    if max_epochs == -1:
        for key, value in raw.items():
            if isinstance(value, str) and "trainer.max_epochs" in value:
                raise FinetuneError(
                    f"scheduler.{key}={value} is the run's length in epochs, but trainer.max_epochs=-1 sets none, so "
                    f"{name} would anneal over -1 epochs. Set trainer.max_epochs=N (trainer.max_time can still stop "
                    f"it earlier), or scheduler.{key}=N, or use a schedule without an end: {ENDLESS_SCHEDULES}."
                )
        if name == "OneCycleLR" and max_steps in (-1, None):
            raise FinetuneError(
                "scheduler=onecycle spreads one cycle over the run's steps, but trainer.max_epochs=-1 with "
                "trainer.max_steps=-1 gives the run no length. Set trainer.max_epochs=N or trainer.max_steps=N, or use "
                f"{ENDLESS_SCHEDULES}."
            )
        if (cfg.get("ensemble") or {}).get("snapshots"):
            raise FinetuneError("ensemble.snapshots=true takes its snapshots at the cycle ends that fit in "
                                "trainer.max_epochs, but trainer.max_epochs=-1 sets no end. Set trainer.max_epochs=N.")
    if not target:
        return
    for key in SCHEDULE_LENGTHS:
        if key in node and node[key] is not None and not _whole(node[key], 1):
            raise FinetuneError(f"scheduler.{key}={node[key]} must be a whole number >= 1 (a length in "
                                f"{'steps' if node.get('interval') == 'step' else 'epochs'}).")
    if "milestones" in node:
        milestones = OmegaConf.to_container(node.milestones) if OmegaConf.is_list(node.milestones) else node.milestones
        if not (isinstance(milestones, list) and milestones and all(_whole(m, 1) for m in milestones)):
            raise FinetuneError(f"scheduler.milestones={milestones} must be a list of epochs >= 1, e.g. "
                                f"scheduler.milestones=[5,8].")
    _build_dummy_scheduler(cfg)
    if isinstance(max_epochs, int) and max_epochs > 0 and node.get("interval", "epoch") == "epoch":
        _warn_short_schedule(node, name, max_epochs)


def _build_dummy_scheduler(cfg: DictConfig) -> None:
    """What torch checks when it builds the scheduler (a mode, a factor, pct_start, the warmup) on a dummy
    optimizer, as _check_optimizer does: otherwise it fails in fit, after the data check and measurement."""
    import torch

    from finetune.recipe.schedulers import build_lr_schedulers

    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    total = max_steps if _whole(max_steps, 1) else max_epochs if _whole(max_epochs, 1) else 10
    try:
        _, factory, options = build_optimizer_and_scheduler(OmegaConf.create(
            {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
             "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True)}))
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        warmup = {k: options.pop(k) for k in WARMUP_KEYS if k in options}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_lr_schedulers(optimizer, factory, options, int(warmup.get("warmup_epochs", 0) or 0),
                                float(warmup.get("warmup_start_factor", 0.1)), 1, int(total))
    except FinetuneError:
        raise
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, RuntimeError) as e:
        raise FinetuneError(f"scheduler ({cfg.scheduler._target_}) refuses its settings: {str(e).splitlines()[0].rstrip('.!')}. "
                            f"Fix the scheduler.* value it names.") from None


def _warn_short_schedule(node: DictConfig, name: str, max_epochs: int) -> None:
    """Schedules that end, or never start, within the run: not an error, but rarely what was meant."""
    if name == "CosineAnnealingLR" and _whole(node.get("T_max"), 1) and node.T_max < max_epochs:
        log.warning("scheduler.T_max=%s is shorter than trainer.max_epochs=%s: torch's cosine is periodic, so the LR "
                    "climbs back up after epoch %s. Leave scheduler.T_max=${trainer.max_epochs} (the default) unless "
                    "that is what you want.", node.T_max, max_epochs, node.T_max)
    milestones = list(node.milestones) if "milestones" in node else [node.step_size] if "step_size" in node else []
    if milestones and all(_whole(m, 1) and m >= max_epochs for m in milestones):
        log.warning("scheduler=%s changes the LR first at epoch %s, but the run has only %s epochs "
                    "(trainer.max_epochs): the LR stays constant.", name, min(milestones), max_epochs)


# Optimizer arguments that torch checks only when it builds the optimizer (in fit, after the data check and
# the measurement), and that must not be negative.
OPTIMIZER_NONNEGATIVE = ("weight_decay", "momentum", "dampening", "eps", "lr_decay", "alpha", "initial_accumulator_value")


def _check_call_arguments(group: str, node: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Every key of an optimizer/scheduler config must be an argument of its ``_target_``: ``+optimizer.lrr=0.1``
    (Hydra's own hint for a typo) would otherwise reach torch as an unknown keyword, or be ignored unseen."""
    target = node.get("_target_")
    if not target:
        return
    try:
        params = inspect.signature(pydoc.locate(str(target))).parameters
    except (TypeError, ValueError):  # locate found nothing callable: the target itself is wrong
        raise FinetuneError(f"{group}._target_={target} is not an importable class or function. "
                            f"Choose one of the {group} config group (`{group}=NAME`) or fix the dotted path.") from None
    names = [n for n in params if n not in ("params", "optimizer")]
    for key in node:
        if str(key).startswith("_") or key in skip:
            continue
        if key not in params:
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                continue
            raise FinetuneError(
                f"{group}.{key} is not an argument of {target}.{close_matches(str(key), names)} Its arguments are "
                f"{', '.join(names)}; remove {group}.{key} (with ~{group}.{key} if it came from a config)."
            )
        value, default = node[key], params[key].default
        numeric = params[key].annotation in (int, float, "int", "float") or (
            isinstance(default, (int, float)) and not isinstance(default, bool))
        if numeric and not OmegaConf.is_config(value) and not _number(value, float("-inf")):  # torch checks
            # ranges when it builds the optimizer, not types: a str would fail in the middle of fit
            raise FinetuneError(f"{group}.{key}={value} must be a number ({target} takes a number for {key}).")


def _check_optimizer(node: DictConfig) -> None:
    """Keys, the LR (> 0: torch accepts 0, which trains nothing) and non-negative values, then torch's own checks
    by building the optimizer on a dummy parameter, all before any data is read."""
    import torch

    _check_call_arguments("optimizer", node)
    if "lr" in node and not _number(node.lr, 0, open_lo=True):
        raise FinetuneError(f"optimizer.lr={node.lr} must be a number > 0, e.g. optimizer.lr=0.001.")
    for key in OPTIMIZER_NONNEGATIVE:
        if key in node and not _number(node[key], 0):
            raise FinetuneError(f"optimizer.{key}={node[key]} must be a number >= 0.")
    if not node.get("_target_"):
        return
    # Device-bound switches are checked by torch against the real parameters' device, in fit.
    device_bound = {k: False if k != "foreach" else None for k in ("fused", "capturable", "foreach") if k in node}
    try:
        instantiate(node, **device_bound)([torch.nn.Parameter(torch.zeros(1))])
    except (InstantiationException, ValueError, TypeError, RuntimeError) as e:
        cause = e.__cause__ or e if isinstance(e, InstantiationException) else e
        raise FinetuneError(
            f"optimizer ({node._target_}) refuses its settings: {str(cause).splitlines()[0]}. "
            f"Fix the optimizer.* value it names."
        ) from None


def instantiate_named(group: str, node: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    out = []
    for name, item in (node or {}).items():
        if item is None or not item.get("_target_"):
            continue
        try:
            out.append(instantiate(item))
        except InstantiationException as e:
            cause = e.__cause__ or e
            if isinstance(cause, ModuleNotFoundError):
                package = cause.name or name  # Lightning's own availability checks set no name
                raise FinetuneError(
                    f"{group}.{name} needs the package '{package}', which is not installed: "
                    f"`pip install {package}` (or the finetune[{name}] extra), or choose another {group}."
                ) from None
            raise FinetuneError(f"{group}.{name} could not be built: {str(cause).splitlines()[0]}") from None
    return out


def build_optimizer_and_scheduler(cfg: DictConfig) -> tuple[Any, Any, dict[str, Any]]:
    """(optimizer partial, scheduler partial or None, scheduler options: Lightning's and the warmup)."""
    try:
        optimizer = instantiate(cfg.optimizer)
    except InstantiationException as e:
        raise FinetuneError(f"optimizer could not be built: {str(e.__cause__ or e).splitlines()[0]}") from None
    sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
    options = {k: sched_cfg.pop(k) for k in (*LIGHTNING_SCHEDULER_KEYS, *WARMUP_KEYS) if k in sched_cfg}
    if not sched_cfg.get("_target_"):
        return optimizer, None, {k: v for k, v in options.items() if k in WARMUP_KEYS}
    try:
        scheduler = instantiate(sched_cfg)
    except InstantiationException as e:
        raise FinetuneError(f"scheduler could not be built: {str(e.__cause__ or e).splitlines()[0]}") from None
    return optimizer, scheduler, options

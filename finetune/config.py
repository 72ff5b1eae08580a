"""Check a composed config before any heavy work, and build the Lightning pieces it names.

Hydra already refuses unknown keys (struct mode); what it cannot know is which Trainer arguments,
metric keys and ``_target_`` classes are valid, so that is checked here, each failure naming its key.
What needs no library (keys, values, metric names, the data folder) is in ``config_checks.py`` and runs
first; Lightning and torch are imported only by the checks below, which need them.
"""

from __future__ import annotations

import inspect
import logging
import pydoc
import warnings
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.config_checks import LOGGED_METRICS, _number, _whole, check_train_config
from finetune.config_keys import check_known_keys, known_keys
from finetune.errors import FinetuneError, close_matches

__all__ = ["LOGGED_METRICS", "build_optimizer_and_scheduler", "check_known_keys", "instantiate_named", "known_keys",
           "validate_train_config"]

log = logging.getLogger(__name__)

# Keys of a scheduler config that Lightning or finetune read (the rest goes to the scheduler class).
LIGHTNING_SCHEDULER_KEYS = ("monitor", "interval", "frequency")
WARMUP_KEYS = ("warmup_epochs", "warmup_start_factor")
# Read by finetune for scheduler=plateau (recipe/schedulers.py): validation checks per epoch, final anneal.
PLATEAU_KEYS = ("checks_per_epoch", "final_anneal")


def validate_train_config(cfg: DictConfig) -> None:
    """Fail fast on values Hydra cannot check: first what the config alone tells (no heavy import), then
    Trainer arguments, precision, accelerator, weights and the recipe's targets."""
    check_train_config(cfg)  # with check_task: what task=multilabel refuses
    _check_trainer_arguments(cfg.trainer)
    _check_precision(cfg.trainer.get("precision"))
    _check_accelerator(cfg.trainer.get("accelerator"))
    from finetune.models.backbone import weight_source

    weight_source(str(cfg.model.backbone), cfg.model.get("weights"))  # a missing weights file fails here, not later
    _warn_without_checkpoints(cfg)
    _validate_recipe(cfg)


def _check_trainer_arguments(trainer: DictConfig) -> None:
    import lightning as L

    names = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    for key in trainer:
        if key not in names:
            raise FinetuneError(
                f"trainer.{key} is not an argument of lightning.pytorch.Trainer.{close_matches(str(key), names)} "
                f"Remove it or use one of the Trainer's arguments."
            )


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
    """Optimizer, scheduler, regularization, augmentation and TTA values that no schema can check (the
    combinations that need no library are checked in config_checks)."""
    import numpy as np
    import torch

    from finetune.data.mixing import build_batch_mixer
    from finetune.data.transforms import Preprocessing, not_uint8_error, train_transform
    from finetune.data.tta import check_tta
    from finetune.recipe.regularization import Regularization

    Regularization.from_config(OmegaConf.to_container(cfg.get("regularization") or {}, resolve=True))
    augment = OmegaConf.to_container(cfg.get("augment") or {}, resolve=True)
    uint8 = bool(cfg.data.normalize_on_device)
    pipeline = train_transform(Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0), augment,
                               uint8=uint8)  # names and parameters
    if uint8 and (dtype := pipeline(image=np.full((48, 48, 3), 128, np.uint8))["image"].dtype) != torch.uint8:
        raise not_uint8_error(dtype)
    build_batch_mixer(augment, 2)
    check_tta(cfg.get("tta"))
    _check_optimizer(cfg.optimizer)
    _check_call_arguments("scheduler", cfg.scheduler, skip=(*LIGHTNING_SCHEDULER_KEYS, *WARMUP_KEYS, *PLATEAU_KEYS))
    _check_schedule(cfg)


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
    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.max_steps
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
        if cfg.ensemble.snapshots:
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
    if isinstance(max_epochs, int) and max_epochs > 0 and node.interval == "epoch":
        _warn_short_schedule(node, name, max_epochs)


def _build_dummy_scheduler(cfg: DictConfig) -> None:
    """What torch checks when it builds the scheduler (a mode, a factor, pct_start, the warmup) on a dummy
    optimizer, as _check_optimizer does: otherwise it fails in fit, after the data check and measurement."""
    import torch

    from finetune.recipe.schedulers import build_lr_schedulers

    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.max_steps
    total = max_steps if _whole(max_steps, 1) else max_epochs if _whole(max_epochs, 1) else 10
    try:
        _, factory, options = build_optimizer_and_scheduler(OmegaConf.create(
            {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
             "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True)}))
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        warmup = {k: options.pop(k) for k in WARMUP_KEYS if k in options}
        anneal = float(options.pop("final_anneal", 0.0) or 0.0)
        options.pop("checks_per_epoch", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_lr_schedulers(optimizer, factory, options, int(warmup["warmup_epochs"]),
                                float(warmup["warmup_start_factor"]), 1, int(total), final_anneal=anneal)
    except FinetuneError:
        raise
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, RuntimeError) as e:
        raise FinetuneError(f"scheduler ({cfg.scheduler._target_}) refuses its settings: "
                            f"{str(e).splitlines()[0].rstrip('.!')}. Fix the scheduler.* value it names.") from None


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
OPTIMIZER_NONNEGATIVE = ("weight_decay", "momentum", "dampening", "eps", "lr_decay", "alpha",
                         "initial_accumulator_value")


def _check_call_arguments(group: str, node: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Every key of an optimizer/scheduler config must be an argument of its ``_target_``: ``+optimizer.lrr=0.1``
    (Hydra's own hint for a typo) would otherwise reach torch as an unknown keyword, or be ignored unseen."""
    target = node.get("_target_")
    if not target:
        return
    try:
        params = inspect.signature(pydoc.locate(str(target))).parameters
    except (TypeError, ValueError):  # locate found nothing callable: the target itself is wrong
        raise FinetuneError(f"{group}._target_={target} is not an importable class or function. Choose one of "
                            f"the {group} config group (`{group}=NAME`) or fix the dotted path.") from None
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
    options = {k: sched_cfg.pop(k) for k in (*LIGHTNING_SCHEDULER_KEYS, *WARMUP_KEYS, *PLATEAU_KEYS) if k in sched_cfg}
    if not sched_cfg.get("_target_"):
        return optimizer, None, {k: v for k, v in options.items() if k in WARMUP_KEYS}
    try:
        scheduler = instantiate(sched_cfg)
    except InstantiationException as e:
        raise FinetuneError(f"scheduler could not be built: {str(e.__cause__ or e).splitlines()[0]}") from None
    return optimizer, scheduler, options

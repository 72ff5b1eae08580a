"""Check a composed config before any heavy work, and build the Lightning pieces it names.

Hydra already refuses unknown keys (struct mode); what it cannot know is which Trainer arguments,
metric keys and ``_target_`` classes are valid, so that is checked here, each failure naming its key.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError, close_matches

log = logging.getLogger(__name__)

# Everything the LightningModule logs; monitors must name one of these.
LOGGED_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
# Keys of a scheduler config that Lightning or finetune read (the rest goes to the scheduler class).
LIGHTNING_SCHEDULER_KEYS = ("monitor", "interval", "frequency")
WARMUP_KEYS = ("warmup_epochs", "warmup_start_factor")


def resolve_run_dir(cfg: DictConfig) -> Path:
    """cfg.run_dir, else Hydra's output dir, else a fresh outputs/<time> folder (library calls)."""
    if cfg.get("run_dir"):
        path = Path(cfg.run_dir)
    elif HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
    else:
        from datetime import datetime

        path = Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _check_monitor(key: str, value: Any) -> None:
    if value not in LOGGED_METRICS:
        raise FinetuneError(
            f"{key}={value} is not a metric that training logs; choose one of {', '.join(LOGGED_METRICS)}."
            f"{close_matches(str(value), LOGGED_METRICS)}"
        )


def validate_train_config(cfg: DictConfig) -> None:
    """Fail fast on values Hydra cannot check: Trainer arguments, monitored keys, targets."""
    trainer_args = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    for key in cfg.trainer:
        if key not in trainer_args:
            raise FinetuneError(
                f"trainer.{key} is not an argument of lightning.pytorch.Trainer.{close_matches(str(key), trainer_args)} "
                f"Remove it or use one of the Trainer's arguments."
            )
    _check_monitor("monitor", cfg.monitor)
    if cfg.monitor_mode not in ("min", "max"):
        raise FinetuneError(f"monitor_mode={cfg.monitor_mode} must be min or max.")
    if cfg.get("score_checkpoint", "auto") not in ("auto", "best", "last"):
        raise FinetuneError(f"score_checkpoint={cfg.score_checkpoint} must be auto, best or last.")
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and cb.get("monitor") is not None:
            _check_monitor(f"callbacks.{name}.monitor", cb.monitor)
    if cfg.scheduler.get("_target_") and cfg.scheduler.get("monitor") is not None:
        _check_monitor("scheduler.monitor", cfg.scheduler.monitor)
    if cfg.policy.get("head_solver", "lbfgs") not in ("lbfgs", "optimizer"):
        raise FinetuneError(f"policy.head_solver={cfg.policy.head_solver} must be lbfgs or optimizer.")
    for key in ("batch_size",):
        if not (isinstance(cfg.data[key], int) and cfg.data[key] > 0):
            raise FinetuneError(f"data.{key}={cfg.data[key]} must be a positive integer.")
    for key in ("val_fraction", "test_fraction"):
        if not 0 <= float(cfg.data[key]) < 1:
            raise FinetuneError(f"data.{key}={cfg.data[key]} must be in [0, 1).")
    if float(cfg.data.val_fraction) + float(cfg.data.test_fraction) >= 1:
        raise FinetuneError("data.val_fraction + data.test_fraction must leave training images (sum < 1).")
    _validate_recipe(cfg)


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

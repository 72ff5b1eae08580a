"""LR schedules beyond torch's ready-made classes, and the warmup put in front of any of them.

The formulas are the lecture's; each is built on a torch scheduler so that Lightning steps it,
checkpoints its state and resumes it like any other:
- exponential: lr = lr0 * exp(-k t)    -> ExponentialLR(gamma = exp(-k))
- inverse_time: lr = lr0 / (1 + k t)    -> MultiplicativeLR with the ratio of consecutive values
- cosine_restarts (SGDR), cycles given in epochs -> CosineAnnealingWarmRestarts stepped per batch
- final anneal (``final_anneal``: the last fraction of the steps): lr *= c(t) / c(t-1) with
  c the cosine from 1 to 0 -> MultiplicativeLR stepped per batch, beside the main schedule
Warmup: torch's LinearLR, joined with SequentialLR (or, for ReduceLROnPlateau, which SequentialLR
cannot hold, run beside it: both act on the current LR, so they compose). The final anneal also runs
beside: it multiplies whatever LR the plateau rule left, so the run ends near 0 from there.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LinearLR,
    LRScheduler,
    MultiplicativeLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
)

from finetune.errors import FinetuneError


def exponential_decay(optimizer: torch.optim.Optimizer, k: float) -> ExponentialLR:
    """lr = lr0 * exp(-k t), t counted in scheduler steps (epochs by default)."""
    return ExponentialLR(optimizer, gamma=math.exp(-float(k)))


class _InverseTimeFactor:
    """lr_t / lr_{t-1} for lr_t = lr0 / (1 + k t): a picklable callable, so resume restores it."""

    def __init__(self, k: float):
        self.k = float(k)

    def __call__(self, t: int) -> float:
        return (1 + self.k * (t - 1)) / (1 + self.k * t)


def inverse_time_decay(optimizer: torch.optim.Optimizer, k: float) -> MultiplicativeLR:
    """lr = lr0 / (1 + k t), t counted in scheduler steps (epochs by default)."""
    return MultiplicativeLR(optimizer, lr_lambda=_InverseTimeFactor(k))


def cosine_restarts(
    optimizer: torch.optim.Optimizer, cycle_epochs: int, cycle_mult: int = 1, eta_min: float = 0.0,
    steps_per_epoch: int = 1,
) -> CosineAnnealingWarmRestarts:
    """SGDR with its first cycle given in epochs (stepped every batch: steps_per_epoch is filled in)."""
    return CosineAnnealingWarmRestarts(
        optimizer, T_0=int(cycle_epochs) * int(steps_per_epoch), T_mult=int(cycle_mult), eta_min=float(eta_min)
    )


class _FinalAnnealFactor:
    """lr_t / lr_{t-1} of a cosine from 1 (at step ``start``) to ``floor`` (at step ``total``), 1 before
    ``start``: a picklable callable, so resume restores it. The floor keeps the ratio defined to the end."""

    def __init__(self, start: int, total: int, floor: float = 1e-3):
        self.start, self.total, self.floor = int(start), int(total), float(floor)

    def _cosine(self, t: int) -> float:
        done = min(1.0, max(0.0, (t - self.start) / max(1, self.total - self.start)))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * done))

    def __call__(self, t: int) -> float:
        return self._cosine(t) / self._cosine(t - 1)


def final_anneal_schedule(optimizer: torch.optim.Optimizer, fraction: float, total_steps: int) -> MultiplicativeLR:
    """Over the last ``fraction`` of ``total_steps``, every group's LR follows a cosine down to 0.1% of the LR it
    had when the anneal began (stepped per batch, composing with the schedule beside it)."""
    start = round(total_steps * (1 - float(fraction)))
    scheduler = MultiplicativeLR(optimizer, lr_lambda=_FinalAnnealFactor(start, total_steps))
    scheduler.anneal_start = start  # read by scoring: a plateau run that ends annealed scores its last epoch
    return scheduler


def anneal_start_step(trainer_configs) -> int | None:
    """The step the run's final anneal begins at, if it has one (``trainer.lr_scheduler_configs``)."""
    return next((c.scheduler.anneal_start for c in trainer_configs if hasattr(c.scheduler, "anneal_start")), None)


def cycle_end_epochs(cycle_epochs: int, cycle_mult: int, max_epochs: int) -> list[int]:
    """0-based epochs at whose end an SGDR cycle finishes (where snapshot ensembles take a snapshot)."""
    ends, length, end = [], int(cycle_epochs), 0
    while end + length <= max_epochs:
        end += length
        ends.append(end - 1)
        length *= int(cycle_mult)
    return ends


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    func = getattr(factory, "func", factory)
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def build_lr_schedulers(
    optimizer: torch.optim.Optimizer,
    factory: Callable[..., Any] | None,
    options: dict[str, Any],
    warmup_epochs: int,
    warmup_start_factor: float,
    steps_per_epoch: int,
    total_steps: int,
    final_anneal: float = 0.0,
) -> list[dict[str, Any]]:
    """Lightning's ``lr_scheduler`` configs for one optimizer: the schedule, with its warmup, and the final
    anneal beside them when ``final_anneal`` > 0."""
    configs = _main_and_warmup(optimizer, factory, options, warmup_epochs, warmup_start_factor, steps_per_epoch,
                               total_steps)
    if final_anneal > 0:
        if total_steps <= 0:
            raise FinetuneError("scheduler.final_anneal needs a run of known length (trainer.max_epochs or "
                                "trainer.max_steps), to know where its last fraction begins.")
        configs.append({"scheduler": final_anneal_schedule(optimizer, final_anneal, total_steps),
                        "interval": "step"})
    return configs



def _main_and_warmup(optimizer: torch.optim.Optimizer, factory: Callable[..., Any] | None, options: dict[str, Any],
                     warmup_epochs: int, warmup_start_factor: float, steps_per_epoch: int,
                     total_steps: int) -> list[dict[str, Any]]:
    options = dict(options)
    interval = options.get("interval", "epoch")
    per = steps_per_epoch if interval == "step" else 1
    main = None
    if factory is not None:
        func = getattr(factory, "func", factory)
        extra: dict[str, Any] = {}
        if func is OneCycleLR:
            # Peak at each group's own (discriminative) LR, over the steps this run will take.
            extra = {"max_lr": [g["lr"] for g in optimizer.param_groups], "total_steps": total_steps}
        if _accepts(factory, "steps_per_epoch"):
            extra["steps_per_epoch"] = steps_per_epoch
        main = factory(optimizer, **extra)
    if warmup_epochs <= 0:
        return [{"scheduler": main, **options}] if main is not None else []
    if isinstance(main, OneCycleLR):
        raise FinetuneError("scheduler.warmup_epochs must be 0 with scheduler=onecycle: it warms up by itself "
                            "(scheduler.pct_start sets how long).")
    if not 0 < warmup_start_factor <= 1:
        raise FinetuneError(f"scheduler.warmup_start_factor={warmup_start_factor} must be in (0, 1].")
    warmup_steps = int(warmup_epochs) * per
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_steps)
    if main is None:
        return [{"scheduler": warmup, **options, "interval": interval}]
    if isinstance(main, ReduceLROnPlateau):
        return [{"scheduler": warmup, "interval": "epoch"}, {"scheduler": main, **options}]
    if not isinstance(main, LRScheduler):
        raise FinetuneError(
            f"scheduler {type(main).__name__} is not a torch LR scheduler; warmup cannot be joined to it."
        )
    joined = SequentialLR(optimizer, schedulers=[warmup, main], milestones=[warmup_steps])
    return [{"scheduler": joined, **options}]

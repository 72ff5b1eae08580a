"""Lightning callbacks for the recipe: the policy's unfreeze schedule, a readable record of plateau LR
reductions, the LR range a run trained with, and snapshots.

Lightning's LearningRateMonitor logs the LR every epoch; what a person wants to read is *when*
ReduceLROnPlateau fired and what the LR became, so that is logged and kept for metrics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import ReduceLROnPlateau

log = logging.getLogger(__name__)


def _group_lrs(trainer: L.Trainer) -> dict[str, float]:
    lrs = {}
    for i, optimizer in enumerate(trainer.optimizers):
        for j, group in enumerate(optimizer.param_groups):
            lrs[group.get("name", f"opt{i}_group{j}")] = float(group["lr"])
    return lrs


def _describe(lowered: dict[str, tuple[float, float]]) -> str:
    """'head 1e-03 -> 1e-04 (x0.1 in all 14 groups)', or each group where the factors differ."""
    factors = {round(new / old, 6) for old, new in lowered.values() if old > 0}
    name = "head" if "head" in lowered else next(iter(lowered))
    old, new = lowered[name]
    if len(factors) == 1:
        return f"{name} {old:.3g} -> {new:.3g} (x{factors.pop():g} in {len(lowered)} group(s))"
    return ", ".join(f"{k} {o:.3g} -> {n:.3g}" for k, (o, n) in lowered.items())


def plateau_scheduler(trainer: L.Trainer) -> ReduceLROnPlateau | None:
    """The run's ReduceLROnPlateau, if it has one."""
    return next((c.scheduler for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, ReduceLROnPlateau)), None)


class UnfreezeSchedule(BaseFinetuning):
    """The policy's plan applied at every epoch start: the groups it trains from that epoch get
    ``requires_grad`` (lp_ft, gradual unfreeze on schedule), and the parts asked to stay in eval mode do.

    The module adds it itself (``configure_callbacks``). Applying the plan for the current epoch is idempotent,
    so a resumed run lands on the right trainable set. Every param group exists from the first step
    (``policy.freeze.param_groups``): no group is added here (see ``policy/freeze.py`` for why).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # validate/test score the module as it is
            super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if pl_module.plan is not None:
            pl_module.apply_plan(epoch=0)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if pl_module.plan is None:
            return
        before = {n for n, p in pl_module.net.named_parameters() if p.requires_grad}
        groups = pl_module.apply_plan(epoch)
        if {n for n, p in pl_module.net.named_parameters() if p.requires_grad} != before:
            pl_module.print(f"Epoch {epoch}: trainable groups now {', '.join(groups)}")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning (2.6) does not call train() when fitting starts, and around validation it restores
        # the modes it saw: so the modes asked for are set again at every epoch start.
        super().on_train_epoch_start(trainer, pl_module)
        pl_module.hold_eval_modes()


class PlateauReductionLog(Callback):
    """Each ReduceLROnPlateau reduction: when, and every group's LR before and after.

    Lightning steps a plateau rule right after validation, after every other schedule of that batch or epoch
    (warmup, the final anneal) has stepped: so the LRs seen when validation ends, compared with those at the next
    batch (or the end of training), differ only by what the plateau rule did."""

    def __init__(self) -> None:
        self.reductions: list[dict[str, Any]] = []
        self._last: dict[str, float] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._last = _group_lrs(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        plateau, last, self._last = plateau_scheduler(trainer), self._last, None
        if plateau is None or last is None:
            return
        now = _group_lrs(trainer)
        lowered = {k: (last[k], v) for k, v in now.items() if k in last and v < last[k] * (1 - 1e-9)}
        if not lowered:
            return
        config = next(c for c in trainer.lr_scheduler_configs if c.scheduler is plateau)
        unit = "validation checks" if config.interval == "step" else "epochs"
        self.reductions.append({
            "after_epoch": int(trainer.current_epoch),  # the epoch it fired in (epoch-wise: epochs completed)
            "step": int(trainer.global_step),
            "monitor": config.monitor,
            "lr": {k: new for k, (_, new) in lowered.items()},
            "previous_lr": {k: old for k, (old, _) in lowered.items()},
        })
        rank_zero_info(f"Epoch {trainer.current_epoch}, step {trainer.global_step}: ReduceLROnPlateau lowered the "
                       f"learning rate ({config.monitor} did not improve for {plateau.patience + 1} {unit}): "
                       f"{_describe(lowered)}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._last is not None:
            self._check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"reductions": list(self.reductions)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reductions = list(state_dict.get("reductions", []))


class LRTrace(Callback):
    """The highest learning rate any group trained with, and the one the last step used: together they
    say whether the schedule annealed by the end (one-cycle, cosine), which decides what checkpoint
    ``score_checkpoint=auto`` scores. Kept in checkpoints, so a resumed run still knows its peak."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.last = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        lrs = _group_lrs(trainer).values()
        if lrs:
            self.last = max(lrs)
            self.peak = max(self.peak, self.last)

    def annealed(self, fraction: float) -> bool:
        """The last step's LR is at most ``fraction`` of the peak."""
        return self.peak > 0 and self.last <= fraction * self.peak

    def state_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.peak = float(state_dict.get("peak", 0.0))
        self.last = float(state_dict.get("last", 0.0))


class SnapshotCheckpoint(Callback):
    """Save ``snapshot_<k>.ckpt`` at the end of the given (0-based) epochs: the ends of SGDR cycles,
    where the LR is lowest and the model sits in a minimum (Huang et al. 2017, snapshot ensembles)."""

    def __init__(self, dirpath: str | Path, epochs: list[int]):
        self.dirpath = Path(dirpath)
        self.epochs = sorted(int(e) for e in epochs)
        self.paths: list[str] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.epochs:
            path = self.dirpath / f"snapshot_{self.epochs.index(epoch)}.ckpt"
            trainer.save_checkpoint(path, weights_only=False)
            if str(path) not in self.paths:
                self.paths.append(str(path))
            rank_zero_info(f"Epoch {epoch}: end of an LR cycle, snapshot saved to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"paths": list(self.paths)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.paths = list(state_dict.get("paths", []))


class NonFiniteLossStop(Callback):
    """Stop at the first NaN/inf training loss with an error naming the step and the learning rates.

    Raised mid-epoch, before any checkpoint of that epoch is written, so checkpoints/last.ckpt stays
    the last good state (the end of the previous epoch) and ``resume`` can continue from it.

    On a GPU reading the loss waits for the device: checked after every step, the CPU could not queue the next step's
    work while the GPU computes this one, and every step's overhead (loader, hooks, logging) would leave the GPU idle.
    So there (``lagged``; default: when the loss is on CUDA) each step reads the previous step's flag, which the GPU
    has long computed, and before any checkpoint is written (``on_save_checkpoint``), at validation and at the end of
    an epoch or of training the latest flag is read too: no checkpoint holds weights of a non-finite step.
    """

    def __init__(self, checkpoint_dir: str | Path | None = None, lagged: bool | None = None):
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.lagged = lagged
        self._pending: tuple[torch.Tensor, torch.Tensor, int, int, int] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach()
        step = (torch.isfinite(loss).all(), loss, trainer.current_epoch, trainer.global_step, batch_idx)
        lagged = self.lagged if self.lagged is not None else loss.device.type == "cuda"
        previous, self._pending = (self._pending, step) if lagged else (step, None)
        if previous is not None:
            self._check(trainer, *previous)

    def _flush(self, trainer: L.Trainer) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._check(trainer, *pending)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._flush(trainer)  # raised here, the checkpoint is not written

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _check(self, trainer: L.Trainer, finite: torch.Tensor, loss: torch.Tensor, epoch: int, global_step: int,
               batch_idx: int) -> None:
        if bool(finite):
            return
        from finetune.errors import FinetuneError

        # read now, not stored every step (lagged: a per-step schedule may have moved them by one step since)
        lrs = dict(sorted(_group_lrs(trainer).items(), key=lambda kv: kv[0] != "head"))  # the head's LR first
        shown = ", ".join(f"{k} {v:.3g}" for k, v in list(lrs.items())[:6]) + (" ..." if len(lrs) > 6 else "")
        last = self.checkpoint_dir / "last.ckpt" if self.checkpoint_dir else None
        kept = (f"The last good checkpoint is {last} (end of epoch {epoch}); continue from it with "
                f"resume=... after the fix." if last is not None and last.is_file()
                else "No checkpoint was written before it.")
        raise FinetuneError(
            f"The training loss became {float(loss):.4g} at epoch {epoch + 1}, step "
            f"{global_step} (batch {batch_idx}); learning rates: {shown}. {kept} Lower optimizer.lr, add "
            f"gradient clipping (trainer.gradient_clip_val=1.0), or use trainer.precision=32-true."
        )


class RNGStateCheckpoint(Callback):
    """Keep the random number generators' states in every checkpoint and restore them on resume, so
    a resumed run draws the same shuffles, augmentations and dropout masks as an uninterrupted one.

    Lightning restores model, optimizer, schedulers and loop progress, but not the global RNGs; the
    DataLoader's shuffle order for the next epoch is drawn from torch's global generator.
    """

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        _, keys, pos, has_gauss, gauss = np.random.get_state()
        # Plain tensors and numbers only: checkpoints are loaded weights-only.
        state = {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                           int(has_gauss), float(gauss)], "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Applied at once: Lightning restores callbacks before it draws the first shuffle order."""
        import random

        import numpy as np

        torch.set_rng_state(state_dict["torch"])
        keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])

    @staticmethod
    def _train_transform(trainer: L.Trainer) -> Any:
        datasets = getattr(getattr(trainer, "datamodule", None), "datasets", None) or {}
        train = datasets.get("train")
        return getattr(train, "transform", None)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The augmentation pipeline's generators too (in-process loading; loader workers keep their own)."""
        from finetune.data.transforms import augmentation_rng_state

        transform = self._train_transform(trainer)
        if transform is not None:
            checkpoint["finetune_augmentation_rng"] = augmentation_rng_state(transform)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        from finetune.data.transforms import set_augmentation_rng_state

        transform = self._train_transform(trainer)
        if transform is not None and checkpoint.get("finetune_augmentation_rng"):
            set_augmentation_rng_state(transform, checkpoint["finetune_augmentation_rng"])


class ValidateAtLastStep(Callback):
    """A run that ends at ``trainer.max_steps`` inside an epoch is validated there. Lightning validates at
    epoch ends (or every ``val_check_interval``) and stops at max_steps without a check, so a step budget
    shorter than an epoch would end with no val/* at all: early stopping and best.ckpt fail on the missing
    key and the scored weights go unmeasured. Asking the trainer to stop at that step makes Lightning run
    its validation first (it validates when ``should_stop`` is set)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and trainer.limit_val_batches != 0:
            trainer.should_stop = True

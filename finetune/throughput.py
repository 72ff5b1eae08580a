"""How fast the run trained, and whether the model or the input pipeline set the pace.

Lightning's ``ThroughputMonitor`` logs samples/s but not where the time went; a user whose GPU waits on the
loader needs to see that the loader is the limit. :class:`TrainThroughput` times every training step from the
end of the previous one: the gap before ``on_train_batch_start`` is time spent waiting for the next batch
(the loader, plus Lightning's own bookkeeping), the rest is the step itself. Validation is left out, and so
are the first ``skip_steps`` steps (loader workers starting, first-call allocations, cuDNN autotuning).
The peak resident memory of this process and of its loader workers goes beside it: streaming data must keep
it bounded whatever the data size.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

# Waiting for data more than this share of the time: the loader limits the run (more workers would help).
LOADER_LIMITS_ABOVE = 0.2


def peak_rss_gb() -> dict[str, float]:
    """Peak resident memory (GB) of this process and of the largest child process that has ended (loader
    workers, decode pools)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 1e9
    return {"process": round(own, 3), "largest_child": round(children, 3)}


class TrainThroughput(L.Callback):
    """Training images/s and the share of training time spent waiting for batches, over the whole fit."""

    def __init__(self, skip_steps: int = 5):
        self.skip_steps = skip_steps
        self.steps = self.images = 0
        self.seen = 0  # every step, the skipped ones included
        self.wait = self.total = 0.0
        self._last_end: float | None = None
        self._started: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = time.perf_counter()  # the first batch's fetch (workers starting) counts as waiting

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # validation is not training time

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        self._started = now
        if self._last_end is not None and self.seen >= self.skip_steps:
            self.wait += now - self._last_end
            self.total += now - self._last_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # No device synchronisation: it would stall the GPU's queue every step. Over many steps the CPU cannot run
        # ahead by more than the queue, so the totals (and the time spent waiting for batches) hold.
        now = time.perf_counter()
        if self._started is not None and self.seen >= self.skip_steps:
            self.total += now - self._started
            self.steps += 1
            self.images += _batch_size(batch) * trainer.world_size
        self.seen += 1
        self._last_end = now

    def summary(self) -> dict[str, Any] | None:
        """For metrics.json; None when too few steps were timed to say anything."""
        if self.steps == 0 or self.total <= 0:
            return None
        share = self.wait / self.total
        return {
            "train_images_per_s": round(self.images / self.total, 1),
            "loader_wait_share": round(share, 3),
            "limited_by": "loader" if share > LOADER_LIMITS_ABOVE else "model",
            "timed_steps": self.steps,
            "peak_rss_gb": peak_rss_gb(),
        }


def describe(summary: dict[str, Any] | None) -> str:
    """One log line: the speed and what limits it, with what to do when it is the loader."""
    if summary is None:
        return "Throughput: too few training steps to time."
    line = (f"Throughput: {summary['train_images_per_s']:g} training images/s; waiting for data "
            f"{100 * summary['loader_wait_share']:.0f}% of the time")
    if summary["limited_by"] == "loader":
        return (f"{line}: the input pipeline is the limit (raise data.num_workers, keep data.preload=auto so "
                f"decoded images stay in memory, or lower the augmentation's cost).")
    return f"{line}: the model is the limit, not the input pipeline."


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else 1

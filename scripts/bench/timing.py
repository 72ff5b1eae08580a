"""A Lightning callback that records the seconds of each training epoch (batches only: from the
epoch's start to its validation, or to its end when there is none), for the overhead benchmark.
Hydra instantiates it from ``+callbacks.epoch_timer._target_=timing.EpochTimer``; the times go to a
module-level list because train() does not hand its callbacks back."""

from __future__ import annotations

import time

import lightning as L

EPOCH_SECONDS: list[float] = []


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self._start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def _stop(self) -> None:
        if self._start is not None:
            EPOCH_SECONDS.append(time.perf_counter() - self._start)
            self._start = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._stop()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()

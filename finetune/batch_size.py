"""``data.batch_size=auto``: the batch the training device can hold, from a probe of its peak memory.

On a CUDA device a fine-tune at batch 32 leaves a large GPU idle (BENCHMARKS.md, H200 sections). The probe runs two
training steps (forward and backward, at the run's input size, precision and memory layout, every layer trainable,
so a later unfreeze still fits) at two batch sizes; peak memory grows linearly with the batch, so the two peaks give
the fixed part and the part per image. The batch is the largest power of two that keeps the peak, plus the
optimizer's state, within ``MEMORY_SHARE`` of the device's memory, between 32 and ``MAX_BATCH``, with at least
``MIN_STEPS_PER_EPOCH`` steps per epoch and, when the run's images are fixed (recipe=auto's budget, or
``trainer.max_epochs``), at least ``MIN_RUN_STEPS`` optimizer steps in the run: a larger batch then means fewer
steps, and too few underfit. On a CPU it is 32: a larger batch does not raise the images per second there (the
cores are busy at 32; 512 ran 2-3x slower) and only means fewer steps.

The LR follows the batch: ``lr_reference_batch`` is set to 32, the batch every default LR was tuned at (so
``optimizer.lr`` keeps meaning "the LR for 32 images"), and ``lr_scaling`` to ``LR_SCALING`` unless given.

Why not Lightning's BatchSizeFinder: its trial fits run every callback of the run (checkpoints, the plateau log,
throughput), and it grows the batch until an out-of-memory error, which on a CPU never comes (it stops at
``max_trials``). A probe of two steps says the same in a second and is the same on every rank of a DDP run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError

if TYPE_CHECKING:  # torch is imported where a probe runs: the recipe reads REFERENCE_BATCH without it
    import torch

log = logging.getLogger(__name__)

REFERENCE_BATCH = 32  # the batch every default (LRs, schedules, the benchmark tables) was tuned at
MEMORY_SHARE = 0.8  # of the device's total memory: room for the allocator's fragmentation and cuDNN workspaces
MAX_BATCH = 1024
MIN_STEPS_PER_EPOCH = 16
# Optimizer steps the whole run keeps when its images are fixed (recipe=auto's budget, or trainer.max_epochs).
# Zero-config on Fashion-MNIST 1,000/class (937 steps at batch 32), sqrt LR: -0.005 at 468 steps, -0.008 at 234
# (3 seeds each), -0.017 at 117, -0.06 at 58; glyphs and Fashion-MNIST 200/class lost nothing at 83-156 steps
# (BENCHMARKS.md, "data.batch_size=auto"). 500 keeps the cost on the most step-hungry set near 0.005.
MIN_RUN_STEPS = 500
# How the LR follows auto's batch unless lr_scaling is given (the evidence: LR_SCALING_WHY, logged and written to
# recipe.json; the unscaled-LR margins at 64-256 were +0.0015 to +0.010)
LR_SCALING = "sqrt"
LR_SCALING_WHY = ("the LR grows with the square root of the batch over 32 (the rule for Adam-type optimizers): "
                  "linearly (x16 at batch 512) it diverged to chance; sqrt never diverged and beat an unscaled LR at "
                  "batch 64-256 (BENCHMARKS.md)")
PROBE_BATCHES = ((32, 64), (4, 8), (1, 2))  # the next pair when the first does not fit
SHARED_ENV = "FINETUNE_AUTO_BATCH"  # rank 0's choice, inherited by the processes Lightning launches


@dataclass(frozen=True)
class MemoryProbe:
    """Peak training memory (bytes) at two batch sizes, the device's total memory and the parameters' bytes."""

    small: int
    small_peak: int
    large: int
    large_peak: int
    total: int
    parameter_bytes: int

    @property
    def per_image(self) -> float:
        return max(1.0, (self.large_peak - self.small_peak) / (self.large - self.small))

    @property
    def fixed(self) -> float:
        """What does not grow with the batch, plus the optimizer's state (two values per parameter: Adam's
        moments, the most any configured optimizer keeps)."""
        return self.small_peak - self.small * self.per_image + 2 * self.parameter_bytes


def _power_of_two_at_most(n: float) -> int:
    return 1 << max(0, int(n).bit_length() - 1) if n >= 1 else 0


def batch_from_probe(probe: MemoryProbe, n_train: int, seen: int | None = None) -> tuple[int, str]:
    """(batch size, why) from the memory model ``fixed + batch x per_image``; ``seen``: the images the run will see
    (None when its steps are fixed), which keeps at least ``MIN_RUN_STEPS`` optimizer steps."""
    budget = MEMORY_SHARE * probe.total
    fits = (budget - probe.fixed) / probe.per_image
    by_memory = _power_of_two_at_most(fits)
    if by_memory < 1:
        raise FinetuneError(
            f"data.batch_size=auto: training needs {probe.fixed / 2**30:.1f} GiB before the first image, more than "
            f"{MEMORY_SHARE:.0%} of the device's {probe.total / 2**30:.1f} GiB. Use a smaller model.backbone or "
            f"data.image_size, or trainer.precision=bf16-mixed.")
    by_data = min(_power_of_two_at_most(n_train / MIN_STEPS_PER_EPOCH),
                  _power_of_two_at_most(seen / MIN_RUN_STEPS) if seen else MAX_BATCH)
    batch = min(by_memory, MAX_BATCH, max(by_data, REFERENCE_BATCH))
    model = (f"peak memory {probe.small_peak / 2**30:.2f} GiB at batch {probe.small} and "
             f"{probe.large_peak / 2**30:.2f} GiB at {probe.large}: {probe.per_image / 2**20:.1f} MiB per image on "
             f"{probe.fixed / 2**30:.2f} GiB fixed (optimizer state included)")
    holds = f"{by_memory} fits in {MEMORY_SHARE:.0%} of {probe.total / 2**30:.0f} GiB"
    if batch == by_memory:
        bound = f"the largest power of two that fits: {holds}"
    elif batch == MAX_BATCH:
        bound = f"at most {MAX_BATCH} ({holds})"
    else:
        steps = (f"{n_train:,} training images" + (f", {seen:,} images seen in the run" if seen else "") +
                 f": at least {MIN_STEPS_PER_EPOCH} steps per epoch" + (f" and {MIN_RUN_STEPS} in the run" if seen
                                                                         else ""))
        bound = (f"{steps} ({holds})" if by_data >= REFERENCE_BATCH else
                 f"{REFERENCE_BATCH}, the batch the defaults were tuned at ({steps}; {holds})")
    return batch, f"{model}; {bound}"


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting (None: float32)."""
    import torch

    text = str(precision)
    return torch.bfloat16 if text.startswith("bf16") else torch.float16 if text.startswith("16") else None


def peak_training_memory(model: torch.nn.Module, num_classes: int, image_size: int, dtype: torch.dtype | None,
                         layout: torch.memory_format, batch: int, device: torch.device) -> int:
    """Peak bytes allocated during one forward and backward pass of ``model`` (on ``device``) at ``batch``; its
    gradients are freed before and after, so each call starts from the same state."""
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
    labels = torch.randint(num_classes, (batch,), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    finally:
        del images, labels
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def probe_device(backbone: str, num_classes: int, image_size: int, precision: str, channels_last: bool,
                 device: torch.device) -> MemoryProbe:
    """Two training steps at two batch sizes on ``device`` (a smaller pair when the first runs out of memory), on
    one model built for them."""
    import timm
    import torch

    dtype = precision_dtype(precision)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = None
    try:
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes).to(device)
        model = model.to(memory_format=layout).train()
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for small, large in PROBE_BATCHES:
            try:
                small_peak, large_peak = (peak_training_memory(model, num_classes, image_size, dtype, layout, batch,
                                                               device) for batch in (small, large))
            except torch.cuda.OutOfMemoryError:
                continue
            total = torch.cuda.get_device_properties(device).total_memory
            return MemoryProbe(small, small_peak, large, large_peak, total, parameter_bytes)
    except torch.cuda.OutOfMemoryError:
        pass  # the model alone does not fit: the error below
    finally:
        del model
        torch.cuda.empty_cache()
    raise FinetuneError(f"data.batch_size=auto: {backbone} at {image_size} px does not train at batch "
                        f"{PROBE_BATCHES[-1][1]} in {device}'s memory. Use a smaller model.backbone or "
                        f"data.image_size.")


def this_process_device() -> torch.device:
    """The CUDA device this process trains on: its local rank's (torchrun, SLURM and Lightning set LOCAL_RANK)."""
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0))


def auto_batch_size(backbone: str, num_classes: int, image_size: int, precision: str, channels_last: bool,
                    device_kind: str, n_train: int, seen: int | None, run_id: str | None) -> tuple[int, str]:
    """(batch size, why) for ``data.batch_size=auto``. A DDP process that Lightning launched takes rank 0's
    choice from its environment; under torchrun or SLURM each process probes its own GPU (the same model of GPU
    gives the same answer, and ``distributed.SameBatchSizeOnEveryRank`` stops the run with one clear error if the
    ranks differ). Rank 0 always probes: each job of a sweep in one process gets its own answer."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    shared = os.environ.get(SHARED_ENV, "")
    if rank_zero_only.rank != 0 and run_id and shared.startswith(f"{run_id}:"):
        batch, why = shared[len(run_id) + 1:].split(":", 1)
        return int(batch), why
    if device_kind != "gpu":
        batch, why = REFERENCE_BATCH, (f"on a CPU a larger batch does not raise the images per second (the cores "
                                       f"are busy at {REFERENCE_BATCH}: zero-config on 10,000 images trained in 53 s "
                                       f"at 32, 47-56 s at 64-128, 105-163 s at 512) and only means fewer steps: "
                                       f"{REFERENCE_BATCH}, the batch the defaults were tuned at")
    else:
        import torch

        device = this_process_device()
        probe = probe_device(backbone, num_classes, image_size, precision, channels_last, device)
        batch, why = batch_from_probe(probe, n_train, seen)
        why = f"{torch.cuda.get_device_name(device)}: {why}"
    if run_id and rank_zero_only.rank == 0:
        os.environ[SHARED_ENV] = f"{run_id}:{batch}:{why}"
    return batch, why

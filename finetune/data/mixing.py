"""Batch-level MixUp and CutMix (``augment.mixup_alpha`` / ``cutmix_alpha``), from torchvision.

They mix whole batches (pairs of images and their labels), so they run on the batch in the
LightningModule, after the per-image albumentations pipeline; the loss then takes soft targets.
torchvision's ``transforms.v2.MixUp`` / ``CutMix`` are the reference implementations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from finetune.conf import preset
from finetune.errors import FinetuneError


class BatchMixer:
    """(images, int labels) -> (mixed images, soft labels summing to 1); a fraction ``p`` of batches is mixed.
    ``multilabel``: (images, 0/1 target rows) -> (mixed images, the rows mixed by the same weight)."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, p: float = 1.0,
                 multilabel: bool = False):
        self.num_classes = num_classes
        self.p = p
        self.multilabel = multilabel
        # Multi-label targets are 0/1 rows that torchvision does not take: it mixes a probe of two alternating
        # classes instead, which gives away the batch's mixing weight (see _mix_rows).
        classes = 2 if multilabel else num_classes
        ops = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=classes))
        self.mix = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
        self.description = " or ".join(
            f"{type(op).__name__}(alpha={op.alpha})" for op in ops) + (f" on {p:.0%} of batches" if p < 1 else "")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.p < 1 and float(torch.rand(())) >= self.p:
            return images, (labels.to(images.dtype) if self.multilabel
                            else F.one_hot(labels, self.num_classes).to(images.dtype))
        if self.multilabel:
            return self._mix_rows(images, labels)
        return self.mix(images, labels)

    def _mix_rows(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MixUp/CutMix for 0/1 target rows: torchvision mixes image i with image i-1 (a roll) by one weight per
        batch; with probe labels 0, 1, 0, 1, ... image 1's soft label for its own class is that weight."""
        if len(images) < 2:
            return images, targets.to(images.dtype)
        probe = torch.arange(len(images), device=images.device) % 2
        mixed, soft = self.mix(images, probe)
        lam = soft[1, 1]
        return mixed, lam * targets.to(images.dtype) + (1 - lam) * targets.to(images.dtype).roll(1, 0)


def build_batch_mixer(augment: Mapping[str, Any] | None, num_classes: int,
                      multilabel: bool = False) -> BatchMixer | None:
    """The mixer ``augment`` asks for, or None; keys it lacks (None: no augmentation) are augment/none.yaml's."""
    augment = {**preset("augment", "none"), **(augment or {})}
    mixup, cutmix = float(augment["mixup_alpha"] or 0.0), float(augment["cutmix_alpha"] or 0.0)
    p = float(augment["mix_p"])
    for key, value in (("augment.mixup_alpha", mixup), ("augment.cutmix_alpha", cutmix)):
        if value < 0:
            raise FinetuneError(f"{key}={value} must be >= 0 (0 turns it off).")
    if not 0 <= p <= 1:
        raise FinetuneError(f"augment.mix_p={p} must be in [0, 1].")
    if mixup == 0 and cutmix == 0 or p == 0:
        return None
    return BatchMixer(num_classes, mixup, cutmix, p, multilabel)

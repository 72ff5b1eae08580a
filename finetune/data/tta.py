"""Test-time augmentation: the views' names (checked with the config, no torch needed) and the views.

Its own module so that the config checks (``config.py``) and scoring (``inference.py``) share it
without importing each other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from finetune.errors import FinetuneError, close_matches

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TTA_VIEWS = ("hflip", "vflip", "five_crop")


def check_tta(tta: Any, key: str = "tta") -> list[str]:
    """The views as a list; ``tta=hflip`` (one name, no brackets) is read as ``tta=[hflip]``."""
    views = [str(tta)] if isinstance(tta, str) and tta else [str(v) for v in (tta or [])]
    for view in views:
        if view not in TTA_VIEWS:
            raise FinetuneError(f"{key}: '{view}' is not a test-time view; choose from {', '.join(TTA_VIEWS)}."
                                f"{close_matches(view, TTA_VIEWS)}")
    if len(set(views)) < len(views):  # each view is used once: tta=[hflip,hflip] is not a weight
        log.warning("%s lists a view twice (%s); each view is used once.", key, ",".join(views))
        views = list(dict.fromkeys(views))
    return views


def tta_batches(x: torch.Tensor, views: Sequence[str]) -> list[torch.Tensor]:
    """The batch itself and its test-time views (same size, already normalised)."""
    import torch.nn.functional as F

    out = [x]
    if "hflip" in views:
        out.append(x.flip(-1))
    if "vflip" in views:
        out.append(x.flip(-2))
    if "five_crop" in views:
        h, w = x.shape[-2:]
        ch, cw = max(1, round(h * 0.875)), max(1, round(w * 0.875))
        top, left = (h - ch) // 2, (w - cw) // 2
        for i, j in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (top, left)):
            out.append(F.interpolate(x[..., i:i + ch, j:j + cw], size=(h, w), mode="bilinear", align_corners=False))
    return out

""""None of these": a score of how much an image looks like the classes the model was trained on, and a threshold
fitted on the validation split so that a chosen share of known images (default 5%) falls below it.

Three score kinds (higher = more like a known class):
- ``knn`` (the default): cosine similarity of the image's pooled features to the nearest training image's
  (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"). It needs a bank of training
  features, stored in the checkpoint (at most ``BANK_MAX`` images, float16).
- ``msp``: the largest (calibrated) softmax probability (Hendrycks & Gimpel 2017).
- ``energy``: logsumexp of the (calibrated) logits (Liu et al. 2020).
Measured on five real sets with two classes held out (BENCHMARKS.md, scripts/bench/open_set.py), ``knn``
separated known from unknown images best on average (mean AUROC 0.85 against 0.80 for msp and 0.82 for energy);
the softmax scores were better on the letters (glyphs) only.

The record stored in the scored checkpoint (``finetune.open_set``) holds the kind, the sorted validation scores
(so finetune-predict ``unknown=P`` can reject any other share without data), the fitted threshold and, for
``knn``, the bank. Fitting it after training: ``scoring.fit_open_set``; scoring: ``known_scores``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.errors import FinetuneError

# Training images whose features the knn score compares with (a seeded sample when there are more): 5,000 x
# 1,280 features in float16 add 12.8 MB to the checkpoint; Sun et al. found a 1% sample of ImageNet enough.
BANK_MAX = 5000
RECORD_KEY = "open_set"
# The label predict gives an image below the threshold.
UNKNOWN_LABEL = "unknown"


def logits_and_features(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled pre-classifier features) in one pass: what ``net(images)`` computes, and the features
    the knn score needs (timm's forward_features / forward_head(pre_logits=True) / get_classifier)."""
    features = net.forward_head(net.forward_features(images), pre_logits=True)
    return net.get_classifier()(features), features


def known_scores(kind: str, logits: torch.Tensor, features: torch.Tensor, temperature: float = 1.0,
                 bank: torch.Tensor | None = None) -> torch.Tensor:
    """One score per image (higher: more like the training classes). ``logits``: the network's raw logits,
    divided here by the calibration ``temperature``; ``bank``: the stored training features (knn)."""
    if kind == "msp":
        return (logits.float() / temperature).softmax(-1).max(-1).values
    if kind == "energy":
        return torch.logsumexp(logits.float() / temperature, dim=-1)
    if kind == "knn":
        if bank is None:
            raise ValueError("the knn score needs the bank of training features")
        normed = nn.functional.normalize(features.float(), dim=-1)
        return (normed @ bank.to(normed.device, torch.float32).T).max(-1).values
    raise ValueError(f"unknown open-set score kind {kind!r}")


def threshold_for(record: dict[str, Any], reject: float) -> float:
    """The score below which ``reject`` (a share in (0, 1)) of the validation images fell."""
    return float(np.quantile(np.asarray(record["val_scores"], dtype=np.float64), reject))


# Shares of known validation images a deployer may choose to reject instead of the fitted one.
EXPORTED_SHARES = (0.01, 0.02, 0.05, 0.1, 0.2)


def unknown_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """What a deployed model needs to say "unknown": the score kind, the fitted threshold and share, and the
    thresholds for other shares."""
    return {"score": record["score"], "threshold": record["threshold"], "reject": record["reject"],
            "thresholds": {str(p): round(threshold_for(record, p), 6) for p in EXPORTED_SHARES},
            "rule": "label an image 'unknown' when its known_score is below the threshold"}


def parse_unknown(value: Any, key: str = "unknown") -> float | None:
    """``unknown`` as given to predict: off/false/None -> None, auto -> -1 (the stored share), a share P in (0, 1)."""
    text = str(value).strip().lower()
    if value is None or value is False or text in ("off", "false", "none", "no"):
        return None
    if text == "auto" or value is True:
        return -1.0
    try:
        share = float(text)
    except ValueError:
        share = math.nan
    if not 0 < share < 1:
        raise FinetuneError(f"{key}={value} must be off, auto (reject the share of known validation images fitted "
                            f"after training, 5% by default) or a share in (0, 1), e.g. {key}=0.1 to label as "
                            f"'unknown' the images that score below 10% of the known validation images.")
    return share


def checked_record(record: dict[str, Any] | None, path: str, key: str = "unknown") -> dict[str, Any]:
    """The checkpoint's open-set record, or the error that says why there is none and how to get one."""
    if record is None:
        raise FinetuneError(
            f"{key}= needs a threshold fitted after training, and {path} has none: it was trained without a "
            f"validation split (the zero-config recipe trains on every image of a small set), with open_set.fit=false, "
            f"or by an older finetune. Train again with a validation split (data.val_fraction=0.2, or a val/ "
            f"folder) and open_set.fit=auto, or predict without {key}=.")
    return record


def rejection(record: dict[str, Any], share: float) -> tuple[float, float]:
    """(threshold, share) for ``unknown``'s parsed value (-1: the share the run fitted)."""
    if share < 0:
        return float(record["threshold"]), float(record["reject"])
    return threshold_for(record, share), share


def unknown_setup(value: Any, members: list, tta: list[str], key: str = "unknown") -> tuple[float, float] | None:
    """(threshold, share rejected) for predict's ``unknown`` with these members and TTA views, or None (off).
    The threshold was fitted on one network's plain view of each validation image, so it is refused with an
    ensemble or TTA rather than applied to scores it was not fitted on."""
    share = parse_unknown(value, key)
    if share is None:
        return None
    if members[0].multilabel:
        raise FinetuneError(f"{key}={value} works with one class per image, and {members[0].path} is multi-label "
                            f"(task=multilabel): an image of none of its classes already gets no label (every "
                            f"probability below its class's threshold). Predict without {key}=.")
    if len(members) > 1:
        raise FinetuneError(f"{key}={value} works with one checkpoint, and ckpt= names an ensemble of {len(members)}: "
                            f"the threshold is fitted for one network's scores. Pass the checkpoint a run scored "
                            f"(RUN/checkpoints/best.ckpt or last.ckpt: metrics.json 'open_set' names it), or predict "
                            f"without {key}=.")
    if tta:
        raise FinetuneError(f"{key}={value} cannot be combined with tta={list(tta)}: the threshold was fitted on the "
                            f"plain view of each validation image. Drop tta= (or {key}=).")
    return rejection(checked_record(members[0].open_set, members[0].path, key), share)

"""task=multilabel after training: a probability threshold per class tuned on validation, the scores of a
multi-label model (mean average precision, micro / macro F1, per-class AP), and its labels for predict.

A sigmoid per class gives each class its own probability; 0.5 is a poor cut for rare classes (their
probabilities stay low), so each class's threshold is the one that maximises its F1 on the validation images
(the usual practice, e.g. in the ASL and ML-Decoder papers), kept between 0.05 and 0.95 so that one odd
validation split cannot make a class always or never predicted. Fitted and stored in the scored checkpoint
(``finetune.thresholds``) by ``scoring.fit_thresholds``; predict, load() and the exports use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

THRESHOLD_RANGE = (0.05, 0.95)
CANDIDATES = torch.linspace(*THRESHOLD_RANGE, 91)  # steps of 0.01


def multi_hot(label: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """One sample's class indices as the 0/1 float target of a sigmoid per class."""
    target = torch.zeros(num_classes)
    target[list(label)] = 1.0
    return target


def multi_hot_rows(labels: Sequence[tuple[int, ...]], num_classes: int) -> torch.Tensor:
    """Samples' tuples of class indices as an [images, classes] 0/1 tensor."""
    if not labels:
        return torch.zeros(0, num_classes)
    return torch.stack([multi_hot(label, num_classes) for label in labels])


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per class, the candidate threshold with the best F1 on (probs, targets); 0.5 for a class with no positive
    validation image (nothing to tune on)."""
    thresholds = []
    for c in range(probs.shape[1]):
        positives = targets[:, c] > 0.5
        if not positives.any():
            thresholds.append(0.5)
            continue
        predicted = probs[:, c][None, :] >= CANDIDATES[:, None]  # [candidates, images]
        tp = (predicted & positives).sum(1).float()
        f1 = 2 * tp / (predicted.sum(1) + positives.sum()).clamp_min(1)
        thresholds.append(round(float(CANDIDATES[int(f1.argmax())]), 2))  # the lowest of equal bests
    return thresholds


def multilabel_scores(probs: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float] | None = None,
                      classes: Sequence[str] | None = None) -> dict[str, Any]:
    """mAP (classes with a positive image), micro / macro F1 and exact-match accuracy at ``thresholds`` (0.5 each
    when None), the binary cross-entropy, and per-class AP when ``classes`` are given."""
    from torchmetrics.functional.classification import (
        multilabel_average_precision,
        multilabel_exact_match,
        multilabel_f1_score,
    )

    n = probs.shape[1]
    cut = torch.tensor(thresholds if thresholds is not None else [0.5] * n, dtype=probs.dtype)
    predicted = (probs >= cut).long()
    y = targets.long()
    per_class_ap = multilabel_average_precision(probs, y, num_labels=n, average="none")
    present = y.sum(0) > 0
    scores = {
        "map": float(per_class_ap[present].mean()) if present.any() else 0.0,
        "micro_f1": float(multilabel_f1_score(predicted, y, num_labels=n, average="micro", threshold=0.5)),
        "macro_f1": float(multilabel_f1_score(predicted, y, num_labels=n, average="macro", threshold=0.5)),
        "acc": float(multilabel_exact_match(predicted, y, num_labels=n, threshold=0.5)),
        "loss": float(torch.nn.functional.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), targets.float())),
    }
    if classes is not None:
        scores["per_class_ap"] = {c: (round(float(ap), 4) if present[i] else None)
                                  for i, (c, ap) in enumerate(zip(classes, per_class_ap))}
    return scores


def labels_above(probs: Sequence[float], classes: Sequence[str],
                 thresholds: Sequence[float] | None) -> list[tuple[str, float]]:
    """(class, probability) of every class at or above its threshold, most probable first."""
    cuts = thresholds if thresholds is not None else [0.5] * len(classes)
    above = [(c, float(p)) for c, p, t in zip(classes, probs, cuts) if p >= t]
    return sorted(above, key=lambda item: -item[1])

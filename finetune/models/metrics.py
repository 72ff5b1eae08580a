"""What a classifier logs while it trains, validates and tests, for one class per image or several."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
)


def accuracy_metric(num_classes: int, multilabel: bool):
    """``acc``: the share of images whose class is right; multilabel: whose every label is right (exact match at
    0.5, the strictest reading)."""
    if multilabel:
        return MultilabelExactMatch(num_labels=num_classes)
    return MulticlassAccuracy(num_classes=num_classes, average="micro")


def extra_metrics(num_classes: int, multilabel: bool) -> MetricCollection:
    """Honest under class imbalance: balanced accuracy (the mean of per-class recalls) and macro F1; multilabel:
    mean average precision over classes (threshold-free) and micro / macro F1 at 0.5."""
    if multilabel:
        return MetricCollection({"map": MultilabelAveragePrecision(num_labels=num_classes, average="macro"),
                                 "micro_f1": MultilabelF1Score(num_labels=num_classes, average="micro"),
                                 "macro_f1": MultilabelF1Score(num_labels=num_classes, average="macro")})
    return MetricCollection({"balanced_acc": MulticlassAccuracy(num_classes=num_classes, average="macro"),
                             "macro_f1": MulticlassF1Score(num_classes=num_classes, average="macro")})

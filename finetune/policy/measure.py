"""Measure a dataset against a pretrained backbone: how much data, and how close to its domain.

One gradient-free forward pass over a seeded, per-class subsample of the training split gives,
for every stage, globally pooled features; from them:
- per-stage linear-probe accuracy under stratified k-fold cross-validation (the signal that ranked
  stages the way fine-tuning did in our measurements, docs/architecture.md);
- the same for the final pre-logits features (what a linear probe on top would see);
- the pretrained head's own confidence (mean max-probability and normalised entropy over its
  pretraining classes), reported as evidence where the weights came with a head.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.data.datamodule import ImageListDataset, decode_all, decode_side
from finetune.data.datasets import DatasetIndex, Sample, label_list, stratum
from finetune.data.transforms import Preprocessing, eval_transform
from finetune.multilabel import multi_hot_rows

log = logging.getLogger(__name__)


@dataclass
class Measurements:
    images_train: int
    num_classes: int
    images_per_class: dict[str, float]  # min / median / max over classes (training split)
    probe_images: int
    probe_folds: int
    stage_probe_acc: list[float]  # one per stage, shallow to deep
    stage_channels: list[int]
    prelogits_probe_acc: float
    best_stage: int | None  # None: the pre-logits features are the best
    best_acc: float
    depth_gap: float  # best accuracy minus pre-logits accuracy (>= 0)
    head_confidence: dict[str, float] | None = None
    # A probe trained on the images, scored on held-out images flipped left-right (best features; None when
    # not measured): close to best_acc when a flip keeps the class (recipe=auto's flip rule).
    flip_probe_acc: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def subsample(samples: list[Sample], max_per_class: int, max_images: int, seed: int) -> list[Sample]:
    """At most ``max_per_class`` per class and ``max_images`` overall, seeded, stratified (several labels: by the
    image's rarest class)."""
    by_class: dict[int, list[Sample]] = {}
    frequency = Counter(c for _, label in samples for c in label_list(label))
    for s in sorted(samples):
        by_class.setdefault(stratum(s[1], frequency), []).append(s)
    per_class = max(1, min(max_per_class, max_images // max(1, len(by_class))))
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        items = by_class[label]
        out.extend(rng.sample(items, per_class) if len(items) > per_class else items)
    return out


@torch.inference_mode()
def extract_features(
    model: nn.Module, samples: list[Sample], pp: Preprocessing, batch_size: int = 64, flip: bool = False,
    images: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """Pooled per-stage features, pre-logits features, and the pretrained head's logits (if any); with
    ``flip``, those of the images flipped left-right (and no logits). ``images``: the samples already
    decoded (``decode_all``), so a second pass over the same images does not decode them again.

    The model is put back in the mode it came in: the same network trains next, and Lightning keeps
    the mode it finds (a model left in eval mode would fine-tune with every BatchNorm frozen)."""
    was_training = model.training
    model.eval()
    try:
        return _extract(model, samples, pp, batch_size, flip, images)
    finally:
        model.train(was_training)


def _extract(model: nn.Module, samples: list[Sample], pp: Preprocessing, batch_size: int, flip: bool = False,
             images: list[np.ndarray] | None = None):
    if images is None:
        images = decode_all([p for p, _ in samples], decode_side(pp), float("inf"))
    loader = DataLoader(ImageListDataset([(p, -1) for p, _ in samples], eval_transform(pp), images),
                        batch_size=batch_size)
    stages: list[list[np.ndarray]] = []
    prelogits, logits = [], []
    for x, _ in loader:
        if flip:
            x = x.flip(-1)
        final, intermediates = model.forward_intermediates(x)
        if not stages:
            stages = [[] for _ in intermediates]
        for bucket, feat in zip(stages, intermediates):
            bucket.append(feat.float().mean(dim=(2, 3)).numpy())
        pre = model.forward_head(final, pre_logits=True)
        prelogits.append(pre.float().numpy())
        classifier = model.get_classifier()
        if not flip and isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
            logits.append(classifier(pre).float().numpy())
    return (
        [np.concatenate(b) for b in stages],
        np.concatenate(prelogits),
        np.concatenate(logits) if logits else None,
    )


def one_blas_thread():
    """The probes' BLAS on one thread. Their matrices are small (at most 2,000 images x 1,280 features, 10-odd
    classes), and on 2 cores OpenBLAS's threads made them 10-17x slower than one thread (6.9 s against 0.5 s
    for the six probes of Fashion-MNIST 50/class; the same accuracies: BENCHMARKS.md)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> float:
    """Mean k-fold accuracy of a standardised multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=300))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, features, labels, cv=cv)))


def probe_map(features: np.ndarray, targets: np.ndarray, folds: int, seed: int) -> float:
    """task=multilabel: the mean average precision (over classes) of one-vs-rest standardised logistic
    regressions, out of fold: the multi-label counterpart of ``probe_accuracy``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=0.5, max_iter=300)))
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(clf, features, targets, cv=cv, method="decision_function")
    present = targets.sum(0) > 0
    return float(average_precision_score(targets[:, present], scores[:, present], average="macro"))


def flip_probe_accuracy(features: np.ndarray, flipped: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> float:
    """Mean k-fold accuracy of the same probe as ``probe_accuracy``, trained on each fold's training images
    and scored on its held-out images flipped left-right (same folds)."""
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=300))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = [clone(clf).fit(features[tr], labels[tr]).score(flipped[te], labels[te])
              for tr, te in cv.split(features, labels)]
    return float(np.mean(scores))


def head_confidence(logits: np.ndarray) -> dict[str, float]:
    probs = torch.from_numpy(logits).softmax(dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1) / math.log(probs.shape[-1])
    return {
        "mean_max_prob": round(float(probs.max(dim=-1).values.mean()), 4),
        "mean_normalized_entropy": round(float(entropy.mean()), 4),
        "classes": int(probs.shape[-1]),
    }


def measure(
    model: nn.Module,
    index: DatasetIndex,
    pp: Preprocessing,
    pretrained_head: bool,
    max_per_class: int = 100,
    max_images: int = 2000,
    folds: int = 5,
    seed: int = 0,
    flip: bool = False,
) -> Measurements:
    """All measurements for ``index``'s training split against ``model`` (with its pretrained head)."""
    started = time.perf_counter()
    train = index.splits["train"]
    counts = Counter(c for _, label in train for c in label_list(label))
    per_class = [counts.get(i, 0) for i in range(len(index.classes))]
    picked = subsample(train, max_per_class, max_images, seed)
    if index.multilabel:  # 0/1 rows; each probe is scored by mean average precision (probe_map)
        labels = multi_hot_rows([label for _, label in picked], len(index.classes)).numpy().astype(int)
        min_count = int(labels.sum(0)[labels.sum(0) > 0].min())
        probe, flip = probe_map, False  # a flip probe needs one class per image
    else:
        labels = np.array([label for _, label in picked])
        min_count = min(Counter(labels.tolist()).values())
        probe = probe_accuracy
    k = max(2, min(folds, min_count))
    notes = ["task=multilabel: the probes are one-vs-rest and scored by mean average precision"] if index.multilabel \
        else []
    if min_count < 2:
        notes.append("a class has a single training image: probe accuracies are unreliable")
    images = decode_all([p for p, _ in picked], decode_side(pp), float("inf"))  # once, for both passes
    stage_feats, pre, logits = extract_features(model, picked, pp, images=images)
    with one_blas_thread():
        stage_acc = [round(probe(f, labels, k, seed), 4) for f in stage_feats] if min_count >= 2 else []
        pre_acc = round(probe(pre, labels, k, seed), 4) if min_count >= 2 else 0.0
    all_acc = stage_acc + [pre_acc]
    best = int(np.argmax(all_acc)) if stage_acc else len(all_acc) - 1
    best_stage = None if best == len(stage_acc) or all_acc[best] <= pre_acc else best
    flip_acc = None
    if flip and min_count >= 2:  # the best features of the same images flipped, through the same folds
        flipped_stages, flipped_pre, _ = extract_features(model, picked, pp, flip=True, images=images)
        kept, flipped = ((stage_feats[best_stage], flipped_stages[best_stage]) if best_stage is not None
                         else (pre, flipped_pre))
        with one_blas_thread():
            flip_acc = round(flip_probe_accuracy(kept, flipped, labels, k, seed), 4)
    return Measurements(
        images_train=len(train),
        num_classes=len(index.classes),
        images_per_class={"min": min(per_class), "median": statistics.median(per_class), "max": max(per_class)},
        probe_images=len(picked),
        probe_folds=k,
        stage_probe_acc=stage_acc,
        stage_channels=[int(f.shape[1]) for f in stage_feats],
        prelogits_probe_acc=pre_acc,
        best_stage=best_stage,
        best_acc=round(max(all_acc), 4),
        depth_gap=round(max(all_acc) - pre_acc, 4),
        head_confidence=head_confidence(logits) if (pretrained_head and logits is not None) else None,
        flip_probe_acc=flip_acc,
        seconds=round(time.perf_counter() - started, 2),
        notes=notes,
    )

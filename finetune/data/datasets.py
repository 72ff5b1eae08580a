"""Find the images a user has and split them: class folders, train/val/test folders, or a CSV.

The scan is the single source of truth for classes and splits; everything downstream (policy
measurement, datamodule, classes.json, checkpoints) reads the :class:`DatasetIndex` it returns.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.data.csv_index import csv_classes, scan_csv, split_labels
from finetune.data.folders import IMAGE_EXTENSIONS, entries, find_split_dir, list_images, scan_class_folders
from finetune.data.listing import check_listing, similar_class_names
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (absolute path, class index); task=multilabel: (path, tuple of class indices)


@dataclass
class DatasetIndex:
    """Classes (index order) and the samples of each split, plus what the scan skipped."""

    root: str
    layout: str  # class_folders | split_folders | csv
    classes: list[str]
    splits: dict[str, list[Sample]]
    ignored_files: list[str] = field(default_factory=list)
    # What the scan found in the listing itself (same path listed twice, with two labels, in two splits),
    # in the data report's shape ({kind, path, split, skipped, detail}); the data check adds them to its report.
    problems: list[dict] = field(default_factory=list)
    task: str = "multiclass"  # multiclass | multilabel (labels are tuples of class indices)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class for each split, by class name (multilabel: images showing the class)."""
        out = {}
        for split, samples in self.splits.items():
            per_class = Counter(c for _, label in samples for c in label_list(label))
            out[split] = {name: per_class.get(i, 0) for i, name in enumerate(self.classes)}
        return out

    def summary(self) -> str:
        parts = [f"{split}={len(s)}" for split, s in self.splits.items()]
        return (
            f"{len(self.classes)} classes{' (several per image)' if self.multilabel else ''}, {', '.join(parts)} "
            f"images (layout: {self.layout}, root: {self.root})"
        )


def stratum(label: int | tuple[int, ...], frequency: Counter) -> int:
    """The class a sample is stratified by: its class; with several, its rarest (-1: none), so that the rare
    classes of a multi-label set reach every split and every probe fold too."""
    if not isinstance(label, tuple):
        return label
    return min(label, key=lambda c: (frequency[c], c), default=-1)


def label_list(label: int | tuple[int, ...]) -> tuple[int, ...]:
    """A sample's class indices: (label,) for one class, the tuple itself for several (task=multilabel)."""
    return label if isinstance(label, tuple) else (label,)


def stratified_split(
    samples: list[Sample], fractions: dict[str, float], seed: int
) -> dict[str, list[Sample]]:
    """Split each class by ``fractions`` (e.g. {'val': 0.2, 'test': 0.1}); the rest is 'train'.

    Per-class rounding, seeded, and every class keeps at least one training image. Hand-written
    because scikit-learn's stratified split refuses classes with a single image, which small
    user datasets do have.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    frequency = Counter(c for _, label in samples for c in label_list(label))
    for s in samples:
        by_class.setdefault(stratum(s[1], frequency), []).append(s)
    out: dict[str, list[Sample]] = {"train": [], **{k: [] for k in fractions}}
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        start = 0
        for split, frac in fractions.items():
            n = min(round(len(items) * frac), len(items) - start - 1)
            if frac > 0 and n == 0 and len(items) - start >= 3:
                n = 1  # a tiny class still shows up in every requested split
            out[split].extend(items[start : start + max(n, 0)])
            start += max(n, 0)
        out["train"].extend(items[start:])
    _keep_every_class_in_train(out)
    return {k: v for k, v in out.items() if v or k == "train"}


def _keep_every_class_in_train(splits: dict[str, list[Sample]]) -> None:
    """Several labels per image: stratifying by the rarest class can carve every image of a class that always
    appears beside a rarer one out of train; one such image goes back to train per class."""
    in_train = {c for _, label in splits["train"] for c in label_list(label)}
    for split in [s for s in splits if s != "train"]:
        for sample in list(splits[split]):
            missing = set(label_list(sample[1])) - in_train
            if missing and isinstance(sample[1], tuple):
                splits[split].remove(sample)
                splits["train"].append(sample)
                in_train |= set(sample[1])


def _index_from_pairs(pairs_by_split: dict[str, list[tuple[str, str]]], classes: list[str],
                      task: str = "multiclass") -> dict[str, list[Sample]]:
    lookup = {name: i for i, name in enumerate(classes)}
    if task == "multilabel":
        return {split: [(p, tuple(sorted(lookup[n] for n in split_labels(c)))) for p, c in pairs]
                for split, pairs in pairs_by_split.items()}
    return {split: [(p, lookup[c]) for p, c in pairs] for split, pairs in pairs_by_split.items()}


Pairs = dict[str, list[tuple[str, str]]]  # (path, class name or joined names) per split


def _scan_layout(root: Path, key: str, task: str = "multiclass",
                 training: bool = True) -> tuple[str, Pairs, list[str], list[dict], list[str]]:
    """The layout, (path, class name) per split, the classes, the listing's problems and the non-image files."""
    ignored: list[str] = []
    if task == "multilabel" and not root.is_file():
        raise FinetuneError(
            f"task=multilabel needs several labels per image, and {key}={root} is a folder, where each image has "
            f"the one class of its folder. List the images in a CSV instead: columns path,labels (e.g. "
            f"photos/1.jpg,cat;dog) or path and one 0/1 column per class, optional split; then {key}=FILE.csv.")
    if root.is_file():  # a .csv: scan_dataset's check_data_root refused any other file
        layout = "csv"
        pairs, origins = scan_csv(root, key, task, training)
        pairs, problems = check_listing(pairs, origins)
        classes = csv_classes(root, key, pairs, task)
    elif (train_dir := find_split_dir(root, "train")) is not None and any(p.is_dir() for p in entries(train_dir)):
        layout = "split_folders"
        pairs = {"train": scan_class_folders(train_dir, key, None, ignored)}
        classes = sorted({c for _, c in pairs["train"]})
        for split in ("val", "test"):
            if (d := find_split_dir(root, split)) is not None:
                pairs[split] = scan_class_folders(d, key, classes, ignored)
    else:
        layout = "class_folders"
        pairs = {"train": scan_class_folders(root, key, None, ignored)}
        classes = sorted({c for _, c in pairs["train"]})
    if layout != "csv":
        pairs, problems = check_listing(pairs)
    problems += similar_class_names(classes)
    return layout, pairs, classes, problems, ignored


def scan_configured(cfg: DictConfig) -> DatasetIndex:
    """:func:`scan_dataset` with the run config's ``data.*`` root, split fractions and split seed: every
    command that trains or measures (train, ensemble, advise, preview) scans the same way."""
    data = cfg.data
    return scan_dataset(data.root, data.val_fraction, data.test_fraction, data.split_seed, task=str(cfg.task))


def scan_dataset(
    root: str | Path | None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    key: str = "data.root",
    min_classes: int = 2,
    task: str = "multiclass",
) -> DatasetIndex:
    """Scan ``root`` (any of the three layouts) and return classes and train/val(/test) samples.

    Missing val (and test, when ``test_fraction`` > 0) splits are carved out of the training
    images by a seeded stratified split; a split that exists on disk is used as it is.
    """
    from finetune.config_checks import check_data_root  # set, exists, a folder or a .csv: the same messages

    root = check_data_root(root, key)
    layout, pairs, classes, problems, ignored = _scan_layout(root, key, task, training=min_classes > 1)
    if len(classes) < min_classes:
        raise FinetuneError(
            f"{key}={root} has {len(classes)} class ({', '.join(classes)}); a classifier needs at least 2. "
            f"Put each class's images in its own sub-folder."
        )
    splits = _index_from_pairs(pairs, classes, task)
    to_carve = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in splits and f > 0}
    if to_carve:
        carved = stratified_split(splits["train"], to_carve, seed)
        splits = {**splits, **carved}
    _warn_not_images(ignored)
    order = [s for s in ("train", "val", "test") if s in splits]
    return DatasetIndex(str(root), layout, classes, {s: splits[s] for s in order}, ignored, problems, task)


def scan_inputs(path: str | Path, key: str = "input") -> list[str]:
    """Images to predict on: one file, or every image under a folder (recursive), as absolute paths by the names
    the user has (a symlink is not replaced by its target: predictions are joined back on those names, and a
    dangling link is reported as one). Files under a folder that are not images are listed in the log."""
    p = Path(str(path)).expanduser()
    if not p.exists() and any(c in str(p) for c in "*?["):  # input='photos/*.jpg', quoted so the shell left it
        import glob

        matches = sorted(glob.glob(str(p), recursive=True))
        images = [os.path.abspath(m) for m in matches
                  if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise FinetuneError(f"{key}={p} matches no image files ({len(matches)} match(es) in all; images are "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))}).")
        return images
    if not p.exists():
        raise FinetuneError(f"{key}={p} does not exist; pass an image file or a folder of images.")
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise FinetuneError(f"{key}={p} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        return [os.path.abspath(p)]
    images, other = list_images(p)
    if not images:
        raise FinetuneError(f"{key}={p} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    _warn_not_images([str(o) for o in other], f"{key}={p}")
    return [os.path.abspath(i) for i in images]


def _warn_not_images(files: list[str], where: str = "") -> None:
    """List the files a scan left out for not being images (the first five), so none is dropped unsaid."""
    if files:
        log.warning("%s %d file(s) that are not images (%s): %s%s", f"{where}: ignored" if where else "Ignored",
                    len(files), ", ".join(sorted(IMAGE_EXTENSIONS)), ", ".join(files[:5]),
                    " ..." if len(files) > 5 else "")

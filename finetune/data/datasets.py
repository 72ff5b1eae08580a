"""Find the images a user has and split them: class folders, train/val/test folders, or a CSV.

The scan is the single source of truth for classes and splits; everything downstream (policy
measurement, datamodule, classes.json, checkpoints) reads the :class:`DatasetIndex` it returns.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}

Sample = tuple[str, int]  # (absolute path, class index)


@dataclass
class DatasetIndex:
    """Classes (index order) and the samples of each split, plus what the scan skipped."""

    root: str
    layout: str  # class_folders | split_folders | csv
    classes: list[str]
    splits: dict[str, list[Sample]]
    ignored_files: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class for each split, by class name."""
        out = {}
        for split, samples in self.splits.items():
            per_class = Counter(label for _, label in samples)
            out[split] = {name: per_class.get(i, 0) for i, name in enumerate(self.classes)}
        return out

    def summary(self) -> str:
        parts = [f"{split}={len(s)}" for split, s in self.splits.items()]
        return (
            f"{len(self.classes)} classes, {', '.join(parts)} images "
            f"(layout: {self.layout}, root: {self.root})"
        )


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(path: Path) -> tuple[list[Path], list[Path]]:
    """Images under ``path`` (recursive, sorted) and the other files found there."""
    images, other = [], []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else other).append(p)
    return images, other


def _find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_ALIASES[split]:
        candidate = root / name
        if candidate.is_dir():
            return candidate
    return None


def _class_dirs(folder: Path, key: str) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        loose, _ = list_images(folder)
        hint = (
            f" It holds {len(loose)} images directly: put them into one sub-folder per class "
            f"({folder}/<class>/image.jpg)."
            if loose
            else ""
        )
        raise FinetuneError(
            f"{key}={folder} has no class sub-folders.{hint} Expected {folder}/<class>/*.jpg, "
            f"or {folder}/train/<class>/... (with optional val/ and test/), or a CSV of path,label."
        )
    return dirs


def _scan_class_folders(folder: Path, key: str, classes: list[str] | None, ignored: list[str]) -> list[tuple[str, str]]:
    """(path, class name) for every image in ``folder/<class>/``; empty classes are an error."""
    pairs = []
    for class_dir in _class_dirs(folder, key):
        if classes is not None and class_dir.name not in classes:
            raise FinetuneError(
                f"Class folder {class_dir} has no counterpart in the training split "
                f"(classes: {', '.join(classes)}). Rename it to a training class or remove it."
            )
        images, other = list_images(class_dir)
        ignored.extend(str(p) for p in other)
        if not images:
            raise FinetuneError(
                f"Class '{class_dir.name}' ({class_dir}) has no images "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}). "
                f"Add images to it or remove the folder."
            )
        pairs.extend((str(p.resolve()), class_dir.name) for p in images)
    return pairs


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
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
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
    return {k: v for k, v in out.items() if v or k == "train"}


def _index_from_pairs(pairs_by_split: dict[str, list[tuple[str, str]]], classes: list[str]) -> dict[str, list[Sample]]:
    lookup = {name: i for i, name in enumerate(classes)}
    return {split: [(p, lookup[c]) for p, c in pairs] for split, pairs in pairs_by_split.items()}


def _scan_csv(csv_path: Path, key: str) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = set(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FinetuneError(f"{key}={csv_path} could not be read as a CSV file: {e}.") from None
    if not {"path", "label"} <= header:
        raise FinetuneError(
            f"{key}={csv_path} needs a header row with columns 'path' and 'label' (and optionally "
            f"'split' = train|val|test); found columns: {sorted(header) or 'none (empty file)'}."
        )
    pairs: dict[str, list[tuple[str, str]]] = {}
    missing = []
    for line_no, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
            raise FinetuneError(f"{csv_path} line {line_no}: the row needs both a path and a label, got {row}.")
        path = Path(row["path"])
        if not path.is_absolute():
            path = csv_path.parent / path
        if not path.is_file():
            missing.append(f"line {line_no}: {path}")
            continue
        split = (row.get("split") or "train").strip().lower()
        canonical = next((k for k, names in SPLIT_ALIASES.items() if split in names), None)
        if canonical is None:
            raise FinetuneError(f"{csv_path} line {line_no}: split '{split}' is not one of train, val, test.")
        pairs.setdefault(canonical, []).append((str(path.resolve()), row["label"].strip()))
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FinetuneError(
            f"{key}={csv_path} lists {len(missing)} image(s) that do not exist ({shown}). Relative "
            f"paths are resolved against the CSV's folder; fix the paths or remove those rows."
        )
    if not pairs.get("train"):
        raise FinetuneError(f"{key}={csv_path} lists no training images (rows with split train or no split).")
    classes = sorted({c for _, c in pairs["train"]})
    for split, items in pairs.items():
        unknown = sorted({c for _, c in items} - set(classes))
        if unknown:
            raise FinetuneError(
                f"{csv_path}: labels {unknown} appear in split '{split}' but not in train; "
                f"every class needs training images."
            )
    return pairs, classes


def scan_dataset(
    root: str | Path | None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    key: str = "data.root",
    min_classes: int = 2,
) -> DatasetIndex:
    """Scan ``root`` (any of the three layouts) and return classes and train/val(/test) samples.

    Missing val (and test, when ``test_fraction`` > 0) splits are carved out of the training
    images by a seeded stratified split; a split that exists on disk is used as it is.
    """
    if root in (None, "", "???"):
        raise FinetuneError(
            f"{key} is not set. Pass the image folder, e.g. `finetune {key}=path/to/images` "
            f"(class sub-folders, train/val/test folders, or a CSV with path,label columns)."
        )
    root = Path(str(root)).expanduser()
    if not root.exists():
        raise FinetuneError(f"{key}={root} does not exist. Check the path (relative paths start from {Path.cwd()}).")
    ignored: list[str] = []
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise FinetuneError(f"{key}={root} is a file but not a .csv; pass a folder of images or a CSV of path,label.")
        layout = "csv"
        pairs, classes = _scan_csv(root, key)
    elif (train_dir := _find_split_dir(root, "train")) is not None and any(p.is_dir() for p in train_dir.iterdir()):
        layout = "split_folders"
        pairs = {"train": _scan_class_folders(train_dir, key, None, ignored)}
        classes = sorted({c for _, c in pairs["train"]})
        for split in ("val", "test"):
            if (d := _find_split_dir(root, split)) is not None:
                pairs[split] = _scan_class_folders(d, key, classes, ignored)
    else:
        layout = "class_folders"
        pairs = {"train": _scan_class_folders(root, key, None, ignored)}
        classes = sorted({c for _, c in pairs["train"]})
    if len(classes) < min_classes:
        raise FinetuneError(
            f"{key}={root} has {len(classes)} class ({', '.join(classes)}); a classifier needs at least 2. "
            f"Put each class's images in its own sub-folder."
        )
    splits = _index_from_pairs(pairs, classes)
    to_carve = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in splits and f > 0}
    if to_carve:
        carved = stratified_split(splits["train"], to_carve, seed)
        splits = {**splits, **carved}
    if ignored:
        log.warning(
            "Ignored %d file(s) that are not images (%s): %s%s", len(ignored), ", ".join(sorted(IMAGE_EXTENSIONS)),
            ", ".join(ignored[:5]), " ..." if len(ignored) > 5 else "",
        )
    order = [s for s in ("train", "val", "test") if s in splits]
    return DatasetIndex(str(root), layout, classes, {s: splits[s] for s in order}, ignored)


def scan_inputs(path: str | Path, key: str = "input") -> list[str]:
    """Images to predict on: one file, or every image under a folder (recursive)."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise FinetuneError(f"{key}={p} does not exist; pass an image file or a folder of images.")
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise FinetuneError(f"{key}={p} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        return [str(p.resolve())]
    images, _ = list_images(p)
    if not images:
        raise FinetuneError(f"{key}={p} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return [str(i.resolve()) for i in images]

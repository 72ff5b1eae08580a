"""Find the images a user has and split them: class folders, train/val/test folders, or a CSV.

The scan is the single source of truth for classes and splits; everything downstream (policy
measurement, datamodule, classes.json, checkpoints) reads the :class:`DatasetIndex` it returns.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError
from finetune.run_files import readable

if TYPE_CHECKING:
    from omegaconf import DictConfig

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
    # What the scan found in the listing itself (same path listed twice, with two labels, in two splits),
    # in the data report's shape ({kind, path, split, skipped, detail}); the data check adds them to its report.
    problems: list[dict] = field(default_factory=list)

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


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; a folder that cannot be listed is an error naming it (not "no images")."""
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise FinetuneError(
            f"Folder {folder} cannot be read ({e.strerror or type(e).__name__}"
            f"{f', errno {e.errno}' if e.errno else ''}). Make it readable (e.g. chmod -R u+rX) or remove it."
        ) from None


def list_images(path: Path) -> tuple[list[Path], list[Path]]:
    """Images under ``path`` (recursive, sorted) and the other files found there.

    Symlinked sub-folders are followed (a link back to a folder being scanned is not: it would loop, and
    is logged). A name with an image extension that is not a regular file (a dangling symlink, a FIFO)
    counts as an image, so the data check lists it as a bad file instead of it vanishing from the scan."""
    images: list[Path] = []
    other: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[str]) -> None:
        for p in _entries(folder):
            if p.is_dir():
                real = os.path.realpath(p)
                if real in ancestors:
                    log.warning("Not following %s: it links back to %s, which is already being scanned.", p, real)
                    continue
                walk(p, ancestors | {real})
            elif not p.name.startswith("."):
                (images if p.suffix.lower() in IMAGE_EXTENSIONS else other).append(p)

    walk(path, frozenset({os.path.realpath(path)}))
    return sorted(images), sorted(other)


def absolute(p: Path) -> str:
    """Where the file really is (symlinks resolved); a dangling link keeps its own name, which the user can find."""
    return str(p.resolve()) if p.exists() else str(p.absolute())


def _find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_ALIASES[split]:
        candidate = root / name
        if candidate.is_dir():
            return candidate
    return None


def _class_dirs(folder: Path, key: str) -> list[Path]:
    entries = _entries(folder)
    dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    loose = [p for p in entries if p not in dirs and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    if dirs and loose:  # nothing the user gave is dropped silently
        log.warning("%d image(s) directly in %s are not in a class sub-folder and are not used: %s%s", len(loose),
                    folder, ", ".join(p.name for p in loose[:5]), " ..." if len(loose) > 5 else "")
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
        name = class_name(class_dir)
        if classes is not None and name not in classes:
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
        pairs.extend((absolute(p), name) for p in images)
    return pairs


def class_name(class_dir: Path) -> str:
    """The class a folder names. A name that is not valid UTF-8 (old zip archives) is spelled with
    ``\\xNN`` escapes (b"caf\\xe9" -> 'caf\\xe9'): guessing its encoding could be wrong, and the escaped
    name is plain text for classes.json, checkpoints, plots and predictions, and scans the same each time."""
    name = readable(class_dir.name)
    if name != class_dir.name:
        log.warning("Class folder %s: its name is not valid UTF-8; the class is named '%s' (rename the folder, "
                    "e.g. with convmv, to choose the name).", readable(str(class_dir)), name)
    elif "\\x" in name and any(readable(p.name) == name for p in class_dir.parent.iterdir() if p != class_dir):
        raise FinetuneError(f"Class folders {readable(str(class_dir))} and one whose non-UTF-8 name is spelled the "
                            f"same way both name class '{name}'. Rename one of them.")
    return name


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


def _read_csv(csv_path: Path, key: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Column names (stripped, lower-cased) and (line number, fields) of every row that is not blank.

    The delimiter is whichever of , ; or tab the header uses most (spreadsheets in many locales write ;)."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
        first = next((line for line in text.splitlines() if line.strip()), "")
        delimiter = max(",;\t", key=first.count) if any(d in first for d in ",;\t") else ","
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = [(reader.line_num, row) for row in reader if any(field.strip() for field in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FinetuneError(f"{key}={csv_path} could not be read as a CSV file: {e}.") from None
    if not rows:
        return [], []
    return [name.strip().lower() for name in rows[0][1]], rows[1:]


def _why_missing(path: Path, raw: str) -> str:
    """Why a listed path is not a usable file, with a hint where one is likely."""
    if path.is_symlink() and not path.exists():
        return f"{path}: dangling symlink (points to {os.readlink(path)}, which does not exist)"
    if path.is_dir():
        return f"{path}: a folder, not an image file"
    if path.exists():
        return f"{path}: not a regular file"
    if not Path(raw).is_absolute() and Path(raw).is_file():
        return f"{path}: does not exist (but {Path(raw).resolve()} does: paths are relative to the CSV's folder)"
    return f"{path}: does not exist"


def _scan_csv(csv_path: Path, key: str) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[str]]]:
    """(path, label) per split, as listed (repeats included), and where each path is listed ("line 7 (val)")."""
    header, rows = _read_csv(csv_path, key)
    if not {"path", "label"} <= set(header):
        raise FinetuneError(
            f"{key}={csv_path} needs a header row with columns 'path' and 'label' (and optionally "
            f"'split' = train|val|test), separated by commas; found columns: {sorted(header) or 'none (empty file)'}."
        )
    pairs: dict[str, list[tuple[str, str]]] = {}
    origins: dict[str, list[str]] = {}
    missing = []
    for line_no, fields in rows:
        if len(fields) > len(header):
            raise FinetuneError(
                f"{csv_path} line {line_no} has {len(fields)} fields but the header has {len(header)}: {fields}. "
                f"Quote a path or label that contains the delimiter (\"a,b.jpg\")."
            )
        row = dict(zip(header, (f.strip() for f in fields)))
        raw, label = row.get("path", ""), row.get("label", "")
        if not raw or not label:
            raise FinetuneError(f"{csv_path} line {line_no}: the row needs both a path and a label, got {fields}.")
        split = (row.get("split") or "train").lower()
        canonical = next((k for k, names in SPLIT_ALIASES.items() if split in names), None)
        if canonical is None:
            accepted = ", ".join(name for names in SPLIT_ALIASES.values() for name in names)
            raise FinetuneError(f"{csv_path} line {line_no}: split '{split}' is not a split name (one of {accepted}, "
                                f"or empty for train).")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        if not path.is_file():
            missing.append(f"line {line_no}: {_why_missing(path, raw)}")
            continue
        resolved = str(path.resolve())
        pairs.setdefault(canonical, []).append((resolved, label))
        origins.setdefault(resolved, []).append(f"line {line_no} ({canonical})")
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FinetuneError(
            f"{key}={csv_path} lists {len(missing)} image(s) that are not usable files ({shown}). Relative "
            f"paths are resolved against the CSV's folder; fix the paths or remove those rows."
        )
    return pairs, origins


def _csv_classes(csv_path: Path, key: str, pairs: dict[str, list[tuple[str, str]]]) -> list[str]:
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
    return classes


def check_listing(
    pairs: dict[str, list[tuple[str, str]]], origins: dict[str, list[str]] | None = None
) -> tuple[dict[str, list[tuple[str, str]]], list[dict]]:
    """The listing with each path once per split, and what was wrong with it.

    A path listed twice in a split is used once; one listed with several labels is contradictory training
    data and left out (the data check stops on it under data.on_bad_file=error); one listed in several
    splits is leakage and reported. Folders reach the same file twice through symlinks, CSVs by repeated
    rows: both are keyed by the resolved path."""
    origins = origins or {}
    seen: dict[str, dict[str, list[str]]] = {}
    for split, items in pairs.items():
        for path, label in items:
            seen.setdefault(path, {}).setdefault(split, []).append(label)
    problems: list[dict] = []
    conflicting = set()
    for path, by_split in seen.items():
        labels = sorted({label for ls in by_split.values() for label in ls})
        splits = list(by_split)
        at = f" ({', '.join(origins[path])})" if origins.get(path) else ""
        if len(labels) > 1:
            conflicting.add(path)
            problems.append({"kind": "label_conflict", "path": path, "split": ", ".join(splits), "skipped": True,
                             "labels": labels,
                             "detail": f"the same file is labelled {' and '.join(labels)}{at}: contradictory "
                                       f"training data, left out; give it one label"})
            continue
        for split, ls in by_split.items():
            if len(ls) > 1:
                problems.append({"kind": "duplicate_within_split", "path": path, "split": split, "skipped": False,
                                 "detail": f"the same file is listed {len(ls)} times in {split}{at}; used once"})
        if len(splits) > 1:
            problems.append({"kind": "duplicate_across_splits", "path": path, "split": ", ".join(splits),
                             "skipped": False,
                             "detail": f"the same file is listed in {' and '.join(splits)}{at} (leakage: the model "
                                       f"is scored on images it trained on)"})
    clean = {}
    for split, items in pairs.items():
        used: set[str] = set()
        clean[split] = [(p, y) for p, y in items if p not in conflicting and not (p in used or used.add(p))]
    if problems:
        counts = Counter(p["kind"] for p in problems)
        log.warning("The listing has %s: %s%s", ", ".join(f"{n} {k}" for k, n in counts.items()),
                    "; ".join(f"{p['path']}: {p['detail']}" for p in problems[:5]), " ..." if len(problems) > 5 else "")
    return clean, problems


def _similar_names(classes: list[str]) -> list[dict]:
    """Class names that differ only in case or spacing ("Cat", "cat", "cat_"): usually one class spelled two
    ways, which splits its images over two outputs. Reported, not merged: the user decides."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault("".join(ch for ch in name.casefold() if ch.isalnum()) or name, []).append(name)
    found = [names for names in groups.values() if len(names) > 1]
    for names in found:
        log.warning("Classes %s differ only in case or punctuation: if they are one class, give them one name.",
                    " and ".join(f"'{n}'" for n in names))
    return [{"kind": "similar_class_names", "path": "", "split": "all", "skipped": False, "classes": names,
             "detail": f"classes {' and '.join(repr(n) for n in names)} differ only in case or punctuation; "
                       f"if they are one class, give them one name"} for names in found]


def scan_configured(cfg: DictConfig) -> DatasetIndex:
    """:func:`scan_dataset` with the run config's ``data.*`` root, split fractions and split seed: every
    command that trains or measures (train, ensemble, advise, preview) scans the same way."""
    data = cfg.data
    return scan_dataset(data.root, data.val_fraction, data.test_fraction, data.split_seed)


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
        pairs, origins = _scan_csv(root, key)
        pairs, problems = check_listing(pairs, origins)
        classes = _csv_classes(root, key, pairs)
    elif (train_dir := _find_split_dir(root, "train")) is not None and any(p.is_dir() for p in _entries(train_dir)):
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
    if layout != "csv":
        pairs, problems = check_listing(pairs)
    problems += _similar_names(classes)
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
    return DatasetIndex(str(root), layout, classes, {s: splits[s] for s in order}, ignored, problems)


def scan_inputs(path: str | Path, key: str = "input") -> list[str]:
    """Images to predict on: one file, or every image under a folder (recursive)."""
    p = Path(str(path)).expanduser()
    if not p.exists() and any(c in str(p) for c in "*?["):  # input='photos/*.jpg', quoted so the shell left it
        import glob

        matches = sorted(glob.glob(str(p), recursive=True))
        images = [str(Path(m).resolve()) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise FinetuneError(f"{key}={p} matches no image files ({len(matches)} match(es) in all; images are "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))}).")
        return images
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

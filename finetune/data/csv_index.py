"""A dataset given as a CSV of path,label(,split): reading it (any of , ; tab), checking each row, its classes."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from finetune.data.folders import SPLIT_ALIASES
from finetune.errors import FinetuneError


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


# Several labels in one field (task=multilabel): "a;b" or "a|b". Inside the program a sample's labels are one string,
# the class names sorted and joined by LABEL_JOIN (so the listing checks compare them as they compare single labels).
LABEL_SEPARATORS = (";", "|")
LABEL_JOIN = ";"
ONE_HOT_VALUES = {"0": False, "1": True, "": False, "false": False, "true": True}


def split_labels(joined: str) -> list[str]:
    """A sample's class names from the joined form (task=multilabel); [] for an image with no label."""
    return joined.split(LABEL_JOIN) if joined else []


def _multilabel_layout(header: list[str], csv_path: Path, key: str, task: str) -> str:
    """'single' (a label column), 'labels' (a labels column, several per row) or 'one_hot' (a 0/1 column per
    class), refused where the task cannot use it."""
    if "path" not in header:
        raise FinetuneError(
            f"{key}={csv_path} needs a header row with columns 'path' and 'label' (and optionally "
            f"'split' = train|val|test), separated by commas; for several labels per image (task=multilabel) "
            f"'path' and 'labels' (e.g. cat;dog), or 'path' and one 0/1 column per class; found columns: "
            f"{sorted(header) or 'none (empty file)'}.")
    others = [h for h in header if h not in ("path", "split")]
    if task != "multilabel" and "label" not in header and "labels" not in header:
        raise FinetuneError(
            f"{key}={csv_path} needs a header row with columns 'path' and 'label' (and optionally 'split' = "
            f"train|val|test), separated by commas; found columns: {sorted(header)}. (Several labels per image, "
            f"as a labels column or one 0/1 column per class: pass task=multilabel.)")
    layout = "single" if "label" in header else "labels" if "labels" in header else "one_hot" if others else ""
    if not layout or (layout == "single" and "labels" in header):
        raise FinetuneError(
            f"{key}={csv_path} needs a 'label' column (one class per image), a 'labels' column (several, e.g. "
            f"cat;dog, with task=multilabel) or one 0/1 column per class; found columns: {sorted(header)}.")
    if task != "multilabel" and layout != "single":
        kind = "a 'labels' column" if layout == "labels" else f"0/1 columns per class ({', '.join(others[:4])})"
        raise FinetuneError(
            f"{key}={csv_path} has {kind}: several labels per image. Pass task=multilabel to train a multi-label "
            f"classifier (a sigmoid per class), or give each image one class in a 'label' column.")
    return layout


def _row_labels(layout: str, row: dict[str, str], columns: list[str], where: str, seen_separators: dict) -> str:
    """The row's labels, joined (multi-label layouts), checked for mixed separators and non-0/1 cells."""
    if layout == "one_hot":
        bad = [(c, row.get(c, "")) for c in columns if row.get(c, "").lower() not in ONE_HOT_VALUES]
        if bad:
            raise FinetuneError(f"{where}: column '{bad[0][0]}' holds {bad[0][1]!r}; in a one-column-per-class CSV "
                                f"every cell is 0 or 1 (1: the image shows that class).")
        return LABEL_JOIN.join(sorted(c for c in columns if ONE_HOT_VALUES[row.get(c, "").lower()]))
    text = row.get("labels" if layout == "labels" else "label", "")
    used = [sep for sep in LABEL_SEPARATORS if sep in text]
    for sep in used:
        seen_separators.setdefault(sep, where)
    if len(seen_separators) > 1:
        first, second = list(seen_separators.items())[:2]
        raise FinetuneError(f"{where}: the labels mix separators ('{first[0]}' at {first[1]}, '{second[0]}' at "
                            f"{second[1]}); separate several labels the same way everywhere, e.g. cat;dog.")
    names = [n.strip() for n in (text.split(used[0]) if used else [text]) if n.strip()]
    return LABEL_JOIN.join(sorted(set(names)))


def scan_csv(csv_path: Path, key: str, task: str = "multiclass",
             training: bool = True) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[str]]]:
    """(path, label) per split, as listed (repeats included), and where each path is listed ("line 7 (val)").
    With task=multilabel the label is the row's class names joined (``split_labels`` reads them back).
    ``training``: a scan to train on (every one-hot class column needs a positive training row)."""
    header, rows = _read_csv(csv_path, key)
    layout = _multilabel_layout(header, csv_path, key, task)
    columns = [h for h in header if h not in ("path", "split")]
    separators: dict[str, str] = {}
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
        raw = row.get("path", "")
        if task == "multilabel":
            label = _row_labels(layout, row, columns, f"{csv_path} line {line_no}", separators)
        else:
            label = row.get("label", "")
        if not raw or (not label and task != "multilabel"):
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
    if layout == "one_hot" and training:  # a class column without one training image marked 1 would be dropped
        positive = {n for _, label in pairs.get("train", []) for n in split_labels(label)}
        empty = [c for c in columns if c not in positive]
        if empty and pairs.get("train"):
            raise FinetuneError(f"{key}={csv_path}: the class column(s) {', '.join(empty)} have no training row "
                                f"marked 1; every class needs training images. Remove the column(s) or mark them.")
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FinetuneError(
            f"{key}={csv_path} lists {len(missing)} image(s) that are not usable files ({shown}). Relative "
            f"paths are resolved against the CSV's folder; fix the paths or remove those rows."
        )
    return pairs, origins


def csv_classes(csv_path: Path, key: str, pairs: dict[str, list[tuple[str, str]]],
                task: str = "multiclass") -> list[str]:
    """The classes: those of the training rows (multilabel: every name in them)."""
    if not pairs.get("train"):
        raise FinetuneError(f"{key}={csv_path} lists no training images (rows with split train or no split).")

    def names(label: str) -> list[str]:
        return split_labels(label) if task == "multilabel" else [label]

    classes = sorted({n for _, c in pairs["train"] for n in names(c)})
    for split, items in pairs.items():
        unknown = sorted({n for _, c in items for n in names(c)} - set(classes))
        if unknown:
            raise FinetuneError(
                f"{csv_path}: labels {unknown} appear in split '{split}' but not in train; "
                f"every class needs training images."
            )
    return classes

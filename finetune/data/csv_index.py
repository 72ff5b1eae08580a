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


def scan_csv(csv_path: Path, key: str) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[str]]]:
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


def csv_classes(csv_path: Path, key: str, pairs: dict[str, list[tuple[str, str]]]) -> list[str]:
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

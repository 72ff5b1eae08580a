"""Check every image once before training: unreadable files, tiny images, duplicates, label conflicts, imbalance.

Each file is fully decoded (a truncated JPEG passes PIL's ``verify`` but fails ``load``), in threads,
and hashed (data/file_checks.py); results are cached by path, size, mtime, inode and ctime in
``~/.cache/finetune/file_checks/``, one file per data set, so a rerun on the same data is instant (only results
of bytes that were read: a file that could not be opened is checked again). Problems are reported by path in the
log and in ``RUN/data_report.json``; with ``data.on_bad_file=skip`` unreadable or too-small files are left out
(and listed), with ``error`` the first one stops the run. One image with several labels (the same path,
or identical content) is contradictory training data and treated like a bad file. Duplicates, leakage
across splits and imbalance are warnings: nothing the user gave is dropped for them (a path listed twice
in one split is used once, and listed).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from finetune.data.datasets import DatasetIndex, label_list
from finetune.data.file_checks import check_files
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

ON_BAD_FILE = ("skip", "error")


@dataclass
class DataReport:
    checked: int = 0
    from_cache: int = 0
    seconds: float = 0.0
    on_bad_file: str = "skip"
    skipped: list[str] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        counts = Counter(p["kind"] for p in self.problems)
        return {"checked": self.checked, "from_cache": self.from_cache, "seconds": round(self.seconds, 2),
                "on_bad_file": self.on_bad_file, "skipped": self.skipped, "problem_counts": dict(counts),
                "problems": self.problems}


def _where_listed(index: DatasetIndex) -> tuple[dict[str, list[str]], dict[str, set[int]]]:
    """The splits each path is listed in (several: leakage) and the labels it is listed with."""
    splits_of: dict[str, list[str]] = {}
    labels_of: dict[str, set[int]] = defaultdict(set)
    for split, samples in index.splits.items():
        for path, label in samples:
            if split not in splits_of.setdefault(path, []):
                splits_of[path].append(split)
            labels_of[path].add(label)
    return splits_of, labels_of


def _listing_problems(index: DatasetIndex, on_bad_file: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The scan's problems (one path listed twice, with two labels, in two splits), and its label conflicts,
    marked skipped; ``error`` raises on the first conflict."""
    listing = [dict(p) for p in index.problems]
    conflicts = [p for p in listing if p["kind"] == "label_conflict"]
    if conflicts and on_bad_file == "error":
        raise FinetuneError(
            f"{conflicts[0]['path']}: {conflicts[0]['detail']}. Fix the labels, or set data.on_bad_file=skip to train "
            f"without such files (every one is listed in RUN/data_report.json)."
        )
    for p in conflicts:
        p["skipped"] = True
    return listing, conflicts


def _file_problems(where: dict[str, str], results: dict[str, dict[str, Any]], on_bad_file: str, min_side: int,
                   input_size: int | None) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Unusable files by path (``error`` raises on the first), and images upscaled more than 4x."""
    bad: dict[str, dict[str, Any]] = {}
    small: list[dict[str, Any]] = []
    for path in sorted(where):
        r = results[path]
        kind, detail = r.get("kind"), r.get("detail", "")
        if kind is None and min(r["width"], r["height"]) < min_side:
            kind, detail = "too_small", f"{r['width']}x{r['height']} px, below data.min_image_side={min_side}"
        if kind is not None:
            bad[path] = {"kind": kind, "path": path, "split": where[path], "detail": detail,
                         "skipped": on_bad_file == "skip"}
            if on_bad_file == "error":
                raise FinetuneError(
                    f"Bad image file {path} ({kind}: {detail}). Fix or remove it, or set data.on_bad_file=skip to "
                    f"train on the other files (every skipped file is listed in RUN/data_report.json)."
                )
        elif input_size and min(r["width"], r["height"]) < input_size / 4:
            small.append({"kind": "small", "path": path, "split": where[path], "skipped": False,
                          "detail": f"{r['width']}x{r['height']} px, upscaled more than 4x to {input_size} px"})
    if len(small) > 20:  # a whole dataset of small images (e.g. 32 px at 224): one entry, every path kept
        small = [{"kind": "small", "path": "", "split": "all", "skipped": False, "paths": [p["path"] for p in small],
                  "detail": f"{len(small)} images are upscaled more than 4x to {input_size} px "
                            f"(e.g. {small[0]['path']}); check that data.image_size suits them"}]
    return bad, small


def _content_duplicates(index: DatasetIndex, where: dict[str, str], splits_of: dict[str, list[str]],
                        labels_of: dict[str, set[int]], results: dict[str, dict[str, Any]], bad: dict[str, Any],
                        on_bad_file: str, report: DataReport) -> set[str]:
    """Files of identical content (by hash) added to ``report``; returns those with several labels, which
    are contradictory training data and left out (``error`` raises)."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for path in sorted(where):
        if path not in bad and results[path].get("sha1"):
            by_hash[results[path]["sha1"]].append(path)
    conflicted: set[str] = set()
    for paths in by_hash.values():
        if len(paths) < 2:
            continue
        splits = sorted({s for p in paths for s in splits_of[p]})
        labels = sorted({"+".join(index.classes[c] for c in label_list(y)) for p in paths for y in labels_of[p]})
        if len(labels) > 1:  # one image, several labels: contradictory training data, like a bad file
            kind = "label_conflict"
            detail = (f"identical content labelled {' and '.join(labels)}: contradictory training data"
                      + ("; left out" if on_bad_file == "skip" else ""))
            if on_bad_file == "error":
                raise FinetuneError(f"{', '.join(paths)}: {detail}. Remove the wrong copies, or set "
                                    f"data.on_bad_file=skip to train without them (every one is listed in "
                                    f"RUN/data_report.json).")
            conflicted.update(paths)
        else:
            kind = "duplicate_across_splits" if len(splits) > 1 else "duplicate_within_split"
            detail = (f"identical content in {', '.join(splits)} (leakage: the model is scored on images it trained on)"
                      if len(splits) > 1 else f"identical content, {len(paths)} copies in {splits[0]}")
        for p in paths:
            report.problems.append({"kind": kind, "path": p, "split": where[p], "skipped": kind == "label_conflict",
                                    "detail": detail, "same_as": [q for q in paths if q != p]})
    return conflicted


def _check_classes(index: DatasetIndex, splits: dict[str, list], imbalance_ratio: float, report: DataReport) -> None:
    """Every class keeps a training image (else an error); a large imbalance is reported."""
    counts = Counter(c for _, y in splits.get("train", []) for c in label_list(y))
    empty = [c for i, c in enumerate(index.classes) if counts.get(i, 0) == 0]
    if empty:
        raise FinetuneError(f"Class(es) {', '.join(empty)} have no usable training image after skipping bad files; "
                            f"see the files listed above.")
    if counts and max(counts.values()) > imbalance_ratio * min(counts.values()):
        low = min(counts, key=counts.get)
        high = max(counts, key=counts.get)
        report.problems.append({
            "kind": "class_imbalance", "path": "", "split": "train", "skipped": False,
            "detail": f"{index.classes[high]} has {counts[high]} training images, {index.classes[low]} {counts[low]} "
                      f"(more than {imbalance_ratio:g}x): accuracy will favour the large classes; consider "
                      f"per-class metrics in report.md or more data for the small ones",
        })


def validate_dataset(index: DatasetIndex, on_bad_file: str = "skip", min_side: int = 8, input_size: int | None = None,
                     imbalance_ratio: float = 10.0) -> tuple[DatasetIndex, DataReport]:
    """The index without unusable files (``skip``), and the report; ``error`` raises on the first one."""
    if on_bad_file not in ON_BAD_FILE:
        raise FinetuneError(f"data.on_bad_file={on_bad_file} must be one of {', '.join(ON_BAD_FILE)}.")
    started = time.perf_counter()
    splits_of, labels_of = _where_listed(index)
    where = {path: ", ".join(s) for path, s in splits_of.items()}
    listing, conflicts = _listing_problems(index, on_bad_file)
    results, cached = check_files(sorted(where))
    report = DataReport(checked=len(where), from_cache=cached, on_bad_file=on_bad_file)
    bad, small = _file_problems(where, results, on_bad_file, min_side, input_size)
    report.problems[:0] = [*bad.values(), *small, *listing]
    conflicted = _content_duplicates(index, where, splits_of, labels_of, results, bad, on_bad_file, report)
    report.skipped = sorted({*bad, *conflicted, *(p["path"] for p in conflicts)})

    dropped = set(bad) | conflicted
    splits = {s: [(p, y) for p, y in samples if p not in dropped] for s, samples in index.splits.items()}
    _check_classes(index, splits, imbalance_ratio, report)
    report.seconds = time.perf_counter() - started
    _log(report)
    cleaned = replace(index, splits=splits)
    return cleaned, report


def _log(report: DataReport) -> None:
    head = (f"Data check: {report.checked} files in {report.seconds:.1f} s ({report.from_cache} from cache), "
            f"{len(report.problems)} problem(s)")
    if not report.problems:
        log.info("%s.", head)
        return
    lines = [f"  {p['kind']}: {p['path'] or p['split']} ({p['detail']}){' -> skipped' if p['skipped'] else ''}"
             for p in report.problems[:50]]
    more = f"\n  ... {len(report.problems) - 50} more in data_report.json" if len(report.problems) > 50 else ""
    log.warning("%s:\n%s%s", head, "\n".join(lines), more)

"""What is wrong with a dataset's listing itself: a path listed twice, with two labels, in two splits, and
class names that differ only in case or punctuation."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)


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


def similar_class_names(classes: list[str]) -> list[dict]:
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

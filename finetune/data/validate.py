"""Check every image once before training: unreadable files, tiny images, duplicates, label conflicts, imbalance.

Each file is fully decoded (a truncated JPEG passes PIL's ``verify`` but fails ``load``), in threads,
and hashed; results are cached by path, size, mtime, inode and ctime in ``~/.cache/finetune/file_checks.json``
so a rerun on the same data is instant (only results of bytes that were read: a file that could not be opened
is checked again). Problems are reported by path in the log and in
``RUN/data_report.json``; with ``data.on_bad_file=skip`` unreadable or too-small files are left out
(and listed), with ``error`` the first one stops the run. One image with several labels (the same path,
or identical content) is contradictory training data and treated like a bad file. Duplicates, leakage
across splits and imbalance are warnings: nothing the user gave is dropped for them (a path listed twice
in one split is used once, and listed).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import stat
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from finetune.data.datasets import DatasetIndex
from finetune.errors import FinetuneError
from finetune.run_files import write_text

log = logging.getLogger(__name__)

BAD_KINDS = ("zero_byte", "not_image", "truncated", "corrupt", "too_small", "unreadable", "dangling_symlink")
ON_BAD_FILE = ("skip", "error")
CACHE_VERSION = 2  # 2: keys hold inode and ctime; read failures are not cached


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetune" / "file_checks.json"


def _cache_key(st: os.stat_result) -> str:
    """Changes whenever the bytes may have: size, mtime, inode (a file replaced by another) and ctime (which
    a write restoring the mtime with os.utime still moves)."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def _read(path: str) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and the stat of the very file read (one open: no race between the two).

    Opened non-blocking so a FIFO named x.jpg cannot hang the check; anything not a regular file is an OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{'a folder' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}, not an image file")
    with os.fdopen(fd, "rb") as f:
        return f.read(), st


def _unreadable(path: str, e: OSError) -> dict[str, Any]:
    if os.path.islink(path) and not os.path.exists(path):
        loop = e.errno == errno.ELOOP
        return {"kind": "dangling_symlink", "detail": f"dangling symlink (points to {os.readlink(path)}, "
                                                      f"{'a symlink loop' if loop else 'which does not exist'})"}
    return {"kind": "unreadable", "detail": f"cannot be read: {e.strerror or e}"}


def _check(path: str) -> tuple[dict[str, Any], str | None]:
    """The check's result, and the cache key of the bytes it decoded (None when the file could not be read:
    such a failure is about the file system, not the bytes, and may be gone on the next run)."""
    try:
        data, st = _read(path)
    except OSError as e:
        return _unreadable(path, e), None
    key = _cache_key(st)
    if not data:
        return {"kind": "zero_byte", "detail": "the file is empty (0 bytes)"}, key
    digest = hashlib.sha1(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: truncated files fail here
            width, height = im.size
    except UnidentifiedImageError:
        return {"kind": "not_image", "detail": "not an image file (unrecognised content)", "sha1": digest}, key
    except OSError as e:
        kind = "truncated" if "truncated" in str(e).lower() or "broken data stream" in str(e).lower() else "corrupt"
        return {"kind": kind, "detail": str(e) or type(e).__name__, "sha1": digest}, key
    except Exception as e:  # noqa: BLE001  (decoders raise SyntaxError, ValueError, DecompressionBombError ...)
        return {"kind": "corrupt", "detail": f"{type(e).__name__}: {e}", "sha1": digest}, key
    return {"kind": None, "width": width, "height": height, "sha1": digest}, key


def check_file(path: str) -> dict[str, Any]:
    """{kind: None | zero_byte | not_image | truncated | corrupt | unreadable | dangling_symlink, detail, width,
    height, sha1}."""
    return _check(path)[0]


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


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data.get("files", {}) if data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError):
        return {}


def check_files(paths: list[str], workers: int | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Check results for every path, and how many came from the cache.

    Only results decoded from bytes that were read are cached (keyed by size, mtime, inode and ctime);
    a file that could not be opened (permissions, a dangling link, I/O errors) is checked again next time."""
    store = cache_path()
    cache = _load_cache(store)
    results, todo = {}, []
    for path in paths:
        try:
            key = _cache_key(os.stat(path))
        except OSError:
            key = None
        hit = cache.get(path)
        if key is not None and hit and hit.get("key") == key:
            results[path] = hit["result"]
        else:
            todo.append(path)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for path, (result, key) in zip(todo, pool.map(_check, todo)):
            results[path] = result
            if key is None:
                cache.pop(path, None)
            else:
                cache[path] = {"key": key, "result": result}
    if todo:
        try:
            write_text(store, json.dumps({"version": CACHE_VERSION, "files": cache}))
        except OSError as e:  # a read-only home must not stop training
            log.warning("Could not write the file-check cache %s: %s", store, e)
    return results, len(paths) - len(todo)


def validate_dataset(index: DatasetIndex, on_bad_file: str = "skip", min_side: int = 8, input_size: int | None = None,
                     imbalance_ratio: float = 10.0) -> tuple[DatasetIndex, DataReport]:
    """The index without unusable files (``skip``), and the report; ``error`` raises on the first one."""
    if on_bad_file not in ON_BAD_FILE:
        raise FinetuneError(f"data.on_bad_file={on_bad_file} must be one of {', '.join(ON_BAD_FILE)}.")
    started = time.perf_counter()
    splits_of: dict[str, list[str]] = {}  # a path may be listed in several splits (leakage)
    labels_of: dict[str, set[int]] = defaultdict(set)
    for split, samples in index.splits.items():
        for path, label in samples:
            if split not in splits_of.setdefault(path, []):
                splits_of[path].append(split)
            labels_of[path].add(label)
    where = {path: ", ".join(s) for path, s in splits_of.items()}
    listing = [dict(p) for p in index.problems]  # the scan's: one path listed twice, with two labels, in two splits
    conflicts = [p for p in listing if p["kind"] == "label_conflict"]
    if conflicts and on_bad_file == "error":
        raise FinetuneError(
            f"{conflicts[0]['path']}: {conflicts[0]['detail']}. Fix the labels, or set data.on_bad_file=skip to train "
            f"without such files (every one is listed in RUN/data_report.json)."
        )
    for p in conflicts:
        p["skipped"] = True
    results, cached = check_files(sorted(where))
    report = DataReport(checked=len(where), from_cache=cached, on_bad_file=on_bad_file)

    bad: dict[str, dict[str, Any]] = {}
    small: list[dict[str, Any]] = []
    for path in sorted(where):
        r = results[path]
        kind, detail = r.get("kind"), r.get("detail", "")
        if kind is None and min(r["width"], r["height"]) < min_side:
            kind, detail = "too_small", f"{r['width']}x{r['height']} px, below data.min_image_side={min_side}"
        if kind is not None:
            bad[path] = {"kind": kind, "path": path, "split": where[path], "detail": detail, "skipped": on_bad_file == "skip"}
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
                  "detail": f"{len(small)} images are upscaled more than 4x to {input_size} px (e.g. {small[0]['path']}); "
                            f"check that data.image_size suits them"}]
    report.problems[:0] = [*bad.values(), *small, *listing]

    by_hash: dict[str, list[str]] = defaultdict(list)
    for path in sorted(where):
        if path not in bad and results[path].get("sha1"):
            by_hash[results[path]["sha1"]].append(path)
    conflicted: set[str] = set()
    for paths in by_hash.values():
        if len(paths) < 2:
            continue
        splits = sorted({s for p in paths for s in splits_of[p]})
        labels = sorted({index.classes[y] for p in paths for y in labels_of[p]})
        if len(labels) > 1:  # one image, several labels: contradictory training data, like a bad file
            kind = "label_conflict"
            detail = (f"identical content labelled {' and '.join(labels)}: contradictory training data"
                      + ("; left out" if on_bad_file == "skip" else ""))
            if on_bad_file == "error":
                raise FinetuneError(f"{', '.join(paths)}: {detail}. Remove the wrong copies, or set data.on_bad_file=skip "
                                    f"to train without them (every one is listed in RUN/data_report.json).")
            conflicted.update(paths)
        else:
            kind = "duplicate_across_splits" if len(splits) > 1 else "duplicate_within_split"
            detail = (f"identical content in {', '.join(splits)} (leakage: the model is scored on images it trained on)"
                      if len(splits) > 1 else f"identical content, {len(paths)} copies in {splits[0]}")
        for p in paths:
            report.problems.append({"kind": kind, "path": p, "split": where[p], "skipped": kind == "label_conflict",
                                    "detail": detail, "same_as": [q for q in paths if q != p]})
    report.skipped = sorted({*bad, *conflicted, *(p["path"] for p in conflicts)})

    dropped = set(bad) | conflicted
    splits = {s: [(p, y) for p, y in samples if p not in dropped] for s, samples in index.splits.items()}
    counts = Counter(y for _, y in splits.get("train", []))
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
    report.seconds = time.perf_counter() - started
    _log(report)
    cleaned = DatasetIndex(index.root, index.layout, index.classes, splits, index.ignored_files, index.problems)
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

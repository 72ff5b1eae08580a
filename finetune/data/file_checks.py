"""Check one image file (read once, fully decoded, hashed), in threads, with the results cached by path, size,
mtime, inode and ctime so a rerun on the same data is instant.

One cache file per data set (``~/.cache/finetune/file_checks/<hash of the files' common folder>.json``), holding
only that set's files: a single file for every set ever checked grew without end and was read whole by every
run (485k entries, 114 MB of JSON, +350 MB of memory for a run on 60k images after a 300k-image one)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from finetune.run_files import write_text

log = logging.getLogger(__name__)

BAD_KINDS = ("zero_byte", "not_image", "truncated", "corrupt", "too_large", "too_small", "unreadable",
             "dangling_symlink")
CACHE_VERSION = 2  # 2: keys hold inode and ctime; read failures are not cached


def cache_path(paths: list[str]) -> Path:
    """The cache file of the data set these paths belong to (keyed by their common folder)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else ""
    return Path(base) / "finetune" / "file_checks" / f"{hashlib.sha1(folder.encode()).hexdigest()[:20]}.json"


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
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OSError(errno.EINVAL, f"{what}, not an image file")
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
            width, height = im.size  # before draft(), which shrinks what im.size reports
            # A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling): every byte of its compressed stream is
            # still read, so a truncated file fails as it does at full size, 4x faster on camera photos.
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()  # the whole stream decoded: truncated files fail here
    except UnidentifiedImageError:
        return {"kind": "not_image", "detail": "not an image file (unrecognised content)", "sha1": digest}, key
    except Image.DecompressionBombError as e:  # a real image, refused before decoding: not "corrupt"
        return {"kind": "too_large", "detail": _too_large(str(e)), "sha1": digest}, key
    except OSError as e:
        kind = "truncated" if "truncated" in str(e).lower() or "broken data stream" in str(e).lower() else "corrupt"
        return {"kind": kind, "detail": str(e) or type(e).__name__, "sha1": digest}, key
    except Exception as e:  # noqa: BLE001  (decoders raise SyntaxError, ValueError, DecompressionBombError ...)
        return {"kind": "corrupt", "detail": f"{type(e).__name__}: {e}", "sha1": digest}, key
    return {"kind": None, "width": width, "height": height, "sha1": digest}, key


def _too_large(message: str) -> str:
    """PIL refuses images over twice ``Image.MAX_IMAGE_PIXELS`` (a guard against decompression bombs); say so
    and what to do, with the sizes from its message."""
    sizes = re.findall(r"\((\d+) pixels\)|limit of (\d+) pixels", message)
    found, limit = (int(a or b) for a, b in sizes[:2]) if len(sizes) >= 2 else (None, None)
    size = f"{found / 1e6:,.0f} megapixels, over PIL's limit of {limit / 1e6:,.0f}" if found else message
    return (f"too large to decode safely ({size}, a guard against decompression bombs); if the image is "
            f"genuine, save a smaller copy: training reads a few hundred pixels per side")


def check_file(path: str) -> dict[str, Any]:
    """{kind: None | zero_byte | not_image | truncated | corrupt | too_large | unreadable | dangling_symlink,
    detail, width, height, sha1}."""
    return _check(path)[0]

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
    store = cache_path(paths)
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
        cache = {path: cache[path] for path in paths if path in cache}  # this set's files only: files gone, gone
        try:
            write_text(store, json.dumps({"version": CACHE_VERSION, "files": cache}))
        except OSError as e:  # a read-only home must not stop training
            log.warning("Could not write the file-check cache %s: %s", store, e)
    return results, len(paths) - len(todo)

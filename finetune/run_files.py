"""Write run-folder files atomically (temp file + rename): a crash never leaves half a file. Also the
checkpoint IO that saves Lightning's checkpoints the same way."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def readable(text: str) -> str:
    """``text`` with the bytes of a non-UTF-8 file name (Python's surrogate escapes, as in
    ``os.fsdecode(b"caf\\xe9")``) spelled ``\\xe9``: lossless to read, and writable as UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8; non-UTF-8 file names in it are written as ``\\xNN`` (see ``readable``)."""
    data = readable(text).encode("utf-8")
    return write_with(path, lambda f: f.write(data))


def write_with(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """``write(f)`` into a temp file beside ``path``, then renamed over it (a crash leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_mode() -> int:
    """What open() would give a new file (0666 minus the umask): mkstemp's 0600 would hide run files
    from the group on shared filesystems and cluster jobs."""
    try:
        with open("/proc/self/status") as f:  # read without setting it (os.umask does, racing other threads)
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, ValueError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_checkpoint_io():
    """A Lightning CheckpointIO that writes each checkpoint to a temp file in the same folder and
    renames it into place. (Lightning's own save goes through an fsspec transaction whose temp
    file lives in the system temp dir, so the final move can be a copy across filesystems.)"""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
            path = Path(path)
            tmp = out = None
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.fchmod(fd, file_mode())
                with os.fdopen(fd, "wb") as f:
                    out = _WriteErrors(f)
                    torch.save(checkpoint, out)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except (OSError, RuntimeError) as e:  # disk full, quota, read-only: torch says "enforce fail at ..."
                if tmp:
                    Path(tmp).unlink(missing_ok=True)
                raise checkpoint_save_error(path, getattr(out, "error", None) or e) from None
            except BaseException:
                if tmp:
                    Path(tmp).unlink(missing_ok=True)
                raise

    return AtomicCheckpointIO()


class _WriteErrors:
    """A file for torch.save that remembers the OS's error: torch reports a failed write as
    '[enforce fail at inline_container.cc] ... unexpected pos', without the reason (disk full, quota)."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_error_reason(error: BaseException) -> str:
    """The OS's words for a failed write (torch wraps them in '[enforce fail at inline_container.cc:N] ...')."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = " ".join(str(error).split())
    return text.split("] ", 1)[-1][:300] if text.startswith("[enforce fail") else text[:300]


def checkpoint_save_error(path: Path, error: BaseException):
    """A FinetuneError that says which checkpoint could not be written, why, and that the last good one is kept."""
    from finetune.errors import FinetuneError

    kept = f"the previous {path.name} is kept" if path.is_file() else f"no earlier {path.name} existed"
    return FinetuneError(
        f"Could not save the checkpoint {path}: {_save_error_reason(error)}. Nothing was half-written ({kept}). "
        f"Is the disk full (`df -h {path.parent}`) or the folder read-only? Free space or fix the permissions, then "
        f"continue with `finetune resume={path.parent.parent}`, or start again with another run_dir."
    )

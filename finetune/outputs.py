"""Outputs a command writes (predict, export, eval, preview): checked before the heavy work, written
whole, never over one of the command's inputs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from finetune.run_files import file_mode, readable


def check_output(path: str | Path, inputs: Any = (), overwrite: bool = False, key: str = "output") -> Path:
    """``path`` checked before any heavy work, so a long pass never ends in a lost result or a lost input.

    Refused: one of ``inputs`` ((description, path) pairs; compared by file identity, so through symlinks
    and hard links), even with ``overwrite``; a folder (or a name ending in '/'); an existing file without
    ``overwrite``; a location whose nearest existing folder is a file or not writable (probed with a temp
    file, since root's os.access says yes on read-only filesystems). Nothing is created here."""
    from finetune.errors import FinetuneError

    if path in (None, "", "???"):
        raise FinetuneError(f"{key} is not set: pass {key}=FILE.")
    text = str(path)
    out = Path(text).expanduser()
    if _stream(out):  # output=/dev/stdout, /dev/null, a named pipe: written straight into, never replaced
        return out
    if out.exists() and not (out.is_file() or out.is_dir()):
        raise FinetuneError(f"{key}={text} is not a regular file (a device or socket); writing there would replace "
                            f"it. Choose another {key}.")
    if out.exists():
        identity = _identity(out)
        for what, other in inputs:
            if identity is not None and _identity(other) == identity:
                raise FinetuneError(f"{key}={text} is {what} ({other}): writing there would destroy it. "
                                    f"Choose another {key}.")
        if out.is_dir():
            raise FinetuneError(f"{key}={text} is a folder; give a file name, e.g. {key}={out / 'NAME'}.")
        if not overwrite:
            raise FinetuneError(f"{key}={text} already exists; pass overwrite=true to replace it, or choose another "
                                f"{key}.")
    if text.endswith(("/", os.sep)):
        raise FinetuneError(f"{key}={text} is a folder name; give a file name inside it, e.g. {key}={text}NAME.")
    folder = Path(os.path.abspath(out)).parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise FinetuneError(f"{key}={text} cannot be written: {folder} is a file, not a folder. Choose another {key}.")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".finetune-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FinetuneError(f"{key}={text} cannot be written: {folder} is not writable ({e.strerror or e}). "
                            f"Choose another {key}.") from None
    return out


class _Appeared(Exception):
    """The output was created by someone else between check_output and the write."""


def _stream(path: Path) -> bool:
    """A character device (/dev/stdout, /dev/null) or a named pipe: a write goes through it, it is no file to
    replace."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _place_new(tmp: str, path: Path) -> None:
    """Rename ``tmp`` to ``path`` only if ``path`` does not exist, atomically: a hard link fails with
    FileExistsError when something is there. Filesystems without hard links: check, then rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _Appeared from None
    except OSError:
        if path.exists() or path.is_symlink():
            raise _Appeared from None
        os.replace(tmp, path)


def _identity(path: Any) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def write_output(path: str | Path, content: str | bytes, key: str = "output", overwrite: bool = True) -> Path:
    """Write a command's output whole (temp file in its folder + rename, as write_text); any failure
    (disk full, read-only, a folder appearing there) is a FinetuneError naming ``key`` and leaves no
    temp file behind. ``overwrite=False``: a file that appeared at ``path`` since check_output (another
    command writing the same output at the same time) is kept and this one refused, not silently replaced."""
    from finetune.errors import FinetuneError

    path = Path(path).expanduser()
    try:
        if isinstance(content, str):
            content = readable(content).encode("utf-8")
        if _stream(path):  # never os.replace a device node or a pipe (as root, that would replace /dev/null)
            with open(path, "wb") as f:
                f.write(content)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                _place_new(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path
    except _Appeared:
        raise FinetuneError(f"{key}={path} appeared while this command ran (another command writing the same {key}?); "
                            f"it was kept and nothing was written. Pass overwrite=true to replace it, or choose "
                            f"another {key}.") from None
    except OSError as e:
        raise FinetuneError(f"{key}={path} could not be written: {e.strerror or e}"
                            f"{' (' + e.filename + ')' if isinstance(e.filename, str) else ''}. Nothing was written; "
                            f"free space or choose another {key}.") from None

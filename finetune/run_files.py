"""Write run-folder files atomically (temp file + rename): a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def readable(text: str) -> str:
    """``text`` with the bytes of a non-UTF-8 file name (Python's surrogate escapes, as in
    ``os.fsdecode(b"caf\\xe9")``) spelled ``\\xe9``: lossless to read, and writable as UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8; non-UTF-8 file names in it are written as ``\\xNN`` (see ``readable``)."""
    text = readable(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


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


# --------------------------------------------------------------------------- the run folder's lifecycle

LOCK_FILE = ".lock"
# mkstemp's names above: ".NAME." + 8 random characters + ".tmp"; a SIGKILL leaves them behind.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# Not a sign of an earlier run: Hydra writes .hydra/ and its job log into the run folder at startup.
STARTUP_ENTRIES = (".hydra", LOCK_FILE)


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


def run_folder_of(resume: Any) -> Path | None:
    """The run folder ``resume`` continues in place: RUN itself (a folder with config.yaml or checkpoints/),
    or a checkpoint's grandparent (RUN/checkpoints/x.ckpt) when that holds a run's config.yaml; None for
    anything else (a bare checkpoint elsewhere, a path that does not exist). Also Hydra's run dir then."""
    if resume in (None, ""):
        return None
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        return path if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir() else None
    if path.is_file() and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


def hydra_run_dir(run_dir: Any, resume: Any, default: str) -> str:
    """Hydra's run dir (its .hydra/ and job log): run_dir, else the folder ``resume`` continues in, else
    ``default``. One Hydra could not write to is swapped for a temp folder, so that finetune itself reports
    it (naming run_dir) instead of Hydra's logging setup failing with a traceback."""
    chosen = str(run_dir) if run_dir not in (None, "") else str(run_folder_of(resume) or default)
    probe = Path(chosen).expanduser().absolute()
    fallback = str(Path(tempfile.gettempdir()) / f"{HYDRA_FALLBACK_PREFIX}{os.getpid()}")
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a link to nowhere: Hydra's mkdir would fail with FileExistsError
            return fallback
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        return chosen
    return fallback  # a file in the way, or a folder that cannot be written


HYDRA_FALLBACK_PREFIX = "finetune-hydra-"


def is_hydra_fallback(path: Path) -> bool:
    """Whether Hydra's run dir is hydra_run_dir's stand-in for a folder that could not be written."""
    return path.name.startswith(HYDRA_FALLBACK_PREFIX) and path.parent == Path(tempfile.gettempdir())


def resolve_run_dir(cfg: Any, purpose: str = "a run writes its checkpoints, logs and report there") -> Path:
    """cfg.run_dir, else Hydra's output dir, else a fresh outputs/<time> folder (library calls); created.
    ``purpose`` completes the error message: what the folder is for."""
    import errno

    from hydra.core.hydra_config import HydraConfig

    from finetune.errors import FinetuneError

    if cfg.get("run_dir"):
        path = Path(str(cfg.run_dir)).expanduser()
    elif HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
        if is_hydra_fallback(path):  # the default outputs/<date>/<time> could not be written
            raise FinetuneError(f"The current folder {Path.cwd()} is not writable, and the run's default folder "
                                f"(outputs/<date>/<time>) is in it. Pass run_dir=DIR, a folder you can write to.")
    else:
        from datetime import datetime

        path = Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    link = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if link is not None:
        raise FinetuneError(f"run_dir={path} cannot be created: {link} is a symbolic link to {os.readlink(link)}, "
                            f"which does not exist. Create that folder, or pass another run_dir.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "a file is in the way" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror or e
        raise FinetuneError(f"run_dir={path} cannot be created ({what}): {purpose}. Pass run_dir=DIR, a folder you "
                            f"can write to.") from None
    return path.resolve()


def earlier_run_files(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir`` (names), ignoring what this run's startup wrote there:
    Hydra's .hydra/ and job log (*.log), the lock, and stale temp files."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name not in STARTUP_ENTRIES and not TEMP_NAME.match(p.name)
                  and not (p.suffix == ".log" and p.is_file()))


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files of writes that never finished (a killed run); only our own name pattern,
    and only while holding the run folder's lock, so no live write loses its file."""
    removed = []
    for path in Path(run_dir).rglob(".*.tmp"):
        if TEMP_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on RUN/.lock while a run writes into RUN (released at exit, also when the
    process is killed): a second run into the same folder fails at once instead of mixing the files.
    Also the early check that the folder is writable, before any data is read."""
    from finetune.errors import FinetuneError

    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-check.", suffix=".tmp")  # root passes os.access
        os.close(fd)
        os.unlink(probe)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    except OSError as e:
        raise FinetuneError(
            f"run_dir={run_dir} is not writable ({e.strerror or e}); a run writes its checkpoints, logs and report "
            f"there. Fix the folder's permissions or free space, or pass another run_dir=DIR."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        raise FinetuneError(
            f"run_dir={run_dir} is in use by another finetune run{f' (process {holder})' if holder else ''}, which "
            f"holds {path}. Two runs in one folder would mix their files: wait for it to finish, or pass another "
            f"run_dir=DIR."
        ) from None
    except OSError:  # a filesystem without locks (some network mounts): run unlocked rather than not at all
        pass
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- outputs a command writes (predict, export, eval)


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
    """A character device (/dev/stdout, /dev/null) or a named pipe: a write goes through it, it is no file to replace."""
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

"""The run folder's lifecycle: Hydra's run dir, resolve_run_dir, the lock, the fresh-folder check and
the cleanup of temp files a killed run left behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.run_files import file_mode

LOCK_FILE = ".lock"
# The temp files of run_files' writes (mkstemp): ".NAME." + 8 random characters + ".tmp"; a SIGKILL leaves them
# behind.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# finetune.fit((images, labels)) writes in-memory training images to RUN/images/<label>/ before training starts.
IN_MEMORY_IMAGES = "images"
# Not a sign of an earlier run: Hydra writes .hydra/ and its job log into the run folder at startup, the Python
# API its in-memory images (it checks the folder is fresh before it writes them).
STARTUP_ENTRIES = (".hydra", LOCK_FILE, IN_MEMORY_IMAGES)


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


def run_dir_in_data(run_dir: Any, data_root: Any) -> bool:
    """Whether a run folder would sit where the data scan reads: data.root itself, anywhere under it (class
    folders: each sub-folder is a class), or inside its train/val/test folders. Its files would be mixed with the
    user's images, and the next run would read the run folder as a class with no images."""
    root = Path(str(data_root)).expanduser() if data_root not in (None, "") else None
    if run_dir in (None, "") or root is None or not root.is_dir():
        return False
    run, real_root = Path(os.path.realpath(Path(str(run_dir)).expanduser())), Path(os.path.realpath(root))
    if run == real_root:
        return True
    if not run.is_relative_to(real_root):
        return False
    from finetune.data.folders import find_split_dir

    splits = [d for d in (find_split_dir(root, s) for s in ("train", "val", "test")) if d is not None]
    return not splits or any(run.is_relative_to(os.path.realpath(d)) for d in splits)


def hydra_run_dir(run_dir: Any, resume: Any, default: str, data_root: Any = None) -> str:
    """Hydra's run dir (its .hydra/ and job log): run_dir, else the folder ``resume`` continues in, else
    ``default``. One Hydra could not write to, or one among the images of ``data_root`` (run_dir_in_data), is
    swapped for a temp folder, so that finetune itself reports it (naming run_dir) instead of Hydra's logging
    setup failing with a traceback, or Hydra's files landing in the user's data."""
    chosen = str(run_dir) if run_dir not in (None, "") else str(run_folder_of(resume) or default)
    fallback = str(Path(tempfile.gettempdir()) / f"{HYDRA_FALLBACK_PREFIX}{os.getpid()}")
    if resume in (None, "") and run_dir_in_data(chosen, data_root):
        return fallback
    probe = Path(chosen).expanduser().absolute()
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

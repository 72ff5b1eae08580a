"""Walk image folders: which files are images, the split folders (train/val/test) and the class sub-folders,
and the class a folder names."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.run_files import readable

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


def dir_entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` sorted by name, as ``os.DirEntry`` (their type comes with the listing: no stat
    per file, which on 300k files was seconds); a folder that cannot be listed is an error naming it."""
    try:
        with os.scandir(folder) as found:
            return sorted(found, key=lambda e: e.name)
    except OSError as e:
        raise FinetuneError(
            f"Folder {folder} cannot be read ({e.strerror or type(e).__name__}"
            f"{f', errno {e.errno}' if e.errno else ''}). Make it readable (e.g. chmod -R u+rX) or remove it."
        ) from None


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; a folder that cannot be listed is an error naming it (not "no images")."""
    return [folder / e.name for e in dir_entries(folder)]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlink, like Path.is_dir
    except OSError:
        return False


def list_images(path: Path) -> tuple[list[Path], list[Path]]:
    """Images under ``path`` (recursive, sorted) and the other files found there.

    Symlinked sub-folders are followed (a link back to a folder being scanned is not: it would loop, and
    is logged). A name with an image extension that is not a regular file (a dangling symlink, a FIFO)
    counts as an image, so the data check lists it as a bad file instead of it vanishing from the scan."""
    images: list[Path] = []
    other: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[str]) -> None:
        for entry in dir_entries(folder):
            p = folder / entry.name
            if _is_dir(entry):
                real = os.path.realpath(p)
                if real in ancestors:
                    log.warning("Not following %s: it links back to %s, which is already being scanned.", p, real)
                    continue
                walk(p, ancestors | {real})
            elif not entry.name.startswith("."):
                (images if p.suffix.lower() in IMAGE_EXTENSIONS else other).append(p)

    walk(path, frozenset({os.path.realpath(path)}))
    return images, other  # in path order already: a depth-first walk of name-sorted folders


def absolute_in(folder: Path) -> Callable[[Path], str]:
    """:func:`absolute` for the files of one folder: the folder is resolved once and a file that is not a
    symlink is joined to it (resolving each of 300k files took 15 s)."""
    real = os.path.realpath(folder)

    def resolved(p: Path) -> str:
        if p.parent == folder and not p.is_symlink():
            return os.path.join(real, p.name)
        return absolute(p)

    return resolved


def absolute(p: Path) -> str:
    """Where the file really is (symlinks resolved); a dangling link keeps its own name, which the user can find."""
    return str(p.resolve()) if p.exists() else str(p.absolute())


def find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_ALIASES[split]:
        candidate = root / name
        if candidate.is_dir():
            return candidate
    return None


def _class_dirs(folder: Path, key: str) -> list[Path]:
    found = entries(folder)
    dirs = [p for p in found if p.is_dir() and not p.name.startswith(".")]
    loose = [p for p in found if p not in dirs and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    if dirs and loose:  # nothing the user gave is dropped silently
        log.warning("%d image(s) directly in %s are not in a class sub-folder and are not used: %s%s", len(loose),
                    folder, ", ".join(p.name for p in loose[:5]), " ..." if len(loose) > 5 else "")
    if not dirs:
        loose, _ = list_images(folder)
        hint = (
            f" It holds {len(loose)} images directly: put them into one sub-folder per class "
            f"({folder}/<class>/image.jpg)."
            if loose
            else ""
        )
        raise FinetuneError(
            f"{key}={folder} has no class sub-folders.{hint} Expected {folder}/<class>/*.jpg, "
            f"or {folder}/train/<class>/... (with optional val/ and test/), or a CSV of path,label."
        )
    return dirs


def scan_class_folders(folder: Path, key: str, classes: list[str] | None, ignored: list[str]) -> list[tuple[str, str]]:
    """(path, class name) for every image in ``folder/<class>/``; empty classes are an error."""
    pairs = []
    for class_dir in _class_dirs(folder, key):
        name = class_name(class_dir)
        if classes is not None and name not in classes:
            raise FinetuneError(
                f"Class folder {class_dir} has no counterpart in the training split "
                f"(classes: {', '.join(classes)}). Rename it to a training class or remove it."
            )
        images, other = list_images(class_dir)
        ignored.extend(str(p) for p in other)
        if not images:
            raise FinetuneError(
                f"Class '{class_dir.name}' ({class_dir}) has no images "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}). "
                f"Add images to it or remove the folder."
            )
        resolved = absolute_in(class_dir)
        pairs.extend((resolved(p), name) for p in images)
    return pairs


def class_name(class_dir: Path) -> str:
    """The class a folder names. A name that is not valid UTF-8 (old zip archives) is spelled with
    ``\\xNN`` escapes (b"caf\\xe9" -> 'caf\\xe9'): guessing its encoding could be wrong, and the escaped
    name is plain text for classes.json, checkpoints, plots and predictions, and scans the same each time."""
    name = readable(class_dir.name)
    if name != class_dir.name:
        log.warning("Class folder %s: its name is not valid UTF-8; the class is named '%s' (rename the folder, "
                    "e.g. with convmv, to choose the name).", readable(str(class_dir)), name)
    elif "\\x" in name and any(readable(p.name) == name for p in class_dir.parent.iterdir() if p != class_dir):
        raise FinetuneError(f"Class folders {readable(str(class_dir))} and one whose non-UTF-8 name is spelled the "
                            f"same way both name class '{name}'. Rename one of them.")
    return name

"""Build the few-shot Fashion-MNIST ImageFolder that the demo trains on.

Why this exists: the demo should run on real images laid out exactly as a
user's own data would be (``OUT/{train,test}/<class_name>/<index>.png``,
grayscale PNG files), not on tensors from a dataset class. So we take real
Fashion-MNIST, draw a seeded, stratified few-shot subset (exactly N images
per class) and write it to disk.

Where the data comes from:
  1. the original IDX files installed by Debian's ``dataset-fashion-mnist``
     package (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``), or
  2. if those are missing, ``torchvision.datasets.FashionMNIST(download=True)``.

Only numpy and Pillow are needed; torchvision is imported lazily, for the
fallback only. Reruns with the same seed give the same files; an existing
output folder is removed and rebuilt.

Usage: python scripts/make_demo_data.py [--out DIR] [--train-per-class N]
       [--test-per-class N] [--seed S] [--source-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Label order of the official dataset; names made filesystem-safe.
CLASS_NAMES = [
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
]
SPLIT_FILES = {  # split -> (images, labels) file stems, as published
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET_DATA = (
    "error: could not find the Fashion-MNIST data. Looked for the IDX files "
    "(e.g. train-images-idx3-ubyte.gz) in {source_dir}, then tried to download "
    "them with torchvision ({reason}). On Debian/Ubuntu, install them with "
    "`sudo apt-get install dataset-fashion-mnist` (they land in "
    "/usr/share/datasets/fashion-mnist), or copy the four original IDX files "
    "(gzipped or not) into a folder and pass it with --source-dir, or run this "
    "once where torchvision can reach the internet."
)

Arrays = tuple[np.ndarray, np.ndarray]  # images (n, 28, 28) uint8, labels (n,)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:  # 0x08: unsigned byte data
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_file(source_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (source_dir / name).is_file():
            return source_dir / name
    return None


def load_from_idx(source_dir: Path) -> dict[str, Arrays] | None:
    """Load both splits from IDX files in source_dir; None if any is missing."""
    splits: dict[str, Arrays] = {}
    for split, stems in SPLIT_FILES.items():
        paths = [find_file(source_dir, stem) for stem in stems]
        if None in paths:
            return None
        images, labels = (read_idx(p) for p in paths)  # type: ignore[arg-type]
        splits[split] = (images, labels)
    return splits


def load_from_torchvision(root: Path) -> dict[str, Arrays]:
    """Fallback: download with torchvision (imported only here)."""
    from torchvision.datasets import FashionMNIST

    splits: dict[str, Arrays] = {}
    for split in SPLIT_FILES:
        ds = FashionMNIST(root=str(root), train=(split == "train"), download=True)
        splits[split] = (ds.data.numpy(), ds.targets.numpy())
    return splits


def stratified_draw(
    labels: np.ndarray, per_class: int, rng: np.random.Generator,
    exclude: dict[int, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Exactly per_class indices for each class, sorted, drawn without replacement
    (and never one of ``exclude``'s indices)."""
    picks: dict[int, np.ndarray] = {}
    for label in range(len(CLASS_NAMES)):
        pool = np.flatnonzero(labels == label)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude[label])
        if per_class > len(pool):
            sys.exit(f"error: asked for {per_class} images of class {CLASS_NAMES[label]}, "
                     f"but the set has only {len(pool)}")
        picks[label] = np.sort(rng.choice(pool, size=per_class, replace=False))
    return picks


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, metavar="DIR",
                        default=Path("data/fashion_mnist_fewshot"))
    parser.add_argument("--train-per-class", type=positive_int, default=50, metavar="N",
                        help="images per class, drawn from the official training set")
    parser.add_argument("--val-per-class", type=int, default=10, metavar="N",
                        help="validation images per class, from the official training set, disjoint "
                             "from the training draw (0: none; finetune then carves val out of train)")
    parser.add_argument("--test-per-class", type=positive_int, default=200, metavar="N",
                        help="images per class, drawn from the official test set")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--source-dir", type=Path, metavar="DIR",
                        default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder holding the original IDX files (gzipped or not)")
    args = parser.parse_args()

    splits = load_from_idx(args.source_dir)
    source = str(args.source_dir)
    if splits is None:
        download_root = args.out.parent / "fashion_mnist_download"
        print(f"No Fashion-MNIST IDX files in {args.source_dir}; trying torchvision "
              f"download into {download_root} ...", file=sys.stderr)
        existed = download_root.exists()
        try:
            splits = load_from_torchvision(download_root)
        except Exception as exc:  # noqa: BLE001  (ImportError, network errors, bad checksums, ...)
            if not existed:
                shutil.rmtree(download_root, ignore_errors=True)
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            message = HOW_TO_GET_DATA.format(source_dir=args.source_dir, reason=reason)
            print(message, file=sys.stderr)
            sys.exit(2)
        source = f"torchvision download in {download_root}"

    # Draw first (it can fail on a too-large N), then write. One generator per
    # split, so the test draw does not depend on --train-per-class.
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    picks = {split: stratified_draw(splits[split][1], n, np.random.default_rng([args.seed, i]))
             for i, (split, n) in enumerate(per_class.items())}
    if args.val_per_class > 0:  # the same images as before for train and test, whatever N val is
        picks["val"] = stratified_draw(splits["train"][1], args.val_per_class,
                                       np.random.default_rng([args.seed, 2]), exclude=picks["train"])

    if args.out.exists():
        print(f"Removing existing {args.out} to rebuild it")
        shutil.rmtree(args.out)
    for split, by_class in picks.items():
        images = splits["train" if split == "val" else split][0]
        for label, indices in by_class.items():
            class_dir = args.out / split / CLASS_NAMES[label]
            class_dir.mkdir(parents=True)
            for index in indices:  # file name = index in the official split
                Image.fromarray(images[index]).save(class_dir / f"{index:05d}.png")

    n_train, n_test = (len(CLASS_NAMES) * n for n in per_class.values())
    n_val = len(CLASS_NAMES) * args.val_per_class
    print(f"Wrote {n_train} train + {n_val} val + {n_test} test grayscale PNGs ({len(CLASS_NAMES)} classes, "
          f"{args.train_per_class}/{args.val_per_class}/{args.test_per_class} per class, seed {args.seed}) "
          f"to {args.out} from {source}")


if __name__ == "__main__":
    main()

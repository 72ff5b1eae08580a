"""The benchmark datasets, written once as image folders (``train/``, ``val/``, ``test/``).

- ``fmnist-10``, ``fmnist-50``, ``fmnist-200``, ``fmnist-1000``, ``fmnist-6k``: real Fashion-MNIST
  (``scripts/make_demo_data.py``), 10 / 50 / 200 / 1000 / 5990 (the whole training file less the 10
  validation images) training images per class; the same 10
  validation and 200 test images per class in all four (the test draw does not depend on the training
  size: make_demo_data draws it from the official test file with a fixed seed).
- ``fmnist-longtail``, ``glyphs-longtail``, ``clipart-longtail``: fmnist-200's / glyphs-all's / clipart's training
  images cut to a long tail (200 ... 5 per class: ratio 40), with the source's val / test splits: the imbalance
  benchmark.
- ``fmnist-pairs`` (multi-label): two Fashion-MNIST items side by side, labelled with both classes (labels.csv);
  ``fmnist-pairs-longtail`` the same with long-tailed classes; ``emoji-pairs`` two colour emoji of emoji-objects.
- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, ~180 per class), a very different,
  very small domain; a seeded stratified split into 50% train, 10% validation, 40% test.
- ``stamps``, ``emoji-objects``, ``glyphs``: real pictures from Debian/PyPI packages (Tux Paint's
  colour stamps of everyday things; emoji of 12 object subgroups in three art styles; letters A-J
  from ~140 font families), ``train/`` and ``test/`` only, no ``val/``. Built by
  ``scripts/bench/real_sets.py``, which says where each comes from and what to install.
- ``clipart``: the large colour set (Open Clip Art Library, 12 categories, 2,096 training images; real_sets.py);
  ``clipart-20``: 20 of them per class (seeded), the same test split: the small colour set of that domain.
- ``terrain``: aerial photographs of 11 land covers (FlightGear's terrain textures, 64 px patches, 50 train / 60
  test per class, split by photograph; real_sets.py): natural colour imagery of a domain far from ImageNet's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from real_sets import REAL_SETS
    from real_sets import write as write_real
except ImportError:  # imported as scripts.bench.datasets
    from .real_sets import REAL_SETS
    from .real_sets import write as write_real

REPO = Path(__file__).resolve().parents[2]
FMNIST_SIZES = {"fmnist-10": 10, "fmnist-50": 50, "fmnist-200": 200, "fmnist-1000": 1000, "fmnist-6k": 5990}


def _write_fmnist(out: Path, per_class: int) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(out),
                    "--train-per-class", str(per_class), "--val-per-class", "10", "--test-per-class", "200",
                    "--seed", "0"], check=True, capture_output=True)


def _write_digits(out: Path, seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in np.unique(digits.target):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        n_train, n_val = len(idx) // 2, len(idx) // 10
        for split, part in (("train", idx[:n_train]), ("val", idx[n_train:n_train + n_val]),
                            ("test", idx[n_train + n_val:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")


LONGTAIL_SOURCES = {"fmnist-longtail": "fmnist-200", "glyphs-longtail": "glyphs-all", "clipart-longtail": "clipart"}
LONGTAIL_BY_SIZE = {"clipart-longtail"}  # classes of unequal size: the tail follows their size
SUBSETS = {"clipart-20": ("clipart", 20), "clipart-5": ("clipart", 5)}  # small colour sets of that domain: n per class


def _write_subset(out: Path, source: Path, per_class: int, seed: int = 0) -> None:
    """``per_class`` training images per class drawn (seeded) from ``source``; its test split as it is."""
    import shutil

    rng = np.random.default_rng(seed)
    for folder in sorted((source / "train").iterdir()):
        files = sorted(folder.iterdir())
        (out / "train" / folder.name).mkdir(parents=True, exist_ok=True)
        for i in sorted(rng.permutation(len(files))[:per_class]):
            shutil.copy2(files[i], out / "train" / folder.name / files[i].name)
    shutil.copytree(source / "test", out / "test")


def _write_longtail(out: Path, source: Path, largest: int = 200, smallest: int = 5, by_size: bool = False) -> None:
    """A long tail cut from a set: class k keeps largest x (smallest/largest)^(k/(K-1)) of its training images
    (10 classes: 200, 133, 88, ..., 5; ratio 40), k in folder order, or with ``by_size`` (clipart: 43-280 per
    class) from the largest class down, so each has what it keeps; the source's val / test splits (balanced for
    fmnist and glyphs; clipart's is not: read test/balanced_acc there)."""
    import shutil

    counts = {p.name: len(list(p.iterdir())) for p in (source / "train").iterdir()}
    classes = sorted(counts, key=lambda c: (-counts[c], c)) if by_size else sorted(counts)
    for k, name in enumerate(classes):
        keep = round(largest * (smallest / largest) ** (k / (len(classes) - 1)))
        files = sorted((source / "train" / name).iterdir())[:keep]
        (out / "train" / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, out / "train" / name / f.name)
    for split in ("val", "test"):
        if (source / split).is_dir():
            shutil.copytree(source / split, out / split)


PAIRS_SIZES = {"fmnist-pairs": {"train": 1000, "val": 200, "test": 1000},
               "fmnist-pairs-longtail": {"train": 1000, "val": 200, "test": 700}}  # the test file has 500 per class
# fmnist-pairs-longtail: class k (label order) is drawn with weight (1/20)^(k/9): the commonest class is on ~20x
# as many images as the rarest, in every split (the thresholds are tuned and tested on the same skew).
PAIRS_TAIL = {"fmnist-pairs-longtail": 20.0}


def _write_pairs(out: Path, sizes: dict[str, int], seed: int = 0, tail: float = 1.0) -> None:
    """Multi-label: two real Fashion-MNIST items side by side (56 x 28 px), labelled with both classes; one image
    in four shows a single item beside a blank half (one label). Train draws from the official training file,
    val and test from the test file (disjoint halves). Written as out/images/*.png and out/labels.csv
    (path,labels,split; labels like Bag;Sneaker). The folder has a test/ marker so build() reuses it."""
    sys.path.insert(0, str(REPO / "scripts"))
    import csv

    from make_demo_data import CLASS_NAMES as CLASSES
    from make_demo_data import load_from_idx

    data = load_from_idx(Path("/usr/share/datasets/fashion-mnist"))
    if data is None:
        raise SystemExit("fmnist-pairs needs Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)")
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    test_pool = rng.permutation(len(data["test"][1]))
    pools = {"train": rng.permutation(len(data["train"][1])), "val": test_pool[: len(test_pool) // 2],
             "test": test_pool[len(test_pool) // 2:]}
    rows = []
    for split, n in sizes.items():
        images, labels = data["train" if split == "train" else "test"]
        pool = pools[split]
        if tail > 1:  # items drawn class by class, the classes by their long-tail weight
            weights = np.array([(1 / tail) ** (k / 9) for k in range(10)])
            by_class = {k: [j for j in pool if labels[j] == k] for k in range(10)}
            drawn = rng.choice(10, size=2 * n, p=weights / weights.sum())
            pool = np.array([by_class[k].pop() for k in drawn])
        for i in range(n):
            a, b = pool[2 * i], pool[2 * i + 1]
            single = rng.random() < 0.25 or labels[a] == labels[b]
            right = np.zeros_like(images[b]) if single else images[b]
            name = f"images/{split}_{i:05d}.png"
            Image.fromarray(np.hstack([images[a], right])).save(out / name)
            names = sorted({CLASSES[labels[a]]} | (set() if single else {CLASSES[labels[b]]}))
            rows.append([name, ";".join(names), split])
    with (out / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "labels", "split"], *rows])
    (out / "test").mkdir()


# Multi-label in colour: two emoji of emoji-objects side by side (144 x 72 px), items drawn with replacement (the set
# is small); train and val from disjoint 80/20 parts of its training emoji, test from its test emoji.
COLOUR_PAIRS = {"emoji-pairs": ("emoji-objects", {"train": 800, "val": 200, "test": 500})}


def _write_colour_pairs(out: Path, source: Path, sizes: dict[str, int], seed: int = 0) -> None:
    import csv

    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (source / "train").iterdir())
    items = {split: [(f, c) for c in classes for f in sorted((source / split / c).iterdir())]
             for split in ("train", "test")}
    order = rng.permutation(len(items["train"]))
    cut = int(0.8 * len(order))
    pools = {"train": [items["train"][i] for i in order[:cut]], "val": [items["train"][i] for i in order[cut:]],
             "test": items["test"]}
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in sizes.items():
        pool = pools[split]
        for i in range(n):
            (fa, ca), (fb, cb) = (pool[j] for j in rng.integers(0, len(pool), 2))
            a = np.asarray(Image.open(fa).convert("RGB").resize((72, 72)))
            single = rng.random() < 0.25 or ca == cb
            b = np.full_like(a, 255) if single else np.asarray(Image.open(fb).convert("RGB").resize((72, 72)))
            name = f"images/{split}_{i:05d}.png"
            Image.fromarray(np.hstack([a, b])).save(out / name)
            rows.append([name, ";".join(sorted({ca} | (set() if single else {cb}))), split])
    with (out / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "labels", "split"], *rows])
    (out / "test").mkdir()


def build(root: Path, names: list[str]) -> dict[str, Path]:
    """Write the named sets under ``root`` (reusing complete ones) and return name -> folder."""
    folders = {}
    for name in names:
        out = root / name
        if not (out / "test").is_dir():
            if name in FMNIST_SIZES:
                _write_fmnist(out, FMNIST_SIZES[name])
            elif name == "digits":
                _write_digits(out)
            elif name in LONGTAIL_SOURCES:
                source = LONGTAIL_SOURCES[name]
                _write_longtail(out, build(root, [source])[source], by_size=name in LONGTAIL_BY_SIZE)
            elif name in SUBSETS:
                source, per_class = SUBSETS[name]
                _write_subset(out, build(root, [source])[source], per_class)
            elif name in REAL_SETS:
                write_real(name, out)
            elif name in COLOUR_PAIRS:
                source, sizes = COLOUR_PAIRS[name]
                _write_colour_pairs(out, build(root, [source])[source], sizes)
            elif name in PAIRS_SIZES:
                _write_pairs(out, PAIRS_SIZES[name], tail=PAIRS_TAIL.get(name, 1.0))
            else:
                known = [*FMNIST_SIZES, *LONGTAIL_SOURCES, *SUBSETS, "digits", *REAL_SETS, *PAIRS_SIZES, *COLOUR_PAIRS]
                raise SystemExit(f"unknown benchmark dataset {name!r}: choose from {known}")
        folders[name] = out
    return folders


def train_images(folder: Path) -> int:
    return sum(1 for p in (folder / "train").rglob("*") if p.is_file())

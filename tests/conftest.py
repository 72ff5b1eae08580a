"""Shared fixtures: tiny real image folders generated on the fly, and composed configs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

CLASSES = ("circle", "square", "stripes")


BIN = Path(sys.prefix) / "bin"


def run_cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())  # undo the CLI's line wrapping
    for text in expected:
        assert text in message, (text, message)
    return message


def draw(kind: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A small RGB image whose class is visible: a disc, a square, or horizontal stripes."""
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    color = rng.integers(150, 256, size=3, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2 + rng.integers(-3, 4, size=2)
    if kind == "circle":
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size // 3) ** 2
    elif kind == "square":
        r = size // 3
        mask = (abs(yy - c[0]) < r) & (abs(xx - c[1]) < r)
    else:
        mask = (yy // 4) % 2 == 0
    img[mask] = color
    return img


def write_images(folder: Path, kind: str, n: int, seed: int, ext: str = "png") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{kind}_{seed}_{i}.{ext}"
        Image.fromarray(draw(kind, rng)).save(p)
        paths.append(p)
    return paths


def image_folders(root: Path, per_class: int) -> Path:
    """root/<class>/*.png with ``per_class`` images of each of CLASSES (seeded by class)."""
    for i, kind in enumerate(CLASSES):
        write_images(root / kind, kind, per_class, seed=i)
    return root


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """root/<class>/*.png, 12 images per class."""
    root = tmp_path / "images"
    for i, kind in enumerate(CLASSES):
        write_images(root / kind, kind, 12, seed=i)
    return root


@pytest.fixture
def split_folders(tmp_path: Path) -> Path:
    """root/train|val|test/<class>/*.png."""
    root = tmp_path / "splits"
    for s, (split, n) in enumerate((("train", 10), ("val", 4), ("test", 4))):
        for i, kind in enumerate(CLASSES):
            write_images(root / split / kind, kind, n, seed=100 * s + i)
    return root


def make_cfg(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose the real config tree with overrides, as the CLI would (no Hydra run dir)."""
    with initialize_config_module(config_module="finetune.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


# Small and fast: real Lite0 weights, 32 px input, CPU, no progress bar spam.
FAST = [
    "data.image_size=32",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "recipe=off",  # the fixed recipe these tests check; tests/test_recipe_auto.py checks recipe=auto
]


@pytest.fixture
def fast_cfg(tmp_path: Path):
    def _make(root: Path | str, *extra: str, run_dir: Path | None = None):
        run = run_dir or tmp_path / "run"
        return make_cfg([f"data.root={root}", f"run_dir={run}", *FAST, *extra])

    return _make


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """A CSV data set (or a broken one) with exactly these rows."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


FAST_64 = [o for o in FAST if not o.startswith(("data.image_size", "trainer.max_epochs"))] + ["data.image_size=64"]


def digit_folders(root: Path, per_split: int = 30, splits: tuple[str, ...] = ("train", "val", "test"),
                  classes: range = range(10)) -> Path:
    """Real scikit-learn digits (8x8 scans) as split folders, ``per_split`` images per class in each split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        idx = np.flatnonzero(d.target == c)
        for k, split in enumerate(splits):
            part = idx[k * per_split:(k + 1) * per_split]
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(root / split / str(c) / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> dict[str, Path]:
    """One real fit shared by the after-training tests (calibration, open set): digits 0-7 with train/val/test
    splits of 30 per class, and the digits 8 and 9 (never trained on) under ``unknown``."""
    base = tmp_path_factory.mktemp("digits_run")
    root = digit_folders(base / "digits", classes=range(8))
    unknown = digit_folders(base / "unknown", splits=("all",), classes=range(8, 10)) / "all"
    run = base / "run"
    from finetune.train import train  # in this process: the tests that use it run the CLIs

    train(make_cfg([f"data.root={root}", f"run_dir={run}", "policy=partial", *FAST_64, "trainer.max_epochs=4",
                    "augment=none"]))
    return {"root": root, "unknown": unknown, "run": run}


def digit_pairs_csv(root: Path, per_split: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A real multi-label set: scikit-learn digits side by side (8 x 16 px), labelled with both digits; one image
    in four shows a single digit beside a blank. ``root``/labels.csv has path,labels,split (labels like 3;7)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    images = (d.images * 255 / 16).astype(np.uint8)
    per_split = per_split or {"train": 160, "val": 60, "test": 80}
    order = rng.permutation(len(images))
    cut = np.cumsum([0, *(2 * n for n in per_split.values())])
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    for (split, n), start in zip(per_split.items(), cut):
        pool = order[start:start + 2 * n]  # each split draws its digits from its own scans
        for i in range(n):
            a, b = pool[2 * i], pool[2 * i + 1]
            single = rng.random() < 0.25 or d.target[a] == d.target[b]
            right = np.zeros_like(images[b]) if single else images[b]
            name = f"{split}_{i}.png"
            Image.fromarray(np.hstack([images[a], right])).save(root / name)
            labels = {int(d.target[a])} if single else {int(d.target[a]), int(d.target[b])}
            rows.append([name, ";".join(str(c) for c in sorted(labels)), split])
    return write_csv(root / "labels.csv", ["path", "labels", "split"], rows)

"""Run `advise` (measure + decide, no training) on several offline datasets of different size,
domain and shape, to see where the policy thresholds fall.

    .venv/bin/python scripts/bench/advise_sets.py [--out advise_sets.json]

Sets (all built here from packages, no downloads):
- fmnist-10/50/200: Fashion-MNIST few-shot draws (Debian's dataset-fashion-mnist), 28 px grayscale;
- digits: scikit-learn's 8x8 handwritten digits (~180 per class), a very different domain;
- photo-crops: random crops of five natural colour photos from scikit-image (astronaut, cat,
  coffee, rocket, motorcycle), one class per photo: ImageNet's own domain;
- textures: random crops of five grayscale textures/scenes from scikit-image (brick, grass, gravel,
  moon, camera).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module
from PIL import Image

from finetune.advice import advise

REPO = Path(__file__).resolve().parents[2]


def write_crops(root: Path, photos: dict[str, np.ndarray], per_class: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, img in photos.items():
        folder = root / name
        folder.mkdir(parents=True)
        h, w = img.shape[:2]
        for i in range(per_class):
            side = int(min(h, w) * rng.uniform(0.3, 0.6))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
            crop.save(folder / f"{i:03d}.png")


def build_sets(tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    import skimage.data as sk
    from sklearn.datasets import load_digits

    sets: dict[str, tuple[Path, list[str]]] = {}
    for n in (10, 50, 200):
        out = tmp / f"fmnist{n}"
        subprocess.run([sys.executable, str(REPO / "scripts/make_demo_data.py"), "--out", str(out),
                        "--train-per-class", str(n), "--test-per-class", "1"], check=True, capture_output=True)
        sets[f"fmnist-{n}"] = (out, ["data.image_size=64"])
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        folder = tmp / "digits" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    sets["digits"] = (tmp / "digits", ["data.image_size=64"])
    photos = {"astronaut": sk.astronaut(), "cat": sk.chelsea(), "coffee": sk.coffee(), "rocket": sk.rocket(),
              "motorcycle": sk.stereo_motorcycle()[0]}
    write_crops(tmp / "photos", photos, 40, 96, seed=0)
    sets["photo-crops"] = (tmp / "photos", ["data.image_size=96"])
    textures = {"brick": sk.brick(), "grass": sk.grass(), "gravel": sk.gravel(), "moon": sk.moon(),
                "camera": sk.camera()}
    write_crops(tmp / "textures", textures, 40, 96, seed=1)
    sets["textures"] = (tmp / "textures", ["data.image_size=96"])
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="advise_sets.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (root, extra) in build_sets(Path(tmp)).items():
            with initialize_config_module("finetune.conf", version_base="1.3"):
                cfg = compose("train", overrides=[f"data.root={root}", *extra])
            record = advise(cfg)
            results[name] = record
            Path(args.out).write_text(json.dumps(results, indent=2))
    print("\n| set | img/class | stage probes (shallow->deep) | pre-logits | gap | head max-prob | cell | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        m = r["measurements"]
        stages = " / ".join(f"{a:.2f}" for a in m["stage_probe_acc"])
        head = m["head_confidence"]["mean_max_prob"] if m["head_confidence"] else float("nan")
        print(f"| {name} | {m['images_per_class']['median']:g} | {stages} | {m['prelogits_probe_acc']:.3f} | "
              f"{m['depth_gap']:.3f} | {head:.2f} | {r['quadrant']} | {m['seconds']} |")


if __name__ == "__main__":
    main()

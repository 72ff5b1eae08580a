"""Images/s of the `medium` augmentation: finetune's albumentations pipeline against
torchvision.transforms.v2 doing the same operations on the same files.

    .venv/bin/python scripts/bench/loader.py [--size 224] [--images 200] [--rounds 3]

Files: JPEGs cut from scikit-image's sample photos (real photos, 320-512 px), written to a temp dir.
Each library decodes the file its usual way (finetune's load_image for albumentations: PIL, JPEGs
decoded at a reduced DCT scale when larger than twice the resize size, as training does;
torchvision.io for v2) and runs: random resized crop -> horizontal flip -> colour jitter (p 0.8) -> affine (p 0.5) ->
normalize -> CHW float tensor. One thread each (a DataLoader worker's view), the two measured in
alternating rounds in the same run; also "transform only" on images decoded beforehand (what
finetune's in-memory preload does). Prints a markdown table with the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from finetune.data.datamodule import decode_side
from finetune.data.images import load_image
from finetune.data.transforms import Preprocessing, train_transform

CONF = Path(__file__).resolve().parents[2] / "finetune" / "conf" / "augment" / "medium.yaml"


def make_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from skimage import data

    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                                                 "immunohistochemistry", "retina", "colorwheel")]
    photos = [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)][..., :3]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(min(h, 320), h + 1)), int(rng.integers(min(w, 320), w + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(np.ascontiguousarray(photo[y:y + ch, x:x + cw])).save(path, quality=90)
        paths.append(path)
    return paths


def torchvision_medium(size: int, augment: dict, pp: Preprocessing):
    from torchvision.transforms import v2

    (flip,), (jitter,), (affine,) = (list(t.values()) for t in augment["transforms"])
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=tuple(augment["scale"]), ratio=tuple(augment["ratio"]), antialias=True),
        v2.RandomHorizontalFlip(p=flip["p"]),
        v2.RandomApply([v2.ColorJitter(brightness=jitter["brightness"], contrast=jitter["contrast"],
                                       saturation=jitter["saturation"], hue=jitter["hue"])], p=jitter["p"]),
        v2.RandomApply([v2.RandomAffine(degrees=affine["rotate"][1], translate=(affine["translate_percent"][1],) * 2,
                                        scale=tuple(affine["scale"]), shear=affine["shear"][1])], p=affine["p"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(pp.mean), std=list(pp.std)),
    ])


def measure(size: int, images: int, rounds: int, log=print) -> dict:
    """Median images/s of each library and mode over ``rounds`` alternating rounds (one thread; the
    caller's thread counts are restored afterwards)."""
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        return _measure(size, images, rounds, log)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)


def _measure(size: int, images: int, rounds: int, log) -> dict:
    from torchvision.io import ImageReadMode, decode_image

    augment = OmegaConf.to_container(OmegaConf.load(CONF))
    pp = Preprocessing(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)
    album = train_transform(pp, augment)
    tv = torchvision_medium(size, augment, pp)
    side = decode_side(pp)  # what finetune decodes to: twice the resize size at most
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_files(Path(tmp), images)
        arrays = [load_image(str(p)) for p in paths]
        tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
        runs = {
            ("albumentations", "decode + transform"): lambda: [
                album(image=load_image(str(p), side))["image"] for p in paths
            ],
            ("torchvision v2", "decode + transform"): lambda: [
                tv(decode_image(str(p), mode=ImageReadMode.RGB)) for p in paths
            ],
            ("albumentations", "transform only"): lambda: [album(image=a)["image"] for a in arrays],
            ("torchvision v2", "transform only"): lambda: [tv(t) for t in tensors],
        }
        for fn in runs.values():  # warm-up, and a shape check: both give the same tensor layout
            out = fn()[:1][0]
            assert out.shape == (3, size, size) and out.dtype == torch.float32
        rates: dict = {k: [] for k in runs}
        for _ in range(rounds):
            for key, fn in runs.items():
                started = time.perf_counter()
                fn()
                rates[key].append(len(paths) / (time.perf_counter() - started))
    rows = []
    for mode in ("decode + transform", "transform only"):
        a, t = (float(np.median(rates[(lib, mode)])) for lib in ("albumentations", "torchvision v2"))
        rows.append({"size": size, "mode": mode, "albumentations": round(a), "torchvision_v2": round(t),
                     "ratio": round(a / t, 2)})
        log(f"loader {size} px, {mode}: albumentations {a:.0f} img/s, torchvision v2 {t:.0f} img/s, ratio {a / t:.2f}")
    return {"images": images, "rounds": rounds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.size, args.images, args.rounds, log=lambda *_: None)
    print(f"\n{args.images} JPEGs (320-512 px photos), output {args.size} px, 1 thread, "
          f"median of {args.rounds} rounds\n")
    print("| mode | albumentations img/s | torchvision v2 img/s | ratio (albumentations / v2) |\n|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['mode']} | {row['albumentations']} | {row['torchvision_v2']} | {row['ratio']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

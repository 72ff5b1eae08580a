"""Seconds per training epoch of a full fine-tune through `finetune` against a minimal plain PyTorch
loop doing the same work, as a ratio measured in the same run.

    .venv/bin/python scripts/bench/overhead.py --root data/bench/fmnist-200 [--rounds 2]

Same input (64 px, the accuracy benchmark's size), same model (tf_efficientnet_lite0 with the bundled \
ImageNet weights, a new 10-class head, all of it
trained), same data (the training split decoded in memory, as finetune's preload does), same batch
(32, shuffled, last partial batch dropped), same optimizer (AdamW lr 1e-3, weight decay 0.01) and the
same augmentation (the `light` preset's albumentations pipeline, finetune's default). finetune runs
with its defaults otherwise (policy=full; plateau scheduler; metrics, logging, checkpoints and
callbacks on). Each side trains 3 epochs and the 2nd and 3rd are timed (the 1st warms up kernels and
caches); the two alternate for `--rounds` rounds. The ratio compares the fastest epoch of each side
(on a shared machine, interference only ever adds time: the minimum is the least disturbed reading);
the medians are reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing

BATCH, LR, WEIGHT_DECAY, EPOCHS, SIZE = 32, 1e-3, 0.01, 3, 64


def finetune_epochs(root: str, seed: int) -> list[float]:
    from hydra import compose, initialize_config_module

    from finetune.train import train

    timing.EPOCH_SECONDS.clear()
    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("finetune.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.root={root}", f"seed={seed}", "policy=full", f"trainer.max_epochs={EPOCHS}",
            f"data.batch_size={BATCH}", f"data.image_size={SIZE}", f"optimizer.lr={LR}",
            f"optimizer.weight_decay={WEIGHT_DECAY}",
            "report=false", "+callbacks.epoch_timer._target_=timing.EpochTimer", f"run_dir={tmp}"])
        train(cfg)
    return timing.EPOCH_SECONDS[1:]


class _Decoded(Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(image=self.images[i])["image"], self.labels[i]


def plain_epochs(root: str, seed: int) -> list[float]:
    """The same work as a plain loop: timm model, DataLoader, AdamW, cross-entropy."""
    from omegaconf import OmegaConf

    from finetune.data.datamodule import decode_all, decode_side
    from finetune.data.transforms import resolve_preprocessing, train_transform
    from finetune.models.backbone import load_pretrained

    torch.manual_seed(seed)
    classes = sorted(p.name for p in (Path(root) / "train").iterdir() if p.is_dir())
    files = [(str(f), c) for c, name in enumerate(classes) for f in sorted((Path(root) / "train" / name).iterdir())]
    model, _, _ = load_pretrained("tf_efficientnet_lite0", "auto")
    model.reset_classifier(len(classes))
    pp = resolve_preprocessing(model, {"image_size": SIZE})
    light = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).resolve().parents[2] / "finetune/conf/augment/light.yaml")
    )
    images = decode_all([f for f, _ in files], decode_side(pp), float("inf"))
    loader = DataLoader(_Decoded(images, [c for _, c in files], train_transform(pp, light, seed)),
                        batch_size=BATCH, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model.train()
    seconds = []
    for _ in range(EPOCHS):
        started = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def measure(root: str, rounds: int, log=print) -> dict:
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("finetune").setLevel(logging.WARNING)
    n_train = sum(1 for p in (Path(root) / "train").rglob("*") if p.is_file())
    ft, plain = [], []
    for r in range(rounds):
        ft += finetune_epochs(root, r)
        plain += plain_epochs(root, r)
        log(f"overhead round {r + 1}: finetune {min(ft):.2f} s/epoch, "
            f"plain loop {min(plain):.2f} s/epoch (fastest so far)")
    f, p = min(ft), min(plain)
    return {"root": root, "train_images": n_train, "batch": BATCH, "image_size": SIZE, "rounds": rounds,
            "threads": torch.get_num_threads(),
            "finetune_s": [round(t, 2) for t in ft], "plain_s": [round(t, 2) for t in plain],
            "finetune_min_s": round(f, 2), "plain_min_s": round(p, 2), "ratio": round(f / p, 3),
            "median_ratio": round(statistics.median(ft) / statistics.median(plain), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(args.root, args.rounds)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())

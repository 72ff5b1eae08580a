"""A 10-epoch linear probe with and without the feature cache, as a ratio of fit seconds.

    .venv/bin/python scripts/bench/feature_cache.py --root data/bench/fmnist-200

Both train only the new head with the same optimizer (AdamW, mini-batches of 32, 10 epochs, early
stopping off) at 64 px with no augmentation. Without the cache every epoch runs the frozen network
over the training and validation images; with it (`policy.cache=auto`, the default) the network runs
once and the epochs train on stored features. Fit seconds include the caching pass. Also timed: the
default cached probe, which fits the head with full-batch L-BFGS instead of 10 AdamW epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "no cache": ["policy.cache=false", "policy.head_solver=optimizer"],
    "cache": ["policy.head_solver=optimizer"],
    "cache, L-BFGS head (default)": [],
}


def run(root: str, extra: list[str], epochs: int) -> dict:
    from hydra import compose, initialize_config_module

    from finetune.train import train

    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("finetune.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.root={root}", "policy=linear_probe", "augment=none", "data.image_size=64", "report=false",
            f"trainer.max_epochs={epochs}", "~callbacks.early_stopping", "trainer.enable_progress_bar=false",
            *extra, f"run_dir={tmp}"])
        started = time.perf_counter()
        metrics = train(cfg)
        wall = time.perf_counter() - started
    return {"fit_s": metrics["fit_seconds"], "wall_s": round(wall, 2), "epochs": metrics["epochs"],
            "test_acc": metrics.get("test/acc")}


def measure(root: str, epochs: int = 10, log=print) -> dict:
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("finetune").setLevel(logging.WARNING)
    rows = {}
    for name, extra in VARIANTS.items():
        rows[name] = run(root, extra, epochs)
        log(f"feature cache: {name}: fit {rows[name]['fit_s']} s, test acc {rows[name]['test_acc']:.4f}")
    n_train = sum(1 for p in (Path(root) / "train").rglob("*") if p.is_file())
    return {"root": root, "train_images": n_train, "epochs": epochs, "variants": rows,
            "ratio": round(rows["no cache"]["fit_s"] / rows["cache"]["fit_s"], 2),
            "ratio_lbfgs": round(rows["no cache"]["fit_s"] / rows["cache, L-BFGS head (default)"]["fit_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(measure(args.root, args.epochs), indent=2))


if __name__ == "__main__":
    sys.exit(main())

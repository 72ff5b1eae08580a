"""Test accuracy and wall time of every policy, `auto` and training from scratch, per dataset and seed.

    .venv/bin/python scripts/bench/accuracy.py --sets fmnist-10 fmnist-50 fmnist-200 digits \
        --seeds 0 1 2 --out bench_results/accuracy.json

Each run is a real `train(cfg)` (policy measurement, feature caching and test evaluation included),
with the policy issue's demo recipe: 64 px input, AdamW 1e-3 with one-cycle, no augmentation, batch 32.
The training budget is the same for every policy of a row: `epochs = min(10, images_seen // n_train)`
epochs (10 on the few-shot sets; fewer where the training split is large, to keep the full benchmark
within its time). lp_ft probes for 30% of those epochs. Runs go through a pool of `--workers` processes
with `cores // workers` threads each (two one-thread runs at a time train ~1.4x more images per
second on 2 cores than one two-thread run); the wall times are those of such a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets

# Row label -> overrides. `scratch` is a full fine-tune from random weights with the same budget.
POLICIES = {
    "auto": ["policy=auto"],
    "linear_probe": ["policy=linear_probe"],
    "stage_probe": ["policy=stage_probe"],
    "partial": ["policy=partial"],
    "full": ["policy=full"],
    "lp_ft": ["policy=lp_ft"],
    "gradual": ["policy=gradual"],
    "scratch": ["policy=full", "model.weights=none"],
}
RECIPE = ["data.image_size=64", "scheduler=onecycle", "augment=none", "report=false",
          "model.channels_last=true", "trainer.enable_progress_bar=false"]
# Relative cost of a run (for scheduling the longest first), roughly: trained fraction of the network.
COST = {"linear_probe": 0.1, "stage_probe": 0.6, "auto": 0.8}


def epochs_for(n_train: int, images_seen: int, max_epochs: int = 10) -> int:
    return max(1, min(max_epochs, images_seen // n_train))


def _init_worker(threads: int) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("finetune").setLevel(logging.WARNING)


def timed_train(overrides: list[str]) -> tuple[dict, dict, float]:
    """One real train(cfg) in a temporary run folder: its metrics, its policy.json and the wall seconds."""
    from hydra import compose, initialize_config_module

    from finetune.train import train

    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("finetune.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"run_dir={tmp}"])
        started = time.perf_counter()
        metrics = train(cfg)
        wall = time.perf_counter() - started
        return metrics, json.loads((Path(tmp) / "policy.json").read_text()), wall


def run_one(root: str, row: str, policy: str, seed: int, epochs: int, extra: tuple[str, ...] = ()) -> dict:
    overrides = [f"data.root={root}", f"seed={seed}", f"trainer.max_epochs={epochs}",
                 *RECIPE, *POLICIES[policy], *extra]
    if policy == "lp_ft":
        overrides.append(f"policy.probe_epochs={max(1, round(0.3 * epochs))}")
    metrics, record, wall = timed_train(overrides)
    return {"set": row, "policy": policy, "seed": seed, "epochs": epochs, "test_acc": metrics.get("test/acc"),
            "val_acc": metrics.get("val/acc"), "wall_s": round(wall, 1), "applied": record["policy_applied"],
            "quadrant": record.get("quadrant"), "trainable": record["parameters"]["trainable"]}


def run_all(sets: list[str], seeds: list[int], policies: list[str], images_seen: int, workers: int,
            data_root: Path, out: Path | None = None, log=print, extra: tuple[str, ...] = ()) -> dict:
    folders = datasets.build(data_root, sets)
    jobs, sizes = [], {}
    for row, folder in folders.items():
        n_train = sizes[row] = datasets.train_images(folder)
        epochs = epochs_for(n_train, images_seen)
        for policy in policies:
            for seed in seeds:
                jobs.append((str(folder), row, policy, seed, epochs, n_train * epochs * COST.get(policy, 1.0)))
    jobs.sort(key=lambda j: -j[-1])  # longest first: the pool ends with short runs, not one long one
    threads = max(1, (os.cpu_count() or 1) // workers)
    results, started = [], time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(run_one, *job[:-1], extra) for job in jobs]
        for future in as_completed(futures):
            results.append(future.result())
            r = results[-1]
            log(f"[{len(results)}/{len(jobs)} {time.perf_counter() - started:.0f}s] {r['set']} {r['policy']} "
                f"seed {r['seed']}: test acc {r['test_acc']:.4f} ({r['applied']}, {r['wall_s']} s)")
    report = {"sets": sets, "seeds": seeds, "policies": policies, "images_seen": images_seen, "workers": workers,
              "threads_per_worker": threads, "recipe": [*RECIPE, *extra],
              "total_s": round(time.perf_counter() - started, 1),
              "train_images": sizes, "runs": results}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["fmnist-10", "fmnist-50", "fmnist-200", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--images-seen", type=int, default=4000, help="training budget per run (images)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=datasets.REPO / "data" / "bench")
    parser.add_argument("--out", type=Path, default=Path("bench_results/accuracy.json"))
    args, extra = parser.parse_known_args()  # anything else: Hydra overrides for every run
    run_all(args.sets, args.seeds, args.policies, args.images_seen, args.workers, args.data, args.out,
            extra=tuple(e for e in extra if e != "--"))


if __name__ == "__main__":
    sys.exit(main())

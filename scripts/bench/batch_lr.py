"""Larger batches and the LR rule: zero-config at batch 32 against the batch data.batch_size=auto gives a GPU, under
each lr_scaling rule, on sets large enough for auto to leave 32 (it keeps at least 16 steps per epoch).

    .venv/bin/python scripts/bench/batch_lr.py [--sets fmnist-1000 glyphs-all] [--seeds 0] [--out batch_lr.json]
        [--rules none sqrt linear] [--batches 64 128] [--no-baseline]

Why on a CPU: what a batch and an LR do to accuracy does not depend on the device, and data.batch_size=auto's
choice on a GPU is reproduced here by giving it (the batch) and lr_reference_batch=32 (what auto sets). Everything
else is zero-config (recipe=auto on the CPU: its size, length and LR). One run at a time; test accuracy and the
training time per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "bench"
MIN_STEPS_PER_EPOCH = 16  # finetune.batch_size's rule


def auto_batch_on_a_big_gpu(n_train: int) -> int:
    """The batch auto picks when memory is no limit: a power of two, >= 32, with >= 16 steps per epoch, <= 1024."""
    batch = 1 << max(0, int(n_train / MIN_STEPS_PER_EPOCH).bit_length() - 1)
    return min(1024, max(32, batch))


def run(root: Path, seed: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "finetune", f"data.root={root}", f"run_dir={tmp}/run",
                                 f"seed={seed}", "report=false", "trainer.enable_progress_bar=false", *overrides],
                                capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            return {"error": result.stderr[-1500:], "wall_s": round(wall, 1)}
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        recipe = json.loads((Path(tmp) / "run" / "recipe.json").read_text())
    lr = next((c["value"] for c in recipe["choices"] if c["key"] == "optimizer.lr"), None)
    return {"test_acc": metrics.get("test/acc"), "val_acc": metrics.get("val/acc"), "epochs": metrics.get("epochs"),
            "fit_s": metrics.get("fit_seconds"), "wall_s": round(wall, 1), "recipe_lr": lr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["fmnist-1000", "glyphs-all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rules", nargs="+", default=["none", "sqrt", "linear"])
    parser.add_argument("--batches", nargs="+", type=int, help="these batches instead of the one auto would pick")
    parser.add_argument("--no-baseline", action="store_true", help="leave out the batch-32 run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name in args.sets:
        root = DATA / name
        n_train = sum(1 for p in (root / "train").rglob("*") if p.is_file()) if (root / "train").is_dir() else None
        held_out = 0.0 if (root / "val").is_dir() else 0.2  # data.val_fraction carves a val split otherwise
        big = auto_batch_on_a_big_gpu(int((1 - held_out) * n_train) if n_train else 0)
        cells = [] if args.no_baseline else [("32", [])]
        cells += [(f"{b}, lr_scaling={rule}", [f"data.batch_size={b}", "lr_reference_batch=32", f"lr_scaling={rule}"])
                  for b in (args.batches or [big]) for rule in args.rules]
        for seed in args.seeds:
            for label, overrides in cells:
                row = {"set": name, "seed": seed, "batch": label, **run(root, seed, overrides)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    print("\n| set | batch | seeds | test acc (per seed) | fit s |\n|---|---|---|---|---|")
    for name in args.sets:
        for label in dict.fromkeys(r["batch"] for r in rows if r["set"] == name):
            done = [r for r in rows if r["set"] == name and r["batch"] == label]
            accs = [r.get("test_acc") for r in done]
            shown = " / ".join("failed" if a is None else f"{a:.4f}" for a in accs)
            ok = [a for a in accs if a is not None]
            mean = f"{sum(ok) / len(ok):.4f} ({shown})" if ok else shown
            fit = "/".join(f"{r.get('fit_s', 0):.0f}" for r in done)
            print(f"| {name} | {label} | {len(done)} | {mean} | {fit} |")


if __name__ == "__main__":
    main()

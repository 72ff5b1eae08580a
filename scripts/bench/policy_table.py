"""Test accuracy and wall time of every policy on one dataset, over several seeds.

    .venv/bin/python scripts/bench/policy_table.py --root data/fashion_mnist_fewshot --seeds 0 1 2 \
        --out bench_policy.json [-- extra overrides]

Each run is a real `train(cfg)` (measurement, caching and evaluation included); the wall time is
measured around the whole call. Prints a markdown table (mean +- std over seeds) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import timed_train

# Row label -> overrides. stage_probe fine-tunes the kept stages by default; its frozen variant is a
# pure linear probe on the best earlier stage (the CS231n "little + different" cell taken literally).
POLICIES = {
    "auto": ["policy=auto"],
    "linear_probe": ["policy=linear_probe"],
    "stage_probe": ["policy=stage_probe"],
    "stage_probe_frozen": ["policy=stage_probe", "policy.train_stages=false"],
    "partial": ["policy=partial"],
    "full": ["policy=full"],
    "lp_ft": ["policy=lp_ft"],
    "gradual": ["policy=gradual"],
    "scratch": ["policy=full", "model.weights=none"],
}


def run(root: str, policy: str, seed: int, extra: list[str]) -> dict:
    overrides = [f"data.root={root}", f"seed={seed}", "trainer.enable_progress_bar=false", *POLICIES[policy], *extra]
    metrics, record, wall = timed_train(overrides)
    return {"policy": policy, "seed": seed, "test_acc": metrics.get("test/acc"), "val_acc": metrics.get("val/acc"),
            "wall_s": round(wall, 1), "applied": record["policy_applied"], "quadrant": record["quadrant"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--out", default="bench_policy.json")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    results = []
    for policy in args.policies:
        for seed in args.seeds:
            r = run(args.root, policy, seed, extra)
            results.append(r)
            print(json.dumps(r), flush=True)
            Path(args.out).write_text(json.dumps({"root": args.root, "extra": extra, "runs": results}, indent=2))
    print(f"\n| policy | applied | test acc (mean +- std, n={len(args.seeds)}) | wall s (mean) |")
    print("|---|---|---|---|")
    for policy in args.policies:
        rows = [r for r in results if r["policy"] == policy]
        accs = [r["test_acc"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        applied = ",".join(sorted({r["applied"] for r in rows}))
        print(f"| {policy} | {applied} | {statistics.mean(accs):.4f} +- {std:.4f} | "
              f"{statistics.mean(r['wall_s'] for r in rows):.1f} |")


if __name__ == "__main__":
    sys.exit(main())

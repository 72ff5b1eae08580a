"""Expected calibration error before and after temperature scaling, on zero-config runs (issue 15, part 4).

    .venv/bin/python scripts/bench/calibration.py [--sets fmnist-50 fmnist-longtail digits] [--seeds 0 1 2]

Each run is `finetune data.root=SET` with nothing else (recipe=auto, calibrate=auto); the temperature is fitted
on the set's validation split after training and the ECE (15 confidence bins) and NLL are reported before and
after on val and on the test split, which the fit never saw. Prints one JSON line per run and a mean per set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import datasets
import sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["fmnist-50", "fmnist-longtail", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="rewrite the calibration table in BENCHMARKS.md")
    args = parser.parse_args()
    accuracy._init_worker(args.threads)
    folders = datasets.build(datasets.REPO / "data" / "bench", args.sets)
    lines = ["| set | test acc | T (per seed) | test ECE before | test ECE after | test NLL before | test NLL after |",
             "|---|---|---|---|---|---|---|"]
    for name in args.sets:
        rows = []
        for seed in args.seeds:
            out = accuracy.timed_train(accuracy.zero_config_overrides(str(folders[name]), seed, "@TMP", None))
            c = out["metrics"]["calibration"]
            row = {"set": name, "seed": seed, "test_acc": out["metrics"].get("test/acc"), **c}
            row.pop("reliability", None)
            row.pop("checkpoint", None)
            rows.append(row)
            print(json.dumps(row), flush=True)
        done = [r for r in rows if "temperature" in r]
        if done:
            mean = {f"{split}_{k}": round(statistics.mean(r[split][k] for r in done), 4)
                    for split in ("val", "test") if split in done[0] for k in ("ece_before", "ece_after",
                                                                                "nll_before", "nll_after")}
            print("MEAN", name, json.dumps({"temperature": [r["temperature"] for r in done], **mean}), flush=True)
            if "test_ece_before" in mean:
                acc = statistics.mean(r["test_acc"] for r in done)
                temperatures = " / ".join(f"{r['temperature']:.2f}" for r in done)
                lines.append(f"| {name} | {acc:.3f} | {temperatures} | {mean['test_ece_before']:.4f} | "
                             f"**{mean['test_ece_after']:.4f}** | {mean['test_nll_before']:.3f} | "
                             f"**{mean['test_nll_after']:.3f}** |")
    print("\n".join(lines))
    if args.write:
        sections.replace_between("calibration", lines)


if __name__ == "__main__":
    sys.exit(main())

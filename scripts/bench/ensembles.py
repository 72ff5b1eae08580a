"""Ensembles on one dataset: a K-member seed ensemble, a snapshot ensemble (SGDR), and TTA.

    .venv/bin/python scripts/bench/ensembles.py --root data/fashion_mnist_fewshot --out bench_ensembles.json \
        [-- extra overrides, e.g. data.image_size=64 scheduler=onecycle augment=none]

Every number is a real `train(cfg)` / `evaluate(cfg)`; members and snapshots are scored on the test
split alone and averaged (probabilities). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from finetune.inference import evaluate
from finetune.train import train


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_module("finetune.conf", version_base="1.3"):
        return compose(name, overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--cycle-epochs", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--tta", nargs="*", default=["hflip"])
    parser.add_argument("--out", default="bench_ensembles.json")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    base = [f"data.root={args.root}", "trainer.enable_progress_bar=false", *extra]
    out: dict = {"root": args.root, "extra": extra}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        ens = train(compose_cfg("train", [*base, f"ensemble.size={args.size}", f"run_dir={tmp}/ensemble"]))
        out["seed_ensemble"] = {
            "member_test_acc": ens["test/member_acc"], "mean_member_test_acc": statistics.mean(ens["test/member_acc"]),
            "ensemble_test_acc": ens["test/acc"], "wall_s": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(out["seed_ensemble"]), flush=True)
        if args.tta:
            accs = []
            for i, member in enumerate(ens["ensemble"]["members"]):
                scored = evaluate(compose_cfg("eval", [f"ckpt={member['checkpoint']}", f"data.root={args.root}",
                                                       f"tta=[{','.join(args.tta)}]", f"run_dir={tmp}/tta{i}"]))
                accs.append(scored["acc"])
            out["tta"] = {"views": args.tta, "member_test_acc_tta": accs, "mean_tta": statistics.mean(accs)}
            print(json.dumps(out["tta"]), flush=True)
        started = time.perf_counter()
        snap = train(compose_cfg("train", [
            *base, "scheduler=cosine_restarts", f"scheduler.cycle_epochs={args.cycle_epochs}",
            f"trainer.max_epochs={args.cycle_epochs * args.cycles}", "ensemble.snapshots=true",
            "~callbacks.early_stopping", f"run_dir={tmp}/snapshots"]))
        s = snap["snapshot_ensemble"]
        out["snapshot_ensemble"] = {
            "snapshot_test_acc": s["test/member_acc"], "mean_snapshot_test_acc": statistics.mean(s["test/member_acc"]),
            "ensemble_test_acc": s["test/acc"], "best_checkpoint_test_acc": snap["test/acc"],
            "wall_s": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(out["snapshot_ensemble"]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    e, s = out["seed_ensemble"], out["snapshot_ensemble"]
    print("\n| ensemble | members (test acc) | mean member | ensemble | wall s |\n|---|---|---|---|---|")
    print(f"| {args.size} seeds | {' / '.join(f'{a:.4f}' for a in e['member_test_acc'])} | "
          f"{e['mean_member_test_acc']:.4f} | **{e['ensemble_test_acc']:.4f}** | {e['wall_s']} |")
    print(f"| snapshots ({args.cycles} SGDR cycles of {args.cycle_epochs} epochs) | "
          f"{' / '.join(f'{a:.4f}' for a in s['snapshot_test_acc'])} | {s['mean_snapshot_test_acc']:.4f} | "
          f"**{s['ensemble_test_acc']:.4f}** | {s['wall_s']} |")
    if "tta" in out:
        t = out["tta"]
        print(f"\nTTA ({'+'.join(t['views'])}) on the seed members: "
              f"{' / '.join(f'{a:.4f}' for a in t['member_test_acc_tta'])} (mean {t['mean_tta']:.4f})")


if __name__ == "__main__":
    sys.exit(main())

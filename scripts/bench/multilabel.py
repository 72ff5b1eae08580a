"""Several labels per image (issue 15, part 2): zero-config multi-label runs against a one-vs-rest linear probe.

    .venv/bin/python scripts/bench/multilabel.py [--seeds 0 1 2]

Data: `fmnist-pairs` (scripts/bench/datasets.py): two real Fashion-MNIST items side by side, labelled with both
classes (one image in four shows one item): 1,000 train, 200 val, 1,000 test images, 10 classes.
- finetune: `finetune data.root=fmnist-pairs/labels.csv task=multilabel`, nothing else (recipe=auto).
- baseline: the pretrained backbone frozen (EfficientNet-Lite0, ImageNet weights, its pre-logits features at the
  input size zero-config chose), one standardised logistic regression per class on the training images (C=0.5,
  as the policy's probes), thresholds tuned on val the same way finetune tunes its own.
Both report test mAP (mean over classes of the average precision), micro / macro F1 at the val-tuned thresholds
and at 0.5, and exact match (every label right). Prints one JSON line per run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import datasets
import sections

SET = "fmnist-pairs"


def finetune_run(csv_path: Path, seed: int) -> dict:
    from hydra import initialize_config_module

    from finetune.train import train

    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("finetune.conf", version_base="1.3"):
        cfg = accuracy.compose_as_cli([f"data.root={csv_path}", "task=multilabel", f"seed={seed}", f"run_dir={tmp}",
                                       *accuracy.COMMON])
        started = time.perf_counter()
        metrics = train(cfg)
        wall = time.perf_counter() - started
        recipe = json.loads((Path(tmp) / "recipe.json").read_text())
        policy = json.loads((Path(tmp) / "policy.json").read_text())
    m = metrics["multilabel"]["test"]
    return {"who": "finetune zero-config", "seed": seed, "wall_s": round(wall, 1), "tuned": m["tuned"],
            "at_0.5": m["at_0.5"], "policy": policy["policy_applied"], "cell": policy.get("quadrant"),
            "image_size": next((c["value"] for c in recipe.get("choices", []) if c.get("key") == "data.image_size"),
                               None)}


def probe_baseline(csv_path: Path, image_size: int) -> dict:
    """One-vs-rest logistic regressions on the frozen pretrained network's pre-logits features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from finetune.data.datasets import scan_dataset
    from finetune.data.transforms import Preprocessing
    from finetune.models.backbone import load_pretrained
    from finetune.multilabel import multi_hot_rows, multilabel_scores, tune_thresholds
    from finetune.policy.measure import extract_features

    started = time.perf_counter()
    index = scan_dataset(csv_path, 0.0, task="multilabel")
    net, _, _ = load_pretrained("tf_efficientnet_lite0", None)
    pp = Preprocessing(image_size, (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)
    stages, targets = {}, {}
    for split in ("train", "val", "test"):
        per_stage, pre, _ = extract_features(net, index.splits[split], pp)
        stages[split] = [*per_stage, pre]  # each stage's pooled features, then the pre-logits
        targets[split] = multi_hot_rows([y for _, y in index.splits[split]], len(index.classes))
    best = None
    for k in range(len(stages["train"])):  # the probe of every stage; the one best on val is reported
        clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=0.5, max_iter=1000)))
        clf.fit(stages["train"][k], targets["train"].numpy())
        probs = {s: torch.from_numpy(clf.predict_proba(stages[s][k])).float() for s in ("val", "test")}
        val_map = multilabel_scores(probs["val"], targets["val"])["map"]
        if best is None or val_map > best[0]:
            best = (val_map, k, probs)
    _, k, probs = best
    thresholds = tune_thresholds(probs["val"], targets["val"])
    where = "pre-logits" if k == len(stages["train"]) - 1 else f"stage {k}"
    return {"who": f"one-vs-rest linear probe (frozen, {where} features: the best on val)", "image_size": image_size,
            "wall_s": round(time.perf_counter() - started, 1),
            "tuned": multilabel_scores(probs["test"], targets["test"], thresholds),
            "at_0.5": multilabel_scores(probs["test"], targets["test"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", default=SET, choices=["fmnist-pairs", "fmnist-pairs-longtail", "emoji-pairs"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-only", action="store_true", help="only the linear probe baseline")
    parser.add_argument("--write", action="store_true", help="rewrite the multi-label table in BENCHMARKS.md")
    parser.add_argument("--baseline-size", type=int, default=64, help="its input size with --baseline-only")
    args = parser.parse_args()
    accuracy._init_worker(args.threads)
    folder = datasets.build(datasets.REPO / "data" / "bench", [args.set])[args.set]
    csv_path = folder / "labels.csv"
    if args.baseline_only:
        print(json.dumps(probe_baseline(csv_path, args.baseline_size)), flush=True)
        return
    rows = []
    for seed in args.seeds:
        rows.append(finetune_run(csv_path, seed))
        print(json.dumps(rows[-1]), flush=True)
    size = rows[0].get("image_size") or 64
    baseline = probe_baseline(csv_path, int(size))
    print(json.dumps(baseline), flush=True)
    lines = table(rows, baseline)
    print("\n".join(lines))
    if args.write:
        sections.replace_between({SET: "multilabel", "fmnist-pairs-longtail": "multilabel-longtail"}.get(
            args.set, args.set), lines)


def table(rows: list[dict], baseline: dict) -> list[str]:
    """The BENCHMARKS.md table: finetune's seeds (mean, spread, each) against the linear-probe baseline."""
    mean = statistics.mean

    def cell(group: list[dict], key: str) -> str:
        tuned, plain = [r["tuned"][key] for r in group], [r["at_0.5"][key] for r in group]
        spread = f" ± {statistics.stdev(tuned):.4f}" if len(tuned) > 1 else ""
        return f"{mean(tuned):.4f}{spread}" + ("" if key == "map" else f" ({mean(plain):.3f} at 0.5)")

    first = rows[0]
    who = (f"`finetune data.root=labels.csv task=multilabel` (zero-config; chose {first.get('image_size')} px, "
           f"{first.get('policy')}, cell {first.get('cell')}), seeds {' / '.join(str(r['seed']) for r in rows)}")
    keys = ("map", "micro_f1", "macro_f1", "acc")
    return ["| | test mAP | micro F1 | macro F1 | every label right | wall s |", "|---|---|---|---|---|---|",
            f"| {who} | {' | '.join(cell(rows, k) for k in keys)} | {mean(r['wall_s'] for r in rows):.0f} |",
            (f"| {baseline['who']}, thresholds tuned on val the same way | "
             f"{' | '.join(cell([baseline], k) for k in keys)} | {baseline['wall_s']:.0f} |")]


if __name__ == "__main__":
    sys.exit(main())

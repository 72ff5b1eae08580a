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
    features, targets = {}, {}
    for split in ("train", "val", "test"):
        _, pre, _ = extract_features(net, index.splits[split], pp)
        features[split] = pre
        targets[split] = multi_hot_rows([y for _, y in index.splits[split]], len(index.classes))
    clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=0.5, max_iter=1000)))
    clf.fit(features["train"], targets["train"].numpy())
    probs = {s: torch.from_numpy(clf.predict_proba(features[s])).float() for s in ("val", "test")}
    thresholds = tune_thresholds(probs["val"], targets["val"])
    return {"who": "one-vs-rest linear probe (frozen)", "image_size": image_size,
            "wall_s": round(time.perf_counter() - started, 1),
            "tuned": multilabel_scores(probs["test"], targets["test"], thresholds),
            "at_0.5": multilabel_scores(probs["test"], targets["test"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    accuracy._init_worker(args.threads)
    folder = datasets.build(datasets.REPO / "data" / "bench", [SET])[SET]
    csv_path = folder / "labels.csv"
    rows = []
    for seed in args.seeds:
        rows.append(finetune_run(csv_path, seed))
        print(json.dumps(rows[-1]), flush=True)
    size = rows[0].get("image_size") or 64
    print(json.dumps(probe_baseline(csv_path, int(size))), flush=True)
    for key in ("map", "micro_f1", "macro_f1", "acc"):
        values = [r["tuned"][key] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        each = " / ".join(f"{v:.4f}" for v in values)
        print(f"finetune {key}: {statistics.mean(values):.4f} +- {spread:.4f} ({each})")


if __name__ == "__main__":
    sys.exit(main())

"""Open set (issue 15, part 3): how well each score separates images of the trained classes from images of classes
the model never saw, on zero-config runs.

    .venv/bin/python scripts/bench/open_set.py [--sets fmnist-200:0,1 digits:8,9 ...] [--seeds 0]

For each SET:HELD (the indices, in sorted order, of the classes held out), the set's known classes are written to
data/bench/open/SET-HELD/{train,val,test} (a set without val/ gets 20% of each known class's training images as
val) and the held-out classes' test images to data/bench/open/SET-HELD-unknown. `finetune data.root=...` with
nothing else trains on the known classes (and fits the open-set threshold). Then, for each score kind, on the
known test images against the unknown ones:
- AUROC (1: every unknown image scores below every known one; 0.5: no separation);
- with the threshold fitted as training fits it (5% of the known validation images below it): the share of known
  test images and of unknown images it rejects.
Kinds: knn, msp, energy (what finetune offers: finetune/open_set.py), and two measured for comparison only:
mahalanobis (to the nearest class mean, shared covariance; Lee et al. 2018) and cosine similarity to the nearest
class mean. Prints one JSON line per run and the mean AUROC per kind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import datasets
import sections

DEFAULT_SETS = ["fmnist-200:0,1", "fmnist-200:8,9", "digits:0,1", "digits:8,9", "emoji-objects:0,1",
                "emoji-objects:10,11", "stamps:0,1", "stamps:8,9", "glyphs:0,1", "glyphs:8,9"]
KINDS = ("knn", "msp", "energy", "mahalanobis", "class_mean")


def open_folders(data_root: Path, name: str, held: list[int]) -> tuple[Path, Path]:
    """(known classes' train/val/test, held-out classes' test images), written once."""
    source = data_root / name
    tag = "_".join(map(str, held))
    known, unknown = data_root / "open" / f"{name}-{tag}", data_root / "open" / f"{name}-{tag}-unknown"
    if (known / "done").is_file():
        return known, unknown
    shutil.rmtree(known, ignore_errors=True), shutil.rmtree(unknown, ignore_errors=True)
    classes = sorted(p.name for p in (source / "train").iterdir())
    out = {classes[i] for i in held}
    for split in ("train", "val", "test"):
        for c in classes if (source / split).is_dir() else []:
            if c in out:
                if split == "test":
                    shutil.copytree(source / split / c, unknown / c)
            else:
                shutil.copytree(source / split / c, known / split / c)
    if not (source / "val").is_dir():
        rng = np.random.default_rng(0)
        for c in sorted(set(classes) - out):
            files = sorted((known / "train" / c).iterdir())
            (known / "val" / c).mkdir(parents=True)
            for i in rng.permutation(len(files))[:max(1, round(0.2 * len(files)))]:
                shutil.move(str(files[i]), known / "val" / c / files[i].name)
    (known / "done").write_text("")
    return known, unknown


def _labelled(folder: Path) -> list[tuple[str, int]]:
    classes = sorted(p.name for p in folder.iterdir())
    return [(str(p), i) for i, c in enumerate(classes) for p in sorted((folder / c).iterdir())]


def scores(kind: str, logits, features, temperature: float, train_features, train_labels, bank):
    from finetune.open_set import known_scores

    if kind in ("knn", "msp", "energy"):
        return known_scores(kind, logits, features, temperature, bank)
    classes = int(train_labels.max()) + 1
    means = torch.stack([train_features[train_labels == c].mean(0) for c in range(classes)])
    if kind == "class_mean":
        normed = torch.nn.functional.normalize
        return (normed(features, dim=-1) @ normed(means, dim=-1).T).max(-1).values
    centred = train_features - means[train_labels]
    cov = centred.T @ centred / len(centred)
    cov += 1e-3 * torch.trace(cov) / len(cov) * torch.eye(len(cov))  # shrinkage: fewer images than dimensions
    precision = torch.linalg.pinv(cov.double()).float()
    diff = features[:, None, :] - means[None]  # [n, classes, d]
    return -((diff @ precision) * diff).sum(-1).min(-1).values


def measure(known: Path, unknown: Path, run: Path) -> dict:
    from sklearn.metrics import roc_auc_score

    from finetune.members import device_for
    from finetune.models.checkpoint import load_classifier
    from finetune.scoring import split_outputs

    metrics = json.loads((run / "metrics.json").read_text())
    loaded = load_classifier(metrics["scored_checkpoint"])
    outputs = {split: split_outputs(loaded.module, samples, loaded.preprocessing, 128, device_for("cpu"))
               for split, samples in (("train", _labelled(known / "train")), ("val", _labelled(known / "val")),
                                      ("test", _labelled(known / "test")),
                                      ("unknown", [(str(p), 0) for p in sorted(unknown.rglob("*.png"))]))}
    train_labels = torch.tensor([y for _, y in _labelled(known / "train")])
    bank = torch.nn.functional.normalize(outputs["train"][1], dim=-1)
    row = {"test_acc": metrics.get("test/acc"), "val_images": len(outputs["val"][0]),
           "unknown_images": len(outputs["unknown"][0]), "fitted": metrics.get("open_set")}
    for kind in KINDS:
        s = {split: scores(kind, *outputs[split], loaded.temperature, outputs["train"][1], train_labels,
                           bank).numpy() for split in ("val", "test", "unknown")}
        threshold = np.quantile(s["val"], 0.05)
        labels = np.r_[np.ones(len(s["test"])), np.zeros(len(s["unknown"]))]
        row[kind] = {"auroc": round(float(roc_auc_score(labels, np.r_[s["test"], s["unknown"]])), 4),
                     "known_rejected": round(float((s["test"] < threshold).mean()), 4),
                     "unknown_rejected": round(float((s["unknown"] < threshold).mean()), 4)}
    return row


def train_into(run: Path, overrides: list[str]) -> float:
    """One real zero-config train(cfg) into ``run`` (kept: the scoring reads its checkpoint); wall seconds."""
    import time

    from hydra import initialize_config_module

    from finetune.train import train

    with initialize_config_module("finetune.conf", version_base="1.3"):
        cfg = accuracy.compose_as_cli(overrides)
        started = time.perf_counter()
        train(cfg)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=DEFAULT_SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="rewrite the open-set table in BENCHMARKS.md")
    args = parser.parse_args()
    accuracy._init_worker(args.threads)
    data_root = datasets.REPO / "data" / "bench"
    datasets.build(data_root, sorted({s.split(":")[0] for s in args.sets}))
    rows = []
    for spec in args.sets:
        name, held = spec.split(":")
        known, unknown = open_folders(data_root, name, [int(h) for h in held.split(",")])
        for seed in args.seeds:
            run = data_root / "open" / "runs" / f"{known.name}-seed{seed}"
            shutil.rmtree(run, ignore_errors=True)  # always trained by this code: a kept run may be older
            wall = train_into(run, accuracy.zero_config_overrides(str(known), seed, str(run), None))
            row = {"set": spec, "seed": seed, "wall_s": wall and round(wall, 1), **measure(known, unknown, run)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = table(rows)
    print("\n".join(lines))
    if args.write:
        sections.replace_between("open-set", lines)


def table(rows: list[dict]) -> list[str]:
    """The BENCHMARKS.md table: mean AUROC per set and kind, rejection rates of knn and msp, and the paired
    differences behind the default."""
    mean = statistics.mean
    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(r["set"].split(":")[0], []).append(r)

    def cells(group: list[dict], bold: bool) -> str:
        aurocs = {k: mean(r[k]["auroc"] for r in group) for k in KINDS}
        top = max(aurocs.values())
        shown = [f"**{v:.3f}**" if bold and v == top else f"{v:.3f}" for v in aurocs.values()]
        rejected = " | ".join(f"{mean(r['knn'][key] for r in group):.2f} / {mean(r['msp'][key] for r in group):.2f}"
                              for key in ("unknown_rejected", "known_rejected"))
        return " | ".join(shown) + " | " + rejected

    header = (f"| set (runs) | test acc (known classes) | {' | '.join(KINDS)} | unknown rejected: knn / msp | "
              f"known test rejected: knn / msp |")
    lines = [header, "|---" * (len(KINDS) + 4) + "|"]
    for name, group in by_set.items():
        lines.append(f"| {name} ({len(group)}) | {mean(r['test_acc'] for r in group):.3f} | {cells(group, True)} |")
    lines.append(f"| **mean of {len(rows)}** | | {cells(rows, False)} |")
    for other in ("msp", "energy"):
        diffs = [r["knn"]["auroc"] - r[other]["auroc"] for r in rows]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        lines.append(f"\nknn - {other}: {mean(diffs):+.3f} AUROC (paired by run, standard error {se:.3f}; knn higher "
                     f"in {sum(d > 0 for d in diffs)} of {len(diffs)} runs).")
    return lines


if __name__ == "__main__":
    sys.exit(main())

"""The report's figures (matplotlib, Agg backend): learning curves with the LR schedule, the confusion matrix,
and the most confidently wrong validation images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.datamodule import decode_side
from finetune.data.images import load_image
from finetune.data.transforms import eval_transform


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path, reductions: Sequence[dict]) -> Path | None:
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("loss", ("train/loss_epoch", "val/loss", "train_eval/loss")),
              ("accuracy", ("train/acc", "val/acc", "train_eval/acc")))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            if key in series:
                xs, ys = zip(*series[key])
                ax.plot([x + 1 for x in xs], ys, marker="o", ms=3, label=key.replace("_epoch", ""))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    lr_keys = [k for k in series if k.startswith("lr-")]
    shown = [k for k in lr_keys if k.endswith("/head")] or lr_keys[:1]
    shown += [k for k in lr_keys if k not in shown and not k.endswith("_no_decay")][:3]
    for key in shown:
        xs, ys = zip(*series[key])
        axes[2].plot([x + 1 for x in xs], ys, marker=".", label=key.split("/", 1)[-1])
    for r in reductions:
        axes[2].axvline(r["after_epoch"] + 1, color="red", ls="--", lw=0.8)
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate" + (" (red: plateau reductions)" if reductions else ""))
    axes[2].set_xlabel("epoch")
    if shown:
        axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    plt = _plt()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), [c[:14] for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), [c[:14] for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_wrong(samples: Sequence[tuple[str, int]], probs: np.ndarray, classes: Sequence[str], pp, path: Path,
               limit: int = 16) -> tuple[Path | None, list[dict[str, Any]]]:
    """The most confidently wrong images: what the model believes most strongly and gets wrong."""
    pred = probs.argmax(1)
    wrong = [i for i, (_, y) in enumerate(samples) if pred[i] != y]
    wrong.sort(key=lambda i: -probs[i, pred[i]])
    wrong = wrong[:limit]
    rows = [{"path": samples[i][0], "true": classes[samples[i][1]], "predicted": classes[pred[i]],
             "confidence": float(probs[i, pred[i]])} for i in wrong]
    if not wrong:
        return None, rows
    plt = _plt()
    cols = min(8, len(wrong))
    nrows = -(-len(wrong) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(1.8 * cols, 2.5 * nrows + 0.3), squeeze=False)
    transform = eval_transform(pp)
    mean, std = np.array(pp.mean), np.array(pp.std)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        x = transform(image=load_image(row["path"], decode_side(pp)))["image"].permute(1, 2, 0).numpy()
        ax.imshow(np.clip(x * std + mean, 0, 1))
        ax.set_title(f"{row['predicted'][:12]} {row['confidence']:.2f}\n(true: {row['true'][:12]})", fontsize=7)
    fig.suptitle("Most confidently wrong validation images: predicted, confidence (true class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path, rows


def plot_reliability(before: dict, after: dict, path: Path, title: str) -> Path:
    """Reliability diagram: accuracy against mean confidence per confidence bin, before and after
    temperature scaling (a calibrated model lies on the diagonal); marker area follows the bin's images."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="calibrated")
    for bins, name, colour in ((before, "before", "tab:red"), (after, "after", "tab:blue")):
        points = [(c, a, n) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["counts"]) if n]
        if not points:
            continue
        total = sum(n for *_, n in points)
        conf, acc, counts = zip(*points)
        ax.plot(conf, acc, color=colour, linewidth=1, label=f"{name} (ECE {bins['ece']:.3f})")
        ax.scatter(conf, acc, s=[10 + 300 * n / total for n in counts], color=colour, alpha=0.6)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

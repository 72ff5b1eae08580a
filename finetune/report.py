"""``RUN/report.md`` and a self-contained ``RUN/report.html``: what a person reads after a run.

Dataset and data report, the policy decision with its evidence, the recipe (LR schedule and plateau
reductions included), learning curves, confusion matrix, per-class precision/recall/F1 and the most
confidently wrong validation images. The report is a list of blocks rendered twice (Markdown with
PNG files beside it, HTML with the same PNGs embedded), so the two cannot disagree.
"""

from __future__ import annotations

import base64
import csv
import html
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from finetune.conf import preset
from finetune.data.datamodule import decode_side
from finetune.data.images import load_image
from finetune.data.transforms import eval_transform
from finetune.run_files import write_text

log = logging.getLogger(__name__)

Block = tuple  # ("h", text) | ("p", text) | ("table", header, rows) | ("img", file, alt) | ("pre", text)


# ----------------------------------------------------------------------------- numbers


def per_class_scores(probs: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Confusion matrix (rows = true, columns = predicted) and per-class precision / recall / F1."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y, pred = np.asarray(labels), probs.argmax(1)
    k = len(classes)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    return {"confusion": cm, "precision": p, "recall": r, "f1": f, "support": support,
            "accuracy": float((pred == y).mean()) if len(y) else float("nan")}


def read_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series from Lightning's CSV log; LR rows (no epoch) are numbered in order."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not metrics_csv.is_file():
        return series
    lr_count: dict[str, int] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if not value or key in ("epoch", "step"):
                    continue
                if key.startswith("lr-"):
                    epoch = lr_count.get(key, 0)
                    lr_count[key] = epoch + 1
                elif row.get("epoch"):
                    epoch = int(float(row["epoch"]))
                else:
                    continue
                series.setdefault(key, []).append((epoch, float(value)))
    # The scoring of the chosen checkpoint after fit logs val/* once more, at an epoch with no training.
    last_train = max((e for k, v in series.items() if k.startswith("train/") for e, _ in v), default=None)
    if last_train is not None:
        series = {k: [(e, x) for e, x in v if k.startswith(("train/", "lr-")) or e <= last_train] for k, v in series.items()}
    return series


# ----------------------------------------------------------------------------- figures


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


# ----------------------------------------------------------------------------- rendering


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return str(v)


def to_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"{'#' * block[2] if len(block) > 2 else '##'} {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "pre":
            out.append(f"```\n{block[1]}\n```")
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1].name})")
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[Block], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            level = block[2] if len(block) > 2 else 2
            body.append(f"<h{level}>{html.escape(block[1])}</h{level}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "img":
            data = base64.b64encode(block[1].read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th{background:#f3f3f3}pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:12px}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------- the report


@contextmanager
def _section(what: str, blocks: list[Block], problems: list[str]) -> Iterator[None]:
    """A figure that fails (a plotting bug, an odd image) leaves a note in the report, not a failed run."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure of one figure: the rest of the report still counts
        log.warning("Report: the %s could not be drawn (%s: %s); the report is written without it.",
                    what, type(e).__name__, e)
        problems.append(f"{what}: {type(e).__name__}: {e}")
        blocks.append(("p", f"The {what} could not be drawn ({type(e).__name__}: {e})."))


def write_report(run_dir: Path, *, index, record: dict[str, Any], metrics: dict[str, Any], cfg: Any,
                 policy_block: str, split_probs: dict[str, np.ndarray], preprocessing) -> dict[str, Any]:
    """Write report.md, report.html and their PNGs into ``run_dir``; returns the written files, and
    under "problems" the figures that could not be drawn (the report is written without them)."""
    classes = index.classes
    files: dict[str, Any] = {}
    problems: list[str] = []
    blocks: list[Block] = [("h", f"finetune run: {Path(run_dir).name}", 1)]
    summary = [[k, _fmt(metrics[k])] for k in ("val/acc", "val/loss", "train_eval/acc", "train_eval/loss", "test/acc",
                                                "test/loss", "epochs", "fit_seconds") if k in metrics]
    intro = (f"Backbone {cfg.model.backbone} ({metrics.get('weights')} weights), policy {metrics.get('policy')}, "
             f"run folder {run_dir}.")
    if metrics.get("checkpoint_choice"):
        intro += f" Scores are those of {metrics['checkpoint_choice']}."
    if str(metrics.get("validation", "")).startswith("none"):
        note = (f"NO VALIDATION SPLIT ({metrics['validation']}). The train_eval/* scores are on the images the "
                "model trained on and say nothing about new images; no epoch was picked by them (no best.ckpt, no "
                "early stopping). Set data.val_fraction or add a val folder to measure the model.")
        blocks.append(("p", note))
    blocks += [("p", intro), ("table", ["metric", "value"], summary)]

    blocks += [("h", "Dataset"), ("p", index.summary())]
    counts = {split: np.bincount([y for _, y in s], minlength=len(classes)) for split, s in index.splits.items()}
    blocks.append(("table", ["class", *counts], [[c, *(int(counts[s][i]) for s in counts)] for i, c in enumerate(classes)]))
    data_report = Path(run_dir) / "data_report.json"
    if data_report.is_file():
        import json

        report = json.loads(data_report.read_text())
        problems = report.get("problems", [])
        blocks.append(("p", f"Data check: {len(problems)} problem(s) found ({data_report.name} lists them by path)."))
        if problems:
            blocks.append(("table", ["kind", "path", "detail"], [[p["kind"], p["path"], p.get("detail", "")] for p in problems[:30]]))

    blocks += [("h", "Transfer policy"), ("pre", policy_block)]

    sched = {k: v for k, v in dict(cfg.scheduler).items() if k not in ("_partial_",)}
    opt = {k: v for k, v in dict(cfg.optimizer).items() if k not in ("_partial_",)}
    defaults = preset("regularization", "default")  # what the run changed: the YAML's defaults are not listed
    reg = {k: v for k, v in metrics.get("regularization", {}).items() if v != defaults.get(k)}
    augment = dict(cfg.augment)
    blocks += [("h", "Recipe"), ("table", ["part", "configuration"], [
        ["optimizer", ", ".join(f"{k}={v}" for k, v in opt.items())],
        ["LR schedule", ", ".join(f"{k}={v}" for k, v in sched.items())],
        ["regularization", ", ".join(f"{k}={v}" for k, v in reg.items()) or "none beyond the optimizer's weight decay"],
        ["augmentation", f"crop={augment['crop']}, transforms={list(augment['transforms'] or [])}"],
        ["batch size / epochs", f"{cfg.data.batch_size} / max {cfg.trainer.max_epochs}"],
    ])]
    reductions = metrics.get("lr_reductions") or []
    if reductions:
        blocks.append(("table", ["after epoch", "monitor", "new LR (head or first group)"],
                       [[r["after_epoch"], r["monitor"], next(iter(r["lr"].values())) if "head" not in r["lr"] else r["lr"]["head"]]
                        for r in reductions]))
    else:
        blocks.append(("p", "No plateau LR reductions."))

    with _section("learning curves", blocks, problems):
        curves = plot_curves(read_curves(Path(run_dir) / "logs" / "metrics.csv"), Path(run_dir) / "learning_curves.png",
                             reductions)
        if curves:
            files["learning_curves"] = curves
            blocks += [("h", "Learning curves"), ("img", curves, "learning curves")]

    split = "test" if "test" in split_probs else "val"
    which = Path(str(metrics.get("scored_checkpoint") or "final weights")).stem.replace("_", " ")
    if split in split_probs:
        with _section("confusion matrix and per-class results", blocks, problems):
            samples = index.splits[split]
            scores = per_class_scores(split_probs[split], [y for _, y in samples], classes)
            title = f"{split} split, {which} checkpoint (accuracy {scores['accuracy']:.4f})"
            files["confusion_matrix"] = plot_confusion(scores["confusion"], classes,
                                                       Path(run_dir) / "confusion_matrix.png", title)
            blocks += [("h", f"Per-class results ({split} split, {which} checkpoint)"),
                       ("img", files["confusion_matrix"], "confusion matrix"),
                       ("table", ["class", "precision", "recall", "F1", "support"],
                        [[c, float(scores["precision"][i]), float(scores["recall"][i]), float(scores["f1"][i]),
                          int(scores["support"][i])] for i, c in enumerate(classes)])]
    if "val" in split_probs:
        with _section("most confidently wrong validation images", blocks, problems):
            wrong_png, rows = plot_wrong(index.splits["val"], split_probs["val"], classes, preprocessing,
                                         Path(run_dir) / "confidently_wrong.png")
            blocks.append(("h", "Most confidently wrong validation images"))
            if wrong_png:
                files["confidently_wrong"] = wrong_png
                blocks += [("img", wrong_png, "most confidently wrong validation images"),
                           ("table", ["path", "true", "predicted", "confidence"],
                            [[r["path"], r["true"], r["predicted"], r["confidence"]] for r in rows])]
            else:
                blocks.append(("p", "None: every validation image is classified correctly."))

    write_text(Path(run_dir) / "report.md", to_markdown(blocks))
    write_text(Path(run_dir) / "report.html", to_html(blocks, f"finetune run {Path(run_dir).name}"))
    files["report_md"], files["report_html"] = Path(run_dir) / "report.md", Path(run_dir) / "report.html"
    if problems:
        files["problems"] = problems
    return files

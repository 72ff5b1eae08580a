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
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from finetune.calibration import BINS
from finetune.conf import preset
from finetune.figures import plot_confusion, plot_curves, plot_reliability, plot_wrong
from finetune.recipe.auto import RECIPE_FILE
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
        series = {k: [(e, x) for e, x in v if k.startswith(("train/", "lr-")) or e <= last_train]
                  for k, v in series.items()}
    return series


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
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                           for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th{background:#f3f3f3}pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:12px}"
             "img{max-width:100%}")
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



def _summary_blocks(run_dir: Path, metrics: dict[str, Any], cfg: Any) -> list[Block]:
    """The title, a warning when there was no validation split, and the headline scores."""
    blocks: list[Block] = [("h", f"finetune run: {Path(run_dir).name}", 1)]
    per_split = ("map", "micro_f1", "acc", "balanced_acc", "macro_f1", "loss")  # map, micro_f1: task=multilabel
    keys = (*(f"{split}/{k}" for split in ("val", "train_eval", "test") for k in per_split), "epochs", "fit_seconds")
    summary = [[k, _fmt(metrics[k])] for k in keys if k in metrics]
    speed = metrics.get("throughput")
    if speed:  # which of model and input pipeline set the pace (finetune/throughput.py)
        summary += [["training images/s", f"{speed['train_images_per_s']:g}"],
                    ["waiting for data", (f"{100 * speed['loader_wait_share']:.0f}% of training time "
                                          f"({speed['limited_by']} is the limit)")]]
    intro = (f"Backbone {cfg.model.backbone} ({metrics.get('weights')} weights), policy {metrics.get('policy')}, "
             f"run folder {run_dir}.")
    if metrics.get("checkpoint_choice"):
        intro += f" Scores are those of {metrics['checkpoint_choice']}."
    if str(metrics.get("validation", "")).startswith("none"):
        note = (f"NO VALIDATION SPLIT ({metrics['validation']}). The train_eval/* scores are on the images the "
                "model trained on and say nothing about new images; no epoch was picked by them (no best.ckpt, no "
                "early stopping). Set data.val_fraction or add a val folder to measure the model.")
        blocks.append(("p", note))
    return blocks + [("p", intro), ("table", ["metric", "value"], summary)]


def _dataset_blocks(run_dir: Path, index) -> list[Block]:
    """Images per class and split, and the data check's findings (RUN/data_report.json)."""
    classes = index.classes
    blocks: list[Block] = [("h", "Dataset"), ("p", index.summary())]
    counts = {split: list(per_class.values()) for split, per_class in index.counts().items()}
    blocks.append(("table", ["class", *counts],
                   [[c, *(int(counts[s][i]) for s in counts)] for i, c in enumerate(classes)]))
    data_report = Path(run_dir) / "data_report.json"
    if data_report.is_file():
        import json

        report = json.loads(data_report.read_text())
        problems = report.get("problems", [])
        blocks.append(("p", f"Data check: {len(problems)} problem(s) found ({data_report.name} lists them by path)."))
        if problems:
            blocks.append(("table", ["kind", "path", "detail"],
                           [[p["kind"], p["path"], p.get("detail", "")] for p in problems[:30]]))
    return blocks


def _auto_recipe_blocks(run_dir: Path) -> list[Block]:
    """What recipe=auto chose, each value with its reason, and the keys the user set (RUN/recipe.json)."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        return []
    decision = json.loads(path.read_text(encoding="utf-8"))
    if decision.get("recipe") != "auto":
        off = "recipe=off: every value is the configuration's default or as given; none was chosen from the data."
        return [("p", off)]
    blocks: list[Block] = [("p", "Chosen from the data by recipe=auto (any can be set on the command line):"),
                           ("table", ["key", "value", "why"],
                            [[c["key"], _fmt(c["value"]), c["reason"]] for c in decision.get("choices", [])])]
    if decision.get("kept_as_given"):
        blocks.append(("p", "Kept as given: " + ", ".join(f"{k}={_fmt(v)}"
                                                         for k, v in decision["kept_as_given"].items())))
    return blocks


def _imbalance_rows(imbalance: dict[str, Any] | None) -> list[list[str]]:
    """The class balance of the training split and what the run did about it (metrics.json "imbalance")."""
    if not imbalance:
        return []
    weights = imbalance.get("class_weights")
    shown = ", ".join(f"{c} {w:g}" for c, w in weights.items()) if weights else "none"
    text = (f"largest / smallest class {imbalance['ratio']:g}; sampler {imbalance['sampler']}; "
            f"loss weights: {shown} ({imbalance['reason']})")
    return [["class balance", text]]


def _recipe_blocks(run_dir: Path, metrics: dict[str, Any], cfg: Any) -> list[Block]:
    """What recipe=auto chose and why; optimizer, LR schedule, what the regularization changed from its
    defaults, augmentation, and the plateau LR reductions."""
    sched = {k: v for k, v in dict(cfg.scheduler).items() if k not in ("_partial_",)}
    opt = {k: v for k, v in dict(cfg.optimizer).items() if k not in ("_partial_",)}
    defaults = preset("regularization", "default")  # what the run changed: the YAML's defaults are not listed
    reg = {k: v for k, v in metrics.get("regularization", {}).items() if v != defaults.get(k)}
    augment = dict(cfg.augment)
    blocks: list[Block] = [("h", "Recipe"), *_auto_recipe_blocks(run_dir), ("table", ["part", "configuration"], [
        ["optimizer", ", ".join(f"{k}={v}" for k, v in opt.items())],
        ["LR schedule", ", ".join(f"{k}={v}" for k, v in sched.items())],
        ["regularization",
         ", ".join(f"{k}={v}" for k, v in reg.items()) or "none beyond the optimizer's weight decay"],
        ["augmentation", f"crop={augment['crop']}, transforms={list(augment['transforms'] or [])}"],
        ["batch size / epochs", f"{cfg.data.batch_size} / max {cfg.trainer.max_epochs}"],
        *_imbalance_rows(metrics.get("imbalance")),
    ])]
    reductions = metrics.get("lr_reductions") or []
    if reductions:
        blocks.append(("table", ["after epoch", "monitor", "new LR (head or first group)"],
                       [[r["after_epoch"], r["monitor"],
                         next(iter(r["lr"].values())) if "head" not in r["lr"] else r["lr"]["head"]]
                        for r in reductions]))
    else:
        blocks.append(("p", "No plateau LR reductions."))
    return blocks


def _add_curves(run_dir: Path, reductions: Sequence[dict], blocks: list[Block], problems: list,
                files: dict[str, Any]) -> None:
    with _section("learning curves", blocks, problems):
        curves = plot_curves(read_curves(Path(run_dir) / "logs" / "metrics.csv"), Path(run_dir) / "learning_curves.png",
                             reductions)
        if curves:
            files["learning_curves"] = curves
            blocks += [("h", "Learning curves"), ("img", curves, "learning curves")]


def _add_per_class(run_dir: Path, index, metrics: dict[str, Any], split_probs: dict[str, np.ndarray],
                   blocks: list[Block], problems: list, files: dict[str, Any]) -> None:
    """The confusion matrix and per-class scores of the test split (else val), of the scored checkpoint."""
    split = "test" if "test" in split_probs else "val"
    which = Path(str(metrics.get("scored_checkpoint") or "final weights")).stem.replace("_", " ")
    if split not in split_probs:
        return
    classes = index.classes
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


def _multilabel_blocks(index, metrics: dict[str, Any], split_probs: dict[str, np.ndarray]) -> list[Block]:
    """task=multilabel: per class, its average precision, tuned threshold and precision / recall / F1 there."""
    m = metrics.get("multilabel") or {}
    split = "test" if "test" in m else "val"
    if split not in m or split not in split_probs:
        return []
    from finetune.multilabel import multi_hot_rows

    targets = multi_hot_rows([y for _, y in index.splits[split]], len(index.classes)).numpy() > 0.5
    cuts = np.array([m["thresholds"][c] for c in index.classes])
    predicted = split_probs[split] >= cuts
    tp, positives, called = (predicted & targets).sum(0), targets.sum(0), predicted.sum(0)
    tuned, plain = m[split]["tuned"], m[split]["at_0.5"]
    rows = [[c, tuned["per_class_ap"][c] if tuned["per_class_ap"][c] is not None else "n/a", float(cuts[i]),
             round(float(tp[i] / max(called[i], 1)), 4), round(float(tp[i] / max(positives[i], 1)), 4),
             round(float(2 * tp[i] / max(called[i] + positives[i], 1)), 4), int(positives[i])]
            for i, c in enumerate(index.classes)]
    return [("h", f"Per-class results ({split} split, several labels per image)"),
            ("p", (f"mAP {tuned['map']:.4f}; micro F1 {tuned['micro_f1']:.4f} and macro F1 {tuned['macro_f1']:.4f} "
                   f"at the per-class thresholds ({m['thresholds_from']}), against micro F1 {plain['micro_f1']:.4f} "
                   f"at 0.5; every label right on {tuned['acc']:.1%} of the images. finetune-predict writes every "
                   f"class at or above its threshold.")),
            ("table", ["class", "AP", "threshold", "precision", "recall", "F1", "images with it"], rows)]


def _add_calibration(run_dir: Path, metrics: dict[str, Any], blocks: list[Block], problems: list,
                     files: dict[str, Any]) -> None:
    """Temperature scaling: T, ECE and NLL before/after per split, and the reliability diagram (test, else val)."""
    c = metrics.get("calibration") or {}
    if "skipped" in c:
        blocks += [("h", "Calibration"), ("p", f"Not calibrated: {c['skipped']}.")]
        return
    if "temperature" not in c:
        return
    split = "test" if "test" in c["reliability"] else "val"
    with _section("reliability diagram", blocks, problems):
        bins = c["reliability"][split]
        files["reliability"] = plot_reliability(bins["before"], bins["after"], Path(run_dir) / "reliability.png",
                                                f"{split} split, temperature {c['temperature']:.3f}")
        blocks += [("h", "Calibration"),
                   ("p", (f"Temperature scaling: the logits are divided by T = {c['temperature']:.3f}, fitted on "
                         f"{c['fitted_on']} after training; predictions are unchanged, the probabilities of "
                         f"finetune-eval, finetune-predict, load() and the exports are the calibrated ones. "
                         f"ECE: expected calibration error ({BINS} confidence bins).")),
                   ("img", files["reliability"], "reliability diagram"),
                   ("table", ["split", "ECE before", "ECE after", "NLL before", "NLL after"],
                    [[s, c[s]["ece_before"], c[s]["ece_after"], c[s]["nll_before"], c[s]["nll_after"]]
                     for s in ("val", "test") if s in c])]


def _open_set_blocks(metrics: dict[str, Any]) -> list[Block]:
    """The open-set threshold: which score, where it was fitted, how many known images it rejects."""
    o = metrics.get("open_set") or {}
    if "skipped" in o:
        return [("h", "Images of none of the classes"),
                ("p", f"No open-set threshold: {o['skipped']}. finetune-predict unknown= needs one.")]
    if "threshold" not in o:
        return []
    bank = f"; the bank of training features holds {o['bank_images']} images" if "bank_images" in o else ""
    return [("h", "Images of none of the classes"),
            ("p", (f"finetune-predict unknown=auto labels an image 'unknown' when its {o['score']} score is below "
                   f"{o['threshold']:.6g}: the threshold below which {100 * o['reject']:g}% of {o['fitted_on']} fell"
                   f"{bank}. unknown=P rejects another share P; the exports carry the score and threshold.")),
            ("table", ["split", "known images rejected"],
             [[s, o[f"{s}_rejected"]] for s in ("val", "test") if f"{s}_rejected" in o])]


def _add_wrong(run_dir: Path, index, split_probs: dict[str, np.ndarray], preprocessing, blocks: list[Block],
               problems: list, files: dict[str, Any]) -> None:
    if "val" not in split_probs:
        return
    with _section("most confidently wrong validation images", blocks, problems):
        wrong_png, rows = plot_wrong(index.splits["val"], split_probs["val"], index.classes, preprocessing,
                                     Path(run_dir) / "confidently_wrong.png")
        blocks.append(("h", "Most confidently wrong validation images"))
        if wrong_png:
            files["confidently_wrong"] = wrong_png
            blocks += [("img", wrong_png, "most confidently wrong validation images"),
                       ("table", ["path", "true", "predicted", "confidence"],
                        [[r["path"], r["true"], r["predicted"], r["confidence"]] for r in rows])]
        else:
            blocks.append(("p", "None: every validation image is classified correctly."))


def write_report(run_dir: Path, *, index, record: dict[str, Any], metrics: dict[str, Any], cfg: Any,
                 policy_block: str, split_probs: dict[str, np.ndarray], preprocessing) -> dict[str, Any]:
    """Write report.md, report.html and their PNGs into ``run_dir``; returns the written files, and
    under "problems" the figures that could not be drawn (the report is written without them)."""
    files: dict[str, Any] = {}
    blocks = _summary_blocks(run_dir, metrics, cfg)
    problems: list[str] = []  # figures that could not be drawn (the data check's findings are its own)
    blocks += _dataset_blocks(run_dir, index)
    blocks += [("h", "Transfer policy"), ("pre", policy_block)]
    blocks += _recipe_blocks(run_dir, metrics, cfg)
    _add_curves(run_dir, metrics.get("lr_reductions") or [], blocks, problems, files)
    if index.multilabel:
        blocks += _multilabel_blocks(index, metrics, split_probs)
    else:
        _add_per_class(run_dir, index, metrics, split_probs, blocks, problems, files)
        _add_calibration(run_dir, metrics, blocks, problems, files)
        blocks += _open_set_blocks(metrics)
        _add_wrong(run_dir, index, split_probs, preprocessing, blocks, problems, files)

    write_text(Path(run_dir) / "report.md", to_markdown(blocks))
    write_text(Path(run_dir) / "report.html", to_html(blocks, f"finetune run {Path(run_dir).name}"))
    files["report_md"], files["report_html"] = Path(run_dir) / "report.md", Path(run_dir) / "report.html"
    if problems:
        files["problems"] = problems
    return files

"""Use a trained checkpoint on its own: score it on a labelled folder, or predict on new images.

The checkpoint carries the backbone name, classes and preprocessing, so nothing else is needed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from finetune.config import check_known_keys
from finetune.data.datasets import DatasetIndex, scan_dataset, scan_inputs
from finetune.data.folders import IMAGE_EXTENSIONS
from finetune.data.tta import check_tta
from finetune.errors import FinetuneError, close_matches
from finetune.members import (
    checkpoint_inputs,
    device_for,
    load_members,
    member_probabilities,
    multilabel_thresholds,
    resolve_members,
    score_probabilities,
)
from finetune.open_set import UNKNOWN_LABEL, parse_unknown, unknown_setup
from finetune.outputs import check_output, write_output
from finetune.run_files import readable
from finetune.run_folder import resolve_run_dir


def _split_to_score(index: DatasetIndex, split: str) -> str:
    if split == "auto":
        return next(s for s in ("test", "val", "train") if s in index.splits)
    if split not in index.splits:
        raise FinetuneError(f"split={split} does not exist under data.root={index.root}; "
                            f"it has {', '.join(index.splits)}.")
    return split


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FinetuneError(f"{key}={value} must be a positive integer.")
    return value


def _checked_device(accelerator: Any) -> torch.device:
    """device_for, refusing what it would otherwise quietly replace by the CPU."""
    name = str(accelerator)
    if name not in ("auto", "cpu", "cuda", "gpu"):
        raise FinetuneError(f"accelerator={name} is not one of auto, cpu, cuda, gpu."
                            f"{close_matches(name, ('auto', 'cpu', 'cuda', 'gpu'))}")
    if name in ("cuda", "gpu") and not torch.cuda.is_available():
        raise FinetuneError(f"accelerator={name}, but torch sees no CUDA GPU here; use accelerator=cpu (or auto).")
    return device_for(name)


def _split_samples(index: DatasetIndex, split: str, classes: list[str], root: Any) -> list[tuple[str, int]]:
    unknown = [c for c in index.classes if c not in classes]
    if unknown:
        raise FinetuneError(
            f"data.root={root} has classes the checkpoint does not know: {', '.join(unknown)}. "
            f"The checkpoint's classes: {', '.join(classes)}."
        )
    to_ckpt = [classes.index(c) for c in index.classes]
    if index.multilabel:
        return [(path, tuple(sorted(to_ckpt[c] for c in label))) for path, label in index.splits[split]]
    return [(path, to_ckpt[label]) for path, label in index.splits[split]]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Accuracy and loss of ``cfg.ckpt`` (one checkpoint, or an ensemble averaged) on ``cfg.data.root``,
    with optional test-time augmentation; written to RUN/eval_metrics.json (an earlier one is kept unless
    ``overwrite=true``). Unreadable images are left out of the scores and listed under "skipped".
    A failed evaluation without run_dir leaves no empty outputs/eval/<date>/<time>/ behind."""
    try:
        return _evaluate(cfg)
    except BaseException:
        if not cfg.run_dir:
            _remove_empty_default_folder()
        raise


def _remove_empty_default_folder() -> None:
    """Hydra's outputs/eval/<date>/<time>/ (created before the command starts) and its parents up to the working
    directory, as long as they are empty: the command failed before writing anything there."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder, cwd = Path(HydraConfig.get().runtime.output_dir).absolute(), Path.cwd().absolute()
    while folder != cwd and cwd in folder.parents:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return
        folder = folder.parent


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    check_known_keys(cfg, "eval")
    tta = check_tta(cfg.tta)
    batch_size = _positive_int(cfg.data.batch_size, "data.batch_size")
    if isinstance(cfg.data.num_workers, bool) or not isinstance(cfg.data.num_workers, int) or cfg.data.num_workers < 0:
        raise FinetuneError(f"data.num_workers={cfg.data.num_workers} must be 0 (load in this process) or a "
                            f"positive integer.")
    device = _checked_device(cfg.accelerator)
    # The run folder first (it is created here): a bad run_dir fails before the checkpoint is loaded.
    try:
        run_dir = resolve_run_dir(cfg, purpose="finetune-eval writes eval_metrics.json there")
    except OSError as e:
        raise FinetuneError(f"run_dir={cfg.run_dir} cannot be created: {e.strerror or e} ({e.filename}). "
                            f"Choose another run_dir.") from None
    output = run_dir / "eval_metrics.json"
    if output.is_file() and not cfg.overwrite:
        raise FinetuneError(f"run_dir={cfg.run_dir or run_dir} already holds an eval_metrics.json (an earlier "
                            f"evaluation); pass overwrite=true to replace it, or choose another run_dir.")
    output = check_output(output, checkpoint_inputs(cfg.ckpt, resolve_members(cfg.ckpt)), overwrite=True,
                          key="run_dir")
    members = load_members(cfg.ckpt)
    # One class is fine here: scoring a checkpoint on a folder of a single class is a real use.
    index = scan_dataset(cfg.data.root, val_fraction=0.0, test_fraction=0.0, min_classes=1,
                         task=members[0].module.recipe.task)
    split = _split_to_score(index, cfg.split)
    samples = _split_samples(index, split, members[0].classes, cfg.data.root)
    skipped: dict[str, str] = {}
    probs = member_probabilities(members, samples, tta, batch_size, device, cfg.data.num_workers, skipped=skipped)
    if skipped:
        _report_skipped(skipped, f"data.root={cfg.data.root}", len(samples))
        if len(skipped) == len(samples):
            raise FinetuneError(f"none of the {len(samples)} images of data.root={cfg.data.root} ({split}) could be "
                                f"read (e.g. {': '.join(next(iter(skipped.items())))}); nothing was scored.")
        keep = [i for i, (path, _) in enumerate(samples) if path not in skipped]
        probs, samples = probs[:, keep], [samples[i] for i in keep]
    scores = score_probabilities(probs, [label for _, label in samples], multilabel_thresholds(cfg.ckpt, members),
                                 members[0].classes)
    metrics = {
        "ckpt": ([str(Path(m.path).resolve()) for m in members] if len(members) > 1
                 else str(Path(members[0].path).resolve())),
        "data_root": index.root,
        "split": "all" if index.layout == "class_folders" else split,
        "images": len(samples),
        "tta": tta,
        **scores,
        "skipped": [{"path": path, "error": why} for path, why in skipped.items()],
    }
    write_output(output, json.dumps(metrics, indent=2) + "\n", key="run_dir", overwrite=bool(cfg.overwrite))
    what = f"ensemble of {len(members)}" if len(members) > 1 else "checkpoint"
    member_scores = scores.get("member_acc") or scores.get("member_map")
    extra = f" (members {', '.join(f'{a:.4f}' for a in member_scores)})" if member_scores else ""
    headline = (f"mAP {metrics['map']:.4f}, micro F1 {metrics['micro_f1']:.4f} at the per-class thresholds, "
                f"every label right {metrics['acc']:.4f}" if "map" in metrics else f"Accuracy {metrics['acc']:.4f}")
    print(f"{headline}, loss {metrics['loss']:.4f} on {len(samples)} images "
          f"({metrics['split']} of {index.root}; {what}{', TTA ' + '+'.join(tta) if tta else ''}){extra}")
    print(f"Written: {run_dir / 'eval_metrics.json'}")
    return metrics


def _scan_input_list(value: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """Images under ``input`` (a file, a folder, or a list of them; each image once, in order), and the
    (description, path) pairs an output must never replace."""
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not items or any(item in (None, "", "???") for item in items):
        raise FinetuneError("input is not set: pass input=IMAGE_OR_FOLDER, or a list: input=[a.jpg,b.jpg,DIR].")
    paths = list(dict.fromkeys(p for item in items for p in scan_inputs(item)))
    reads = [("the input " + ("folder" if Path(str(i)).expanduser().is_dir() else "image"), str(i)) for i in items]
    return paths, reads + [("an input image", p) for p in paths]


def predict(cfg: DictConfig) -> Path:
    """Top-k labels and probabilities for every image under ``cfg.input``, as a CSV (an ensemble's
    and the TTA views' probabilities averaged). With ``unknown=auto|P``, images whose open-set score falls below
    the checkpoint's threshold are labelled ``unknown`` (finetune/open_set.py), their score in ``known_score``.
    An unreadable image gets a row with an empty label and its ``error``, and is listed on the console; the rest
    are predicted. Everything that can be checked without the model (options, inputs, the output's location) is
    checked before it is loaded."""
    check_known_keys(cfg, "predict")
    tta = check_tta(cfg.tta)
    topk = _positive_int(cfg.topk, "topk")
    batch_size = _positive_int(cfg.batch_size, "batch_size")
    device = _checked_device(cfg.accelerator)
    paths, reads = _scan_input_list(cfg.input)
    output = check_output(cfg.output, checkpoint_inputs(cfg.ckpt, resolve_members(cfg.ckpt)) + reads,
                          overwrite=bool(cfg.overwrite))
    if output.suffix.lower() in IMAGE_EXTENSIONS | {".ckpt"}:
        raise FinetuneError(f"output={cfg.output} names an image or checkpoint file, but predictions are a CSV "
                            f"file; name it e.g. output=predictions.csv.")
    parse_unknown(cfg.unknown)  # a bad value fails before the model is loaded
    members = load_members(cfg.ckpt)
    unknown = unknown_setup(cfg.unknown, members, tta)
    classes = members[0].classes
    k = min(topk, len(classes))
    skipped: dict[str, str] = {}
    known: list[torch.Tensor] | None = [] if unknown else None
    probs = member_probabilities(members, [(p, -1) for p in paths], tta, batch_size, device, skipped=skipped,
                                 known=known).mean(0)
    if len(skipped) == len(paths):
        first = next(iter(skipped.items()))
        raise FinetuneError(f"none of the {len(paths)} images under input={cfg.input} could be read (e.g. {first[0]}: "
                            f"{first[1]}); nothing was written. Check that input= points at your images.")
    if members[0].multilabel:
        rows = multilabel_rows(probs, paths, skipped, classes, multilabel_thresholds(cfg.ckpt, members), k)
        write_output(output, _to_csv(rows), overwrite=bool(cfg.overwrite))
        if skipped:
            _report_skipped(skipped, f"input={cfg.input}", len(paths))
        print(f"Predicted {len(paths) - len(skipped)} image(s) -> {output.resolve()} (every class at or above its "
              f"threshold in `labels`){f'; {len(skipped)} unreadable, listed with their error' if skipped else ''}")
        return output
    header = ["path", "label", "probability"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")]
    header += ["known_score"] if unknown else []
    rows = [header + ["error"]]
    top = probs.topk(k, dim=-1)
    scores = torch.cat(known).tolist() if known else [None] * len(paths)
    rejected = 0
    for path, values, indices, score in zip(paths, top.values.tolist(), top.indices.tolist(), scores):
        if path in skipped:
            rows.append([path] + [""] * (len(header) - 1) + [skipped[path]])
            continue
        ranked = [x for i, v in zip(indices, values) for x in (classes[i], f"{v:.6f}")]
        label = ranked[0]
        if unknown and score < unknown[0]:  # top-k still says what it would have been
            label, rejected = UNKNOWN_LABEL, rejected + 1
        rows.append([path, label, ranked[1], *ranked, *([f"{score:.6f}"] if unknown else []), ""])
    write_output(output, _to_csv(rows), overwrite=bool(cfg.overwrite))
    if skipped:
        _report_skipped(skipped, f"input={cfg.input}", len(paths))
    print(f"Predicted {len(paths) - len(skipped)} image(s) -> {output.resolve()}"
          f"{f' ({len(skipped)} unreadable, listed with their error)' if skipped else ''}")
    if unknown:
        record = members[0].open_set
        print(f"Labelled {rejected} of {len(paths) - len(skipped)} image(s) '{UNKNOWN_LABEL}': their {record['score']} "
              f"score is below {unknown[0]:.6g}, which {100 * unknown[1]:g}% of the {len(record['val_scores'])} known "
              f"validation images fell below.")
    return output


def multilabel_records(probs: torch.Tensor, paths: list[str], skipped: dict[str, str], classes: list[str],
                       thresholds: list[float] | None, k: int) -> list[dict[str, Any]]:
    """Per image: every class at or above its threshold (``labels``, ``probabilities``, most probable first),
    the k most probable classes whatever their threshold (label_i, prob_i), and the error ('' when read)."""
    from finetune.multilabel import labels_above

    records = []
    for path, p in zip(paths, probs.tolist()):
        record: dict[str, Any] = {"path": path, "labels": [], "probabilities": []}
        if path not in skipped:
            above = labels_above(p, classes, thresholds)
            record |= {"labels": [c for c, _ in above], "probabilities": [v for _, v in above]}
        for rank, c in enumerate(sorted(range(len(classes)), key=lambda c: -p[c])[:k], 1):
            record[f"label_{rank}"], record[f"prob_{rank}"] = ("", None) if path in skipped else (classes[c], p[c])
        records.append(record | {"error": skipped.get(path, "")})
    return records


def multilabel_rows(probs: torch.Tensor, paths: list[str], skipped: dict[str, str], classes: list[str],
                    thresholds: list[float] | None, k: int) -> list[list[Any]]:
    """:func:`multilabel_records` as CSV rows (a header first; several labels and probabilities ;-joined)."""
    records = multilabel_records(probs, paths, skipped, classes, thresholds, k)
    rows: list[list[Any]] = [list(records[0])]
    for r in records:
        rows.append([r["path"], ";".join(r["labels"]), ";".join(f"{v:.6f}" for v in r["probabilities"]),
                     *(("" if v is None else f"{v:.6f}" if isinstance(v, float) else v)
                       for key, v in r.items() if key.startswith(("label_", "prob_"))), r["error"]])
    return rows


def _report_skipped(skipped: dict[str, str], where: str, total: int, show: int = 20) -> None:
    """Printed (not only logged) so it is seen next to the result line whatever the logging setup."""
    lines = [f"  {path}: {why}" for path, why in list(skipped.items())[:show]]
    more = [f"  ... and {len(skipped) - show} more"] if len(skipped) > show else []
    print(readable("\n".join([f"Skipped {len(skipped)} of {total} image(s) under {where} that could not be read:",
                               *lines, *more])))


def _to_csv(rows: list[list[Any]]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()

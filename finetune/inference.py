"""Use a trained checkpoint on its own: score it on a labelled folder, or predict on new images.

The checkpoint carries the backbone name, classes and preprocessing, so nothing else is needed.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader

from finetune.config import resolve_run_dir
from finetune.data.datamodule import ImageListDataset, decode_side
from finetune.data.datasets import DatasetIndex, scan_dataset, scan_inputs
from finetune.data.transforms import eval_transform
from finetune.errors import FinetuneError, close_matches
from finetune.models.checkpoint import LoadedCheckpoint, load_classifier, read_checkpoint
from finetune.run_files import write_json, write_text

log = logging.getLogger(__name__)

# A run folder's list of member checkpoints (an ensemble or snapshot ensemble), relative to it.
ENSEMBLE_FILE = "ensemble.json"


def _split_to_score(index: DatasetIndex, split: str) -> str:
    if split == "auto":
        return next(s for s in ("test", "val", "train") if s in index.splits)
    if split not in index.splits:
        raise FinetuneError(f"split={split} does not exist under data.root={index.root}; it has {', '.join(index.splits)}.")
    return split


TTA_VIEWS = ("hflip", "vflip", "five_crop")


def check_tta(tta: Any, key: str = "tta") -> list[str]:
    views = [str(v) for v in (tta or [])]
    for view in views:
        if view not in TTA_VIEWS:
            raise FinetuneError(f"{key}: '{view}' is not a test-time view; choose from {', '.join(TTA_VIEWS)}.{close_matches(view, TTA_VIEWS)}")
    return views


def tta_batches(x: torch.Tensor, views: Sequence[str]) -> list[torch.Tensor]:
    """The batch itself and its test-time views (same size, already normalised)."""
    out = [x]
    if "hflip" in views:
        out.append(x.flip(-1))
    if "vflip" in views:
        out.append(x.flip(-2))
    if "five_crop" in views:
        h, w = x.shape[-2:]
        ch, cw = max(1, round(h * 0.875)), max(1, round(w * 0.875))
        top, left = (h - ch) // 2, (w - cw) // 2
        for i, j in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (top, left)):
            out.append(F.interpolate(x[..., i:i + ch, j:j + cw], size=(h, w), mode="bilinear", align_corners=False))
    return out


def resolve_members(ckpt: Any, key: str = "ckpt") -> list[str]:
    """Checkpoint paths from ``ckpt``: a .ckpt file, a list of them, or a run folder (its ensemble's
    members from ensemble.json, else the checkpoint its metrics.json says the run scored, else best.ckpt)."""
    if isinstance(ckpt, (list, tuple, ListConfig)):
        return [p for item in ckpt for p in resolve_members(item, key)]
    if ckpt in (None, "", "???"):
        read_checkpoint(None, key)  # the standard "not set" error
    path = Path(str(ckpt)).expanduser()
    if path.is_dir():
        listing = path / ENSEMBLE_FILE
        if listing.is_file():
            return [str(path / m) if not Path(m).is_absolute() else m for m in json.loads(listing.read_text())["members"]]
        return [str(_scored_checkpoint(path))]
    return [str(path)]


def _scored_checkpoint(run: Path) -> Path:
    """RUN/checkpoints/<the file the run scored> (best.ckpt or last.ckpt, see score_checkpoint), looked up
    by name inside ``run`` so a moved run folder still resolves; best.ckpt for runs without that record."""
    try:
        scored = json.loads((run / "metrics.json").read_text()).get("scored_checkpoint")
    except (OSError, ValueError):
        scored = None
    candidate = run / "checkpoints" / Path(str(scored)).name if scored else None
    return candidate if candidate is not None and candidate.is_file() else run / "checkpoints" / "best.ckpt"


def load_members(ckpt: Any, key: str = "ckpt") -> list[LoadedCheckpoint]:
    """Every member checkpoint, checked to agree on classes and preprocessing (so they can be averaged)."""
    members = [load_classifier(p, key) for p in resolve_members(ckpt, key)]
    first = members[0]
    for other in members[1:]:
        if other.classes != first.classes or other.preprocessing != first.preprocessing:
            raise FinetuneError(
                f"{key}: {other.path} and {first.path} cannot be averaged: their classes or preprocessing differ."
            )
    return members


def device_for(accelerator: str) -> torch.device:
    use_cuda = str(accelerator) in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def member_probabilities(members: Sequence[LoadedCheckpoint], samples: Sequence[tuple[str, int]], tta: Sequence[str],
                         batch_size: int, device: torch.device, num_workers: int = 0) -> torch.Tensor:
    """Softmax probabilities [members, images, classes], each averaged over the TTA views."""
    pp = members[0].preprocessing
    loader = DataLoader(ImageListDataset(samples, eval_transform(pp), max_side=decode_side(pp)),
                        batch_size=batch_size, num_workers=num_workers)
    per_member = []
    for member in members:
        module = member.module.to(device).eval()
        chunks = []
        with torch.inference_mode():
            for images, _ in loader:
                views = tta_batches(images.to(device), tta)
                chunks.append(torch.stack([module(v).softmax(dim=-1) for v in views]).mean(0).cpu())
        per_member.append(torch.cat(chunks))
    return torch.stack(per_member)


def score_probabilities(probs: torch.Tensor, labels: Sequence[int]) -> dict[str, Any]:
    """Accuracy and NLL of the averaged probabilities, and of each member when there are several."""
    y = torch.as_tensor(list(labels))
    mean = probs.mean(0)
    scores: dict[str, Any] = {
        "acc": float((mean.argmax(-1) == y).float().mean()),
        "loss": float(-mean.gather(1, y[:, None]).clamp_min(1e-12).log().mean()),
    }
    if len(probs) > 1:
        members = [float((p.argmax(-1) == y).float().mean()) for p in probs]
        scores["member_acc"] = members
        scores["mean_member_acc"] = sum(members) / len(members)
    return scores


def _split_samples(index: DatasetIndex, split: str, classes: list[str], root: Any) -> list[tuple[str, int]]:
    unknown = [c for c in index.classes if c not in classes]
    if unknown:
        raise FinetuneError(
            f"data.root={root} has classes the checkpoint does not know: {', '.join(unknown)}. "
            f"The checkpoint's classes: {', '.join(classes)}."
        )
    to_ckpt = [classes.index(c) for c in index.classes]
    return [(path, to_ckpt[label]) for path, label in index.splits[split]]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Accuracy and loss of ``cfg.ckpt`` (one checkpoint, or an ensemble averaged) on ``cfg.data.root``,
    with optional test-time augmentation; written to RUN/eval_metrics.json."""
    tta = check_tta(cfg.get("tta"))
    members = load_members(cfg.ckpt)
    # One class is fine here: scoring a checkpoint on a folder of a single class is a real use.
    index = scan_dataset(cfg.data.root, val_fraction=0.0, test_fraction=0.0, min_classes=1)
    split = _split_to_score(index, cfg.split)
    samples = _split_samples(index, split, members[0].classes, cfg.data.root)
    probs = member_probabilities(members, samples, tta, cfg.data.batch_size, device_for(cfg.accelerator),
                                 cfg.data.num_workers)
    scores = score_probabilities(probs, [label for _, label in samples])
    metrics = {
        "ckpt": [str(Path(m.path).resolve()) for m in members] if len(members) > 1 else str(Path(members[0].path).resolve()),
        "data_root": index.root,
        "split": "all" if index.layout == "class_folders" else split,
        "images": len(samples),
        "tta": tta,
        **scores,
    }
    run_dir = resolve_run_dir(cfg)
    write_json(run_dir / "eval_metrics.json", metrics)
    what = f"ensemble of {len(members)}" if len(members) > 1 else "checkpoint"
    extra = f" (members {', '.join(f'{a:.4f}' for a in scores['member_acc'])})" if len(members) > 1 else ""
    print(f"Accuracy {metrics['acc']:.4f}, loss {metrics['loss']:.4f} on {len(samples)} images "
          f"({metrics['split']} of {index.root}; {what}{', TTA ' + '+'.join(tta) if tta else ''}){extra}")
    print(f"Written: {run_dir / 'eval_metrics.json'}")
    return metrics


def predict(cfg: DictConfig) -> Path:
    """Top-k labels and probabilities for every image under ``cfg.input``, as a CSV (an ensemble's
    and the TTA views' probabilities averaged)."""
    tta = check_tta(cfg.get("tta"))
    members = load_members(cfg.ckpt)
    classes = members[0].classes
    paths = scan_inputs(cfg.input)
    if not (isinstance(cfg.topk, int) and cfg.topk >= 1):
        raise FinetuneError(f"topk={cfg.topk} must be a positive integer.")
    k = min(cfg.topk, len(classes))
    probs = member_probabilities(members, [(p, -1) for p in paths], tta, cfg.batch_size, device_for(cfg.accelerator)).mean(0)
    header = ["path", "label", "probability"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")]
    rows = [header]
    top = probs.topk(k, dim=-1)
    for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
        ranked = [x for i, v in zip(indices, values) for x in (classes[i], f"{v:.6f}")]
        rows.append([path, ranked[0], ranked[1], *ranked])
    output = Path(cfg.output).expanduser()
    write_text(output, _to_csv(rows))
    print(f"Predicted {len(paths)} image(s) -> {output.resolve()}")
    return output


def _to_csv(rows: list[list[Any]]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()

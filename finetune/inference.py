"""Use a trained checkpoint on its own: score it on a labelled folder, or predict on new images.

The checkpoint carries the backbone name, classes and preprocessing, so nothing else is needed.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from finetune.config import resolve_run_dir
from finetune.data.datamodule import ImageListDataset, decode_side
from finetune.data.datasets import DatasetIndex, scan_dataset, scan_inputs
from finetune.data.transforms import eval_transform
from finetune.errors import FinetuneError
from finetune.models.checkpoint import load_classifier
from finetune.run_files import write_json, write_text

log = logging.getLogger(__name__)


def _split_to_score(index: DatasetIndex, split: str) -> str:
    if split == "auto":
        return next(s for s in ("test", "val", "train") if s in index.splits)
    if split not in index.splits:
        raise FinetuneError(f"split={split} does not exist under data.root={index.root}; it has {', '.join(index.splits)}.")
    return split


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Accuracy and loss of ``cfg.ckpt`` on ``cfg.data.root``; written to RUN/eval_metrics.json."""
    loaded = load_classifier(cfg.ckpt)
    # One class is fine here: scoring a checkpoint on a folder of a single class is a real use.
    index = scan_dataset(cfg.data.root, val_fraction=0.0, test_fraction=0.0, min_classes=1)
    split = _split_to_score(index, cfg.split)
    unknown = [c for c in index.classes if c not in loaded.classes]
    if unknown:
        raise FinetuneError(
            f"data.root={cfg.data.root} has classes the checkpoint does not know: {', '.join(unknown)}. "
            f"The checkpoint's classes: {', '.join(loaded.classes)}."
        )
    to_ckpt = [loaded.classes.index(c) for c in index.classes]
    samples = [(path, to_ckpt[label]) for path, label in index.splits[split]]
    loader = DataLoader(
        ImageListDataset(samples, eval_transform(loaded.preprocessing), max_side=decode_side(loaded.preprocessing)),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
    )
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    results = trainer.test(loaded.module, dataloaders=loader, verbose=False)[0]
    metrics = {
        "ckpt": str(Path(cfg.ckpt).resolve()),
        "data_root": index.root,
        "split": "all" if index.layout == "class_folders" else split,
        "images": len(samples),
        "acc": float(results["test/acc"]),
        "loss": float(results["test/loss"]),
    }
    run_dir = resolve_run_dir(cfg)
    write_json(run_dir / "eval_metrics.json", metrics)
    print(f"Accuracy {metrics['acc']:.4f}, loss {metrics['loss']:.4f} on {len(samples)} images "
          f"({metrics['split']} of {index.root})")
    print(f"Written: {run_dir / 'eval_metrics.json'}")
    return metrics


def predict(cfg: DictConfig) -> Path:
    """Top-k labels and probabilities for every image under ``cfg.input``, as a CSV."""
    loaded = load_classifier(cfg.ckpt)
    paths = scan_inputs(cfg.input)
    if not (isinstance(cfg.topk, int) and cfg.topk >= 1):
        raise FinetuneError(f"topk={cfg.topk} must be a positive integer.")
    k = min(cfg.topk, len(loaded.classes))
    device = torch.device("cuda" if cfg.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available() else "cpu")
    module = loaded.module.to(device)
    loader = DataLoader(ImageListDataset([(p, -1) for p in paths], eval_transform(loaded.preprocessing),
                                         max_side=decode_side(loaded.preprocessing)),
                        batch_size=cfg.batch_size)
    header = ["path", "label", "probability"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")]
    rows = [header]
    seen = 0
    with torch.inference_mode():
        for images, _ in loader:
            probs = module(images.to(device)).softmax(dim=-1).cpu()
            top = probs.topk(k, dim=-1)
            for values, indices in zip(top.values.tolist(), top.indices.tolist()):
                ranked = [x for i, v in zip(indices, values) for x in (loaded.classes[i], f"{v:.6f}")]
                rows.append([paths[seen], ranked[0], ranked[1], *ranked])
                seen += 1
    output = Path(cfg.output).expanduser()
    write_text(output, _to_csv(rows))
    print(f"Predicted {seen} image(s) -> {output.resolve()}")
    return output


def _to_csv(rows: list[list[Any]]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()

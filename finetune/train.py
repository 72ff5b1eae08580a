"""``train(cfg) -> metrics``: the whole pipeline as one pure function (the CLI is a thin wrapper).

scan data -> backbone + weights -> preprocessing -> datamodule -> LightningModule -> Trainer.fit
-> best checkpoint scored on val (and test) -> run folder: config.yaml, classes.json, metrics.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from finetune.config import (
    build_optimizer_and_scheduler,
    instantiate_named,
    resolve_run_dir,
    validate_train_config,
)
from finetune.data.datamodule import ImageDataModule
from finetune.data.datasets import scan_dataset
from finetune.data.transforms import resolve_preprocessing
from finetune.models.backbone import create_backbone
from finetune.models.module import ImageClassifier
from finetune.run_files import write_json, write_text

log = logging.getLogger(__name__)


def count_parameters(module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total - trainable


def _scores(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg`` and return the metrics also written to ``RUN/metrics.json``."""
    validate_train_config(cfg)
    run_dir = resolve_run_dir(cfg)
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(run_dir)
    OmegaConf.set_struct(cfg, True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    index = scan_dataset(cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    log.info("Dataset: %s", index.summary())
    net, spec, weight_source = create_backbone(
        cfg.model.backbone, cfg.model.weights, len(index.classes), **OmegaConf.to_container(cfg.model.kwargs)
    )
    preprocessing = resolve_preprocessing(net, cfg.data)
    log.info("Preprocessing (from %s's pretrained config unless overridden): %s", spec.name, preprocessing.to_dict())

    datamodule = ImageDataModule(
        index,
        preprocessing,
        augment=OmegaConf.to_container(cfg.augment, resolve=True),
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        preload=cfg.data.preload,
        preload_max_gb=cfg.data.preload_max_gb,
    )
    optimizer, scheduler, scheduler_options = build_optimizer_and_scheduler(cfg)
    module = ImageClassifier(net, spec, index.classes, preprocessing, optimizer, scheduler, scheduler_options)
    trainable, frozen = count_parameters(module)
    log.info("Parameters: %s trainable, %s frozen", f"{trainable:,}", f"{frozen:,}")

    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / "classes.json", index.classes)

    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(run_dir),
        logger=instantiate_named("logger", cfg.get("logger")) or False,
        callbacks=instantiate_named("callbacks", cfg.get("callbacks")),
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started

    best = _best_checkpoint(trainer)
    metrics: dict[str, Any] = {}
    metrics.update(_scores(trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)))
    if datamodule.has_split("test"):
        metrics.update(_scores(trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)))
    metrics.update(
        {
            "epochs": int(trainer.current_epoch),
            "fit_seconds": round(fit_seconds, 2),
            "best_checkpoint": best,
            "run_dir": str(run_dir),
            "weights": weight_source,
            "parameters": {"trainable": trainable, "frozen": frozen},
            "images": {split: len(s) for split, s in index.splits.items()},
        }
    )
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val/acc", "test/acc") if k in metrics)
        log.info("Finished in %.1f s (%d epochs): %s", fit_seconds, metrics["epochs"], summary)
    return metrics


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint's path, or None (then the final weights are scored) when none was kept."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path if path and Path(path).is_file() else None

"""``train(cfg) -> metrics``: the whole pipeline as one pure function (the CLI is a thin wrapper).

scan data -> backbone + weights -> preprocessing -> policy (measure, decide, plan) -> head ->
datamodule (images, or cached features) -> LightningModule -> Trainer.fit -> best checkpoint scored
on val (and test) -> run folder: config.yaml, classes.json, policy.json, metrics.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
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
from finetune.models.backbone import BackboneSpec, attach_head, check_backbone_name, load_pretrained
from finetune.models.module import ImageClassifier
from finetune.policy.cache import CachedFeatureDataModule, warm_start_head
from finetune.policy.choose import choose_policy, format_policy_block
from finetune.policy.stages import build_stage_map
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
    check_backbone_name(cfg.model.backbone)  # a typo fails before any data is read
    resume = resume_checkpoint(cfg.get("resume"))
    if resume and not cfg.get("run_dir") and Path(str(cfg.resume)).is_dir():
        cfg = _with_value(cfg, "run_dir", str(Path(str(cfg.resume)).resolve()))  # continue in that folder
    run_dir = resolve_run_dir(cfg)
    cfg = _with_value(cfg, "run_dir", str(run_dir))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Built before the heavy work, so a bad logger or callback fails in a second, not after measuring.
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(run_dir),
        logger=instantiate_named("logger", cfg.get("logger")) or False,
        callbacks=instantiate_named("callbacks", cfg.get("callbacks")),
    )

    index = scan_dataset(cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    log.info("Dataset: %s", index.summary())
    kwargs = OmegaConf.to_container(cfg.model.kwargs)
    backbone, weight_source, pretrained_head = load_pretrained(cfg.model.backbone, cfg.model.weights, **kwargs)
    preprocessing = resolve_preprocessing(backbone, cfg.data)
    log.info("Preprocessing (from %s's pretrained config unless overridden): %s", cfg.model.backbone, preprocessing.to_dict())

    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    choice = choose_policy(policy_cfg, backbone, index, preprocessing, pretrained_head, cfg.seed)
    plan = choice.plan
    spec = BackboneSpec(cfg.model.backbone, len(index.classes), kwargs, plan.cut_after_stage)
    net = attach_head(backbone, spec)
    stage_map = build_stage_map(net)
    augment = OmegaConf.to_container(cfg.augment, resolve=True)
    use_cache, cache_note = _cache_decision(policy_cfg, plan, augment)
    datamodule = ImageDataModule(
        index,
        preprocessing,
        augment=None if use_cache else augment,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        preload=cfg.data.preload,
        preload_max_gb=cfg.data.preload_max_gb,
    )
    optimizer, scheduler, scheduler_options = build_optimizer_and_scheduler(cfg)
    module = ImageClassifier(
        net, spec, index.classes, preprocessing, optimizer, scheduler, scheduler_options,
        plan=plan, stage_map=stage_map, frozen_bn_eval=bool(policy_cfg.get("frozen_bn_eval", True)),
        inputs_are_features=use_cache, head_solver=str(policy_cfg.get("head_solver", "lbfgs")),
        head_l2=float(policy_cfg.get("head_l2", 0.0)),
    )
    data = CachedFeatureDataModule(datamodule, net, full_batch=module.head_solver == "lbfgs") if use_cache else datamodule
    if not use_cache and "head" in plan.unfreeze_at and bool(policy_cfg.get("head_warm_start", False)) and not resume:
        warm_start_head(net, datamodule, float(policy_cfg.get("head_l2", 0.0)))
    trainable, frozen = count_parameters(module)
    record = choice.record() | {
        "parameters": {"trainable": trainable, "frozen": frozen, "per_group": stage_map.parameter_counts(net)},
        "feature_cache": {"used": use_cache, "why": cache_note, "head_solver": module.head_solver if use_cache else None},
        "notes": [cache_note] if use_cache and augment_is_active(augment) else [],
    }
    log.info("\n%s", format_policy_block(record))

    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / "classes.json", index.classes)
    if rank_zero_only.rank == 0:
        write_json(run_dir / "policy.json", record)

    started = time.perf_counter()
    if resume:
        log.info("Resuming from %s", resume)
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    fit_seconds = time.perf_counter() - started

    best = _best_checkpoint(trainer)
    metrics: dict[str, Any] = {}
    metrics.update(_scores(trainer.validate(module, datamodule=data, ckpt_path=best, verbose=False, weights_only=True)))
    if data.has_split("test"):
        metrics.update(_scores(trainer.test(module, datamodule=data, ckpt_path=best, verbose=False, weights_only=True)))
    metrics.update(
        {
            "epochs": int(trainer.current_epoch),
            "fit_seconds": round(fit_seconds, 2),
            "best_checkpoint": best,
            "run_dir": str(run_dir),
            "weights": weight_source,
            "policy": plan.policy,
            "parameters": {"trainable": trainable, "frozen": frozen},
            "images": {split: len(s) for split, s in index.splits.items()},
        }
    )
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val/acc", "test/acc") if k in metrics)
        log.info("Finished in %.1f s (%d epochs): %s", fit_seconds, metrics["epochs"], summary)
    return metrics


def _with_value(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    """A copy of ``cfg`` with one top-level value set (the composed config is in struct mode)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg[key] = value
    OmegaConf.set_struct(cfg, True)
    return cfg


def resume_checkpoint(resume: str | None) -> str | None:
    """The checkpoint to resume from: a .ckpt file, or RUN_DIR/checkpoints/last.ckpt; checked first."""
    if not resume:
        return None
    from finetune.models.checkpoint import read_checkpoint

    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    read_checkpoint(path, key="resume")  # a clear error for a missing, foreign or unsafe file
    return str(path)


def augment_is_active(augment: dict[str, Any] | None) -> bool:
    return bool(augment) and (augment.get("crop", "center") != "center" or bool(augment.get("transforms")))


def _cache_decision(policy_cfg: dict[str, Any], plan, augment: dict[str, Any] | None) -> tuple[bool, str]:
    """Cache frozen features when only the head trains (and the user did not turn caching off)."""
    if not plan.head_only:
        return False, "not used: layers below the head train, so features change every step"
    if str(policy_cfg.get("cache", "auto")).lower() in ("false", "off", "no"):
        return False, "off (policy.cache=false): the head trains through the frozen network every epoch"
    if augment_is_active(augment):
        return True, (
            "used: only the head trains, so the frozen network runs once; the configured augmentation "
            "is NOT applied to the cached training features (set policy.cache=false to train with it every epoch)"
        )
    return True, "used: only the head trains, so the frozen network runs once over the data"


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint's path, or None (then the final weights are scored) when none was kept."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path if path and Path(path).is_file() else None

"""``train(cfg) -> metrics``: the whole pipeline as one pure function (the CLI is a thin wrapper).

scan data -> backbone + weights -> preprocessing -> policy (measure, decide, plan) -> head ->
datamodule (images, or cached features) -> LightningModule -> Trainer.fit -> best or last checkpoint scored
on val (and test) -> run folder: config.yaml, classes.json, policy.json, metrics.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
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
from finetune.data.mixing import build_batch_mixer
from finetune.data.transforms import resolve_preprocessing
from finetune.data.validate import validate_dataset
from finetune.errors import FinetuneError
from finetune.inference import ENSEMBLE_FILE, device_for, load_members, member_probabilities, score_probabilities
from finetune.models.backbone import BackboneSpec, attach_head, check_backbone_name, load_pretrained
from finetune.models.module import ImageClassifier
from finetune.policy.cache import CachedFeatureDataModule, warm_start_head
from finetune.policy.choose import choose_policy, format_policy_block
from finetune.policy.stages import build_stage_map
from finetune.preview import write_preview
from finetune.recipe.callbacks import (
    LRTrace,
    NonFiniteLossStop,
    PlateauReductionLog,
    RNGStateCheckpoint,
    SnapshotCheckpoint,
    plateau_scheduler,
)
from finetune.recipe.regularization import Regularization
from finetune.recipe.schedulers import cycle_end_epochs
from finetune.report import write_report
from finetune.run_files import atomic_checkpoint_io, write_json, write_text

log = logging.getLogger(__name__)


def count_parameters(module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total - trainable


def _scores(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg`` and return the metrics also written to ``RUN/metrics.json``
    (``ensemble.size`` > 1: train the members, then score their average)."""
    validate_train_config(cfg)
    check_backbone_name(cfg.model.backbone)  # a typo fails before any data is read
    if int(cfg.ensemble.size) > 1:
        return train_ensemble(cfg)
    return train_single(cfg)


def train_single(cfg: DictConfig) -> dict[str, Any]:
    """One model: the pipeline in the module docstring."""
    resume = resume_checkpoint(cfg.get("resume"))
    if resume and not cfg.get("run_dir") and Path(str(cfg.resume)).is_dir():
        cfg = _with_value(cfg, "run_dir", str(Path(str(cfg.resume)).resolve()))  # continue in that folder
    run_dir = resolve_run_dir(cfg)
    cfg = _with_value(cfg, "run_dir", str(run_dir))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    regularization = Regularization.from_config(OmegaConf.to_container(cfg.regularization, resolve=True))
    reductions, lr_trace = PlateauReductionLog(), LRTrace()
    callbacks = [*instantiate_named("callbacks", cfg.get("callbacks")), reductions, lr_trace,
                 NonFiniteLossStop(run_dir / "checkpoints"), RNGStateCheckpoint()]
    snapshots = None
    if cfg.ensemble.snapshots:
        epochs = cycle_end_epochs(cfg.scheduler.cycle_epochs, cfg.scheduler.cycle_mult, cfg.trainer.max_epochs)
        if len(epochs) < 2:
            raise FinetuneError(
                f"ensemble.snapshots=true needs at least two LR cycles, but scheduler.cycle_epochs="
                f"{cfg.scheduler.cycle_epochs} (cycle_mult {cfg.scheduler.cycle_mult}) fits {len(epochs)} in "
                f"trainer.max_epochs={cfg.trainer.max_epochs}. Shorten the cycles or train longer."
            )
        snapshots = SnapshotCheckpoint(run_dir / "checkpoints", epochs)
        callbacks.append(snapshots)
    # Built before the heavy work, so a bad logger or callback fails in a second, not after measuring.
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(run_dir),
        logger=instantiate_named("logger", cfg.get("logger")) or False,
        callbacks=callbacks,
        plugins=[atomic_checkpoint_io()],  # checkpoints: temp file + rename, like every run file
    )

    index = scan_dataset(cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    log.info("Dataset: %s", index.summary())
    kwargs = regularization.model_kwargs(OmegaConf.to_container(cfg.model.kwargs))
    backbone, weight_source, pretrained_head = load_pretrained(cfg.model.backbone, cfg.model.weights, **kwargs)
    preprocessing = resolve_preprocessing(backbone, cfg.data)
    log.info("Preprocessing (from %s's pretrained config unless overridden): %s", cfg.model.backbone, preprocessing.to_dict())

    index, data_report = checked_index(index, cfg, preprocessing.image_size)
    if data_report is not None and rank_zero_only.rank == 0:
        write_json(run_dir / "data_report.json", data_report.to_dict())

    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    run_id = _distributed_run_id()
    choice = _decision_of_rank_zero(run_dir, run_id, policy_cfg) if rank_zero_only.rank != 0 and run_id else None
    if choice is None:
        choice = choose_policy(policy_cfg, backbone, index, preprocessing, pretrained_head, cfg.seed)
    plan = choice.plan
    spec = BackboneSpec(cfg.model.backbone, len(index.classes), kwargs, plan.cut_after_stage, regularization.pooling)
    net = attach_head(backbone, spec)
    stage_map = build_stage_map(net)
    augment = OmegaConf.to_container(cfg.augment, resolve=True)
    use_cache, cache_note = _cache_decision(policy_cfg, plan, augment, regularization)
    head_solver = str(policy_cfg.get("head_solver", "lbfgs"))
    if use_cache and head_solver == "lbfgs" and (regularization.dropout > 0 or regularization.drop_connect > 0):
        head_solver = "optimizer"  # random masks would make L-BFGS's line search see a different loss each call
        cache_note += "; the head trains with the configured optimizer (dropout/DropConnect are random per step, which L-BFGS cannot use)"
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
        seed=int(cfg.seed),
    )
    optimizer, scheduler, scheduler_options = build_optimizer_and_scheduler(cfg)
    mixer = build_batch_mixer(augment, len(index.classes))  # MixUp / CutMix mix images: not cached features
    if cfg.model.get("channels_last", False):
        net = net.to(memory_format=torch.channels_last)
    if cfg.model.get("compile", False):
        net.compile()  # in place: parameter names (and so checkpoints) stay the same
    module = ImageClassifier(
        net, spec, index.classes, preprocessing, optimizer, scheduler, scheduler_options,
        regularization=regularization, plan=plan, stage_map=stage_map, frozen_bn_eval=bool(policy_cfg.get("frozen_bn_eval", True)),
        inputs_are_features=use_cache, head_solver=head_solver,
        batch_mixer=None if use_cache else mixer,
        lr_scaling=str(cfg.lr_scaling), channels_last=bool(cfg.model.get("channels_last", False)),
        head_l2=float(policy_cfg.get("head_l2", 0.0)),
    )
    views = int(policy_cfg.get("cache_views", 0) or 0) if augment_is_active(augment) else 0
    data = CachedFeatureDataModule(datamodule, net, full_batch=module.head_solver == "lbfgs", augment=augment,
                                   augmented_views=views) if use_cache else datamodule
    if not use_cache and "head" in plan.unfreeze_at and bool(policy_cfg.get("head_warm_start", False)) and not resume:
        warm_start_head(net, datamodule, float(policy_cfg.get("head_l2", 0.0)))
    trainable, frozen = count_parameters(module)
    record = choice.record() | {
        "parameters": {"trainable": trainable, "frozen": frozen, "per_group": stage_map.parameter_counts(net)},
        "feature_cache": {"used": use_cache, "why": cache_note, "head_solver": module.head_solver if use_cache else None},
        "notes": [cache_note] if use_cache and augment_is_active(augment) else [],
        "run_id": run_id,
    }
    if use_cache and mixer is not None:
        record["notes"].append("MixUp/CutMix are not applied: they mix images, and the head trains on cached features "
                               "(policy.cache=false applies them)")
    log.info("\n%s", format_policy_block(record))

    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / "classes.json", index.classes)
    if rank_zero_only.rank == 0:
        write_json(run_dir / "policy.json", record)
        if not resume:  # what the model sees: evaluation view and training draws of a few images
            write_preview(index, preprocessing, augment, run_dir / "augment_preview.png", seed=int(cfg.seed))

    module.train()  # the modes the plan asks for, whatever ran the network before (Lightning keeps what it finds)
    started = time.perf_counter()
    if resume:
        log.info("Resuming from %s", resume)
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    fit_seconds = time.perf_counter() - started
    # Read now: validate/test below restore callback state from the best checkpoint, an earlier epoch.
    lr_reductions = list(reductions.reductions)
    snapshot_paths = list(snapshots.paths) if snapshots is not None else []

    best = _best_checkpoint(trainer)
    scored, choice_why = _scoring_checkpoint(str(cfg.get("score_checkpoint", "auto")), trainer, lr_trace, best, run_dir)
    log.info("Scoring %s: %s", scored or "the final weights", choice_why)
    metrics: dict[str, Any] = {}
    metrics.update(_scores(trainer.validate(module, datamodule=data, ckpt_path=scored, verbose=False, weights_only=True)))
    if data.has_split("test"):
        metrics.update(_scores(trainer.test(module, datamodule=data, ckpt_path=scored, verbose=False, weights_only=True)))
    metrics.update(
        {
            "epochs": int(trainer.current_epoch),
            "fit_seconds": round(fit_seconds, 2),
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None,
            "best_checkpoint": best,
            "scored_checkpoint": scored,
            "checkpoint_choice": choice_why,
            "run_dir": str(run_dir),
            "weights": weight_source,
            "policy": plan.policy,
            "parameters": {"trainable": trainable, "frozen": frozen},
            "images": {split: len(s) for split, s in index.splits.items()},
            "regularization": regularization.to_dict(),
            "lr_reductions": lr_reductions,
        }
    )
    if trainer.is_global_zero and cfg.tta and scored:
        metrics["tta"] = {"views": list(cfg.tta), **_flat(score_checkpoints([scored], index, list(cfg.tta), cfg))}
    if trainer.is_global_zero and snapshot_paths:
        metrics["snapshot_ensemble"] = {
            "snapshots": snapshot_paths,
            **_flat(score_checkpoints(snapshot_paths, index, list(cfg.tta), cfg)),
        }
        write_json(run_dir / ENSEMBLE_FILE, {"members": [str(Path(p).relative_to(run_dir)) for p in snapshot_paths],
                                             "kind": "snapshot"})
    if trainer.is_global_zero and cfg.get("report", True):
        probs = split_probabilities([scored], index, [], cfg) if scored else {}
        files = write_report(run_dir, index=index, record=record, metrics=metrics, cfg=cfg,
                             policy_block=format_policy_block(record),
                             split_probs={k: v.mean(0).numpy() for k, v in probs.items()}, preprocessing=preprocessing)
        metrics["report"] = str(files["report_md"])
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val/acc", "test/acc") if k in metrics)
        log.info("Finished in %.1f s (%d epochs): %s", fit_seconds, metrics["epochs"], summary)
        if "snapshot_ensemble" in metrics:
            log.info("Snapshot ensemble of %d: %s", len(snapshot_paths), _summary(metrics["snapshot_ensemble"]))
        if "tta" in metrics:
            log.info("With TTA (%s): %s", "+".join(cfg.tta), _summary(metrics["tta"]))
    return metrics


def train_ensemble(cfg: DictConfig) -> dict[str, Any]:
    """``ensemble.size`` members with seeds seed, seed+1, ... in RUN/members/<k>, then their averaged
    probabilities scored on val/test. A member whose metrics.json exists is reused (rerun = resume)."""
    run_dir = resolve_run_dir(cfg)
    size = int(cfg.ensemble.size)
    members = []
    for k in range(size):
        member_dir = run_dir / "members" / str(k)
        done = member_dir / "metrics.json"
        if done.is_file() and not cfg.get("resume"):
            log.info("Ensemble member %d/%d: reusing the finished run in %s", k + 1, size, member_dir)
            result = json.loads(done.read_text())
        else:
            log.info("Ensemble member %d/%d (seed %d) -> %s", k + 1, size, cfg.seed + k, member_dir)
            member_cfg = _with_values(cfg, {"seed": int(cfg.seed) + k, "run_dir": str(member_dir), "ensemble.size": 1,
                                            "resume": str(member_dir) if cfg.get("resume") and (member_dir / "checkpoints" / "last.ckpt").is_file() else None})
            result = train_single(member_cfg)
        checkpoint = result.get("scored_checkpoint", result.get("best_checkpoint"))
        if not checkpoint:
            raise FinetuneError(f"ensemble member {k} in {member_dir} kept no checkpoint; the ensemble needs best.ckpt "
                                "or last.ckpt (keep callbacks.model_checkpoint and callbacks.last_checkpoint).")
        members.append({"seed": int(cfg.seed) + k, "run_dir": str(member_dir), "checkpoint": checkpoint,
                        **{key: result[key] for key in ("val/acc", "test/acc") if key in result}})
    # The members' own index: the same scan, without the files their data check skipped (cached: instant).
    index, _ = checked_index(scan_dataset(cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction,
                                          cfg.data.split_seed), cfg)
    scores = score_checkpoints([m["checkpoint"] for m in members], index, list(cfg.tta), cfg)
    metrics: dict[str, Any] = {
        **_flat(scores),
        "ensemble": {"size": size, "members": members, "tta": list(cfg.tta)},
        "run_dir": str(run_dir),
    }
    for key in ("val/acc", "test/acc"):
        values = [m[key] for m in members if key in m]
        if values:
            metrics["ensemble"][f"mean_member_{key}"] = sum(values) / len(values)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / ENSEMBLE_FILE, {"members": [str(Path(m["checkpoint"]).relative_to(run_dir)) for m in members],
                                         "kind": "seeds"})
    write_json(run_dir / "metrics.json", metrics)
    log.info("Ensemble of %d: %s (mean member: %s)", size, _summary(metrics),
             ", ".join(f"{k}={metrics['ensemble'][f'mean_member_{k}']:.4f}" for k in ("val/acc", "test/acc")
                       if f"mean_member_{k}" in metrics["ensemble"]))
    return metrics


def checked_index(index, cfg: DictConfig, input_size: int | None = None):
    """The index without the files the data check leaves out, and the check's report (None when off)."""
    if not cfg.data.get("validate", True):
        return index, None
    return validate_dataset(index, str(cfg.data.on_bad_file), int(cfg.data.min_image_side), input_size,
                            float(cfg.data.imbalance_ratio))


def split_probabilities(paths: list[str], index, tta: list[str], cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Per-split probabilities [members, images, classes] of checkpoints on the run's val and test splits."""
    members = load_members(paths, key="ensemble")
    device = device_for(str(cfg.trainer.accelerator))
    batch = int(cfg.data.eval_batch_size or cfg.data.batch_size)
    return {split: member_probabilities(members, index.splits[split], tta, batch, device)
            for split in ("val", "test") if index.splits.get(split)}


def score_checkpoints(paths: list[str], index, tta: list[str], cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Averaged-probability scores of checkpoints on the run's own val and test splits."""
    return {split: score_probabilities(probs, [label for _, label in index.splits[split]])
            for split, probs in split_probabilities(paths, index, tta, cfg).items()}


def _flat(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"val": {"acc":..}} -> {"val/acc":.., "val/loss":.., "val/member_acc": [..]}."""
    return {f"{split}/{k}": v for split, values in scores.items() for k, v in values.items()}


def _summary(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val/acc", "test/acc") if k in metrics)


RUN_ID_ENV = "FINETUNE_RUN_ID"


def _distributed_run_id() -> str | None:
    """An id every process of this run shares: set by rank 0 for the processes Lightning launches
    (they inherit its environment), or the launcher's own (torchrun, SLURM). None: one process."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    shared = (elastic if elastic and elastic != "none" else None) or (
        f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '')}" if os.environ.get("SLURM_JOB_ID") else None)
    if shared is None and rank_zero_only.rank == 0:
        shared = uuid.uuid4().hex
    if shared is not None:
        os.environ[RUN_ID_ENV] = shared
    return shared


def _decision_of_rank_zero(run_dir: Path, run_id: str, policy_cfg: dict[str, Any], timeout_s: float = 3600.0):
    """Other ranks: the plan rank 0 measured and wrote to policy.json, so all ranks apply one decision."""
    from finetune.policy.choose import PolicyChoice
    from finetune.policy.plan import Plan

    path = run_dir / "policy.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        if record and record.get("run_id") == run_id:
            log.info("Rank %d: applying rank 0's policy decision (%s) from %s", rank_zero_only.rank,
                     record["policy_applied"], path)
            return PolicyChoice(record["policy_requested"], Plan(**record["plan"]), None, None, dict(policy_cfg["thresholds"]))
        time.sleep(0.5)
    raise FinetuneError(f"Rank {rank_zero_only.rank} waited {timeout_s:.0f} s for rank 0's policy decision in {path}; "
                        f"rank 0 may have failed (see its log), or run_dir is not on a filesystem all nodes share.")


def _with_value(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    return _with_values(cfg, {key: value})


def _with_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with (dotted) keys set (the composed config is in struct mode)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
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


def _cache_decision(policy_cfg: dict[str, Any], plan, augment: dict[str, Any] | None,
                    regularization: Regularization | None = None) -> tuple[bool, str]:
    """Cache frozen features when only the head trains (and the user did not turn caching off)."""
    if not plan.head_only:
        return False, "not used: layers below the head train, so features change every step"
    if regularization is not None and regularization.pooling != "avg":
        return False, f"not used: regularization.pooling={regularization.pooling} draws new pooling regions every step"
    if str(policy_cfg.get("cache", "auto")).lower() in ("false", "off", "no"):
        return False, "off (policy.cache=false): the head trains through the frozen network every epoch"
    if augment_is_active(augment):
        views = int(policy_cfg.get("cache_views", 0) or 0)
        if views > 0:
            return True, (f"used: only the head trains, so the frozen network runs once over the data, plus {views} "
                          f"augmented views of every training image (policy.cache_views) with the configured augmentation")
        return True, (
            "used: only the head trains, so the frozen network runs once; the configured augmentation "
            "is NOT applied (policy.cache_views=0; set it to K to cache K augmented views, or policy.cache=false "
            "to train through the network with it every epoch)"
        )
    return True, "used: only the head trains, so the frozen network runs once over the data"


# `score_checkpoint=auto` scores the last epoch when the LR ended at or below this fraction of its peak.
ANNEALED_FRACTION = 0.1


def _scoring_checkpoint(mode: str, trainer: L.Trainer, lr_trace: LRTrace, best: str | None,
                        run_dir: Path) -> tuple[str | None, str]:
    """The checkpoint that scores val/test (and feeds TTA, the report and ensembles), and why.

    After a schedule that anneals to ~0 (one-cycle, cosine) the last weights are the converged ones;
    picking an epoch on a small validation set then mostly adds that set's noise (BENCHMARKS.md: on
    the demo's 100 validation images the last epoch scored 0.007 above the best-by-validation pick
    on average over 28 runs, up to 0.04). ReduceLROnPlateau lowers the LR *because* validation
    stopped improving, and a constant LR never settles: there the best epoch is the better guess."""
    last = run_dir / "checkpoints" / "last.ckpt"
    last_path = str(last) if last.is_file() else None
    if mode == "auto":
        if plateau_scheduler(trainer) is not None:
            mode, why = "best", "the best epoch by the monitored metric (ReduceLROnPlateau: its reductions follow validation)"
        elif lr_trace.annealed(ANNEALED_FRACTION):
            mode, why = "last", (f"the last epoch (the LR annealed to {lr_trace.last:.3g}, at most "
                                 f"{ANNEALED_FRACTION:g} x its peak {lr_trace.peak:.3g})")
        else:
            mode, why = "best", (f"the best epoch by the monitored metric (the LR ended at {lr_trace.last:.3g}, "
                                 f"above {ANNEALED_FRACTION:g} x its peak {lr_trace.peak:.3g})")
        why += "; score_checkpoint=auto"
    else:
        why = f"score_checkpoint={mode}"
    if mode == "best" and best:
        return best, why
    if mode == "best":
        return last_path, f"the last epoch: no best checkpoint was kept ({why})"
    return last_path, why


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint's path, or None (then the final weights are scored) when none was kept."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path if path and Path(path).is_file() else None

"""``train(cfg) -> metrics``: the whole pipeline as one pure function (the CLI is a thin wrapper).

scan data -> backbone + weights -> preprocessing -> policy (measure, decide, plan) -> head ->
datamodule (images, or cached features) -> LightningModule -> Trainer.fit -> best or last checkpoint scored
on val (and test) -> run folder: config.yaml, classes.json, policy.json, metrics.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
from finetune.history import HistoryCSVLogger
from finetune.inference import ENSEMBLE_FILE, device_for, load_members, member_probabilities, score_probabilities
from finetune.models.backbone import BackboneSpec, attach_head, check_backbone_name, load_pretrained
from finetune.models.module import ImageClassifier
from finetune.policy.cache import CachedFeatureDataModule, lbfgs_head_note, warm_start_head
from finetune.policy.choose import choose_policy, format_policy_block
from finetune.policy.stages import build_stage_map
from finetune.preview import write_preview_or_warn
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
from finetune.run_files import (
    atomic_checkpoint_io,
    earlier_run_files,
    remove_stale_temp_files,
    run_folder_lock,
    run_folder_of,
    write_json,
    write_text,
)

log = logging.getLogger(__name__)


def count_parameters(module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total - trainable


def _scores(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg`` and return the metrics also written to ``RUN/metrics.json``
    (``ensemble.size`` > 1: train the members, then score their average).

    ``resume=RUN`` (or RUN/checkpoints/x.ckpt) continues RUN with RUN/config.yaml; see ``run_config``."""
    if cfg.get("resume"):  # the run's own config, checked as a new one would be
        cfg, run_dir = run_config(cfg)
        validate_train_config(cfg)
    else:  # a bad config creates no run folder
        validate_train_config(cfg)
        cfg, run_dir = run_config(cfg)
    check_backbone_name(cfg.model.backbone)  # a typo fails before any data is read
    # Under DDP every rank runs this; rank 0 owns the folder (the others start once it is training).
    with run_folder_lock(run_dir) if rank_zero_only.rank == 0 else contextlib.nullcontext():
        if rank_zero_only.rank == 0:
            _check_fresh_run_folder(cfg, run_dir)
            for path in remove_stale_temp_files(run_dir):
                log.info("Removed %s, left by an interrupted write", path)
        if int(cfg.ensemble.size) > 1:
            return train_ensemble(cfg)
        return train_single(cfg)


# Overrides a resume may change: how long to train, how to show progress, the devices and the loading of
# data, and what the final scoring adds. Everything else (data, model, policy, recipe, seed) is what the
# checkpoint was trained with: changing it would silently train another run, or fail to load.
RESUME_SAFE_KEYS = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.log_every_n_steps", "trainer.accelerator", "trainer.devices",
    "data.num_workers", "data.pin_memory", "data.preload", "data.preload_max_gb", "data.eval_batch_size",
    "report", "tta", "score_checkpoint",
)
_ABSENT = object()


def run_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The config this run uses, and its folder (created).

    A new run: ``cfg`` in run_dir. ``resume=RUN`` or ``resume=RUN/checkpoints/x.ckpt``: RUN's own
    config.yaml, in RUN (or in run_dir when one is given: a continued copy), with only the overrides
    in RESUME_SAFE_KEYS applied; others are refused, so nothing typed with a resume is dropped or
    silently changes the run. A checkpoint outside a run folder resumes with ``cfg`` as given."""
    resume = cfg.get("resume")
    source = run_folder_of(resume)
    if not resume or source is None or not (source / "config.yaml").is_file():
        run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else source
        run_dir = resolve_run_dir(_with_value(cfg, "run_dir", str(run_dir) if run_dir else None))
        return _with_value(cfg, "run_dir", str(run_dir)), run_dir
    source = source.resolve()
    run_dir = resolve_run_dir(_with_value(cfg, "run_dir", str(cfg.run_dir) if cfg.get("run_dir") else str(source)))
    try:
        saved = OmegaConf.load(source / "config.yaml")
        saved_flat = _flatten(OmegaConf.to_container(saved, resolve=False))
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise FinetuneError(f"resume={resume}: {source / 'config.yaml'} could not be read ({str(e).splitlines()[0]}); "
                            f"it holds the run's config, which a resume continues with.") from None
    user = _with_values(cfg, {"run_dir": str(run_dir), "resume": str(resume)})
    user_flat = _flatten(OmegaConf.to_container(user, resolve=True))
    typed = _typed_keys(cfg)
    changed = sorted(k for k in set(user_flat) | set(saved_flat)
                     if k not in ("run_dir", "resume") and typed(k) and user_flat.get(k, _ABSENT) != saved_flat.get(k, _ABSENT))
    refused = [k for k in changed if k not in RESUME_SAFE_KEYS]
    if refused:
        def show(flat, k):
            value = flat.get(k, _ABSENT)
            return "(not set)" if value is _ABSENT else value
        raise FinetuneError(
            f"resume={resume} continues the run in {source} with the config it was trained with "
            f"({source / 'config.yaml'}), and these overrides would change it: "
            + "; ".join(f"{k}={show(user_flat, k)} (the run has {show(saved_flat, k)})" for k in refused)
            + f". A resume may change only {', '.join(RESUME_SAFE_KEYS)}. Drop the others, or train a new run "
            f"with them (another run_dir). Nothing in {source} was changed."
        )
    merged = OmegaConf.create(OmegaConf.to_container(saved, resolve=False))
    for key, interpolation in _explaining_interpolations(cfg, saved, saved_flat).items():
        OmegaConf.update(merged, key, interpolation, merge=False)  # ${run_dir}/...: follows run_dir (members, copies)
    for key in changed:
        if key in user_flat:
            OmegaConf.update(merged, key, user_flat[key], merge=False)
        else:  # removed with ~key
            parent, _, leaf = key.rpartition(".")
            (OmegaConf.select(merged, parent) if parent else merged).pop(leaf, None)
        log.info("Resume: %s=%s (the run had %s)", key, user_flat.get(key, "(removed)"), saved_flat.get(key))
    OmegaConf.update(merged, "run_dir", str(run_dir), merge=False)
    OmegaConf.update(merged, "resume", str(resume), merge=False)
    OmegaConf.set_struct(merged, True)
    log.info("Resuming the run in %s with its config.yaml%s", source, f", continued in {run_dir}" if run_dir != source else "")
    return merged, run_dir


def _explaining_interpolations(cfg: DictConfig, saved: DictConfig, saved_flat: dict[str, Any]) -> dict[str, str]:
    """The composed config's interpolations (``${run_dir}/checkpoints``) that give the saved config's values
    when resolved against it: config.yaml is written resolved, but these must follow a new run_dir."""
    raw = _flatten(OmegaConf.to_container(cfg, resolve=False))
    found = {k: v for k, v in raw.items() if isinstance(v, str) and "${" in v and k in saved_flat}
    probe = OmegaConf.create(OmegaConf.to_container(saved, resolve=False))
    for key, value in found.items():
        OmegaConf.update(probe, key, value, merge=False)
    explaining = {}
    for key, value in found.items():
        try:
            if OmegaConf.select(probe, key) == saved_flat[key]:
                explaining[key] = value
        except OmegaConfBaseException:
            pass
    return explaining


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty mappings are values."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _typed_keys(cfg: DictConfig):
    """Whether the user gave a dotted key (or a group or node above it): the CLI's overrides as Hydra
    parsed them; for a library call, the keys whose value differs from the composed defaults."""
    if HydraConfig.initialized():
        from hydra.core.override_parser.overrides_parser import OverridesParser

        paths = [o.key_or_group.replace("/", ".") for o in
                 OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))]
        paths = [p for p in paths if p != "hydra" and not p.startswith("hydra.")]
        return lambda key: any(key == p or key.startswith(p + ".") for p in paths)
    try:
        defaults = _flatten(OmegaConf.to_container(_composed_defaults(), resolve=False))
    except (HydraException, OmegaConfBaseException, ValueError):  # another app's Hydra: all given counts as typed
        return lambda key: True
    given = _flatten(OmegaConf.to_container(cfg, resolve=False))
    typed = {k for k in set(given) | set(defaults) if given.get(k, _ABSENT) != defaults.get(k, _ABSENT)}
    return lambda key: key in typed or any(key.startswith(t + ".") for t in typed)


def _composed_defaults() -> DictConfig:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train")
    with initialize_config_module(config_module="finetune.conf", version_base="1.3"):
        return compose(config_name="train")


def _check_fresh_run_folder(cfg: DictConfig, run_dir: Path) -> None:
    """A new run may not write into a folder an earlier run left files in: its checkpoints, logs and
    report would be overwritten or mixed. (What this run's own startup wrote there does not count.)"""
    source = run_folder_of(cfg.get("resume"))
    if source is not None and source.resolve() == run_dir:  # resumed in place
        return
    found = earlier_run_files(run_dir)
    if found:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise FinetuneError(
            f"run_dir={run_dir} already holds files of an earlier run ({shown}); a new run would overwrite them. "
            f"To continue that run: finetune resume={run_dir}. To start a new one, pass another run_dir "
            f"(or leave run_dir unset for a fresh outputs/<date>/<time> folder)."
        )


def train_single(cfg: DictConfig) -> dict[str, Any]:
    """One model: the pipeline in the module docstring."""
    resume = resume_checkpoint(cfg.get("resume"))
    resumed = _ResumePoint.read(resume) if resume else None  # readable, ours and safe, before anything runs
    if resume and not cfg.get("run_dir") and Path(str(cfg.resume)).is_dir():
        cfg = _with_value(cfg, "run_dir", str(Path(str(cfg.resume)).resolve()))  # continue in that folder
    run_dir = resolve_run_dir(cfg)
    cfg = _with_value(cfg, "run_dir", str(run_dir))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    regularization = Regularization.from_config(OmegaConf.to_container(cfg.regularization, resolve=True))
    reductions, lr_trace = PlateauReductionLog(), LRTrace()
    interrupted = InterruptSeen()
    callbacks = [*instantiate_named("callbacks", cfg.get("callbacks")), reductions, lr_trace,
                 NonFiniteLossStop(run_dir / "checkpoints"), RNGStateCheckpoint(), interrupted]
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
    index, no_validation = without_validation(index, cfg, trainer)  # no val split: said loudly, nothing follows it

    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    run_id = _distributed_run_id()
    saved_record = resumed.policy_record() if resumed else None
    if saved_record is not None:  # the plan the checkpoint was trained with; measuring again could differ
        choice = _choice_from_record(saved_record, policy_cfg)
        log.info("Resuming with the run's policy decision (%s) from %s", saved_record["policy_applied"], resumed.policy_file)
    else:
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
    if use_cache and head_solver == "lbfgs":  # say what the L-BFGS head leaves out (log, policy.json)
        cache_note += lbfgs_head_note(cfg)
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
        on_bad_file=str(cfg.data.on_bad_file),  # a file that fails after the data check: skipped or an error
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
        eval_stage="train_eval" if no_validation else "val",
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
    if saved_record is not None:
        record = saved_record  # with the measurements that led to it
    log.info("\n%s", format_policy_block(record))

    if resumed:  # the run files stay as they are unless the checkpoint fits this data and model
        resumed.check_fits(index.classes, module)
    if rank_zero_only.rank == 0:
        if data_report is not None:
            write_json(run_dir / "data_report.json", data_report.to_dict())
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_json(run_dir / "classes.json", index.classes)
        if saved_record is None or resumed.policy_file.parent.resolve() != run_dir:  # in place: kept as it is
            write_json(run_dir / "policy.json", record)
        for logger in trainer.loggers:  # the CSV log keeps the epochs the checkpoint holds
            if isinstance(logger, HistoryCSVLogger):
                logger.keep_history(*((resumed.epoch, resumed.global_step) if resumed else (None,)))
        if not resume:  # what the model sees: evaluation view and training draws of a few images
            write_preview_or_warn(index, preprocessing, augment, run_dir / "augment_preview.png", seed=int(cfg.seed))

    module.train()  # the modes the plan asks for, whatever ran the network before (Lightning keeps what it finds)
    started = time.perf_counter()
    if resume:
        log.info("Resuming from %s", resume)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    except SystemExit:  # Lightning exits after Ctrl-C (KeyboardInterrupt), once it has shut down
        if interrupted.seen:
            raise TrainingInterrupted(run_dir) from None
        raise
    fit_seconds = time.perf_counter() - started
    # Read now: validate/test below restore callback state from the best checkpoint, an earlier epoch.
    lr_reductions = list(reductions.reductions)
    snapshot_paths = list(snapshots.paths) if snapshots is not None else []

    best = _best_checkpoint(trainer)
    if no_validation and best is None:
        last = run_dir / "checkpoints" / "last.ckpt"
        scored = str(last) if last.is_file() else None
        choice_why = "the last epoch: with no validation split there is nothing to pick an epoch by"
    else:
        scored, choice_why = _scoring_checkpoint(str(cfg.get("score_checkpoint", "auto")), trainer, lr_trace, best,
                                                 run_dir)
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
            "validation": (f"{NO_VALIDATION} ({no_validation})" if no_validation
                           else f"val split, {len(index.splits['val'])} images"),
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
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)  # first: a failing report or plot cannot lose it
        if cfg.get("report", True):
            metrics.update(_report_or_warning(run_dir, scored, index, record, metrics, cfg, preprocessing))
            write_json(run_dir / "metrics.json", metrics)
        summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val/acc", "train_eval/acc", "test/acc") if k in metrics)
        log.info("Finished in %.1f s (%d epochs): %s", fit_seconds, metrics["epochs"], summary)
        if no_validation:
            log.warning("No validation split (%s): train_eval/acc is measured on the training images.", no_validation)
        if "snapshot_ensemble" in metrics:
            log.info("Snapshot ensemble of %d: %s", len(snapshot_paths), _summary(metrics["snapshot_ensemble"]))
        if "tta" in metrics:
            log.info("With TTA (%s): %s", "+".join(cfg.tta), _summary(metrics["tta"]))
    return metrics


def _report_or_warning(run_dir: Path, scored: str | None, index, record: dict[str, Any], metrics: dict[str, Any],
                       cfg: DictConfig, preprocessing) -> dict[str, Any]:
    """report.md/html, or, when it cannot be written, a logged warning and a note for metrics.json:
    the report explains a finished run, whose metrics and checkpoints are complete without it."""
    try:
        probs = split_probabilities([scored], index, [], cfg) if scored else {}
        files = write_report(run_dir, index=index, record=record, metrics=metrics, cfg=cfg,
                             policy_block=format_policy_block(record),
                             split_probs={k: v.mean(0).numpy() for k, v in probs.items()}, preprocessing=preprocessing)
    except Exception as e:  # whatever broke the report, the run's results are already saved
        log.warning("The report could not be written (%s: %s): %s and %s were not written; metrics.json and the "
                    "checkpoints are complete.", type(e).__name__, e, run_dir / "report.md", run_dir / "report.html",
                    exc_info=log.isEnabledFor(logging.DEBUG))
        return {"report": None, "report_error": f"{type(e).__name__}: {e}"}
    problems = {"report_problems": files["problems"]} if "problems" in files else {}
    return {"report": str(files["report_md"]), **problems}


def train_ensemble(cfg: DictConfig) -> dict[str, Any]:
    """``ensemble.size`` members with seeds seed, seed+1, ... in RUN/members/<k>, then their averaged
    probabilities scored on val/test. ``resume=RUN``: a finished member is reused (continued when
    trainer.max_epochs grew), a stopped one continues from its last.ckpt, one not started starts."""
    run_dir = resolve_run_dir(cfg)
    size = int(cfg.ensemble.size)
    if not cfg.get("resume") and rank_zero_only.rank == 0:  # what resume=RUN continues with, if this stops
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    members = []
    for k in range(size):
        member_dir = run_dir / "members" / str(k)
        done = member_dir / "metrics.json"
        if done.is_file() and _member_finished(member_dir, cfg):
            log.info("Ensemble member %d/%d: reusing the finished run in %s", k + 1, size, member_dir)
            result = json.loads(done.read_text())
        else:
            log.info("Ensemble member %d/%d (seed %d) -> %s", k + 1, size, cfg.seed + k, member_dir)
            member_cfg = _with_values(cfg, {"seed": int(cfg.seed) + k, "run_dir": str(member_dir), "ensemble.size": 1,
                                            "resume": str(member_dir) if cfg.get("resume") and (member_dir / "checkpoints" / "last.ckpt").is_file() else None})
            try:
                result = train_single(member_cfg)
            except TrainingInterrupted:
                raise TrainingInterrupted(run_dir) from None  # the ensemble resumes, not one member
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


def _member_finished(member_dir: Path, cfg: DictConfig) -> bool:
    """An ensemble member's metrics.json is final unless a resume asks for more epochs than it trained for."""
    if not cfg.get("resume"):
        return True
    try:
        trained_for = OmegaConf.load(member_dir / "config.yaml").trainer.max_epochs
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):
        return False
    return trained_for == cfg.trainer.max_epochs


def checked_index(index, cfg: DictConfig, input_size: int | None = None):
    """The index without the files the data check leaves out, and the check's report (None when off)."""
    if not cfg.data.get("validate", True):
        return index, None
    return validate_dataset(index, str(cfg.data.on_bad_file), int(cfg.data.min_image_side), input_size,
                            float(cfg.data.imbalance_ratio))


NO_VALIDATION = "none: scored on training images"


def without_validation(index, cfg: DictConfig, trainer: L.Trainer):
    """(index without empty val/test splits, None) when there is a validation split; else the same
    index and why there is none, after switching off what would follow training data as if it were
    validation. The validation loop then scores the training images, logged as ``train_eval/*`` (the
    module's ``eval_stage``); best.ckpt and early stopping on val/* are dropped (an epoch picked on
    training data is the most overfitted one), the last epoch is scored, and ReduceLROnPlateau follows
    ``train_eval/loss``: lowering the LR when training stops improving is still a sound schedule."""
    from collections import Counter

    from finetune.data.datasets import DatasetIndex

    removed = [s for s in ("val", "test") if s in index.splits and not index.splits[s]]
    if removed:  # the data check left none of their images
        index = DatasetIndex(index.root, index.layout, index.classes,
                             {s: v for s, v in index.splits.items() if s not in removed}, index.ignored_files)
    if "val" in index.splits:
        missing = sorted(set(range(len(index.classes))) - {y for _, y in index.splits["val"]})
        if missing:
            log.warning("Classes with no validation image: %s. val/* does not measure them (data.val_fraction gives "
                        "a class one when it has 3 or more images).", ", ".join(index.classes[i] for i in missing))
        return index, None
    fraction = float(cfg.data.val_fraction)
    if "val" in removed:
        cause = "the data check left no readable validation image"
    elif fraction <= 0:
        cause = f"data.val_fraction={cfg.data.val_fraction}, and data.root has no val folder or CSV rows with split=val"
    else:
        largest = max(Counter(y for _, y in index.splits["train"]).values())
        cause = (f"data.val_fraction={cfg.data.val_fraction} gives no class a validation image (a class needs 3 or "
                 f"more images; the largest has {largest})")
    watching = [c for c in trainer.callbacks if str(getattr(c, "monitor", None) or "").startswith("val/")]
    trainer.callbacks = [c for c in trainer.callbacks if c not in watching]
    names = {"ModelCheckpoint": "best.ckpt", "EarlyStopping": "early stopping"}
    off = [f"{names.get(type(c).__name__, type(c).__name__)} ({c.monitor})" for c in watching]
    plateau = str(cfg.scheduler.get("monitor") or "") if cfg.scheduler.get("_target_") else ""
    plateau = plateau.split("/", 1)[1] if plateau.startswith("val/") else ""
    folder = {"csv": f"rows with split=val in {index.root}",
              "split_folders": f"a val folder ({index.root}/val/<class>/..., beside train/)"}.get(
        index.layout, f"a val folder ({index.root}/train/<class>/... and {index.root}/val/<class>/...)")
    log.warning(
        "NO VALIDATION SPLIT: %s. The validation loop scores the TRAINING images instead, logged as train_eval/acc "
        "and train_eval/loss (not val/*): they show how well the model fits its training images, not how it does on "
        "new ones. %sThe last epoch is scored%s. To measure the model, set data.val_fraction (e.g. 0.2; a class "
        "needs 3 or more images to get a validation image) or add %s.",
        cause, f"Switched off: {', '.join(off)}. " if off else "",
        f"; a ReduceLROnPlateau schedule follows train_eval/{plateau}" if plateau else "", folder)
    return index, cause


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
            return _choice_from_record(record, policy_cfg)
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


def _choice_from_record(record: dict[str, Any], policy_cfg: dict[str, Any]):
    """The decision a policy.json holds, as a PolicyChoice (the plan as it was; nothing measured again)."""
    from finetune.policy.choose import PolicyChoice
    from finetune.policy.plan import Plan

    return PolicyChoice(record["policy_requested"], Plan(**record["plan"]), None, None, dict(policy_cfg["thresholds"]))


def resume_checkpoint(resume: str | None) -> str | None:
    """The checkpoint to resume from: a .ckpt file, or RUN_DIR/checkpoints/last.ckpt (read by _ResumePoint).
    None also for a run folder stopped during its first epoch (no last.ckpt, not finished): it starts again
    in place from its config."""
    if not resume:
        return None
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        folder, path = path, path / "checkpoints" / "last.ckpt"
        if not path.exists() and (folder / "config.yaml").is_file() and not (folder / "metrics.json").exists():
            log.warning("resume=%s: the run stopped before its first epoch ended (no %s); starting it again in %s "
                        "with its config.yaml", resume, path, folder)
            return None
    return str(path)


class _ResumePoint:
    """What a resume needs from its checkpoint, read once before any heavy work: where the run stood,
    and what the model must look like to load it."""

    def __init__(self, path: Path, data: dict[str, Any]):
        from finetune.models.module import CHECKPOINT_KEY

        self.path = path
        self.epoch, self.global_step = int(data.get("epoch", 0)), int(data.get("global_step", 0))
        self.classes = list(data[CHECKPOINT_KEY].get("classes") or [])
        self.shapes = {k: tuple(v.shape) for k, v in data["state_dict"].items() if hasattr(v, "shape")}
        self.policy_file = path.parent.parent / "policy.json"  # RUN/checkpoints/x.ckpt -> RUN/policy.json

    @classmethod
    def read(cls, path: str) -> _ResumePoint:
        from finetune.models.checkpoint import read_checkpoint

        return cls(Path(path), read_checkpoint(path, key="resume"))  # a clear error for a missing, foreign or unsafe file

    def policy_record(self) -> dict[str, Any] | None:
        """The run's policy.json next to the checkpoint's folder, or None (a checkpoint outside a run folder)."""
        try:
            record = json.loads(self.policy_file.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("plan"), dict) else None

    def check_fits(self, classes: list[str], module: torch.nn.Module) -> None:
        """Refuse, before any run file is written, a checkpoint that cannot continue this data and model."""
        if self.classes and self.classes != list(classes):
            gone, new = sorted(set(self.classes) - set(classes)), sorted(set(classes) - set(self.classes))
            raise FinetuneError(
                f"resume={self.path} was trained on {len(self.classes)} classes, but the data now has {len(classes)}"
                + (f"; missing: {', '.join(gone[:8])}" if gone else "") + (f"; new: {', '.join(new[:8])}" if new else "")
                + ("" if gone or new else " in another order") + ". The data changed since the run was trained: "
                "restore it, or train a new run (another run_dir) on the data as it is."
            )
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        wrong = sorted(set(expected) ^ set(self.shapes)) + sorted(
            k for k in set(expected) & set(self.shapes) if expected[k] != self.shapes[k])
        if wrong:
            raise FinetuneError(
                f"resume={self.path} does not fit the model this config builds ({len(wrong)} tensors differ, e.g. "
                f"{', '.join(wrong[:3])}): it was trained with another model, head or policy. Resume it with its "
                f"own run folder's config (resume=RUN, without model or policy overrides), or train a new run."
            )


class InterruptSeen(L.Callback):
    """Notes a Ctrl-C during fit: Lightning shuts down and calls sys.exit(1), and the run should end
    with a way to continue instead."""

    seen = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.seen = True


class TrainingInterrupted(FinetuneError):
    """Ctrl-C during training: the message says how to continue; exit status 130, as for SIGINT."""

    exit_code = 130

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        super().__init__(f"Interrupted; continue with: finetune resume={run_dir}")


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
    # The callback that keeps the best epoch by a metric (last.ckpt's has no monitor; it may be the only one).
    callback = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path if path and Path(path).is_file() else None

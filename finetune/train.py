"""``train(cfg) -> metrics``: the whole pipeline as one pure function (the CLI is a thin wrapper).

scan data -> backbone + weights -> preprocessing -> policy (measure, decide, plan) -> head ->
datamodule (images, or cached features) -> LightningModule -> Trainer.fit -> best or last checkpoint scored
on val (and test) -> run folder: config.yaml, classes.json, policy.json, metrics.json.
This module runs those steps; what they use is in resume.py (a resumed run's config and checkpoint),
prepare.py (data, policy, model), scoring.py (what is scored), ensemble.py (ensemble.size > 1)
and distributed.py (what DDP ranks share).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from finetune.config import instantiate_named, validate_train_config
from finetune.distributed import SameBatchSizeOnEveryRank, is_lost_process, lost_process_message, strategy_with_timeout
from finetune.ensemble import train_ensemble
from finetune.errors import FinetuneError, ProcessLost, TrainingInterrupted
from finetune.history import HistoryCSVLogger
from finetune.members import ENSEMBLE_FILE
from finetune.models.backbone import check_backbone_name
from finetune.prepare import NO_VALIDATION, Prepared, prepare_run, recipe_before_measurement
from finetune.preview import write_preview_or_warn
from finetune.recipe.auto import RECIPE_FILE
from finetune.recipe.callbacks import (
    LRTrace,
    NonFiniteLossStop,
    PlateauReductionLog,
    RNGStateCheckpoint,
    SnapshotCheckpoint,
    ValidateAtLastStep,
)
from finetune.recipe.regularization import Regularization
from finetune.recipe.schedulers import cycle_end_epochs
from finetune.resume import ResumePoint, resume_checkpoint, run_config, with_value
from finetune.run_files import atomic_checkpoint_io, write_json, write_text
from finetune.run_folder import (
    earlier_run_files,
    remove_stale_temp_files,
    resolve_run_dir,
    run_folder_lock,
    run_folder_of,
)
from finetune.scoring import (
    calibrate_checkpoint,
    checkpoint_to_score,
    fit_open_set,
    fit_thresholds,
    flat,
    report_or_warning,
    score_checkpoints,
    summary,
    trainer_scores,
)
from finetune.task import with_task_defaults
from finetune.throughput import TrainThroughput, describe
from finetune.trackers import close_trackers, log_run_files

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg`` and return the metrics also written to ``RUN/metrics.json``
    (``ensemble.size`` > 1: train the members, then score their average).

    ``resume=RUN`` (or RUN/checkpoints/x.ckpt) continues RUN with RUN/config.yaml; see ``resume.run_config``."""
    if cfg.resume:  # the run's own config, checked as a new one would be
        cfg, run_dir = run_config(cfg)
        validate_train_config(cfg)
    else:  # a bad config creates no run folder
        validate_train_config(cfg)
        cfg, run_dir = run_config(cfg)
    cfg = with_task_defaults(cfg)
    check_backbone_name(cfg.model.backbone)  # a typo fails before any data is read
    # Under DDP every rank runs this; rank 0 owns the folder (the others start once it is training).
    with run_folder_lock(run_dir) if rank_zero_only.rank == 0 else contextlib.nullcontext():
        if rank_zero_only.rank == 0:
            _check_fresh_run_folder(cfg, run_dir)
            for path in remove_stale_temp_files(run_dir):
                log.info("Removed %s, left by an interrupted write", path)
        if int(cfg.ensemble.size) > 1:
            return train_ensemble(cfg, train_single)
        return train_single(cfg)


def _check_fresh_run_folder(cfg: DictConfig, run_dir: Path) -> None:
    """A new run may not write into a folder an earlier run left files in: its checkpoints, logs and
    report would be overwritten or mixed. (What this run's own startup wrote there does not count.)"""
    source = run_folder_of(cfg.resume)
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
    resume = resume_checkpoint(cfg.resume)
    resumed = ResumePoint.read(resume) if resume else None  # readable, ours and safe, before anything runs
    run_dir = resolve_run_dir(cfg)  # set by run_config (train) or the ensemble (a member's folder)
    cfg = with_value(cfg, "run_dir", str(run_dir))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # recipe=auto: input size, length, schedule, holdout from the data (a resumed run keeps its config's values)
    cfg, recipe = (cfg, None) if resume else recipe_before_measurement(cfg)
    regularization = Regularization.from_config(OmegaConf.to_container(cfg.regularization, resolve=True))
    watch = _build_trainer(cfg, run_dir)
    run = prepare_run(cfg, run_dir, watch.trainer, regularization, resumed, resume, recipe)
    cfg = run.cfg  # with the recipe's choices that needed the measurement (LR, flip)
    if resumed:  # the run files stay as they are unless the checkpoint fits this data and model
        resumed.check_fits(run.index.classes, run.module)
    if rank_zero_only.rank == 0:
        _write_run_files(cfg, run_dir, run, watch.trainer, resumed, resume)
    try:
        fit_seconds = _fit(watch, run, run_dir, resume)
        # Read now: validate/test below restore callback state from the best checkpoint, an earlier epoch.
        lr_reductions = list(watch.reductions.reductions)
        speed = watch.throughput.summary()
        if watch.trainer.is_global_zero:
            log.info(describe(speed))
        snapshot_paths = list(watch.snapshots.paths) if watch.snapshots is not None else []
        metrics, scored = _score(cfg, run_dir, watch, run, fit_seconds, run.regularization, lr_reductions)
        metrics["throughput"] = speed
        if watch.trainer.is_global_zero:
            _finish(cfg, run_dir, run, metrics, scored, snapshot_paths, fit_seconds)
            log_run_files(watch.trainer.loggers, run_dir)
    finally:
        close_trackers(watch.trainer.loggers)
    return metrics


@dataclass
class _Watch:
    """The trainer, and the callbacks whose state the run reads after fit."""

    trainer: L.Trainer
    reductions: PlateauReductionLog
    lr_trace: LRTrace
    interrupted: InterruptSeen
    snapshots: SnapshotCheckpoint | None
    throughput: TrainThroughput


def _build_trainer(cfg: DictConfig, run_dir: Path) -> _Watch:
    """The Trainer with the configured logger and callbacks, plus the run's own (LR trace, plateau log,
    non-finite loss stop, RNG state, Ctrl-C, throughput, validation at a max_steps end, snapshots)."""
    reductions, lr_trace = PlateauReductionLog(), LRTrace()
    interrupted, throughput = InterruptSeen(), TrainThroughput()
    callbacks = [*instantiate_named("callbacks", cfg.get("callbacks")), reductions, lr_trace,
                 NonFiniteLossStop(run_dir / "checkpoints"), RNGStateCheckpoint(), interrupted, throughput,
                 ValidateAtLastStep(), SameBatchSizeOnEveryRank(cfg.data.batch_size)]
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
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["strategy"] = strategy_with_timeout(trainer_args.get("strategy", "auto"), cfg.ddp_timeout_s)
    if trainer_args.get("benchmark") is None and not trainer_args.get("deterministic"):
        # cuDNN times its convolution algorithms once per input shape and keeps the fastest (timm's train.py
        # does the same); the shapes are fixed here. No effect on a CPU. Lightning's None means off.
        trainer_args["benchmark"] = True
    trainer = L.Trainer(
        **trainer_args,
        default_root_dir=str(run_dir),
        logger=instantiate_named("logger", cfg.get("logger")) or False,
        callbacks=callbacks,
        plugins=[atomic_checkpoint_io()],  # checkpoints: temp file + rename, like every run file
    )
    return _Watch(trainer, reductions, lr_trace, interrupted, snapshots, throughput)


def _write_run_files(cfg: DictConfig, run_dir: Path, run: Prepared, trainer: L.Trainer, resumed: ResumePoint | None,
                     resume: str | None) -> None:
    """Rank 0, before fit: data_report.json, config.yaml, classes.json, policy.json, the CSV log's kept
    history and the augmentation preview."""
    index = run.index
    if run.data_report is not None:
        write_json(run_dir / "data_report.json", run.data_report.to_dict())
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / "classes.json", index.classes)
    if run.saved_record is None or resumed.policy_file.parent.resolve() != run_dir:  # in place: kept as it is
        write_json(run_dir / "policy.json", run.record)
    if run.recipe is not None:
        write_json(run_dir / RECIPE_FILE, run.recipe.to_dict())
    for logger in trainer.loggers:  # the CSV log keeps the epochs the checkpoint holds
        if isinstance(logger, HistoryCSVLogger):
            logger.keep_history(*((resumed.epoch, resumed.global_step) if resumed else (None,)))
    if not resume:  # what the model sees: evaluation view and training draws of a few images
        write_preview_or_warn(
            index, run.preprocessing, run.augment, run_dir / "augment_preview.png", seed=int(cfg.seed)
        )


def _fit(watch: _Watch, run: Prepared, run_dir: Path, resume: str | None) -> float:
    """Trainer.fit (from the resume checkpoint, if any); its seconds. Ctrl-C: TrainingInterrupted."""
    run.module.train()  # the modes the plan asks for, whatever ran the network before (Lightning keeps what it finds)
    started = time.perf_counter()
    if resume:
        log.info("Resuming from %s", resume)
    try:
        watch.trainer.fit(run.module, datamodule=run.data, ckpt_path=resume, weights_only=True)
    except SystemExit:  # Lightning exits after Ctrl-C (KeyboardInterrupt), once it has shut down
        if watch.interrupted.seen:
            raise TrainingInterrupted(run_dir) from None
        raise
    except MisconfigurationException as e:  # a resume whose checkpoint is past trainer.max_epochs
        epoch = re.search(r"current_epoch=(\d+).*max_epochs=(-?\d+)", str(e))
        if resume and epoch:
            raise FinetuneError(
                f"resume={resume}: the checkpoint has trained {epoch.group(1)} epochs, more than "
                f"trainer.max_epochs={epoch.group(2)}. Pass a larger trainer.max_epochs to train on (or use "
                f"finetune-eval on the checkpoint to score it as it is).") from None
        raise
    except RuntimeError as e:
        if watch.trainer.world_size > 1 and is_lost_process(e):
            raise ProcessLost(lost_process_message(e, run_dir, watch.trainer.world_size,
                                                   run.cfg.ddp_timeout_s)) from None
        raise
    return time.perf_counter() - started


def _score(cfg: DictConfig, run_dir: Path, watch: _Watch, run: Prepared, fit_seconds: float,
           regularization: Regularization, lr_reductions: list) -> tuple[dict[str, Any], str | None]:
    """The chosen checkpoint's val (and test) scores with what the run was, and that checkpoint."""
    trainer, module, data, index, no_validation = watch.trainer, run.module, run.data, run.index, run.no_validation
    best, scored, choice_why = checkpoint_to_score(cfg, trainer, watch.lr_trace, run_dir, no_validation)
    log.info("Scoring %s: %s", scored or "the final weights", choice_why)
    metrics: dict[str, Any] = {}
    metrics.update(trainer_scores(trainer.validate(module, datamodule=data, ckpt_path=scored, verbose=False,
                                                   weights_only=True)))
    if data.has_split("test"):
        metrics.update(trainer_scores(trainer.test(module, datamodule=data, ckpt_path=scored, verbose=False,
                                                   weights_only=True)))
    metrics.update(
        {
            "epochs": int(trainer.current_epoch),
            "fit_seconds": round(fit_seconds, 2),
            "peak_gpu_memory_gb": (
                round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None
            ),
            "best_checkpoint": best,
            "scored_checkpoint": scored,
            "checkpoint_choice": choice_why,
            "run_dir": str(run_dir),
            "weights": run.weight_source,
            "policy": run.plan.policy,
            "parameters": {"trainable": run.trainable, "frozen": run.frozen},
            "images": {split: len(s) for split, s in index.splits.items()},
            "validation": (f"{NO_VALIDATION} ({no_validation})" if no_validation
                           else f"val split, {len(index.splits['val'])} images"),
            "regularization": regularization.to_dict(),
            "imbalance": run.imbalance,
            "lr_reductions": lr_reductions,
        }
    )
    return metrics, scored


def _finish(cfg: DictConfig, run_dir: Path, run: Prepared, metrics: dict[str, Any], scored: str | None,
            snapshot_paths: list[str], fit_seconds: float) -> None:
    """Rank 0, after scoring: calibration, the open-set threshold, TTA and snapshot-ensemble scores, metrics.json,
    the report, the summary."""
    index, no_validation = run.index, run.no_validation
    metrics["calibration"], scored_probs = calibrate_checkpoint(str(cfg.calibrate).lower(), scored, index, cfg,
                                                                no_validation)
    if str(cfg.calibrate).lower() == "true" and "skipped" in metrics["calibration"]:
        log.warning("calibrate=true, but the probabilities are not calibrated: %s.", metrics["calibration"]["skipped"])
    if "temperature" in metrics["calibration"]:
        c = metrics["calibration"]
        log.info("Calibration: temperature %.3f fitted on %s; expected calibration error on val %.4f -> %.4f%s",
                 c["temperature"], c["fitted_on"], c["val"]["ece_before"], c["val"]["ece_after"],
                 f", on test {c['test']['ece_before']:.4f} -> {c['test']['ece_after']:.4f}" if "test" in c else "")
    if index.multilabel:
        kept: dict[str, torch.Tensor] = {}  # the scored checkpoint's val/test probabilities, for the report
        metrics["multilabel"] = m = _guarded("multi-label thresholds", fit_thresholds, scored, index, cfg,
                                             no_validation, kept)
        scored_probs = kept or None
        for split in ("val", "test"):
            if split in m:
                log.info("Multi-label %s: mAP %.4f, micro F1 %.4f at the tuned thresholds (%.4f at 0.5), macro F1 %.4f",
                         split, m[split]["tuned"]["map"], m[split]["tuned"]["micro_f1"], m[split]["at_0.5"]["micro_f1"],
                         m[split]["tuned"]["macro_f1"])
    metrics["open_set"] = _guarded("open-set threshold", fit_open_set, cfg.open_set, scored, index, cfg, no_validation)
    if str(cfg.open_set.fit).lower() == "true" and "skipped" in metrics["open_set"]:
        log.warning("open_set.fit=true, but no unknown-image threshold was fitted: %s.", metrics["open_set"]["skipped"])
    if "threshold" in metrics["open_set"]:
        o = metrics["open_set"]
        log.info("Open set: %s score, threshold %.4g rejects %.0f%% of %s%s; finetune-predict unknown=auto labels "
                 "images below it 'unknown'", o["score"], o["threshold"], 100 * o["reject"], o["fitted_on"],
                 f" ({100 * o['test_rejected']:.1f}% of the test images)" if "test_rejected" in o else "")
    if cfg.tta and scored:
        metrics["tta"] = {"views": list(cfg.tta), **flat(score_checkpoints([scored], index, list(cfg.tta), cfg))}
    if snapshot_paths:
        tuned: dict[str, Any] = {}  # multi-label: the thresholds tuned on the snapshots' averaged val probabilities
        metrics["snapshot_ensemble"] = {
            "snapshots": snapshot_paths,
            **flat(score_checkpoints(snapshot_paths, index, list(cfg.tta), cfg, tuned)),
        }
        write_json(run_dir / ENSEMBLE_FILE, {"members": [str(Path(p).relative_to(run_dir)) for p in snapshot_paths],
                                             "kind": "snapshot", **tuned})
    write_json(run_dir / "metrics.json", metrics)  # first: a failing report or plot cannot lose it
    if cfg.report:
        metrics.update(report_or_warning(run_dir, scored, index, run.record, metrics, cfg, run.preprocessing,
                                         scored_probs))
        write_json(run_dir / "metrics.json", metrics)
    shown = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val/acc", "val/map", "train_eval/acc", "test/acc", "test/map")
                      if k in metrics)
    log.info("Finished in %.1f s (%d epochs): %s", fit_seconds, metrics["epochs"], shown)
    if no_validation:
        log.warning("No validation split (%s): train_eval/acc is measured on the training images.", no_validation)
    if "snapshot_ensemble" in metrics:
        log.info("Snapshot ensemble of %d: %s", len(snapshot_paths), summary(metrics["snapshot_ensemble"]))
    if "tta" in metrics:
        log.info("With TTA (%s): %s", "+".join(cfg.tta), summary(metrics["tta"]))


def _guarded(what: str, fit, *args) -> dict[str, Any]:
    """A fit after training (thresholds, open set) whose failure leaves the finished run's metrics, checkpoints and
    report in place: logged, and recorded as {"error": ...} in metrics.json."""
    try:
        return fit(*args)
    except Exception as e:  # the run is trained; this step only adds to it
        log.warning("The %s could not be fitted (%s: %s); the run's metrics and checkpoints are complete without it.",
                    what, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return {"error": f"{type(e).__name__}: {e}"}


class InterruptSeen(L.Callback):
    """Notes a Ctrl-C during fit: Lightning shuts down and calls sys.exit(1), and the run should end
    with a way to continue instead."""

    seen = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.seen = True

"""Scoring a finished fit: which checkpoint scores val/test (best or last, and why), its calibration
(temperature scaling, finetune/calibration.py), its open-set threshold (finetune/open_set.py) or, multi-label,
its per-class thresholds (finetune/multilabel.py), the scores of checkpoints averaged as an ensemble, and the
report on them. Separate from train.py so that the choice of what is scored can be read and tested without the
training around it."""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from finetune.calibration import calibrated, fit_temperature, nll, reliability
from finetune.members import device_for, load_members, member_probabilities, score_probabilities
from finetune.models.checkpoint import LoadedCheckpoint, update_checkpoint
from finetune.multilabel import multi_hot_rows, multilabel_scores, tune_thresholds
from finetune.open_set import BANK_MAX, known_scores, logits_and_features, threshold_for
from finetune.open_set import RECORD_KEY as OPEN_SET_KEY
from finetune.policy.choose import format_policy_block
from finetune.recipe.callbacks import LRTrace, plateau_scheduler
from finetune.recipe.schedulers import anneal_start_step
from finetune.report import write_report

log = logging.getLogger(__name__)

# `score_checkpoint=auto` scores the last epoch when the LR ended at or below this fraction of its peak.
ANNEALED_FRACTION = 0.1


def checkpoint_to_score(cfg: DictConfig, trainer: L.Trainer, lr_trace: LRTrace, run_dir: Path,
                        no_validation: str | None) -> tuple[str | None, str | None, str]:
    """(best checkpoint, checkpoint to score, why): with no validation split and no best checkpoint,
    the last epoch; else as ``score_checkpoint`` asks (see ``scoring_checkpoint``)."""
    best = best_checkpoint(trainer)
    if no_validation and best is None:
        last = run_dir / "checkpoints" / "last.ckpt"
        scored = str(last) if last.is_file() else None
        return best, scored, "the last epoch: with no validation split there is nothing to pick an epoch by"
    scored, why = scoring_checkpoint(str(cfg.score_checkpoint), trainer, lr_trace, best, run_dir)
    return best, scored, why


def scoring_checkpoint(mode: str, trainer: L.Trainer, lr_trace: LRTrace, best: str | None,
                       run_dir: Path) -> tuple[str | None, str]:
    """The checkpoint that scores val/test (and feeds TTA, the report and ensembles), and why.

    After a schedule that anneals to ~0 (one-cycle, cosine) the last weights are the converged ones;
    picking an epoch on a small validation set then mostly adds that set's noise (BENCHMARKS.md: on
    the demo's 100 validation images the last epoch scored 0.007 above the best-by-validation pick
    on average over 28 runs, up to 0.04). ReduceLROnPlateau lowers the LR *because* validation
    stopped improving, and a constant LR never settles: there the best epoch is the better guess (unless
    ``scheduler.final_anneal`` ends the run converged)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    last_path = str(last) if last.is_file() else None
    if mode == "auto":
        final_anneal = anneal_start_step(trainer.lr_scheduler_configs) is not None
        if plateau_scheduler(trainer) is not None and not final_anneal:
            mode, why = "best", ("the best epoch by the monitored metric "
                                 "(ReduceLROnPlateau: its reductions follow validation)")
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


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint's path, or None (then the final weights are scored) when none was kept."""
    # The callback that keeps the best epoch by a metric (last.ckpt's has no monitor; it may be the only one).
    callback = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path if path and Path(path).is_file() else None


def trainer_scores(results: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of ``Trainer.validate``/``test`` (one dataloader) as plain floats."""
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def split_probabilities(paths: list[str], index, tta: list[str], cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Per-split probabilities [members, images, classes] of checkpoints on the run's val and test splits."""
    return members_split_probabilities(load_members(paths, key="ensemble"), index, tta, cfg)


def members_split_probabilities(members: list[LoadedCheckpoint], index, tta: list[str],
                                cfg: DictConfig) -> dict[str, torch.Tensor]:
    """:func:`split_probabilities` of checkpoints already loaded."""
    device = device_for(str(cfg.trainer.accelerator))
    batch = int(cfg.data.eval_batch_size or cfg.data.batch_size)
    return {split: member_probabilities(members, index.splits[split], tta, batch, device)
            for split in ("val", "test") if index.splits.get(split)}


def score_checkpoints(paths: list[str], index, tta: list[str], cfg: DictConfig,
                      with_thresholds: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Averaged-probability scores of checkpoints on the run's own val and test splits. Multi-label: at per-class
    thresholds tuned on the averaged val probabilities (``with_thresholds``, a dict, receives them), else 0.5."""
    probs = split_probabilities(paths, index, tta, cfg)
    thresholds = None
    if index.multilabel and "val" in probs:
        targets = multi_hot_rows([y for _, y in index.splits["val"]], len(index.classes))
        thresholds = tune_thresholds(probs["val"].mean(0), targets)
        if with_thresholds is not None:
            with_thresholds["thresholds"] = thresholds
    return {split: score_probabilities(p, [label for _, label in index.splits[split]], thresholds, index.classes)
            for split, p in probs.items()}


def flat(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"val": {"acc":..}} -> {"val/acc":.., "val/loss":.., "val/member_acc": [..]}."""
    return {f"{split}/{k}": v for split, values in scores.items() for k, v in values.items()}


def summary(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val/acc", "test/acc") if k in metrics)


def report_or_warning(run_dir: Path, scored: str | None, index, record: dict[str, Any], metrics: dict[str, Any],
                      cfg: DictConfig, preprocessing, probs: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """report.md/html, or, when it cannot be written, a logged warning and a note for metrics.json:
    the report explains a finished run, whose metrics and checkpoints are complete without it. ``probs``: the
    scored checkpoint's :func:`split_probabilities` when already computed (calibration computes them)."""
    try:
        if probs is None:
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


def calibrate_checkpoint(mode: str, scored: str | None, index, cfg,
                         no_validation: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """``calibrate`` after training: T fitted on the val split's probabilities of the scored checkpoint, stored
    in that checkpoint (finetune-eval, -predict, -export and load() then give calibrated probabilities), with
    ECE and NLL before/after on val and, when there is one, on the test split. ``mode``: auto (when there is a
    validation split) | true | false. Returns the record for metrics.json and the calibrated probabilities
    per split (as :func:`split_probabilities` gives them), or None when skipped."""
    if mode == "false" or mode is False:
        return {"skipped": "calibrate=false"}, None
    if index.multilabel:
        return {"skipped": "task=multilabel: a sigmoid per class, with per-class thresholds tuned on val instead"}, None
    if no_validation or not index.splits.get("val"):
        return {"skipped": f"no validation split to fit the temperature on ({no_validation or 'empty'})"}, None
    if scored is None:
        return {"skipped": "no checkpoint was kept"}, None
    # The network's own probabilities, also for a checkpoint calibrated before (a run resumed after it finished)
    members = [replace(m, temperature=1.0) for m in load_members([scored], key="ensemble")]
    probs = {split: p.mean(0) for split, p in members_split_probabilities(members, index, [], cfg).items()}
    labels = {split: torch.tensor([y for _, y in index.splits[split]]) for split in probs}
    temperature = round(fit_temperature(probs["val"], labels["val"]), 4)  # as stored and reported
    result: dict[str, Any] = {"temperature": temperature, "fitted_on": f"val ({len(labels['val'])} images)",
                              "checkpoint": scored}
    after = {split: calibrated(p, temperature) for split, p in probs.items()}
    for split, p in probs.items():
        bins_before, bins_after = reliability(p, labels[split]), reliability(after[split], labels[split])
        result[split] = {"ece_before": bins_before["ece"], "ece_after": bins_after["ece"],
                         "nll_before": round(nll(p, labels[split]), 5),
                         "nll_after": round(nll(after[split], labels[split]), 5)}
        result.setdefault("reliability", {})[split] = {"before": bins_before, "after": bins_after}
    update_checkpoint(scored, temperature=float(temperature))
    return result, {split: p[None] for split, p in after.items()}


def fit_thresholds(scored: str | None, index, cfg, no_validation: str | None,
                   kept: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """After a multi-label fit: thresholds tuned on the scored checkpoint's validation probabilities, stored in it,
    and the val/test scores at 0.5 and at the tuned thresholds (metrics.json "multilabel"). ``kept`` (a dict)
    receives those probabilities as :func:`split_probabilities` gives them, so the report needs no second pass."""
    if scored is None:
        return {"skipped": "no checkpoint was kept"}
    per_member = split_probabilities([scored], index, [], cfg)
    if kept is not None:
        kept.update(per_member)
    probs = {split: p.mean(0) for split, p in per_member.items()}
    targets = {split: multi_hot_rows([y for _, y in index.splits[split]], len(index.classes)) for split in probs}
    result: dict[str, Any] = {}
    if no_validation or "val" not in probs:
        thresholds = [0.5] * len(index.classes)
        result["thresholds_from"] = f"0.5 for every class: no validation split to tune on ({no_validation or 'empty'})"
    else:
        thresholds = tune_thresholds(probs["val"], targets["val"])
        result["thresholds_from"] = f"the best F1 per class on val ({len(targets['val'])} images)"
    update_checkpoint(scored, thresholds=thresholds)
    result["thresholds"] = dict(zip(index.classes, thresholds))
    result["checkpoint"] = scored
    for split, p in probs.items():
        result[split] = {"at_0.5": multilabel_scores(p, targets[split]),
                         "tuned": multilabel_scores(p, targets[split], thresholds, index.classes)}
    return result


def _sample(samples: list[tuple[str, int]], limit: int, seed: int) -> list[tuple[str, int]]:
    if len(samples) <= limit:
        return list(samples)
    return sorted(random.Random(seed).sample(list(samples), limit))


def split_outputs(module: nn.Module, samples: list[tuple[str, int]], preprocessing, batch_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of ``samples`` seen the evaluation way, on ``device``; returned on the CPU."""
    from torch.utils.data import DataLoader

    from finetune.data.datamodule import ImageListDataset, decode_side
    from finetune.data.transforms import eval_transform

    dataset = ImageListDataset([(p, -1) for p, _ in samples], eval_transform(preprocessing),
                               max_side=decode_side(preprocessing))
    net = module.to(device).eval().net
    logits, features = [], []
    with torch.inference_mode():
        for images, _ in DataLoader(dataset, batch_size=batch_size):
            z, f = logits_and_features(net, images.to(device))
            logits.append(z.float().cpu()), features.append(f.float().cpu())
    return torch.cat(logits), torch.cat(features)


def fit_open_set(options, scored: str | None, index, cfg, no_validation: str | None) -> dict[str, Any]:
    """``open_set`` after training (and after calibration): the score of the scored checkpoint's validation
    images, the threshold that rejects ``options.reject`` of them, and (knn) the bank of training features,
    stored in the checkpoint. Returns the record for metrics.json (without the bank and the scores)."""
    mode, kind, reject = str(options.fit).lower(), str(options.score).lower(), float(options.reject)
    if mode == "false":
        return {"skipped": "open_set.fit=false"}
    if index.multilabel:
        return {"skipped": "task=multilabel: an image may show none of the classes already (every probability "
                           "below its threshold)"}
    if no_validation or not index.splits.get("val"):
        return {"skipped": f"no validation split to fit the threshold on ({no_validation or 'empty'})"}
    if scored is None:
        return {"skipped": "no checkpoint was kept"}
    from finetune.models.checkpoint import load_classifier

    loaded = load_classifier(scored)
    device = device_for(str(cfg.trainer.accelerator))
    batch = int(cfg.data.eval_batch_size or cfg.data.batch_size)
    bank = None
    if kind == "knn":
        train = _sample(index.splits["train"], BANK_MAX, int(cfg.seed))
        _, features = split_outputs(loaded.module, train, loaded.preprocessing, batch, device)
        bank = nn.functional.normalize(features, dim=-1).half()
    scores = {}
    for split in ("val", "test"):
        if index.splits.get(split):
            logits, features = split_outputs(loaded.module, index.splits[split], loaded.preprocessing, batch, device)
            scores[split] = known_scores(kind, logits, features, loaded.temperature, bank)
    val_scores = sorted(round(float(s), 6) for s in scores["val"])
    stored: dict[str, Any] = {"score": kind, "reject": reject, "val_scores": val_scores,
                              "fitted_on": f"val ({len(val_scores)} images)"}
    stored["threshold"] = threshold_for(stored, reject)
    if bank is not None:
        stored["bank"] = bank
    update_checkpoint(scored, **{OPEN_SET_KEY: stored})
    result = {k: v for k, v in stored.items() if k not in ("val_scores", "bank")}
    result["checkpoint"] = scored
    if bank is not None:
        result["bank_images"] = len(bank)
    # The share of known images rejected, as a check of the threshold on images it was not fitted on
    for split, values in scores.items():
        result[f"{split}_rejected"] = round(float((values < stored["threshold"]).float().mean()), 4)
    return result

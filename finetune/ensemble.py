"""Seed ensembles (``ensemble.size`` > 1): members trained one after another in RUN/members/<k>, reused or
continued by a resume, then scored on their averaged probabilities. Separate from train.py, which trains
one model (passed in as ``train_member``, so this module does not import train.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.data.datasets import scan_configured
from finetune.errors import FinetuneError, TrainingInterrupted
from finetune.members import ENSEMBLE_FILE
from finetune.prepare import checked_index
from finetune.resume import with_values
from finetune.run_files import write_json, write_text
from finetune.run_folder import resolve_run_dir
from finetune.scoring import flat, score_checkpoints, summary

log = logging.getLogger(__name__)


def train_ensemble(cfg: DictConfig, train_member: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    """``ensemble.size`` members with seeds seed, seed+1, ... in RUN/members/<k>, then their averaged
    probabilities scored on val/test. ``resume=RUN``: a finished member is reused (continued when
    trainer.max_epochs grew), a stopped one continues from its last.ckpt, one not started starts.
    ``train_member``: train.train_single, which trains one member."""
    run_dir = resolve_run_dir(cfg)
    size = int(cfg.ensemble.size)
    if not cfg.resume and rank_zero_only.rank == 0:  # what resume=RUN continues with, if this stops
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    members = []
    for k in range(size):
        member_dir = run_dir / "members" / str(k)
        done = member_dir / "metrics.json"
        if done.is_file() and member_finished(member_dir, cfg):
            log.info("Ensemble member %d/%d: reusing the finished run in %s", k + 1, size, member_dir)
            result = json.loads(done.read_text())
        else:
            log.info("Ensemble member %d/%d (seed %d) -> %s", k + 1, size, cfg.seed + k, member_dir)
            member_cfg = with_values(cfg, {"seed": int(cfg.seed) + k, "run_dir": str(member_dir), "ensemble.size": 1,
                                           "resume": str(member_dir)
                                           if cfg.resume and (member_dir / "checkpoints" / "last.ckpt").is_file()
                                           else None})
            try:
                result = train_member(member_cfg)
            except TrainingInterrupted:
                raise TrainingInterrupted(run_dir) from None  # the ensemble resumes, not one member
        checkpoint = result.get("scored_checkpoint", result.get("best_checkpoint"))
        if not checkpoint:
            raise FinetuneError(f"ensemble member {k} in {member_dir} kept no checkpoint; the ensemble needs best.ckpt "
                                "or last.ckpt (keep callbacks.model_checkpoint and callbacks.last_checkpoint).")
        members.append({"seed": int(cfg.seed) + k, "run_dir": str(member_dir), "checkpoint": checkpoint,
                        **{key: result[key] for key in ("val/acc", "test/acc") if key in result}})
    # The members' own index: the same scan, without the files their data check skipped (cached: instant).
    index, _ = checked_index(scan_configured(cfg), cfg)
    tuned: dict[str, Any] = {}  # multi-label: the thresholds tuned on the averaged val probabilities
    scores = score_checkpoints([m["checkpoint"] for m in members], index, list(cfg.tta), cfg, tuned)
    metrics: dict[str, Any] = {
        **flat(scores),
        "ensemble": {"size": size, "members": members, "tta": list(cfg.tta)},
        "run_dir": str(run_dir),
    }
    for key in ("val/acc", "test/acc"):
        values = [m[key] for m in members if key in m]
        if values:
            metrics["ensemble"][f"mean_member_{key}"] = sum(values) / len(values)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / ENSEMBLE_FILE, {"members": [str(Path(m["checkpoint"]).relative_to(run_dir)) for m in members],
                                         "kind": "seeds", **tuned})
    write_json(run_dir / "metrics.json", metrics)
    log.info("Ensemble of %d: %s (mean member: %s)", size, summary(metrics),
             ", ".join(f"{k}={metrics['ensemble'][f'mean_member_{k}']:.4f}" for k in ("val/acc", "test/acc")
                       if f"mean_member_{k}" in metrics["ensemble"]))
    return metrics


def member_finished(member_dir: Path, cfg: DictConfig) -> bool:
    """An ensemble member's metrics.json is final unless a resume asks for more epochs than it trained for."""
    if not cfg.resume:
        return True
    try:
        trained_for = OmegaConf.load(member_dir / "config.yaml").trainer.max_epochs
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):
        return False
    return trained_for == cfg.trainer.max_epochs

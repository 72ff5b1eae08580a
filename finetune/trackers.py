"""What experiment trackers get beyond the metrics Lightning logs: the run's files as artifacts, and a closed
run at the end (so the next run in the same Python process starts its own).

Lightning logs the metrics; it has no notion of the run folder's files. W&B gets one ``run-files`` artifact
(policy.json, data_report.json, recipe.json, the report and its images), MLflow the same files as run
artifacts; other loggers (CSV, TensorBoard) have nothing to attach them to and are left as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_FILES = ("policy.json", "data_report.json", "recipe.json", "metrics.json", "report.html", "report.md",
             "learning_curves.png", "confusion_matrix.png", "confidently_wrong.png", "augment_preview.png")


def _is(logger: Any, name: str) -> bool:
    return type(logger).__name__ == name  # no import: the tracker's package may not be installed


def log_run_files(loggers: Sequence[Any], run_dir: Path) -> list[str]:
    """Attach the run folder's decision, data check and report files to the trackers that take files."""
    files = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    logged = []
    for logger in loggers:
        try:
            if _is(logger, "WandbLogger"):
                import wandb

                artifact = wandb.Artifact(f"run-files-{logger.experiment.id}", type="run-files",
                                          description="finetune's run folder: decision, data check, report")
                for path in files:
                    artifact.add_file(str(path))
                logger.experiment.log_artifact(artifact)
                logged.append("wandb")
            elif _is(logger, "MLFlowLogger"):
                for path in files:
                    logger.experiment.log_artifact(logger.run_id, str(path))
                logged.append("mlflow")
        except Exception as e:  # noqa: BLE001  (a tracker that fails to take files must not cost the run its results)
            log.warning("Could not log the run files to %s: %s", type(logger).__name__, e)
    return logged


def close_trackers(loggers: Sequence[Any]) -> None:
    """End the W&B run: Lightning leaves it open, and the next run in this process would log into it."""
    for logger in loggers:
        if _is(logger, "WandbLogger") and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()

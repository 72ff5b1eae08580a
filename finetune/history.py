"""RUN/logs/metrics.csv that keeps the earlier epochs when a run resumes.

Lightning's CSVLogger deletes an existing metrics.csv when it starts ("Previous log files in this
directory will be deleted"), so a resumed run's learning curves and report lost every epoch before
the resume. This logger appends instead; before a resume, ``keep_history`` cuts the file back to
what the checkpoint holds (a killed run may have logged part of a later epoch, and a finished run's
final scoring row is logged again by the resumed run).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from finetune.run_files import write_text


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer, continuing an existing metrics.csv (its header included) instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        pass


class HistoryCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose metrics.csv survives a resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def keep_history(self, epoch: int | None, global_step: int = 0) -> None:
        """Keep the rows up to a checkpoint's ``epoch`` (rows without an epoch, the LR's: steps before
        ``global_step``); ``epoch=None``: a run that starts from scratch keeps none."""
        keep_history(Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE, epoch, global_step)


def keep_history(path: Path, epoch: int | None, global_step: int = 0) -> None:
    """Cut the CSV log at ``path`` back to the rows a checkpoint at ``epoch``/``global_step`` covers."""
    if not path.is_file():
        return
    if epoch is None:
        path.unlink()
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)

    def covered(row: dict[str, str]) -> bool:
        try:
            if row.get("epoch"):
                return int(float(row["epoch"])) <= epoch
            return int(float(row.get("step") or 0)) < global_step
        except ValueError:
            return False

    kept = [r for r in rows if covered(r)]
    if len(kept) == len(rows):
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)  # "\r\n" rows, as Lightning writes them
    writer.writeheader()
    writer.writerows(kept)
    write_text(path, out.getvalue())

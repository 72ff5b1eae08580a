"""The summary of a Hydra multirun (``finetune -m optimizer=sgd,adam scheduler=plateau,cosine``):
one row per job with its swept values and scores, sorted by the monitored metric, as
``SWEEP_DIR/sweep_summary.csv`` and a printed table that names the best configuration.

A Hydra callback (``hydra.callbacks.sweep_summary`` in train.yaml), so it runs for every launcher
and sweeper (the basic launcher, submitit, Optuna) once all jobs have finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune.run_files import write_text

SCORES = ("val/acc", "val/balanced_acc", "val/macro_f1", "val/map", "val/micro_f1", "val/loss", "test/acc",
          "test/balanced_acc", "test/macro_f1", "test/map", "test/micro_f1", "test/loss", "epochs", "fit_seconds")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({"job": job.name, "overrides": overrides, "status": "done" if metrics else "failed",
                     **{k: metrics.get(k) for k in SCORES}})
    return rows


def rank(rows: list[dict[str, Any]], monitor: str, mode: str) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> float:
        value = row.get(monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        return -value if mode == "max" else value

    return sorted(rows, key=key)


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose values differ between jobs (the ones the sweep varied)."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for item in row["overrides"]:
            k, _, v = item.partition("=")
            values.setdefault(k, set()).add(v)
    return [k for k, v in values.items() if len(v) > 1] or list(values)


def write_summary(sweep_dir: Path, monitor: str, mode: str) -> tuple[Path, str]:
    rows = rank(collect(sweep_dir), monitor, mode)
    keys = swept_keys(rows)
    for row in rows:
        chosen = dict(item.partition("=")[::2] for item in row["overrides"])
        row.update({k: chosen.get(k, "") for k in keys})
    header = ["rank", "job", *keys, *SCORES, "status"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for i, row in enumerate(rows, 1):
        writer.writerow([i, row["job"], *(row[k] for k in keys), *(row[k] for k in SCORES), row["status"]])
    path = write_text(sweep_dir / "sweep_summary.csv", buffer.getvalue())

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"Sweep of {len(rows)} runs, sorted by {monitor} ({mode}):", "",
             "| rank | job | " + " | ".join(keys) + f" | {monitor} | test/acc | fit s |",
             "|---|---|" + "---|" * (len(keys) + 3)]
    for i, row in enumerate(rows, 1):
        lines.append(f"| {i} | {row['job']} | " + " | ".join(row[k] for k in keys)
                     + f" | {fmt(row.get(monitor))} | {fmt(row.get('test/acc'))} | {fmt(row.get('fit_seconds'))} |")
    done = [r for r in rows if r["status"] == "done"]
    if done:
        best = done[0]
        best_line = f"Best: job {best['job']} ({monitor}={fmt(best.get(monitor))}): {' '.join(best['overrides'])}"
        lines += ["", best_line, f"Summary: {path}"]
    failed = [r["job"] for r in rows if r["status"] != "done"]
    if failed:
        lines += ["", (f"{len(failed)} of {len(rows)} jobs failed (job {', '.join(failed)}): their errors are in the "
                       f"log above and in {sweep_dir}/<job>/")]
    return path, "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        from finetune.task import task_monitor

        _, table = write_summary(sweep_dir, task_monitor(config), str(config.monitor_mode))
        print("\n" + table)
        if " jobs failed (job " in table:
            sys.exit(2)  # the sweep went on past its failed jobs; the exit status still says some failed

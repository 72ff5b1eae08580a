"""Scale-out switches that run on a CPU: the trainer presets compose, and bf16 mixed precision trains."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, make_cfg

from finetune.train import train


@pytest.mark.parametrize("preset, accelerator, strategy, precision", [
    ("cpu", "cpu", "auto", "32-true"), ("gpu", "gpu", "auto", "bf16-mixed"),
    ("ddp", "gpu", "ddp", "32-true"), ("ddp_spawn", "gpu", "ddp_spawn", "32-true"),
])
def test_trainer_presets_compose_on_top_of_the_defaults(preset, accelerator, strategy, precision):
    cfg = make_cfg(["data.root=x", f"trainer={preset}", "trainer.devices=2"])
    assert (cfg.trainer.accelerator, cfg.trainer.strategy, str(cfg.trainer.precision)) == (
        accelerator, strategy, precision
    )
    assert cfg.trainer.max_epochs == 10 and cfg.trainer.devices == 2  # defaults kept, CLI still overrides


def test_bf16_mixed_precision_trains_on_cpu(class_folders, fast_cfg):
    metrics = train(fast_cfg(class_folders, "policy=full", "trainer.precision=bf16-mixed", "trainer.max_epochs=2"))
    assert math.isfinite(metrics["val/loss"]) and metrics["epochs"] == 2


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "finetune"), *args], check=False, capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.mark.slow  # 10 s; the multirun sweep it rides on stays in the default suite (test_hostile)
def test_optuna_search_runs_trials_and_ranks_them(class_folders, tmp_path):
    result = _cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"data.root={class_folders}",
                  *FAST, "policy=full", "report=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best parameters" in result.stdout + result.stderr and "Best: job" in result.stdout
    with open(tmp_path / "sweep" / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "optimizer.lr" in rows[0]  # the swept values are columns


def test_slurm_launcher_config_composes(tmp_path):
    result = _cli("--cfg", "hydra", "data.root=x", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                  "hydra.launcher.tasks_per_node=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "submitit_slurm" in result.stdout and "tasks_per_node: 4" in result.stdout


def test_channels_last_trains_to_the_same_result(class_folders, fast_cfg, tmp_path):
    common = ["policy=full", "augment=none", "trainer.max_epochs=1", "report=false"]
    plain = train(fast_cfg(class_folders, *common, run_dir=tmp_path / "plain"))
    nhwc = train(fast_cfg(class_folders, *common, "model.channels_last=true", run_dir=tmp_path / "nhwc"))
    assert abs(plain["val/loss"] - nhwc["val/loss"]) < 1e-2  # other conv kernels: rounding, amplified by a step

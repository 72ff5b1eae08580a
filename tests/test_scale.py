"""Scale-out switches that run on a CPU: the trainer presets compose, and bf16 mixed precision trains."""

from __future__ import annotations

import math

import pytest
from conftest import make_cfg

from finetune.train import train


@pytest.mark.parametrize("preset, accelerator, strategy, precision", [
    ("cpu", "cpu", "auto", "32-true"), ("gpu", "gpu", "auto", "bf16-mixed"),
    ("ddp", "gpu", "ddp", "32-true"), ("ddp_spawn", "gpu", "ddp_spawn", "32-true"),
])
def test_trainer_presets_compose_on_top_of_the_defaults(preset, accelerator, strategy, precision):
    cfg = make_cfg(["data.root=x", f"trainer={preset}", "trainer.devices=2"])
    assert (cfg.trainer.accelerator, cfg.trainer.strategy, str(cfg.trainer.precision)) == (accelerator, strategy, precision)
    assert cfg.trainer.max_epochs == 10 and cfg.trainer.devices == 2  # defaults kept, CLI still overrides


def test_bf16_mixed_precision_trains_on_cpu(class_folders, fast_cfg):
    metrics = train(fast_cfg(class_folders, "policy=full", "trainer.precision=bf16-mixed", "trainer.max_epochs=2"))
    assert math.isfinite(metrics["val/loss"]) and metrics["epochs"] == 2

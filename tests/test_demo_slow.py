"""The real demo protocol end to end (slow: minutes on 2 cores; `scripts/test.sh -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_cfg

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_few_shot_auto(tmp_path):
    from finetune.train import train

    data = tmp_path / "fmnist"
    subprocess.run([sys.executable, str(REPO / "scripts/make_demo_data.py"), "--out", str(data)], check=True)
    cfg = make_cfg([f"data.root={data}", f"run_dir={tmp_path / 'run'}", "data.image_size=64",
                    "trainer.enable_progress_bar=false", "scheduler=onecycle", "augment=none"])
    metrics = train(cfg)
    record = json.loads((tmp_path / "run" / "policy.json").read_text())
    # 50 images per class of grayscale clothing: little data, far from ImageNet.
    assert record["quadrant"] == "small_different"
    assert record["measurements"]["best_stage"] is not None
    assert metrics["test/acc"] > 0.80  # chance is 0.10; the linear probe on pre-logits reaches ~0.78

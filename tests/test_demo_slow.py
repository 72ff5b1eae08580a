"""The real demo protocol end to end (slow: minutes on 2 cores; `scripts/test.sh -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_cfg

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_few_shot_auto(tmp_path):
    from finetune.train import train

    data = tmp_path / "fmnist"
    subprocess.run([sys.executable, str(REPO / "scripts/make_demo_data.py"), "--out", str(data)], check=True)
    # What scripts/demo.sh runs: nothing but the data (recipe=auto chooses the rest).
    cfg = make_cfg([f"data.root={data}", f"run_dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false"])
    metrics = train(cfg)
    record = json.loads((tmp_path / "run" / "policy.json").read_text())
    # 50 images per class of grayscale clothing: little data, far from ImageNet.
    assert record["quadrant"] == "small_different"
    assert record["measurements"]["best_stage"] is not None
    chosen = {c["key"]: c["value"] for c in json.loads((tmp_path / "run" / "recipe.json").read_text())["choices"]}
    assert chosen["data.image_size"] == 64 and chosen["augment"] == "flip"  # 28 px images; a flipped shoe is a shoe
    assert metrics["test/acc"] > 0.85  # chance is 0.10; the linear probe on pre-logits reaches ~0.78

"""Training throughput and what limits it (issue 18): a real Lightning fit whose loader sleeps is reported as
loader-bound, one whose step is the slow part as model-bound, and a finetune run writes the numbers to
metrics.json and the report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from conftest import FAST, run_cli
from torch.utils.data import DataLoader, Dataset

from finetune.throughput import TrainThroughput, describe


class _Items(Dataset):
    def __init__(self, delay: float):
        self.delay = delay

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        return torch.randn(8), i % 2


class _Model(L.LightningModule):
    def __init__(self, step_delay: float):
        super().__init__()
        self.layer, self.step_delay = torch.nn.Linear(8, 2), step_delay

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_delay)
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(item_delay: float, step_delay: float) -> dict:
    speed = TrainThroughput(skip_steps=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[speed], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Model(step_delay), DataLoader(_Items(item_delay), batch_size=8))
    return speed.summary()


def test_a_slow_loader_is_named_as_the_limit_and_a_slow_step_is_not():
    loader_bound = _fit(item_delay=0.005, step_delay=0.0)  # 40 ms to fetch a batch, ~1 ms to train on it
    assert loader_bound["limited_by"] == "loader" and loader_bound["loader_wait_share"] > 0.5
    assert loader_bound["timed_steps"] == 6  # 8 steps, the first 2 skipped
    assert 0 < loader_bound["train_images_per_s"] < 8 / 0.040 * 1.05  # at most batch / fetch time (sleeps only grow)
    assert "raise data.num_workers" in describe(loader_bound)
    model_bound = _fit(item_delay=0.0, step_delay=0.1)
    assert model_bound["limited_by"] == "model" and model_bound["loader_wait_share"] < 0.2  # ~1 ms of 100
    assert "the model is the limit" in describe(model_bound)
    assert model_bound["peak_rss_gb"]["process"] > 0.1


def test_a_run_reports_its_throughput(class_folders: Path, tmp_path: Path):
    run = tmp_path / "run"
    result = run_cli("finetune", f"data.root={class_folders}", f"run_dir={run}", "policy=full", *FAST,
                     "trainer.max_epochs=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    speed = json.loads((run / "metrics.json").read_text())["throughput"]
    assert speed["train_images_per_s"] > 0 and speed["timed_steps"] == 3 * 3 - 5  # 3 batches of 8 per epoch
    assert speed["limited_by"] in ("model", "loader") and speed["peak_rss_gb"]["process"] > 0.2
    assert "training images/s" in (run / "report.md").read_text()
    assert "Throughput:" in result.stdout + result.stderr

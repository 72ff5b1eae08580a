"""Imbalanced training splits: loss.class_weights (auto above data.imbalance_ratio, balanced, a list) and
data.sampler=balanced, as applied in a real run and reported in metrics.json."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.data.imbalance import choose
from finetune.errors import FinetuneError
from finetune.train import train
from tests.conftest import CLASSES, write_images

CLASS_NAMES = list(CLASSES)


def test_auto_weights_only_above_the_ratio_and_the_choices_are_checked():
    skewed = [0] * 24 + [1] * 2 + [2] * 4  # ratio 12
    auto = choose("auto", "uniform", skewed, CLASS_NAMES, 10)
    assert auto.class_weights == pytest.approx([30 / 72, 30 / 6, 30 / 12]) and "12.0 > data.imbalance_ratio=10" in \
        auto.reason
    assert choose("auto", "uniform", skewed, CLASS_NAMES, 20).class_weights is None  # below the ratio
    assert choose("auto", "balanced", skewed, CLASS_NAMES, 10).class_weights is None  # the sampler evens it out
    assert choose("balanced", "uniform", [0, 1, 2] * 5, CLASS_NAMES, 10).class_weights == pytest.approx([1, 1, 1])
    assert choose([1, 2.5, 0], "uniform", skewed, CLASS_NAMES, 10).class_weights == [1.0, 2.5, 0.0]
    with pytest.raises(FinetuneError, match="loss.class_weights has 2 value.*circle, square, stripes"):
        choose([1, 2], "uniform", skewed, CLASS_NAMES, 10)
    with pytest.raises(FinetuneError, match="data.sampler=weighted must be one of uniform, balanced"):
        choose("auto", "weighted", skewed, CLASS_NAMES, 10)


def _skewed_folders(root: Path) -> Path:
    for i, (kind, n) in enumerate(zip(CLASSES, (24, 2, 4))):
        write_images(root / "train" / kind, kind, n, seed=i)
        write_images(root / "val" / kind, kind, 3, seed=50 + i)
    return root


def test_a_run_weights_its_loss_or_balances_its_batches_and_says_so(tmp_path, fast_cfg):
    root = _skewed_folders(tmp_path / "data")
    metrics = train(fast_cfg(root, "policy=full", "augment=none", run_dir=tmp_path / "weighted"))
    record = json.loads((tmp_path / "weighted" / "metrics.json").read_text())["imbalance"]
    assert record == metrics["imbalance"] and record["ratio"] == 12.0 and record["sampler"] == "uniform"
    assert record["class_weights"] == pytest.approx({"circle": 0.4167, "square": 5.0, "stripes": 2.5}, abs=1e-4)
    assert "inverse class frequency (auto)" in record["reason"]
    report = (tmp_path / "weighted" / "report.md").read_text()
    assert "largest / smallest class 12; sampler uniform; loss weights: circle 0.4167, square 5, stripes 2.5" in report

    # The training loss is the weighted one: the module's loss on a batch equals torch's weighted CE.
    from finetune.models.checkpoint import load_classifier
    from finetune.models.module import Recipe

    module = load_classifier(metrics["scored_checkpoint"]).module
    module.recipe = Recipe(class_weights=(30 / 72, 30 / 6, 30 / 12))
    logits, target = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 2, 2])
    expected = F.cross_entropy(logits, target, weight=torch.tensor([30 / 72, 30 / 6, 30 / 12]))
    assert module._cross_entropy(logits, target, "train") == pytest.approx(float(expected), abs=1e-6)
    assert module._cross_entropy(logits, target, "val") == pytest.approx(float(F.cross_entropy(logits, target)))

    # data.sampler=balanced: an epoch of training batches draws the classes about equally (30 draws of 3 classes)
    from finetune.data.datamodule import ImageDataModule
    from finetune.data.datasets import scan_dataset
    from finetune.data.transforms import Preprocessing

    index = scan_dataset(root, 0.0, 0.0)
    data = ImageDataModule(index, Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0), batch_size=30,
                           sampler="balanced", seed=0)
    data.setup("fit")
    labels = torch.cat([y for _, y in data.train_dataloader()]).tolist()
    assert len(labels) == 30 and min(collections.Counter(labels).values()) >= 5  # uniform would give square 2
    run = train(fast_cfg(root, "policy=full", "augment=none", "data.sampler=balanced", run_dir=tmp_path / "sampled"))
    assert run["imbalance"]["sampler"] == "balanced" and run["imbalance"]["class_weights"] is None


def test_a_run_from_before_these_keys_resumes_with_todays_defaults(tmp_path, fast_cfg):
    """A run folder whose config.yaml an older finetune wrote (no loss.*, data.sampler, ddp_timeout_s) resumes:
    the missing keys take today's defaults, and the log says so."""
    import yaml

    root = _skewed_folders(tmp_path / "data")
    train(fast_cfg(root, "policy=linear_probe", run_dir=tmp_path / "old"))
    config = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    del config["loss"], config["data"]["sampler"], config["ddp_timeout_s"]
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(config))
    from tests.conftest import make_cfg

    metrics = train(make_cfg([f"resume={tmp_path / 'old'}", "trainer.max_epochs=2"]))
    assert metrics["epochs"] == 2 and metrics["imbalance"]["sampler"] == "uniform"
    assert metrics["imbalance"]["class_weights"] is not None  # auto, ratio 12 > 10

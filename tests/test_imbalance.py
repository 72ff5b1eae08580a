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


def test_weights_reach_the_cached_feature_head_and_the_mixed_batches(tmp_path, fast_cfg):
    """The weighted loss also trains the L-BFGS head on cached features (+ its L2), and MixUp's soft targets."""
    root = _skewed_folders(tmp_path / "data")
    metrics = train(fast_cfg(root, "policy=linear_probe", run_dir=tmp_path / "probe"))
    record = json.loads((tmp_path / "probe" / "policy.json").read_text())["feature_cache"]
    assert record["used"] and record["head_solver"] == "lbfgs" and metrics["imbalance"]["class_weights"]

    from finetune.data.mixing import BatchMixer
    from finetune.models.checkpoint import load_classifier
    from finetune.models.module import FeatureHeadClassifier, Recipe

    loaded = load_classifier(metrics["scored_checkpoint"]).module
    weights = (30 / 72, 30 / 6, 30 / 12)
    head = FeatureHeadClassifier(loaded.net, loaded.spec, loaded.classes, loaded.preprocessing,
                                 Recipe(class_weights=weights, head_solver="lbfgs", head_l2=0.01))
    features, target = torch.randn(6, loaded.net.get_classifier().in_features), torch.tensor([0, 0, 0, 1, 2, 2])
    with torch.no_grad():
        logits = head.net.get_classifier()(features)
        expected = F.cross_entropy(logits, target, weight=torch.tensor(weights)) + \
            0.01 * head.net.get_classifier().weight.pow(2).sum()
        assert float(head._cross_entropy(logits, target, "train")) == pytest.approx(float(expected), rel=1e-5)

    # MixUp: the module's training loss is the weighted cross-entropy of the mixed soft targets
    mixer = BatchMixer(3, mixup_alpha=0.4)
    loaded.recipe = Recipe(class_weights=weights, batch_mixer=mixer)
    images = torch.rand(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0])
    loaded.train()
    torch.manual_seed(3)
    with torch.no_grad():
        loss = loaded._step((images, labels), "train", loaded.train_acc)
    torch.manual_seed(3)
    mixed, soft = mixer(images, labels)
    with torch.no_grad():
        expected = F.cross_entropy(loaded(mixed), soft, weight=torch.tensor(weights),
                                   label_smoothing=loaded.label_smoothing)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5) and (soft > 0).sum(1).max() == 2  # mixed


def test_balanced_sampler_under_ddp_splits_its_draws_between_ranks():
    """Lightning wraps a custom sampler per rank (DistributedSamplerWrapper): the ranks share out the balanced
    draws, so together they still see the classes about equally, each rank half of them."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from finetune.data.imbalance import balanced_sampler

    labels = [0] * 240 + [1] * 20 + [2] * 40  # ratio 12
    per_rank = [list(DistributedSamplerWrapper(balanced_sampler(labels, seed=0), num_replicas=2, rank=r,
                                               shuffle=False)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 150
    drawn = collections.Counter(labels[i] for rank in per_rank for i in rank)
    assert min(drawn.values()) >= 80 and max(drawn.values()) <= 120  # ~100 each of 300 draws; uniform: 240/20/40


def test_every_ensemble_member_weights_its_loss(tmp_path, fast_cfg):
    root = _skewed_folders(tmp_path / "data")
    metrics = train(fast_cfg(root, "policy=linear_probe", "ensemble.size=2", run_dir=tmp_path / "ens"))
    members = sorted((tmp_path / "ens" / "members").glob("*/metrics.json"))
    assert len(members) == 2 and "val/acc" in metrics
    for member in members:
        imbalance = json.loads(member.read_text())["imbalance"]
        assert imbalance["class_weights"] == pytest.approx({"circle": 0.4167, "square": 5.0, "stripes": 2.5}, abs=1e-4)

"""data.normalize_on_device: batches leave the loader as uint8 pixels and the datamodule normalises them after the
transfer, giving the network the same input as the loader-side albumentations Normalize (real digits)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from finetune.data.datamodule import ImageListDataset
from finetune.data.transforms import Preprocessing, eval_transform, normalize_batch, train_transform
from finetune.errors import FinetuneError
from tests.conftest import FAST_64, digit_folders, make_cfg

PP = Preprocessing(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 1.0)


def _real_images(n: int = 8) -> list[np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits().images[:n]
    return [np.repeat((d * 255 / 16).astype(np.uint8)[..., None], 3, axis=2) for d in digits]


def test_the_device_normalisation_equals_the_loaders():
    """The same real images through both paths: the float the network sees differs by rounding only."""
    images = _real_images()
    on_loader = torch.stack([eval_transform(PP)(image=im)["image"] for im in images])
    pixels = torch.stack([eval_transform(PP, uint8=True)(image=im)["image"] for im in images])
    assert pixels.dtype == torch.uint8 and on_loader.dtype == torch.float32
    assert torch.allclose(normalize_batch(pixels, PP), on_loader, atol=1e-5)
    augmented = train_transform(PP, {"crop": "center", "transforms": [{"HorizontalFlip": {"p": 1.0}}]},
                                seed=0, uint8=True)
    assert augmented(image=images[0])["image"].dtype == torch.uint8


def test_an_augmentation_that_returns_floats_is_refused_before_training(tmp_path: Path):
    """The config check runs the pipeline once: a float-producing transform is refused with the way out, and
    accepted when the loader normalises."""
    from finetune.config import validate_train_config

    overrides = [f"data.root={digit_folders(tmp_path, per_split=2, splits=('train',))}",
                 "augment.transforms=[{ToFloat: {}}]"]
    with pytest.raises(FinetuneError, match=r"float32.*data.normalize_on_device=false"):
        validate_train_config(make_cfg(overrides))
    validate_train_config(make_cfg([*overrides, "data.normalize_on_device=false"]))


def test_an_augmentation_that_returns_floats_is_named_not_trained_on():
    """The dataset's backstop, for a pipeline the config check did not see."""
    transform = train_transform(PP, {"crop": "center", "transforms": [{"ToFloat": {}}]}, uint8=True)
    dataset = ImageListDataset([("a.png", 0)], transform, images=_real_images(1), uint8=True)
    with pytest.raises(FinetuneError, match="data.normalize_on_device=false"):
        dataset[0]


class _SeenBatches(L.Callback):
    """What the loader yields and what the training step receives (after the datamodule's on_after_batch_transfer)."""

    def __init__(self):
        self.loader_dtype = self.step_dtype = None
        self.step_mean = None

    def on_train_start(self, trainer, pl_module):
        self.loader_dtype = next(iter(trainer.train_dataloader))[0].dtype

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.step_dtype is None:
            self.step_dtype, self.step_mean = batch[0].dtype, float(batch[0].mean())


def test_a_run_trains_on_the_same_input_either_way(tmp_path: Path, monkeypatch):
    """Real fits: with the flag (the default) the loader yields uint8 and the training step gets normalised
    floats; with it off the loader normalises. Both score the same (same seed, input equal up to rounding;
    val and test batches pass the same hook)."""
    from finetune import prepare
    from finetune.train import train

    root = digit_folders(tmp_path / "digits", per_split=10)
    build, seen = prepare.build_module, {}

    def with_probe(*args, **kwargs):
        built = build(*args, **kwargs)
        kwargs["trainer"].callbacks.append(seen.setdefault(len(seen), _SeenBatches()))
        return built

    monkeypatch.setattr(prepare, "build_module", with_probe)
    tests = []
    for flag in ([], ["data.normalize_on_device=false"]):
        run = tmp_path / f"run{len(tests)}"
        train(make_cfg([f"data.root={root}", f"run_dir={run}", "policy=partial", *FAST_64, "trainer.max_epochs=1",
                        "augment=none", "calibrate=false", "open_set.fit=false", "report=false", *flag]))
        tests.append(json.loads((run / "metrics.json").read_text()))
    on_device, on_loader = seen[0], seen[1]
    assert (on_device.loader_dtype, on_loader.loader_dtype) == (torch.uint8, torch.float32)
    assert on_device.step_dtype == on_loader.step_dtype == torch.float32
    assert on_device.step_mean == pytest.approx(on_loader.step_mean, abs=1e-4)  # the same first batch, normalised
    # one epoch: the runs stay equal to float rounding (longer, near-chance training drifts apart chaotically)
    assert tests[0]["val/loss"] == pytest.approx(tests[1]["val/loss"], abs=1e-3)
    assert tests[0]["test/acc"] == pytest.approx(tests[1]["test/acc"], abs=0.02)


def test_cached_features_are_the_same_from_uint8_batches(tmp_path: Path):
    """The feature cache (head-only policies) reads the datamodule's uint8 datasets outside Lightning's hooks:
    it normalises them itself, so the cached features equal those of the loader-normalised path."""
    from finetune.data.datamodule import ImageDataModule
    from finetune.data.datasets import scan_dataset
    from finetune.data.feature_cache import CachedFeatureDataModule
    from finetune.models.backbone import BackboneSpec, attach_head, load_pretrained

    index = scan_dataset(digit_folders(tmp_path / "digits", per_split=4, splits=("train",)), 0.0, 0.0, 0)
    net = attach_head(load_pretrained("tf_efficientnet_lite0", "offline")[0],
                      BackboneSpec("tf_efficientnet_lite0", 10, {}))
    features = []
    for on_device in (True, False):
        images = ImageDataModule(index, PP, batch_size=8, normalize_on_device=on_device)
        cached = CachedFeatureDataModule(images, net)
        cached.setup("fit")
        assert images.datasets["train"][0][0].dtype == (torch.uint8 if on_device else torch.float32)
        features.append(cached.train_dataloader().dataset.tensors[0])
    assert torch.allclose(features[0], features[1], atol=1e-4)

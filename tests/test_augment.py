"""Augmentation: every augment config on real photos, deterministic evaluation, MixUp/CutMix soft
labels, clear errors for bad transforms, the preview grid, and caching that honours augmentation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from finetune.config import validate_train_config
from finetune.data.mixing import build_batch_mixer
from finetune.data.transforms import Preprocessing, eval_transform, train_transform
from finetune.errors import FinetuneError
from finetune.train import train

CONF = Path(__file__).resolve().parents[1] / "finetune" / "conf" / "augment"
AUGMENTS = sorted(p.stem for p in CONF.glob("*.yaml"))
PP = Preprocessing(96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)


def photos() -> list[np.ndarray]:
    from skimage import data

    gray = data.camera()  # 2-d grayscale
    return [data.astronaut(), data.coffee(), np.stack([gray] * 3, -1)[:300, :200]]


def augment_cfg(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


def test_the_issue_presets_exist():
    assert set(AUGMENTS) >= {"none", "light", "medium", "heavy"}


@pytest.mark.parametrize("name", AUGMENTS)
def test_each_augment_config_transforms_real_photos(name):
    transform = train_transform(PP, augment_cfg(name))
    lo = min((0 - m) / s for m, s in zip(PP.mean, PP.std))
    hi = max((1 - m) / s for m, s in zip(PP.mean, PP.std))
    np.random.seed(0)
    for image in photos():
        for _ in range(3):
            x = transform(image=image)["image"]
            assert x.shape == (3, 96, 96) and x.dtype == torch.float32
            assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4
    if name != "none":  # a real augmentation: draws of one image differ (a flip alone: half of them)
        first, *more = (transform(image=photos()[0])["image"] for _ in range(8))
        assert any(not torch.equal(first, x) for x in more)


def test_evaluation_pipeline_is_deterministic_and_uses_the_backbone_size():
    image = photos()[1]
    a, b = (eval_transform(PP)(image=image)["image"] for _ in range(2))
    assert torch.equal(a, b) and a.shape == (3, PP.image_size, PP.image_size)


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_give_soft_labels_that_sum_to_one(mixup, cutmix):
    torch.manual_seed(0)
    mixer = build_batch_mixer({"mixup_alpha": mixup, "cutmix_alpha": cutmix, "mix_p": 1.0}, num_classes=5)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 5
    mixed, soft = mixer(x, y)
    assert soft.shape == (16, 5) and torch.allclose(soft.sum(-1), torch.ones(16))
    assert (soft < 1).any() and not torch.equal(mixed, x)  # labels and pixels really mixed
    assert build_batch_mixer({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, 5) is None


@pytest.mark.parametrize("transforms, pattern", [
    ([{"HorizontalFlp": {"p": 0.5}}], r"augment.transforms\[0\]: 'HorizontalFlp'.*HorizontalFlip"),
    ([{"Affine": {"rotat": 10}}], r"augment.transforms\[0\]: Affine has no parameter .rotat.*rotate"),
    ([{"SomeOf": {"n": 1, "transforms": [{"Equalise": {}}]}}], r"SomeOf.transforms\[0\]: 'Equalise'.*Equalize"),
])
def test_bad_transforms_are_clear_errors_before_training(class_folders, fast_cfg, transforms, pattern):
    cfg = fast_cfg(class_folders)
    OmegaConf.update(cfg, "augment.transforms", transforms, merge=False)
    with pytest.raises(FinetuneError, match=pattern):
        validate_train_config(cfg)


def test_preview_cli_writes_a_png_grid(class_folders, tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run([str(Path(sys.executable).parent / "finetune-preview"), f"data.root={class_folders}",
                             "augment=heavy", "rows=3", "draws=4", f"output={out}"],
                            check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    assert not list(tmp_path.glob("*.log"))  # the preview leaves no stray files


def test_cached_head_uses_augmented_views_when_asked(class_folders, fast_cfg, tmp_path):
    metrics = train(fast_cfg(class_folders, "policy=linear_probe", "augment=light", "policy.cache_views=2",
                             run_dir=tmp_path / "views"))
    record = json.loads((Path(metrics["run_dir"]) / "policy.json").read_text())
    assert record["feature_cache"]["used"] and "2 augmented views" in record["feature_cache"]["why"]
    with Image.open(Path(metrics["run_dir"]) / "augment_preview.png") as image:  # every run shows its inputs
        assert image.format == "PNG"
    plain = train(fast_cfg(class_folders, "policy=linear_probe", "augment=light", run_dir=tmp_path / "plain"))
    why = json.loads((Path(plain["run_dir"]) / "policy.json").read_text())["feature_cache"]["why"]
    assert "NOT applied" in why


def test_augmented_views_triple_the_cached_training_set(class_folders):
    from finetune.data.datamodule import ImageDataModule
    from finetune.data.datasets import scan_dataset
    from finetune.data.feature_cache import CachedFeatureDataModule
    from finetune.models.backbone import BackboneSpec, attach_head, load_pretrained

    index = scan_dataset(class_folders, 0.2, 0.0, 0)
    net = attach_head(load_pretrained("tf_efficientnet_lite0", "offline")[0],
                      BackboneSpec("tf_efficientnet_lite0", 3, {}))
    pp = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    images = ImageDataModule(index, pp, augment=None, batch_size=8)
    cached = CachedFeatureDataModule(images, net, augment=augment_cfg("light"), augmented_views=2)
    cached.setup("fit")
    n = len(index.splits["train"])
    feats, labels = cached.train_dataloader().dataset.tensors
    assert set(cached.datasets) == {"train"}  # a split's features are computed when it is first used
    assert len(feats) == 3 * n and torch.equal(labels[:n], labels[n:2 * n])
    assert not torch.allclose(feats[:n], feats[n:2 * n])  # the views are augmented, not copies


def test_mixup_trains_end_to_end(class_folders, fast_cfg):
    metrics = train(fast_cfg(class_folders, "policy=full", "augment=light", "augment.mixup_alpha=0.2",
                             "augment.cutmix_alpha=1.0"))
    assert np.isfinite(metrics["val/loss"])

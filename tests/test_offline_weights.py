"""The bundled offline EfficientNet-Lite0 weights are real ImageNet weights, correctly re-keyed onto timm.

Checked the way a user of timm would check any pretrained model: timm's own preprocessing
(``resolve_data_config`` + ``create_transform``) on real photos from scikit-image, then the ImageNet
class. A mapping that paired any tensor with the wrong layer would not give confident, correct answers.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from finetune.models.backbone import BackboneSpec, attach_head, load_pretrained
from finetune.models.offline_weights import lite0_state_dict_for, offline_weights_path

skimage_data = pytest.importorskip("skimage.data")

EGYPTIAN_CAT, TIGER_CAT, TABBY = 285, 282, 281
ESPRESSO = 967


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0")  # 1000 ImageNet classes, random init
    result = model.load_state_dict(lite0_state_dict_for(model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def _probabilities(model: torch.nn.Module, images: list[np.ndarray]) -> torch.Tensor:
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    batch = torch.stack([transform(Image.fromarray(img)) for img in images])
    with torch.inference_mode():
        return model(batch).softmax(dim=-1)


def test_offline_weights_classify_real_photos(imagenet_lite0):
    probs = _probabilities(imagenet_lite0, [skimage_data.chelsea(), skimage_data.coffee()])
    cat, coffee = probs[0], probs[1]

    # Espresso: unambiguous and confident.
    assert int(coffee.argmax()) == ESPRESSO
    assert float(coffee[ESPRESSO]) > 0.8

    # Chelsea is a tabby; ImageNet's domestic-cat classes (281 tabby, 282 tiger cat, 285 Egyptian cat)
    # overlap. With timm's preprocessing these weights put 282 (0.39) just ahead of 285 (0.36).
    top3 = probs[0].topk(3).indices.tolist()
    assert int(cat.argmax()) in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert EGYPTIAN_CAT in top3
    assert float(cat[[TABBY, TIGER_CAT, EGYPTIAN_CAT]].sum()) > 0.8


def test_offline_weights_give_the_exact_classes_on_whole_photos(imagenet_lite0):
    """The whole photo resized to the model's input (no centre crop, which cuts the cat's head):
    cat -> 285 (Egyptian cat), espresso -> 967, each with the model's own mean/std."""
    cfg = resolve_data_config({}, model=imagenet_lite0)
    size = cfg["input_size"][-1]
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    batch = torch.stack([
        (torch.from_numpy(np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))).permute(2, 0, 1) / 255
         - mean) / std
        for img in (skimage_data.chelsea(), skimage_data.coffee())
    ]).float()
    with torch.inference_mode():
        probs = imagenet_lite0(batch).softmax(dim=-1)
    assert probs.argmax(dim=-1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    assert float(probs[0, EGYPTIAN_CAT]) > 0.5 and float(probs[1, ESPRESSO]) > 0.8


def test_offline_batchnorm_statistics_match_their_layers(imagenet_lite0):
    """Each BatchNorm's stored running mean should track the mean of what actually reaches it.

    Tensors are paired by position; if two layers' tensors were swapped (same shape, wrong place),
    the running means would not correlate with the layer's real input.
    """
    correlations: list[float] = []

    def hook(module, inputs, _output):
        seen = inputs[0].mean(dim=(0, 2, 3))
        correlations.append(float(np.corrcoef(seen.numpy(), module.running_mean.numpy())[0, 1]))

    handles = [m.register_forward_hook(hook) for m in imagenet_lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        _probabilities(imagenet_lite0, [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut(),
                                        skimage_data.rocket()])
    finally:
        for h in handles:
            h.remove()
    assert len(correlations) == 49
    assert float(np.median(correlations)) > 0.9


def test_auto_weights_give_offline_backbone_with_new_head():
    backbone, source, _ = load_pretrained("tf_efficientnet_lite0", "auto")  # the path training takes
    spec = BackboneSpec("tf_efficientnet_lite0", 5, {})
    model = attach_head(backbone, spec)
    assert source == "offline"
    assert spec.name == "tf_efficientnet_lite0" and spec.num_classes == 5
    assert model.get_classifier().out_features == 5
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)

    packaged = torch.load(offline_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(model.conv_head.weight, packaged["_conv_head.weight"])
    # The rebuild spec gives the same architecture without any weights download.
    rebuilt = spec.build()
    assert rebuilt.state_dict().keys() == model.state_dict().keys()

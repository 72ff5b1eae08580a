"""Split any timm model into ordered parameter groups: stage 0..S-1, neck, head.

Stages come from the model itself (``feature_info``: the modules whose outputs are the feature
pyramid), so this works for CNNs and ViTs alike. A parameter belongs to the first stage whose module
it is in or precedes (stem parameters join stage 0); parameters after the last stage are the
``neck`` (e.g. EfficientNet's conv_head, a ViT's final norm); the classifier is the ``head``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finetune.errors import FinetuneError


@dataclass(frozen=True)
class StageMap:
    """Parameter names per group, in forward order: stage0..stageS-1, neck, head."""

    groups: dict[str, list[str]]
    stage_modules: list[str]
    stage_channels: list[int]

    @property
    def num_stages(self) -> int:
        return len(self.stage_modules)

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        params = dict(model.named_parameters())
        return {g: sum(params[n].numel() for n in names) for g, names in self.groups.items()}


def stage_name(i: int) -> str:
    return f"stage{i}"


def _under(name: str, module: str) -> bool:
    return module == "" or name == module or name.startswith(module + ".")


def build_stage_map(model: nn.Module) -> StageMap:
    info = getattr(model, "feature_info", None)
    if not info:
        raise FinetuneError(
            f"{type(model).__name__} has no feature_info, so its stages cannot be found; choose policy=full "
            f"or policy=linear_probe, which need no stage map."
        )
    infos = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    stage_modules = [d["module"] for d in infos]
    channels = [int(d["num_chs"]) for d in infos]
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_params = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()

    groups: dict[str, list[str]] = {stage_name(i): [] for i in range(len(stage_modules))}
    groups["neck"], groups["head"] = [], []
    current, entered = 0, False  # stage we are in or before; whether we are inside its module yet
    for name, param in model.named_parameters():
        if id(param) in head_params:
            groups["head"].append(name)
            continue
        owner = next((i for i, m in enumerate(stage_modules) if _under(name, m)), None)
        if owner is not None:
            current, entered = max(current, owner), True
            groups[stage_name(current)].append(name)
        elif entered and current == len(stage_modules) - 1:
            groups["neck"].append(name)
        else:
            if entered:  # past stage `current`'s module: this belongs to the next stage
                current, entered = current + 1, False
            groups[stage_name(current)].append(name)
    return StageMap(groups, stage_modules, channels)

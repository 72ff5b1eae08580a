"""The freezing mechanism: trainable flags, parts held in eval mode, fixed param groups.

The schedule (which groups train from which epoch) is applied by ``recipe.callbacks.UnfreezeSchedule``, a
Lightning ``BaseFinetuning``; its own ``freeze``/``unfreeze_and_add_param_group`` are not used, for two
reasons: ``freeze`` sets BatchNorm ``track_running_stats=False``, which in train mode normalises with *batch*
statistics (not frozen ones), and unfreezing adds param groups mid-training, which ReduceLROnPlateau and
resumed runs do not survive. Here every group exists from step one; unfreezing only flips ``requires_grad``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from finetune.policy.plan import Plan
from finetune.policy.stages import StageMap
from finetune.recipe.regularization import is_weight, no_weight_decay_names


def set_trainable(model: nn.Module, stage_map: StageMap, groups: Iterable[str]) -> None:
    """requires_grad=True exactly for the parameters of ``groups``."""
    wanted = {name for g in groups for name in stage_map.groups.get(g, [])}
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)


def hold_eval_modes(model: nn.Module, frozen: bool, batchnorm: bool) -> int:
    """Put into eval mode every module whose own parameters are all frozen (``frozen``: BatchNorm statistics
    stop updating, dropout inside frozen blocks stops) and every BatchNorm (``batchnorm``: they normalise with
    their running statistics and stop updating them). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False)) if frozen else []
        held = (params and not any(p.requires_grad for p in params)) or (
            batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm))
        if held and module.training:
            module.eval()
            switched += 1
    return switched


def unfreezes_during_training(plan: Plan | None) -> bool:
    """The trainable set grows after the first epoch (lp_ft, gradual): what L-BFGS, whose parameter set and
    curvature history are fixed, cannot follow."""
    return plan is not None and any(epoch > 0 for epoch in plan.unfreeze_at.values())


def param_groups(model: nn.Module, stage_map: StageMap, plan: Plan, lr: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """One group per (stage group, decay / no decay), frozen ones included, LR scaled per the plan.

    Weight decay only on :func:`~finetune.recipe.regularization.is_weight`'s weights: not biases, norm layers
    and 1-d parameters, nor the model's own ``no_weight_decay()`` names (timm's rule, e.g. a ViT's position embedding).
    """
    skip = no_weight_decay_names(model)
    params = dict(model.named_parameters())
    groups = []
    for group in plan.group_order:
        scale = plan.lr_scale.get(group, 1.0)
        decay, no_decay = [], []
        for name in stage_map.groups.get(group, []):
            p = params[name]
            (decay if is_weight(name, p, skip) else no_decay).append(p)
        for members, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, "_no_decay")):
            if members:
                groups.append({"params": members, "lr": lr * scale, "weight_decay": wd, "name": group + suffix})
    return groups

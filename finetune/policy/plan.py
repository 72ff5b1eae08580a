"""Each policy as a small plan: which groups train from which epoch, at what LR multiplier.

Policy (what) is kept apart from mechanism (finetune.policy.freeze: how), as Lightning keeps
``BackboneFinetuning`` apart from ``BaseFinetuning``. Every parameter group exists from the first
step; unfreezing only flips ``requires_grad``, so LR schedulers, resume and DDP see a fixed set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from finetune.conf import preset
from finetune.errors import FinetuneError
from finetune.policy.stages import stage_name

POLICIES = ("auto", "linear_probe", "stage_probe", "partial", "full", "lp_ft", "gradual")


@dataclass
class Plan:
    policy: str
    group_order: list[str]  # stage0..stageK, neck, head (after any cut)
    unfreeze_at: dict[str, int]  # group -> first epoch it trains; absent = frozen throughout
    lr_scale: dict[str, float]
    cut_after_stage: int | None = None
    description: str = ""
    notes: list[str] = field(default_factory=list)

    def trainable_at(self, epoch: int) -> list[str]:
        return [g for g in self.group_order if g in self.unfreeze_at and self.unfreeze_at[g] <= epoch]

    @property
    def head_only(self) -> bool:
        """Only the classifier ever trains: its inputs can be computed once and cached."""
        return set(self.unfreeze_at) <= {"head"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups(num_stages: int, has_neck: bool) -> list[str]:
    return [stage_name(i) for i in range(num_stages)] + (["neck"] if has_neck else []) + ["head"]


def _decayed(order: list[str], trainable: list[str], decay: float) -> dict[str, float]:
    """LR multiplier decay ** (steps below the head), so rates grow from stem to head."""
    ranked = [g for g in order if g in trainable]
    return {g: round(decay ** (len(ranked) - 1 - i), 6) for i, g in enumerate(ranked)}


def make_plan(policy: str, policy_cfg: Mapping[str, Any], num_stages: int, best_stage: int | None,
              has_neck: bool = True) -> Plan:
    """The plan for a fixed ``policy`` on a model with ``num_stages`` stages (and a neck or not). ``policy_cfg``
    is the policy config; keys it lacks (a library call's partial mapping) take conf/policy/base.yaml's values."""
    policy_cfg = {**preset("policy", "base"), **policy_cfg}
    decay = float(policy_cfg["lr_decay"])
    order = _groups(num_stages, has_neck)
    if policy == "linear_probe":
        return Plan(policy, order, {"head": 0}, {"head": 1.0},
                    description="frozen backbone, train a linear classifier on the pre-logits features")
    if policy == "stage_probe":
        stage = policy_cfg["stage"]
        if stage in (None, "auto"):
            if best_stage is None:
                stage = num_stages - 1
            else:
                stage = best_stage
        if not (isinstance(stage, int) and 0 <= stage < num_stages):
            raise FinetuneError(f"policy.stage={stage} must be auto or a stage index in 0..{num_stages - 1}.")
        order = _groups(stage + 1, has_neck=False)  # the neck is above the cut
        train_stages = bool(policy_cfg["train_stages"])
        trainable = order if train_stages else ["head"]
        what = "fine-tune the kept stages and" if train_stages else "frozen, train"
        return Plan(policy, order, {g: 0 for g in trainable}, _decayed(order, trainable, decay), cut_after_stage=stage,
                    description=f"network cut after stage {stage} (the rest dropped); "
                    f"{what} a linear head on its pooled features")
    if policy == "partial":
        top = policy_cfg["top_stages"]
        if not (isinstance(top, int) and 0 <= top <= num_stages):
            raise FinetuneError(f"policy.top_stages={top} must be an integer in 0..{num_stages}.")
        trainable = [stage_name(i) for i in range(num_stages - top, num_stages)] + order[num_stages:]
        return Plan(policy, order, {g: 0 for g in trainable}, _decayed(order, trainable, decay),
                    description=f"fine-tune the top {top} of {num_stages} stages (+ neck and head), the rest frozen")
    if policy == "full":
        return Plan(policy, order, {g: 0 for g in order}, _decayed(order, order, decay),
                    description=f"fine-tune everything, learning rates x{decay} per group from head to stem")
    if policy == "lp_ft":
        probe_epochs = int(policy_cfg["probe_epochs"])
        unfreeze = {g: (0 if g == "head" else probe_epochs) for g in order}
        return Plan(policy, order, unfreeze, _decayed(order, order, decay),
                    description=f"linear probe for {probe_epochs} epoch(s), then fine-tune everything (LP-FT)")
    if policy == "gradual":
        every = int(policy_cfg["unfreeze_every"])
        if every < 1:
            raise FinetuneError(f"policy.unfreeze_every={every} must be >= 1.")
        unfreeze = {g: 0 for g in order[num_stages:]}  # neck (if any) and head
        for depth, i in enumerate(reversed(range(num_stages)), start=1):
            unfreeze[stage_name(i)] = depth * every
        return Plan(policy, order, unfreeze, _decayed(order, order, decay),
                    description=f"head first, then one more stage from the top every {every} epoch(s)")
    raise FinetuneError(f"policy.name={policy} is not one of {', '.join(POLICIES)}.")

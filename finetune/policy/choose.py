"""From config + measurements to a plan, with the record that policy.json and the log show."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from finetune.data.datasets import DatasetIndex
from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.policy.decide import Decision, decide
from finetune.policy.measure import Measurements, measure
from finetune.policy.plan import POLICIES, Plan, make_plan
from finetune.policy.stages import build_stage_map

log = logging.getLogger(__name__)


@dataclass
class PolicyChoice:
    requested: str
    plan: Plan
    measurements: Measurements | None
    decision: Decision | None
    thresholds: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """Everything policy.json holds except the parameter counts (added once the head exists)."""
        return {
            "policy_requested": self.requested,
            "policy_applied": self.plan.policy,
            "quadrant": self.decision.quadrant if self.decision else None,
            "reasons": self.decision.reasons if self.decision else [],
            "thresholds": self.thresholds,
            "measurements": self.measurements.to_dict() if self.measurements else None,
            "plan": self.plan.to_dict(),
        }


def choose_policy(
    policy_cfg: Mapping[str, Any], model: nn.Module, index: DatasetIndex, pp: Preprocessing,
    pretrained_head: bool, seed: int, flip: bool = False,
) -> PolicyChoice:
    """Measure (when enabled or needed), place the data in the table, and plan the requested policy.
    ``flip``: also measure how a probe scores flipped images (recipe=auto's flip rule)."""
    requested = str(policy_cfg["name"])
    if requested not in POLICIES:
        raise FinetuneError(f"policy.name={requested} is not one of {', '.join(POLICIES)}.")
    stage_map = build_stage_map(model)
    thresholds = dict(policy_cfg["thresholds"])
    needs_measure = requested == "auto" or (requested == "stage_probe" and policy_cfg["stage"] in (None, "auto"))
    m_cfg = policy_cfg["measure"]
    actions = dict(policy_cfg["actions"])
    for quadrant, action in actions.items():
        if action not in POLICIES or action == "auto":
            raise FinetuneError(f"policy.actions.{quadrant}={action} must be one of {', '.join(POLICIES[1:])}.")
    measurements = decision = None
    if needs_measure or str(m_cfg["enabled"]).lower() == "true":
        if not hasattr(model, "forward_intermediates"):
            raise FinetuneError(
                f"{type(model).__name__} has no forward_intermediates, so its stages cannot be measured; "
                f"choose a fixed policy (policy=full|partial|linear_probe) and policy.measure.enabled=false."
            )
        measurements = measure(
            model, index, pp, pretrained_head, max_per_class=int(m_cfg["max_per_class"]),
            max_images=int(m_cfg["max_images"]), folds=int(m_cfg["folds"]), seed=int(m_cfg["seed"]), flip=flip,
        )
        decision = decide(measurements, thresholds, actions)
    applied = decision.policy if requested == "auto" else requested
    best_stage = measurements.best_stage if measurements else None
    plan = make_plan(applied, policy_cfg, stage_map.num_stages, best_stage, has_neck=bool(stage_map.groups["neck"]))
    if requested != "auto" and decision is not None and decision.policy != applied:
        plan.notes.append(f"forced policy={applied}; the table would pick {decision.policy} ({decision.quadrant})")
    return PolicyChoice(requested, plan, measurements, decision, thresholds)


def format_policy_block(record: Mapping[str, Any]) -> str:
    """The readable block for the log and `finetune-advise`: evidence table, cell, plan."""
    lines = ["Transfer policy", "==============="]
    m = record.get("measurements")
    if m:
        lines.append(
            f"Data: {m['images_train']} training images, {m['num_classes']} classes, per class "
            f"min/median/max {m['images_per_class']['min']}/{m['images_per_class']['median']:g}/"
            f"{m['images_per_class']['max']}"
        )
        lines.append(
            f"Evidence ({m['probe_images']} images, {m['probe_folds']}-fold CV linear probes, {m['seconds']} s):"
        )
        lines.append("  features      dims   probe acc")
        for i, (acc, ch) in enumerate(zip(m["stage_probe_acc"], m["stage_channels"])):
            mark = "  <- best" if m["best_stage"] == i else ""
            lines.append(f"  stage {i:<7} {ch:>5}   {acc:.3f}{mark}")
        mark = "  <- best" if m["best_stage"] is None else ""
        lines.append(f"  pre-logits       -   {m['prelogits_probe_acc']:.3f}{mark}")
        if m.get("head_confidence"):
            h = m["head_confidence"]
            lines.append(
                f"  pretrained head ({h['classes']} classes): mean max prob {h['mean_max_prob']:.3f}, "
                f"normalised entropy {h['mean_normalized_entropy']:.3f}"
            )
        for note in m.get("notes", []):
            lines.append(f"  note: {note}")
    if record.get("quadrant"):
        lines.append(f"Table cell: {record['quadrant']}")
        lines.extend(f"  {r}" for r in record.get("reasons", []))
    plan = record["plan"]
    lines.append(f"Policy: {record['policy_applied']} (requested: {record['policy_requested']}): {plan['description']}")
    params = record.get("parameters")
    if params:
        lines.append(f"Parameters: {params['trainable']:,} trainable at the start, {params['frozen']:,} frozen")
    for note in plan.get("notes", []) + record.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)

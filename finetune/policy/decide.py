"""The CS231n 2x2 table as code: measured size x similarity -> quadrant -> policy.

|                  | similar                          | different                                   |
|------------------|----------------------------------|---------------------------------------------|
| little data      | partial (CS231n: linear_probe)   | stage_probe (head on the best earlier stage) |
| a lot of data    | partial (top stages)             | full (discriminative learning rates)        |

The little/similar cell departs from the lecture's linear classifier: fine-tuning the top stages measured
higher on average on every set tried (BENCHMARKS.md, "The little, similar cell"), and policy.json says so.

"Little" and "similar" are thresholds from ``conf/policy/*.yaml``; every decision returns the
numbers it compared, so policy.json can show why. One refinement of the "little, different" cell: when
the best probe is on the last stage there is no earlier stage to cut to (the cut would drop only the
neck), so ``actions.small_different_last_stage`` (partial: the top stages train, the generic lower ones
stay frozen) applies; measured in BENCHMARKS.md ("The cell on colour data"). In the "a lot, different"
cell, when the best probe is on an earlier stage, ``actions.large_different_earlier_stage`` (stage_probe:
the network cut after that stage and fine-tuned whole) applies: the same accuracy as ``full`` for about
two thirds of its time (BENCHMARKS.md, "The large, different cell").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune.policy.measure import Measurements

QUADRANTS = ("small_similar", "small_different", "large_similar", "large_different")


@dataclass(frozen=True)
class Decision:
    quadrant: str
    policy: str
    small: bool
    similar: bool
    reasons: list[str]


def decide(m: Measurements, thresholds: Mapping[str, Any], actions: Mapping[str, str]) -> Decision:
    """Place the dataset in the table and pick that cell's policy (``actions[quadrant]``)."""
    per_class = m.images_per_class["median"]
    small = per_class < thresholds["small_max_per_class"]
    similar = m.depth_gap <= thresholds["similar_max_gap"]
    quadrant = f"{'small' if small else 'large'}_{'similar' if similar else 'different'}"
    where = "pre-logits features" if m.best_stage is None else f"stage {m.best_stage}"
    size_reason = (
        f"size: median {per_class:g} training images per class "
        f"{'<' if small else '>='} small_max_per_class={thresholds['small_max_per_class']} -> "
        f"{'little' if small else 'a lot of'} data"
    )
    similarity_reason = (
        f"similarity: best cross-validated probe is on {where} ({m.best_acc:.3f}); "
        f"pre-logits {m.prelogits_probe_acc:.3f}; "
        f"gap {m.depth_gap:.3f} {'<=' if similar else '>'} similar_max_gap={thresholds['similar_max_gap']} -> "
        f"{'similar to' if similar else 'different from'} the pretraining domain"
    )
    reasons = [size_reason, similarity_reason]
    policy = actions[quadrant]
    if quadrant == "small_similar" and policy == "partial":
        reasons.append("the CS231n table's answer for little, similar data is a linear classifier; fine-tuning the "
                       "top stages scored higher on average on every set measured (BENCHMARKS.md) -> "
                       "small_similar=partial "
                       "(policy.actions.small_similar=linear_probe for the table's answer)")
    last = len(m.stage_probe_acc) - 1
    refined = actions["small_different_last_stage"]
    if quadrant == "small_different" and m.best_stage is not None and m.best_stage == last and refined != policy:
        policy = refined
        reasons.append(
            f"the best probe is on the last stage ({last}): cutting there keeps every stage and drops only the "
            f"neck, so there is no earlier stage to train a classifier from -> "
            f"small_different_last_stage={refined}"
        )
    refined = actions["large_different_earlier_stage"]
    if quadrant == "large_different" and m.best_stage is not None and m.best_stage < last and refined != policy:
        policy = refined
        reasons.append(
            f"the best probe is on stage {m.best_stage}, below the last stage ({last}): the stages above it "
            f"measure worse on this data, so every stage up to it fine-tunes and the ones above are cut -> "
            f"large_different_earlier_stage={refined}"
        )
    return Decision(quadrant, policy, small, similar, reasons)

"""``recipe=auto``: the values a run needs beyond the freeze, chosen from the data and the hardware.

The policy decides what trains; this decides the rest (input size and crop, how long to train, how the
LR decays, the LR, augmentation, whether to hold images out) for every key the user did not set, and says
why. Two steps, because some rules need the policy measurement and some shape what it measures:

- :func:`before_measurement` (data scanned, nothing loaded): input size from the images' own size and the
  device (the whole frame, no centre crop), training length from the data size and the budget, the schedule
  that follows from a known length, and the holdout on the smallest data;
- :func:`after_measurement` (the policy's forward pass done): the LR from the plan and the measured domain
  gap, and the horizontal flip from whether a flipped image still probes as its own class.

Each choice is a :class:`Choice` (key, value, reason); they end up in ``RUN/recipe.json``, the log block and
the report. The rule numbers live in ``conf/recipe/auto.yaml``; BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.batch_size import LR_SCALING, LR_SCALING_WHY, REFERENCE_BATCH
from finetune.conf import preset

RECIPE_FILE = "recipe.json"
# data.batch_size=auto: (image size, channels_last, training images, images the run will see or None) -> (batch,
# why); see finetune.batch_size
BatchRule = Callable[[int, bool, int, "int | None"], tuple[int, str]]
# Schedules that end at a small LR when the run's length is known (their _target_s).
ANNEALING_TARGETS = ("torch.optim.lr_scheduler.OneCycleLR", "torch.optim.lr_scheduler.CosineAnnealingLR")


@dataclass
class Choice:
    key: str  # dotted config key, or a group (scheduler, augment)
    value: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecipeDecision:
    """What ``recipe=auto`` chose and what it left to the user (``kept``: the keys they set)."""

    mode: str  # auto | off
    choices: list[Choice] = field(default_factory=list)
    wants_flip_probe: bool = False  # the flip rule runs: the policy measurement also probes flipped images
    # The keys the user set, read once from the config as given (the second step must not mistake the first
    # step's choices for the user's: a library call tells them apart by difference from the defaults).
    given_paths: list[str] = field(default_factory=list)
    kept: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # what the rules read: image size, counts, device

    def keep(self, key: str, value: Any) -> None:
        """Record a key the user set, with its value (a whole group as its mapping)."""
        self.kept[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    def chooser(self, cfg: DictConfig, values: dict[str, Any]) -> Callable[[str, Any, str], None]:
        """``choose(key, value, reason)``: put ``value`` in ``values`` and record why, unless the user set
        ``key`` (then their value is kept and listed as given)."""
        given = given_by_user(self.given_paths)

        def choose(key: str, value: Any, reason: str) -> None:
            if given(key):
                self.keep(key, OmegaConf.select(cfg, key))
                return
            values[key] = value
            self.set(key, value, reason)

        return choose

    def set(self, key: str, value: Any, reason: str) -> None:
        """Record a choice (a later rule for the same key replaces the earlier one)."""
        self.choices = [c for c in self.choices if c.key != key] + [Choice(key, value, reason)]

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.mode, "facts": self.facts, "choices": [c.to_dict() for c in self.choices],
                "kept_as_given": self.kept}


def format_recipe_block(decision: Mapping[str, Any]) -> str:
    """The readable block for the log and the report: each chosen value with its reason."""
    lines = [f"Recipe ({decision['recipe']})", "=" * (len(decision["recipe"]) + 9)]
    for c in decision["choices"]:
        lines.append(f"  {c['key']} = {_shown(c['value'])}: {c['reason']}")
    if decision["kept_as_given"]:
        lines.append("  as given: " + ", ".join(f"{k}={_shown(v)}" for k, v in decision["kept_as_given"].items()))
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def given_by_user(paths: list[str]) -> Callable[[str], bool]:
    """Whether the user set ``key``, a node above it or a key under it (``scheduler`` counts as set when
    ``scheduler.patience`` was typed: replacing the group would drop it)."""
    return lambda key: any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in paths)


def device_kind(cfg: DictConfig) -> str:
    """gpu when the run will train on CUDA devices, else cpu (the budget and size rules differ)."""
    import torch

    accelerator = str(cfg.trainer.accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        return "gpu"
    if accelerator == "auto" and torch.cuda.is_available():
        return "gpu"
    return "cpu"


def median_shorter_side(paths: list[str], sample: int) -> int | None:
    """The median shorter side of up to ``sample`` images, spread over the list (headers only: PIL reads the
    size without decoding). None when none can be read."""
    from PIL import Image

    step = max(1, len(paths) // sample)
    sides = []
    for path in sorted(paths)[::step][:sample]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001, S112 - the data check names bad files; this needs only a typical size
            continue
    return int(statistics.median(sides)) if sides else None


def input_size_rule(side: int | None, backbone_size: int, device: str, rules: Mapping[str, Any]) -> tuple[int, str]:
    """(input size, why): the backbone's size for images at least that large; smaller images upsampled by at
    most ``upsample[device]`` (rounded up to ``size_step``, at least ``min_size``), never above the backbone's."""
    if side is None:
        return backbone_size, "image sizes could not be read: the backbone's pretrained input size"
    if side >= backbone_size:
        return backbone_size, (f"images are {side} px (median shorter side), at least the backbone's "
                               f"{backbone_size} px input: its pretrained size")
    factor = float(rules["upsample"][device])
    step, floor = int(rules["size_step"]), int(rules["min_size"])
    size = min(backbone_size, max(floor, step * math.ceil(side * factor / step)))
    if size == backbone_size:
        return size, (f"images are {side} px (median shorter side): upsampled to the backbone's {backbone_size} px "
                      f"(within {factor:g}x on {device.upper()})")
    return size, (f"images are {side} px (median shorter side): upsampled at most {factor:g}x on {device.upper()} "
                  f"(at least {floor} px), not to the backbone's {backbone_size} px: small images gain little from a "
                  f"larger input (BiT) and it costs {backbone_size ** 2 / size ** 2:.0f}x the compute")


def budget_images(device: str, rules: Mapping[str, Any]) -> int:
    """The budget as images seen at ``budget_size`` px (compute grows with the input's area)."""
    budget = rules["budget"]
    return int(rules["budgets"][device][budget]) if str(budget) in rules["budgets"][device] else int(budget)


def budget_images_at(size: int, device: str, rules: Mapping[str, Any]) -> float:
    """The budget as images seen at ``size`` px (the same compute as ``budget_images`` at ``budget_size``)."""
    return budget_images(device, rules) * (int(rules["budget_size"]) / size) ** 2


def _epochs_at(size: int, n_train: int, device: str, rules: Mapping[str, Any]) -> float:
    return budget_images_at(size, device, rules) / max(1, n_train)


def fit_size_to_budget(size: int, n_train: int, device: str, rules: Mapping[str, Any]) -> tuple[int, str]:
    """(input size, why or ""): ``size`` lowered in ``size_step``s (not below ``min_size`` nor
    ``shrink_max`` of it) while the budget would give fewer than ``shrink_below_epochs`` epochs: more passes at
    a smaller input beat a few at a larger one on small data, down to a point."""
    step, enough = int(rules["size_step"]), int(rules["shrink_below_epochs"])
    floor = max(int(rules["min_size"]), step * math.ceil(size * float(rules["shrink_max"]) / step))
    smaller = size
    while smaller - step >= floor and _epochs_at(smaller, n_train, device, rules) < enough:
        smaller -= step
    if smaller == size:
        return size, ""
    return smaller, (f"lowered from {size} px: the budget gives {_epochs_at(size, n_train, device, rules):.1f} "
                     f"epochs of {n_train:,} images at {size} px, and {enough}+ passes at a smaller input "
                     f"learn more than a few at a larger one")


def epochs_rule(n_train: int, device: str, rules: Mapping[str, Any], size: int) -> tuple[int, str]:
    """(epochs, why): the budget's images seen (scaled by the input's area) over the training images, within
    [min_epochs, max_epochs]."""
    lo, hi = int(rules["min_epochs"]), int(rules["max_epochs"])
    epochs = max(lo, min(hi, round(_epochs_at(size, n_train, device, rules))))
    images = budget_images(device, rules)
    why = (f"budget={rules['budget']}: about {images:,} images seen at {int(rules['budget_size'])} px on "
           f"{device.upper()} ({round(budget_images_at(size, device, rules)):,} at {size} px) / "
           f"{n_train:,} training images, within {lo}-{hi} epochs")
    return epochs, why


def global_batch(cfg: DictConfig, per_device: int | None = None) -> int:
    """Images per optimizer step: data.batch_size (or ``per_device``) x accumulated batches x processes (devices x
    nodes when given as a number; "auto" counts as one)."""
    devices = cfg.trainer.get("devices")
    if OmegaConf.is_list(devices):
        devices = len(devices)
    per_node = devices if isinstance(devices, int) and devices > 0 else 1
    processes = per_node * int(cfg.trainer.get("num_nodes") or 1)
    return int(per_device or cfg.data.batch_size) * int(cfg.trainer.get("accumulate_grad_batches") or 1) * processes


def _step_budget_images(n_train: int, device: str, rules: Mapping[str, Any], size: int) -> float | None:
    """Large data: the images a step-budget run sees (``max_stretch`` budgets at ``size``), when ``min_epochs``
    passes would cost more; None on data small enough for whole passes."""
    budget, stretch = budget_images_at(size, device, rules), float(rules["max_stretch"])
    return budget * stretch if n_train * int(rules["min_epochs"]) > budget * stretch else None


def planned_images(n_train: int, device: str, rules: Mapping[str, Any], size: int) -> int:
    """The images the budget lets the run see, whatever the batch: the step budget's on large data, else
    :func:`epochs_rule`'s epochs of the training images."""
    images = _step_budget_images(n_train, device, rules, size)
    return round(images) if images is not None else epochs_rule(n_train, device, rules, size)[0] * n_train


def images_of_given_length(cfg: DictConfig, n_train: int) -> int | None:
    """The images a run of ``trainer.max_epochs`` passes sees; None when ``trainer.max_steps`` fixes the steps
    instead (a larger batch then sees more images, not fewer steps) or there is no epoch limit."""
    epochs = int(cfg.trainer.max_epochs or 0)
    return n_train * epochs if int(cfg.trainer.max_steps) < 0 and epochs > 0 else None


def step_budget_rule(n_train: int, device: str, rules: Mapping[str, Any], size: int,
                     batch: int) -> tuple[int, int, str] | None:
    """Large data: (max_epochs, max_steps, why) when ``min_epochs`` passes would cost more than ``max_stretch``
    budgets; the run then sees ``max_stretch`` budgets of images, counted in optimizer steps (a fraction of an
    epoch on a million images), so the annealing schedule, validation and the end all follow steps. None on data
    small enough for whole passes (:func:`epochs_rule`)."""
    images = _step_budget_images(n_train, device, rules, size)
    if images is None:
        return None
    budget = budget_images_at(size, device, rules)
    lo, stretch = int(rules["min_epochs"]), float(rules["max_stretch"])
    saves = int(rules["step_budget_saves"])  # a multiple of the saves: the last one falls on the last step
    steps = saves * math.ceil(images / batch / saves)
    epochs = max(1, math.ceil(steps / max(1, n_train // batch)))
    why = (f"budget={rules['budget']}: {n_train:,} training images are too many for {lo} passes "
           f"({n_train * lo:,} images, more than {stretch:g}x the budget of {round(budget):,} at {size} px on "
           f"{device.upper()}): {steps:,} steps of {batch} images ({round(images):,} images, "
           f"{images / n_train:.2f} epochs); a pretrained network adapts in a fraction of a pass over large data "
           f"(recipe.budget=best, 4x, or a number of images trains longer)")
    return epochs, steps, why


def holdout_rule(index, rules: Mapping[str, Any]) -> tuple[float | None, str]:
    """(data.val_fraction, why) when there is no val split on disk and the data is small: train on every image
    (the policy was chosen by cross-validation, the schedule anneals to a fixed end and the last epoch is
    scored, so nothing needs the held-out images), else None (the configured holdout stays)."""
    from finetune.data.datasets import label_list

    per_class = Counter(c for _, label in index.splits["train"] for c in label_list(label))
    median = statistics.median(per_class.values()) if per_class else 0
    limit = int(rules["no_holdout_max_per_class"])
    if median > limit:
        return None, ""
    return 0.0, (f"no val split and {median:g} images per class (median, <= {limit}): holding 20% out would take "
                 f"{round(0.2 * median)} of them from training; every image trains, the policy is chosen by "
                 f"cross-validated probes and the last epoch of the annealed schedule is scored")


def before_measurement(cfg: DictConfig, index, backbone_size: int, batch_rule: BatchRule | None = None,
                       ) -> tuple[DictConfig, RecipeDecision]:
    """The rules that shape the run before anything is measured; ``cfg`` with their values set.
    ``batch_rule`` resolves data.batch_size=auto (``finetune.batch_size``) once the size and layout are known."""
    rules = OmegaConf.to_container(cfg.recipe, resolve=True)
    decision = RecipeDecision(str(rules["name"]))
    if decision.mode != "auto":
        return cfg, decision
    from finetune.resume import typed_paths

    decision.given_paths = typed_paths(cfg)
    given = given_by_user(decision.given_paths)
    device = device_kind(cfg)
    train = index.splits["train"]
    side = median_shorter_side([p for p, _ in train], int(rules["image_sample"]))
    has_val = "val" in index.splits  # scanned without carving one out: a val split on disk (folder, CSV rows)
    decision.facts = {"device": device, "median_shorter_side": side, "backbone_input": backbone_size,
                      "training_images": len(train), "val_split_on_disk": has_val}
    values: dict[str, Any] = {}
    choose = decision.chooser(cfg, values)

    has_holdout = not has_val and float(cfg.data.val_fraction) > 0
    planned = cfg.scheduler if given("scheduler") else preset("scheduler", str(rules["scheduler"]))
    # a plateau rule (yours) needs the holdout; so do multi-label runs (their per-class thresholds are tuned on it)
    if has_holdout and planned["_target_"] in ANNEALING_TARGETS and str(cfg.task) != "multilabel":
        fraction, why = holdout_rule(index, rules)
        if fraction is not None:
            choose("data.val_fraction", fraction, why)
    held_out = float(values.get("data.val_fraction", cfg.data.val_fraction)) if has_holdout else 0.0
    n_train = round(len(train) * (1 - held_out))
    size, why = input_size_rule(side, backbone_size, device, rules)
    if not given("trainer.max_epochs"):  # the length is the budget's: the size may give way to more passes
        size, lowered = fit_size_to_budget(size, n_train, device, rules)
        why = f"{why}; {lowered}" if lowered else why
    choose("data.image_size", size, why)
    size = int(values.get("data.image_size") or cfg.data.image_size or backbone_size)
    # The whole frame, upsampled or not: training and evaluation see the same view either way (no random crop
    # unless augmentation adds one); the pretrained 87.5% centre crop is an ImageNet evaluation habit. Measured
    # (BENCHMARKS.md): higher on five upsampled grayscale sets, and zero-config higher on the three colour sets
    # shrunk to the input (stamps, clipart, clipart-20; with the little/similar cell's partial).
    scale = ("of unknown size" if side is None else f"upsampled ({side} -> {size} px)" if side < size
             else f"shrunk ({side} -> {size} px)")
    choose("data.crop_pct", 1.0, f"images are {scale}: the whole frame is kept, no centre crop (the pretrained "
                                 f"87.5% crop cut content: the whole frame scored higher on five upsampled sets "
                                 f"and on three colour sets shrunk to the input, +0.007 to +0.009 there)")
    choose("model.channels_last", True, "NHWC memory layout: the same results 1.3x faster on a CPU (BENCHMARKS.md), "
                                        "and the layout convolutions run fastest in on GPUs")
    batch = None
    length_given = given("trainer.max_epochs") or given("trainer.max_steps")
    if cfg.data.batch_size == "auto" and batch_rule is not None:  # asked for: a choice, though the key was given
        seen = images_of_given_length(cfg, n_train) if length_given else planned_images(n_train, device, rules, size)
        batch, why = batch_rule(size, bool(values.get("model.channels_last", cfg.model.channels_last)), n_train,
                                seen)
        values["data.batch_size"] = batch
        decision.set("data.batch_size", batch, f"data.batch_size=auto: {why}")
        choose("lr_reference_batch", REFERENCE_BATCH, f"optimizer.lr is the LR for {REFERENCE_BATCH} images (the "
                                                      f"batch the defaults were tuned at), scaled to the batch by "
                                                      f"lr_scaling")
        choose("lr_scaling", LR_SCALING, LR_SCALING_WHY)
    steps = None
    by_steps = None if length_given else step_budget_rule(n_train, device, rules, size, global_batch(cfg, batch))
    if by_steps:
        epochs, steps, why = by_steps
        choose("trainer.max_steps", steps, why)
        choose("trainer.max_epochs", epochs, f"an upper bound only: trainer.max_steps={steps:,} ends the run")
    else:
        epochs, why = epochs_rule(n_train, device, rules, size)
        choose("trainer.max_epochs", epochs, why)
    epochs = int(values.get("trainer.max_epochs", cfg.trainer.max_epochs))
    # The flip rule only adds a flip to runs of augment_min_epochs or more: a shorter run skips its probe
    decision.wants_flip_probe = not given("augment") and epochs >= int(rules["augment_min_epochs"])
    schedule = str(rules["scheduler"])
    length = f"{steps:,} steps" if steps else f"{epochs} epochs"
    choose("scheduler", schedule, f"the run's length is known ({length}), so the LR follows a {schedule} "
                                  f"schedule to a small final value instead of waiting for plateaus that a short "
                                  f"run rarely reaches (Fashion-MNIST 50/class: plateau 0.843, plateau checked 4x "
                                  f"per epoch with a final anneal 0.838, cosine 0.856, one-cycle 0.863)")
    # `planned` is the schedule the run gets: the user's, else the one just chosen
    ends_annealed = planned["_target_"] in ANNEALING_TARGETS or float(planned.get("final_anneal") or 0) > 0
    if ends_annealed and cfg.callbacks.get("early_stopping"):
        choose("callbacks.early_stopping", None, "the annealing schedule ends the run; stopping it early would end "
                                                 "at a high LR, before the weights the schedule converges to")
    choose("augment", str(rules["augment"]), "short fine-tunes of small data converged better without "
                                             "augmentation (random crops and flips slow convergence)")
    if steps is not None and cfg.callbacks.get("last_checkpoint") is not None:
        every = steps // int(rules["step_budget_saves"])
        choose("callbacks.last_checkpoint.every_n_train_steps", every,
               f"last.ckpt every {every:,} steps instead of at epoch ends (the last step is one of them): the run "
               f"is a fraction of an epoch or a few, so a lost process or Ctrl-C resumes from there (finetune "
               f"resume=RUN), not from the start")
    if steps is not None and planned["_target_"].endswith("ReduceLROnPlateau"):  # yours: it needs several checks
        checks = int(rules["step_budget_checks"])
        every = max(1, steps // checks)
        choose("trainer.check_val_every_n_epoch", None, "validation is counted in steps (below), not epochs")
        choose("trainer.val_check_interval", every, f"validate every {every:,} steps ({checks} checks in the run): "
                                                    f"the plateau rule looks after each check")
    elif values.get("data.val_fraction") == 0.0 and epochs > 1:
        choose("trainer.check_val_every_n_epoch", epochs, "no validation split: the training images are scored once, "
                                                          "after the last epoch, not after every epoch (a curve of "
                                                          "training accuracy is not worth a pass over the data each)")
    return apply(cfg, values), decision


def apply(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """``cfg`` with dotted keys set; a group (scheduler, augment) is replaced by its YAML option; a callback
    set to None is removed."""
    from finetune.resume import with_values

    plain = {}
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key, value in values.items():
        if key in ("scheduler", "augment"):
            cfg[key] = OmegaConf.create(preset(key, str(value)))
        elif key.startswith("callbacks.") and value is None:
            cfg.callbacks.pop(key.split(".", 1)[1], None)
        else:
            plain[key] = value
    OmegaConf.set_struct(cfg, True)
    return with_values(cfg, plain) if plain else cfg


def after_measurement(cfg: DictConfig, decision: RecipeDecision, choice) -> DictConfig:
    """The rules that need the policy's measurement: the fine-tuning LR from the measured domain, label
    smoothing when layers below the head train, and the horizontal flip from the flip probe. ``cfg`` with their
    values set (``decision`` gets the reasons)."""
    if decision.mode != "auto":
        return cfg
    rules = OmegaConf.to_container(cfg.recipe, resolve=True)
    values: dict[str, Any] = {}
    choose = decision.chooser(cfg, values)
    plan, m = choice.plan, choice.measurements

    if m is not None and not plan.head_only:
        gap, far_gap = float(m.depth_gap), float(rules["lr_far_gap"])
        far = gap > far_gap
        lr = float(rules["lr"]["far" if far else "near"])
        effect = ("a larger LR moves the features further (Li et al. 2020)" if far
                  else "the usual fine-tuning LR keeps what transfers")
        choose("optimizer.lr", lr, f"{plan.policy} fine-tunes layers below the head and the domain measures "
                                   f"{'far from' if far else 'near'} the pretraining one (probe gap {gap:.3f} "
                                   f"{'>' if far else '<='} {far_gap:g}): {effect}")
    multilabel = str(cfg.task) == "multilabel"
    if not plan.head_only and not multilabel:  # the binary cross-entropy of task=multilabel takes no smoothing
        smoothing = float(rules["label_smoothing"])
        choose("regularization.label_smoothing", smoothing,
               f"{plan.policy} fine-tunes layers below the head: targets of {1 - smoothing:g} instead of 1 keep a "
               f"small training set from being fitted with ever larger logits (timm's default; +0.002 to +0.022 on "
               f"five of seven benchmark sets, -0.003 to 0 on the others, BENCHMARKS.md)")
    if plan.head_only:
        choose("augment", "none", f"{plan.policy} trains only the head, on features the frozen network computes once "
                                  f"(cached features): augmented views would need a pass each")
    elif multilabel:
        choose("augment", "none", "task=multilabel: no flip probe (it needs one class per image), and a random crop "
                                  "can cut a labelled object out of the image while its label stays")
    elif m is not None and m.flip_probe_acc is None and int(cfg.trainer.max_epochs) < int(rules["augment_min_epochs"]):
        choose("augment", "none", f"no augmentation: {int(cfg.trainer.max_epochs)} epochs (< "
                                  f"{int(rules['augment_min_epochs'])}) are too few to gain from extra views; short "
                                  f"fine-tunes of small data converged better without (the flip probe was not run)")
    elif m is not None and m.flip_probe_acc is not None:
        epochs = int(cfg.trainer.max_epochs)
        drop = float(m.best_acc) - float(m.flip_probe_acc)
        keeps_class = drop <= float(rules["flip_max_drop"])
        evidence = (f"a probe trained on the images scores {m.best_acc:.3f} on held-out images and "
                    f"{m.flip_probe_acc:.3f} on the same images flipped (drop {drop:.3f})")
        if not keeps_class:
            choose("augment", "none", f"no horizontal flip: a flip changes what the image shows ({evidence}, more "
                                      f"than {float(rules['flip_max_drop']):g})")
        elif epochs >= int(rules["augment_min_epochs"]):
            choose("augment", "flip", f"horizontal flip: a flipped image still shows its class ({evidence}) and "
                                      f"{epochs} epochs leave time to use the extra views")
        else:
            choose("augment", "none", f"no augmentation: a flip would keep the class ({evidence}), but {epochs} "
                                      f"epochs (< {int(rules['augment_min_epochs'])}) are too few to gain from extra "
                                      f"views; short fine-tunes of small data converged better without")
    decision.facts["flip_probe_acc"] = None if m is None else m.flip_probe_acc
    return apply(cfg, values)

"""What fit gets, built from the config before any training: the checked data (and what a run with
no validation split switches off), the policy decision, the feature-cache choice, the model and datamodule.
Separate from train.py, which runs the steps (fit, score, write) on what this builds."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from finetune.batch_size import LR_SCALING, LR_SCALING_WHY, REFERENCE_BATCH, auto_batch_size
from finetune.config import build_optimizer_and_scheduler
from finetune.data.datamodule import ImageDataModule
from finetune.data.datasets import label_list, scan_configured, scan_dataset
from finetune.data.feature_cache import CachedFeatureDataModule
from finetune.data.imbalance import choose as choose_imbalance
from finetune.data.imbalance import choose_multilabel
from finetune.data.mixing import build_batch_mixer
from finetune.data.transforms import resolve_preprocessing
from finetune.data.validate import validate_dataset
from finetune.distributed import decision_of_rank_zero, distributed_run_id
from finetune.models.backbone import BackboneSpec, attach_head, load_pretrained, pretrained_input_size
from finetune.models.heads import lbfgs_head_note, warm_start_head
from finetune.models.module import FeatureHeadClassifier, ImageClassifier, Recipe
from finetune.policy.choose import choose_policy, format_policy_block
from finetune.policy.stages import build_stage_map
from finetune.recipe.auto import (
    RecipeDecision,
    after_measurement,
    before_measurement,
    device_kind,
    format_recipe_block,
    images_of_given_length,
)
from finetune.recipe.regularization import Regularization
from finetune.resume import ResumePoint, choice_from_record, typed_paths, with_values

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What fit runs on, and what the run files, scoring and report read about it."""

    index: Any  # DatasetIndex, without the files the data check left out
    data_report: Any  # the data check's report, None when it is off
    no_validation: str | None  # why there is no validation split, None when there is one
    preprocessing: Any
    weight_source: str
    plan: Any
    augment: dict[str, Any] | None
    module: ImageClassifier
    data: Any  # the datamodule fit runs on: images, or cached features
    record: dict[str, Any]  # policy.json
    saved_record: dict[str, Any] | None  # the resumed run's policy.json, reused as it is
    trainable: int
    frozen: int
    cfg: DictConfig  # the run's config with every recipe=auto choice in it (what config.yaml records)
    recipe: RecipeDecision | None  # recipe=auto's choices and reasons (recipe.json); None when resumed
    regularization: Regularization  # as trained (with recipe=auto's label smoothing)
    imbalance: dict[str, Any]  # loss.class_weights / data.sampler as resolved, with the reason (metrics.json)


def recipe_before_measurement(cfg: DictConfig) -> tuple[DictConfig, RecipeDecision]:
    """recipe=auto's first step on the scanned data (no split carved, to see every training image and
    whether a val split exists on disk): ``cfg`` with its choices, and the decision."""
    if str(cfg.recipe.name) != "auto":  # recipe=off: nothing to read, but data.batch_size=auto's probe
        return with_auto_batch_size(cfg), RecipeDecision(str(cfg.recipe.name))
    index = scan_dataset(cfg.data.root, 0.0, cfg.data.test_fraction, cfg.data.split_seed, task=str(cfg.task))
    return before_measurement(cfg, index, pretrained_input_size(cfg.model.backbone),
                              batch_rule=auto_batch_rule(cfg, len(index.classes)))


def auto_batch_rule(cfg: DictConfig, num_classes: int):
    """data.batch_size=auto's rule as ``(image size, channels_last, training images, images the run sees or None)
    -> (batch, why)``, for the recipe to call once it has chosen the size, layout and length."""
    def rule(image_size: int, channels_last: bool, n_train: int, seen: int | None) -> tuple[int, str]:
        return auto_batch_size(str(cfg.model.backbone), num_classes, image_size, str(cfg.trainer.precision),
                               channels_last, device_kind(cfg), n_train, seen, distributed_run_id())
    return rule


def with_auto_batch_size(cfg: DictConfig) -> DictConfig:
    """recipe=off: ``cfg`` with data.batch_size=auto resolved (and lr_reference_batch, unless given), said in the
    log; unchanged for a number."""
    if cfg.data.batch_size != "auto":
        return cfg
    index = scan_dataset(cfg.data.root, float(cfg.data.val_fraction), cfg.data.test_fraction, cfg.data.split_seed,
                         task=str(cfg.task))
    size = int(cfg.data.image_size or pretrained_input_size(cfg.model.backbone))
    n_train = len(index.splits["train"])
    batch, why = auto_batch_rule(cfg, len(index.classes))(size, bool(cfg.model.channels_last), n_train,
                                                            images_of_given_length(cfg, n_train))
    log.info("data.batch_size=auto -> %d: %s", batch, why)
    values: dict[str, Any] = {"data.batch_size": batch}
    given = typed_paths(cfg)
    if "lr_reference_batch" not in given:
        values["lr_reference_batch"] = REFERENCE_BATCH
        log.info("lr_reference_batch=%d: optimizer.lr is the LR for %d images", REFERENCE_BATCH, REFERENCE_BATCH)
    if "lr_scaling" not in given:
        values["lr_scaling"] = LR_SCALING
        log.info("lr_scaling=%s: %s", LR_SCALING, LR_SCALING_WHY)
    return with_values(cfg, values)


def prepare_run(cfg: DictConfig, run_dir: Path, trainer: L.Trainer, regularization: Regularization,
                resumed: ResumePoint | None, resume: str | None, recipe: RecipeDecision | None = None) -> Prepared:
    """Data (scanned and checked), backbone, preprocessing, policy decision, model and datamodule."""
    index = scan_configured(cfg)
    log.info("Dataset: %s", index.summary())
    kwargs = regularization.model_kwargs(OmegaConf.to_container(cfg.model.kwargs))
    backbone, weight_source, pretrained_head = load_pretrained(cfg.model.backbone, cfg.model.weights, **kwargs)
    preprocessing = resolve_preprocessing(backbone, cfg.data)
    log.info("Preprocessing (from %s's pretrained config unless overridden): %s",
             cfg.model.backbone, preprocessing.to_dict())

    index, data_report = checked_index(index, cfg, preprocessing.image_size)
    index, no_validation = without_validation(index, cfg, trainer)  # no val split: said loudly, nothing follows it
    plateau_checks(cfg, trainer, no_validation)

    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    choice, saved_record, run_id = policy_choice(cfg, policy_cfg, run_dir, resumed, backbone, index, preprocessing,
                                                 pretrained_head, flip=recipe is not None and recipe.wants_flip_probe)
    if recipe is not None:
        cfg = after_measurement(cfg, recipe, choice)
        log.info("\n%s", format_recipe_block(recipe.to_dict()))
        # Its label smoothing acts in the module, built below (the network's own dropout keys it does not set)
        regularization = Regularization.from_config(OmegaConf.to_container(cfg.regularization, resolve=True))
    plan = choice.plan
    spec = BackboneSpec(cfg.model.backbone, len(index.classes), kwargs, plan.cut_after_stage, regularization.pooling)
    net = attach_head(backbone, spec)
    stage_map = build_stage_map(net)
    augment = OmegaConf.to_container(cfg.augment, resolve=True)
    use_cache, cache_note, head_solver = feature_cache_plan(cfg, policy_cfg, plan, augment, regularization)
    module, data, mixer, imbalance = build_module(
        cfg, policy_cfg, net, spec, index, preprocessing, plan, stage_map, augment, regularization,
        use_cache=use_cache, head_solver=head_solver, no_validation=no_validation, resume=resume, trainer=trainer)
    trainable, frozen = count_parameters(module)
    record = choice.record() | {
        "parameters": {"trainable": trainable, "frozen": frozen, "per_group": stage_map.parameter_counts(net)},
        "feature_cache": {
            "used": use_cache, "why": cache_note, "head_solver": module.head_solver if use_cache else None
        },
        "notes": [cache_note] if use_cache and augment_is_active(augment) else [],
        "run_id": run_id,
    }
    if use_cache and mixer is not None:
        record["notes"].append("MixUp/CutMix are not applied: they mix images, and the head trains on cached features "
                               "(policy.cache=false applies them)")
    if saved_record is not None:
        record = saved_record  # with the measurements that led to it
    log.info("\n%s", format_policy_block(record))
    return Prepared(index, data_report, no_validation, preprocessing, weight_source, plan, augment, module, data,
                    record, saved_record, trainable, frozen, cfg, recipe, regularization, imbalance)


def policy_choice(cfg: DictConfig, policy_cfg: dict[str, Any], run_dir: Path, resumed: ResumePoint | None,
                  backbone, index, preprocessing, pretrained_head, flip: bool = False):
    """(choice, the resumed run's policy.json or None, run id): the plan a resumed checkpoint was trained
    with, else rank 0's (other DDP ranks), else the one measured and decided now."""
    run_id = distributed_run_id()
    saved_record = resumed.policy_record() if resumed else None
    if saved_record is not None:  # the plan the checkpoint was trained with; measuring again could differ
        choice = choice_from_record(saved_record, policy_cfg)
        log.info("Resuming with the run's policy decision (%s) from %s",
                 saved_record["policy_applied"], resumed.policy_file)
    else:
        choice = decision_of_rank_zero(run_dir, run_id, policy_cfg) if rank_zero_only.rank != 0 and run_id else None
    if choice is None:
        choice = choose_policy(policy_cfg, backbone, index, preprocessing, pretrained_head, cfg.seed, flip=flip)
    return choice, saved_record, run_id


def build_module(cfg: DictConfig, policy_cfg: dict[str, Any], net, spec, index, preprocessing, plan, stage_map,
                 augment: dict[str, Any] | None, regularization: Regularization, *, use_cache: bool, head_solver: str,
                 no_validation: str | None, resume: str | None, trainer: L.Trainer):
    """(LightningModule, the datamodule fit runs on, the batch mixer or None, the imbalance choice); ``trainer``
    says where the steps run (loader workers follow it)."""
    train_labels = [y for _, y in index.splits["train"]]
    imbalance = (choose_multilabel(cfg.loss.class_weights, train_labels, index.classes) if index.multilabel else
                 choose_imbalance(cfg.loss.class_weights, cfg.data.sampler, train_labels, index.classes,
                                  float(cfg.data.imbalance_ratio)))
    log.info("Class balance: %s%s", imbalance.reason,
             "; cached features train the head full-batch, so data.sampler=balanced does not apply"
             if use_cache and imbalance.sampler == "balanced" else "")
    datamodule = ImageDataModule(
        index,
        preprocessing,
        augment=None if use_cache else augment,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        preload=cfg.data.preload,
        preload_max_gb=cfg.data.preload_max_gb,
        seed=int(cfg.seed),
        on_bad_file=str(cfg.data.on_bad_file),  # a file that fails after the data check: skipped or an error
        sampler=imbalance.sampler,
        on_gpu=trainer.strategy.root_device.type == "cuda",
        processes_per_machine=trainer.num_devices,
        normalize_on_device=bool(cfg.data.normalize_on_device),
    )
    optimizer, scheduler, scheduler_options = build_optimizer_and_scheduler(cfg)
    mixer = build_batch_mixer(augment, len(index.classes), index.multilabel)  # images only: not cached features
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        net.compile()  # in place: parameter names (and so checkpoints) stay the same
    reference = cfg.lr_reference_batch  # the batch optimizer.lr was set for, when not data.batch_size
    recipe = Recipe(optimizer, scheduler, scheduler_options, lr_scaling=str(cfg.lr_scaling),
                    batch_over_reference=int(cfg.data.batch_size) / int(reference) if reference else 1.0,
                    batch_mixer=None if use_cache else mixer, channels_last=bool(cfg.model.channels_last),
                    frozen_bn_eval=bool(policy_cfg["frozen_bn_eval"]),
                    eval_stage="train_eval" if no_validation else "val",
                    head_solver=head_solver, head_l2=float(policy_cfg["head_l2"]),
                    class_weights=None if imbalance.class_weights is None else tuple(imbalance.class_weights),
                    task=index.task)
    kind = FeatureHeadClassifier if use_cache else ImageClassifier  # on cached features, or on images
    module = kind(net, spec, index.classes, preprocessing, recipe, regularization, plan, stage_map)
    views = int(policy_cfg["cache_views"] or 0) if augment_is_active(augment) else 0
    data = CachedFeatureDataModule(datamodule, net, full_batch=head_solver == "lbfgs", augment=augment,
                                   augmented_views=views) if use_cache else datamodule
    if not use_cache and "head" in plan.unfreeze_at and bool(policy_cfg["head_warm_start"]) and not resume:
        warm_start_head(net, datamodule, float(policy_cfg["head_l2"]))
    return module, data, mixer, imbalance.to_dict(index.classes)


def count_parameters(module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total - trainable


def feature_cache_plan(cfg: DictConfig, policy_cfg: dict[str, Any], plan, augment: dict[str, Any] | None,
                       regularization: Regularization) -> tuple[bool, str, str]:
    """(cache frozen features?, why, the head's solver): see ``cache_decision``."""
    use_cache, cache_note = cache_decision(policy_cfg, plan, augment, regularization)
    head_solver = str(policy_cfg["head_solver"])
    if use_cache and head_solver == "lbfgs" and (regularization.dropout > 0 or regularization.drop_connect > 0):
        head_solver = "optimizer"  # random masks would make L-BFGS's line search see a different loss each call
        cache_note += ("; the head trains with the configured optimizer "
                       "(dropout/DropConnect are random per step, which L-BFGS cannot use)")
    if use_cache and head_solver == "lbfgs":  # say what the L-BFGS head leaves out (log, policy.json)
        cache_note += lbfgs_head_note(cfg)
    return use_cache, cache_note, head_solver


def augment_is_active(augment: dict[str, Any] | None) -> bool:
    return bool(augment) and (augment["crop"] != "center" or bool(augment["transforms"]))


def cache_decision(policy_cfg: dict[str, Any], plan, augment: dict[str, Any] | None,
                   regularization: Regularization | None = None) -> tuple[bool, str]:
    """Cache frozen features when only the head trains (and the user did not turn caching off)."""
    if not plan.head_only:
        return False, "not used: layers below the head train, so features change every step"
    if regularization is not None and regularization.pooling != "avg":
        return False, f"not used: regularization.pooling={regularization.pooling} draws new pooling regions every step"
    if str(policy_cfg["cache"]).lower() in ("false", "off", "no"):
        return False, "off (policy.cache=false): the head trains through the frozen network every epoch"
    if augment_is_active(augment):
        views = int(policy_cfg["cache_views"] or 0)
        if views > 0:
            return True, (f"used: only the head trains, so the frozen network runs once over the data, plus {views} "
                          f"augmented views of every training image (policy.cache_views) "
                          f"with the configured augmentation")
        return True, (
            "used: only the head trains, so the frozen network runs once; the configured augmentation "
            "is NOT applied (policy.cache_views=0; set it to K to cache K augmented views, or policy.cache=false "
            "to train through the network with it every epoch)"
        )
    return True, "used: only the head trains, so the frozen network runs once over the data"


def checked_index(index, cfg: DictConfig, input_size: int | None = None):
    """The index without the files the data check leaves out, and the check's report (None when off)."""
    if not cfg.data.validate:
        return index, None
    return validate_dataset(index, str(cfg.data.on_bad_file), int(cfg.data.min_image_side), input_size,
                            float(cfg.data.imbalance_ratio))


NO_VALIDATION = "none: scored on training images"


def plateau_checks(cfg: DictConfig, trainer: L.Trainer, no_validation: str | None) -> None:
    """scheduler.checks_per_epoch > 1: validate that many times per epoch, so a plateau rule can act within an
    epoch on a short run (patience and cooldown then count checks; the module steps the rule after each one).
    Only where validation is real and runs every epoch; otherwise said why not."""
    checks = cfg.scheduler.get("checks_per_epoch")  # plateau.yaml's key; other schedules have none
    if checks is None or checks <= 1:
        return
    why_not = ("there is no validation split" if no_validation
               else f"trainer.val_check_interval={cfg.trainer.val_check_interval} is set"
               if cfg.trainer.val_check_interval is not None
               else f"trainer.check_val_every_n_epoch={cfg.trainer.check_val_every_n_epoch} (not every epoch)"
               if cfg.trainer.check_val_every_n_epoch != 1 else None)
    if why_not:
        log.warning("scheduler.checks_per_epoch=%d is not applied: %s; the plateau rule looks once per epoch.",
                    checks, why_not)
        return
    trainer.val_check_interval = 1.0 / checks
    log.info("Validation %d times per epoch (scheduler.checks_per_epoch): the plateau rule looks after each check.",
             checks)


def without_validation(index, cfg: DictConfig, trainer: L.Trainer):
    """(index without empty val/test splits, None) when there is a validation split; else the same
    index and why there is none, after switching off what would follow training data as if it were
    validation. The validation loop then scores the training images, logged as ``train_eval/*`` (the
    module's ``eval_stage``); best.ckpt and early stopping on val/* are dropped (an epoch picked on
    training data is the most overfitted one), the last epoch is scored, and ReduceLROnPlateau follows
    ``train_eval/loss``: lowering the LR when training stops improving is still a sound schedule."""
    removed = [s for s in ("val", "test") if s in index.splits and not index.splits[s]]
    if removed:  # the data check left none of their images
        index = replace(index, splits={s: v for s, v in index.splits.items() if s not in removed})
    if "val" in index.splits:
        missing = sorted(set(range(len(index.classes))) - {c for _, y in index.splits["val"] for c in label_list(y)})
        if missing:
            log.warning("Classes with no validation image: %s. val/* does not measure them (data.val_fraction gives "
                        "a class one when it has 3 or more images).", ", ".join(index.classes[i] for i in missing))
        return index, None
    fraction = float(cfg.data.val_fraction)
    if "val" in removed:
        cause = "the data check left no readable validation image"
    elif fraction <= 0:
        cause = f"data.val_fraction={cfg.data.val_fraction}, and data.root has no val folder or CSV rows with split=val"
    else:
        largest = max(Counter(c for _, y in index.splits["train"] for c in label_list(y)).values())
        cause = (f"data.val_fraction={cfg.data.val_fraction} gives no class a validation image (a class needs 3 or "
                 f"more images; the largest has {largest})")
    watching = [c for c in trainer.callbacks if str(getattr(c, "monitor", None) or "").startswith("val/")]
    trainer.callbacks = [c for c in trainer.callbacks if c not in watching]
    names = {"ModelCheckpoint": "best.ckpt", "EarlyStopping": "early stopping"}
    off = [f"{names.get(type(c).__name__, type(c).__name__)} ({c.monitor})" for c in watching]
    plateau = str(cfg.scheduler.get("monitor") or "") if cfg.scheduler._target_ else ""  # monitor: plateau.yaml only
    plateau = plateau.split("/", 1)[1] if plateau.startswith("val/") else ""
    folder = {"csv": f"rows with split=val in {index.root}",
              "split_folders": f"a val folder ({index.root}/val/<class>/..., beside train/)"}.get(
        index.layout, f"a val folder ({index.root}/train/<class>/... and {index.root}/val/<class>/...)")
    log.warning(
        "NO VALIDATION SPLIT: %s. The validation loop scores the TRAINING images instead, logged as train_eval/acc "
        "and train_eval/loss (not val/*): they show how well the model fits its training images, not how it does on "
        "new ones. %sThe last epoch is scored%s. To measure the model, set data.val_fraction (e.g. 0.2; a class "
        "needs 3 or more images to get a validation image) or add %s.",
        cause, f"Switched off: {', '.join(off)}. " if off else "",
        f"; a ReduceLROnPlateau schedule follows train_eval/{plateau}" if plateau else "", folder)
    return index, cause

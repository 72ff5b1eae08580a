"""The LightningModule: a timm network, cross-entropy, torchmetrics accuracy, configured optimizer.

``ImageClassifier`` trains on images; ``FeatureHeadClassifier`` trains only its head on cached
pre-classifier features (frozen-prefix policies, ``data/feature_cache.py``). How they train (optimizer,
scheduler, LR scaling, batch mixing) comes as one ``Recipe``; the policy's unfreeze schedule is the
``UnfreezeSchedule`` callback they add to the trainer. Either writes everything a checkpoint needs to be
used on its own (backbone name, classes, preprocessing) under ``checkpoint["finetune"]``, as plain data
that weights-only loading accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.models.backbone import BackboneSpec
from finetune.models.heads import head_l2_penalty, head_lbfgs
from finetune.models.metrics import accuracy_metric, extra_metrics
from finetune.policy.freeze import hold_eval_modes, param_groups, set_trainable, unfreezes_during_training
from finetune.policy.plan import Plan
from finetune.policy.stages import StageMap
from finetune.recipe.callbacks import UnfreezeSchedule
from finetune.recipe.regularization import Regularization, WeightPenalty, drop_connect_linear, no_weight_decay_names
from finetune.recipe.schedulers import build_lr_schedulers

CHECKPOINT_KEY = "finetune"
CHECKPOINT_FORMAT = 1

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Recipe:
    """How a module trains, beyond the network and the policy; the defaults build one for inference only."""

    optimizer: OptimizerFactory | None = None
    scheduler: SchedulerFactory | None = None
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    lr_scaling: str = "none"  # none | linear | sqrt: LR vs the global batch (see lr_scale_factor)
    # data.batch_size / lr_reference_batch: how much larger one device's batch is than the one the LR was set for
    # (1 unless lr_reference_batch is set, as data.batch_size=auto does)
    batch_over_reference: float = 1.0
    batch_mixer: BatchMixer | None = None  # MixUp / CutMix on training batches (soft targets)
    channels_last: bool = False  # feed NHWC batches to an NHWC network
    frozen_bn_eval: bool = True  # policy.frozen_bn_eval: frozen parts run in eval mode
    # The validation loop's metric prefix: "train_eval" when there is no validation split and the loop
    # scores the training images, so those scores are never mistaken for (or monitored as) val/*.
    eval_stage: str = "val"
    # FeatureHeadClassifier only: how the head trains on cached features (policy.head_solver, policy.head_l2).
    head_solver: str = "optimizer"
    head_l2: float = 0.0
    # loss.class_weights as resolved for the training split (finetune/data/imbalance.py); None: unweighted.
    # task=multilabel: the positive-class weights of the binary cross-entropy (pos_weight).
    class_weights: tuple[float, ...] | None = None
    # multiclass (softmax, cross-entropy) | multilabel (a sigmoid per class, binary cross-entropy); stored in
    # checkpoints, so inference rebuilds the same head.
    task: str = "multiclass"


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        spec: BackboneSpec,
        classes: list[str],
        preprocessing: Preprocessing,
        recipe: Recipe | None = None,
        regularization: Regularization | None = None,
        plan: Plan | None = None,
        stage_map: StageMap | None = None,
    ):
        super().__init__()
        self.net = net
        self.spec = spec
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.recipe = recipe or Recipe()
        # Without a regularization config (a module for inference, a library user), BatchNorm trains as in
        # plain torch; a training run passes the config's, whose default is trainable_bn=eval.
        self.regularization = regularization or Regularization(trainable_bn="train")
        self.label_smoothing = float(self.regularization.label_smoothing)
        self.plan = plan
        self.stage_map = stage_map
        if plan is not None:
            self.apply_plan(epoch=0)
        # Penalties (L1, L2, L2-SP) added to the training loss; L2-SP's anchors are the weights now.
        head_names = set(stage_map.groups["head"]) if stage_map is not None else set()
        self.penalty = WeightPenalty(net, self.regularization, head_names) if self.regularization.has_penalty else None
        self.save_hyperparameters(
            {"backbone": spec.name, "classes": self.classes, "preprocessing": preprocessing.to_dict()}
        )
        n = len(self.classes)
        self.train_acc, self.val_acc, self.test_acc = (accuracy_metric(n, self.multilabel) for _ in range(3))
        # Scoring losses as metrics (sum and count, summed over DDP ranks): Lightning's own sync of a logged mean
        # averages the ranks' image counts in integers, which is wrong when the ranks score unequal shares.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_extra = extra_metrics(n, self.multilabel)
        self.test_extra = self.val_extra.clone()

    @property
    def eval_stage(self) -> str:
        return self.recipe.eval_stage

    @property
    def multilabel(self) -> bool:
        return self.recipe.task == "multilabel"

    @property
    def optimizer_factory(self) -> OptimizerFactory | None:
        return self.recipe.optimizer

    @optimizer_factory.setter
    def optimizer_factory(self, factory: OptimizerFactory | None) -> None:
        self.recipe.optimizer = factory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        drop_connect = float(self.regularization.drop_connect)
        if self.training and drop_connect > 0:
            features = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
            return drop_connect_linear(features, self.net.get_classifier(), drop_connect)
        return self.net(x)

    def apply_plan(self, epoch: int) -> list[str]:
        """Make trainable what the plan says for ``epoch`` (idempotent, so resume lands right)."""
        groups = self.plan.trainable_at(epoch)
        set_trainable(self.net, self.stage_map, groups)
        if self.training:
            self.hold_eval_modes()
        return groups

    def hold_eval_modes(self) -> None:
        """Frozen parts (policy.frozen_bn_eval) and, with regularization.trainable_bn=eval, every
        BatchNorm keep normalising with their stored statistics while the rest trains."""
        hold_eval_modes(self.net, frozen=self.recipe.frozen_bn_eval and self.plan is not None,
                        batchnorm=self.regularization.trainable_bn == "eval")

    def train(self, mode: bool = True):
        """Whenever the module is put in training mode, the parts asked to stay in eval mode do."""
        super().train(mode)
        if mode:
            self.hold_eval_modes()
        return self

    def configure_callbacks(self) -> list[L.Callback]:
        """The policy's unfreeze schedule (and the eval modes it holds) runs as a callback of the fit."""
        return [UnfreezeSchedule()]

    def _cross_entropy(self, logits: torch.Tensor, target: torch.Tensor, stage: str) -> torch.Tensor:
        weights = self.recipe.class_weights if stage == "train" else None  # scores stay the plain loss
        weight = None if weights is None else torch.tensor(weights, device=logits.device, dtype=logits.dtype)
        if self.multilabel:  # a sigmoid per class; the weights (when asked) weigh each class's positives
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=weight)
        if stage != "train":
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.label_smoothing)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str,
              metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        target = y
        if stage == "train" and self.recipe.batch_mixer is not None:
            x, target = self.recipe.batch_mixer(x, y)  # soft targets; accuracy counts the dominant label
            y = (target >= 0.5).long() if self.multilabel else target.argmax(dim=-1)
        elif self.multilabel:
            y = y.long()  # the metrics take 0/1 integers; the loss the float rows
        logits = self(x)
        loss = self._cross_entropy(logits, target, stage)
        if stage == "train" and self.penalty is not None:
            penalty = self.penalty(self.net)
            self.log("train/penalty", penalty, on_step=False, on_epoch=True, batch_size=len(y))
            loss = loss + penalty
        # Multi-label metrics get probabilities: torchmetrics applies a sigmoid only to a batch with a value outside
        # [0, 1], so a batch of small logits would be read as probabilities
        scores = logits.detach().sigmoid() if self.multilabel else logits
        metric(scores, y)
        if stage == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        else:
            mean = self.test_loss if stage == "test" else self.val_loss
            mean.update(loss.detach(), weight=len(y))
            self.log(f"{stage}/loss", mean, on_step=False, on_epoch=True, prog_bar=True)
            extra = self.test_extra if stage == "test" else self.val_extra
            extra.update(scores, y)
            for name, metric_obj in extra.items():
                self.log(f"{stage}/{name}", metric_obj, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.eval_stage, self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx):
        logits = self(batch[0])
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=-1)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("ImageClassifier was built without an optimizer (inference only).")
        keywords = getattr(self.optimizer_factory, "keywords", {})
        if getattr(self.optimizer_factory, "func", None) is torch.optim.LBFGS:
            groups = self._lbfgs_parameters()
        elif self.plan is not None:
            # Every stage group from step one (frozen ones too): schedulers and resume see a fixed set.
            groups = param_groups(self.net, self.stage_map, self.plan, keywords.get("lr", 1e-3),
                                  keywords.get("weight_decay", 0.0))
        else:
            # No weight decay on norm layers, biases and the model's no_weight_decay() names (timm's helper,
            # the rule of regularization.is_weight).
            groups = param_groups_weight_decay(self.net, weight_decay=keywords.get("weight_decay", 0.0),
                                               no_weight_decay_list=no_weight_decay_names(self.net))
        optimizer = self.optimizer_factory(groups)
        factor = self.lr_scale_factor()
        if factor != 1 and not isinstance(optimizer, torch.optim.LBFGS):  # L-BFGS: its line search sets the step
            for group in optimizer.param_groups:
                group["lr"] *= factor
            rank_zero_info(f"Learning rates x{factor:g} (lr_scaling={self.recipe.lr_scaling}): the global batch is "
                           f"{self.batch_multiple():g} x " + ("data.batch_size" if self.recipe.batch_over_reference == 1
                                                              else "lr_reference_batch"))
        options = dict(self.recipe.scheduler_options)
        monitor = str(options.get("monitor") or "")
        if self.eval_stage != "val" and monitor.startswith("val/"):  # no validation split: follow what is logged
            options["monitor"] = f"{self.eval_stage}/{monitor.split('/', 1)[1]}"
        warmup_epochs = int(options.pop("warmup_epochs", 0) or 0)
        warmup_start_factor = float(options.pop("warmup_start_factor", 0.1))
        options.pop("checks_per_epoch", None)  # applied to the trainer (prepare.plateau_checks), read back below
        anneal = float(options.pop("final_anneal", 0.0) or 0.0)
        scheduler = self.recipe.scheduler
        if scheduler is None and warmup_epochs == 0 and anneal == 0:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches  # also loads the train dataloader...
        if math.isinf(self.trainer.num_training_batches):  # ...but not with max_epochs=-1 (Lightning returns early)
            self.trainer.fit_loop.setup_data()
        # No length (max_epochs=-1): only schedules that need none get here (config.py refuses the others).
        total_steps = int(total_steps) if math.isfinite(total_steps) else 0
        steps_per_epoch = max(1, -(-int(self.trainer.num_training_batches) // self.trainer.accumulate_grad_batches))
        checks_every = self.trainer.val_check_batch
        if getattr(scheduler, "func", None) is ReduceLROnPlateau and isinstance(checks_every, int) and (
                checks_every < self.trainer.num_training_batches):
            # Validation runs every `checks_every` batches: the plateau rule looks right after each check
            # (Lightning steps a step-interval plateau scheduler after validation), so patience counts checks.
            options.update(interval="step", frequency=checks_every)
        schedulers = build_lr_schedulers(optimizer, scheduler, options, warmup_epochs,
                                         warmup_start_factor, steps_per_epoch, total_steps, final_anneal=anneal)
        return [optimizer], schedulers

    def lr_scale_factor(self) -> float:
        """How much the configured LR grows with the global batch, relative to the batch it was set for (one
        device's ``data.batch_size``, or ``lr_reference_batch``; the global batch is k times that): linear k
        (Goyal et al. 2017), sqrt(k) (the usual rule for adaptive optimizers), or none. 1 on a single device at
        the reference batch."""
        k = self.batch_multiple()
        return {"linear": float(k), "sqrt": float(k) ** 0.5}.get(self.recipe.lr_scaling, 1.0)

    def batch_multiple(self) -> float:
        """The global batch over the batch the LR was set for: processes x accumulated batches x
        data.batch_size / lr_reference_batch (one process outside a fit: tests, inspection)."""
        if self._trainer is None:
            return self.recipe.batch_over_reference
        return self.trainer.world_size * self.trainer.accumulate_grad_batches * self.recipe.batch_over_reference

    def _lbfgs_parameters(self) -> list[torch.nn.Parameter]:
        """L-BFGS takes one group with a fixed parameter set: what trains from the first epoch."""
        if unfreezes_during_training(self.plan):
            raise FinetuneError(
                f"optimizer=lbfgs does not fit policy {self.plan.policy}, which unfreezes layers during training "
                f"(L-BFGS keeps one fixed set of parameters and its curvature history). Use another optimizer, "
                f"or a policy whose trainable set is fixed (linear_probe, stage_probe, partial, full)."
            )
        return [p for p in self.net.parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "backbone": self.spec.name,
            "num_classes": self.spec.num_classes,
            "model_kwargs": dict(self.spec.kwargs),
            "cut_after_stage": self.spec.cut_after_stage,
            "pooling": self.spec.pooling,
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
            "task": self.recipe.task,
        }


class FeatureHeadClassifier(ImageClassifier):
    """Only the head trains, on cached pre-classifier features instead of images (frozen-prefix policies).

    The network is whole (checkpoints load as an ``ImageClassifier``). The head trains with the configured
    optimizer, or (``recipe.head_solver=lbfgs``) with full-batch L-BFGS: on fixed features the head is a
    convex problem that it solves in a few steps, with ``recipe.head_l2`` on the head's weights.
    """

    @property
    def head_solver(self) -> str:
        return self.recipe.head_solver

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.net.get_classifier()
        if not self.training:
            return head(x)
        if self.regularization.dropout > 0:
            x = F.dropout(x, self.regularization.dropout)  # cached features were pooled without it
        drop_connect = float(self.regularization.drop_connect)
        return drop_connect_linear(x, head, drop_connect) if drop_connect > 0 else head(x)

    def _cross_entropy(self, logits: torch.Tensor, target: torch.Tensor, stage: str) -> torch.Tensor:
        loss = super()._cross_entropy(logits, target, stage)
        if stage == "train" and self.head_solver == "lbfgs" and self.recipe.head_l2 > 0:
            loss = loss + head_l2_penalty(self.net.get_classifier(), self.recipe.head_l2)
        return loss

    def configure_optimizers(self):
        if self.head_solver == "lbfgs":
            return head_lbfgs(self.net.get_classifier(), max_iter=50)  # 50 iterations per epoch
        return super().configure_optimizers()

"""The LightningModule: a timm network, cross-entropy, torchmetrics accuracy, configured optimizer.

It writes everything a checkpoint needs to be used on its own (backbone name, classes,
preprocessing) under ``checkpoint["finetune"]``, as plain data that weights-only loading accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from finetune.data.transforms import Preprocessing
from finetune.models.backbone import BackboneSpec

CHECKPOINT_KEY = "finetune"
CHECKPOINT_FORMAT = 1

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        spec: BackboneSpec,
        classes: list[str],
        preprocessing: Preprocessing,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_options: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.net = net
        self.spec = spec
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_options = dict(scheduler_options or {})
        self.label_smoothing = label_smoothing
        self.save_hyperparameters(
            {"backbone": spec.name, "classes": self.classes, "preprocessing": preprocessing.to_dict()}
        )
        n = len(self.classes)
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).softmax(dim=-1)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("ImageClassifier was built without an optimizer (inference only).")
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        # No weight decay on norm layers and biases (timm's helper); frozen parameters are left out.
        groups = param_groups_weight_decay(self.net, weight_decay=weight_decay)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), **self.scheduler_options}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "backbone": self.spec.name,
            "num_classes": self.spec.num_classes,
            "model_kwargs": dict(self.spec.kwargs),
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
        }

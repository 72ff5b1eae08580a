"""Head solvers: fit the linear classifier on fixed features with full-batch L-BFGS.

On fixed features the head is a convex problem, so L-BFGS solves it in a few steps. Used to train the head
on cached features (``FeatureHeadClassifier``) and for LP-FT's head warm start (Kumar et al., ICLR 2022).
"""

from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from finetune.data.datamodule import ImageDataModule, ImageListDataset
from finetune.data.transforms import Preprocessing, eval_transform, normalize_batch

log = logging.getLogger(__name__)


@torch.no_grad()  # not inference_mode: a warm-started head backpropagates through these tensors
def pooled_features(net: nn.Module, loader: DataLoader,
                    preprocessing: Preprocessing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the classifier sees (timm's forward_head(pre_logits=True)) for every batch of ``loader``; uint8
    batches (data.normalize_on_device) are normalised with ``preprocessing`` first."""
    was_training = net.training
    net.eval()
    feats, labels = [], []
    for x, y in loader:
        if x.dtype == torch.uint8:
            if preprocessing is None:
                raise ValueError("uint8 batches need the preprocessing that normalises them")
            x = normalize_batch(x, preprocessing)
        feats.append(net.forward_head(net.forward_features(x), pre_logits=True).float())
        labels.append(torch.as_tensor(y))
    net.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def lbfgs_head_note(cfg: DictConfig) -> str:
    """What the full-batch L-BFGS head leaves out, for the log and policy.json: it sets its own step by line
    search, so optimizer.* and scheduler.* are not used (a sweep over optimizer.lr would change nothing).
    A warning when the command line set them, with the way to have them used."""
    from hydra.core.hydra_config import HydraConfig

    note = (f"; the head trains with full-batch L-BFGS, whose line search sets the step: optimizer.lr="
            f"{cfg.optimizer.get('lr')} and the scheduler are not used (policy.head_solver=optimizer uses them)")
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    ignored = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in ("optimizer", "scheduler")]
    if ignored:
        log.warning("%s ignored: only the head trains, on cached features, with full-batch L-BFGS (its line search "
                    "sets the step, so optimizer.* and scheduler.* do not apply). To train the head with them, "
                    "add policy.head_solver=optimizer.", " ".join(ignored))
    return note


def head_lbfgs(head: nn.Module, max_iter: int) -> torch.optim.LBFGS:
    """The full-batch L-BFGS used for every head trained on fixed features."""
    return torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                             line_search_fn="strong_wolfe")


def head_l2_penalty(head: nn.Module, l2: float) -> torch.Tensor:
    """L2 on the head's weights (L-BFGS has no weight_decay), on the mean-loss scale."""
    return l2 * head.weight.pow(2).sum()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices; for 0/1 float rows (task=multilabel), binary cross-entropy per class."""
    if labels.is_floating_point() and labels.shape == logits.shape:
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)
    return nn.functional.cross_entropy(logits, labels)


def fit_head_lbfgs(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, l2: float,
                   max_iter: int = 200) -> float:
    """Fit a linear head to convergence on fixed features (full batch L-BFGS); returns the final loss."""
    optimizer = head_lbfgs(head, max_iter)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = classification_loss(head(features), labels) + head_l2_penalty(head, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        return float(closure())


def warm_start_head(net: nn.Module, images: ImageDataModule, l2: float) -> float:
    """LP-FT's first step (Kumar et al., ICLR 2022): fit the new head on the pretrained features
    before fine-tuning, so early updates do not push random-head gradients into the backbone."""
    images.setup("fit")
    train = images.datasets["train"]
    plain = ImageListDataset(train.samples, eval_transform(images.preprocessing), train.images, train.max_side,
                             on_bad_file=train.on_bad_file, num_classes=train.num_classes)
    started = time.perf_counter()
    features, labels = pooled_features(net, DataLoader(plain, batch_size=images.eval_batch_size))
    loss = fit_head_lbfgs(net.get_classifier(), features, labels, l2)
    log.info("Head warm start: linear probe on %d training images, loss %.3f, %.1f s", len(labels), loss,
             time.perf_counter() - started)
    return loss

"""Frozen-prefix feature cache: when only the head trains, run the frozen network once.

A linear probe then costs one forward pass over the data plus seconds of head training, instead
of a full forward pass per epoch. Features come from the evaluation transform; where augmentation
is configured, ``augmented_views`` extra passes over the training split with the training transform
are cached too (K augmented copies of every image), so the head still sees the augmentation.
train() says which in the log and in policy.json.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.data.datamodule import ImageDataModule, ImageListDataset
from finetune.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


@torch.no_grad()  # not inference_mode: a warm-started head backpropagates through these tensors
def pooled_features(net: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """What the classifier sees (timm's forward_head(pre_logits=True)) for every batch of ``loader``."""
    was_training = net.training
    net.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(net.forward_head(net.forward_features(x), pre_logits=True).float())
        labels.append(torch.as_tensor(y))
    net.train(was_training)
    return torch.cat(feats), torch.cat(labels)


class _FullBatch(torch.utils.data.Dataset):
    """A dataset of one item: the whole (features, labels) tensor pair."""

    def __init__(self, dataset: TensorDataset):
        self.tensors = dataset.tensors

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.tensors


class CachedFeatureDataModule(L.LightningDataModule):
    """Same splits as ``images``, as (features, label) tensors computed once with ``net``."""

    def __init__(self, images: ImageDataModule, net: nn.Module, full_batch: bool = False,
                 augment: dict | None = None, augmented_views: int = 0):
        super().__init__()
        self.full_batch = full_batch  # one batch per epoch (L-BFGS)
        self.images = images
        self.net = net
        self.augment = augment
        self.augmented_views = augmented_views if augment else 0
        self.datasets: dict[str, TensorDataset] = {}
        self.seconds = 0.0

    def setup(self, stage: str | None = None) -> None:
        self.images.setup(stage)

    def _dataset(self, split: str) -> TensorDataset:
        """The split's features, computed on first use: fitting pays for train and val, the final
        test for test (a fit's seconds then measure what the fit needs)."""
        if split not in self.datasets:
            started = time.perf_counter()
            dataset = self.images.datasets[split]
            loader = DataLoader(dataset, batch_size=self.images.eval_batch_size, num_workers=self.images.num_workers)
            features = TensorDataset(*pooled_features(self.net, loader))
            if split == "train" and self.augmented_views:
                features = self._with_augmented_views(features)
            self.datasets[split] = features
            seconds = time.perf_counter() - started
            self.seconds += seconds
            log.info("Feature cache: %s, %d vectors of %d dims in %.1f s", split, len(features),
                     features.tensors[0].shape[1], seconds)
        return self.datasets[split]

    def _with_augmented_views(self, clean: TensorDataset) -> TensorDataset:
        """The clean features plus ``augmented_views`` passes through the training transform."""
        base = self.images.datasets["train"]
        augmented = ImageListDataset(base.samples, train_transform(self.images.preprocessing, self.augment),
                                     images=base.images, max_side=base.max_side, on_bad_file=base.on_bad_file)
        loader = DataLoader(augmented, batch_size=self.images.eval_batch_size, num_workers=self.images.num_workers)
        feats, labels = [clean.tensors[0]], [clean.tensors[1]]
        for _ in range(self.augmented_views):
            f, y = pooled_features(self.net, loader)
            feats.append(f)
            labels.append(y)
        return TensorDataset(torch.cat(feats), torch.cat(labels))

    def _loader(self, split: str, train: bool) -> DataLoader:
        if train and self.full_batch:
            # One item holding every feature vector: under DDP the distributed sampler pads it, so each
            # rank trains on all of them (the same convex problem everywhere: L-BFGS's line search then
            # sees the same loss on every rank instead of each rank's shard).
            return DataLoader(_FullBatch(self._dataset(split)), batch_size=None)
        batch = self.images.batch_size if train else self.images.eval_batch_size
        return DataLoader(self._dataset(split), batch_size=batch, shuffle=train)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val" if "val" in self.images.datasets else "train", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def has_split(self, split: str) -> bool:
        return self.images.has_split(split)


def lbfgs_head_note(cfg: DictConfig) -> str:
    """What the full-batch L-BFGS head leaves out, for the log and policy.json: it sets its own step by line
    search, so optimizer.* and scheduler.* are not used (a sweep over optimizer.lr would change nothing).
    A warning when the command line set them, with the way to have them used."""
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
    return torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")


def head_l2_penalty(head: nn.Module, l2: float) -> torch.Tensor:
    """L2 on the head's weights (L-BFGS has no weight_decay), on the mean-loss scale."""
    return l2 * head.weight.pow(2).sum()


def fit_head_lbfgs(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, l2: float, max_iter: int = 200) -> float:
    """Fit a linear head to convergence on fixed features (full batch L-BFGS); returns the final loss."""
    optimizer = head_lbfgs(head, max_iter)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(features), labels) + head_l2_penalty(head, l2)
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
                             on_bad_file=train.on_bad_file)
    started = time.perf_counter()
    features, labels = pooled_features(net, DataLoader(plain, batch_size=images.eval_batch_size))
    loss = fit_head_lbfgs(net.get_classifier(), features, labels, l2)
    log.info("Head warm start: linear probe on %d training images, loss %.3f, %.1f s", len(labels), loss,
             time.perf_counter() - started)
    return loss

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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.data.datamodule import ImageDataModule, ImageListDataset, each_image_once
from finetune.data.transforms import train_transform
from finetune.models.heads import pooled_features

log = logging.getLogger(__name__)


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
            features = TensorDataset(*pooled_features(self.net, loader, self.images.preprocessing))
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
                                     images=base.images, max_side=base.max_side, on_bad_file=base.on_bad_file,
                                     num_classes=base.num_classes)
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
        dataset = self._dataset(split)
        return DataLoader(dataset, batch_size=batch, shuffle=train, sampler=None if train else each_image_once(dataset))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val" if "val" in self.images.datasets else "train", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def has_split(self, split: str) -> bool:
        return self.images.has_split(split)

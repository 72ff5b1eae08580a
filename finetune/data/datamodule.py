"""LightningDataModule over a :class:`DatasetIndex`: decode once, transform per epoch.

Small datasets (the common case here) are decoded once into memory, shrunk to at most twice the
input size, so an epoch costs only the albumentations transforms; larger ones are decoded per item
in worker processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.data.datasets import DatasetIndex, Sample
from finetune.data.images import BadImageError, load_image
from finetune.data.imbalance import balanced_sampler
from finetune.data.transforms import (
    Preprocessing,
    eval_transform,
    normalize_batch,
    not_uint8_error,
    train_transform,
)
from finetune.errors import FinetuneError
from finetune.multilabel import multi_hot

log = logging.getLogger(__name__)


def decode_side(pp: Preprocessing) -> int:
    """Decoded images keep at most twice the resize size: enough detail for any crop >= 1/4 of the
    area. Training, evaluation and prediction all decode this way, so they see the same pixels."""
    return 2 * pp.resize_size


class ImageListDataset(Dataset):
    """(image tensor, label) for a list of (path, label); decoded arrays are used when given.

    With ``on_bad_file="skip"`` a file that fails to load here (it changed or became unreadable after the
    data check) is logged by name and the next loadable sample takes its place, as the check would have
    left it out; otherwise the error names the file."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, images: Sequence[np.ndarray] | None = None,
                 max_side: int | None = None, on_bad_file: str = "error", num_classes: int | None = None,
                 uint8: bool = False):
        self.samples = list(samples)
        self.uint8 = uint8  # the transform leaves normalisation to the device: its output must stay uint8
        # task=multilabel: a sample's tuple of class indices becomes a 0/1 float vector of num_classes
        self.num_classes = num_classes
        self.transform = transform
        self.images = images
        self.max_side = max_side
        self.on_bad_file = on_bad_file
        self.failed: set[str] = set()  # per process: each loader worker keeps its own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            image, label = self.images[i], self.samples[i][1]
        else:
            image, label = self._load(i)
        if isinstance(label, tuple):
            if self.num_classes is None:
                raise ValueError("a multi-label sample needs the dataset's num_classes")
            label = multi_hot(label, self.num_classes)
        out = self.transform(image=image)["image"]
        if self.uint8 and out.dtype != torch.uint8:  # config.py refuses such a pipeline first; this is the backstop
            raise not_uint8_error(out.dtype)
        return out, label

    def _load(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self.samples)
        for j in range(i, i + n):
            path, label = self.samples[j % n]
            if path in self.failed:
                continue
            try:
                return load_image(path, self.max_side), label
            except BadImageError as e:
                if self.on_bad_file != "skip":
                    raise
                self.failed.add(path)
                log.warning("Skipping %s: %s (it passed the data check but fails now; data.on_bad_file=skip)",
                            path, e.reason)
        raise FinetuneError(f"None of the {n} images of this split can be read any more (e.g. {self.samples[i][0]}); "
                            f"check that the data is still there and readable.")


def each_image_once(dataset: Dataset) -> Sampler | None:
    """Under DDP, the sampler for scoring: each rank takes every world-size-th image, none repeated, so
    val/test metrics (torchmetrics and the logged loss, both summed over ranks) count every image exactly once.
    Lightning's default DistributedSampler pads the ranks' shares to equal length with repeated images; a
    rank may then run one batch fewer, which is safe in evaluation (no gradient, no buffer sync). None
    (Lightning's default) when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if len(dataset) < dist.get_world_size():
        raise FinetuneError(f"{len(dataset)} image(s) to score on {dist.get_world_size()} processes: every process "
                            f"needs at least one. Use fewer devices or more validation/test images.")
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)


def _seed_worker(worker_id: int) -> None:
    """Each loader worker: Lightning's seeding of torch/numpy/random, and its own augmentation seed
    (a copied albumentations pipeline would otherwise draw the same augmentations in every worker)."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None and hasattr(transform, "set_random_seed"):
        base = transform.seed if getattr(transform, "seed", None) is not None else 0
        transform.set_random_seed(int(base) * 1000 + worker_id + 1)


def decode_all(paths: Sequence[str], max_side: int, budget_bytes: float, chunk: int = 64,
               skip_bad: bool = False) -> list[np.ndarray | None] | None:
    """Decode every path; None as soon as the arrays would exceed ``budget_bytes``.

    With ``skip_bad`` a file that cannot be decoded is logged by name and its entry is None (the caller
    drops it); otherwise its :class:`BadImageError` propagates.

    The first ``chunk`` files are decoded in this thread and timed. Where a file takes under half a
    millisecond (small PNGs) the rest follow in this thread too: the decoder's Python side holds the
    GIL, and threads made 2000 28-px PNGs 1.7x slower on 2 cores. Larger files go over one thread per
    core, ``chunk`` files per task (2 threads: 1.9x faster on 1600x1200 JPEGs). Past the budget, the
    files not yet started are not decoded."""
    images: list[np.ndarray | None] = []
    used = 0

    def decode(path: str) -> np.ndarray | None:
        try:
            return load_image(path, max_side)
        except BadImageError as e:
            if not skip_bad:
                raise
            log.warning("Skipping %s: %s (it passed the data check but fails now; data.on_bad_file=skip)",
                        path, e.reason)
            return None

    def keep(decoded: list[np.ndarray | None]) -> bool:
        nonlocal used
        for image in decoded:
            if image is None:
                images.append(None)
                continue
            used += image.nbytes
            if used > budget_bytes:
                return False
            images.append(image)
        return True

    started = time.perf_counter()
    if not keep([decode(p) for p in paths[:chunk]]):
        return None
    runs = [paths[i : i + chunk] for i in range(chunk, len(paths), chunk)]
    workers = min(8, os.cpu_count() or 1, len(runs))
    if workers <= 1 or (time.perf_counter() - started) / max(1, len(images)) < 5e-4:
        return images if all(keep([decode(p) for p in run]) for run in runs) else None
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        if not all(keep(decoded) for decoded in pool.map(lambda run: [decode(p) for p in run], runs)):
            return None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return images


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        index: DatasetIndex,
        preprocessing: Preprocessing,
        augment: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        preload: bool | str = "auto",
        preload_max_gb: float = 2.0,
        seed: int | None = None,
        on_bad_file: str = "skip",
        sampler: str = "uniform",
        on_gpu: bool = False,
        processes_per_machine: int = 1,
        normalize_on_device: bool = False,
    ):
        super().__init__()
        # uint8 batches, normalised after the transfer to the device (on_after_batch_transfer below)
        self.normalize_on_device = normalize_on_device
        self.on_gpu = on_gpu  # the training steps run on a GPU: the CPU is free for loader workers meanwhile
        self.processes_per_machine = max(1, processes_per_machine)  # DDP ranks sharing this machine's cores
        self.sampler = sampler  # data.sampler: uniform | balanced (finetune/data/imbalance.py)
        self.on_bad_file = on_bad_file  # data.on_bad_file, for a file that fails after the data check passed it
        self.index = index
        self.preprocessing = preprocessing
        self.augment = augment
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.preload = preload
        self.preload_max_gb = preload_max_gb
        self.seed = seed  # the training augmentation's own generators (albumentations)
        self.num_workers_cfg = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.datasets: dict[str, ImageListDataset] = {}

    @property
    def max_side(self) -> int:
        return decode_side(self.preprocessing)

    def _decoded(self, samples: Sequence[Sample]) -> list[np.ndarray | None] | None:
        if self.preload is False or self.preload == "false":
            return None
        budget = self.preload_max_gb * 1024**3 if self.preload == "auto" else float("inf")
        images = decode_all([p for p, _ in samples], self.max_side, budget, skip_bad=self.on_bad_file == "skip")
        if images is None:
            log.info("Dataset larger than data.preload_max_gb=%s: decoding per item in workers.", self.preload_max_gb)
        return images

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, samples in self.index.splits.items():
            uint8 = self.normalize_on_device
            transform = (train_transform(self.preprocessing, self.augment, self.seed, uint8=uint8) if split == "train"
                         else eval_transform(self.preprocessing, uint8=uint8))
            images = self._decoded(samples)
            if images is not None and any(image is None for image in images):  # failed since the check: left out
                samples = [s for s, image in zip(samples, images) if image is not None]
                images = [image for image in images if image is not None]
            self.datasets[split] = ImageListDataset(samples, transform, images, self.max_side, self.on_bad_file,
                                                    len(self.index.classes) if self.index.multilabel else None,
                                                    uint8=uint8)
        preloaded = all(d.images is not None for d in self.datasets.values())
        self.num_workers = self._resolve_workers(preloaded)
        log.info(
            "Data: %s; decoded in memory: %s; loader workers: %d", self.index.summary(), preloaded, self.num_workers
        )

    def _resolve_workers(self, preloaded: bool) -> int:
        """data.num_workers=auto. On a CPU the training step uses every core, so preloaded images are transformed
        in-process (faster than crossing a worker's queue) and streamed files get a few workers. On a GPU the
        cores are idle while the GPU steps, and decoding and augmentation are CPU work: the GPU waited on the
        loader with 0 workers (173 images/s at 224 px on an H200, BENCHMARKS.md), so workers take this process's
        share of the cores, preloaded or not."""
        if self.num_workers_cfg != "auto":
            return int(self.num_workers_cfg)
        share = max(1, (os.cpu_count() or 2) // self.processes_per_machine - 1)
        if self.on_gpu:
            return min(8, share)
        return 0 if preloaded else min(4, share)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.datasets[split]
        batch = self.batch_size if train else self.eval_batch_size
        if not train:
            sampler = each_image_once(dataset)
        elif self.sampler == "balanced":
            sampler = balanced_sampler([y for _, y in dataset.samples], int(self.seed or 0))
        else:
            sampler = None  # shuffled
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(dataset) > batch,  # a batch of 1 breaks BatchNorm in train mode
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_seed_worker if train and self.num_workers > 0 else None,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With data.normalize_on_device the loaders yield uint8 pixels: Lightning hands each batch here once it
        is on the training device, and it becomes the network's float input (timm's prefetching loader does the
        same). This datamodule's hook, not the module's: it knows the format its loaders yield."""
        images = batch[0]
        if self.normalize_on_device and isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            return type(batch)([normalize_batch(images, self.preprocessing), *batch[1:]])
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        # No validation split: the loop scores the training images (evaluation transform), and the
        # module logs them as train_eval/*, never as val/* (prepare.without_validation).
        return self._loader("val" if "val" in self.datasets else "train", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def has_split(self, split: str) -> bool:
        return split in self.index.splits

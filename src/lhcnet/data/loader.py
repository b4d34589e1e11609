"""``BatchLoader``: model-ready batches from uint8 faces held in memory on the training device.

FER2013 is 83 MB as uint8 48x48 (the paper's 224-px JPEG training set 1.44 GB), so the whole set
sits on the device when it fits (``placement.place_images``); each batch is gathered, resized,
augmented and replicated to RGB there. No worker processes, no disk, no JPEG decoding per epoch.
The loader never copies its images: loaders over the same array (a stage's training loader and
its acceptance-rule loader) share it.

Order of operations per batch: gather uint8 -> bilinear resize to ``size`` (one channel) ->
augment (one channel) -> replicate to 3 channels. Every step is per channel, so this equals
``augment(to_model_input(x, size))`` at a third of the cost.

Determinism: shuffling is a function of (seed, epoch) and augmentation of (seed, epoch, rank),
set with ``set_epoch`` (call it every epoch, as with ``DistributedSampler``); a resumed run that
calls ``set_epoch(e)`` gets exactly the batches of epoch ``e``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..seeds import derive_seed
from .augment import AugmentConfig, augment
from .crop import centre_crop
from .dataset import FaceDataset
from .placement import place_images
from .preprocess import grey_to_rgb, resize

__all__ = ["BatchLoader"]


class BatchLoader:
    """Yields ``(x, y)``: x float32 ``(B, 3, size, size)`` in 0..255 on ``device``; y int64 ``(B,)``
    labels, or float32 ``(B, K)`` when ``soft_labels`` is given (an array, or True to take the
    data set's FER+ vote distributions). Without labels y is -1.

    ``rank``/``world_size`` shard the (shuffled) order like ``DistributedSampler``: the order is
    padded by repeating its start so every rank gets ``num_samples`` indices. The images are
    used in place (``place_images``: on ``device`` when they fit, else pinned on the host, each
    batch then copied over without blocking). ``channels_last``: batches in that memory format.
    ``crop``: every batch is the centre crop of ``crop`` px (of the 48-px face) resized back to
    ``size``, the evaluation view of a model trained on random crops (``augment.crop``).
    """

    def __init__(self, dataset_or_images: FaceDataset | np.ndarray | torch.Tensor,
                 labels: np.ndarray | torch.Tensor | None = None, *, batch_size: int, size: int,
                 shuffle: bool = False, augment: AugmentConfig | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False,
                 soft_labels: np.ndarray | torch.Tensor | bool | None = None, crop: int = 0) -> None:
        if isinstance(dataset_or_images, FaceDataset):
            images = dataset_or_images.images
            labels = dataset_or_images.labels if labels is None else labels
            if soft_labels is True:
                soft_labels = dataset_or_images.soft_labels
                if soft_labels is None:
                    raise ValueError("soft_labels=True, but the data set has none (use FER+ labels)")
        else:
            images = dataset_or_images
        if soft_labels is True:
            raise ValueError("soft_labels=True needs a FaceDataset; pass the (N, K) array instead")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, "
                             f"{rank}, {world_size}")
        self.device = torch.device(device)
        self.images = place_images(images, self.device)  # shared, never written
        targets = soft_labels if soft_labels is not None else labels
        if targets is None:
            self.targets = torch.full((len(images),), -1, dtype=torch.int64, device=self.device)
        else:
            dtype = torch.float32 if soft_labels is not None else torch.int64
            targets = targets if isinstance(targets, torch.Tensor) else np.asarray(targets)
            self.targets = torch.as_tensor(targets, dtype=dtype).to(self.device)
        if len(self.targets) != len(self.images):
            raise ValueError(f"{len(self.targets)} labels for {len(self.images)} images")
        self.batch_size, self.size, self.shuffle = batch_size, size, shuffle
        self.augment = augment if augment is not None and augment.active else None
        self.crop = crop  # evaluation of a model trained on crops: the centre crop (lhcnet.data.crop)
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0
        self.num_samples = math.ceil(len(self.images) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch, in batch order (on the CPU)."""
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # pad by repeating the start, as DistributedSampler does
            order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank:total:self.world_size]

    def generator(self) -> torch.Generator:
        """A fresh augmentation generator for the current (seed, epoch, rank), on the device."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.seed, self.epoch, self.rank, 1))
        return generator

    def __iter__(self):
        order = self.indices()
        on_device = self.images.device == self.device
        device_order = order.to(self.device)
        generator = self.generator()
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if on_device:
                pixels = self.images[device_order[batch]]
            else:  # pinned host images: gather there, copy the batch's uint8 pixels over
                pixels = self.images[order[batch]].pin_memory().to(self.device, non_blocking=True)
            x = resize(pixels, self.size)  # (B, 1, size, size) float
            if self.crop:
                x = centre_crop(x, self.crop)
            if self.augment is not None:
                x = augment(x, self.augment, generator)
            yield grey_to_rgb(x, self.memory_format), self.targets[device_order[batch]]

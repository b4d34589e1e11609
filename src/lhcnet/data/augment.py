"""Keras ``ImageDataGenerator`` augmentation on whole batches (spec §5).

Per image, as Keras draws it: rotation uniform in ±``rotation`` degrees, shifts uniform in
±``shift``·width and ±``shift``·height pixels (fractional), zoom ``zx`` and ``zy`` drawn
independently from U[1-``zoom``, 1+``zoom``] (so the aspect ratio changes), then a horizontal flip
with probability 0.5. Keras composes rotation · shift · zoom about the centre and samples
bilinearly (order 1) with ``fill_mode='nearest'``; here that is one matrix per image and one
batched ``warp``. Random numbers come from the caller's ``torch.Generator``, so a batch is a
function of the generator's state (seeded per epoch by ``BatchLoader``).

The paper's stages: stage 1 ``AugmentConfig(rotation=30, flip=True)``, stage 2
``AugmentConfig(rotation=10, shift=0.1, zoom=0.1, flip=True)``, later stages none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .warp import rotation_matrix, translation_matrix, warp, zoom_matrix

__all__ = ["AugmentConfig", "augment", "random_matrices"]


@dataclass(frozen=True)
class AugmentConfig:
    """``ImageDataGenerator(rotation_range, width/height_shift_range, zoom_range, horizontal_flip)``."""

    rotation: float = 0.0  # degrees
    shift: float = 0.0  # fraction of the image size
    zoom: float = 0.0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.rotation < 0 or self.shift < 0 or not 0 <= self.zoom < 1:
            raise ValueError(f"augmentation ranges must be >= 0 (zoom < 1), got {self}")

    @property
    def active(self) -> bool:
        return bool(self.rotation or self.shift or self.zoom or self.flip)


def random_matrices(config: AugmentConfig, batch: int, h: int, w: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image warp matrices float64 ``(B, 3, 3)`` and flip flags bool ``(B,)``.

    Always draws the same 6 numbers per image, so a batch's randomness does not depend on which
    ranges are zero. Returned on the generator's device.
    """
    u = torch.rand((batch, 6), generator=generator, device=generator.device, dtype=torch.float64)
    sym = 2 * u - 1  # uniform in [-1, 1)
    angle = sym[:, 0] * math.radians(config.rotation)
    dx, dy = sym[:, 1] * config.shift * w, sym[:, 2] * config.shift * h
    zx, zy = 1 + sym[:, 3] * config.zoom, 1 + sym[:, 4] * config.zoom
    matrix = rotation_matrix(angle, h, w) @ translation_matrix(dx, dy) @ zoom_matrix(zx, zy, h, w)
    flip = (u[:, 5] < 0.5) & config.flip
    return matrix, flip


def augment(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment float ``(B, C, S, S)`` images (any C; grey is best augmented before replication)."""
    if not config.active:
        return batch
    _, _, h, w = batch.shape
    matrix, flip = random_matrices(config, len(batch), h, w, generator)
    out = warp(batch, matrix.to(batch.device))
    flip = flip.to(batch.device)[:, None, None, None]
    return torch.where(flip, out.flip(-1), out)

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

Not in the paper, for the long recipes of the compact models (each off by default, and drawn from
the generator only when on, after the six Keras numbers, so the paper's batches are unchanged):

- ``crop``: a random square crop of ``crop`` px of the 48-px face, resized back to the input
  size (``lhcnet.data.crop``), **before** the affine warp (so a crop-and-rotate batch is resampled
  twice); evaluation then uses the centre crop, and the matched TTA is ten-crop.
- ``erase``: random erasing (Zhong et al. 2017, arXiv 1708.04896; ``torchvision``'s
  ``RandomErasing`` ranges) with probability ``erase`` per image, **last**: a rectangle of
  2-33 % of the image area with aspect ratio in [0.3, 3.3] (log-uniform) at a uniform position,
  filled with uniform noise in 0..255 (the paper's best variant, RE-R). Drawn once, not retried
  as torchvision does: a side longer than the image is clipped to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .crop import random_crop
from .warp import rotation_matrix, translation_matrix, warp, zoom_matrix

__all__ = ["AugmentConfig", "augment", "random_matrices", "random_erasing", "ERASE_AREA", "ERASE_ASPECT"]

ERASE_AREA = (0.02, 0.33)   # fraction of the image area (torchvision RandomErasing's scale)
ERASE_ASPECT = (0.3, 3.3)   # height / width, drawn log-uniformly


@dataclass(frozen=True)
class AugmentConfig:
    """``ImageDataGenerator(rotation_range, width/height_shift_range, zoom_range, horizontal_flip)``,
    plus a random crop and random erasing (module docstring); the recipe's ``augment`` table."""

    rotation: float = 0.0  # degrees, uniform in +-rotation
    shift: float = 0.0     # fraction of the image size, uniform in +-shift, x and y
    zoom: float = 0.0      # zx, zy independently uniform in [1 - zoom, 1 + zoom]
    flip: bool = False     # horizontal flip with probability 0.5
    crop: int = 0          # random crop of this many px of the 48-px face, resized back; 0: none
    erase: float = 0.0     # random-erasing probability per image

    def __post_init__(self) -> None:
        if self.rotation < 0 or self.shift < 0 or not 0 <= self.zoom < 1:
            raise ValueError(f"augmentation ranges must be >= 0 (zoom < 1), got {self}")
        if not 0 <= self.crop <= 48 or not 0 <= self.erase <= 1:
            raise ValueError(f"crop must be 0..48 px and erase a probability 0..1, got {self}")

    @property
    def active(self) -> bool:
        return bool(self.rotation or self.shift or self.zoom or self.flip or self.crop or self.erase)

    @property
    def warps(self) -> bool:
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


def random_erasing(batch: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """With ``probability`` per image, one rectangle (``ERASE_AREA``, ``ERASE_ASPECT``) filled with
    uniform noise in 0..255, the same in every channel; the rest of the image is unchanged."""
    b, c, h, w = batch.shape
    u = torch.rand((b, 5), generator=generator, device=generator.device, dtype=torch.float64)
    area = h * w * (ERASE_AREA[0] + u[:, 0] * (ERASE_AREA[1] - ERASE_AREA[0]))
    aspect = torch.exp(math.log(ERASE_ASPECT[0]) + u[:, 1] * math.log(ERASE_ASPECT[1] / ERASE_ASPECT[0]))
    height = torch.sqrt(area * aspect).round().clamp(1, h)
    width = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (u[:, 2] * (h - height + 1)).floor()
    left = (u[:, 3] * (w - width + 1)).floor()
    rows = torch.arange(h, dtype=torch.float64, device=generator.device)
    cols = torch.arange(w, dtype=torch.float64, device=generator.device)
    inside = (((rows >= top[:, None]) & (rows < (top + height)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + width)[:, None]))[:, None, :])  # (B, H, W)
    inside &= (u[:, 4] < probability)[:, None, None]
    noise = 255 * torch.rand((b, 1, h, w), generator=generator, device=generator.device)
    return torch.where(inside[:, None].to(batch.device), noise.to(batch.device, batch.dtype), batch)


def augment(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment float ``(B, C, S, S)`` images (any C; grey is best augmented before replication):
    random crop, then the Keras warp and flip, then random erasing (each only when configured)."""
    if not config.active:
        return batch
    _, _, h, w = batch.shape
    matrix, flip = random_matrices(config, len(batch), h, w, generator)
    out = random_crop(batch, config.crop, generator) if config.crop else batch
    if config.warps:
        out = warp(out, matrix.to(batch.device))
        flip = flip.to(batch.device)[:, None, None, None]
        out = torch.where(flip, out.flip(-1), out)
    return random_erasing(out, config.erase, generator) if config.erase else out

"""The paper's preprocessing (spec §5 "Data preparation"): grey 48x48 -> RGB ``size`` x ``size``.

``to_model_input`` is the one preprocessing of training, evaluation, TTA and prediction: bilinear
resize with half-pixel centres (``tf.image.resize``'s convention, which is
``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``), grey replicated to
three channels, values kept in 0..255 (the models normalise internally).

``paper_jpeg`` is the training-set round trip of the original ETL: resize, floor to uint8, save
as JPEG quality 100 with 4:4:4 subsampling, read back. Validation and test images stay float.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["resize", "grey_to_rgb", "to_model_input", "resize_uint8", "paper_jpeg",
           "jpeg_roundtrip"]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8/float ``(B, H, W)`` or ``(B, C, H, W)`` -> float32 ``(B, C, size, size)``, bilinear."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    if x.dim() != 4:
        raise ValueError(f"expected images (B, H, W) or (B, C, H, W), got shape {tuple(images.shape)}")
    x = x.float()
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def grey_to_rgb(images: torch.Tensor,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, 3, H, W)`` by replication, in ``memory_format`` (e.g.
    ``torch.channels_last``); three-channel input is only laid out in that format."""
    if images.shape[1] == 3:
        return images.contiguous(memory_format=memory_format)
    if images.shape[1] != 1:
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    return images.expand(-1, 3, -1, -1).contiguous(memory_format=memory_format)


def to_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey uint8/float ``(B, H, W)`` or ``(B, 1, H, W)`` -> float32 ``(B, 3, size, size)``, 0..255.

    No resampling when the images are already ``size`` x ``size`` (native-resolution models).
    """
    return grey_to_rgb(resize(images, size))


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(N, H, W)`` -> uint8 ``(N, size, size)`` with the same bilinear resize, rounded."""
    if images.shape[1:] == (size, size):
        return images
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for start in range(0, len(images), 1024):
        x = resize(torch.from_numpy(np.asarray(images[start:start + 1024])), size)[:, 0]
        out[start:start + len(x)] = x.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def jpeg_roundtrip(image: np.ndarray, quality: int = 100) -> np.ndarray:
    """Encode a uint8 grey image as JPEG (4:4:4) with Pillow and decode it again.

    A grey image is stored as one-channel JPEG: for R = G = B, libjpeg's RGB->YCbCr gives Y = the
    grey value and constant chroma exactly, so the decoded RGB channels equal this (tested).
    """
    buffer = io.BytesIO()
    grey = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))  # 2-D uint8 -> mode 'L'
    grey.save(buffer, format="JPEG", quality=quality, subsampling=0)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"), dtype=np.uint8)


def paper_jpeg(images: np.ndarray, size: int, quality: int = 100, workers: int | None = None,
               out: np.ndarray | torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
    """The paper's training-set ETL (spec §5): uint8 ``(N, H, W)`` -> uint8 ``(N, size, size)``.

    Bilinear resize to ``size``, floor to uint8 (the paper argues this moves the training mean by
    -0.5 towards validation/test), JPEG quality 100 4:4:4, decode. Pillow releases the GIL while
    coding, so a thread pool uses every core. ``out``: a uint8 ``(N, size, size)`` array or tensor
    (on any device, e.g. the GPU) filled block by block, so the host never holds the whole set.
    """
    if out is None:
        out = np.empty((len(images), size, size), dtype=np.uint8)
    if tuple(out.shape) != (len(images), size, size):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(len(images), size, size)}")
    workers = workers or min(8, os.cpu_count() or 1)
    chunk = 128  # 128 float images at 224 px: 26 MB of working memory next to the 1.44 GB result
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(images), chunk):
            x = resize(torch.as_tensor(np.asarray(images[start:start + chunk])), size)[:, 0]
            floored = x.floor_().clamp_(0, 255).to(torch.uint8).numpy()
            block = np.stack(list(pool.map(lambda a: jpeg_roundtrip(a, quality), floored)))
            out[start:start + len(block)] = torch.from_numpy(block) if isinstance(out, torch.Tensor) else block
    return out

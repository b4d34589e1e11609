"""``warp``: the one geometric primitive of augmentation (Keras, spec §5) and TTA (spec §6).

A transform is a 3x3 matrix in pixel coordinates (x right, y down, origin at the centre of the
top-left pixel) that maps each OUTPUT pixel to the INPUT point it samples, the inverse mapping of
``scipy.ndimage.affine_transform`` / Keras ``apply_affine_transform`` / ``tfa.image.transform``.
Matrices compose by ``@``: ``A @ B`` first applies B to the output coordinate, then A.

Sampling is bilinear with ``fill_mode='nearest'`` (edge pixels replicated), done for a whole
batch by one ``affine_grid`` + ``grid_sample`` on whatever device the batch is on.

Horizontal flips: ``hflip_matrix`` exists for composing TTA views, but ``augment`` flips with
``Tensor.flip`` after the warp (exact, and Keras flips after its affine transform too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["warp", "rotation_matrix", "translation_matrix", "zoom_matrix", "hflip_matrix"]

Number = float | torch.Tensor


def _matrix(m00: Number, m01: Number, m02: Number, m10: Number, m11: Number, m12: Number
            ) -> torch.Tensor:
    """float64 ``(..., 3, 3)`` affine matrices from broadcastable entries of the top two rows."""
    entries = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64)
                                        for v in (m00, m01, m02, m10, m11, m12)))
    zero, one = torch.zeros_like(entries[0]), torch.ones_like(entries[0])
    return torch.stack([*entries, zero, zero, one], dim=-1).unflatten(-1, (3, 3))


def rotation_matrix(angle: Number, h: int, w: int) -> torch.Tensor:
    """Rotation by ``angle`` radians counter-clockwise as displayed, about the image centre.

    Same matrix as ``tfa.image.rotate`` (centre ((w-1)/2, (h-1)/2)). Keras 2.4's
    ``ImageDataGenerator`` turns about (h/2+0.5, w/2+0.5), one pixel off-centre; for a random
    rotation that only adds a sub-pixel shift, so the true centre is used.
    """
    angle = torch.as_tensor(angle, dtype=torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return _matrix(cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def translation_matrix(dx: Number, dy: Number) -> torch.Tensor:
    """Content moves ``dx`` pixels right and ``dy`` down (``tfa.image.translate([dx, dy])``)."""
    dx, dy = torch.as_tensor(dx, dtype=torch.float64), torch.as_tensor(dy, dtype=torch.float64)
    return _matrix(1.0, 0.0, -dx, 0.0, 1.0, -dy)


def zoom_matrix(zx: Number, zy: Number, h: int, w: int) -> torch.Tensor:
    """Keras zoom about the centre: output pixel p samples ``c + z (p - c)``.

    So ``z > 1`` shows more of the image (content shrinks) and ``z < 1`` magnifies, as in
    ``ImageDataGenerator(zoom_range=...)``; ``tf.image.central_crop(0.9)`` + resize is ``z = 0.9``.
    """
    zx, zy = torch.as_tensor(zx, dtype=torch.float64), torch.as_tensor(zy, dtype=torch.float64)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return _matrix(zx, 0.0, cx - zx * cx, 0.0, zy, cy - zy * cy)


def hflip_matrix(w: int) -> torch.Tensor:
    """Mirror left-right: output column x samples input column w-1-x."""
    return _matrix(-1.0, 0.0, w - 1.0, 0.0, 1.0, 0.0)


def _pixel_to_grid(h: int, w: int) -> torch.Tensor:
    """Pixel coordinates -> ``grid_sample``'s [-1, 1] coordinates with ``align_corners=False``:
    pixel centre x sits at (2x + 1) / w - 1 (the image edges at -1 and 1)."""
    return _matrix(2.0 / w, 0.0, 1.0 / w - 1.0, 0.0, 2.0 / h, 1.0 / h - 1.0)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)`` as two outer sums: the grid is
    separable in x and y, and this is 3-4x faster than the batched matmul on a CPU."""
    u = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1  # (W,)
    v = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1  # (H,)
    along_x = theta[:, :, 0, None] * u  # (B, 2, W)
    along_y = theta[:, :, 1, None] * v + theta[:, :, 2, None]  # (B, 2, H)
    return (along_x[:, :, None, :] + along_y[:, :, :, None]).permute(0, 2, 3, 1).contiguous()


def warp(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample ``(B, C, H, W)`` images through ``matrix`` (``(3, 3)`` or ``(B, 3, 3)``).

    Returns float images of the same shape. Images whose matrix is exactly the identity come back
    unchanged (bit-exact), the others bilinear with edge replication.
    """
    x = images if images.is_floating_point() else images.float()
    b, _, h, w = x.shape
    m = torch.as_tensor(matrix, dtype=torch.float64).to(x.device)
    m = m.expand(b, 3, 3) if m.dim() == 2 else m
    identity = (m == torch.eye(3, dtype=m.dtype, device=m.device)).all(dim=2).all(dim=1)
    if bool(identity.all()):
        return x.clone()
    to_grid = _pixel_to_grid(h, w).to(x.device)
    theta = (to_grid @ m @ torch.linalg.inv(to_grid))[:, :2].to(x.dtype)  # (B, 2, 3)
    grid = _affine_grid(theta, h, w)  # (B, H, W, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if bool(identity.any()):
        out[identity] = x[identity]
    return out

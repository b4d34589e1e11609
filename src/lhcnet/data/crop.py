"""Square crops resized back to the input size: training's random crops and the ten-crop TTA.

Not in the paper (its models see whole faces): the crops of the from-scratch FER2013 CNNs that
reach ~72-73 % (e.g. Khaireddin & Chen 2021, arXiv 2105.03588: random 40-px crops of the 48-px
face in training, ten-crop at test). Here a crop is given in pixels of the 48-px face, and it is
**resized back to the model's input size** S (bilinear, half-pixel centres: the shared
``preprocess.resize``), so a model keeps its input size and sees the face magnified by 48 / crop.
At S the crop's side is ``round(crop * S / 48)``; the crop is cut from the model input (after the
48 -> S resize), as TTA views are, so at S = 48 (the compact models) a crop is resampled once.

Crops are cut by indexing, not by ``warp``: a view equals slicing the image and resizing the slice
(``torchvision``'s ``five_crop`` + ``resize``), and the outermost ring clamps to the crop's own
edge. Positions follow ``torchvision.transforms.functional.five_crop``: the four corners and the
centre at ``round((S - side) / 2)``. Training draws the top-left corner uniformly from the
``(S - side + 1)^2`` integer positions; evaluation without TTA uses the centre crop.
"""
from __future__ import annotations

import torch

from .fer2013 import SIDE as FACE_SIZE
from .preprocess import resize

__all__ = ["FACE_SIZE", "CROP_POSITIONS", "crop_side", "crop_offsets", "crop_resize", "centre_crop",
           "random_crop"]

CROP_POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")  # five_crop's order


def crop_side(crop: int, size: int) -> int:
    """Side at model input size ``size`` of a crop of ``crop`` pixels of the 48-px face."""
    side = round(crop * size / FACE_SIZE)
    if not 1 <= side <= size:
        raise ValueError(f"a crop of {crop} px of the {FACE_SIZE}-px face does not fit an input of "
                         f"{size} px (1..{FACE_SIZE} px)")
    return side


def crop_offsets(position: str, size: int, side: int) -> tuple[int, int]:
    """(top, left) of the crop at ``position`` (one of ``CROP_POSITIONS``), as ``five_crop``."""
    far = size - side
    offsets = {"top-left": (0, 0), "top-right": (0, far), "bottom-left": (far, 0),
               "bottom-right": (far, far), "centre": (int(round(far / 2.0)), int(round(far / 2.0)))}
    if position not in offsets:
        raise ValueError(f"unknown crop position {position!r}; expected one of {', '.join(CROP_POSITIONS)}")
    return offsets[position]


def crop_resize(x: torch.Tensor, top: int | torch.Tensor, left: int | torch.Tensor,
                side: int) -> torch.Tensor:
    """The ``side`` x ``side`` windows at (top, left) of ``(B, C, S, S)`` images, resized to S.

    ``top`` / ``left``: one position for the batch (ints) or one per image (int tensors ``(B,)``).
    """
    b, _, h, w = x.shape
    if isinstance(top, int) and isinstance(left, int):
        crops = x[:, :, top:top + side, left:left + side]
    else:
        steps = torch.arange(side, device=x.device)
        rows = torch.as_tensor(top, device=x.device).expand(b)[:, None] + steps  # (B, side)
        cols = torch.as_tensor(left, device=x.device).expand(b)[:, None] + steps
        crops = x[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        crops = crops.permute(0, 3, 1, 2)  # (B, side, side, C) -> (B, C, side, side)
    if crops.shape[-2:] != (side, side):
        raise ValueError(f"crop ({top}, {left}) of side {side} does not fit images {h}x{w}")
    return resize(crops, h)


def centre_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """Evaluation's view of a model trained on crops: the centre crop, resized back to S."""
    size = x.shape[-1]
    side = crop_side(crop, size)
    return crop_resize(x, *crop_offsets("centre", size, side), side)


def random_crop(x: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """Training's random crop: per image a uniform top-left corner, the crop resized back to S."""
    size = x.shape[-1]
    side = crop_side(crop, size)
    corner = torch.randint(0, size - side + 1, (2, len(x)), generator=generator, device=generator.device)
    return crop_resize(x, corner[0].to(x.device), corner[1].to(x.device), side)

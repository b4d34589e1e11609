"""Test-time augmentation (TTA) as in LHC-Net's evaluation (``docs/lhc-spec.md`` §6).

The authors' ``Lib/Utils.py: TTA_Inference`` averages the softmax output of 60 views of each test
image: the identity with weight 3, then

- batch 1: rotation {0, +0.4, -0.4} rad x dx {0, +10, -10} px x dy {0, +10, -10} px x flip
  {no, yes}, without the identity: 53 views;
- batch 2: zoom 0.9 x rotation {0, +0.15, -0.15} rad x flip: 6 views;

each with weight 1, so the score is ``(3 p_id + sum of 59 p_t) / 62`` and the class its argmax.
Inside a view the operations run in the order flip -> zoom (``tf.image.central_crop(0.9)``, the
central 202x202 of 224, resized back bilinearly) -> translate (``tfa.image.translate``: content
moves by +dx right, +dy down) -> rotate (``tfa.image.rotate``: counter-clockwise as displayed,
about the image centre), bilinear with fill 'nearest' (border replicate). The views are made from
the model input (after the 48 -> S resize), as in the original; shifts are given at 224 px and
scale with the model's input size S (10 px at 224 is 10 * 48 / 224 = 2.14 px at 48); the crop is
computed at S as ``central_crop`` does (offset ``int(0.05 S)``: 11 at 224, 2 at 48).

Resampling with the shared ``lhcnet.data.warp``: the steps are applied **sequentially**, one warp
per step, not composed into one matrix per view, because composing changes the result noticeably:
each step of the original clamps to the border of *its own* input, so content that a translation
pushes out of the frame is lost before the rotation (a composed map would bring it back into the
rotated corners), the rotation of a zoomed view replicates the crop's border rather than showing
the area outside the crop, and batch 2 is interpolated twice (zoom, then rotate). Measured on 16
PrivateTest faces at 224 px, one composed matrix would move 3.6% of the pixels of the shift+rotate
views and 4.5% of the zoom+rotate views by more than 2 grey levels (up to 200 in the corners);
views with a single resampling step are identical either way.

The flip is folded into a view's first resampling step (or warped alone): a mirror maps the pixel
grid and the clamping interval onto themselves, so folding it in changes nothing. The one
approximation: the zoom samples the full image, so its outermost output row and column blend in
about 0.05 of the pixel just outside the crop where ``tf.image.resize`` of the cropped image would
clamp to the crop's edge (at most 5% of one neighbouring pixel difference, on the outermost ring).

All views of a batch go through the model as one batched forward (``tta_predict``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .data import hflip_matrix, rotation_matrix, translation_matrix, warp, zoom_matrix

__all__ = ["View", "REFERENCE_SIZE", "paper_views", "VIEW_SETS", "select_views", "central_crop_box",
           "view_steps", "make_views", "tta_predict", "total_weight"]

REFERENCE_SIZE = 224     # the resolution at which the paper's pixel shifts are given
IDENTITY_WEIGHT = 3.0
BATCH1_ANGLES = (0.0, 0.4, -0.4)
BATCH1_SHIFTS = (0.0, 10.0, -10.0)
BATCH2_ZOOM = 0.9
BATCH2_ANGLES = (0.0, 0.15, -0.15)


@dataclass(frozen=True)
class View:
    """One TTA view: flip, then central-crop zoom, then translate (px at 224), then rotate (rad)."""

    flip: bool = False
    zoom: float = 1.0      # central_crop fraction; 1 = no zoom
    dx: float = 0.0        # content moves right by dx (px at 224)
    dy: float = 0.0        # content moves down by dy (px at 224)
    angle: float = 0.0     # radians, counter-clockwise as displayed
    weight: float = 1.0

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.zoom == 1.0 and self.dx == 0 and self.dy == 0 and self.angle == 0

    def describe(self) -> str:
        parts = (["flip"] if self.flip else []) + ([f"zoom {self.zoom:g}"] if self.zoom != 1.0 else [])
        parts += [f"dx {self.dx:+g}"] if self.dx else []
        parts += [f"dy {self.dy:+g}"] if self.dy else []
        parts += [f"rot {self.angle:+g}"] if self.angle else []
        return " ".join(parts) or "identity"


def paper_views() -> tuple[View, ...]:
    """The 60 views of spec §6 in the original's loop order: identity (weight 3), batch 1, batch 2."""
    views = [View(weight=IDENTITY_WEIGHT)]
    for angle in BATCH1_ANGLES:
        for dx in BATCH1_SHIFTS:
            for dy in BATCH1_SHIFTS:
                for flip in (False, True):
                    view = View(flip=flip, dx=dx, dy=dy, angle=angle)
                    if not view.is_identity:
                        views.append(view)
    for angle in BATCH2_ANGLES:
        for flip in (False, True):
            views.append(View(flip=flip, zoom=BATCH2_ZOOM, angle=angle))
    return tuple(views)


def _light_order(views: Sequence[View]) -> list[View]:
    """Views in the order a lighter subset takes them: identity, plain flip, batch 2 (zoom), then
    batch 1's pure shifts, then its rotations; the paper's order within each group."""
    def rank(view: View) -> int:
        if view.is_identity:
            return 0
        if view.zoom == 1.0 and not (view.dx or view.dy or view.angle):
            return 1
        if view.zoom != 1.0:
            return 2
        return 3 if view.angle == 0 else 4
    return sorted(views, key=rank)  # stable: keeps the paper's order within a group


# Named subsets for ``--tta-views``: name -> number of views taken in ``_light_order``.
VIEW_SETS: dict[str, int] = {"paper": 60, "zoom": 8, "flip": 2, "none": 1}


def select_views(spec: str | int | None = "paper") -> tuple[View, ...]:
    """The paper's views, or a lighter subset: a name of ``VIEW_SETS`` ("paper" 60, "zoom" 8 =
    identity, flip and the 6 zoom views, "flip" 2, "none" 1) or a count N (1..60): the first N of
    identity, flip, zoom views, shifts, rotations. The identity keeps weight 3, the others 1."""
    if spec is None:
        spec = "paper"
    if isinstance(spec, str) and not spec.strip().isdigit():
        if spec not in VIEW_SETS:
            raise ValueError(f"unknown TTA view set {spec!r}; use a count 1..60 or one of "
                             f"{sorted(VIEW_SETS)}")
        count = VIEW_SETS[spec]
    else:
        count = int(spec)
    views = paper_views()
    if not 1 <= count <= len(views):
        raise ValueError(f"TTA view count must be 1..{len(views)}, got {count}")
    if count == len(views):
        return views
    return tuple(_light_order(views)[:count])


def central_crop_box(size: int, fraction: float) -> tuple[int, int]:
    """(offset, crop size) of ``tf.image.central_crop``: 224, 0.9 -> (11, 202); 48, 0.9 -> (2, 44)."""
    offset = int((size - size * fraction) / 2)
    return offset, size - 2 * offset


def view_steps(view: View, size: int) -> list[torch.Tensor | None]:
    """The view's warp matrices (output -> input, 3x3) for the steps zoom, translate, rotate at
    input size ``size``; None where a step is the identity. The flip is folded into the first step
    (or is the only one)."""
    scale = size / REFERENCE_SIZE
    steps: list[torch.Tensor | None] = [None, None, None]
    if view.zoom != 1.0:
        _, crop = central_crop_box(size, view.zoom)
        steps[0] = zoom_matrix(crop / size, crop / size, size, size)
    if view.dx or view.dy:
        steps[1] = translation_matrix(view.dx * scale, view.dy * scale)
    if view.angle:
        steps[2] = rotation_matrix(view.angle, size, size)
    if view.flip:
        first = next((i for i, m in enumerate(steps) if m is not None), 0)
        # The mirrored image is the first step's input: F @ M maps output -> step input -> original.
        step = steps[first] if steps[first] is not None else torch.eye(3, dtype=torch.float64)
        steps[first] = hflip_matrix(size) @ step
    return steps


def make_views(x: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """All views of a batch ``(B, C, S, S)`` -> ``(V * B, C, S, S)``, view-major (view v of image b
    at index ``v * B + b``). Each step is one ``warp`` over every view that has it."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"TTA expects square model input (B, C, S, S), got {tuple(x.shape)}")
    batch, size = x.shape[0], x.shape[-1]
    out = x.repeat(len(views), 1, 1, 1)
    plans = [view_steps(view, size) for view in views]
    for step in range(3):
        chosen = [v for v, plan in enumerate(plans) if plan[step] is not None]
        if not chosen:
            continue
        rows = (torch.tensor(chosen, device=x.device)[:, None] * batch
                + torch.arange(batch, device=x.device)).flatten()
        matrices = torch.stack([plans[v][step] for v in chosen]).to(x.device)
        out[rows] = warp(out[rows], matrices.repeat_interleave(batch, dim=0))
    return out


@torch.no_grad()
def tta_predict(model: nn.Module, x: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """Weighted mean of the softmax probabilities over the views, ``(B, K)``; one forward pass."""
    if not views:
        raise ValueError("TTA needs at least one view")
    batch = make_views(x, views).contiguous(memory_format=torch.channels_last)  # ~1.5x faster on CPU
    probs = torch.softmax(model(batch).float(), dim=1)                   # (V * B, K)
    probs = probs.view(len(views), x.shape[0], -1)                        # (V, B, K)
    weights = torch.tensor([v.weight for v in views], dtype=probs.dtype, device=probs.device)
    return torch.einsum("v,vbk->bk", weights, probs) / weights.sum()


def total_weight(views: Sequence[View]) -> float:
    """Sum of the view weights (62 for the paper's views)."""
    return math.fsum(v.weight for v in views)

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

The flip is exact (``Tensor.flip`` of the input, before any other step; a warp through the mirror
matrix would be off by up to ~4e-3 grey levels). The one approximation: the zoom samples the full
image, so its outermost output row and column blend in about 0.05 of the pixel just outside the
crop where ``tf.image.resize`` of the cropped image would clamp to the crop's edge (at most 5% of
one neighbouring pixel difference, on the outermost ring).

All views of a batch go through the model as one batched forward (``tta_predict``).

**A TTA must match the training augmentation** (the paper's ±23° rotations cost our models about
a point, docs/results.md). Besides the paper's views, ``VIEW_SETS`` names the matched sets:
``flip`` (identity + mirror, equal weights) for models trained with flips, and ``ten-crop`` (the
four corners and the centre at the training crop size, each also mirrored; ``torchvision``'s
``ten_crop``) for models trained on random crops (``lhcnet.data.crop``). A model file records its
training crop (``info["crop"]``, pixels of the 48-px face) and the TTA it was trained for
(``info["tta"]``); ``input_crop`` and ``recorded_tta`` read them. For a model trained on crops
every view starts from a crop at that size (``View.crop``: the centre unless a corner is named),
so its single view is the centre crop; files that record no TTA get the paper's 60 views.
Softmax probabilities are averaged, as for the paper's views (some ten-crop code averages logits).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import rotation_matrix, translation_matrix, warp, zoom_matrix
from .data.crop import CROP_POSITIONS, crop_offsets, crop_resize, crop_side

__all__ = ["View", "REFERENCE_SIZE", "paper_views", "flip_views", "ten_crop_views", "VIEW_SETS",
           "DEFAULT_TTA", "select_views", "input_crop", "recorded_tta", "model_views",
           "central_crop_box", "view_steps", "make_views", "tta_predict", "total_weight"]

REFERENCE_SIZE = 224     # the resolution at which the paper's pixel shifts are given
IDENTITY_WEIGHT = 3.0
BATCH1_ANGLES = (0.0, 0.4, -0.4)
BATCH1_SHIFTS = (0.0, 10.0, -10.0)
BATCH2_ZOOM = 0.9
BATCH2_ANGLES = (0.0, 0.15, -0.15)


@dataclass(frozen=True)
class View:
    """One TTA view: flip, then the training-size crop at ``crop`` (models trained on crops only),
    then central-crop zoom, then translate (px at 224), then rotate (rad)."""

    crop: str = "centre"   # one of CROP_POSITIONS; "centre" is the whole input for crop-less models
    flip: bool = False
    zoom: float = 1.0      # central_crop fraction; 1 = no zoom
    dx: float = 0.0        # content moves right by dx (px at 224)
    dy: float = 0.0        # content moves down by dy (px at 224)
    angle: float = 0.0     # radians, counter-clockwise as displayed
    weight: float = 1.0

    @property
    def is_identity(self) -> bool:
        return (self.crop == "centre" and not self.flip and self.zoom == 1.0 and self.dx == 0
                and self.dy == 0 and self.angle == 0)

    def describe(self) -> str:
        parts = [] if self.crop == "centre" else [self.crop]
        parts += (["flip"] if self.flip else []) + ([f"zoom {self.zoom:g}"] if self.zoom != 1.0 else [])
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


def _paper_subset(count: int) -> tuple[View, ...]:
    """The first ``count`` paper views in ``_light_order`` (all 60 in the paper's own order)."""
    views = paper_views()
    if not 1 <= count <= len(views):
        raise ValueError(f"TTA view count must be 1..{len(views)}, got {count}")
    return views if count == len(views) else tuple(_light_order(views)[:count])


def flip_views() -> tuple[View, ...]:
    """Identity and mirror, equal weights: the matched TTA of training with flips."""
    return View(), View(flip=True)


def ten_crop_views() -> tuple[View, ...]:
    """The four corners and the centre at the training crop size, then the same mirrored (the
    images of ``torchvision``'s ``ten_crop``), equal weights: the matched TTA of random crops."""
    return tuple(View(crop=position, flip=flip) for flip in (False, True) for position in CROP_POSITIONS)


# Named view sets for ``--tta-views`` / ``Predictor(tta=...)``: name -> views.
VIEW_SETS: dict[str, Callable[[], tuple[View, ...]]] = {
    "paper": paper_views,                        # 60 views, total weight 62 (spec §6)
    "zoom": lambda: _paper_subset(8),            # identity (weight 3), flip, the 6 zoom views
    "flip": flip_views,                          # 2 views, 1:1
    "ten-crop": ten_crop_views,                  # 10 views, 1 each
    "none": lambda: (View(),),                   # the single view
}
DEFAULT_TTA = "paper"  # what ``--tta`` means for a model file that records no TTA (written before)


def select_views(spec: str | int | None = DEFAULT_TTA) -> tuple[View, ...]:
    """A named view set of ``VIEW_SETS`` or a count N (1..60): the first N paper views in the
    order identity, flip, zoom views, shifts, rotations (the identity keeps weight 3)."""
    if spec is None:
        spec = DEFAULT_TTA
    if isinstance(spec, str) and not spec.strip().isdigit():
        if spec not in VIEW_SETS:
            raise ValueError(f"unknown TTA view set {spec!r}; use a count 1..60 or one of "
                             f"{', '.join(VIEW_SETS)}")
        return VIEW_SETS[spec]()
    return _paper_subset(int(spec))


def _model_info(model: Any) -> dict[str, Any]:
    meta = getattr(model, "lhcnet_metadata", None) or {}
    return meta.get("info") or {}


def input_crop(model: Any) -> int:
    """The training crop the model file records (``info["crop"]``, px of the 48-px face); 0: none."""
    return int(_model_info(model).get("crop") or 0)


def recorded_tta(model: Any) -> str:
    """The TTA the model was trained for (``info["tta"]``); ``DEFAULT_TTA`` if the file has none."""
    return str(_model_info(model).get("tta") or DEFAULT_TTA)


def model_views(model: Any, tta: bool | str | int | None) -> tuple[View, ...] | None:
    """The views to run ``model`` with: ``tta`` None/False: its single view (None = the plain
    input; the centre crop for a model trained on crops); True: the TTA it records; otherwise a
    name or count for ``select_views``."""
    if tta is None or tta is False:
        return (View(),) if input_crop(model) else None
    return select_views(recorded_tta(model) if tta is True else tta)


def central_crop_box(size: int, fraction: float) -> tuple[int, int]:
    """(offset, crop size) of ``tf.image.central_crop``: 224, 0.9 -> (11, 202); 48, 0.9 -> (2, 44)."""
    offset = int((size - size * fraction) / 2)
    return offset, size - 2 * offset


def view_steps(view: View, size: int) -> list[torch.Tensor | None]:
    """The view's warp matrices (output -> input, 3x3) for the steps zoom, translate, rotate at
    input size ``size``; None where a step is the identity. The flip and the crop come before these
    steps (``make_views``)."""
    scale = size / REFERENCE_SIZE
    steps: list[torch.Tensor | None] = [None, None, None]
    if view.zoom != 1.0:
        _, crop = central_crop_box(size, view.zoom)
        steps[0] = zoom_matrix(crop / size, crop / size, size, size)
    if view.dx or view.dy:
        steps[1] = translation_matrix(view.dx * scale, view.dy * scale)
    if view.angle:
        steps[2] = rotation_matrix(view.angle, size, size)
    return steps


def _start_images(x: torch.Tensor, views: Sequence[View], crop: int) -> torch.Tensor:
    """Each view's image before its warps, view-major ``(V * B, C, S, S)``: the input or its mirror,
    and with a training crop (px of the 48-px face) the crop at the view's position, resized back
    to S (as ``torchvision``'s ``ten_crop``: the mirrored views are crops of the mirrored input)."""
    cornered = [v.describe() for v in views if v.crop != "centre"]
    if cornered and not crop:
        raise ValueError(f"the TTA views {cornered[:2]} crop at the training crop size, but the "
                         "model records none (info['crop']); use a view set without crops")
    inputs = {False: x, True: x.flip(-1)}
    side = crop_side(crop, x.shape[-1]) if crop else 0
    starts: dict[tuple[bool, str], torch.Tensor] = {}
    for view in views:
        key = (view.flip, view.crop)
        if key not in starts:
            image = inputs[view.flip]
            if crop:
                image = crop_resize(image, *crop_offsets(view.crop, x.shape[-1], side), side)
            starts[key] = image
    return torch.cat([starts[(v.flip, v.crop)] for v in views])


def make_views(x: torch.Tensor, views: Sequence[View], crop: int = 0) -> torch.Tensor:
    """All views of a batch ``(B, C, S, S)`` -> ``(V * B, C, S, S)``, view-major (view v of image b
    at index ``v * B + b``). ``crop``: the model's training crop (0: none). After the flips and
    crops, each step is one ``warp`` over every view that has it."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"TTA expects square model input (B, C, S, S), got {tuple(x.shape)}")
    batch, size = x.shape[0], x.shape[-1]
    out = _start_images(x, views, crop)
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
    """Weighted mean of the softmax probabilities over the views, ``(B, K)``; one forward pass.
    Crops are at the training crop the model records (``input_crop``)."""
    if not views:
        raise ValueError("TTA needs at least one view")
    batch = make_views(x, views, input_crop(model))
    batch = batch.contiguous(memory_format=torch.channels_last)  # ~1.5x faster on CPU
    probs = torch.softmax(model(batch).float(), dim=1)                   # (V * B, K)
    probs = probs.view(len(views), x.shape[0], -1)                        # (V, B, K)
    weights = torch.tensor([v.weight for v in views], dtype=probs.dtype, device=probs.device)
    return torch.einsum("v,vbk->bk", weights, probs) / weights.sum()


def total_weight(views: Sequence[View]) -> float:
    """Sum of the view weights (62 for the paper's views)."""
    return math.fsum(v.weight for v in views)

"""The paper's analyses of a trained LHC-Net: block ablations, head correlation, attention maps.

- Block ablation (paper §5 prose, spec §7): every LHC block (a) switched off, output = input, and
  (b) "de-trained", its weights reset to their Keras initialisation with a fixed seed, both one
  block at a time and cumulatively from the last block backwards; the accuracy of each variant.
- Head correlation: the mean absolute Pearson correlation between the outputs of different heads
  of the same block over a sample of images (the paper compares it with a Transformer encoder's).
- Attention maps: a block's per-head channel attention ``A`` (eq. 15, C x C per head) for one face.
- Block contribution (not the paper's): how much each block changes the residual stream it sits
  on, ``||y - x|| / ||x||`` per face (y = x + O, or its gated / layer-scaled O), averaged.

Switching a block off goes through the placement API of ``lhcnet.models.lhcnet``:
``lhc_switched_off`` puts ``nn.Identity`` in the blocks' places (``switch_off_lhc``) while it is
active and the blocks back (``replace_lhc_block``) on exit.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .evaluate import predict_probabilities
from .models import lhc_blocks, replace_lhc_block, switch_off_lhc
from .nn import LHC

__all__ = ["lhc_switched_off", "lhc_detrained", "AblationRow", "ablation_plan", "block_ablation",
           "format_ablation", "plot_ablation", "HeadCorrelation", "head_outputs", "head_correlation",
           "format_head_correlation", "plot_head_correlation", "BlockContribution", "block_contribution",
           "format_block_contribution", "attention_maps", "plot_attention", "resolve_block"]


def _check_places(model: nn.Module, places: Sequence[str]) -> None:
    known = [place for place, _ in lhc_blocks(model)]
    missing = [p for p in places if p not in known]
    if missing:
        raise ValueError(f"no LHC block at {missing}; this model's blocks are at {known}")


@contextmanager
def lhc_switched_off(model: nn.Module, places: Sequence[str]) -> Iterator[None]:
    """Within the block, the LHC blocks at ``places`` return their input unchanged."""
    _check_places(model, places)
    saved = switch_off_lhc(model, places)
    try:
        yield
    finally:
        for place, block in saved.items():
            replace_lhc_block(model, place, block)


@contextmanager
def lhc_detrained(model: nn.Module, places: Sequence[str], seed: int = 0) -> Iterator[None]:
    """Within the block, the LHC blocks at ``places`` have their initial weights back.

    Each block is reset by ``LHC.reset_parameters`` (Keras init) right after
    ``torch.manual_seed(seed)``, on a CPU copy (the same values on every device), so a block's
    de-trained weights are the same whichever other blocks are reset with it. LHC-NetC's gate
    ``w`` is the controller's, not the block's, and is kept. The global random state is left as it
    was; the trained weights return on exit.
    """
    blocks = dict(lhc_blocks(model))
    _check_places(model, places)
    saved = {place: {k: v.detach().clone() for k, v in blocks[place].state_dict().items()}
             for place in places}
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for place in places:
                fresh = copy.deepcopy(blocks[place]).cpu()
                torch.manual_seed(seed)
                fresh.reset_parameters()  # leaves the gate alone
                blocks[place].load_state_dict(fresh.state_dict())
        yield
    finally:
        for place in places:
            blocks[place].load_state_dict(saved[place])


@dataclass
class AblationRow:
    """Accuracy with a set of blocks switched off or de-trained (``mode`` "none" = full model)."""

    mode: str            # "none", "off" or "detrained"
    scope: str           # "baseline", "single" or "cumulative"
    places: list[str]
    accuracy: float


def ablation_plan(places: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(scope, places) of every variant: each block alone, then the last 1, 2, ... all blocks."""
    single = [("single", [place]) for place in places]
    cumulative = [("cumulative", list(places[len(places) - k:])) for k in range(1, len(places) + 1)]
    return single + cumulative


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kw: Any) -> float:
    probs = predict_probabilities(model, images, **kw)
    return float((probs.argmax(dim=1) == labels).double().mean())


def block_ablation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                   batch_size: int = 256, device: str | torch.device = "cpu") -> list[AblationRow]:
    """The two ablations (switch-off and de-train), single and cumulative, plus the baseline.

    A variant that equals another (one block alone == the last block cumulatively) is computed once.
    """
    places = [place for place, _ in lhc_blocks(model)]
    if not places:
        raise ValueError("this model has no LHC blocks to ablate")
    kw = {"batch_size": batch_size, "device": device}
    rows = [AblationRow("none", "baseline", [], _accuracy(model, images, labels, **kw))]
    done: dict[tuple[str, tuple[str, ...]], float] = {}
    for mode, manager in (("off", lhc_switched_off), ("detrained", lhc_detrained)):
        for scope, chosen in ablation_plan(places):
            key = (mode, tuple(sorted(chosen)))
            if key not in done:
                extra = {"seed": seed} if mode == "detrained" else {}
                with manager(model, chosen, **extra):
                    done[key] = _accuracy(model, images, labels, **kw)
            rows.append(AblationRow(mode, scope, chosen, done[key]))
    return rows


def _blocks_label(places: Sequence[str], all_places: Sequence[str]) -> str:
    numbers = [all_places.index(p) + 1 for p in places]
    if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


def format_ablation(rows: Sequence[AblationRow], places: Sequence[str]) -> str:
    """The accuracy table: one row per variant, switch-off and de-train side by side."""
    baseline = next(r.accuracy for r in rows if r.mode == "none")
    lines = ["blocks: " + ", ".join(f"{i} = {p}" for i, p in enumerate(places, start=1)),
             f"baseline (all blocks on): {100 * baseline:.2f}%", "",
             f"{'variant':<24}  {'off %':>7}  {'delta':>6}  {'de-trained %':>12}  {'delta':>6}",
             "-" * 63]
    by_key = {(r.mode, r.scope, tuple(r.places)): r.accuracy for r in rows}
    for scope, chosen in ablation_plan(places):
        what = "block" if scope == "single" else "blocks"
        name = f"{scope} {what} {_blocks_label(chosen, places)}"
        off, detrained = by_key[("off", scope, tuple(chosen))], by_key[("detrained", scope, tuple(chosen))]
        lines.append(f"{name:<24}  {100 * off:7.2f}  {100 * (off - baseline):+6.2f}  "
                     f"{100 * detrained:12.2f}  {100 * (detrained - baseline):+6.2f}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_ablation(rows: Sequence[AblationRow], places: Sequence[str], path: str | Path,
                  title: str = "") -> Path:
    """Two panels (one block at a time; cumulatively from the last block), accuracy per variant for
    switch-off and de-train, with the baseline as a dashed line."""
    plt = _pyplot()
    baseline = next(r.accuracy for r in rows if r.mode == "none")
    by_key = {(r.mode, r.scope, tuple(r.places)): r.accuracy for r in rows}
    plan = ablation_plan(places)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90, sharey=True)
    for ax, scope, xlabel in ((axes[0], "single", "block switched off / de-trained"),
                              (axes[1], "cumulative", "blocks switched off / de-trained (from the last)")):
        chosen = [c for s, c in plan if s == scope]
        x = list(range(len(chosen)))
        for mode, name, marker in (("off", "switched off", "o"), ("detrained", "de-trained", "s")):
            ax.plot(x, [100 * by_key[(mode, scope, tuple(c))] for c in chosen], marker=marker, label=name)
        ax.axhline(100 * baseline, color="k", linestyle="--", linewidth=1, label="all blocks on")
        ax.set_xticks(x, [_blocks_label(c, places) for c in chosen])
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(scope, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy %")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title or "LHC block ablation", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


@dataclass
class HeadCorrelation:
    """Per block: mean |Pearson r| between different heads' outputs, and the (n, n) matrix."""

    place: str
    heads: int
    mean_abs: float | None                   # None for a one-head block
    matrix: list[list[float]] = field(default_factory=list)


@torch.no_grad()
def head_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each LHC block's per-head output ``O_i = A_i V_i`` (eq. 16), ``(B, n, C, r)``, for model input x."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for place, block in lhc_blocks(model):
        def hook(module: LHC, args: tuple, output: torch.Tensor, place: str = place) -> None:
            captured[place] = module.head_outputs(args[0])                   # (B, n, C, r)
        handles.append(block.register_forward_hook(hook))
    try:
        model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _pairwise_abs_correlation(outputs: torch.Tensor) -> torch.Tensor:
    """|Pearson r| between every pair of heads per image: ``(B, n, C, r)`` -> ``(B, n, n)``.

    Head i's output is flattened to its C * r values (channel, position within its rows), so r
    compares heads element by element; a constant output has no correlation (counted as 0)."""
    flat = outputs.flatten(2).double()                                        # (B, n, C*r)
    centred = flat - flat.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, centred / norm.clamp(min=1e-300), torch.zeros_like(centred))
    return (unit @ unit.transpose(1, 2)).abs()                                # (B, n, n)


@torch.no_grad()
def head_correlation(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> list[HeadCorrelation]:
    """The head-correlation measure per block over uint8 faces ``[N, H, W]``: for each image and
    each pair of different heads of a block, |Pearson r| of their outputs; averaged over images
    (the matrix) and over pairs (``mean_abs``)."""
    from .data import to_model_input

    model = model.to(device).eval()
    size = int(getattr(model, "input_size", 224))
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start:start + batch_size].to(device), size)
        for place, outputs in head_outputs(model, x).items():
            batch_sum = _pairwise_abs_correlation(outputs).sum(dim=0).cpu()
            sums[place] = sums.get(place, 0) + batch_sum
    results = []
    for place, block in lhc_blocks(model):
        matrix = sums[place] / len(images)
        n = block.heads
        off_diagonal = matrix[~torch.eye(n, dtype=torch.bool)]
        mean_abs = float(off_diagonal.mean()) if n > 1 else None
        results.append(HeadCorrelation(place, n, mean_abs, matrix.tolist()))
    return results


def format_head_correlation(results: Sequence[HeadCorrelation], count: int) -> str:
    lines = [f"mean |Pearson r| between the outputs of different heads ({count} images)", "",
             f"{'block':<6}  {'place':<12}  {'heads':>5}  {'mean |r|':>8}", "-" * 37]
    for i, r in enumerate(results, start=1):
        value = "n/a" if r.mean_abs is None else f"{r.mean_abs:.4f}"
        lines.append(f"{i:<6}  {r.place:<12}  {r.heads:>5}  {value:>8}")
    return "\n".join(lines)


def plot_head_correlation(results: Sequence[HeadCorrelation], path: str | Path, title: str = "") -> Path:
    """A bar per block (mean |r|) and each multi-head block's head-by-head |r| matrix."""
    plt = _pyplot()
    multi = [r for r in results if r.mean_abs is not None]
    fig, axes = plt.subplots(1, 1 + len(multi), figsize=(3.2 + 2.3 * len(multi), 3.0), dpi=90, squeeze=False)
    axes = axes[0]
    names = [f"{i} {r.place}" for i, r in enumerate(results, start=1)]
    axes[0].bar(range(len(results)), [r.mean_abs or 0.0 for r in results], color="tab:blue")
    axes[0].set_xticks(range(len(results)), names, fontsize=7, rotation=45, ha="right")
    axes[0].set_xlabel("block", fontsize=8)
    axes[0].set_ylabel("mean |r| between heads")
    axes[0].set_ylim(0, 1)
    for i, r in enumerate(results):
        if r.mean_abs is None:
            axes[0].text(i, 0.02, "1 head", ha="center", fontsize=7, rotation=90)
    for ax, r in zip(axes[1:], multi):
        image = ax.imshow(torch.tensor(r.matrix).numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{r.place}: {r.mean_abs:.3f}", fontsize=8)
        ax.set_xticks(range(r.heads), [str(h + 1) for h in range(r.heads)], fontsize=6)
        ax.set_yticks(range(r.heads), [str(h + 1) for h in range(r.heads)], fontsize=6)
        ax.set_xlabel("head", fontsize=7)
    if multi:
        fig.colorbar(image, ax=list(axes[1:]), shrink=0.8)
    fig.suptitle(title or "head correlation per LHC block", fontsize=10)
    return _save(fig, path)


@dataclass
class BlockContribution:
    """Per block: the mean over faces of ``||y - x|| / ||x||``, what the block adds to its input."""

    place: str
    relative: float


@torch.no_grad()
def block_contribution(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64,
                       device: str | torch.device = "cpu") -> list[BlockContribution]:
    """For uint8 faces ``[N, H, W]``, each LHC block's ``||y - x||_2 / ||x||_2`` per face (x the
    block's input, y its output, both over all C x H x W values), averaged over the faces: 0 for a
    block that passes its input through, ~0.1-0.3 for the paper's blocks at initialisation."""
    from .data import to_model_input

    model = model.to(device).eval()
    size = int(getattr(model, "input_size", 224))
    sums: dict[str, float] = {}

    def hook(module: LHC, args: tuple, output: torch.Tensor, place: str) -> None:
        x = args[0].flatten(1).double()
        change = (output.flatten(1).double() - x).norm(dim=1) / x.norm(dim=1).clamp(min=1e-300)
        sums[place] = sums.get(place, 0.0) + float(change.sum())

    handles = [block.register_forward_hook(lambda m, a, o, place=place: hook(m, a, o, place))
               for place, block in lhc_blocks(model)]
    try:
        for start in range(0, len(images), batch_size):
            model(to_model_input(images[start:start + batch_size].to(device), size))
    finally:
        for handle in handles:
            handle.remove()
    return [BlockContribution(place, sums[place] / len(images)) for place, _ in lhc_blocks(model)]


def format_block_contribution(results: Sequence[BlockContribution], count: int) -> str:
    lines = [f"what each LHC block adds to its input, mean ||y - x|| / ||x|| ({count} images)", "",
             f"{'block':<6}  {'place':<12}  {'||y-x||/||x||':>13}", "-" * 35]
    lines += [f"{i:<6}  {r.place:<12}  {r.relative:>13.5f}" for i, r in enumerate(results, start=1)]
    return "\n".join(lines)


def resolve_block(model: nn.Module, block: int | str) -> tuple[str, LHC]:
    """An LHC block by 1-based number in forward order or by place name."""
    blocks = lhc_blocks(model)
    if not blocks:
        raise ValueError("this model has no LHC blocks")
    if isinstance(block, str) and not block.isdigit():
        for place, module in blocks:
            if place == block:
                return place, module
        raise ValueError(f"no LHC block at {block!r}; places: {[p for p, _ in blocks]}")
    number = int(block)
    if not 1 <= number <= len(blocks):
        raise ValueError(f"block must be 1..{len(blocks)}, got {number}")
    return blocks[number - 1]


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, block: int | str = 1) -> torch.Tensor:
    """The attention ``A`` (eq. 15) of one block for model input ``x`` (1, 3, S, S): ``(n, C, C)``."""
    _, module = resolve_block(model, block)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(m.attention(args[0])))
    try:
        model.eval()(x)
    finally:
        handle.remove()
    return captured[0][0]


def plot_attention(face: torch.Tensor, attention: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """The face and one C x C channel-attention map per head (row: query channel, column: key
    channel; rows sum to 1), on one colour scale."""
    plt = _pyplot()
    heads = attention.shape[0]
    columns = min(4, heads) + 1
    rows = math.ceil(heads / (columns - 1))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns + 0.6, 2.2 * rows + 0.4), dpi=80,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(face.cpu().numpy(), cmap="gray", vmin=0, vmax=255)
    axes[0, 0].set_title("input", fontsize=8)
    values = attention.float().cpu()
    # The top 1% would wash out the rest (a few channels attend sharply); quantile caps at 16M values.
    flat = values.flatten()  # colours up to the 99th percentile: a few sharp rows would wash out the rest
    vmax = float(torch.quantile(flat, 0.99)) if flat.numel() <= 16_000_000 else float(flat.max())
    for h in range(heads):
        ax = axes[h // (columns - 1), 1 + h % (columns - 1)]
        image = ax.imshow(values[h].numpy(), cmap="magma", vmin=0, vmax=max(vmax, 1e-12))
        ax.set_title(f"head {h + 1}", fontsize=8)
    fig.colorbar(image, ax=axes[:, 1:].ravel().tolist(), shrink=0.8,
                 label="attention (query row, key column)")
    fig.suptitle(title or "channel attention per head", fontsize=10)
    return _save(fig, path)

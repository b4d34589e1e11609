"""LHC-Net as data: a CNN backbone plus LHC blocks at named places.

``insert_lhc(backbone, blocks)`` takes any ``nn.Module`` and a list of ``LHCBlock(place, ...)``
where ``place`` is the dotted name of a sub-module (``"stem"``, ``"stage1"``, ``"layer3"``...).
The block is applied to that sub-module's output through a forward hook, so the backbone's own
parameter names do not change: a trained backbone's ``state_dict`` loads into the LHC model by
name, with only the new ``lhc.*`` entries missing (the paper's stage-4 handover).

The placement is public: ``lhc_blocks(model)`` lists the blocks in forward order,
``replace_lhc_block(model, place, module)`` puts any same-shape module in a block's place (e.g. a
de-trained copy) and ``switch_off_lhc(model, places)`` puts ``nn.Identity`` there; both return
what they took out, so ``replace_lhc_block`` puts it back. The blocks live in ``model.lhc`` (a
``ModuleDict`` keyed by place, dots as underscores) and every hooked sub-module says in
``print(model)`` which block runs on its output.

LHC-Net (paper §3, ``docs/lhc-spec.md`` §2) is ResNet34v2 with five blocks: after the stem and
after the last unit of each stage. LHC-NetC (spec §4) is the same with a trainable controller per
block: ``y = x + (1 + tanh w_i) O_i``, w initialised to [0, 0, 0, -1, -0.5].
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..nn.lhc import LHC

__all__ = ["LHCBlock", "insert_lhc", "lhc_blocks", "replace_lhc_block", "switch_off_lhc",
           "gate_parameters", "freeze_except_gates", "PAPER_BLOCKS", "PAPER_GATES"]


@dataclass(frozen=True)
class LHCBlock:
    """Where an LHC block goes and its settings (the LHC constructor's arguments)."""

    place: str
    channels: int
    resolution: int | tuple[int, int]
    heads: int
    embed_dim: int
    pool_size: int = 3
    kernel_size: int = 3
    scale_c: float = 1.0

    def build(self, gate_init: float | None = None, **options: Any) -> LHC:
        settings = asdict(self)
        settings.pop("place")
        return LHC(**settings, gate_init=gate_init, **options)


# The paper's five blocks on ResNet34v2 at 224x224 (spec §2, from Settings/LHC_Settings.json).
PAPER_BLOCKS: tuple[LHCBlock, ...] = (
    LHCBlock("stem", 64, 56, heads=8, embed_dim=196),
    LHCBlock("stage1", 64, 56, heads=8, embed_dim=196),
    LHCBlock("stage2", 128, 28, heads=7, embed_dim=56),
    LHCBlock("stage3", 256, 14, heads=7, embed_dim=14),
    LHCBlock("stage4", 512, 7, heads=1, embed_dim=25),
)
# LHC-NetC's hand-set controller initial values (spec §4).
PAPER_GATES: tuple[float, ...] = (0.0, 0.0, 0.0, -1.0, -0.5)


def _key(place: str) -> str:
    return place.replace(".", "_")


class _ApplyLHC:
    """Forward hook of a hooked sub-module: its output goes through ``container[key]``.

    It holds the container, not the block, so replacing ``model.lhc[key]`` takes effect at once;
    ``copy.deepcopy`` of the model copies the hook with the container it points to."""

    def __init__(self, container: nn.ModuleDict, key: str) -> None:
        self.container, self.key = container, key

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.container[self.key](output)


class _NoteLHC:
    """``extra_repr`` of a hooked sub-module: its own, then the LHC block that runs on its output."""

    def __init__(self, module: nn.Module, key: str) -> None:
        self.module, self.key = module, key

    def __call__(self) -> str:
        own = type(self.module).extra_repr(self.module)
        note = f"(output -> lhc[{self.key!r}])"
        return f"{own}\n{note}" if own else note


def insert_lhc(backbone: nn.Module, blocks: Sequence[LHCBlock],
               gates: Sequence[float] | None = None, **lhc_options: Any) -> nn.Module:
    """Put LHC blocks after the named sub-modules of ``backbone`` (in place; returns it).

    The blocks are registered as ``backbone.lhc[<place>]``; ``gates`` (one initial w per block)
    builds LHC-NetC's controlled blocks instead of plain ones. ``lhc_options`` go to every
    block's ``LHC`` constructor (e.g. ``layer_scale_init``).
    """
    if gates is not None and len(gates) != len(blocks):
        raise ValueError(f"got {len(gates)} gate values for {len(blocks)} LHC blocks")
    if hasattr(backbone, "lhc"):
        raise ValueError("this model already has LHC blocks (attribute 'lhc')")
    modules = dict(backbone.named_modules())
    container = nn.ModuleDict()
    for i, block in enumerate(blocks):
        if block.place not in modules or block.place == "":
            options = [name for name, _ in backbone.named_children()]
            raise ValueError(f"no sub-module named {block.place!r} to put an LHC block after; "
                             f"top-level places are {options}")
        key = _key(block.place)
        if key in container:
            raise ValueError(f"two LHC blocks at the same place {block.place!r}")
        container[key] = block.build(None if gates is None else gates[i], **lhc_options)
        target = modules[block.place]
        target.register_forward_hook(_ApplyLHC(container, key))
        target.extra_repr = _NoteLHC(target, key)
    backbone.lhc = container
    backbone.lhc_blocks = tuple(blocks)
    return backbone


def lhc_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's LHC blocks in forward order, as (place, module) pairs (an ``LHC``, or what
    ``replace_lhc_block``/``switch_off_lhc`` put there)."""
    container = getattr(model, "lhc", None)
    if container is None:
        return []
    return [(block.place, container[_key(block.place)]) for block in model.lhc_blocks]


def replace_lhc_block(model: nn.Module, place: str, module: nn.Module) -> nn.Module:
    """Run ``module`` instead of the LHC block at ``place``; returns the module that was there.

    ``module`` maps the hooked feature map (B, C, H, W) to one of the same shape."""
    places = [p for p, _ in lhc_blocks(model)]
    if place not in places:
        raise ValueError(f"no LHC block at {place!r}; this model's blocks are at {places}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"an LHC block must be an nn.Module, got {type(module).__name__}")
    previous = model.lhc[_key(place)]
    model.lhc[_key(place)] = module
    return previous


def switch_off_lhc(model: nn.Module, places: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Make the LHC blocks at ``places`` (default: all) return their input unchanged.

    Returns {place: block taken out}; ``replace_lhc_block`` puts a block back."""
    chosen = [p for p, _ in lhc_blocks(model)] if places is None else list(places)
    return {place: replace_lhc_block(model, place, nn.Identity()) for place in chosen}


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """LHC-NetC's controller weights w_i, in block order."""
    return [lhc.gate for _, lhc in lhc_blocks(model) if getattr(lhc, "gate", None) is not None]


def freeze_except_gates(model: nn.Module) -> list[nn.Parameter]:
    """Stage C: make only LHC-NetC's gates trainable and return them.

    As in TF2 (``trainable=False``), frozen BatchNorm layers must also run in inference mode:
    call ``model.train()`` then ``set_batchnorm_eval(model)`` in the training loop.
    """
    gates = gate_parameters(model)
    if not gates:
        raise ValueError("this model has no LHC-NetC gates (build it with gates, e.g. 'lhcnetc_resnet34v2')")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in gates:
        p.requires_grad_(True)
    return gates


def set_batchnorm_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer in inference mode (frozen statistics)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()

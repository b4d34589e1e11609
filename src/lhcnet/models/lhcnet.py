"""LHC-Net as data: a CNN backbone plus LHC blocks at named places.

``insert_lhc(backbone, blocks)`` takes any ``nn.Module`` and a list of ``LHCBlock(place, ...)``
where ``place`` is the dotted name of a sub-module (``"stem"``, ``"stage1"``, ``"layer3"``...).
The block is applied to that sub-module's output through a forward hook, so the backbone's own
parameter names do not change: a trained backbone's ``state_dict`` loads into the LHC model by
name, with only the new ``lhc.*`` entries missing (the paper's stage-4 handover).

LHC-Net (paper §3, ``docs/lhc-spec.md`` §2) is ResNet34v2 with five blocks: after the stem and
after the last unit of each stage. LHC-NetC (spec §4) is the same with a trainable controller per
block: ``y = x + (1 + tanh w_i) O_i``, w initialised to [0, 0, 0, -1, -0.5].
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..nn.lhc import LHC

__all__ = ["LHCBlock", "insert_lhc", "lhc_blocks", "gate_parameters", "freeze_except_gates",
           "PAPER_BLOCKS", "PAPER_GATES"]


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

    def build(self, gate_init: float | None = None) -> LHC:
        settings = asdict(self)
        settings.pop("place")
        return LHC(**settings, gate_init=gate_init)


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


def _apply_lhc(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: replace the hooked sub-module's output by its LHC block's output."""
    return module.__dict__["_lhc_block"](output)


def insert_lhc(backbone: nn.Module, blocks: Sequence[LHCBlock],
               gates: Sequence[float] | None = None) -> nn.Module:
    """Put LHC blocks after the named sub-modules of ``backbone`` (in place; returns it).

    The blocks are registered as ``backbone.lhc[<place>]``; ``gates`` (one initial w per block)
    builds LHC-NetC's controlled blocks instead of plain ones.
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
        if _key(block.place) in container:
            raise ValueError(f"two LHC blocks at the same place {block.place!r}")
        lhc = block.build(None if gates is None else gates[i])
        container[_key(block.place)] = lhc
        target = modules[block.place]
        # A plain (unregistered) reference: copy.deepcopy keeps it pointing at the copied block.
        target.__dict__["_lhc_block"] = lhc
        target.register_forward_hook(_apply_lhc)
    backbone.lhc = container
    backbone.lhc_blocks = tuple(blocks)
    return backbone


def lhc_blocks(model: nn.Module) -> list[tuple[str, LHC]]:
    """The model's LHC blocks in forward order, as (place, module) pairs."""
    container = getattr(model, "lhc", None)
    if container is None:
        return []
    return [(block.place, container[_key(block.place)]) for block in model.lhc_blocks]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """LHC-NetC's controller weights w_i, in block order."""
    return [lhc.gate for _, lhc in lhc_blocks(model) if lhc.gate is not None]


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

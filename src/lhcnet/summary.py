"""Parameters, FLOPs and latency of a model, with the LHC blocks broken out (``lhcnet info``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import lhc_blocks

__all__ = ["BlockSummary", "ModelSummary", "summarize", "measure_latency", "format_summary"]


@dataclass
class BlockSummary:
    place: str
    settings: str
    params: int
    flops: int


@dataclass
class ModelSummary:
    name: str
    input_size: int
    params: int
    flops: int
    blocks: list[BlockSummary] = field(default_factory=list)

    @property
    def lhc_params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def lhc_flops(self) -> int:
        return sum(b.flops for b in self.blocks)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize(model: nn.Module, name: str = "") -> ModelSummary:
    """Count learnable parameters and forward FLOPs (``torch.utils.flop_counter``, batch 1)."""
    size = getattr(model, "input_size", 224)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False, depth=None) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    flops = {fqn.split(".", 1)[1] if "." in fqn else "": sum(per_op.values())
             for fqn, per_op in counter.get_flop_counts().items()}
    blocks = [BlockSummary(place, block.extra_repr(), _count(block), flops.get(f"lhc.{place.replace('.', '_')}", 0))
              for place, block in lhc_blocks(model)]
    return ModelSummary(name or type(model).__name__, size, _count(model), counter.get_total_flops(), blocks)


def measure_latency(model: nn.Module, batch_size: int = 1, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one forward pass at ``batch_size`` on the model's device."""
    size = getattr(model, "input_size", 224)
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, 3, size, size, device=device)
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def format_summary(s: ModelSummary, latency: float | None = None) -> str:
    lines = [f"model: {s.name}", f"input: 3 x {s.input_size} x {s.input_size} (RGB 0..255)",
             f"parameters: {s.params:,}", f"forward FLOPs (batch 1): {s.flops / 1e9:.3f} G"]
    if s.blocks:
        lines += ["", f"{'LHC block':<12}{'params':>12}{'GFLOPs':>10}  settings"]
        for b in s.blocks:
            lines.append(f"{b.place:<12}{b.params:>12,}{b.flops / 1e9:>10.3f}  {b.settings}")
        backbone = s.params - s.lhc_params
        lines += [f"{'all LHC':<12}{s.lhc_params:>12,}{s.lhc_flops / 1e9:>10.3f}",
                  f"LHC share: {100 * s.lhc_params / s.params:.1f}% of parameters "
                  f"(+{100 * s.lhc_params / backbone:.1f}% over the host network), "
                  f"{100 * s.lhc_flops / s.flops:.1f}% of FLOPs"]
    if latency is not None:
        lines.append(f"CPU latency (batch 1, median): {latency * 1000:.1f} ms")
    return "\n".join(lines)

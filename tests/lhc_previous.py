"""The LHC forward as it was before the speed work of issue 12 (commit 176245c), kept as a reference.

Not part of the package: ``tests/test_lhc.py`` checks the current implementation against it on
real faces, and ``benchmarks/lhc_speed.py`` times the two side by side. ``previous_forward`` is a
plain function of an ``lhcnet.LHC`` module and its input, so it runs on the same weights;
``previous_implementation(model)`` swaps it in for every LHC block of a model while active.
"""
from __future__ import annotations

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lhcnet import LHC
from lhcnet.models import lhc_blocks
from lhcnet.nn.lhc import box_mean


def previous_forward(m: LHC, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (1)-(17) as implemented at commit 176245c (float32 island for eqs. 7-16)."""
    p = m.pool_size
    b, c = x.shape[:2]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, c, m.heads, m.head_len).transpose(1, 2)

    q = split(box_mean(x, p))
    k = split(F.max_pool2d(x, p, 1, p // 2))
    v = split(box_mean(m.value_conv(x), 3))
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.promote_types(m.qk_weight.dtype, torch.float32)
        q, k = q.to(dtype), k.to(dtype)
        weight, bias = m.qk_weight.to(dtype), m.qk_bias.to(dtype).unsqueeze(1)
        q = torch.einsum("bncr,nrd->bncd", q, weight) + bias
        k = torch.einsum("bncr,nrd->bncd", k, weight) + bias
        mean_score = (q @ k.mean(dim=-2).unsqueeze(-1)).squeeze(-1)
        s = torch.sigmoid(m.scale_fc(mean_score.to(m.scale_fc.weight.dtype))).to(dtype)
        divisor = torch.exp((m.scale_c + s) * math.log(m.embed_dim)).unsqueeze(-1)
        attn = torch.softmax((q / divisor) @ k.transpose(-1, -2), dim=-1)
    out = (attn @ v.to(attn.dtype)).to(v.dtype)
    out = out.transpose(1, 2).reshape(x.shape)
    if m.gate is not None:
        out = (1 + torch.tanh(m.gate)) * out
    return x + out


@contextmanager
def previous_implementation(model: nn.Module) -> Iterator[None]:
    """Within the block, every LHC block of ``model`` (or ``model`` itself, an LHC) runs ``previous_forward``."""
    blocks = [model] if isinstance(model, LHC) else [block for _, block in lhc_blocks(model)]
    for block in blocks:
        block.forward = types.MethodType(previous_forward, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward

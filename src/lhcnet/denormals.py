"""Flush float32 denormals to zero on the CPU (FTZ + DAZ), as TensorFlow's CPU thread pools do
(the original LHC-Net ran so): used by ``lhcnet train`` and ``benchmarks/lhc_speed.py``.

A product with a denormal (|x| < 1.2e-38) costs ~100 cycles on x86. The sharp attention rows of
trained LHC blocks hold 1-4 % such weights; ``lhcnet.nn.lhc`` guards its own softmax against them,
but PyTorch's fused attention kernel (``scaled_dot_product_attention``), 1.5-2x faster than that
softmax on thin heads, cannot be guarded and is 1.5-4x slower than itself with them. With the
flush, LHC blocks use it where it wins (``lhcnet.nn.lhc.channel_attention``).

The mode is per thread, and intra-op threads copy it from the thread that starts them: call
``flush_denormals()`` before the process's first parallel CPU operation. It checks that every
thread flushes and reports it; values below 1.2e-38 then become 0 everywhere in the process.
"""
from __future__ import annotations

import torch

__all__ = ["flush_denormals", "flushing", "all_threads_flush"]

_flushing = False


def all_threads_flush() -> bool:
    """Whether every intra-op thread treats denormals as zero: a parallel multiply of the smallest
    denormal (made from its bit pattern: converting a Python 1e-39 would already flush)."""
    probe = torch.ones(torch.get_num_threads() * 2**16, dtype=torch.int32).view(torch.float32)
    return int(torch.count_nonzero(probe * 1.0)) == 0


def flush_denormals() -> bool:
    """Turn FTZ + DAZ on; True if the CPU has them and every intra-op thread now flushes (False
    also when the thread pool started before this call: its threads keep the old mode)."""
    global _flushing
    _flushing = bool(torch.set_flush_denormal(True)) and all_threads_flush()
    return _flushing


def flushing() -> bool:
    """Whether ``flush_denormals()`` succeeded in this process."""
    return _flushing

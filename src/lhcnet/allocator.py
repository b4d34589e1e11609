"""glibc malloc settings that keep freed tensor memory in the process (used by ``lhcnet train``).

By default glibc hands large freed blocks back to the kernel (``munmap``, heap trimming), so the
next step's tensors of the same size are page-faulted in again, page by page. On a compact
LHC-Net's training step (batch 64, many 2-7 MB tensors per block) that is ~10 % of the step and
most of its noise (``benchmarks/lhc_speed.py``: median LHC-Net step 0.47-0.51 -> 0.44-0.45 s, the
host's 0.18-0.21 -> 0.19 s, 2 cores). The same settings as the environment variables
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456``;
the process keeps up to ~1 GB of freed memory for reuse.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["glibc_mallopt", "keep_freed_memory"]

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {_M_MMAP_THRESHOLD: 32 * 2**20,   # blocks below 32 MB (glibc's maximum) from the heap, not mmap
            _M_TRIM_THRESHOLD: 2**30,        # give the heap's top back to the kernel only above 1 GB free
            _M_TOP_PAD: 256 * 2**20}         # and grow it 256 MB at a time


def glibc_mallopt() -> ctypes._CFuncPtr | None:
    """glibc's ``mallopt``, or None where the C library is not glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has a mallopt that does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` with glibc's ``mallopt``; False (and nothing changed) without glibc."""
    mallopt = glibc_mallopt()
    return mallopt is not None and all(mallopt(param, value) == 1 for param, value in SETTINGS.items())

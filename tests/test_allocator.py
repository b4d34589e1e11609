"""lhcnet.allocator: large tensors come from the heap (reused) instead of fresh mmaps."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lhcnet.allocator import glibc_mallopt

PROBE = """
import sys, torch
if sys.argv[1] == "keep":
    from lhcnet.allocator import keep_freed_memory
    assert keep_freed_memory()
address = torch.empty(5 * 2**20, dtype=torch.float32).data_ptr()  # 20 MB
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(a, 16) for a in line.split()[0].split("-"))
        print("heap" if start <= address < end else "mmap")
        break
else:
    print("mmap")
"""


def where_a_20_mb_tensor_lives(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return done.stdout.split()[-1]


@pytest.mark.skipif(glibc_mallopt() is None, reason="not glibc: the settings do not apply")
def test_a_20_mb_tensor_comes_from_the_heap_once_freed_memory_is_kept() -> None:
    """glibc's default maps every block above 128 KB (the first time) with its own mmap, unmapped
    again on free: the next one is page-faulted in afresh. Kept: the heap, whose freed memory is
    reused (trimmed only above 1 GB)."""
    assert where_a_20_mb_tensor_lives("default") == "mmap"
    assert where_a_20_mb_tensor_lives("keep") == "heap"

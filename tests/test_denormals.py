"""lhcnet.denormals in fresh processes (the mode is per thread and process-wide: not in pytest's)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

PROBE = """
import torch
torch.set_num_threads(2)
from lhcnet.denormals import all_threads_flush, flush_denormals, flushing
{before}
print(all_threads_flush() if {check_first} else '-', flush_denormals(), flushing(), all_threads_flush())
tiny = torch.ones(4, dtype=torch.int32).view(torch.float32)   # the smallest denormal, 1.4e-45
print(int(torch.count_nonzero(tiny * 1.0)))
"""


def run(before: str = "", check_first: bool = False) -> list[str]:
    code = PROBE.format(before=before, check_first=check_first)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU has no flush-to-zero mode")
def test_flush_before_the_thread_pool_reaches_every_thread() -> None:
    assert run() == ["-", "True", "True", "True", "0"]


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU has no flush-to-zero mode")
def test_flush_after_the_thread_pool_started_is_reported_as_failed() -> None:
    """A parallel op first: the pool's worker keeps denormals, so the check says False (and LHC
    keeps its own guarded softmax); the main thread itself flushes."""
    out = run(before="torch.ones(2**20) * 2.0", check_first=True)
    assert out == ["False", "False", "False", "False", "0"]

"""Shared test fixtures. The real FER2013 files live in ../shared/data (never in this repo)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LHCNET_SHARED_DATA", REPO.parent / "shared" / "data"))
FER2013_CSV_GZ = SHARED_DATA / "fer2013.csv.gz"
FERPLUS_CSV = SHARED_DATA / "ferplus.csv"

requires_shared_data = pytest.mark.skipif(
    not FER2013_CSV_GZ.exists(), reason=f"FER2013 not found at {FER2013_CSV_GZ}")


# Tests use tiny models: one thread is fastest on a 2-core (often shared) machine and keeps
# results bit-repeatable. Tests that need more set it themselves.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)

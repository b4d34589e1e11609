"""``derive_seed``: the one way lhcnet turns a run's seed and a position into a random seed.

Data order and augmentation (``BatchLoader``: seed, epoch, rank), model initialisation and
dropout (the trainer: seed, stage name, epoch, rank) all draw from seeds derived here, so every
random stream is a function of where it is used and nothing else; that is what makes a resumed
run continue exactly.
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*parts: int | str) -> int:
    """A well-mixed 63-bit seed from integers and strings, stable across runs and machines.

    NumPy's ``SeedSequence`` mixes the parts (so epoch 1 of seed 0 differs from epoch 0 of seed 1);
    a string enters as the first 8 bytes of its SHA-256.
    """
    words = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little") if isinstance(p, str) else int(p)
             for p in parts]
    if any(w < 0 for w in words):
        raise ValueError(f"derive_seed: parts must be non-negative, got {parts}")
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)

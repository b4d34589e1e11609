"""Training checkpoints: one file, written atomically, verified and read back without unpickling code.

``RUN_DIR/checkpoint.pt`` holds everything needed to continue a run exactly: the model and
optimizer state, early stopping (with the best weights), the RNG state of every process, the
progress (stage, epoch, step within the epoch, partial epoch sums, results of the finished
stages) and the run's fingerprint (data, numeric options, config.toml). It is replaced at every
epoch end, every ``checkpoint_every`` steps and on SIGINT/SIGTERM, through
``lhcnet.files.atomic_write``: a crash while writing leaves the previous file intact.

File layout: one header line ``LHCNET-CHECKPOINT <version> <sha256 of the payload> <payload
bytes>``, then the payload, a ``torch.save`` archive read with ``weights_only=True``. A damaged
or truncated file fails the checksum and is refused with a message naming it.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 2
_MAGIC = b"LHCNET-CHECKPOINT"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically, with its checksum."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = b"%s %d %s %d\n" % (_MAGIC, CHECKPOINT_VERSION, hashlib.sha256(payload).hexdigest().encode(),
                                  len(payload))
    return atomic_write(path, lambda f: (f.write(header), f.write(payload)))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; verify its checksum (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    data = path.read_bytes()
    end = data.find(b"\n", 0, 200)
    fields = data[:end].split(b" ") if end > 0 else []
    if len(fields) != 4 or fields[0] != _MAGIC:
        raise ValueError(f"{path}: not an lhcnet checkpoint (or one written by lhcnet before checkpoint "
                         f"version {CHECKPOINT_VERSION}); it cannot be resumed")
    if fields[1] != str(CHECKPOINT_VERSION).encode():
        raise ValueError(f"{path}: checkpoint version {fields[1].decode(errors='replace')}, this lhcnet "
                         f"reads version {CHECKPOINT_VERSION}")
    payload = memoryview(data)[end + 1:]
    if fields[3] != str(len(payload)).encode() or hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        raise ValueError(f"{path}: damaged checkpoint (checksum mismatch: truncated or altered); "
                         "it cannot be resumed")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # a valid checksum over an invalid archive: written by something else
        raise ValueError(f"{path}: unreadable checkpoint ({' '.join(str(exc).split())[:200]})") from None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG state (CPU, and the current CUDA device if used)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

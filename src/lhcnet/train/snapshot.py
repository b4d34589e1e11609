"""A run's checkpoint packed small enough to carry to another machine, or to commit beside its logs.

``pack_snapshot(run_dir, out)`` writes one safetensors file from ``RUN_DIR/checkpoint.pt`` and the
run's text files (``config.toml``, ``metrics.csv``, ``train.log``): every floating-point tensor in
float16 (kept as it was where float16 would overflow), each distinct tensor once (a run's best
weights are often its current ones), and, unless ``optimizer_state=True``, without the optimizer's
per-parameter state (SGD momentum, Adam moments); everything that is not a tensor (progress, early
stopping's numbers, the fingerprint) as JSON in the file's metadata. A compact ``resnet18v2_48``
run packs into ~27 MB instead of a 134 MB checkpoint.

``unpack_snapshot(file, run_dir)`` writes them back (tensors in their original dtypes), after which
``lhcnet train --out RUN_DIR --resume`` continues the run. The continuation is not bit-exact: the
weights carry float16 rounding (relative 2^-11) and a dropped optimizer state starts again from
zero (PyTorch's SGD then takes the first gradient as its momentum), so report a carried run as
such. The model files of finished stages are not carried.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..files import atomic_write_bytes
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

__all__ = ["pack_snapshot", "unpack_snapshot", "SNAPSHOT_FORMAT", "RUN_TEXT_FILES"]

SNAPSHOT_FORMAT = "lhcnet-run-snapshot-1"
RUN_TEXT_FILES = ("config.toml", "metrics.csv", "train.log")
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], seen: dict[str, str],
            dtype: torch.dtype) -> Any:
    """``value`` as JSON; its tensors go into ``tensors`` (by path, each distinct one once)."""
    if isinstance(value, torch.Tensor):
        original = value.detach().cpu().contiguous()
        digest = hashlib.sha256(original.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        key = f"{digest}:{original.dtype}:{tuple(original.shape)}"
        if key not in seen:
            stored = original
            if original.dtype in _FLOATS and original.dtype != dtype:
                packed = original.to(dtype)
                if torch.isfinite(packed).all() or not torch.isfinite(original).all():
                    stored = packed
            tensors[path] = stored
            seen[key] = path
        return {"tensor": seen[key], "dtype": str(original.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, f"{path}/{k}", tensors, seen, dtype)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, f"{path}/{i}", tensors, seen, dtype) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path}: cannot pack a {type(value).__name__} into a run snapshot")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]].to(getattr(torch, value["dtype"])).clone()
        if "dict" in value:
            return {k: _decode(v, tensors) for k, v in value["dict"]}
        if "tuple" in value:
            return tuple(_decode(v, tensors) for v in value["tuple"])
        return [_decode(v, tensors) for v in value["list"]]
    return value


def pack_snapshot(run_dir: str | Path, out: str | Path, dtype: torch.dtype = torch.float16,
                  optimizer_state: bool = False) -> Path:
    """Pack ``RUN_DIR``'s checkpoint and text files into the safetensors file ``out`` (atomically)."""
    run_dir, out = Path(run_dir), Path(out)
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    if not optimizer_state and isinstance(state.get("optimizer"), dict):
        state = {**state, "optimizer": {**state["optimizer"], "state": {}}}
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": SNAPSHOT_FORMAT, "state": json.dumps(_encode(state, "state", tensors, {}, dtype))}
    for name in RUN_TEXT_FILES:
        if (run_dir / name).is_file():
            metadata[f"file:{name}"] = (run_dir / name).read_bytes().decode("utf-8")  # line ends kept
    return atomic_write_bytes(out, save(tensors, metadata=metadata))


def unpack_snapshot(snapshot: str | Path, run_dir: str | Path) -> Path:
    """Write ``run_dir/checkpoint.pt`` and the run's text files from a snapshot; returns the
    checkpoint's path. Refuses a folder that already holds a checkpoint (it would be lost)."""
    snapshot, run_dir = Path(snapshot), Path(run_dir)
    if (run_dir / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"{run_dir / CHECKPOINT_NAME} exists: resume it with `lhcnet train --resume`, "
                              "or unpack the snapshot into another folder")
    try:
        with safe_open(str(snapshot), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # not a safetensors file, truncated, ...
        raise ValueError(f"{snapshot}: not a readable run snapshot ({' '.join(str(exc).split())[:200]})") from None
    if metadata.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{snapshot}: not an lhcnet run snapshot (format {metadata.get('format')!r}, "
                         f"expected {SNAPSHOT_FORMAT!r})")
    state = _decode(json.loads(metadata["state"]), tensors)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_TEXT_FILES:
        if f"file:{name}" in metadata:
            atomic_write_bytes(run_dir / name, metadata[f"file:{name}"].encode("utf-8"))
    return save_checkpoint(run_dir / CHECKPOINT_NAME, state)

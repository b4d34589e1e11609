"""Convert qubvel's Keras ImageNet weights (HDF5) into an lhcnet backbone safetensors file.

``lhcnet convert-weights resnet34_imagenet_1000_no_top.h5`` writes
``<LHCNET_HOME>/weights/resnet34v2_imagenet.safetensors``, which ``create_model(...,
pretrained="imagenet")`` loads (``docs/lhc-spec.md`` §3, §10). The HDF5 file is Keras'
``save_weights`` layout: one group per layer, datasets ``<layer>/kernel:0``, ``gamma:0``, ``beta:0``,
``moving_mean:0``, ``moving_variance:0``. Layer names map to our module names one to one::

    bn_data -> stem.bn_data (no gamma)    conv0 -> stem.conv0    bn0 -> stem.bn0
    stage{s}_unit{u}_{bn1,conv1,bn2,conv2,sc} -> stage{s}.unit{u}.{bn1,conv1,bn2,conv2,sc}
    bn1 -> bn1

Conv kernels are HWIO in Keras and OIHW in PyTorch. Needs ``h5py`` (``pip install lhcnet[h5]``).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

__all__ = ["QUBVEL_RESNET34_MD5", "read_keras_weights", "keras_to_state_dict", "convert_weights",
           "default_output"]

QUBVEL_RESNET34_MD5 = "8caaa0ad39d927cb8ba5385bf945d582"  # resnet34_imagenet_1000_no_top.h5

_LAYER_NAMES = {"bn_data": "stem.bn_data", "conv0": "stem.conv0", "bn0": "stem.bn0", "bn1": "bn1"}
_UNIT_LAYER = re.compile(r"^stage(\d+)_unit(\d+)_(bn1|bn2|conv1|conv2|sc)$")
_WEIGHT_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                 "moving_variance": "running_var"}
# Layers of qubvel's models that are not backbone weights (the ImageNet classifier of the "top" file).
_IGNORED_LAYERS = ("fc1",)


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ImportError("converting Keras .h5 weights needs h5py: pip install 'lhcnet[h5]'") from None
    return h5py


def _layer_groups(root: Any) -> Iterator[tuple[str, Any]]:
    """(layer name, group) pairs of a Keras weights file (``save_weights`` or a full ``save``)."""
    if "model_weights" in root:  # a whole-model file keeps the weights one level down
        root = root["model_weights"]
    names = root.attrs.get("layer_names")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names is not None else list(root)
    for name in names:
        yield name, root[name]


def _datasets(group: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(short weight name, array) pairs: ``kernel``, ``gamma``... (``weight_names`` order if given)."""
    names = group.attrs.get("weight_names")
    if names is None:
        found: list[str] = []
        group.visit(lambda key: found.append(key) if hasattr(group[key], "shape") else None)
        names = found
    for name in names:
        name = name.decode() if isinstance(name, bytes) else str(name)
        short = name.rsplit("/", 1)[-1].split(":")[0]
        yield short, np.asarray(group[name])


def read_keras_weights(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``{layer name: {weight name: array}}`` for every layer that has weights."""
    h5py = _import_h5py()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras weights file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5 file ({exc})") from None
    layers = {}
    with f:
        for name, group in _layer_groups(f):
            weights = dict(_datasets(group))
            if weights:  # activations, pads and pools are groups without weights
                layers[name] = weights
    return layers


def _module_name(layer: str) -> str | None:
    if layer in _LAYER_NAMES:
        return _LAYER_NAMES[layer]
    match = _UNIT_LAYER.match(layer)
    if match:
        stage, unit, part = match.groups()
        return f"stage{stage}.unit{unit}.{part}"
    return None


def keras_to_state_dict(layers: dict[str, dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Rename and transpose Keras layer weights into a ``PreActResNet`` backbone state dict."""
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for layer, weights in layers.items():
        module = _module_name(layer)
        if module is None:
            if layer not in _IGNORED_LAYERS:
                unknown.append(layer)
            continue
        for short, array in weights.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            if short == "kernel":
                if tensor.ndim != 4:
                    raise ValueError(f"layer {layer}: expected a 4-d conv kernel, got shape {tuple(tensor.shape)}")
                state[f"{module}.weight"] = tensor.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
            elif short in _WEIGHT_NAMES:
                state[f"{module}.{_WEIGHT_NAMES[short]}"] = tensor
            else:
                raise ValueError(f"layer {layer}: unexpected weight {short!r}")
        if "moving_mean" in weights:  # a BatchNorm: PyTorch also keeps a step counter
            state[f"{module}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if unknown:
        raise ValueError(f"layers that are not part of qubvel's pre-activation ResNet: {unknown[:5]}")
    return state


def _check_against(model: nn.Module, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "lhc."))}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{source} does not fit {name}: missing {missing[:4]} "
                         f"({len(missing)} in all), unexpected {extra[:4]} ({len(extra)} in all)")
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(own[key].shape)}")


def default_output(model: str = "resnet34v2") -> Path:
    """Where ``pretrained="imagenet"`` looks for a model's converted weights."""
    from .models.registry import base_model_name, default_weights_dir
    return default_weights_dir() / f"{base_model_name(model)}_imagenet.safetensors"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_weights(h5_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                    model: str | nn.Module = "resnet34v2") -> dict[str, Any]:
    """Convert a qubvel Keras ``.h5`` into backbone weights for ``model`` (a registered name or a
    module) and write them as safetensors. Returns a summary (output path, tensors, md5)."""
    from .models import create_model
    from .files import atomic_write_bytes

    h5_path = Path(h5_path)
    net = create_model(model) if isinstance(model, str) else model
    name = model if isinstance(model, str) else type(model).__name__
    if out_path is None:
        out_path = default_output(model if isinstance(model, str) else "resnet34v2")
    out = Path(out_path)
    state = keras_to_state_dict(read_keras_weights(h5_path))
    _check_against(net, name, state, str(h5_path))
    md5 = _md5(h5_path)
    atomic_write_bytes(out, save(state, metadata={"source": h5_path.name, "md5": md5, "model": name,
                                                  "converter": "lhcnet.convert"}))
    return {"output": out, "tensors": len(state), "md5": md5,
            "md5_matches_qubvel_resnet34": md5 == QUBVEL_RESNET34_MD5,
            "parameters": sum(t.numel() for k, t in state.items() if not k.endswith("num_batches_tracked"))}

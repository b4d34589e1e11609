"""ImageNet backbone weights from local files, converted once into lhcnet safetensors files.

Two sources, neither downloaded at run time (``docs/lhc-spec.md`` §3, §10):

- qubvel's Keras ResNet-34 (``resnet34_imagenet_1000_no_top.h5``, the paper's backbone) for the
  pre-activation ResNets: ``lhcnet convert-weights resnet34_imagenet_1000_no_top.h5``.
- torchvision's ResNet-18/34 (``resnet34-b627a593.pth``) for the ``tv_*`` models:
  ``lhcnet convert-weights resnet34-b627a593.pth --model tv_resnet34``. The ``.pth`` file is a
  pickle; it is read with ``torch.load(weights_only=True)``, which unpickles nothing but tensors.

Both write ``<LHCNET_HOME>/weights/<backbone>_imagenet.safetensors``, which ``create_model(...,
pretrained="imagenet")`` loads (``imagenet_weights`` finds it, or says how to make it).

The HDF5 file is Keras' ``save_weights`` layout: one group per layer, datasets
``<layer>/kernel:0``, ``gamma:0``, ``beta:0``, ``moving_mean:0``, ``moving_variance:0``. Layer
names map to our module names one to one::

    bn_data -> stem.bn_data (no gamma)    conv0 -> stem.conv0    bn0 -> stem.bn0
    stage{s}_unit{u}_{bn1,conv1,bn2,conv2,sc} -> stage{s}.unit{u}.{bn1,conv1,bn2,conv2,sc}
    bn1 -> bn1

Conv kernels are HWIO in Keras and OIHW in PyTorch. Needs ``h5py`` (``pip install lhcnet[h5]``).
torchvision's keys are ours under ``net.`` (``TorchvisionResNet``); its ImageNet classifier
(``fc.*``) is dropped. Its file names carry the first hex digits of the file's SHA-256.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

__all__ = ["QUBVEL_RESNET34_MD5", "QUBVEL_RESNET34_URL", "TORCHVISION_IMAGENET", "read_keras_weights",
           "keras_to_state_dict", "read_torchvision_weights", "torchvision_to_state_dict",
           "convert_weights", "default_output", "imagenet_weights"]

QUBVEL_RESNET34_MD5 = "8caaa0ad39d927cb8ba5385bf945d582"  # resnet34_imagenet_1000_no_top.h5
QUBVEL_RESNET34_URL = ("https://github.com/qubvel/classification_models/releases/download/0.0.1/"
                       "resnet34_imagenet_1000_no_top.h5")
# torchvision's IMAGENET1K_V1 weights (ResNet18_Weights / ResNet34_Weights): the file name ends in
# the first 8 hex digits of its SHA-256
TORCHVISION_IMAGENET = {"tv_resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                        "tv_resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth"}

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
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "lhc.", "net.fc."))}
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


def imagenet_weights(model: str) -> Path:
    """The converted ImageNet weights of a registered model, or one ``FileNotFoundError`` line that
    names the file to download (URL, checksum) and the ``lhcnet convert-weights`` command."""
    from .models.registry import base_model_name
    path = default_output(model)
    if path.is_file():
        return path
    base = base_model_name(model)
    if base in TORCHVISION_IMAGENET:
        url = TORCHVISION_IMAGENET[base]
        source, checksum, option = url.rsplit("/", 1)[1], "sha256 starting " + _hash_prefix(url), f" --model {base}"
    else:
        url, source, checksum, option = QUBVEL_RESNET34_URL, url_name(QUBVEL_RESNET34_URL), \
            f"md5 {QUBVEL_RESNET34_MD5}", ""
    raise FileNotFoundError(
        f"ImageNet weights for {base} not found at {path}. Without internet access they cannot be "
        f"downloaded here. On a machine with internet, download '{source}' ({url}, {checksum}), then "
        f"run 'lhcnet convert-weights {source}{option} -o {path}' (or set LHCNET_HOME).")


def url_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _hash_prefix(url: str) -> str:
    """torchvision's convention: ``resnet34-b627a593.pth`` -> ``b627a593``."""
    return url_name(url).rsplit(".", 1)[0].rsplit("-", 1)[1]


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_torchvision_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torchvision ``.pth`` state dict, loaded with ``torch.load(weights_only=True)`` (no code
    is unpickled: anything but tensors and plain containers is refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"torchvision weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        message = " ".join(str(exc).split())[:200]
        raise ValueError(f"{path}: not a PyTorch weights file that loads safely ({message})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), as torchvision saves")
    return state


def torchvision_to_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet keys -> ``TorchvisionResNet`` keys (``net.`` prefix), classifier dropped."""
    return {f"net.{k}": v.float().contiguous() if v.is_floating_point() else v
            for k, v in state.items() if not k.startswith("fc.")}


def convert_weights(source: str | os.PathLike, out_path: str | os.PathLike | None = None,
                    model: str | nn.Module | None = None) -> dict[str, Any]:
    """Convert ImageNet weights for ``model`` (a registered name or a module) and write them as
    safetensors: a qubvel Keras ``.h5`` (default model ``resnet34v2``) or a torchvision ``.pth``
    (default ``tv_resnet34``). Returns a summary (output path, tensors, weights, checksum and
    whether it is that of the published file)."""
    from .files import atomic_write_bytes
    from .models import create_model
    from .models.registry import base_model_name

    source = Path(source)
    torchvision_file = source.suffix in (".pth", ".pt")
    if model is None:
        model = "tv_resnet34" if torchvision_file else "resnet34v2"
    net = create_model(model) if isinstance(model, str) else model
    name = model if isinstance(model, str) else type(model).__name__
    if torchvision_file:
        expected = TORCHVISION_IMAGENET.get(base_model_name(name)) if isinstance(model, str) else None
        state = torchvision_to_state_dict(read_torchvision_weights(source))
        sha256 = _file_digest(source, "sha256")
        checksum, verified = f"sha256 {sha256}", expected is not None and sha256.startswith(_hash_prefix(expected))
        reference = f"torchvision's {url_name(expected)}" if expected else "a torchvision file"
    else:
        state = keras_to_state_dict(read_keras_weights(source))
        md5 = _file_digest(source, "md5")
        checksum, verified = f"md5 {md5}", md5 == QUBVEL_RESNET34_MD5
        reference = f"qubvel's {url_name(QUBVEL_RESNET34_URL)} (md5 {QUBVEL_RESNET34_MD5})"
    _check_against(net, name, state, str(source))
    out = Path(out_path) if out_path is not None else default_output(name if isinstance(model, str) else "resnet34v2")
    atomic_write_bytes(out, save(state, metadata={"source": source.name, "checksum": checksum, "model": name,
                                                  "converter": "lhcnet.convert"}))
    return {"output": out, "model": name, "tensors": len(state), "checksum": checksum, "verified": verified,
            "reference": reference,
            "parameters": sum(t.numel() for k, t in state.items() if not k.endswith("num_batches_tracked"))}

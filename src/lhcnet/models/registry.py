"""Model registry and model files.

``create_model(name, num_classes=7, **overrides)`` builds a registered model; ``save_model`` writes
its weights as safetensors with the model's name and settings in the metadata, so that
``load_model(path)`` rebuilds it from the file alone. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..files import atomic_write

from .backbones import resnet18v2_48, resnet34v2
from .lhcnet import PAPER_BLOCKS, PAPER_GATES, LHCBlock, insert_lhc
from .torchvision_resnet import TorchvisionResNet

__all__ = ["LHCNetModel", "ModelSpec", "register_model", "list_models", "model_spec", "create_model", "save_model",
           "load_model", "load_weights", "weights_checksum", "base_model_name", "read_model_metadata",
           "load_backbone_weights", "COMPACT_BLOCKS",
           "TORCHVISION_BLOCKS", "FORMAT_VERSION"]

FORMAT_VERSION = 2  # 2: the weights' SHA-256 in the metadata (files of version 1 have none)
METADATA_KEY = "lhcnet"

# Compact LHC-Net for 48x48 input (resnet18v2_48: maps 24x24x48, 24x24x48, 12x12x96, 6x6x192,
# 3x3x384). Heads mirror the paper's 8, 8, 7, 7, 1 as far as whole rows allow (3, 3, 2, 1, 3
# rows per head) and embed dims keep the paper's d ~ r/2 (196/392, 56/112, 14/28, 25/49).
COMPACT_BLOCKS: tuple[LHCBlock, ...] = (
    LHCBlock("stem", 48, 24, heads=8, embed_dim=36),
    LHCBlock("stage1", 48, 24, heads=8, embed_dim=36),
    LHCBlock("stage2", 96, 12, heads=6, embed_dim=12),
    LHCBlock("stage3", 192, 6, heads=6, embed_dim=3),
    LHCBlock("stage4", 384, 3, heads=1, embed_dim=5),
)
# torchvision ResNet-18/34 at 224x224 have the same map sizes as ResNet34v2: reuse the paper's
# settings at the equivalent places.
TORCHVISION_BLOCKS: tuple[LHCBlock, ...] = tuple(
    LHCBlock(f"net.{place}", **{k: v for k, v in vars(b).items() if k != "place"})
    for place, b in zip(("maxpool", "layer1", "layer2", "layer3", "layer4"), PAPER_BLOCKS))


@runtime_checkable
class LHCNetModel(Protocol):
    """What lhcnet's training, evaluation and prediction use of a model from ``create_model`` /
    ``load_model``: an ``nn.Module`` taking RGB ``(B, 3, input_size, input_size)`` 0..255 and
    returning logits, that knows its input side and how it was built (``lhcnet_config``: name,
    num_classes, settings; ``save_model`` stores it)."""

    input_size: int
    lhcnet_config: dict[str, Any]
    training: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> Any: ...
    def parameters(self) -> Any: ...
    def named_parameters(self) -> Any: ...
    def modules(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its backbone builder, LHC blocks (if any) and LHC-NetC gates (if any)."""

    name: str
    backbone: Callable[..., nn.Module]
    blocks: tuple[LHCBlock, ...] = ()
    gates: tuple[float, ...] | None = None
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        return self.defaults.get("input_size", 224)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _register_family(base: str, backbone: Callable[..., nn.Module], blocks: tuple[LHCBlock, ...],
                     what: str, input_size: int) -> None:
    defaults = {"input_size": input_size}
    register_model(ModelSpec(base, backbone, description=what, defaults=defaults))
    register_model(ModelSpec(f"lhcnet_{base}", backbone, blocks,
                             description=f"LHC-Net: {what} + {len(blocks)} LHC blocks", defaults=defaults))
    register_model(ModelSpec(f"lhcnetc_{base}", backbone, blocks, PAPER_GATES,
                             description=f"LHC-NetC: LHC-Net on {what} with trainable gates",
                             defaults=defaults))


_register_family("resnet34v2", resnet34v2, PAPER_BLOCKS, "pre-activation ResNet-34 (paper), 224 px", 224)
_register_family("resnet18v2_48", resnet18v2_48, COMPACT_BLOCKS, "compact pre-act ResNet-18, 48 px", 48)
_register_family("tv_resnet18", lambda num_classes=7, **kw: TorchvisionResNet("resnet18", num_classes, **kw),
                 TORCHVISION_BLOCKS, "torchvision ResNet-18, 224 px", 224)
_register_family("tv_resnet34", lambda num_classes=7, **kw: TorchvisionResNet("resnet34", num_classes, **kw),
                 TORCHVISION_BLOCKS, "torchvision ResNet-34, 224 px", 224)


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int = 7, pretrained: str | os.PathLike | None = None,
                 **overrides: Any) -> LHCNetModel:
    """Build a registered model.

    Args:
        name: one of ``list_models()``.
        num_classes: classifier outputs (7 for FER2013, 8 for FER+).
        pretrained: backbone initialisation: None (random), ``"imagenet"`` or a path to a
            safetensors file of backbone weights (see ``load_backbone_weights``).
        overrides: keyword arguments of the backbone builder (e.g. ``dropout``, ``head_hidden``);
            those named ``lhc_<option>`` go to every LHC block's constructor instead (e.g.
            ``lhc_layer_scale_init=0.0``, recipe ``model_args = { lhc_layer_scale_init = 0.0 }``).
    """
    spec = model_spec(name)
    backbone_args = {k: v for k, v in overrides.items() if not k.startswith("lhc_")}
    lhc_options = {k.removeprefix("lhc_"): v for k, v in overrides.items() if k.startswith("lhc_")}
    if lhc_options and not spec.blocks:
        raise ValueError(f"{name} has no LHC blocks for the options {sorted(overrides.keys() - backbone_args.keys())}")
    model = spec.backbone(num_classes=num_classes, **backbone_args)
    if pretrained is not None:
        load_backbone_weights(model, pretrained, name)
    if spec.blocks:
        insert_lhc(model, spec.blocks, spec.gates, **lhc_options)
    model.lhcnet_config = {"name": name, "num_classes": num_classes, "settings": dict(overrides)}
    return model


def base_model_name(name: str) -> str:
    """The backbone a registered name builds on: ``lhcnetc_resnet34v2`` -> ``resnet34v2``."""
    return name.removeprefix("lhcnetc_").removeprefix("lhcnet_")


def default_weights_dir() -> Path:
    return Path(os.environ.get("LHCNET_HOME", Path.home() / ".cache" / "lhcnet")) / "weights"


def load_backbone_weights(model: nn.Module, source: str | os.PathLike, name: str = "") -> None:
    """Load ImageNet (or other) backbone weights by parameter name; the classifier head is skipped.

    ``source="imagenet"``: the converted ImageNet file ``<LHCNET_HOME>/weights/<backbone>_imagenet
    .safetensors`` (``lhcnet convert-weights``: qubvel's Keras file for the pre-activation ResNets,
    torchvision's for ``tv_*``); nothing is downloaded. Otherwise ``source`` is a safetensors file.
    """
    if str(source) == "imagenet":
        from ..convert import imagenet_weights
        source = imagenet_weights(name or "resnet34v2")
    state = load_weights(source)
    own = model.state_dict()
    backbone_keys = {k for k in own if not k.startswith(("head.", "lhc.", "net.fc."))}
    missing = sorted(backbone_keys - set(state))
    if missing:
        raise ValueError(f"{source}: backbone weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    for key in backbone_keys:
        if state[key].shape != own[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    model.load_state_dict({k: state[k] for k in backbone_keys}, strict=False)


def weights_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (the file layout
    does not matter, so the check covers exactly what a model loads)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_model(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write weights (optionally cast to ``dtype``, e.g. fp16), settings and the weights' checksum
    atomically (``lhcnet.files.atomic_write``: the umask applies)."""
    model = getattr(model, "module", model)  # DDP / DataParallel / compiled wrappers first: they
    model = getattr(model, "_orig_mod", model)  # do not forward lhcnet_config
    config = getattr(model, "lhcnet_config", None)
    if config is None:
        raise ValueError("save_model needs a model made by lhcnet.create_model (it has no lhcnet_config)")
    tensors = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    meta = {"format_version": FORMAT_VERSION, **config, "info": extra or {}, "sha256": weights_checksum(tensors)}
    data = safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    return atomic_write(path, lambda f: f.write(data))


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON settings stored in a model file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a safetensors model file ({exc})") from None
    if raw is None:
        raise ValueError(f"{path}: safetensors file without lhcnet metadata (not saved by lhcnet.save_model)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: damaged model metadata (not JSON: {exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        raise ValueError(f"{path}: damaged model metadata (expected a JSON object with a format_version)")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: model file format {meta['format_version']}; this lhcnet reads up to "
                         f"{FORMAT_VERSION} (upgrade lhcnet)")
    return meta


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, verified: the checksum ``save_model`` stored (files from
    before format 2, e.g. older downloads, have none) and finite floating-point values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises its own error types for bad headers and data
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())[:200]})") from None
    expected = read_model_metadata(path).get("sha256") if raw is not None else None
    if expected is not None and weights_checksum(tensors) != expected:
        raise ValueError(f"{path}: damaged model file (the weights do not match their stored checksum)")
    for key, tensor in tensors.items():
        # one float64 reduction: NaN and inf propagate through a sum, and no finite weights overflow it
        if tensor.is_floating_point() and not math.isfinite(float(tensor.sum(dtype=torch.float64))):
            raise ValueError(f"{path}: weight {key!r} holds non-finite values (NaN or inf); the file is "
                             "damaged or was saved from a diverged model")
    return tensors


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LHCNetModel:
    """Rebuild a model from a file written by ``save_model`` (weights in float32, eval mode)."""
    meta = read_model_metadata(path)
    state = load_weights(path)
    try:
        settings = dict(meta.get("settings", {}))
        if "head_hidden" in settings:  # JSON has no tuples
            settings["head_hidden"] = tuple(settings["head_hidden"])
        model = create_model(meta["name"], num_classes=int(meta["num_classes"]), **settings)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: model metadata does not describe an lhcnet model "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit {meta['name']!r} "
                         f"({' '.join(str(exc).split())[:300]})") from None
    model.lhcnet_metadata = meta
    return model.to(device).eval()

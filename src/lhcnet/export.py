"""Exported models: ONNX (dynamic batch, run by ONNX Runtime) and TorchScript.

LHC blocks run as forward hooks; both exports trace the model, and tracing records what hooks do,
so the exported graphs contain the LHC blocks (the tests check outputs against PyTorch). ONNX
export tries PyTorch's TorchScript-based exporter first (``dynamo=False``): it handles the hooks
and a symbolic batch size, takes about a second for the compact model and needs no
``onnxscript``. If it fails on some operation, the ``torch.export``-based exporter (``dynamo=True``,
needs ``onnxscript``, slower) is tried. Both files carry the model's lhcnet metadata (name,
settings, ``info`` with the class names, ``input_size``) so that ``OnnxModel`` and
``torch.jit.load`` users can read it back: ONNX in ``metadata_props["lhcnet"]``, TorchScript as
the extra file ``lhcnet.json``.

``onnx`` and ``onnxruntime`` are the optional extra ``lhcnet[onnx]``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DEFAULT_OPSET", "METADATA_KEY", "model_metadata", "onnx_bytes", "export_onnx",
           "export_torchscript", "OnnxModel"]

# The TorchScript-based exporter's well-tested opset; torch.export's exporter writes 18 natively.
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
METADATA_KEY = "lhcnet"
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"ONNX support needs the optional packages onnx and onnxruntime: "
                          f"pip install 'lhcnet[onnx]' (missing: {module})") from None


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """What an exported file records about ``model``: lhcnet metadata or config, plus input_size."""
    meta = dict(getattr(model, "lhcnet_metadata", None) or getattr(model, "lhcnet_config", None) or {})
    meta.setdefault("info", {})
    meta["input_size"] = int(model.input_size)
    return meta


def _example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    device = next(model.parameters()).device
    size = int(model.input_size)
    return torch.full((batch, 3, size, size), 128.0, device=device)


@contextlib.contextmanager
def _tracing(model: nn.Module) -> Iterator[None]:
    """Eval mode and no tracing warnings (shape checks kept as constants) while exporting."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null: the TorchScript-based exporter prints the whole graph
    there from C++ when it fails, which would corrupt JSON on stdout (``lhcnet predict --json``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def onnx_bytes(model: nn.Module, opset: int | None = None, exporter: str = "auto") -> bytes:
    """The serialised ONNX model (``input`` (batch, 3, S, S) float 0..255 -> ``logits``).

    ``exporter``: ``"torchscript"``, ``"dynamo"`` or ``"auto"`` (the first, then the second if
    the first fails on some operation).
    """
    onnx = _require("onnx")
    if exporter == "auto":
        try:
            return onnx_bytes(model, opset, "torchscript")
        except torch.onnx.errors.OnnxExporterError as first:
            try:
                return onnx_bytes(model, opset, "dynamo")
            except ImportError:  # onnxscript, which torch.export's exporter needs
                raise first from None
    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"exporter must be 'auto' or one of {sorted(DEFAULT_OPSET)}, got {exporter!r}")
    opset = opset or DEFAULT_OPSET[exporter]
    example = _example_input(model)
    with _tracing(model):
        if exporter == "torchscript":
            buffer = io.BytesIO()
            with _stdout_silenced():
                torch.onnx.export(model, (example,), buffer, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            proto = onnx.load_from_string(buffer.getvalue())
        else:
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset,
                                        dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
            proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(model_metadata(model))
    return proto.SerializeToString()


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int | None = None,
                exporter: str = "auto") -> Path:
    """Write ``model`` as an ONNX file with a dynamic batch axis; returns the path."""
    path = Path(path)
    data = onnx_bytes(model, opset, exporter)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` traced to TorchScript (any batch size); load with ``torch.jit.load``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _tracing(model), torch.no_grad():  # also quiets torch.jit's deprecation warnings
        traced = torch.jit.trace(model, _example_input(model))
        torch.jit.save(traced, str(path),
                       _extra_files={f"{METADATA_KEY}.json": json.dumps(model_metadata(model))})
    return path


class OnnxModel:
    """An ONNX model run by ONNX Runtime, called like the PyTorch model: ``logits = m(x)``.

    Args:
        source: an ``.onnx`` file written by ``export_onnx`` or the bytes of ``onnx_bytes``.
        device: ``"cuda"`` uses ONNX Runtime's CUDA provider when it is installed; else the CPU.

    ONNX Runtime runs with ``torch.get_num_threads()`` threads, so ``torch.set_num_threads``
    sets both backends.
    """

    def __init__(self, source: str | os.PathLike | bytes, device: str | torch.device | None = None) -> None:
        ort = _require("onnxruntime")
        providers = ["CPUExecutionProvider"]
        if device is not None and torch.device(device).type == "cuda" \
                and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        if not isinstance(source, bytes):
            if not Path(source).is_file():
                raise FileNotFoundError(f"ONNX model file not found: {source}")
            source = str(source)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # one thread setting for both backends
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            name = "ONNX bytes" if isinstance(source, bytes) else source
            raise ValueError(f"{name}: not a loadable ONNX model ({' '.join(str(exc).split())})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.lhcnet_metadata: dict[str, Any] = json.loads(raw) if raw else {"info": {}}
        shape = self.session.get_inputs()[0].shape  # [batch, 3, S, S]
        self.input_size = int(self.lhcnet_metadata.get("input_size") or shape[-1])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` (B, 3, S, S) float 0..255, as a CPU tensor."""
        array = x.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

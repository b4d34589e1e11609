"""``lhcnet export MODEL_FILE --format onnx|torchscript -o FILE``: deployable model files."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from ..export import DEFAULT_OPSET, OnnxModel, export_onnx, export_torchscript
from ..models import load_model

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
CHECK_BATCH = 3  # not the export's example batch (2): the check exercises the dynamic batch axis


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model file to ONNX (dynamic batch) or TorchScript",
                       description="Export a .safetensors model (from save_model / lhcnet train) to "
                                   "ONNX or TorchScript and check the export against PyTorch.")
    p.add_argument("model", metavar="MODEL_FILE", help="a .safetensors model file")
    p.add_argument("--format", choices=tuple(SUFFIXES), default="onnx")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="output file (default: MODEL_FILE with .onnx / .pt)")
    p.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET['torchscript']})")
    p.add_argument("--exporter", choices=("auto", *DEFAULT_OPSET), default="auto",
                   help="PyTorch's TorchScript-based ONNX exporter, torch.export's (dynamo), or "
                        "auto: the first, else the second (default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    output = args.output or Path(args.model).with_suffix(SUFFIXES[args.format])
    size = model.input_size
    x = torch.rand(CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        expected = model(x)
    if args.format == "onnx":
        try:
            export_onnx(model, output, opset=args.opset, exporter=args.exporter)
            got = OnnxModel(output)(x)
        except ImportError as exc:
            print(f"lhcnet export: error: {exc}", file=sys.stderr)
            return 2
    else:
        export_torchscript(model, output)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
            got = torch.jit.load(str(output))(x)
    diff = (got - expected).abs().max().item()
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, {args.format}); "
          f"max |export - PyTorch| on {CHECK_BATCH} random inputs: {diff:.2e}")
    return 0

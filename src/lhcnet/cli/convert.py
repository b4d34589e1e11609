"""``lhcnet convert-weights``: ImageNet weights from a local file -> backbone safetensors (spec §10)."""
from __future__ import annotations

import argparse

from ..convert import QUBVEL_RESNET34_URL, TORCHVISION_IMAGENET
from ..models.registry import default_weights_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-weights", help="convert ImageNet weights (qubvel's .h5, torchvision's .pth) for pretrained='imagenet'",
        description="Convert qubvel's resnet34_imagenet_1000_no_top.h5 (download it from "
                    f"{QUBVEL_RESNET34_URL}; needs h5py) or torchvision's ResNet weights ("
                    f"{', '.join(TORCHVISION_IMAGENET.values())}; read with torch.load(weights_only=True)) "
                    "into the safetensors file that create_model(..., pretrained='imagenet') and recipes "
                    f"with pretrained = 'imagenet' load (by default {default_weights_dir()}/"
                    "<model>_imagenet.safetensors).")
    parser.add_argument("weights", help="the weights file: Keras .h5 or torchvision .pth")
    parser.add_argument("-o", "--output", help="output .safetensors (default: where pretrained='imagenet' looks)")
    parser.add_argument("--model", help="the lhcnet model the weights are for (default: resnet34v2 for an "
                        ".h5, a pre-activation ResNet with qubvel's layer names; tv_resnet34 for a .pth; "
                        "tv_resnet18 for torchvision's ResNet-18)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert_weights

    summary = convert_weights(args.weights, args.output, model=args.model)
    model = summary["model"]
    print(f"wrote {summary['output']}: {summary['tensors']} tensors, {summary['parameters']:,} weights "
          f"(BatchNorm statistics included) for {model}")
    if summary["verified"]:
        print(f"{summary['checksum']}: {summary['reference']} (verified)")
    else:
        print(f"note: {summary['checksum']} is not that of {summary['reference']}; the layer names and "
              f"shapes fit {model}")
    return 0

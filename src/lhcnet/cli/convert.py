"""``lhcnet convert-weights``: qubvel's Keras ImageNet .h5 -> backbone safetensors (spec §10)."""
from __future__ import annotations

import argparse

from ..models.registry import default_weights_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-weights", help="convert qubvel's Keras ImageNet weights (.h5) for pretrained='imagenet'",
        description="Convert qubvel's resnet34_imagenet_1000_no_top.h5 (download it from "
                    "https://github.com/qubvel/classification_models/releases/download/0.0.1/"
                    "resnet34_imagenet_1000_no_top.h5) into the safetensors file that "
                    "create_model(..., pretrained='imagenet') and recipes with pretrained = 'imagenet' "
                    f"load (by default {default_weights_dir()}/<model>_imagenet.safetensors). Needs h5py.")
    parser.add_argument("h5", help="the Keras .h5 weights file")
    parser.add_argument("-o", "--output", help="output .safetensors (default: where pretrained='imagenet' looks)")
    parser.add_argument("--model", default="resnet34v2", help="the lhcnet model the weights are for "
                        "(default resnet34v2; a pre-activation ResNet with qubvel's layer names)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import QUBVEL_RESNET34_MD5, convert_weights

    summary = convert_weights(args.h5, args.output, model=args.model)
    print(f"wrote {summary['output']}: {summary['tensors']} tensors, {summary['parameters']:,} weights "
          f"(Keras count: BatchNorm statistics included) for {args.model}")
    if summary["md5_matches_qubvel_resnet34"]:
        print(f"md5 {summary['md5']}: qubvel's resnet34_imagenet_1000_no_top.h5 (verified)")
    else:
        print(f"note: md5 {summary['md5']} is not that of qubvel's resnet34_imagenet_1000_no_top.h5 "
              f"({QUBVEL_RESNET34_MD5}); the layer names and shapes fit {args.model}")
    return 0

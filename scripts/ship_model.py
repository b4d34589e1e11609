"""Put a trained model into the package as the bundled default (``lhcnet/weights/default.safetensors``).

Stores fp16 weights when that costs at most ``--max-fp16-drop`` points of PrivateTest accuracy
(else fp32), and records in the file's metadata the accuracy on a fixed PublicTest subset (the
first ``--check-images`` faces) that ``tests/test_bundled_model.py`` re-measures.

    python scripts/ship_model.py runs/compact/final.safetensors --data ../shared/data/fer2013.csv.gz
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from lhcnet.data import load_dataset
from lhcnet.evaluate import predict_probabilities
from lhcnet.models import load_model, save_model

TARGET = Path(__file__).resolve().parents[1] / "src" / "lhcnet" / "weights" / "default.safetensors"


def accuracy(model: torch.nn.Module, images, labels) -> float:
    probs = predict_probabilities(model, torch.from_numpy(images.copy()))
    return (probs.argmax(1) == torch.from_numpy(labels)).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--check-images", type=int, default=1000)
    parser.add_argument("--max-fp16-drop", type=float, default=0.1, help="percentage points")
    parser.add_argument("-o", "--out", type=Path, default=TARGET)
    args = parser.parse_args()

    data = load_dataset(args.data)
    test, val = data.split("PrivateTest"), data.split("PublicTest")
    model = load_model(args.model)
    info = dict(model.lhcnet_metadata.get("info", {}))
    acc32 = accuracy(model, test.images, test.labels)
    with tempfile.TemporaryDirectory() as tmp:
        half = load_model(save_model(model, Path(tmp) / "fp16.safetensors", dtype=torch.float16,
                                     extra=info))
    acc16 = accuracy(half, test.images, test.labels)
    use_fp16 = (acc32 - acc16) * 100 <= args.max_fp16_drop
    shipped = half if use_fp16 else model
    n = args.check_images
    info["reference_check"] = {"split": "PublicTest", "images": n,
                               "accuracy": round(accuracy(shipped, val.images[:n], val.labels[:n]), 4)}
    info["privatetest_accuracy"] = round(acc16 if use_fp16 else acc32, 4)
    info["source_file"] = args.model.name
    save_model(shipped, args.out, dtype=torch.float16 if use_fp16 else None, extra=info)
    print(json.dumps({"privatetest_fp32": acc32, "privatetest_fp16": acc16, "stored": "fp16" if use_fp16
                      else "fp32", "size_bytes": args.out.stat().st_size, **info["reference_check"]}, indent=2))


if __name__ == "__main__":
    main()

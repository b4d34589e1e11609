"""Make the example figures of docs/evaluation.md and docs/analysis.md (CPU, about 20 minutes).

The model is NOT the paper's LHC-Net: it is a small pre-activation ResNet (widths 16-32-64-128,
one unit per stage, 48 px) with five LHC blocks placed and shaped like ``lhcnet_resnet18v2_48``'s
(same head counts and embedding sizes), registered here as ``docs_small_lhcnet_48``, trained on
FER2013's Training split on the CPU as the paper does in miniature: the backbone alone for a few
epochs (Adam 1e-3, batch 64, flips and 10-degree rotations), then with the LHC blocks added for one
epoch (SGD 0.01, no augmentation). It is far from converged; the figures show what the commands
print and draw, not the paper's numbers.

Run from the repository root: ``python3 docs/figures/make_figures.py [--data FER2013] [--epochs N]``.
The figures and the commands' printed output (make_figures_output.txt) land in docs/figures/;
the model file goes to ``--work`` (default /tmp/lhcnet-docs) and is not part of the repository.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lhcnet import Predictor
from lhcnet.cli import main as lhcnet
from lhcnet.data import AugmentConfig, BatchLoader, load_dataset
from lhcnet.models import COMPACT_BLOCKS, LHCBlock, create_model, list_models, save_model
from lhcnet.models.backbones import PreActResNet
from lhcnet.models.registry import ModelSpec, register_model

HERE = Path(__file__).resolve().parent
BACKBONE, NAME = "docs_small_48", "docs_small_lhcnet_48"
WIDTHS = (16, 32, 64, 128)
# COMPACT_BLOCKS' places, heads and embedding sizes on the narrower maps (channels / 3).
BLOCKS = tuple(LHCBlock(b.place, c, b.resolution, heads=b.heads, embed_dim=b.embed_dim)
               for b, c in zip(COMPACT_BLOCKS, (16, *WIDTHS)))


def _backbone(num_classes: int = 7, **kwargs) -> PreActResNet:
    model = PreActResNet((1, 1, 1, 1), WIDTHS, num_classes, stem_kernel=3, stem_stride=1,
                         head_hidden=(128,), dropout=0.2, input_size=48, **kwargs)
    for module in model.modules():  # a short run: let BatchNorm statistics follow within an epoch
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model


if NAME not in list_models():
    register_model(ModelSpec(BACKBONE, _backbone, description="docs example: small pre-act ResNet, 48 px",
                             defaults={"input_size": 48}))
    register_model(ModelSpec(NAME, _backbone, BLOCKS, description="docs example: small LHC-Net, 48 px",
                             defaults={"input_size": 48}))


def fit(model: torch.nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer, epochs: int,
        stage: str) -> None:
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        began, total, correct, seen = time.time(), 0.0, 0, 0
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        print(f"{stage} epoch {epoch + 1}: train loss {total / seen:.3f}, acc {100 * correct / seen:.1f}%, "
              f"{time.time() - began:.0f} s", flush=True)


def train(data: str, epochs: int, out: Path) -> Path:
    """The paper's order in miniature: the backbone first (Adam, flips and rotations), then LHC
    blocks added to it and everything trained on (SGD 0.01, no augmentation; stage 4 of spec §5).
    LHC blocks on an untrained backbone kept this small net at the class prior."""
    dataset = load_dataset(data)
    train_split = dataset.split("Training")
    torch.manual_seed(0)
    backbone = create_model(BACKBONE)
    loader = BatchLoader(train_split, batch_size=64, size=48, shuffle=True, seed=0,
                         augment=AugmentConfig(rotation=10, flip=True))
    fit(backbone, loader, torch.optim.Adam(backbone.parameters(), lr=1e-3), epochs, "backbone")
    model = create_model(NAME)
    missing, _ = model.load_state_dict(backbone.state_dict(), strict=False)
    assert all(key.startswith("lhc.") for key in missing)
    loader = BatchLoader(train_split, batch_size=64, size=48, shuffle=True, seed=1)
    fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), 1, "LHC")
    params = sum(p.numel() for p in model.parameters())
    return save_model(model.eval(), out / "docs_small.safetensors",
                      extra={"classes": list(dataset.classes), "epochs": [epochs, 1], "params": params})


def run(args: list[str], log: Path) -> None:
    """Run an ``lhcnet`` command in this process (the model is registered here) and keep its output."""
    buffer = io.StringIO()
    began = time.time()
    with contextlib.redirect_stdout(buffer):
        code = lhcnet(args)
    text = f"$ lhcnet {' '.join(args)}\n{buffer.getvalue()}(exit {code}, {time.time() - began:.0f} s)\n"
    print(text, flush=True)
    with open(log, "a") as f:
        f.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data" / "fer2013.csv.gz"))
    parser.add_argument("--epochs", type=int, default=4, help="backbone epochs (then 1 with LHC)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lhcnet-docs"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small tensors on a shared 2-core machine: one thread is fastest
    model = args.work / "docs_small.safetensors"
    if not model.exists():
        model = train(args.data, args.epochs, args.work)
    log = HERE / "make_figures_output.txt"
    log.write_text("")
    out = args.work / "out"
    run(["evaluate", str(model), "--data", args.data, "--out", str(out / "plain"), "--device", "cpu"], log)
    run(["evaluate", str(model), "--data", args.data, "--tta", "--out", str(out / "tta"),
         "--device", "cpu"], log)
    run(["analyze", "blocks", str(model), "--data", args.data, "--out", str(out), "--device", "cpu"], log)
    run(["analyze", "heads", str(model), "--data", args.data, "--out", str(out), "--device", "cpu"], log)
    # The example photo's face (public domain, examples/README.md) as a crop file, as a user would
    # pass one: FER2013 images are never put into this repository, figures included.
    box = Predictor(model=model).predict(HERE.parents[1] / "examples" / "astronaut.jpg")[0]["box"]
    x, y, w, h = box
    face = args.work / "face.png"
    Image.open(HERE.parents[1] / "examples" / "astronaut.jpg").crop((x, y, x + w, y + h)).save(face)
    run(["analyze", "attention", str(model), str(face), "--block", "1",
         "-o", str(out / "attention.png")], log)
    for source, target in ((out / "tta" / "confusion_docs_small.png", "evaluate_confusion_tta.png"),
                           (out / "ablation.png", "analyze_blocks.png"),
                           (out / "head_correlation.png", "analyze_heads.png"),
                           (out / "attention.png", "analyze_attention.png")):
        (HERE / target).write_bytes(source.read_bytes())
        print(f"{target}: {(HERE / target).stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()

"""Training speed on this machine: images/s of full training steps, fp32/bf16 x channels_last.

    python3 benchmarks/train_speed.py                       # lhcnet_resnet34v2 at 224 px, batch 16
    python3 benchmarks/train_speed.py --model resnet18v2_48 --batch 64 --steps 5

A step is what the trainer does: a batch from ``BatchLoader`` (48 px uint8 faces resized on the
fly, stage-1 augmentation), forward under optional bf16 autocast, cross-entropy, backward, plain
SGD. Prints a table and the implied time of one epoch of the paper's protocol (28,709 training
images, validation not included). Keep ``--steps`` small on a shared CPU.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from lhcnet.data import AugmentConfig, BatchLoader
from lhcnet.models import create_model

TRAIN_IMAGES = 28_709  # FER2013 Training split: one paper epoch


def images_per_second(model_name: str, batch: int, steps: int, warmup: int, bf16: bool, channels_last: bool,
                      device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model(model_name).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(batch * (steps + warmup), 48, 48), dtype=np.uint8)
    labels = rng.integers(0, 7, size=len(faces))
    loader = BatchLoader(faces, labels, batch_size=batch, size=model.input_size, shuffle=True,
                         augment=AugmentConfig(rotation=30, flip=True), device=device)
    started = 0.0
    for step, (x, y) in enumerate(loader):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lhcnet_resnet34v2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{args.model}, batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'precision':<10}{'channels_last':<15}{'images/s':>10}{'paper epoch (28,709 images)':>30}")
    for bf16 in (False, True):
        for channels_last in (False, True):
            rate = images_per_second(args.model, args.batch, args.steps, args.warmup, bf16, channels_last, device)
            seconds = TRAIN_IMAGES / rate
            print(f"{'bf16' if bf16 else 'fp32':<10}{'yes' if channels_last else 'no':<15}{rate:>10.2f}"
                  f"{seconds / 3600:>22.2f} h ({seconds / 60:.0f} min)", flush=True)


if __name__ == "__main__":
    main()

"""Input pipeline vs model speed, measured side by side in one run (CPU).

1. The training pipeline: ``BatchLoader`` over uint8 48x48 faces, batch 64, resize to 224,
   stage-2 augmentation (rotation 10°, shift 0.1, zoom 0.1, flip; spec §5), RGB replication.
2. A training step (forward + backward + SGD update) of ``lhcnet_resnet34v2``, batch 16, fp32, 224.

The pipeline must be >= 10x faster than the model so that it never bounds training time.
Synthetic images: the speed does not depend on their content.

Usage: python benchmarks/data_speed.py [--batches 20] [--steps 3] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch

from lhcnet import create_model
from lhcnet.data import AugmentConfig, BatchLoader

PAPER_STAGE2 = AugmentConfig(rotation=10, shift=0.1, zoom=0.1, flip=True)


def pipeline_images_per_second(batches: int, batch_size: int = 64, size: int = 224) -> float:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size * (batches + 1), 48, 48), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, 7, (len(images),), generator=generator)
    loader = BatchLoader(images, labels, batch_size=batch_size, size=size, shuffle=True,
                         augment=PAPER_STAGE2, seed=0)
    batches_iter = iter(loader)
    next(batches_iter)  # warm-up: first-call allocations
    start, seen = time.perf_counter(), 0
    for x, _ in batches_iter:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def model_images_per_second(steps: int, batch_size: int = 16, size: int = 224) -> float:
    model = create_model("lhcnet_resnet34v2").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(batch_size, 3, size, size) * 255
    y = torch.randint(0, 7, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="pipeline batches of 64 to time")
    parser.add_argument("--steps", type=int, default=3, help="model training steps to time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    pipeline = pipeline_images_per_second(args.batches)
    print(f"pipeline (augment + resize 48->224, batch 64):    {pipeline:9.1f} images/s")
    model = model_images_per_second(args.steps)
    print(f"lhcnet_resnet34v2 training step (batch 16, fp32): {model:9.1f} images/s")
    ratio = pipeline / model
    print(f"ratio pipeline / model: {ratio:.1f}x (goal >= 10x): {'ok' if ratio >= 10 else 'TOO SLOW'}")


if __name__ == "__main__":
    main()

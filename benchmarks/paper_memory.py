"""Peak host memory (RSS) of stage 4 of ``recipes/paper.toml`` on the full FER2013 Training split.

    /usr/bin/time -v python3 benchmarks/paper_memory.py --data ../shared/data/fer2013.csv.gz

Runs the real ``train()`` on stage 4 of the paper recipe (LHC-Net at 224 px, batch 64, the
acceptance rule's unaugmented pass over the training images) with every loader cut to
``--batches`` batches, starting from a random ResNet34v2 file (the weights do not change the
memory). Prints the peak RSS (VmHWM) at four points: after loading the data; when the first
batch is drawn (the stage's three loaders and the 224-px training set built, nothing run through
a model yet: the host memory of the data); before the first training step (plus the acceptance
rule's first pass, batch 128, no gradients); at the end (plus the activations of batch-64
training steps at 224 px). On a GPU the activations live in device memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from lhcnet.data import BatchLoader, load_dataset
from lhcnet.models import create_model, save_model
from lhcnet.train import TrainOptions, load_recipe, train

REPO = Path(__file__).resolve().parents[1]


def peak_rss_gb() -> float:
    """The process's peak resident set size so far (VmHWM, as ``/usr/bin/time -v`` reports)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 ** 2
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def cap_batches(batches: int) -> None:
    """Every ``BatchLoader`` yields at most ``batches`` batches; report the peak before training."""
    iterate, length = BatchLoader.__iter__, BatchLoader.__len__

    first = []

    def capped(self):
        for step, batch in enumerate(iterate(self)):
            if not first:
                first.append(True)
                print(f"peak RSS when the first batch is drawn: {peak_rss_gb():.2f} GB", flush=True)
            if step == batches:
                return
            if step == 0 and self.shuffle:  # the training loader's first batch
                print(f"peak RSS before the first training step: {peak_rss_gb():.2f} GB", flush=True)
            yield batch

    BatchLoader.__iter__ = capped
    BatchLoader.__len__ = lambda self: min(length(self), batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="fer2013.csv.gz (or its cache)")
    parser.add_argument("--batches", type=int, default=2, help="batches per loader (default 2)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared 2-core VM)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.time()
    dataset = load_dataset(args.data, labels="fer2013")
    print(f"{len(dataset.split('Training'))} training images; peak RSS after loading: {peak_rss_gb():.2f} GB")
    paper = load_recipe(REPO / "recipes" / "paper.toml")
    stage4 = next(s for s in paper.stages if s.name == "stage4")
    cap_batches(args.batches)
    with tempfile.TemporaryDirectory(prefix="lhcnet-memory-") as tmp:
        start = save_model(create_model("resnet34v2"), Path(tmp) / "resnet34v2-random.safetensors")
        stage = dataclasses.replace(stage4, start="file", init_file=str(start), max_epochs=1)
        recipe = dataclasses.replace(paper, stages=(stage,))
        result = train(recipe, dataset, Path(tmp) / "run",
                       TrainOptions(device="cpu", progress=False, bf16=args.bf16, plot_every_s=0))
    print(f"{result.status}; peak RSS at the end: {peak_rss_gb():.2f} GB; {time.time() - started:.0f} s; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

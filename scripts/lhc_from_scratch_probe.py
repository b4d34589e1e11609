"""Why a from-scratch LHC-Net does not learn (issue 14, item 2): a few hundred SGD steps of the
compact host and of LHC-Net variants on FER2013 Training, printing the loss and, per LHC block,
||y - x|| / ||x|| (mean over the batch's faces: what the block adds to the residual stream, the
measure of ``lhcnet analyze contribution``) and the largest |x| and |y - x|.

    OMP_NUM_THREADS=1 python3 scripts/lhc_from_scratch_probe.py ../shared/data/fer2013.csv.gz lhc --steps 400

Variants: ``plain`` (resnet18v2_48), ``lhc`` (the paper's blocks), ``lhc-clip`` (gradient norm
clipped to 5), ``lhc-ls`` (identity start: layer scale 1e-4). The schedule is the stand-alone
recipe's (SGD Nesterov 0.01, weight decay 5e-4, batch 64, bf16 autocast + channels-last) with the
warm-up shortened to 200 steps; batches are uniform samples of Training without augmentation.
``--fp32`` drops the bf16 autocast (the paper trained in float32): whether a failure is bf16's.
``--adam`` trains with Adam at lr 1e-4 instead (the paper's stand-alone stage 1, spec §4) with
the same warm-up: whether the paper's own small steps avoid a failure.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from lhcnet.data import load_dataset, to_model_input
from lhcnet.models import create_model
from lhcnet.nn import LHC

VARIANTS = {"plain": ("resnet18v2_48", {}, 0.0), "lhc": ("lhcnet_resnet18v2_48", {}, 0.0),
            "lhc-clip": ("lhcnet_resnet18v2_48", {}, 5.0),
            "lhc-ls": ("lhcnet_resnet18v2_48", {"lhc_layer_scale_init": 1e-4}, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast, NCHW float32")
    parser.add_argument("--adam", action="store_true", help="Adam lr 1e-4 (the paper's stand-alone stage 1)")
    args = parser.parse_args()
    name, model_args, clip = VARIANTS[args.variant]
    train = load_dataset(args.data).split("Training")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    memory_format = torch.contiguous_format if args.fp32 else torch.channels_last
    model = create_model(name, **model_args).to(memory_format=memory_format).train()
    blocks = [m for m in model.modules() if isinstance(m, LHC)]
    largest: dict[int, tuple[float, float, float]] = {}

    def record(index: int):
        def hook(block, inputs, output):
            x, change = inputs[0].detach().float(), (output - inputs[0]).detach().float()
            relative = (change.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean().item()
            largest[index] = (relative, x.abs().max().item(), change.abs().max().item())
        return hook

    for i, block in enumerate(blocks):
        block.register_forward_hook(record(i))
    if args.adam:
        optimizer, peak_lr = torch.optim.Adam(model.parameters(), lr=1e-4), 1e-4
    else:
        optimizer, peak_lr = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                             weight_decay=5e-4), 0.01
    losses, start = [], time.time()
    for step in range(args.steps):
        index = rng.choice(len(train.labels), 64, replace=False)
        x = to_model_input(torch.from_numpy(train.images[index]), 48).contiguous(memory_format=memory_format)
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * min(1.0, (step + 1) / 200)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), torch.from_numpy(train.labels[index]))
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf")).item()
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            stream = " ".join(f"b{i}:{r:.3f}(|x|{x_:.0f},|O|{o:.0f})" for i, (r, x_, o) in sorted(largest.items()))
            print(f"{args.variant}{' fp32' if args.fp32 else ''}{' adam' if args.adam else ''} step {step}: loss (last 25) {np.mean(losses[-25:]):.3f} grad norm {norm:.2f} "
                  f"{stream} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

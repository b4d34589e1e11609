"""LHC speed, measured side by side in one run (CPU).

1. Training step (forward + backward + SGD update) of resnet34v2 vs lhcnet_resnet34v2 at 224 px,
   batch 16: the cost of the five LHC blocks (goal: ratio <= 1.15).
2. The vectorised LHC vs a per-head-loop formulation shaped like the authors' TF code (a list of
   per-head Linear layers and a Python loop), for each of the paper's five blocks at its own
   feature-map size: forward + backward (goal: loop / vectorised >= 3).
3. A profile of where a LHC-Net training step spends its time (top operators).

Usage: python benchmarks/lhc_speed.py [--batch 16] [--steps 3] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lhcnet import LHC, create_model
from lhcnet.models import lhc_blocks
from lhcnet.nn.lhc import box_mean


class LoopLHC(nn.Module):
    """The original's shape: one Linear per head in a list, a Python loop over heads.

    Q/K/V are computed exactly as in ``LHC`` (same pools), so the ratio measures the head loop only.
    """

    def __init__(self, ref: LHC) -> None:
        super().__init__()
        self.ref = ref
        self.linears = nn.ModuleList(nn.Linear(ref.head_len, ref.embed_dim) for _ in range(ref.heads))
        with torch.no_grad():
            for i, lin in enumerate(self.linears):
                lin.weight.copy_(ref.qk_weight[i].T)
                lin.bias.copy_(ref.qk_bias[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.ref
        b, c, h, w = x.shape
        q = box_mean(x, r.pool_size)
        k = F.max_pool2d(x, r.pool_size, 1, r.pool_size // 2)
        v = box_mean(r.value_conv(x), 3)
        rows = h // r.heads
        outs = []
        for i in range(r.heads):
            band = slice(i * rows, (i + 1) * rows)
            qi = self.linears[i](q[:, :, band].reshape(b, c, -1))
            ki = self.linears[i](k[:, :, band].reshape(b, c, -1))
            vi = v[:, :, band].reshape(b, c, -1)
            s = qi @ ki.transpose(1, 2)
            scale = torch.sigmoid(r.scale_fc(s.mean(-1)))
            a = torch.softmax(s / r.embed_dim ** (r.scale_c + scale).unsqueeze(-1), dim=-1)
            outs.append((a @ vi).reshape(b, c, rows, w))
        return x + torch.cat(outs, dim=2)


def time_it(fn, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train_step_fn(model: nn.Module, batch: int, size: int):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(batch, 3, size, size) * 255
    y = torch.randint(0, 7, (batch,))
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def fwd_bwd_fn(module: nn.Module, x: torch.Tensor):
    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, fp32")

    torch.manual_seed(0)
    base = create_model("resnet34v2")
    lhc_model = create_model("lhcnet_resnet34v2")
    t_base = time_it(train_step_fn(base, args.batch, 224), args.steps)
    t_lhc = time_it(train_step_fn(lhc_model, args.batch, 224), args.steps)
    print(f"train step resnet34v2        : {t_base:.3f} s ({args.batch / t_base:.1f} img/s)")
    print(f"train step lhcnet_resnet34v2 : {t_lhc:.3f} s ({args.batch / t_lhc:.1f} img/s)")
    print(f"RATIO lhcnet/resnet34v2 step : {t_lhc / t_base:.3f}   (goal <= 1.15)")

    # Every paper block at its own feature-map size, forward + backward, batch as above.
    total_vec = total_loop = 0.0
    for place, block in lhc_blocks(lhc_model):
        loop = LoopLHC(block)
        x = torch.randn(args.batch, block.channels, block.height, block.width)
        with torch.no_grad():
            diff = (block(x) - loop(x)).abs().max().item()
        t_vec = time_it(fwd_bwd_fn(block, x), args.steps * 2)
        t_loop = time_it(fwd_bwd_fn(loop, x), args.steps * 2)
        total_vec, total_loop = total_vec + t_vec, total_loop + t_loop
        print(f"LHC {place:<7} ({block.heads} heads) fwd+bwd: vectorised {t_vec * 1000:7.1f} ms, "
              f"per-head loop {t_loop * 1000:7.1f} ms, ratio {t_loop / t_vec:.2f} (agree to {diff:.0e})")
    print(f"RATIO loop/vectorised LHC, all 5 blocks : {total_loop / total_vec:.2f}   (goal >= 3)")

    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile
        step = train_step_fn(lhc_model, args.batch, 224)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print("\nwhere a lhcnet_resnet34v2 training step spends its CPU time (top 12 ops):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                        max_name_column_width=40))


if __name__ == "__main__":
    main()

"""What the LHC blocks cost, measured side by side in one run (CPU).

1. Whole models, host network vs LHC-Net vs LHC-Net with the previous LHC implementation
   (``tests/lhc_previous.py``, before issue 12), the variants interleaved step by step:
   - compact ``lhcnet_resnet18v2_48`` (48 px, batch 64): training step in bf16 autocast +
     channels-last and in fp32; inference (eval, batch 64) in fp32 and bf16 + channels-last;
   - paper ``lhcnet_resnet34v2`` (224 px): training step (batch 16, fp32); inference (batch 64, fp32).
   Each row: median seconds, the LHC-Net / host ratio (new and previous) and the FLOP ratio that
   ``lhcnet info`` prints (``lhcnet.summary``).
2. Every LHC block, forward + backward, new vs previous implementation, on the block's real input
   (the feature map the model itself feeds it from a batch of synthetic faces), and its value path
   alone (eq. (3): the C -> C convolution and the 3x3 box mean, ~80 % of the FLOPs the blocks add):
   the "floor" ratio (host + value paths) / host is what LHC-Net would cost if the rest of the
   attention (pools, embeddings, scores, softmax, A V, the sum) were free.
3. ``--profile``: per block of both models, the operators a forward + backward spends its time in.
4. ``--compile``: the compact LHC-Net training step under ``torch.compile`` (compile time apart).

Usage: python benchmarks/lhc_speed.py [--rounds 5] [--threads N] [--only compact|paper]
       [--profile] [--compile] [--skip-blocks] [--default-malloc]
The malloc settings of ``lhcnet train`` (``lhcnet.allocator``) apply unless ``--default-malloc``.
Other jobs on the machine distort timings: the load average is printed at the start and the end.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_THREADS = torch.get_num_threads()  # tests/conftest.py (imported below) sets 1
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lhc_previous import previous_forward, previous_implementation  # noqa: E402

from predict_helpers import synthetic_faces  # noqa: E402

from lhcnet import create_model  # noqa: E402
from lhcnet.allocator import keep_freed_memory  # noqa: E402
from lhcnet.data import to_model_input  # noqa: E402
from lhcnet.models import lhc_blocks, load_model  # noqa: E402
from lhcnet.nn.lhc import box_mean  # noqa: E402
from lhcnet.predict import bundled_model_path  # noqa: E402
from lhcnet.summary import summarize  # noqa: E402

Step = Callable[[], None]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


def interleaved(variants: dict[str, Step], rounds: int) -> dict[str, float]:
    """Fastest of ``rounds`` calls of each variant (the call least disturbed by other jobs on a
    shared machine), after one warm-up call each; the variants take turns."""
    for step in variants.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def models(name: str, trained: bool) -> tuple[nn.Module, nn.Module]:
    """(host, LHC-Net): random initialisation, or the bundled LHC-Net and its own backbone."""
    torch.manual_seed(0)
    host, lhc = create_model(name.removeprefix("lhcnet_")), create_model(name)
    if trained:
        lhc = load_model(bundled_model_path()).float()
        host.load_state_dict({k: v for k, v in lhc.state_dict().items() if not k.startswith("lhc.")})
    return host, lhc


def faces(batch: int, size: int) -> torch.Tensor:
    """Synthetic cartoon faces (tests/predict_helpers.py), as the model's input."""
    return to_model_input(torch.from_numpy(synthetic_faces(batch, 48)), size)


def model_steps(name: str, batch: int, train: bool, bf16: bool, channels_last: bool,
                trained: bool = False) -> dict[str, Step]:
    """host / LHC-Net / LHC-Net (previous LHC) steps on the same input."""
    host, lhc = models(name, trained)
    size = lhc.input_size
    x = faces(batch, size)
    y = torch.randint(0, 7, (batch,))
    if channels_last:
        host, lhc = (m.to(memory_format=torch.channels_last) for m in (host, lhc))
        x = x.contiguous(memory_format=torch.channels_last)

    def step_of(model: nn.Module) -> Step:
        model.train(train)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step() -> None:
            if not train:
                with torch.no_grad(), autocast(bf16):
                    model(x)
                return
            optimizer.zero_grad(set_to_none=True)
            with autocast(bf16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return step

    lhc_step = step_of(lhc)

    def previous() -> None:
        with previous_implementation(lhc):
            lhc_step()
    return {"host": step_of(host), "LHC-Net": lhc_step, "LHC-Net (previous LHC)": previous}


def flop_ratio(name: str) -> float:
    return summarize(create_model(name)).flops / summarize(create_model(name.removeprefix("lhcnet_"))).flops


HOST_SECONDS: dict[tuple[str, bool], float] = {}  # the host's training step of section 1, for section 2's floor


def whole_models(only: str, rounds: int) -> None:
    rows = [("compact", "lhcnet_resnet18v2_48", 64, True, True, True, "train, bf16 + channels-last"),
            ("compact", "lhcnet_resnet18v2_48", 64, True, True, True, "train, bf16 + CL, trained weights"),
            ("compact", "lhcnet_resnet18v2_48", 64, True, False, False, "train, fp32"),
            ("compact", "lhcnet_resnet18v2_48", 64, False, False, False, "inference, fp32"),
            ("compact", "lhcnet_resnet18v2_48", 64, False, True, True, "inference, bf16 + channels-last"),
            ("paper", "lhcnet_resnet34v2", 16, True, False, False, "train, fp32"),
            ("paper", "lhcnet_resnet34v2", 64, False, False, False, "inference, fp32")]
    print(f"\n1. whole models, fastest of {rounds} interleaved steps (seconds); 'trained weights': the "
          "bundled LHC-Net and its backbone")
    print(f"{'model':<22}{'batch':>6}  {'what':<32}{'host':>8}{'LHC-Net':>9}{'prev.':>8}"
          f"{'ratio':>7}{'prev. ratio':>12}{'FLOP ratio':>11}")
    flops: dict[str, float] = {}
    for family, name, batch, train, bf16, cl, what in rows:
        if only and family != only:
            continue
        flops.setdefault(name, flop_ratio(name))
        t = interleaved(model_steps(name, batch, train, bf16, cl, "trained" in what), rounds)
        host, new, old = t["host"], t["LHC-Net"], t["LHC-Net (previous LHC)"]
        if what in ("train, bf16 + channels-last", "train, fp32") and (name, bf16) not in HOST_SECONDS:
            HOST_SECONDS[name, bf16] = host
        print(f"{name:<22}{batch:>6}  {what:<32}{host:8.3f}{new:9.3f}{old:8.3f}"
              f"{new / host:7.2f}{old / host:12.2f}{flops[name]:11.2f}", flush=True)


def block_inputs(name: str, batch: int, bf16: bool, trained: bool = False
                 ) -> tuple[nn.Module, list[tuple[str, nn.Module, torch.Tensor]]]:
    """Every LHC block with the input its model gives it (training mode, synthetic faces)."""
    model = models(name, trained)[1].train()
    x = faces(batch, model.input_size)
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    captured = []
    hooks = [block.register_forward_pre_hook(lambda m, args, place=place: captured.append((place, m, args[0].detach())))
             for place, block in lhc_blocks(model)]
    with torch.no_grad(), autocast(bf16):
        model(x)
    for hook in hooks:
        hook.remove()
    return model, captured


def block_step(block: nn.Module, x: torch.Tensor, bf16: bool, forward: Callable | None = None) -> Step:
    x = x.clone().requires_grad_()

    def step() -> None:
        block.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(bf16):
            y = forward(block, x) if forward else block(x)
        y.float().square().mean().backward()
    return step


def value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """eq. (3) alone: V = BoxMean3x3(Conv(x)), the block's real-FLOP part."""
    return box_mean(block.value_conv(x), 3)


def per_block(only: str, rounds: int) -> None:
    print(f"\n2. every LHC block, forward + backward on its model's feature map, fastest of {rounds} (ms); "
          "'V path': eq. (3)'s conv + box mean alone")
    print(f"{'model':<30}{'block':<8}{'input':<22}{'new':>8}{'previous':>10}{'speed-up':>10}{'V path':>8}")
    for family, name, batch, bf16, trained in (("compact", "lhcnet_resnet18v2_48", 64, True, False),
                                               ("compact", "lhcnet_resnet18v2_48", 64, True, True),
                                               ("paper", "lhcnet_resnet34v2", 16, False, False)):
        if only and family != only:
            continue
        _, inputs = block_inputs(name, batch, bf16, trained)
        label = name + (" (trained)" if trained else "")
        total_new = total_old = total_value = 0.0
        for place, block, x in inputs:
            t = interleaved({"new": block_step(block, x, bf16),
                             "previous": block_step(block, x, bf16, previous_forward),
                             "value": block_step(block, x, bf16, value_path)}, rounds)
            total_new, total_old = total_new + t["new"], total_old + t["previous"]
            total_value += t["value"]
            shape = f"{tuple(x.shape[1:])} {'bf16 CL' if bf16 else 'fp32'}"
            print(f"{label:<30}{place:<8}{shape:<22}{1000 * t['new']:8.1f}{1000 * t['previous']:10.1f}"
                  f"{t['previous'] / t['new']:10.2f}{1000 * t['value']:8.1f}")
        print(f"{label:<30}{'all':<8}{'':<22}{1000 * total_new:8.1f}{1000 * total_old:10.1f}"
              f"{total_old / total_new:10.2f}{1000 * total_value:8.1f}", flush=True)
        host = HOST_SECONDS.get((name, bf16))
        if host and not trained:
            print(f"{'':<30}training-step ratio if only the V paths cost (floor): "
                  f"{(host + total_value) / host:.2f}; with the blocks as timed here: "
                  f"{(host + total_new) / host:.2f} (host step {host:.3f} s, section 1)", flush=True)


def profile_blocks(only: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    print("\n3. where each block's forward + backward spends its time (new implementation, top 8 ops)")
    for family, name, batch, bf16 in (("compact", "lhcnet_resnet18v2_48", 64, True),
                                      ("paper", "lhcnet_resnet34v2", 16, False)):
        if only and family != only:
            continue
        _, inputs = block_inputs(name, batch, bf16)
        for place, block, x in inputs:
            step = block_step(block, x, bf16)
            step()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step()
            events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events)
            print(f"{name} {place} ({block.extra_repr()}): {total / 1000:.1f} ms")
            for e in events[:8]:
                print(f"    {100 * e.self_cpu_time_total / total:5.1f}%  {e.count:4d}x {e.key:<34} "
                      f"{str(e.input_shapes)[:70]}")


def compiled(rounds: int) -> None:
    print("\n4. torch.compile, compact model, training step, bf16 + channels-last, batch 64 (seconds)")
    steps = model_steps("lhcnet_resnet18v2_48", 64, True, True, True)
    torch.manual_seed(0)
    try:
        model = torch.compile(create_model("lhcnet_resnet18v2_48").to(memory_format=torch.channels_last))
        x = faces(64, 48).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 7, (64,))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(True):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        start = time.perf_counter()
        step()
        print(f"compile + first step: {time.perf_counter() - start:.0f} s")
    except Exception as error:  # no C++ compiler, unsupported platform...
        print(f"torch.compile unavailable here: {type(error).__name__}: {str(error).splitlines()[0]}")
        return
    t = interleaved({"host": steps["host"], "LHC-Net": steps["LHC-Net"], "LHC-Net compiled": step}, rounds)
    print(f"host {t['host']:.3f}  LHC-Net {t['LHC-Net']:.3f} (ratio {t['LHC-Net'] / t['host']:.2f})  "
          f"LHC-Net compiled {t['LHC-Net compiled']:.3f} (ratio {t['LHC-Net compiled'] / t['host']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed steps per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", choices=("compact", "paper"), default="")
    parser.add_argument("--skip-blocks", action="store_true", help="no per-block table")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc settings (lhcnet train changes them: lhcnet.allocator)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    if args.default_malloc:
        allocator = "glibc default"
    else:
        allocator = "freed memory kept, as in lhcnet train" if keep_freed_memory() else "not glibc: default"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc: {allocator}; start: {load()}")
    whole_models(args.only, args.rounds)
    if not args.skip_blocks:
        per_block(args.only, args.rounds)
    if args.profile:
        profile_blocks(args.only)
    if args.compile:
        compiled(args.rounds)
    print(f"\nend: {load()}")


if __name__ == "__main__":
    main()

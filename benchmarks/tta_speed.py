"""Seconds per image of plain and TTA evaluation on this machine, and the estimated time of a whole
PrivateTest (3,589 faces) with the paper's 60-view TTA (best of three timings each).

Run: ``python3 benchmarks/tta_speed.py [--device cpu] [--threads N]``. Times the full evaluation
path (``lhcnet.evaluate.predict_probabilities``: the shared 48 -> S preprocessing, the TTA views
made with ``warp`` and one batched forward per step) with random weights and random faces; speed
does not depend on either. Kept under ~3 minutes on 2 CPU cores: few faces for the 224 px model.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from lhcnet.data import to_model_input
from lhcnet.evaluate import predict_probabilities
from lhcnet.models import create_model
from lhcnet.tta import make_views, paper_views

PRIVATE_TEST = 3589
# model name -> (faces timed without TTA, faces timed with TTA, forward batch size)
CASES = {
    "lhcnet_resnet34v2": (16, 1, 60),
    "lhcnet_resnet18v2_48": (128, 4, 240),
}
REPEATS = 3  # best of: other processes on a shared machine only ever add time


def seconds_per_image(model: torch.nn.Module, faces: torch.Tensor, batch_size: int, tta: bool,
                      device: torch.device) -> float:
    views = paper_views() if tta else None
    predict_probabilities(model, faces[:1], batch_size=batch_size, views=views, device=device)  # warm-up
    return _best(lambda: predict_probabilities(model, faces, batch_size=batch_size, views=views,
                                               device=device), device) / len(faces)


def _best(fn, device: torch.device) -> float:
    """The shortest of ``REPEATS`` timed calls, in seconds."""
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return min(times)


def views_seconds_per_image(faces: torch.Tensor, size: int, device: torch.device) -> float:
    """The cost of making the 60 views alone (three sequential warps), without the model."""
    x = to_model_input(faces.to(device), size)
    views = paper_views()
    make_views(x, views)  # warm-up
    return _best(lambda: make_views(x, views), device) / len(faces)


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    views = paper_views()
    load = "" if not hasattr(os, "getloadavg") else f", load average {os.getloadavg()[0]:.1f}"
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads{load}; "
          f"TTA = {len(views)} views (total weight {sum(v.weight for v in views):g})")
    print(f"{'model':<22} {'size':>4} {'plain s/img':>11} {'TTA s/img':>10} {'ratio':>6} {'views s/img':>11} "
          f"{'PrivateTest plain':>17} {'PrivateTest TTA':>16}")
    generator = torch.Generator().manual_seed(0)
    for name, (plain_count, tta_count, batch_size) in CASES.items():
        model = create_model(name).eval()
        faces = torch.randint(0, 256, (plain_count, 48, 48), dtype=torch.uint8, generator=generator)
        with torch.inference_mode():
            plain = seconds_per_image(model, faces, batch_size, False, device)
            tta = seconds_per_image(model, faces[:tta_count], batch_size, True, device)
            warps = views_seconds_per_image(faces[:tta_count], model.input_size, device)
        print(f"{name:<22} {model.input_size:>4} {plain:11.4f} {tta:10.3f} {tta / plain:6.1f} {warps:11.4f} "
              f"{_duration(plain * PRIVATE_TEST):>17} {_duration(tta * PRIVATE_TEST):>16}", flush=True)


if __name__ == "__main__":
    main()

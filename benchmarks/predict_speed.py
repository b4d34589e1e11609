"""Prediction speed on this machine: face detection, classification and end to end.

Prints, for PyTorch and ONNX Runtime: Haar detection ms per 640x480 image, classification ms per
face at batch 1 and batch 64 (48x48 crop -> ``to_model_input`` -> model -> softmax), and end to
end ms per face at batch 1 (a 640x480 RGB frame with one face -> box, crop, probabilities; and the
same from a JPEG file, decoding included). The goal is <= 30 ms per face end to end at batch 1.

Uses the bundled model when it is installed, else ``lhcnet_resnet18v2_48`` with random weights
(same architecture and cost as the trained compact model), and says which.

    python benchmarks/predict_speed.py [--model FILE] [--repeats 30] [--threads N]

On few cores, ``--threads 1`` is usually faster at batch 1: a 48x48 face is too small a job to
share, and PyTorch's OpenMP threads and OpenCV's threads then stop competing for the same cores.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

import lhcnet
from lhcnet.faces import HaarDetector, to_grey
from lhcnet.images import load_image
from lhcnet.predict import Predictor, bundled_model_path

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
GOAL_MS = 30.0
FAST_SCALE = 1.2  # finds ~10% fewer of FER2013's (upscaled) faces than 1.1, about 40% faster


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median wall time and median CPU time (this process, all threads) of ``fn``, in ms.

    On a machine shared with other jobs the wall time is inflated; with ``--threads 1`` the CPU
    time is close to what the call takes on an idle core.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def cell(times: tuple[float, float], per: int = 1) -> str:
    return f"{times[0] / per:.1f} ({times[1] / per:.1f})"


def frame_640x480() -> np.ndarray:
    """The example photo (one face) fitted into a 640x480 frame, as a webcam would give."""
    photo = cv2.resize(load_image(PHOTO), (480, 480), interpolation=cv2.INTER_AREA)
    frame = np.full((480, 640, 3), 110, np.uint8)
    frame[:, 80:560] = photo
    return frame


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model file (default: the bundled model, else random weights)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch / OpenCV threads (default: library defaults)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)

    if args.model:
        model, which = lhcnet.load_model(args.model), f"model file {args.model}"
    else:
        try:
            path = bundled_model_path()
            model, which = lhcnet.load_model(path), f"bundled model {path.name}"
        except FileNotFoundError:
            model = lhcnet.create_model("lhcnet_resnet18v2_48").eval()
            which = "lhcnet_resnet18v2_48 with RANDOM weights (the bundled model is not installed yet)"
    name = getattr(model, "lhcnet_metadata", model.lhcnet_config)["name"]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {which} [{name}, {params:.1f} M parameters, input {model.input_size}px]")
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads)")
    load = os.getloadavg()[0]
    print(f"load average (1 min) at start: {load:.1f}" + (
        "  WARNING: other processes compete for the CPUs; figures are inflated" if load > 0.5 else ""))

    frame = frame_640x480()
    detector = HaarDetector()
    detection = median_ms(lambda: detector(to_grey(frame)), args.repeats)
    print("\nmilliseconds: wall time (CPU time of this process), medians")
    print(f"detection (Haar, 640x480, 1 face): {cell(detection)} ms/image "
          f"({len(detector(to_grey(frame)))} face found)")
    fast = HaarDetector(scale_factor=FAST_SCALE)
    print(f"detection with scale_factor {FAST_SCALE} (fewer pyramid levels): "
          f"{cell(median_ms(lambda: fast(to_grey(frame)), args.repeats))} ms/image")

    crop = cv2.resize(to_grey(frame)[40:440, 120:520], (48, 48), interpolation=cv2.INTER_AREA)
    faces64 = np.stack([crop] * 64)
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = Path(tmp) / "frame.jpg"
        cv2.imwrite(str(jpeg), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        print(f"\n{'ms per face':<14}{'batch 1':>16}{'batch 64':>16}{'end to end b=1':>18}{'from JPEG':>16}")
        for backend in ("torch", "onnx"):
            try:
                predictor = Predictor(model, device="cpu", backend=backend)
            except ImportError as exc:
                print(f"{backend:<14}skipped: {exc}")
                continue
            batch1 = median_ms(lambda: predictor.classify(faces64[:1]), args.repeats)
            batch64 = median_ms(lambda: predictor.classify(faces64), max(5, args.repeats // 5))
            end_to_end = median_ms(lambda: predictor.predict(frame), args.repeats)
            from_file = median_ms(lambda: predictor.predict(jpeg), args.repeats)
            label = "PyTorch" if backend == "torch" else "ONNX Runtime"
            verdict = "meets" if min(end_to_end) <= GOAL_MS else "misses"
            print(f"{label:<14}{cell(batch1):>16}{cell(batch64, 64):>16}{cell(end_to_end):>18}"
                  f"{cell(from_file):>16}   {verdict} the {GOAL_MS:.0f} ms goal")
            predictor.detector = fast
            fast_end_to_end = median_ms(lambda: predictor.predict(frame), args.repeats)
            print(f"{'':<14}end to end b=1 with scale_factor {FAST_SCALE}: {cell(fast_end_to_end)}")


if __name__ == "__main__":
    main()

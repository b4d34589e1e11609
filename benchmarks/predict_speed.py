"""Prediction speed on this machine: face detection, classification and end to end.

Prints YuNet's and the Haar cascade's detection ms per 640x480 image, classification ms per face
at batch 1 and batch 64 (48x48 crop -> ``to_model_input`` -> model -> softmax) for PyTorch and
ONNX Runtime, and end to end ms per image (a 640x480 RGB frame with one face -> box, crop,
probabilities; and the same from a JPEG file, decoding included) with each detector. The compared
variants are timed interleaved (one call of each per round), so load from other processes falls
on all of them alike. The goal is <= 30 ms per face end to end at batch 1.

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
from lhcnet.faces import HaarDetector, YuNetDetector, to_grey
from lhcnet.images import load_image
from lhcnet.predict import Predictor, bundled_model_path

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
GOAL_MS = 30.0
FAST_SCALE = 1.2  # finds ~10% fewer of FER2013's (upscaled) faces than 1.1, about 40% faster


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int,
                   warmup: int = 3) -> dict[str, tuple[float, float]]:
    """Median wall and CPU time (this process, all threads) in ms of each of ``fns``, called in
    turn ``repeats`` times: on a shared machine every variant sees the same load."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - start) * 1000)
            cpu[name].append((time.process_time() - start_cpu) * 1000)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


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
    detectors: dict[str, object] = {"YuNet": YuNetDetector()}
    try:
        detectors.update({"Haar": HaarDetector(), f"Haar {FAST_SCALE}": HaarDetector(scale_factor=FAST_SCALE)})
    except FileNotFoundError as exc:  # OpenCV 5: no cascade files
        print(f"Haar skipped: {exc}")
    found = {name: len(d.detect(frame)) for name, d in detectors.items()}
    detection = interleaved_ms({name: (lambda d=d: d.detect(frame)) for name, d in detectors.items()},
                               args.repeats)
    print("\nmilliseconds: wall time (CPU time of this process), medians of interleaved calls")
    for name, times in detection.items():
        print(f"detection, {name:<9} 640x480 frame: {cell(times):>14} ms/image ({found[name]} face found)")

    crop = cv2.resize(to_grey(frame)[40:440, 120:520], (48, 48), interpolation=cv2.INTER_AREA)
    faces64 = np.stack([crop] * 64)
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = Path(tmp) / "frame.jpg"
        cv2.imwrite(str(jpeg), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        for backend in ("torch", "onnx"):
            label = "PyTorch" if backend == "torch" else "ONNX Runtime"
            try:
                predictors = {name: Predictor(model, device="cpu", backend=backend, detector=d)
                              for name, d in detectors.items()}
                predictors["YuNet+align"] = Predictor(model, device="cpu", backend=backend,
                                                      detector=detectors["YuNet"], align=True)
            except ImportError as exc:
                print(f"\n{label}: skipped: {exc}")
                continue
            first = next(iter(predictors.values()))
            classify = interleaved_ms({"batch 1": lambda: first.classify(faces64[:1]),
                                       "batch 64": lambda: first.classify(faces64)}, max(5, args.repeats // 3))
            print(f"\n{label}: classification {cell(classify['batch 1'])} ms/face at batch 1, "
                  f"{cell(classify['batch 64'], 64)} ms/face at batch 64")
            calls = {}
            for name, predictor in predictors.items():
                calls[f"{name} frame"] = lambda p=predictor: p.predict(frame)
                calls[f"{name} JPEG"] = lambda p=predictor: p.predict(jpeg)
            end_to_end = interleaved_ms(calls, args.repeats)
            for name in predictors:
                times = end_to_end[f"{name} frame"]
                verdict = "meets" if min(times) <= GOAL_MS else "misses"
                print(f"  end to end, {name:<11} {cell(times):>14} ms/image (from JPEG "
                      f"{cell(end_to_end[f'{name} JPEG'])})   {verdict} the {GOAL_MS:.0f} ms goal")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()

"""Shared pieces of the predict / faces / export tests: a tiny model, face images, odd files."""
from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import FER2013_CSV_GZ, REPO

import lhcnet
from lhcnet.data import to_model_input

PHOTO = REPO / "examples" / "astronaut.jpg"
PHOTO_FACE = (172, 62, 106, 106)  # the Haar cascade's box of Eileen Collins' face in PHOTO


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run a test module on one PyTorch / OpenCV thread (ONNX Runtime follows PyTorch's count).

    The batches here are a few 48x48 faces, too small to share between threads; and when the
    cores are busy with other jobs, OpenMP threads waiting for each other burn several times
    the CPU time of the work itself (measured: 112 s -> 34 s for test_export.py at load 7 on 2
    cores). Imported by the test modules, which makes it autouse there.
    """
    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv_threads)


def tiny_model(name: str = "lhcnet_resnet18v2_48", **settings) -> nn.Module:
    """A small random model with BatchNorm statistics fitted to 0..255 faces.

    Freshly initialised BatchNorms have mean 0, variance 1, so raw 0..255 input would give logits
    of ~1e4 and saturated softmaxes; one pass in training mode with cumulative averaging gives
    the logits of a real model's scale, so output comparisons mean something.
    """
    settings.setdefault("head_hidden", (16,))
    torch.manual_seed(0)
    model = lhcnet.create_model(name, **settings)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(to_model_input(torch.from_numpy(synthetic_faces(32)), model.input_size))
    return model.eval()


@lru_cache(maxsize=None)
def _tiny_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model().state_dict().items()}


def tiny_model_file(folder: Path, extra: dict | None = None) -> Path:
    """The tiny model saved with ``save_model`` (built once per test session)."""
    model = lhcnet.create_model("lhcnet_resnet18v2_48", head_hidden=(16,))
    model.load_state_dict(_tiny_state())
    return lhcnet.save_model(model, folder / "tiny.safetensors", extra=extra)


def synthetic_faces(count: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """Cartoon faces uint8 (count, size, size): head, eyes, mouth at random grey levels."""
    rng = np.random.default_rng(seed)
    faces = np.empty((count, size, size), dtype=np.uint8)
    for i in range(count):
        face = np.full((size, size), rng.integers(0, 80), np.uint8)
        c, r = size // 2, size * 0.4
        cv2.ellipse(face, (c, c), (int(r * 0.8), int(r)), 0, 0, 360, int(rng.integers(120, 220)), -1)
        for dx in (-1, 1):
            cv2.circle(face, (c + dx * int(r * 0.35), c - int(r * 0.25)), max(1, size // 16), 30, -1)
        smile = int(rng.integers(-6, 7))
        cv2.ellipse(face, (c, c + int(r * 0.4)), (int(r * 0.35), abs(smile) + 1), 0,
                    0 if smile > 0 else 180, 180 if smile > 0 else 360, 40, 2)
        faces[i] = np.clip(face + rng.normal(0, 6, face.shape), 0, 255).astype(np.uint8)
    return faces


def fer2013_faces(count: int, skip: int = 0) -> np.ndarray:
    """``count`` FER2013 faces after the first ``skip`` (uint8 (count, 48, 48)), read from the CSV."""
    faces = []
    with gzip.open(FER2013_CSV_GZ, "rt") as f:
        next(f)  # header: emotion,pixels,Usage
        for _ in range(skip):
            next(f)
        for line, _ in zip(f, range(count)):
            faces.append(np.array(line.split(",")[1].split(), dtype=np.uint8).reshape(48, 48))
    return np.stack(faces)


def photo_rgb() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A valid tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """An MJPG AVI of RGB frames (OpenCV's pip wheels write it without extra codecs)."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write MJPG video here"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


# -- synthetic scenes: the example photo's face pasted at known places, sizes and angles -----------

PHOTO_HEAD = (130, 20, 190, 190)  # x, y, w, h of a square around PHOTO_FACE (1.8x its side)


def background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A face-free RGB photo: a smooth colour gradient with sensor-like noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([90 + 60 * xs / width, 120 + 40 * ys / height, 150 - 50 * xs / width], axis=2)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def head(side: int, angle: float = 0.0) -> np.ndarray:
    """The example photo's head, ``side`` px square, turned ``angle`` degrees counter-clockwise."""
    x, y, w, h = PHOTO_HEAD
    patch = cv2.resize(photo_rgb()[y:y + h, x:x + w], (side, side), interpolation=cv2.INTER_AREA)
    turn = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), angle, 1.0)
    return cv2.warpAffine(patch, turn, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def scene(placements: list[tuple[int, int, int, float]], size: tuple[int, int] = (800, 600),
          seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A background with heads pasted at ``(x, y, side, angle)``; and each face's centre."""
    rgb = background(*size, seed=seed)
    centres = []
    fx, fy, fw, fh = PHOTO_FACE
    hx, hy, hw, _ = PHOTO_HEAD
    for x, y, side, angle in placements:
        rgb[y:y + side, x:x + side] = head(side, angle)
        # the face centre in the patch turns with the patch about the patch centre
        scale = side / hw
        offset = np.array([fx + fw / 2 - hx, fy + fh / 2 - hy]) * scale - (side - 1) / 2
        a = np.radians(angle)
        turned = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) @ offset
        centres.append((x + (side - 1) / 2 + turned[0], y + (side - 1) / 2 + turned[1]))
    return rgb, centres

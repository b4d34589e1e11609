"""A tiny LHC-Net trained in seconds on synthetic, separable 48x48 "faces" (shared by the TTA,
evaluation and analysis tests, which import it; not a conftest).

Class k of 7 is a bright 10x10 square at the k-th of seven places on a 3x3 grid, on a noisy
background. The data is written as a FER2013-format CSV (``emotion,pixels,Usage``) so the command
line reads it exactly as it reads the real file. The model is registered as ``tiny_lhcnet_48``:
three pre-activation stages (8, 16, 32 channels) and four LHC blocks (the last with one head).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lhcnet.data import to_model_input
from lhcnet.models import LHCBlock, create_model, list_models, save_model
from lhcnet.models.backbones import PreActResNet
from lhcnet.models.registry import ModelSpec, register_model

NAME = "tiny_lhcnet_48"
CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
BLOCKS = (
    LHCBlock("stem", 8, 24, heads=4, embed_dim=36),
    LHCBlock("stage1", 8, 24, heads=4, embed_dim=36),
    LHCBlock("stage2", 16, 12, heads=3, embed_dim=12),
    LHCBlock("stage3", 32, 6, heads=1, embed_dim=8),
)
PLACES = [(4, 4), (4, 19), (4, 34), (19, 4), (19, 34), (34, 4), (34, 19)]  # (row, col) of each class
SPLIT_SIZES = {"Training": 40, "PublicTest": 4, "PrivateTest": 10}  # per class


def _backbone(num_classes: int = 7, **kwargs) -> PreActResNet:
    model = PreActResNet((1, 1, 1), (8, 16, 32), num_classes, stem_kernel=3, stem_stride=1,
                         head_hidden=(16,), dropout=0.0, input_size=48, **kwargs)
    for module in model.modules():  # Keras' momentum 0.99 needs hundreds of steps to settle
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model


if NAME not in list_models():
    register_model(ModelSpec(NAME, _backbone, BLOCKS, description="test-only tiny LHC-Net, 48 px",
                             defaults={"input_size": 48}))


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tensors are tiny, and on a shared, busy CPU a second thread only
    waits for its time slice (the evaluation and analysis tests took 44 s with two threads under
    load, 7 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """``one_thread`` for every test of a module that imports this fixture."""
    with one_thread():
        yield


def synthetic_faces(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(7), per_class)
    images = rng.integers(40, 120, size=(len(labels), 48, 48)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = PLACES[label]
        row, col = row + rng.integers(-2, 3), col + rng.integers(-2, 3)
        images[i, row:row + 10, col:col + 10] = rng.integers(200, 256)
    return images, labels


def split_faces(usage: str) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic faces of one split, in file order (each split has its own seed)."""
    return synthetic_faces(SPLIT_SIZES[usage], list(SPLIT_SIZES).index(usage))


def write_fer2013_csv(path: Path) -> dict[str, int]:
    """The synthetic set in Kaggle's layout; returns the number of images per split."""
    lines, counts = ["emotion,pixels,Usage"], {}
    for usage in SPLIT_SIZES:
        images, labels = split_faces(usage)
        counts[usage] = len(labels)
        lines += [f"{label},{' '.join(map(str, image.ravel()))},{usage}"
                  for image, label in zip(images, labels)]
    path.write_text("\n".join(lines) + "\n")
    return counts


def train_tiny_model(steps: int = 50, seed: int = 0) -> torch.nn.Module:
    """A few Adam steps on the synthetic training split (about two seconds on one CPU core)."""
    with one_thread():
        return _train(steps, seed)


def _train(steps: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(NAME)
    images, labels = split_faces("Training")
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(y_all), (32,), generator=generator)
        loss = F.cross_entropy(model(to_model_input(x_all[pick], 48)), y_all[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


_CACHE: dict[str, tuple[Path, Path, dict[str, int]]] = {}


def trained_files(root: Path) -> tuple[Path, Path, dict[str, int]]:
    """(model file, data CSV, split sizes), trained and written once per test session."""
    if "files" not in _CACHE:
        root.mkdir(parents=True, exist_ok=True)
        csv = root / "synthetic_fer2013.csv"
        counts = write_fer2013_csv(csv)
        model_file = save_model(train_tiny_model(), root / "tiny.safetensors",
                                extra={"classes": list(CLASSES)})
        _CACHE["files"] = (model_file, csv, counts)
    return _CACHE["files"]

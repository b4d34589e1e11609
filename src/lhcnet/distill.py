"""Knowledge distillation: train a recipe on soft targets mixed from teacher models' probabilities.

Each training face's target is ``alpha * one_hot(label) + (1 - alpha) * mean teacher probability``
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531, at
temperature 1): with ``alpha >= 0.5`` no other class outweighs the true one in the target. The
teachers see the unaugmented training faces once; their mean probabilities are stored in
``OUT/teacher-probs.npy`` and described in ``OUT/distill.json``; a folder that already holds them
for the same teachers (``--resume``, or a copy for a second student) reuses them. PublicTest keeps
its hard labels, so early stopping and the logged accuracy are the usual ones. The trainer uses a
data set's soft labels whenever it has them (``lhcnet.train.setup.targets``).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .data import FaceDataset
from .data.dataset import split_code
from .evaluate import predict_probabilities
from .files import atomic_write_bytes, atomic_write_text
from .models import load_model
from .train import Recipe, TrainOptions, TrainResult, train

__all__ = ["teacher_probabilities", "distillation_targets", "distill", "PROBS_NAME", "INFO_NAME"]

PROBS_NAME = "teacher-probs.npy"
INFO_NAME = "distill.json"


def teacher_probabilities(teachers: Sequence[str | os.PathLike], images: np.ndarray) -> np.ndarray:
    """Mean softmax of the ``teachers`` (model files) on ``images`` (uint8, N x H x W), float32 (N, K)."""
    faces = torch.from_numpy(np.ascontiguousarray(images))
    total = None
    for path in teachers:
        probs = predict_probabilities(load_model(path), faces)
        total = probs if total is None else total + probs
        print(f"teacher {path}: done", file=sys.stderr, flush=True)
    return (total / len(teachers)).numpy().astype(np.float32)


def distillation_targets(labels: np.ndarray, train_rows: np.ndarray, teacher: np.ndarray, alpha: float,
                         num_classes: int) -> np.ndarray:
    """One-hot labels everywhere; on the ``train_rows`` (a mask) mixed with the teachers' probabilities."""
    if not 0.5 <= alpha <= 1:
        raise ValueError(f"alpha {alpha}: expected a value in [0.5, 1] (no other class may outweigh the true one)")
    targets = np.eye(num_classes, dtype=np.float32)[labels]
    targets[train_rows] = alpha * targets[train_rows] + (1 - alpha) * teacher
    return targets


def _stored_probabilities(out_dir: Path, teacher_names: list[str], count: int) -> np.ndarray | None:
    """The teachers' probabilities stored in ``out_dir`` for the same teachers and faces, if any."""
    probs, info = out_dir / PROBS_NAME, out_dir / INFO_NAME
    if not (probs.is_file() and info.is_file()):
        return None
    try:
        same = json.loads(info.read_text(encoding="utf-8")).get("teachers") == teacher_names
        stored = np.load(probs, allow_pickle=False) if same else None
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{out_dir}: unreadable {PROBS_NAME} / {INFO_NAME} ({exc}); remove them to "
                         "compute the teachers' probabilities again") from None
    if stored is not None and len(stored) != count:
        raise ValueError(f"{probs}: {len(stored)} rows for {count} training faces (another data set?); "
                         "remove it to compute the teachers' probabilities again")
    return stored


def distill(recipe: Recipe, dataset: FaceDataset, out_dir: str | os.PathLike, teachers: Sequence[str | os.PathLike],
            alpha: float = 0.5, options: TrainOptions | None = None) -> TrainResult:
    """Train ``recipe`` on ``dataset`` with distillation targets from ``teachers`` (model files)."""
    out_dir = Path(out_dir)
    if not 0.5 <= alpha <= 1:
        raise ValueError(f"alpha {alpha}: expected a value in [0.5, 1] (no other class may outweigh the true one)")
    missing = [str(t) for t in teachers if not Path(t).is_file()]
    if missing:
        raise FileNotFoundError(f"teacher model file not found: {missing[0]}")
    train_rows = dataset.splits == split_code("Training")
    teacher_names = [str(t) for t in teachers]
    teacher = _stored_probabilities(out_dir, teacher_names, int(train_rows.sum()))
    if teacher is None:
        teacher = teacher_probabilities(teachers, dataset.images[train_rows])
        buffer = io.BytesIO()
        np.save(buffer, teacher)
        atomic_write_bytes(out_dir / PROBS_NAME, buffer.getvalue())
        agree = float((teacher.argmax(1) == dataset.labels[train_rows]).mean())
        atomic_write_text(out_dir / INFO_NAME, json.dumps({
            "teachers": teacher_names, "alpha": alpha, "teacher_train_accuracy": agree}, indent=2) + "\n")
        print(f"teachers agree with {100 * agree:.2f} % of the training labels", file=sys.stderr)
    soft = distillation_targets(dataset.labels, train_rows, teacher, alpha, len(dataset.classes))
    return train(recipe, dataclasses.replace(dataset, soft_labels=soft), out_dir, options)

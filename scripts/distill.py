"""Train a recipe on FER2013 with soft targets from teacher models (knowledge distillation).

Each training face's target is ``alpha * one_hot(label) + (1 - alpha) * mean teacher probability``
(Hinton et al. 2015 at temperature 1): with ``alpha >= 0.5`` no other class outweighs the true one
in the target. The teachers see the unaugmented training faces once; their mean probabilities are
stored in ``OUT/teacher-probs.npy`` and described in ``OUT/distill.json``; a folder that already
holds them for the same teachers (``--resume``, or a copy for a second student) reuses them.
PublicTest keeps its hard labels, so early stopping and the logged accuracy are the usual ones.

    python scripts/distill.py --recipe recipes/fer2013_compact_stage4_lhc_distill.toml \
        --data ../shared/data/fer2013.csv.gz --out runs/stage4-lhc-distill \
        --teachers runs/stage4-plain-seed{1,2,3}/stage4-best.safetensors \
                   runs/stage4-lhc-seed{1,2,3}/stage4-best.safetensors --seed 4 --bf16 --channels-last
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from lhcnet.data import load_dataset
from lhcnet.data.dataset import split_code
from lhcnet.evaluate import predict_probabilities
from lhcnet.models import load_model
from lhcnet.train import TrainOptions, load_recipe, train
from lhcnet.train.checkpoint import atomic_write_bytes, atomic_write_text


def teacher_probabilities(teachers: list[Path], images: np.ndarray) -> np.ndarray:
    """Mean softmax of ``teachers`` on ``images`` (uint8, N x H x W), float32 (N, K)."""
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
    targets = np.eye(num_classes, dtype=np.float32)[labels]
    targets[train_rows] = alpha * targets[train_rows] + (1 - alpha) * teacher
    return targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--teachers", required=True, nargs="+", type=Path)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the hard label, in [0.5, 1]")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    if not 0.5 <= args.alpha <= 1:
        parser.error(f"--alpha {args.alpha}: expected a value in [0.5, 1] (no other class may outweigh the true one)")

    recipe = load_recipe(args.recipe).with_overrides(seed=args.seed)
    dataset = load_dataset(args.data, labels=recipe.labels)
    cache = args.out / "teacher-probs.npy"
    train_rows = dataset.splits == split_code("Training")
    described = args.out / "distill.json"
    teacher_names = [str(t) for t in args.teachers]
    same_teachers = described.is_file() and json.loads(described.read_text())["teachers"] == teacher_names
    if cache.is_file() and same_teachers:  # --resume, or a second student of the same teachers
        teacher = np.load(cache)
    else:
        teacher = teacher_probabilities(args.teachers, dataset.images[train_rows])
        args.out.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, teacher)
        atomic_write_bytes(cache, buffer.getvalue())
        agree = float((teacher.argmax(1) == dataset.labels[train_rows]).mean())
        atomic_write_text(described, json.dumps({
            "teachers": teacher_names, "alpha": args.alpha,
            "teacher_train_accuracy": agree}, indent=2) + "\n")
        print(f"teachers agree with {100 * agree:.2f} % of the training labels", file=sys.stderr)
    soft = distillation_targets(dataset.labels, train_rows, teacher, args.alpha, len(dataset.classes))
    dataset = dataclasses.replace(dataset, soft_labels=soft)
    options = TrainOptions(resume=args.resume, bf16=args.bf16, channels_last=args.channels_last)
    return train(recipe, dataset, args.out, options).exit_code


if __name__ == "__main__":
    sys.exit(main())

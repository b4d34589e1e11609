"""What is in a data set: the split x class table, blank images, exact duplicates across splits.

FER2013 has known quirks (data README): constant images, exact duplicates, validation and test
images that also occur in Training, duplicates with conflicting labels. ``lhcnet data stats``
prints them so nobody trains or reports on them unknowingly. ``without_training_duplicates``
drops the PublicTest/PrivateTest faces whose pixels also occur in Training (``--dedup`` of
``lhcnet data stats`` and ``lhcnet evaluate``): a test figure on faces the model never saw.
Images are compared by a 128-bit BLAKE2b digest of their pixels (exact for any practical purpose).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .dataset import SPLITS, FaceDataset

__all__ = ["DatasetStats", "dataset_stats", "pixel_digests", "training_duplicates",
           "without_training_duplicates", "format_table", "split_summary", "format_stats"]

TRAINING = SPLITS.index("Training")


@dataclass
class DatasetStats:
    counts: np.ndarray  # (len(SPLITS), classes) images per split and class
    classes: tuple[str, ...]
    blank: int  # constant images (every pixel the same)
    duplicate_groups: int  # groups of >= 2 identical images
    conflicting_groups: int  # of which with more than one label
    overlap: dict[tuple[int, int], int]  # (split a, split b): images of b also in a, a < b
    bad_rows: int


def pixel_digests(images: np.ndarray) -> list[bytes]:
    """One 128-bit digest of each image's pixels (equal images, equal digests)."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def training_duplicates(dataset: FaceDataset) -> np.ndarray:
    """bool (N,): the faces outside Training whose pixels also occur in a Training face."""
    digests = pixel_digests(dataset.images)
    training = {d for d, split in zip(digests, dataset.splits) if split == TRAINING}
    return np.array([split != TRAINING and d in training for d, split in zip(digests, dataset.splits)],
                    dtype=bool).reshape(len(dataset))


def without_training_duplicates(dataset: FaceDataset) -> FaceDataset:
    """The data set without the PublicTest/PrivateTest faces whose pixels also occur in Training
    (Training and the other test faces unchanged, in order)."""
    return dataset.subset(~training_duplicates(dataset))


def dataset_stats(dataset: FaceDataset) -> DatasetStats:
    flat = np.asarray(dataset.images).reshape(len(dataset), -1)
    blank = int((flat.min(axis=1) == flat.max(axis=1)).sum())
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, digest in enumerate(pixel_digests(flat)):
        groups[digest].append(i)
    duplicates = [g for g in groups.values() if len(g) > 1]
    conflicting = sum(len(set(dataset.labels[g].tolist())) > 1 for g in duplicates)
    overlap = {}
    for a in range(len(SPLITS)):
        for b in range(a + 1, len(SPLITS)):
            overlap[a, b] = sum(int((dataset.splits[g] == b).sum()) for g in duplicates
                                if (dataset.splits[g] == a).any())
    return DatasetStats(dataset.counts(), dataset.classes, blank, len(duplicates), conflicting,
                        overlap, len(dataset.bad_rows))


def format_table(counts: np.ndarray, classes: tuple[str, ...]) -> str:
    """Markdown split x class table (the layout of the data README); empty splits are left out."""
    lines = ["| split | " + " | ".join(c.capitalize() for c in classes) + " |",
             "|---|" + "---:|" * len(classes)]
    for code, row in enumerate(counts):
        if row.sum():
            lines.append(f"| {SPLITS[code]} | " + " | ".join(str(int(n)) for n in row) + " |")
    return "\n".join(lines)


def split_summary(counts: np.ndarray) -> str:
    """E.g. "Training 28709, PublicTest 3589, ..." from a split x class table."""
    return ", ".join(f"{SPLITS[s]} {int(n)}" for s, n in enumerate(counts.sum(1)) if n)


def format_stats(stats: DatasetStats) -> str:
    lines = [format_table(stats.counts, stats.classes), "",
             f"images: {int(stats.counts.sum())} ({split_summary(stats.counts)})",
             f"blank (constant) images: {stats.blank}",
             f"exact-duplicate groups: {stats.duplicate_groups} "
             f"({stats.conflicting_groups} with conflicting labels)"]
    for (a, b), n in stats.overlap.items():
        if stats.counts[a].sum() and stats.counts[b].sum():
            lines.append(f"{SPLITS[b]} images also in {SPLITS[a]}: {n}")
    lines.append(f"bad rows skipped: {stats.bad_rows}")
    return "\n".join(lines)

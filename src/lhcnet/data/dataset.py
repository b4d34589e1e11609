"""``FaceDataset``: grey face images with labels and split codes, whatever file they came from.

Every reader (FER2013 CSV, FER+ votes, image folders, the cache) returns this one type, so the
trainer, the evaluator and ``lhcnet data stats`` never ask where the images came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

__all__ = ["CLASSES_FER2013", "CLASSES_FERPLUS", "SPLITS", "SPLIT_ALIASES", "BadRecord",
           "FaceDataset", "split_code"]

# FER2013 label order (Kaggle `emotion` column 0-6).
CLASSES_FER2013: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# FER+ label order = the vote columns of `fer2013new.csv` (Barsoum et al. 2016), names as there.
CLASSES_FERPLUS: tuple[str, ...] = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                                    "fear", "contempt")
# Split codes are indices into this tuple (FER2013 `Usage`); folders without splits use 0.
SPLITS: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")
SPLIT_ALIASES: dict[str, int] = {
    "training": 0, "train": 0,
    "publictest": 1, "val": 1, "valid": 1, "validation": 1,
    "privatetest": 2, "test": 2,
}


def split_code(name: str) -> int:
    """Index into ``SPLITS`` of a split name or alias (train/val/test), case-insensitive."""
    try:
        return SPLIT_ALIASES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)} "
                         "or train/val/test") from None


class BadRecord(NamedTuple):
    """One skipped input: a CSV row (``line`` 1-based, the header is line 1) or an image file."""

    path: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}: line {self.line}"
        return f"{where}: {self.reason}"


@dataclass
class FaceDataset:
    """Grey faces: ``images`` uint8 (N, H, W) (possibly a read-only memmap), ``labels`` int64 (N,),
    ``splits`` uint8 (N,) indexing ``SPLITS``, ``soft_labels`` float32 (N, K) or None.

    ``row_ids`` are the rows of the original file the images came from (FER+ aligns on them) and
    ``bad_rows`` lists what the reader skipped with ``skip_bad=True``.
    """

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    classes: tuple[str, ...]
    soft_labels: np.ndarray | None = None
    source: str = ""
    row_ids: np.ndarray | None = None
    bad_rows: list[BadRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got shape {self.images.shape}")
        if self.row_ids is None:
            self.row_ids = np.arange(n, dtype=np.int64)
        for name in ("labels", "splits", "row_ids", "soft_labels"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, mask_or_index: np.ndarray) -> FaceDataset:
        """The images selected by a boolean mask or an index array (copies, except a full slice)."""
        pick = np.asarray(mask_or_index)
        return replace(self, images=self.images[pick], labels=self.labels[pick],
                       splits=self.splits[pick], row_ids=self.row_ids[pick],
                       soft_labels=None if self.soft_labels is None else self.soft_labels[pick],
                       bad_rows=list(self.bad_rows))

    def split(self, name: str) -> FaceDataset:
        """The images of one split: Training/PublicTest/PrivateTest or train/val/test."""
        return self.subset(self.splits == split_code(name))

    def counts(self) -> np.ndarray:
        """(len(SPLITS), len(classes)) int64 table of images per split and class."""
        table = np.zeros((len(SPLITS), len(self.classes)), dtype=np.int64)
        np.add.at(table, (self.splits.astype(np.int64), self.labels), 1)
        return table

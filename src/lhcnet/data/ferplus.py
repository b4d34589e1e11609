"""FER+ relabelling (Barsoum et al., ICMI 2016, ``fer2013new.csv``): 10 votes per FER2013 image.

Rows align with ``fer2013.csv`` by row order (``Image name`` is not a row index). Hard labels
follow the FER+ reference code's "majority" mode: votes of a single annotator are dropped as
outliers, the top class must hold more than half of the remaining votes, and images whose winner
is ``unknown`` or ``NF`` (not a face), or that have no majority, are dropped. Soft labels are the
raw vote distribution over the eight emotions (for soft-label / cross-entropy training).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .dataset import CLASSES_FERPLUS, SPLITS, FaceDataset

__all__ = ["FERPLUS_VOTE_COLUMNS", "read_ferplus_votes", "ferplus_majority", "ferplus_soft_labels",
           "apply_ferplus"]

FERPLUS_VOTE_COLUMNS = (*CLASSES_FERPLUS, "unknown", "NF")


def read_ferplus_votes(src: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Votes int64 ``(M, 10)`` in ``FERPLUS_VOTE_COLUMNS`` order and split codes uint8 ``(M,)``."""
    path = Path(src)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    rows = csv.reader(io.StringIO(text))
    header = [c.strip() for c in next(rows, [])]
    if not header:
        raise ValueError(f"{path}: empty file; expected the FER+ header "
                         f"Usage,Image name,{','.join(FERPLUS_VOTE_COLUMNS)}")
    missing = [c for c in ("Usage", *FERPLUS_VOTE_COLUMNS) if c not in header]
    if missing:
        raise ValueError(f"{path}: line 1: missing column {', '.join(missing)}; expected "
                         f"Usage,Image name,{','.join(FERPLUS_VOTE_COLUMNS)}")
    usage_at = header.index("Usage")
    vote_at = [header.index(c) for c in FERPLUS_VOTE_COLUMNS]
    votes, splits = [], []
    for line_no, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line_no}: expected {len(header)} fields, got {len(row)}")
        if row[usage_at] not in SPLITS:
            raise ValueError(f"{path}: line {line_no}: Usage {row[usage_at]!r}: expected one of "
                             f"{', '.join(SPLITS)}")
        cells = [row[i].strip() for i in vote_at]
        if not all(c.isdigit() for c in cells):
            raise ValueError(f"{path}: line {line_no}: votes {cells}: expected non-negative integers")
        votes.append([int(c) for c in cells])
        splits.append(SPLITS.index(row[usage_at]))
    if not votes:
        raise ValueError(f"{path}: no data rows after the header")
    return np.array(votes, dtype=np.int64), np.array(splits, dtype=np.uint8)


def ferplus_majority(votes: np.ndarray) -> np.ndarray:
    """Majority label per row (index into ``CLASSES_FERPLUS``), -1 where FER+ drops the image."""
    kept = np.where(votes > 1, votes, 0)  # a single annotator's vote is an outlier (FER+ code)
    winner = kept.argmax(axis=1)
    majority = kept.max(axis=1) > 0.5 * kept.sum(axis=1)
    return np.where(majority & (winner < len(CLASSES_FERPLUS)), winner, -1).astype(np.int64)


def ferplus_soft_labels(votes: np.ndarray) -> np.ndarray:
    """Vote distribution over the eight emotions, float32 ``(M, 8)`` (zero rows stay zero)."""
    emotions = votes[:, :len(CLASSES_FERPLUS)].astype(np.float32)
    total = emotions.sum(axis=1, keepdims=True)
    return emotions / np.maximum(total, 1)


def apply_ferplus(dataset: FaceDataset, ferplus_csv: str | os.PathLike) -> FaceDataset:
    """Relabel a FER2013 ``dataset`` with FER+ majority labels and vote distributions."""
    votes, splits = read_ferplus_votes(ferplus_csv)
    rows = dataset.row_ids
    if rows.max() >= len(votes) or (not dataset.bad_rows and len(votes) != len(dataset)):
        raise ValueError(f"{ferplus_csv}: {len(votes)} rows, but the FER2013 data has "
                         f"{rows.max() + 1}; expected the two files to align row by row")
    differ = np.flatnonzero(splits[rows] != dataset.splits)
    if len(differ):
        i = differ[0]
        raise ValueError(f"{ferplus_csv}: line {rows[i] + 2}: Usage {SPLITS[splits[rows[i]]]} but "
                         f"FER2013 says {SPLITS[dataset.splits[i]]}; expected the files to align "
                         "row by row")
    labels = ferplus_majority(votes)[rows]
    keep = labels >= 0
    relabelled = dataset.subset(keep)
    return replace(relabelled, labels=labels[keep], classes=CLASSES_FERPLUS,
                   soft_labels=ferplus_soft_labels(votes)[rows][keep],
                   source=f"{dataset.source} + {ferplus_csv}")

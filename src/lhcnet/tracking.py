"""Faces followed across video frames: identities by box overlap, probabilities smoothed per face.

``FaceTracker.update(faces)`` takes one frame's faces (the dicts of ``Predictor``) in frame
order and gives each a ``"track"`` number: a face continues the track whose last box overlaps
its own most (intersection over union >= ``min_iou``, matched greedily from the largest
overlap), else it starts a new track. A track that finds no face for ``max_missed`` frames in a
row ends; a face seen after that is a new track. This is the simplest tracker that works for
faces, which move little between frames and rarely cross (SORT, Bewley et al. 2016, adds a
Kalman filter for fast motion; not needed at video frame rates).

With ``window`` > 1, a face's ``scores`` become the mean of its track's last ``window``
probabilities (the current frame's included: causal, no look-ahead) and its ``label`` follows
them; the frame's own probabilities stay in ``frame_scores``.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["box_iou", "FaceTracker"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes ``(N, 4)`` and ``(M, 4)`` ``[x, y, w, h]``: ``(N, M)``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    bottom = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass
class _Track:
    number: int
    box: list[int]
    history: deque = field(default_factory=deque)
    missed: int = 0


class FaceTracker:
    """Track numbers (1, 2, ...) for the faces of consecutive frames of one video."""

    def __init__(self, min_iou: float = 0.3, max_missed: int = 10, window: int = 1) -> None:
        if window < 1:
            raise ValueError(f"the smoothing window must be >= 1 frame, got {window}")
        self.min_iou, self.max_missed, self.window = min_iou, max_missed, window
        self.tracks: list[_Track] = []
        self._next = 1

    def _match(self, faces: Sequence[dict[str, Any]]) -> list[_Track | None]:
        """The track each face continues (None: a new face), greedily by overlap."""
        overlap = box_iou(np.array([t.box for t in self.tracks]), np.array([f["box"] for f in faces]))
        matched: list[_Track | None] = [None] * len(faces)
        while overlap.size and overlap.max() >= self.min_iou:
            track, face = np.unravel_index(np.argmax(overlap), overlap.shape)
            matched[face] = self.tracks[track]
            overlap[track, :] = overlap[:, face] = -1.0
        return matched

    def update(self, faces: Sequence[dict[str, Any]]) -> None:
        """Give each face of the next frame its ``"track"`` (and smoothed ``scores``), in place."""
        matched = self._match(faces)
        for track in self.tracks:
            track.missed += 1
        for face, track in zip(faces, matched):
            if track is None:
                track = _Track(self._next, face["box"], deque(maxlen=self.window))
                self._next += 1
                self.tracks.append(track)
            track.box, track.missed = face["box"], 0
            face["track"] = track.number
            track.history.append(np.array(list(face["scores"].values()), np.float64))
            if self.window > 1:
                mean = np.mean(track.history, axis=0)
                face["frame_scores"] = face["scores"]
                face["scores"] = {name: float(p) for name, p in zip(face["frame_scores"], mean)}
                face["label"] = max(face["scores"], key=face["scores"].get)
                face["label_score"] = face["scores"][face["label"]]
        self.tracks = [t for t in self.tracks if t.missed < self.max_missed]

"""Reading video frames with OpenCV (``cv2.VideoCapture``, FFmpeg in the pip wheels) as RGB arrays.

A file that OpenCV cannot open or decode is one ``InputError`` naming the file, raised before any
frame is yielded; ``every=N`` keeps frames 0, N, 2N... and only grabs (does not decode) the others.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from .images import InputError

__all__ = ["VIDEO_SUFFIXES", "is_video", "frame_count", "frame_rate", "read_frames"]

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg",
                            ".wmv", ".flv", ".3gp", ".ts", ".mts"})


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a video file (by its suffix)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _open(path: Path) -> cv2.VideoCapture:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir() or path.stat().st_size == 0:
        raise InputError(f"{path}: {'is a folder' if path.is_dir() else 'empty file'}, not a video")
    # FFmpeg's own log lines ("moov atom not found") would precede our one-line error; the
    # variable is read when OpenCV first loads its FFmpeg backend, and a user's own value wins.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise InputError(f"{path}: cannot read video (not a video, or a codec OpenCV cannot decode)")
    return capture


def _declared(path: str | os.PathLike, prop: int) -> float:
    """A property the container declares (``cv2.CAP_PROP_*``); 0.0 when unknown."""
    capture = _open(Path(path))
    try:
        value = float(capture.get(prop))
        return value if value > 0 else 0.0  # NaN, 0 or negative: unknown
    finally:
        capture.release()


def frame_count(path: str | os.PathLike) -> int:
    """The frame count the container declares (0 if unknown; a hint for progress bars)."""
    return int(_declared(path, cv2.CAP_PROP_FRAME_COUNT))


def frame_rate(path: str | os.PathLike) -> float:
    """The frames per second the container declares (0.0 if unknown)."""
    return _declared(path, cv2.CAP_PROP_FPS)


def read_frames(path: str | os.PathLike, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame index, RGB uint8 (H, W, 3))`` for every ``every``-th frame of a video."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    path = Path(path)
    capture = _open(path)
    try:
        index = 0
        while True:
            if index % every == 0:
                ok, frame = capture.read()
                if not ok:
                    break
                if frame is None or frame.ndim != 3:
                    raise InputError(f"{path}: frame {index} could not be decoded")
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            elif not capture.grab():
                break
            index += 1
        if index == 0:
            raise InputError(f"{path}: cannot read video (no frame could be decoded)")
    finally:
        capture.release()

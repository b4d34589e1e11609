"""Video files with OpenCV (``cv2.VideoCapture`` / ``cv2.VideoWriter``, FFmpeg in the pip wheels).

Reading: frames as RGB arrays. A file that OpenCV cannot open or decode is one ``InputError``
naming the file, raised before any frame is yielded; a video that ends before the frame count its
header declares (truncated, or damaged where the decoder gives up) is an ``InputError`` raised
after the frames that could be read; ``every=N`` keeps frames 0, N, 2N... and only grabs (does not
decode) the others. Damage the decoder does not notice (a JPEG frame of an MJPEG file with wrong
bytes still decodes) cannot be seen here. Writing: ``Mp4Writer``, RGB frames to an MP4 file that
appears complete or not at all.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from .files import temp_path
from .images import InputError

__all__ = ["VIDEO_SUFFIXES", "is_video", "frame_count", "frame_rate", "read_frames", "Mp4Writer"]

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
    declared = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
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
        # Containers that estimate their length (from duration x rate) may be off by a frame
        # or two in a hundred; MP4 and AVI headers count exactly.
        if index < declared - declared // 100:
            raise InputError(f"{path}: the video ends after {index} of the {declared} frames its "
                             "header declares (truncated or damaged file); the frames before were read")
    finally:
        capture.release()


class Mp4Writer:
    """RGB uint8 frames, all of one size, to an MP4 file (MPEG-4 part 2, ``mp4v``, which OpenCV's
    pip wheels write without extra codecs). The file is written under a temp name in the same
    folder and renamed by ``close``: it appears complete or not at all."""

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        self.path, self.fps = Path(path), fps if fps > 0 else 25.0
        self._tmp = temp_path(self.path, ".mp4")  # OpenCV picks the container from the suffix
        self._writer: cv2.VideoWriter | None = None

    def write(self, rgb: np.ndarray) -> None:
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                           (rgb.shape[1], rgb.shape[0]))
            if not self._writer.isOpened():
                self.abort()
                raise OSError(f"{self.path}: OpenCV {cv2.__version__} cannot write MP4 video here")
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> Path | None:
        """Finish the file and give it its name; None if no frame was written."""
        if self._writer is None:
            return None
        self._writer.release()
        self._writer = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the file."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        self._tmp.unlink(missing_ok=True)

"""Face detection and face crops made the way FER2013's faces are: square, grey, 48x48 uint8.

Detection is OpenCV's frontal-face Haar cascade (Viola & Jones, "Rapid Object Detection using a
Boosted Cascade of Simple Features", CVPR 2001), read from the XML file that ``opencv-python-
headless`` < 5 installs (``cv2.data.haarcascades``): it works offline on a fresh install. OpenCV 5
no longer ships these files, hence the ``<5`` pin.

The crop is the box squared (its longer side) and padded by ``pad`` of that side on every side.
The default 0.1 is FER2013's own framing: run on FER2013's faces, the cascade's box covers a
median 84% of the 48-px frame, centred (a margin of 9.6% per side; ``tests/test_faces.py`` checks
it). Parts of the square outside the photo repeat the border pixels, so the face stays centred
and undistorted. The crop is resized to 48x48 with ``cv2.INTER_AREA`` when it shrinks (an
area average: no aliasing from large photos, as a camera sensor would integrate) and bilinear when
it grows.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

__all__ = ["FER_SIZE", "FER_PAD", "CASCADE_FILE", "Detector", "HaarDetector", "cascade_path", "to_grey",
           "square_region", "crop_faces"]

FER_SIZE = 48  # FER2013's native resolution
FER_PAD = 0.1  # crop margin per side, as a fraction of the box side: FER2013's framing
CASCADE_FILE = "haarcascade_frontalface_default.xml"

# A detector maps a grey uint8 image (H, W) to boxes (N, 4) int [x, y, w, h].
Detector = Callable[[np.ndarray], np.ndarray]


def cascade_path() -> Path:
    """OpenCV's frontal-face cascade file; ``FileNotFoundError`` with the fix if it is missing."""
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or "") / CASCADE_FILE
    if folder is None or not path.is_file():
        raise FileNotFoundError(
            f"OpenCV's Haar cascade {CASCADE_FILE} is missing (looked in {folder or 'cv2.data'}; "
            f"OpenCV {cv2.__version__}). Face detection needs an OpenCV 4 wheel, which ships it: "
            "pip install 'opencv-python-headless>=4.5,<5'")
    return path


class HaarDetector:
    """OpenCV's frontal-face Haar cascade: ``detector(grey) -> (N, 4)`` boxes, left to right.

    The smallest face looked for is ``max(min_size, min_fraction * shorter side)``; the photo is
    downscaled so that such a face fills the cascade's 24x24 window, which is what the cascade's
    own image pyramid would do at that scale, minus the finer levels that can only find smaller
    faces. Detection costs about the same at any photo resolution (a 640x480 frame is searched at
    320x240), and the fine levels, where Haar cascades take texture (hair, fabric) for faces,
    are skipped.

    Args:
        scale_factor, min_neighbors: ``detectMultiScale``'s settings (OpenCV's usual 1.1 and 5).
        min_size: smallest face side in pixels (48, FER2013's resolution: a smaller face would
            be upsampled for the model anyway).
        min_fraction: smallest face side as a fraction of the photo's shorter side; lower it
            (and ``min_size``) for crowds of small faces.
        path: a cascade XML file; default ``cascade_path()``.
    """

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = FER_SIZE,
                 min_fraction: float = 0.05, path: str | os.PathLike | None = None) -> None:
        path = Path(path) if path is not None else cascade_path()
        if not path.is_file():
            raise FileNotFoundError(f"Haar cascade file not found: {path}")
        self.cascade = cv2.CascadeClassifier()
        try:
            loaded = self.cascade.load(str(path))
        except (cv2.error, SystemError):  # OpenCV raises on some malformed files
            loaded = False
        if not loaded or self.cascade.empty():
            raise ValueError(f"{path}: not a valid OpenCV cascade file")
        self.window = max(self.cascade.getOriginalWindowSize())  # 24 for the frontal-face cascade
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors
        self.min_size, self.min_fraction = min_size, min_fraction

    def __call__(self, grey: np.ndarray) -> np.ndarray:
        min_face = max(self.min_size, self.min_fraction * min(grey.shape))
        scale = min(1.0, self.window / min_face)
        small = grey if scale == 1.0 else cv2.resize(grey, None, fx=scale, fy=scale,
                                                     interpolation=cv2.INTER_AREA)
        side = max(self.window, round(min_face * scale))
        boxes = self.cascade.detectMultiScale(small, scaleFactor=self.scale_factor,
                                              minNeighbors=self.min_neighbors, minSize=(side, side))
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        boxes = np.rint(boxes / scale).astype(np.int64)
        return boxes[np.argsort(boxes[:, 0], kind="stable")]


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> grey uint8 (H, W) with ITU-R 601 luma weights (as Pillow's "L")."""
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def square_region(box: Sequence[float], pad: float) -> tuple[int, int, int]:
    """The crop of a face box: a square ``(x, y, side)`` on the box's centre, padded on every side."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"face box {list(box)} has no area (boxes are [x, y, width, height])")
    side = max(w, h) * (1.0 + 2.0 * pad)
    x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    return x0, y0, max(1, round(side))


def crop_faces(grey: np.ndarray, boxes: Sequence[Sequence[float]] | np.ndarray, pad: float = FER_PAD,
               size: int = FER_SIZE) -> np.ndarray:
    """Square, padded, grey crops of ``boxes``, resized to ``size``: uint8 ``(N, size, size)``."""
    height, width = grey.shape
    faces = np.empty((len(boxes), size, size), dtype=np.uint8)
    for i, box in enumerate(boxes):
        x0, y0, side = square_region(box, pad)
        x1, y1 = x0 + side, y0 + side
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise ValueError(f"face box {list(box)} lies outside the {width}x{height} image")
        patch = grey[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)]
        borders = (max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width))
        if any(borders):
            patch = cv2.copyMakeBorder(patch, *borders, cv2.BORDER_REPLICATE)
        shrink = side >= size
        faces[i] = cv2.resize(patch, (size, size),
                              interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return faces

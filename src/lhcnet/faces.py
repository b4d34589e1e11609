"""Face detection and face crops made the way FER2013's faces are: square, grey, 48x48 uint8.

Two detectors, both offline:

- ``YuNetDetector`` (the default): OpenCV's ``cv2.FaceDetectorYN`` running YuNet (Wu, Peng, Yu,
  "YuNet: A Tiny Millisecond-level Face Detector", Machine Intelligence Research 20, 2023), a
  CNN whose 233 KB ONNX file ships inside this package (``lhcnet/assets``, Apache-2.0, see
  docs/predict.md). It finds turned, tilted and small faces, and gives five landmarks and a score.
- ``HaarDetector``: OpenCV's frontal-face Haar cascade (Viola & Jones, "Rapid Object Detection
  using a Boosted Cascade of Simple Features", CVPR 2001), read from the XML file that OpenCV 4
  wheels install (``cv2.data.haarcascades``); OpenCV 5 wheels no longer ship it.

Both return ``Detections``: boxes ``[x, y, w, h]`` in pixels of the photo, left to right, framed
as the Haar cascade frames faces: a square that ``FER_PAD`` turns into FER2013's frame. YuNet's
own box is tighter and taller than wide (on FER2013's faces its height is 98% of the 48-px frame,
its width 82%; the cascade's square 84%), so ``YuNetDetector`` turns it into that square, from its
height, the steadiest of its sides (``YUNET_HEIGHT``, ``YUNET_DROP``).

The crop is the box squared (its longer side) and padded by ``pad`` of that side on every side.
The default 0.1 is FER2013's own framing: run on FER2013's faces, the cascade's box covers a
median 84% of the 48-px frame, centred (a margin of 9.6% per side; ``tests/test_faces.py`` checks
it). Parts of the square outside the photo repeat the border pixels, so the face stays centred
and undistorted. With an ``angle`` the square is rotated about its centre first (eye-level
alignment, ``eye_angle``). The crop is resized to 48x48 with ``cv2.INTER_AREA`` when it shrinks
(an area average: no aliasing from large photos, as a camera sensor would integrate) and bilinear
when it grows.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from .images import InputError

__all__ = ["FER_SIZE", "FER_PAD", "MIN_FACE", "MIN_FACE_FRACTION", "CASCADE_FILE", "YUNET_FILE",
           "LANDMARK_NAMES", "DETECTORS", "Detector", "Detections", "YuNetDetector", "HaarDetector",
           "make_detector", "cascade_path", "yunet_path", "fer_square", "to_grey", "eye_angle",
           "square_region", "crop_faces"]

FER_SIZE = 48  # FER2013's native resolution
FER_PAD = 0.1  # crop margin per side, as a fraction of the box side: FER2013's framing
# Smallest face YuNet looks for by default: below a 24-px box the bundled model's PublicTest
# accuracy falls under 56% (67% at FER2013's own 40-px faces; docs/predict.md, "Small faces").
MIN_FACE = 24
MIN_FACE_FRACTION = 0.02  # ... or 2% of the photo's shorter side, whichever is larger
CASCADE_FILE = "haarcascade_frontalface_default.xml"
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
# YuNet finds the example photo's face down to a 13-px box (score 0.81; 0.89 at 26 px, 0.93 at
# 106 px): photos are downscaled for detection no further than to make the smallest face searched
# for this big, a margin over that limit. A 640x480 frame is searched at full resolution.
YUNET_SMALLEST = 24
# YuNet's box on FER2013's own faces (582 of the first 600 rows, enlarged 4x): median height
# 0.984 of the frame side (interquartile range 8% of it; width 0.821, range 15%), centre 0.016
# of the side below the frame's. The FER2013 frame of a YuNet box is therefore a square of side
# height / YUNET_HEIGHT, YUNET_DROP of that side above the box centre (tests/test_faces.py checks
# it on other rows).
YUNET_HEIGHT = 0.984
YUNET_DROP = 0.016
# The subject's right eye is the one on the image's left.
LANDMARK_NAMES = ("right_eye", "left_eye", "nose", "mouth_right", "mouth_left")
# Roll for alignment: YuNet's landmarks lean toward level eyes (the example photo turned 20
# degrees: its landmarks say 3), less so on large faces; so the face is enlarged to
# ROLL_FACE_PX and turned upright in ROLL_PASSES steps, each measuring the tilt that is left
# (the example photo turned by -45..45 degrees: within 4 degrees; tests/test_faces.py).
ROLL_FACE_PX = 224
ROLL_PASSES = 3
DETECTORS = ("yunet", "haar", "none")

# A user's detector maps a grey uint8 image (H, W) to boxes (N, 4) [x, y, w, h].
Detector = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Detections:
    """Faces found in one photo, in its pixels.

    ``boxes`` (N, 4) float ``[x, y, w, h]``; ``landmarks`` (N, 5, 2) float ``(x, y)`` in the order
    of ``LANDMARK_NAMES``, or None; ``scores`` (N,) detector confidences in 0..1, or None;
    ``rolls`` (N,) degrees (``YuNetDetector.roll``), where measured for alignment.
    """

    boxes: np.ndarray
    landmarks: np.ndarray | None = None
    scores: np.ndarray | None = None
    rolls: np.ndarray | None = None

    @classmethod
    def of_boxes(cls, boxes: Sequence[Sequence[float]] | np.ndarray) -> Detections:
        return cls(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))

    def __len__(self) -> int:
        return len(self.boxes)

    def select(self, keep: np.ndarray) -> Detections:
        """The detections at indices (or mask) ``keep``, in that order."""
        pick = (lambda a: None if a is None else a[keep])
        return Detections(self.boxes[keep], pick(self.landmarks), pick(self.scores), pick(self.rolls))


def _smallest_face(shape: tuple[int, ...], min_face: int | None) -> float:
    """The smallest face side searched for: ``min_face``, or by default the larger of
    ``MIN_FACE`` and ``MIN_FACE_FRACTION`` of the shorter side. An image smaller than that is an
    ``InputError`` (no face of that size fits; cut-out faces are predicted with ``whole_image``)."""
    height, width = shape[:2]
    smallest = min_face if min_face is not None else max(MIN_FACE, MIN_FACE_FRACTION * min(height, width))
    if min(height, width) < smallest:
        raise InputError(f"image of {width}x{height} px is smaller than the smallest face searched for "
                         f"({smallest:.0f} px); for an already-cropped face use --whole-image "
                         "(whole_image=True), or lower --min-face")
    return smallest


def _package_asset(name: str) -> Path:
    return Path(str(resources.files("lhcnet").joinpath("assets", name)))


def yunet_path() -> Path:
    """The YuNet model inside the package, checked against its SHA-256; ``FileNotFoundError`` if
    this install lacks it, ``ValueError`` if it is damaged."""
    path = _package_asset(YUNET_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"the YuNet face detector lhcnet/assets/{YUNET_FILE} is not in this "
                                f"install ({path}); reinstall lhcnet, or use --detector haar")
    if hashlib.sha256(path.read_bytes()).hexdigest() != YUNET_SHA256:
        raise ValueError(f"{path}: damaged (SHA-256 differs from the vendored YuNet model's); "
                         "reinstall lhcnet, or use --detector haar")
    return path


class YuNetDetector:
    """YuNet through ``cv2.FaceDetectorYN``: ``detect(image) -> Detections`` with landmarks and scores.

    The photo (RGB, or grey replicated to three channels) is fed in OpenCV's BGR order, which
    the model was trained on. A large photo is downscaled for detection so that the smallest
    face searched for becomes ``YUNET_SMALLEST`` px (never upscaled), and boxes and landmarks are
    mapped back to the photo's pixels. Boxes are FER2013-framed squares (``fer_square``); faces
    whose square is smaller than the smallest face searched for are dropped.

    Args:
        score_threshold: YuNet score a face needs (0.7; OpenCV's demo uses 0.9, which drops about
            a third of the faces of everyday photos).
        nms_threshold, top_k: ``FaceDetectorYN``'s non-maximum suppression IoU and candidate cap.
        min_face: smallest face side in pixels; None: the larger of 24 px (``MIN_FACE``) and 2%
            of the photo's shorter side.
        path: a YuNet ONNX file; default the bundled one (``yunet_path()``).
    """

    def __init__(self, score_threshold: float = 0.7, nms_threshold: float = 0.3, top_k: int = 5000,
                 min_face: int | None = None, path: str | os.PathLike | None = None) -> None:
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in 0..1, got {score_threshold}")
        if min_face is not None and min_face < 1:
            raise ValueError(f"min_face must be >= 1 px, got {min_face}")
        path = Path(path) if path is not None else yunet_path()
        if not path.is_file():
            raise FileNotFoundError(f"YuNet model file not found: {path}")
        # OpenCV 5 warns on stderr that its new DNN engine ignores targets; older ones have no
        # cv2.utils.logging (and no such warning).
        logging = getattr(cv2.utils, "logging", None)
        level = logging.getLogLevel() if logging else None
        if logging:
            logging.setLogLevel(logging.LOG_LEVEL_ERROR)
        try:
            self.net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold,
                                                 nms_threshold, top_k)
        except cv2.error:
            raise ValueError(f"{path}: not a YuNet ONNX model OpenCV {cv2.__version__} can load") from None
        finally:
            if logging:
                logging.setLogLevel(level)
        self.score_threshold, self.min_face = score_threshold, min_face

    def _run(self, bgr: np.ndarray) -> Detections:
        """YuNet on a BGR image as it is, in its pixels."""
        self.net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self.net.detect(bgr)
        rows = np.zeros((0, 15)) if rows is None else rows.astype(np.float64)
        # rows: x, y, w, h, then (x, y) of the five landmarks, then the score. On inputs of a
        # few pixels YuNet can answer infinite boxes: only finite boxes centred inside count.
        centre = rows[:, :2] + rows[:, 2:4] / 2
        rows = rows[np.isfinite(rows).all(axis=1) & (rows[:, 2:4] > 0).all(axis=1)
                    & (centre >= 0).all(axis=1) & (centre < (bgr.shape[1], bgr.shape[0])).all(axis=1)]
        return Detections(rows[:, :4], rows[:, 4:14].reshape(-1, 5, 2), rows[:, 14])

    def detect(self, image: np.ndarray) -> Detections:
        smallest = _smallest_face(image.shape, self.min_face)
        bgr = _to_bgr(image)
        scale = min(1.0, YUNET_SMALLEST / smallest)
        if scale < 1.0:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        found = self._run(bgr)
        # Undo the downscale exactly (resize maps pixel edges to pixel edges).
        real_scale = (image.shape[1] / bgr.shape[1], image.shape[0] / bgr.shape[0])
        found = Detections(fer_square(found.boxes * np.tile(real_scale, 2)),
                           found.landmarks * real_scale, found.scores)
        found = found.select(found.boxes[:, 2] >= smallest)
        return found.select(np.argsort(found.boxes[:, 0], kind="stable"))

    def roll(self, image: np.ndarray, box: Sequence[float]) -> float:
        """The roll (``eye_angle``, degrees) of the face in ``box``, measured on the face enlarged
        to ``ROLL_FACE_PX`` and turned upright step by step (``ROLL_PASSES``); 0 if YuNet loses it."""
        x, y, w, h = (float(v) for v in box)
        centre, zoom = (x + w / 2, y + h / 2), ROLL_FACE_PX / max(w, h)
        side = 2 * ROLL_FACE_PX  # the face and as much context around it
        bgr, angle = _to_bgr(image), 0.0
        for _ in range(ROLL_PASSES):
            warp = cv2.getRotationMatrix2D(centre, -angle, zoom)
            warp[:, 2] += (side / 2 - centre[0], side / 2 - centre[1])
            found = self._run(cv2.warpAffine(bgr, warp, (side, side), flags=cv2.INTER_LINEAR,
                                             borderMode=cv2.BORDER_REPLICATE))
            if not len(found):
                break
            offsets = found.boxes[:, :2] + found.boxes[:, 2:] / 2 - side / 2
            angle += eye_angle(found.landmarks[np.argmin((offsets ** 2).sum(axis=1))])
        return angle

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Boxes only, ``(N, 4)`` int: the same interface as ``HaarDetector`` and user detectors."""
        return np.rint(self.detect(image).boxes).astype(np.int64)


def fer_square(yunet_boxes: np.ndarray) -> np.ndarray:
    """YuNet's boxes ``(N, 4)`` as the square boxes whose ``FER_PAD`` crop is FER2013's frame."""
    x, y, w, h = np.asarray(yunet_boxes, np.float64).reshape(-1, 4).T
    frame = h / YUNET_HEIGHT
    side = frame / (1.0 + 2.0 * FER_PAD)
    cx, cy = x + w / 2, y + h / 2 - YUNET_DROP * frame
    return np.stack([cx - side / 2, cy - side / 2, side, side], axis=1)


def _to_bgr(image: np.ndarray) -> np.ndarray:
    """RGB or grey uint8 as the three-channel BGR that OpenCV's networks were trained on."""
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR if image.ndim == 2 else cv2.COLOR_RGB2BGR)


_OPENCV_4_FIX = ("Use the default YuNet detector (--detector yunet), or install an OpenCV 4 wheel: "
                "pip install 'opencv-python-headless>=4.10,<5'")


def _require_cascades() -> None:
    """``FileNotFoundError`` if this OpenCV cannot run Haar cascades at all (OpenCV 5)."""
    if not hasattr(cv2, "CascadeClassifier"):
        raise FileNotFoundError(f"OpenCV {cv2.__version__} has no Haar cascades (cv2.CascadeClassifier "
                                f"and {CASCADE_FILE} were removed in OpenCV 5). {_OPENCV_4_FIX}")


def cascade_path() -> Path:
    """OpenCV's frontal-face cascade file; ``FileNotFoundError`` naming it if it is missing."""
    _require_cascades()
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or "") / CASCADE_FILE
    if folder is None or not path.is_file():
        raise FileNotFoundError(
            f"OpenCV's Haar cascade {CASCADE_FILE} is missing (looked in {folder or 'cv2.data'}; "
            f"OpenCV {cv2.__version__}: OpenCV 5 wheels no longer ship it). {_OPENCV_4_FIX}")
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
        _require_cascades()
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

    def detect(self, image: np.ndarray) -> Detections:
        grey = to_grey(image)
        min_face = max(self.min_size, self.min_fraction * min(grey.shape))
        _smallest_face(grey.shape, min_face)
        scale = min(1.0, self.window / min_face)
        small = grey if scale == 1.0 else cv2.resize(grey, None, fx=scale, fy=scale,
                                                     interpolation=cv2.INTER_AREA)
        side = max(self.window, round(min_face * scale))
        boxes = self.cascade.detectMultiScale(small, scaleFactor=self.scale_factor,
                                              minNeighbors=self.min_neighbors, minSize=(side, side))
        boxes = np.rint(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / scale)
        return Detections(boxes[np.argsort(boxes[:, 0], kind="stable")])

    def __call__(self, grey: np.ndarray) -> np.ndarray:
        return self.detect(grey).boxes.astype(np.int64)


def make_detector(name: str, min_face: int | None = None,
                  threshold: float | None = None) -> YuNetDetector | HaarDetector | None:
    """A detector by name (``DETECTORS``): ``"yunet"``, ``"haar"`` or ``"none"`` (None).

    ``min_face``: smallest face side in px (default: each detector's own); ``threshold``: YuNet's
    score threshold (Haar has no score).
    """
    if name == "yunet":
        return YuNetDetector(min_face=min_face, **({} if threshold is None else {"score_threshold": threshold}))
    if name == "haar":
        if threshold is not None:
            raise ValueError("the Haar cascade has no score threshold (it is YuNet's option)")
        return HaarDetector() if min_face is None else HaarDetector(min_size=min_face, min_fraction=0.0)
    if name == "none":
        return None
    raise ValueError(f"unknown detector {name!r}; use one of {', '.join(DETECTORS)}, or a callable")


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> grey uint8 (H, W) with ITU-R 601 luma weights (as Pillow's "L")."""
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def eye_angle(landmarks: np.ndarray) -> float:
    """Roll of a face in degrees from its landmarks ``(5, 2)``: the angle of the line from the
    right eye (image left) to the left eye, counter-clockwise positive as seen (y points down),
    as ``cv2.getRotationMatrix2D`` counts: turning a photo by ``a`` adds ``a`` to its faces' roll."""
    (rx, ry), (lx, ly) = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(-(ly - ry), lx - rx))


def square_region(box: Sequence[float], pad: float) -> tuple[int, int, int]:
    """The crop of a face box: a square ``(x, y, side)`` on the box's centre, padded on every side."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"face box {list(box)} has no area (boxes are [x, y, width, height])")
    side = max(w, h) * (1.0 + 2.0 * pad)
    x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    return x0, y0, max(1, round(side))


def crop_faces(grey: np.ndarray, boxes: Sequence[Sequence[float]] | np.ndarray, pad: float = FER_PAD,
               size: int = FER_SIZE, rolls: Sequence[float] | None = None) -> np.ndarray:
    """Square, padded, grey crops of ``boxes``, resized to ``size``: uint8 ``(N, size, size)``.

    ``rolls``: per box, the face's roll in degrees (``eye_angle``), undone by turning the photo
    about the square's centre before cutting it: the eyes come out level. None or 0 cuts the
    pixels as they are.
    """
    height, width = grey.shape
    faces = np.empty((len(boxes), size, size), dtype=np.uint8)
    for i, box in enumerate(boxes):
        x0, y0, side = square_region(box, pad)
        if x0 + side <= 0 or y0 + side <= 0 or x0 >= width or y0 >= height:
            raise ValueError(f"face box {list(box)} lies outside the {width}x{height} image")
        # The square as an affine map from the photo: a shift, plus a rotation about the square's
        # centre; an integer shift alone copies pixels exactly (bilinear weights 0 and 1).
        centre = (x0 + (side - 1) / 2, y0 + (side - 1) / 2)
        roll = 0.0 if rolls is None else float(rolls[i])
        warp = cv2.getRotationMatrix2D(centre, -roll, 1.0)
        warp[:, 2] += ((side - 1) / 2 - centre[0], (side - 1) / 2 - centre[1])
        patch = cv2.warpAffine(grey, warp, (side, side), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
        shrink = side >= size
        faces[i] = cv2.resize(patch, (size, size),
                              interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return faces

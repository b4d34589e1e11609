"""``Predictor``: photos in, every face's box and emotion probabilities out.

A photo goes through the same steps as FER2013's faces went through before training: face boxes
(YuNet by default, OpenCV's Haar cascade, or boxes you give), square padded grey crops resized to
48x48 uint8 (``lhcnet.faces``; optionally rotated so the eyes are level), then
``lhcnet.data.to_model_input`` (the one preprocessing of training, evaluation and TTA) to the
model's input size. All faces of all photos of a call go through the model in batches of
``batch_size``, with PyTorch or ONNX Runtime (``backend="onnx"``).

A face is ``{"box": [x, y, w, h], "det_score": p | None, "landmarks": {name: [x, y]} | None,
"scores": {emotion: p}, "label": emotion, "label_score": p}``; ``box`` and ``landmarks`` are in
pixels of the upright photo (landmarks and ``det_score`` come from YuNet, None otherwise); the
probabilities of a face sum to 1. A photo without a face gives ``[]``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from .data import CLASSES_FER2013, to_model_input
from .export import OnnxModel, onnx_bytes
from .faces import (FER_PAD, FER_SIZE, LANDMARK_NAMES, Detections, crop_faces, make_detector,
                    to_grey)
from .images import load_image, to_rgb_array
from .models import load_model
from .tta import model_views, tta_predict

__all__ = ["Predictor", "ImageInput", "BUNDLED_MODEL", "BUNDLED_MODELS", "bundled_model_path",
           "model_classes", "draw_faces"]

ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]
Box = Sequence[float]
# Inside the installed package: "default", the most accurate model (docs/model-card.md), and
# "lhcnet", the best LHC-Net (the attention model this package is about).
BUNDLED_MODELS = {"default": "weights/default.safetensors", "lhcnet": "weights/lhcnet.safetensors"}
BUNDLED_MODEL = BUNDLED_MODELS["default"]
# Eye-level alignment of crops (with landmarks): off by default, measured in docs/predict.md.
ALIGN = False


def bundled_model_path(name: str = "default") -> Path:
    """A model shipped inside the package (``BUNDLED_MODELS``); ``FileNotFoundError`` if this
    install lacks it, ``ValueError`` for an unknown name."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"no bundled model {name!r}; the bundled models are {', '.join(BUNDLED_MODELS)}")
    path = Path(str(resources.files("lhcnet").joinpath(BUNDLED_MODELS[name])))
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled model lhcnet/{BUNDLED_MODELS[name]} is not in this install ({path}); "
            "pass a model file instead: Predictor(model='model.safetensors') or --model FILE")
    return path


def model_classes(model: Any) -> list[str]:
    """Class names stored with the model (``info["classes"]``); FER2013's seven by default."""
    meta = getattr(model, "lhcnet_metadata", None) or getattr(model, "lhcnet_config", None) or {}
    classes = (meta.get("info") or {}).get("classes")
    if classes:
        classes = [str(c) for c in classes]
    else:
        classes = list(CLASSES_FER2013)
    count = meta.get("num_classes")
    if count is not None and count != len(classes):
        raise ValueError(f"the model has {count} outputs but {len(classes)} class names "
                         "(save it with extra={'classes': [...]})")
    return classes


def _as_rgb(image: ImageInput) -> np.ndarray:
    """A path, PIL image or uint8 array (grey (H, W), RGB or RGBA (H, W, 3|4)) as RGB or grey uint8."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb_array(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return array[..., :3]
    if array.ndim == 2:
        return array
    raise ValueError(f"image arrays must be (H, W) grey or (H, W, 3|4) RGB(A), got shape {array.shape}")


def _load_model(model: str | os.PathLike | nn.Module | OnnxModel | None, backend: str,
                device: torch.device) -> tuple[nn.Module | OnnxModel, str]:
    """The model to run and its backend (an ``.onnx`` file implies ``"onnx"``)."""
    if model is None:
        model = bundled_model_path()
    elif isinstance(model, str) and model in BUNDLED_MODELS and not Path(model).exists():
        model = bundled_model_path(model)  # a bundled model by name; a file of that name wins
    if isinstance(model, (str, os.PathLike)):
        if Path(model).suffix.lower() == ".onnx":
            return OnnxModel(model, device), "onnx"
        model = load_model(model, device=device if backend == "torch" else "cpu")
    if isinstance(model, OnnxModel):
        return model, "onnx"
    if backend == "onnx":
        return OnnxModel(onnx_bytes(model), device), "onnx"
    return model.to(device).eval(), "torch"


class Predictor:
    """Face detection + emotion classification, batched.

    Args:
        model: a model file (``.safetensors`` from ``save_model``, or ``.onnx`` from
            ``export_onnx``, which implies ``backend="onnx"``), a model from ``create_model`` /
            ``load_model`` or an ``OnnxModel``, a bundled model's name (``BUNDLED_MODELS``:
            ``"default"``, ``"lhcnet"``), or None for the bundled default model.
        device: ``"cpu"``, ``"cuda"``...; None picks CUDA when available (PyTorch backend).
        detector: ``"yunet"`` (``lhcnet.faces.YuNetDetector``: boxes, landmarks, scores),
            ``"haar"`` (OpenCV's frontal-face cascade), a detector object (``YuNetDetector(...)``,
            ``HaarDetector(...)``), a callable ``grey (H, W) uint8 -> boxes (N, 4) [x, y, w, h]``,
            or None / ``"none"`` (every image is one face: already-cropped faces).
        backend: ``"torch"`` or ``"onnx"`` (ONNX Runtime; a PyTorch model is exported in memory).
        batch_size: faces per forward pass.
        pad: crop margin, a fraction of the squared box's side on every side (FER2013's framing).
        tta: None (the model's single view: the centre crop for models trained on crops), True
            (the TTA the model file records; the paper's 60 views if none), or a view set for
            ``lhcnet.tta.select_views`` ("ten-crop", "flip", "paper", "zoom", or a count);
            probabilities are the views' weighted mean.
        align: rotate each crop so the eyes are level (needs landmarks: YuNet) before it is cut.
    """

    def __init__(self, model: str | os.PathLike | nn.Module | OnnxModel | None = None,
                 device: str | torch.device | None = None,
                 detector: str | Callable[[np.ndarray], np.ndarray] | None = "yunet",
                 backend: str = "torch", batch_size: int = 64, pad: float = FER_PAD,
                 tta: bool | str | int | None = None, align: bool = ALIGN) -> None:
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.backend = _load_model(model, backend, self.device)
        self.input_size = int(self.model.input_size)
        self.classes = model_classes(self.model)
        self.detector = make_detector(detector) if isinstance(detector, str) else detector
        self.batch_size, self.pad, self.align = batch_size, pad, align
        self.views = model_views(self.model, tta)

    def __repr__(self) -> str:
        name = (getattr(self.model, "lhcnet_metadata", None) or {}).get("name", type(self.model).__name__)
        return (f"Predictor(model={name!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"input_size={self.input_size}, classes={self.classes})")

    # -- steps -------------------------------------------------------------------------------

    def locate(self, image: ImageInput, boxes: Sequence[Box] | None = None,
               whole_image: bool = False) -> tuple[Detections, np.ndarray]:
        """The faces found (``Detections``) and their 48x48 grey crops ``(N, 48, 48)`` uint8.

        ``boxes`` given: those (squared and padded like detections); ``whole_image`` (or no
        detector): the whole image is one face, squared without padding. Built-in detectors
        (with a ``detect`` method) see the colour photo, user callables its grey version.
        """
        rgb = _as_rgb(image)
        grey = to_grey(rgb)
        height, width = grey.shape
        pad = self.pad
        if boxes is not None:
            found = Detections.of_boxes(boxes)
        elif whole_image or self.detector is None:
            found, pad = Detections.of_boxes([[0, 0, width, height]]), 0.0
        elif hasattr(self.detector, "detect"):
            found = self.detector.detect(rgb)
        else:
            found = Detections.of_boxes(self.detector(grey))
        # whole pixels, as reported: a reported box given back as ``boxes`` gives the same crop
        found = dataclasses.replace(found, boxes=np.rint(found.boxes))
        rolls = None
        if self.align and found.landmarks is not None and hasattr(self.detector, "roll"):
            rolls = np.array([self.detector.roll(rgb, box) for box in found.boxes])
            found = dataclasses.replace(found, rolls=rolls)
        return found, crop_faces(grey, found.boxes, pad, FER_SIZE, rolls)

    @torch.no_grad()
    def classify(self, faces: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, classes)`` for grey face crops ``(N, H, W)`` uint8 (48x48 normally)."""
        faces = np.asarray(faces)
        if faces.ndim != 3 or faces.dtype != np.uint8:
            raise ValueError(f"faces must be uint8 (N, H, W), got {faces.dtype} {faces.shape}")
        out = np.zeros((len(faces), len(self.classes)), dtype=np.float32)
        # TTA multiplies each face into len(views) model inputs: keep a forward at ~batch_size.
        step = self.batch_size if self.views is None else max(1, self.batch_size // len(self.views))
        device = self.device if isinstance(self.model, nn.Module) else torch.device("cpu")
        for start in range(0, len(faces), step):
            chunk = torch.from_numpy(np.ascontiguousarray(faces[start:start + step])).to(device)
            x = to_model_input(chunk, self.input_size)                  # (B, 3, S, S) float 0..255
            if self.views is None:
                probs = torch.softmax(self.model(x).float(), dim=1)
            else:
                probs = tta_predict(self.model, x, self.views)
            bad = ~torch.isfinite(probs).all(dim=1)
            if bad.any():
                raise ValueError(f"the model gave non-finite outputs (NaN or inf) for {int(bad.sum())} "
                                 f"of {len(chunk)} faces: its weights are damaged or overflow")
            out[start:start + step] = probs.cpu().numpy()
        return out

    def to_faces(self, found: Detections, probs: np.ndarray) -> list[dict[str, Any]]:
        """Result dicts for detections and their probabilities ``(N, classes)``."""
        faces = []
        for i, p in enumerate(probs):
            best = int(np.argmax(p))
            landmarks = None if found.landmarks is None else {
                name: [round(float(x), 1), round(float(y), 1)]
                for name, (x, y) in zip(LANDMARK_NAMES, found.landmarks[i])}
            faces.append({"box": [int(v) for v in np.rint(found.boxes[i])],
                          "det_score": None if found.scores is None else round(float(found.scores[i]), 4),
                          "landmarks": landmarks,
                          **({} if found.rolls is None else {"roll": round(float(found.rolls[i]), 1)}),
                          "scores": {name: float(v) for name, v in zip(self.classes, p)},
                          "label": self.classes[best], "label_score": float(p[best])})
        return faces

    # -- whole calls -------------------------------------------------------------------------

    def predict(self, image: ImageInput, boxes: Sequence[Box] | None = None,
                whole_image: bool = False) -> list[dict[str, Any]]:
        """The faces of one image (a path, a PIL image or an RGB / grey uint8 array)."""
        return self.predict_batch([image], None if boxes is None else [boxes], whole_image)[0]

    def predict_batch(self, images: Sequence[ImageInput],
                      boxes: Sequence[Sequence[Box] | None] | None = None,
                      whole_image: bool = False) -> list[list[dict[str, Any]]]:
        """The faces of each image; all faces of all images are classified together.

        ``boxes``: one list of ``[x, y, w, h]`` per image (None for an image: detect its faces).
        """
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got boxes for {len(boxes)} images but {len(images)} images")
        located = [self.locate(image, None if boxes is None else boxes[i], whole_image)
                   for i, image in enumerate(images)]
        crops = [faces for _, faces in located]
        probs = self.classify(np.concatenate(crops) if crops else np.zeros((0, FER_SIZE, FER_SIZE), np.uint8))
        results, start = [], 0
        for found, faces in located:
            results.append(self.to_faces(found, probs[start:start + len(faces)]))
            start += len(faces)
        return results


def draw_faces(rgb: np.ndarray, faces: Sequence[dict[str, Any]]) -> np.ndarray:
    """A copy of ``rgb`` with each face's box, landmarks and ``[#track] label score`` drawn
    (sizes follow the image)."""
    out = np.ascontiguousarray(np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb.copy())
    unit = max(1, round(max(out.shape[:2]) / 500))
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.5 * unit, unit
    for face in faces:
        x, y, w, h = face["box"]
        cv2.rectangle(out, (x, y), (x + w, y + h), (0, 255, 0), 2 * unit)
        for px, py in (face.get("landmarks") or {}).values():
            cv2.circle(out, (round(px), round(py)), 2 * unit, (255, 200, 0), -1)
        track = f"#{face['track']} " if "track" in face else ""
        text = f"{track}{face['label']} {face['label_score']:.2f}"
        (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
        top = y - th - base - 2 * unit if y - th - base - 2 * unit >= 0 else y + h  # below if no room
        cv2.rectangle(out, (x, top), (x + tw + 2 * unit, top + th + base + 2 * unit), (0, 255, 0), -1)
        cv2.putText(out, text, (x + unit, top + th + unit), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return out

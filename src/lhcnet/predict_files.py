"""A ``Predictor`` over files, folders and videos: one record per image or video frame.

``iter_inputs`` expands the inputs (folders recursively, videos every N frames) into ``Item``s;
``predict_stream`` gathers the faces of consecutive items and classifies them in one batch, so a
folder of portraits runs at the batched speed; ``ResultWriter`` saves annotated copies and the
``predictions.csv`` / ``predictions.json`` tables. A bad input (missing, not an image, truncated,
unreadable video...) becomes a record with an ``error`` and the others go on.

A record: ``{"source": path, "frame": index (videos only), "faces": [face, ...],
"error": message (failures only), "annotated": path (with a ResultWriter)}``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from .faces import FER_SIZE
from .images import InputError, find_images, load_image
from .predict import Predictor, draw_faces
from .video import frame_count, is_video, read_frames

__all__ = ["Item", "iter_inputs", "predict_stream", "records_json", "table_header", "table_rows",
           "ResultWriter"]

# Faces of consecutive items are classified together until one of these is reached; the pixel
# budget bounds the memory of photos kept for annotation.
MAX_PENDING_PIXELS = 50_000_000
WRITABLE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass
class Item:
    """One image to predict: a photo or a video frame, or the error that stopped reading it."""

    source: str
    name: Path                      # relative output name of its annotated copy
    rgb: np.ndarray | None = None
    frame: int | None = None
    error: str | None = None


def _image_item(path: Path, name: Path) -> Item:
    try:
        return Item(str(path), name, rgb=load_image(path))
    except InputError as exc:
        return Item(str(path), name, error=str(exc))


def _video_items(path: Path, every: int) -> Iterator[Item]:
    try:
        total = frame_count(path)
    except InputError as exc:
        yield Item(str(path), Path(path.name), error=str(exc))
        return
    with tqdm(total=math.ceil(total / every) or None, desc=path.name, unit="frame", disable=None) as bar:
        try:
            for index, rgb in read_frames(path, every):
                bar.update()
                yield Item(str(path), Path(path.stem) / f"frame_{index:06d}.jpg", rgb=rgb, frame=index)
        except InputError as exc:
            yield Item(str(path), Path(path.name), error=str(exc))


def iter_inputs(inputs: Iterable[str | os.PathLike], every: int = 1) -> Iterator[Item]:
    """Items of image files, folders (recursive; a progress bar) and videos (every N-th frame)."""
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = list(find_images(path))
            if not files:
                yield Item(str(path), Path(path.name), error=f"{path}: no image files in this folder")
            for file in tqdm(files, desc=str(path), unit="image", disable=None):
                yield _image_item(file, Path(path.resolve().name) / file.relative_to(path))
        elif is_video(path):
            yield from _video_items(path, every)
        else:
            yield _image_item(path, Path(path.name))


def _record(item: Item, faces: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"source": item.source}
    if item.frame is not None:
        record["frame"] = item.frame
    record["faces"] = faces or []
    if item.error is not None:
        record["error"] = item.error
    return record


def predict_stream(predictor: Predictor, items: Iterable[Item], whole_image: bool = False,
                   keep_images: bool = False) -> Iterator[tuple[Item, dict[str, Any]]]:
    """``(item, record)`` per item, in order; faces batched across items (``batch_size``).

    ``keep_images``: leave each item's ``rgb`` in place (to annotate it); otherwise it is dropped
    as soon as its faces are cropped.
    """
    pending: list[tuple[Item, np.ndarray, np.ndarray]] = []
    face_count = pixel_count = 0

    def flush() -> Iterator[tuple[Item, dict[str, Any]]]:
        nonlocal face_count, pixel_count
        crops = [faces for _, _, faces in pending]
        probs = predictor.classify(np.concatenate(crops)) if face_count else np.zeros((0, 0))
        start = 0
        for item, boxes, faces in pending:
            if item.error is not None:
                yield item, _record(item)
                continue
            yield item, _record(item, predictor.to_faces(boxes, probs[start:start + len(faces)]))
            start += len(faces)
        pending.clear()
        face_count = pixel_count = 0

    no_faces = np.zeros((0, 4), np.int64), np.zeros((0, FER_SIZE, FER_SIZE), np.uint8)
    for item in items:
        boxes, faces = no_faces
        if item.error is None:
            try:
                boxes, faces = predictor.locate(item.rgb, whole_image=whole_image)
            except ValueError as exc:  # InputError included
                item.error = f"{item.source}: {exc}"
        if not keep_images or item.error is not None:
            item.rgb = None
        pending.append((item, boxes, faces))
        face_count += len(faces)
        pixel_count += 0 if item.rgb is None else item.rgb.size // 3
        if (face_count >= predictor.batch_size or len(pending) >= predictor.batch_size
                or pixel_count >= MAX_PENDING_PIXELS):
            yield from flush()
    yield from flush()


def records_json(records: Sequence[dict[str, Any]]) -> str:
    """A JSON array with one record per line (readable, and still one JSON document)."""
    return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"


def table_header(classes: Sequence[str]) -> list[str]:
    """The columns of ``predictions.csv``: one row per face, or per image without faces."""
    return ["source", "frame", "face", "x", "y", "w", "h", "label", "label_score", *classes,
            "status", "error"]


def table_rows(record: dict[str, Any], classes: Sequence[str]) -> list[list[Any]]:
    """A record's rows of ``predictions.csv`` (status ``ok``, ``no_face`` or ``error``)."""
    lead = [record["source"], record.get("frame", "")]
    if "error" in record:
        return [lead + [""] * (7 + len(classes)) + ["error", record["error"]]]
    if not record["faces"]:
        return [lead + [""] * (7 + len(classes)) + ["no_face", ""]]
    return [lead + [i, *face["box"], face["label"], f"{face['label_score']:.6f}",
                    *(f"{face['scores'][c]:.6f}" for c in classes), "ok", ""]
            for i, face in enumerate(record["faces"], start=1)]


class ResultWriter:
    """Writes annotated copies under ``out`` and the tables ``predictions.csv`` / ``.json``."""

    def __init__(self, out: str | os.PathLike, classes: Sequence[str]) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.classes = list(classes)
        self.records: list[dict[str, Any]] = []
        self._used: set[Path] = set()
        self._csv_file = open(self.out / "predictions.csv", "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(table_header(self.classes))

    def _unique(self, name: Path) -> Path:
        if name.suffix.lower() not in WRITABLE_SUFFIXES:
            name = name.with_suffix(".png")
        candidate, n = name, 1
        while candidate in self._used:
            candidate = name.with_name(f"{name.stem}_{n}{name.suffix}")
            n += 1
        self._used.add(candidate)
        return candidate

    def add(self, item: Item, record: dict[str, Any]) -> None:
        """Save the annotated image (if the item still has it) and the record's table rows."""
        if item.rgb is not None and "error" not in record:
            path = self.out / self._unique(item.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            annotated = draw_faces(item.rgb, record["faces"])
            if not cv2.imwrite(str(path), cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR)):
                raise OSError(f"{path}: could not write the annotated image")
            record["annotated"] = str(path)
        self.records.append(record)
        self._csv.writerows(table_rows(record, self.classes))

    def close(self) -> None:
        """Finish ``predictions.csv`` and write ``predictions.json``."""
        self._csv_file.close()
        (self.out / "predictions.json").write_text(records_json(self.records), encoding="utf-8")

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

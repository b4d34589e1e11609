"""What the inference thread does for each endpoint: uploads in, records / images / tables out.

Everything goes through the code ``lhcnet predict`` uses: ``images.decode_image`` (the robust
reading and the decompression-bomb guard), ``predict_files.predict_stream`` (the records of
``lhcnet predict --json``), ``video.read_frames``, ``predict_files.records_csv`` (the CSV of
``--out``) and ``predict.draw_faces``. Nothing is written to disk, except that a video is held in
a temporary file while OpenCV reads it (its FFmpeg reader takes a file name): in ``/dev/shm``,
which is memory, where it exists, and removed when the request ends.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..images import InputError, decode_image
from ..predict import Predictor, draw_faces
from ..predict_files import Item, predict_stream
from ..video import VIDEO_SUFFIXES, frame_count, frame_rate, read_frames
from .uploads import RequestError, Upload
from .worker import Deadline

__all__ = ["predict_records", "annotated_image", "video_records", "timeline"]

RAM_FOLDER = "/dev/shm"


def _unusable(message: str) -> RequestError:
    return RequestError(422, message)


def _decode(upload: Upload) -> np.ndarray:
    try:
        return decode_image(io.BytesIO(upload.data), upload.filename)
    except InputError as exc:
        raise _unusable(str(exc)) from None


def _records(predictor: Predictor, items: Iterator[Item] | Sequence[Item],
             whole_image: bool) -> list[dict[str, Any]]:
    records = [record for _, record in predict_stream(predictor, items, whole_image)]
    for record in records:
        if "error" in record:
            raise _unusable(record["error"])
    return records


def predict_records(predictor: Predictor, uploads: Sequence[Upload], deadline: Deadline,
                    whole_image: bool = False) -> list[dict[str, Any]]:
    """One record per uploaded image, as ``lhcnet predict --json`` prints them."""
    items = []
    for upload in uploads:
        deadline.check()
        items.append(Item(upload.filename, Path(upload.filename), rgb=_decode(upload)))
    return _records(predictor, items, whole_image)


def annotated_image(predictor: Predictor, upload: Upload, image_format: str,
                    whole_image: bool = False) -> tuple[bytes, int]:
    """The photo with its faces drawn, encoded as ``"png"`` or ``"jpeg"``; and the face count."""
    rgb = _decode(upload)
    faces = predictor.predict(rgb, whole_image=whole_image)
    ok, encoded = cv2.imencode(".png" if image_format == "png" else ".jpg",
                               cv2.cvtColor(draw_faces(rgb, faces), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the annotated image as {image_format}")
    return encoded.tobytes(), len(faces)


def video_records(predictor: Predictor, upload: Upload, every: int, max_frames: int,
                  deadline: Deadline, whole_image: bool = False) -> tuple[list[dict[str, Any]], float]:
    """One record per read frame (every ``every``-th) of an uploaded video, and its frame rate."""
    suffix = Path(upload.filename).suffix.lower()
    folder = RAM_FOLDER if os.path.isdir(RAM_FOLDER) and os.access(RAM_FOLDER, os.W_OK) else None
    with tempfile.NamedTemporaryFile(suffix=suffix if suffix in VIDEO_SUFFIXES else ".video",
                                     dir=folder) as file:
        file.write(upload.data)
        file.flush()

        def named(exc: InputError) -> RequestError:  # the client's file name, not ours
            return _unusable(str(exc).replace(file.name, upload.filename))

        try:
            total, rate = frame_count(file.name), frame_rate(file.name)
        except InputError as exc:
            raise named(exc) from None
        too_long = (f"{upload.filename}: more than {max_frames} frames to read with every={every} "
                    f"(the server's --max-video-frames); send a shorter video or a larger every")
        if math.ceil(total / every) > max_frames:
            raise RequestError(413, too_long + (f", e.g. every={math.ceil(total / max_frames)}"))

        def items() -> Iterator[Item]:
            for count, (index, rgb) in enumerate(read_frames(file.name, every)):
                deadline.check()
                if count == max_frames:  # the container under-declared its length
                    raise RequestError(413, too_long)
                yield Item(upload.filename, Path(upload.filename), rgb=rgb, frame=index)

        try:
            return _records(predictor, items(), whole_image), rate
        except InputError as exc:
            raise named(exc) from None


def _area(face: dict[str, Any]) -> int:
    return face["box"][2] * face["box"][3]


def timeline(records: Sequence[dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    """Per read frame: time, face count, and the largest face's label and probabilities."""
    points = []
    for record in records:
        face = max(record["faces"], key=_area, default=None)
        points.append({"frame": record["frame"],
                       "time_s": round(record["frame"] / rate, 3) if rate else None,
                       "faces": len(record["faces"]),
                       "label": face and face["label"], "label_score": face and face["label_score"],
                       "scores": face and face["scores"]})
    return points

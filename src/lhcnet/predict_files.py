"""A ``Predictor`` over files, folders and videos: one record per image or video frame.

``iter_inputs`` expands the inputs (folders recursively, videos every N frames) into ``Item``s;
``predict_stream`` gathers the faces of consecutive items and classifies them in one batch, so a
folder of portraits runs at the batched speed; ``track_videos`` numbers a video's faces across
frames (``lhcnet.tracking``); ``ResultWriter`` saves annotated copies (an annotated MP4 and a
timeline plot per video) and the ``predictions.csv`` / ``predictions.json`` tables. A bad input
(missing, not an image, too small, truncated, unreadable video...) becomes a record with an
``error`` and the others go on.

A record: ``{"source": path, "frame": index (videos only), "faces": [face, ...],
"error": message (failures only), "annotated": path (with a ResultWriter)}``.

An output folder is used by one ``ResultWriter`` at a time (an flock on a lock file naming the
PID; POSIX only) and is
refused if it holds anything already, unless ``overwrite``: then the files the previous run
listed in its manifest are removed first. Every file appears complete or not at all.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from .faces import FER_SIZE, Detections
from .files import FolderInUse, FolderLock, atomic_write_bytes, atomic_write_text
from .images import InputError, find_images, load_image
from .predict import Predictor, draw_faces
from .timeline import plot_timeline
from .tracking import FaceTracker
from .video import Mp4Writer, frame_count, frame_rate, is_video, read_frames

__all__ = ["Item", "iter_inputs", "predict_stream", "track_videos", "records_json", "table_header",
           "table_rows", "records_csv", "OutputInUse", "ResultWriter", "LOCK_NAME", "MANIFEST_NAME"]

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
    fps: float = 0.0                # video frames: frames per second of the frames read (0: unknown)


def _image_item(path: Path, name: Path) -> Item:
    try:
        return Item(str(path), name, rgb=load_image(path))
    except InputError as exc:
        return Item(str(path), name, error=str(exc))


def _video_items(path: Path, every: int) -> Iterator[Item]:
    try:
        total, fps = frame_count(path), frame_rate(path) / every
    except InputError as exc:
        yield Item(str(path), Path(path.name), error=str(exc))
        return
    with tqdm(total=math.ceil(total / every) or None, desc=path.name, unit="frame", disable=None) as bar:
        try:
            for index, rgb in read_frames(path, every):
                bar.update()
                yield Item(str(path), Path(path.name), rgb=rgb, frame=index, fps=fps)
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
    pending: list[tuple[Item, Detections, np.ndarray]] = []
    face_count = pixel_count = 0

    def flush() -> Iterator[tuple[Item, dict[str, Any]]]:
        nonlocal face_count, pixel_count
        crops = [faces for _, _, faces in pending]
        probs = predictor.classify(np.concatenate(crops)) if face_count else np.zeros((0, 0))
        start = 0
        for item, found, faces in pending:
            if item.error is not None:
                yield item, _record(item)
                continue
            yield item, _record(item, predictor.to_faces(found, probs[start:start + len(faces)]))
            start += len(faces)
        pending.clear()
        face_count = pixel_count = 0

    no_faces = Detections.of_boxes([]), np.zeros((0, FER_SIZE, FER_SIZE), np.uint8)
    for item in items:
        found, faces = no_faces
        if item.error is None:
            try:
                found, faces = predictor.locate(item.rgb, whole_image=whole_image)
            except (ValueError, cv2.error) as exc:  # InputError included; one input, not the job
                reason = " ".join(str(exc).split())
                item.error = reason if reason.startswith(item.source) else f"{item.source}: {reason}"
        if not keep_images or item.error is not None:
            item.rgb = None
        pending.append((item, found, faces))
        face_count += len(faces)
        pixel_count += 0 if item.rgb is None else item.rgb.size // 3
        if (face_count >= predictor.batch_size or len(pending) >= predictor.batch_size
                or pixel_count >= MAX_PENDING_PIXELS):
            yield from flush()
    yield from flush()


def track_videos(stream: Iterable[tuple[Item, dict[str, Any]]], window: int = 1,
                 min_iou: float = 0.3) -> Iterator[tuple[Item, dict[str, Any]]]:
    """The stream, with each video frame's faces numbered by ``FaceTracker`` (one per video)
    and, with ``window`` > 1, their probabilities smoothed over that many frames."""
    tracker, source = None, None
    for item, record in stream:
        if "frame" in record:
            if tracker is None or record["source"] != source:
                tracker, source = FaceTracker(min_iou, window=window), record["source"]
            tracker.update(record["faces"])
        else:
            tracker = None
        yield item, record


def records_json(records: Sequence[dict[str, Any]]) -> str:
    """A JSON array with one record per line (readable, and still one JSON document)."""
    return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"


def table_header(classes: Sequence[str]) -> list[str]:
    """The columns of ``predictions.csv``: one row per face, or per image without faces."""
    return ["source", "frame", "face", "track", "x", "y", "w", "h", "det_score", "label",
            "label_score", *classes, "status", "error"]


def table_rows(record: dict[str, Any], classes: Sequence[str]) -> list[list[Any]]:
    """A record's rows of ``predictions.csv`` (status ``ok``, ``no_face`` or ``error``)."""
    lead = [record["source"], record.get("frame", "")]
    if "error" in record:
        return [lead + [""] * (9 + len(classes)) + ["error", record["error"]]]
    if not record["faces"]:
        return [lead + [""] * (9 + len(classes)) + ["no_face", ""]]
    return [lead + [i, face.get("track", ""), *face["box"],
                    "" if face.get("det_score") is None else f"{face['det_score']:.4f}",
                    face["label"], f"{face['label_score']:.6f}",
                    *(f"{face['scores'][c]:.6f}" for c in classes), "ok", ""]
            for i, face in enumerate(record["faces"], start=1)]


def records_csv(records: Sequence[dict[str, Any]], classes: Sequence[str]) -> str:
    """The records as the text of ``predictions.csv``."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(table_header(classes))
    for record in records:
        writer.writerows(table_rows(record, classes))
    return text.getvalue()


LOCK_NAME = ".lhcnet-predict.lock"       # flock'ed by the run writing the folder; holds its PID
MANIFEST_NAME = ".lhcnet-predict-files"  # the files that run wrote, one relative path a line


OutputInUse = FolderInUse  # the output folder is being written by another running lhcnet predict


@dataclass
class _VideoOutput:
    """The annotated video and the frame records of the video being written."""

    source: str
    video: Mp4Writer
    timeline: Path
    fps: float
    records: list[dict[str, Any]] = field(default_factory=list)


class ResultWriter:
    """Writes annotated copies under ``out`` (an annotated MP4 and a timeline PNG per video) and
    the tables ``predictions.csv`` / ``.json``, atomically, holding the folder's lock meanwhile.

    ``out`` must be empty or new; ``overwrite``: remove what the previous run there listed in its
    manifest, and write anyway.
    """

    def __init__(self, out: str | os.PathLike, classes: Sequence[str], overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"{self.out}: exists and is not a folder (--out needs a folder)")
        self.out.mkdir(parents=True, exist_ok=True)
        self.classes = list(classes)
        self.records: list[dict[str, Any]] = []
        self.written: list[Path] = []
        self._used: set[Path] = set()
        self._video: _VideoOutput | None = None
        self._lock = FolderLock(self.out / LOCK_NAME, f"{self.out}: in use by PID {{pid}} (another lhcnet "
                                "predict is writing there); wait for it to finish or choose another --out")
        self._lock.__enter__()
        try:
            self._clear_previous(overwrite)
        except BaseException:
            self._lock.__exit__()
            raise

    def _clear_previous(self, overwrite: bool) -> None:
        present = sorted(p.name for p in self.out.iterdir() if p.name != LOCK_NAME)
        if not present:
            return
        if not overwrite:
            listed = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
            raise ValueError(f"{self.out}: folder not empty ({listed}); pass --overwrite to replace "
                             "the results of a previous lhcnet predict there, or choose another --out")
        manifest = self.out / MANIFEST_NAME
        try:
            previous = manifest.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            previous = []
        root = self.out.resolve()
        for line in previous:
            path = (self.out / line).resolve()
            if line and root in path.parents and path.is_file():  # never outside the folder
                path.unlink()
        manifest.unlink(missing_ok=True)

    def _unique(self, name: Path, suffixes: frozenset[str] = WRITABLE_SUFFIXES) -> Path:
        if name.suffix.lower() not in suffixes:
            name = name.with_suffix(".png")
        candidate, n = name, 1
        while candidate in self._used:
            candidate = name.with_name(f"{name.stem}_{n}{name.suffix}")
            n += 1
        self._used.add(candidate)
        return self.out / candidate

    def add(self, item: Item, record: dict[str, Any]) -> None:
        """Save the annotated image or video frame (if the item still has its pixels) and keep
        the record for the tables."""
        if self._video is not None and ("frame" not in record or record["source"] != self._video.source):
            self._finish_video()
        if "frame" in record:
            if self._video is None:
                stem = item.name.stem
                self._video = _VideoOutput(
                    record["source"], Mp4Writer(self._unique(Path(f"{stem}_annotated.mp4"), frozenset({".mp4"})), item.fps),
                    self._unique(Path(f"{stem}_timeline.png")), item.fps)
            self._video.records.append(record)
            if item.rgb is not None:
                self._video.video.write(draw_faces(item.rgb, record["faces"]))
                record["annotated"] = str(self._video.video.path)
        elif item.rgb is not None and "error" not in record:
            path = self._unique(item.name)
            ok, encoded = cv2.imencode(path.suffix, cv2.cvtColor(draw_faces(item.rgb, record["faces"]),
                                                                  cv2.COLOR_RGB2BGR))
            if not ok:
                raise OSError(f"{path}: could not encode the annotated image")
            self.written.append(atomic_write_bytes(path, encoded.tobytes()))
            record["annotated"] = str(path)
        self.records.append(record)

    def _finish_video(self) -> None:
        video, self._video = self._video, None
        path = video.video.close()
        if path is not None:
            self.written.append(path)
        self.written.append(plot_timeline(video.records, self.classes, video.timeline, video.fps,
                                          title=video.source))

    def close(self) -> None:
        """Finish the last video, write ``predictions.csv``, ``predictions.json`` and the
        manifest, and release the folder."""
        try:
            if self._video is not None:
                self._finish_video()
            self.written.append(atomic_write_text(self.out / "predictions.csv",
                                                  records_csv(self.records, self.classes)))
            self.written.append(atomic_write_text(self.out / "predictions.json", records_json(self.records)))
            atomic_write_text(self.out / MANIFEST_NAME, "".join(
                f"{p.relative_to(self.out).as_posix()}\n" for p in self.written))
        finally:
            if self._video is not None:
                self._video.video.abort()
            self._lock.__exit__()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

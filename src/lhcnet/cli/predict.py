"""``lhcnet predict INPUT...``: faces and emotions in photos, folders and videos.

Exit codes: 0 every input was processed ("no face found" included), 1 some inputs failed (the
others were still processed), 2 usage errors (bad options, missing model file).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..faces import DETECTORS, make_detector
from ..predict import ALIGN, Predictor
from ..predict_files import ResultWriter, iter_inputs, predict_stream, records_json, track_videos


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in 0..1, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="detect faces and predict their emotions in photos, folders and videos",
        description="Detect faces (YuNet by default, or OpenCV's Haar cascade) and print each "
                    "face's box and emotion probabilities. Exit code 0: all inputs processed; "
                    "1: some inputs failed.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively) or video files")
    p.add_argument("--model", help="model file (.safetensors or .onnx), or a bundled model by name: "
                   "default (the most accurate; the default) or lhcnet (the best LHC-Net)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write annotated images (videos: an annotated MP4 and a timeline PNG) and "
                        "predictions.csv / predictions.json into this new or empty folder")
    p.add_argument("--overwrite", action="store_true",
                   help="with --out: replace the results a previous lhcnet predict left there")
    p.add_argument("--detector", choices=DETECTORS, default="yunet",
                   help="face detector: yunet (default; landmarks and scores), haar (OpenCV's "
                        "frontal-face cascade, OpenCV 4 only) or none (each image is one face)")
    p.add_argument("--min-face", type=positive_int, metavar="PX",
                   help="smallest face side in pixels (default: yunet 24 px or 2%% of the shorter "
                        "side, whichever is larger; haar 48 px or 5%%)")
    p.add_argument("--det-threshold", type=probability, metavar="P",
                   help="yunet: detection score a face needs (default 0.7)")
    p.add_argument("--align", action=argparse.BooleanOptionalAction, default=ALIGN,
                   help="rotate each face so the eyes are level before classifying it (yunet; "
                        f"default {'on' if ALIGN else 'off'}, see docs/predict.md)")
    p.add_argument("--smooth", type=positive_int, default=1, metavar="N",
                   help="videos: average each face's probabilities over its last N read frames")
    p.add_argument("--tta", action="store_true", help="average over test-time augmentation views")
    p.add_argument("--tta-views", default=None,
                   help="with --tta: ten-crop, flip, paper (60 views), zoom (8) or a count "
                        "(default: the TTA the model file records; paper for files without one)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="PyTorch or ONNX Runtime (pip install 'lhcnet[onnx]')")
    p.add_argument("--every", type=positive_int, default=1, metavar="N",
                   help="videos: predict every N-th frame (default 1)")
    p.add_argument("--whole-image", action="store_true",
                   help="no face detection: each image is one face (already-cropped faces)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                   help="faces per forward pass (default 64)")
    p.set_defaults(func=run)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _source(record: dict[str, Any]) -> str:
    return record["source"] + (f" [frame {record['frame']}]" if "frame" in record else "")


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per face, or per image without a face or with an error; aligned columns."""
    rows: list[tuple[str, ...]] = [("INPUT", "FACE", "BOX", "LABEL", "SCORE")]
    for record in records:
        if "error" in record:
            reason = record["error"].removeprefix(record["source"] + ": ")
            rows.append((_source(record), "error: " + reason))
        elif not record["faces"]:
            rows.append((_source(record), "no face found"))
        for i, face in enumerate(record["faces"], start=1):
            rows.append((_source(record), str(i), ",".join(map(str, face["box"])), face["label"],
                         f"{face['label_score']:.3f}"))
    widths = [max(len(row[c]) for row in rows if len(row) == 5 or c == 0) for c in range(5)]
    lines = []
    for row in rows:
        cells = row if len(row) == 5 else (row[0], "-", row[1])  # a message spans the rest
        lines.append("  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    detector = make_detector(args.detector, args.min_face, args.det_threshold)
    try:
        predictor = Predictor(args.model, args.device, detector=detector, backend=args.backend,
                              batch_size=args.batch_size, tta=(args.tta_views or True) if args.tta else None,
                              align=args.align)
    except ImportError as exc:  # the optional ONNX packages
        print(f"lhcnet predict: error: {exc}", file=sys.stderr)
        return 2
    writer = ResultWriter(args.out, predictor.classes, args.overwrite) if args.out else None
    records = []
    try:
        stream = predict_stream(predictor, iter_inputs(args.inputs, args.every), args.whole_image,
                                keep_images=writer is not None)
        for item, record in track_videos(stream, args.smooth):
            if "error" in record:
                print(f"lhcnet predict: error: {record['error']}", file=sys.stderr)
            if writer is not None:
                writer.add(item, record)
            records.append(record)
    finally:
        if writer is not None:
            writer.close()
    failed = sum("error" in r for r in records)
    if args.json:
        sys.stdout.write(records_json(records))
    else:
        print(format_table(records))
        faces = sum(len(r["faces"]) for r in records)
        frames = sum("frame" in r for r in records)
        read = [_count(n, noun) for n, noun in ((len(records) - frames, "file"), (frames, "video frame"))
                if n]
        print(f"{' and '.join(read) or 'no input'}: {_count(faces, 'face')}, {failed} failed"
              + (f"; annotated images, videos and predictions.csv/.json in {args.out}" if args.out else ""))
    return 1 if failed else 0

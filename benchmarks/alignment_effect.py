"""Does eye-level alignment change the predictions on tilted faces? (decides ``Predictor(align=)``)

FER2013 PublicTest faces (labelled, upright as FER2013 framed them) are enlarged 3x into a
288x288 photo (border pixels repeated), rotated by a known angle, and given to ``Predictor`` with
YuNet; each detected face is classified from its crop as it is and from the crop rotated so the
eyes are level. Printed per angle: how many faces YuNet finds, the accuracy of both crops and how
often each agrees with the prediction for the same face upright (angle 0, not aligned: the
framing the model was trained on). Faces are counted at an angle only where YuNet found them.

    python benchmarks/alignment_effect.py [--faces 600] [--angles 0 10 20 30 45]
"""
from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from lhcnet.predict import Predictor

DATA = Path(os.environ.get("LHCNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ENLARGE, CANVAS = 3, 288


def public_test_faces(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` PublicTest faces (uint8 (N, 48, 48)) and labels, read from the CSV."""
    faces, labels = [], []
    with gzip.open(DATA / "fer2013.csv.gz", "rt") as f:
        next(f)
        for line in f:
            emotion, pixels, usage = line.strip().split(",")
            if usage == "PublicTest":
                faces.append(np.array(pixels.split(), np.uint8).reshape(48, 48))
                labels.append(int(emotion))
                if len(faces) == count:
                    break
    return np.stack(faces), np.array(labels)


def tilted_photo(face: np.ndarray, angle: float) -> np.ndarray:
    """The face enlarged into a CANVAS x CANVAS photo, rotated ``angle`` degrees (counter-clockwise)."""
    big = cv2.resize(face, None, fx=ENLARGE, fy=ENLARGE, interpolation=cv2.INTER_CUBIC)
    margin = (CANVAS - big.shape[0]) // 2
    photo = cv2.copyMakeBorder(big, margin, margin, margin, margin, cv2.BORDER_REPLICATE)
    turn = cv2.getRotationMatrix2D(((CANVAS - 1) / 2, (CANVAS - 1) / 2), angle, 1.0)
    return cv2.warpAffine(photo, turn, (CANVAS, CANVAS), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def largest(faces: list[dict]) -> dict | None:
    return max(faces, key=lambda f: f["box"][2] * f["box"][3], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=600)
    parser.add_argument("--angles", type=float, nargs="+", default=[0, 10, 20, 30, 45])
    parser.add_argument("--model", help="model file (default: the bundled model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    faces, labels = public_test_faces(args.faces)
    plain = Predictor(args.model, device="cpu", align=False)
    aligned = Predictor(args.model, device="cpu", align=True)
    upright = [largest(f) for f in plain.predict_batch(list(faces), whole_image=True)]
    reference = np.array([plain.classes.index(f["label"]) for f in upright])
    print(f"{len(faces)} PublicTest faces; accuracy of the 48x48 faces themselves: "
          f"{100 * (reference == labels).mean():.1f} %")
    print(f"{'angle':>6} {'found':>6} {'acc plain':>10} {'acc aligned':>12} {'same as upright: plain':>23}"
          f" {'aligned':>8} {'roll error (median)':>20}")
    upright_roll = None
    for angle in args.angles:
        for sign in ((1, -1) if angle else (1,)):
            photos = [tilted_photo(face, sign * angle) for face in faces]
            found_plain = [largest(f) for f in plain.predict_batch(photos)]
            found_aligned = [largest(f) for f in aligned.predict_batch(photos)]
            hit = np.array([f is not None for f in found_plain])
            label = (lambda f: plain.classes.index(f["label"]) if f else -1)
            pred_plain = np.array([label(f) for f in found_plain])
            pred_aligned = np.array([label(f) for f in found_aligned])
            roll = np.array([f["roll"] if f else np.nan for f in found_aligned])
            if upright_roll is None:  # the faces' own roll, as FER2013 framed them
                upright_roll = roll
            error = np.abs(roll - upright_roll - sign * angle)
            print(f"{sign * angle:>6.0f} {hit.sum():>6d} {100 * (pred_plain[hit] == labels[hit]).mean():>9.1f}% "
                  f"{100 * (pred_aligned[hit] == labels[hit]).mean():>11.1f}% "
                  f"{100 * (pred_plain[hit] == reference[hit]).mean():>22.1f}% "
                  f"{100 * (pred_aligned[hit] == reference[hit]).mean():>7.1f}% "
                  f"{np.nanmedian(error):>15.1f} deg", flush=True)

if __name__ == "__main__":
    main()

"""Image folders: ``root/<class>/*.png|jpg`` or ``root/<split>/<class>/...`` for custom data sets.

Images are read as grey and resized to ``image_size`` squared (bilinear; the aspect ratio is not
kept, so give face crops). A file that cannot be decoded is named in ``bad_rows``, logged and
skipped: one broken JPEG never stops the conversion of a large folder.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import IMAGE_SUFFIXES, find_images, load_image
from .dataset import CLASSES_FER2013, CLASSES_FERPLUS, SPLIT_ALIASES, BadRecord, FaceDataset

__all__ = ["IMAGE_SUFFIXES", "load_image_folder", "read_grey_image"]

log = logging.getLogger(__name__)

_LABEL_SETS = {"fer2013": CLASSES_FER2013, "ferplus": CLASSES_FERPLUS}


def read_grey_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image as uint8 ``(image_size, image_size)`` grey.

    Read as ``lhcnet.images.load_image`` reads photos (EXIF orientation, alpha on white, 16-bit
    scaled, decompression-bomb guard), then PIL's 'L' conversion (ITU-R 601 luma; grey stays exact).
    """
    grey = Image.fromarray(load_image(path)).convert("L")
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.uint8)


def load_image_folder(root: str | os.PathLike, labels: str | None = None,
                      image_size: int = 48) -> FaceDataset:
    """Read a folder of class sub-folders (optionally inside split folders).

    ``labels=None`` takes the class names from the folder names (sorted); ``"fer2013"`` or
    ``"ferplus"`` maps folder names (case-insensitive) onto that label set, so a folder data set
    can be evaluated with a model trained on FER2013.
    """
    root = Path(root)
    groups = _class_folders(root)  # (split code, class folder)
    # one class per folder name, whatever its case in each split folder
    names = sorted({f.name.lower(): f.name for _, f in groups}.values(), key=str.lower)
    classes = _LABEL_SETS[labels] if labels else tuple(names)
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        raise ValueError(f"{root}: class folder {unknown[0]!r} is not a {labels} class; expected "
                         f"one of {', '.join(classes)}")
    images, targets, splits, bad = [], [], [], []
    for split, folder in groups:
        bad += _unresolvable_links(folder)
        for file in find_images(folder):
            try:
                images.append(read_grey_image(file, image_size))
            except (OSError, ValueError) as exc:  # lhcnet.images.InputError is a ValueError
                bad.append(BadRecord(str(file), None, f"unreadable image ({exc})"))
                continue
            targets.append(lookup[folder.name.lower()])
            splits.append(split)
    if bad:
        log.warning("%s: skipped %d unreadable images or links: %s", root, len(bad),
                    "; ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    if not images:
        raise ValueError(f"{root}: no readable images; expected root/<class>/*.png|jpg or "
                         "root/<split>/<class>/*.png|jpg")
    return FaceDataset(images=np.stack(images), labels=np.array(targets, dtype=np.int64),
                       splits=np.array(splits, dtype=np.uint8), classes=classes, source=str(root),
                       bad_rows=bad)


def _unresolvable_links(folder: Path) -> list[BadRecord]:
    """Symbolic links below ``folder`` with an image name that lead nowhere: a loop or a missing
    target (``find_images`` cannot see them as files, so they are reported here)."""
    bad = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            try:
                path.stat()
            except OSError as exc:
                what = "symlink loop" if exc.errno == errno.ELOOP else "broken symlink (its target is missing)"
                bad.append(BadRecord(str(path), None, what))
    return bad


def _class_folders(root: Path) -> list[tuple[int, Path]]:
    """``(split code, class folder)`` pairs; split folders are recognised by name (train/val/...)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise ValueError(f"{root}: no sub-folders; expected root/<class>/*.png|jpg")
    if all(p.name.lower() in SPLIT_ALIASES for p in top):
        return [(SPLIT_ALIASES[s.name.lower()], c) for s in top for c in sorted(s.iterdir())
                if c.is_dir() and not c.name.startswith(".")]
    return [(0, c) for c in top]

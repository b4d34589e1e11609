"""``load_dataset``: any supported source -> ``FaceDataset``, converted once and cached.

Sources: a Kaggle FER2013 ``.csv`` / ``.csv.gz`` / ``.tar.gz``, a cache written by
``save_cache`` (``lhcnet data prepare``), or an image folder. Raw sources are converted into the
cache directory on first use and memory-mapped from there afterwards.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from .cache import cache_path, default_cache_dir, is_cache, load_cache, save_cache
from .dataset import CLASSES_FER2013, CLASSES_FERPLUS, FaceDataset
from .fer2013 import load_fer2013
from .ferplus import apply_ferplus
from .folders import load_image_folder
from .preprocess import resize_uint8

__all__ = ["LABEL_SETS", "load_dataset"]

log = logging.getLogger(__name__)

LABEL_SETS = {"fer2013": CLASSES_FER2013, "ferplus": CLASSES_FERPLUS}


def load_dataset(src: str | os.PathLike, labels: str | None = None,
                 ferplus_csv: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | bool | None = None, skip_bad: bool = False,
                 image_size: int = 48) -> FaceDataset:
    """Load faces from ``src`` with the label set ``labels``.

    ``labels``: None keeps the source's own (FER2013 for the Kaggle file, whatever a cache holds,
    folder names for a folder); ``"fer2013"``; ``"ferplus"`` (needs ``ferplus_csv`` unless the
    cache already holds FER+ labels; giving ``ferplus_csv`` alone implies it).
    ``cache_dir``: None = ``$LHCNET_HOME/data`` (or ``~/.cache/lhcnet/data``), False = no cache.
    ``image_size``: images are resized (bilinear) to this square size; FER2013 is 48.
    """
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if labels is None and ferplus_csv is not None:
        labels = "ferplus"
    if labels not in (None, *LABEL_SETS):
        raise ValueError(f"unknown label set {labels!r}; expected one of {', '.join(LABEL_SETS)}")
    if is_cache(path) or path.suffix == ".npz":  # a foreign .npz: load_cache says what is wrong
        dataset = load_cache(path)
    elif path.is_dir():
        dataset = _cached(path, cache_dir, lambda: load_image_folder(path, labels, image_size),
                          kind="folder", labels=labels, image_size=image_size)
    else:
        dataset = _cached(path, cache_dir, lambda: load_fer2013(path, skip_bad=skip_bad),
                          kind="fer2013", skip_bad=skip_bad)
    dataset = _relabel(dataset, labels, ferplus_csv)
    if dataset.image_size != image_size:
        dataset = replace(dataset, images=resize_uint8(dataset.images, image_size))
    return dataset


def _cached(path: Path, cache_dir: str | os.PathLike | bool | None, convert, **options) -> FaceDataset:
    """``convert()`` once per source version and options; reuse the cache file afterwards."""
    if cache_dir is False:
        return convert()
    target = cache_path(path, default_cache_dir() if cache_dir in (None, True) else cache_dir,
                        **options)
    if target.exists():
        try:
            return load_cache(target)
        except ValueError as exc:  # damaged or old: convert again
            log.warning("%s", exc)
    dataset = convert()
    try:
        save_cache(dataset, target)
    except OSError as exc:  # a read-only home must not stop training; it only costs time
        log.warning("could not write the data cache %s (%s); converting each time", target, exc)
        return dataset
    return load_cache(target)


def _relabel(dataset: FaceDataset, labels: str | None, ferplus_csv: str | os.PathLike | None
             ) -> FaceDataset:
    if labels is None or dataset.classes == LABEL_SETS[labels]:
        return dataset
    if labels == "ferplus" and dataset.classes == CLASSES_FER2013:
        if ferplus_csv is None:
            raise ValueError(f"{dataset.source}: FER+ labels need the FER+ votes file "
                             "(fer2013new.csv); pass ferplus_csv / --ferplus-csv")
        return apply_ferplus(dataset, ferplus_csv)
    raise ValueError(f"{dataset.source}: holds the classes {', '.join(dataset.classes)}; "
                     f"cannot provide {labels} labels")

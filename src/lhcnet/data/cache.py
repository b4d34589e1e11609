"""The data cache: one uncompressed ``.npz`` per converted source, images memory-mapped on load.

An uncompressed ``.npz`` is a zip of ``.npy`` files stored as-is, so the image array can be
memory-mapped straight out of the zip (NumPy's own ``np.load(mmap_mode=...)`` ignores npz).
Nothing is pickled: metadata is a JSON document stored as bytes. Writes go to a temporary file
and are renamed into place (``lhcnet.files.atomic_write``), so a reader (or a parallel run) never
sees half a cache.

Default location: ``$LHCNET_HOME/data`` or ``~/.cache/lhcnet/data``; the file name carries a
hash of the source's path, size and modification time, so an edited source is converted again.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write
from .dataset import BadRecord, FaceDataset

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "default_cache_dir", "cache_path", "is_cache",
           "save_cache", "load_cache", "source_fingerprint"]

CACHE_FORMAT = "lhcnet-faces"
CACHE_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"
_ARRAYS = ("images", "labels", "splits", "row_ids", "soft_labels")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LHCNET_HOME", Path.home() / ".cache" / "lhcnet")) / "data"


def source_fingerprint(src: str | os.PathLike) -> str:
    """Hash of a file's (path, size, mtime), or of every file's under a folder."""
    path = Path(src).resolve()
    digest = hashlib.sha1(str(path).encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path.parent)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_path(src: str | os.PathLike, cache_dir: str | os.PathLike, **options: Any) -> Path:
    """Where the cache of ``src`` converted with ``options`` lives inside ``cache_dir``."""
    key = hashlib.sha1(json.dumps([source_fingerprint(src), CACHE_VERSION, options],
                                  sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(src).name.split(".")[0] or "data"
    return Path(cache_dir) / f"{stem}-{key}.npz"


def is_cache(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            return "meta.npy" in archive.namelist()
    except zipfile.BadZipFile:
        return False


def save_cache(dataset: FaceDataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "classes": list(dataset.classes),
            "source": dataset.source, "bad_rows": [list(b) for b in dataset.bad_rows]}
    arrays = {name: np.ascontiguousarray(getattr(dataset, name)) for name in _ARRAYS
              if getattr(dataset, name) is not None}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return atomic_write(path, lambda f: np.savez(f, **arrays))  # uncompressed (ZIP_STORED): memory-mappable


def load_cache(path: str | os.PathLike, mmap: bool = True) -> FaceDataset:
    """Read a cache written by ``save_cache``; ``images`` is a read-only memmap when ``mmap``."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = {Path(n).stem for n in archive.namelist()}
            meta = json.loads(_read_member(archive, "meta").tobytes())
            if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
                raise ValueError(f"{path}: not an lhcnet data cache of version {CACHE_VERSION} "
                                 f"(found {meta.get('format')} {meta.get('version')}); prepare it again")
            arrays = {name: _read_member(archive, name) for name in _ARRAYS
                      if name in names and not (mmap and name == "images")}
            if mmap:
                arrays["images"] = _memmap_member(path, archive, "images.npy")
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: damaged data cache ({exc}); prepare it again") from None
    return FaceDataset(classes=tuple(meta["classes"]), source=meta["source"],
                       bad_rows=[BadRecord(*b) for b in meta["bad_rows"]], **arrays)


def _read_member(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(f"{name}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _memmap_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Memory-map an uncompressed ``.npy`` member of a zip in place."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:  # a re-zipped cache: read it instead
        return _read_member(archive, Path(name).stem)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header; name and extra field lengths at bytes 26-29
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C")

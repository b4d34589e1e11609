"""Atomic file writes that keep the user's umask: the one way lhcnet replaces a file.

The data goes to a temp file next to the target (same folder, so the rename cannot cross file
systems), is flushed and fsynced, then renamed over the target and the folder fsynced: a crash or
a full disk leaves either the old file or the new one, never half a file. The temp file is
created with mode 0666 and the kernel applies the umask, as for any ``open(path, "w")``
(``tempfile.mkstemp`` would make it 0600 whatever the umask). Temp names are
``.<name>.<pid>.<random>.tmp``: ``TEMP_PATTERN`` finds those a killed process left behind.
An ``OSError`` (disk full, read-only folder) names the target file.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "TEMP_PATTERN"]

TEMP_PATTERN = ".*.tmp"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno is None:
            raise OSError(f"cannot write {path}: {exc}") from exc
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))

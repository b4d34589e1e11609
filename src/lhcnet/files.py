"""Atomic file writes that keep the user's umask: the one way lhcnet replaces a file.

The data goes to a temp file next to the target (same folder, so the rename cannot cross file
systems), is flushed and fsynced, then renamed over the target and the folder fsynced: a crash or
a full disk leaves either the old file or the new one, never half a file. The temp file is
created with mode 0666 and the kernel applies the umask, as for any ``open(path, "w")``
(``tempfile.mkstemp`` would make it 0600 whatever the umask). Temp names are
``.<name>.<pid>.<random>.tmp``: ``TEMP_PATTERN`` finds those a killed process left behind.
An ``OSError`` (disk full, read-only folder) names the target file.

``FolderLock``: the one lock on an output folder (a run folder, a ``--out`` folder).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: folders are not locked
    fcntl = None

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "temp_path", "TEMP_PATTERN",
           "FolderLock", "FolderInUse"]

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


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temp name next to ``path``: ``.<name>.<pid>.<random>.tmp`` + ``suffix`` (for writers
    that pick the format from the name, e.g. ``".mp4"``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = temp_path(path)
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


class FolderInUse(ValueError):
    """Another running process holds the folder's ``FolderLock``."""


class FolderLock:
    """An exclusive ``flock`` on ``lock_file``, which holds the holder's PID. A second process
    stops at once with ``FolderInUse(busy.format(pid=...))``. The kernel drops the lock when its
    process ends, however it ends, so a killed run leaves no stale lock (the file itself stays).
    POSIX only: elsewhere the folder is not locked."""

    def __init__(self, lock_file: str | os.PathLike, busy: str) -> None:
        self.path, self.busy = Path(lock_file), busy
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(self.busy.format(pid=holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the flock
            self._fd = None

"""Read the Kaggle FER2013 file (``emotion,pixels,Usage``) from ``.csv``, ``.csv.gz`` or ``.tar.gz``.

The 301 MB CSV holds 82 million space-separated pixel values. Splitting them with Python would
take minutes, so rows are parsed in blocks with NumPy: find the end of every digit run, read the
(at most three) digits before it, count runs per row. Rows that the fast path flags (wrong count,
odd characters, values over 255) are re-read one by one to say exactly what is wrong.

Bad input raises ``ValueError("<file>: line <n>: <what was expected>")``; with ``skip_bad=True``
the bad rows are dropped and listed in ``FaceDataset.bad_rows`` (and logged as a warning).
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .dataset import CLASSES_FER2013, SPLITS, BadRecord, FaceDataset

__all__ = ["load_fer2013", "read_text_source", "parse_fer2013_csv", "PIXELS", "COLUMNS"]

log = logging.getLogger(__name__)

SIDE = 48
PIXELS = SIDE * SIDE
COLUMNS = ("emotion", "pixels", "Usage")
_ROWS_PER_BLOCK = 1024  # ~8 MB of text per NumPy pass: big enough to be fast, small in memory
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_PIECE = 1 << 20


def load_fer2013(src: str | os.PathLike, skip_bad: bool = False) -> FaceDataset:
    """Read a Kaggle FER2013 CSV (plain, gzip or inside the Kaggle ``fer2013.tar.gz``), no cache."""
    data, name, truncated = read_text_source(src)
    return parse_fer2013_csv(data, name, skip_bad=skip_bad, truncated=truncated)


def read_text_source(src: str | os.PathLike) -> tuple[bytes | bytearray, str, bool]:
    """The CSV bytes of ``src``, a display name, and whether a gzip stream ended early.

    Gzip is recognised by its magic bytes, a tar archive inside it by the ``ustar`` header.
    """
    path = Path(src)
    raw = path.read_bytes()
    name = str(path)
    if not raw:
        raise ValueError(f"{name}: empty file; expected a CSV header line 'emotion,pixels,Usage'")
    truncated = False
    if raw[:2] == _GZIP_MAGIC:
        raw, truncated = _gunzip(raw, name)
    if raw[257:262] == b"ustar":
        raw, name, truncated = _csv_from_tar(raw, name, truncated)
    return raw, name, truncated


def _gunzip(raw: bytes, name: str) -> tuple[bytearray, bool]:
    """Decompress every gzip member; a missing end-of-stream marker returns what was read.

    Fed in 1 MB pieces into one growing buffer: decompressing 94 MB in one call makes zlib double
    its output buffer up to 512 MB for the 301 MB FER2013 text.
    """
    view, out, start = memoryview(raw), bytearray(), 0
    while start < len(raw):
        stream, pos = zlib.decompressobj(wbits=31), start
        while not stream.eof and pos < len(raw):
            try:
                out += stream.decompress(view[pos:pos + _GZIP_PIECE])
            except zlib.error as exc:
                raise ValueError(f"{name}: corrupt gzip data ({exc}); expected a valid .gz file") from None
            pos += _GZIP_PIECE
        if not stream.eof:
            return out, True
        start = min(pos, len(raw)) - len(stream.unused_data)
        if not bytes(view[start:]).strip(b"\0"):  # some writers pad the last member with zeros
            break
    return out, False


def _csv_from_tar(raw: bytes | bytearray, name: str, truncated: bool
                  ) -> tuple[bytes | bytearray, str, bool]:
    """The FER2013 CSV member of a tar archive (Kaggle: ``fer2013/fer2013.csv``)."""
    members = []
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
            for member in archive:
                if member.isfile() and member.name.lower().endswith(".csv"):
                    members.append(member)
    except tarfile.TarError as exc:
        if not members:  # a truncated tail after the CSV is reported by the size check below
            raise ValueError(f"{name}: unreadable tar archive ({exc})") from None
    if not members:
        raise ValueError(f"{name}: no .csv file in the archive; expected fer2013/fer2013.csv")
    member = next((m for m in members if Path(m.name).name.lower() == "fer2013.csv"), members[0])
    data = raw[member.offset_data:member.offset_data + member.size]
    return data, f"{name}:{member.name}", truncated or len(data) < member.size


def parse_fer2013_csv(data: bytes | bytearray, name: str, skip_bad: bool = False,
                      truncated: bool = False) -> FaceDataset:
    """Parse the CSV text ``data`` (``name`` is used in messages) into a ``FaceDataset``."""
    if not data.strip():
        raise ValueError(f"{name}: empty file; expected a CSV header line 'emotion,pixels,Usage'")
    header_end = data.find(b"\n")
    header_end = len(data) if header_end < 0 else header_end
    column = _header_columns(data[:header_end], name)
    n_fields = column.pop("count")

    capacity = data.count(b"\n") + 1
    images = np.empty((capacity, PIXELS), dtype=np.uint8)
    labels = np.empty(capacity, dtype=np.int64)
    splits = np.empty(capacity, dtype=np.uint8)
    row_ids = np.empty(capacity, dtype=np.int64)
    bad: list[BadRecord] = []
    kept = 0
    block: list[tuple[int, int, int, int, bytes]] = []  # (line, row id, label, split, pixels)

    def flush() -> None:
        nonlocal kept
        values, problems = _parse_pixel_rows([row[4] for row in block])
        for i, reason in problems:
            bad.append(BadRecord(name, block[i][0], reason))
        good = np.ones(len(block), dtype=bool)
        good[[i for i, _ in problems]] = False
        n = int(good.sum())
        meta = np.array([row[:4] for row in block], dtype=np.int64).reshape(-1, 4)[good]
        images[kept:kept + n] = values[good]
        row_ids[kept:kept + n], labels[kept:kept + n], splits[kept:kept + n] = meta[:, 1:].T
        kept += n
        block.clear()

    lines = _LineReader(data, header_end + 1, truncated)
    row_id = 0
    for line_no, line in lines:
        if not line.strip():
            continue  # blank lines are not rows (FER+ aligns on data rows)
        fields = line.split(b",")
        row_id += 1
        if len(fields) != n_fields:
            bad.append(BadRecord(name, line_no, f"expected {n_fields} comma-separated fields "
                                 f"(emotion,pixels,Usage), got {len(fields)}"))
            continue
        label = _unquote(fields[column["emotion"]])
        if not label.isdigit() or int(label) >= len(CLASSES_FER2013):
            bad.append(BadRecord(name, line_no, f"emotion {label.decode(errors='replace')!r}: "
                                 "expected a label 0-6"))
            continue
        usage = _unquote(fields[column["Usage"]]).decode(errors="replace")
        if usage not in SPLITS:
            bad.append(BadRecord(name, line_no, f"Usage {usage!r}: expected one of "
                                 f"{', '.join(SPLITS)}"))
            continue
        block.append((line_no, row_id - 1, int(label), SPLITS.index(usage),
                      _unquote(fields[column["pixels"]])))
        if len(block) == _ROWS_PER_BLOCK:
            flush()
    if block:
        flush()
    if lines.truncation is not None:
        bad.append(BadRecord(name, lines.truncation, "truncated gzip: the data ends in this line; "
                             "expected the rest of the file and the gzip end-of-stream marker"))
    bad.sort(key=lambda record: record.line)
    if bad and not skip_bad:
        more = f" ({len(bad) - 1} more bad rows; --skip-bad drops them)" if len(bad) > 1 else ""
        raise ValueError(f"{bad[0]}{more}")
    if kept == 0:
        raise ValueError(f"{name}: no data rows after the header; expected lines "
                         "'<emotion 0-6>,<2304 pixels>,<Usage>'")
    if bad:
        log.warning("%s: skipped %d bad rows: %s", name, len(bad),
                    "; ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    return FaceDataset(images=images[:kept].reshape(kept, SIDE, SIDE), labels=labels[:kept].copy(),
                       splits=splits[:kept].copy(), classes=CLASSES_FER2013, source=name,
                       row_ids=row_ids[:kept].copy(), bad_rows=bad)


def _unquote(field: bytes) -> bytes:
    return field.strip().strip(b'"').strip()


def _header_columns(header: bytes, name: str) -> dict[str, int]:
    """Column positions by name (case and spaces ignored, as in Kaggle's later ``icml_face_data``)."""
    header = header.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r")  # UTF-8 BOM from spreadsheet tools
    names = [_unquote(f).decode(errors="replace").lower() for f in header.split(b",")]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{name}: line 1: column {twice[0]!r} appears {names.count(twice[0])} times; "
                         "expected each of emotion,pixels,Usage once")
    missing = [c for c in COLUMNS if c.lower() not in names]
    if missing:
        got = ",".join(names)[:80]
        raise ValueError(f"{name}: line 1: missing column {', '.join(missing)}; expected the "
                         f"header emotion,pixels,Usage, got {got!r}")
    return {**{c: names.index(c.lower()) for c in COLUMNS}, "count": len(names)}


class _LineReader:
    """``(line number, line)`` after the header; remembers where a truncated stream stopped."""

    def __init__(self, data: bytes, start: int, truncated: bool) -> None:
        self.data, self.start, self.truncated = data, start, truncated
        self.truncation: int | None = None

    def __iter__(self):
        data, pos, line_no = self.data, self.start, 2
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                if self.truncated:  # the last line is cut short: report it, do not parse it
                    self.truncation = line_no
                    return
                end = len(data)
            line = data[pos:end]
            yield line_no, line[:-1] if line.endswith(b"\r") else line
            pos, line_no = end + 1, line_no + 1
        if self.truncated:  # cut exactly at a line end: the next line is missing
            self.truncation = line_no


def _parse_pixel_rows(rows: list[bytes]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Pixels of each row as uint8 ``(len(rows), 2304)`` and ``(row index, reason)`` of bad rows."""
    text = b" " + b"\n".join(rows) + b"\n"  # leading space: every digit run has a char before it
    chars = np.frombuffer(text, dtype=np.uint8)
    digit = chars - np.uint8(48)  # non-digits wrap around to >= 10
    is_digit = digit < 10
    ends = np.flatnonzero(is_digit[:-1] & ~is_digit[1:])  # last char of each number
    starts = np.cumsum([1] + [len(r) + 1 for r in rows])  # offset of each row, plus the end
    first = np.searchsorted(ends, starts)  # index of each row's first number
    counts = np.diff(first)

    before1, before2 = is_digit[ends - 1], is_digit[ends - 2]
    two, three = before1, before1 & before2
    too_long = three & is_digit[ends - 3]
    value = digit[ends].astype(np.int16)
    value += np.where(two, digit[ends - 1], 0).astype(np.int16) * 10
    value += np.where(three, digit[ends - 2], 0).astype(np.int16) * 100

    suspect = counts != PIXELS
    odd = np.flatnonzero(~(is_digit | (chars == 32) | (chars == 10)))
    suspect[np.searchsorted(starts, odd, side="right") - 1] = True
    suspect[np.searchsorted(starts, ends[too_long | (value > 255)], side="right") - 1] = True

    out = np.zeros((len(rows), PIXELS), dtype=np.uint8)
    good = np.flatnonzero(~suspect)
    take = first[good, None] + np.arange(PIXELS)
    out[good] = value[take]
    problems = []
    for i in np.flatnonzero(suspect):  # slow path: exact reason, or a valid row after all
        pixels, reason = _parse_pixels_slow(rows[i])
        if pixels is None:
            problems.append((int(i), reason))
        else:
            out[i] = pixels
    return out, problems


def _parse_pixels_slow(text: bytes) -> tuple[np.ndarray | None, str]:
    tokens = text.split()
    for i, token in enumerate(tokens):
        if not token.isdigit() or int(token) > 255:
            return None, (f"pixel {i + 1} is {token.decode(errors='replace')!r}: expected an "
                          "integer 0-255")
    if len(tokens) != PIXELS:
        return None, f"expected {PIXELS} pixels (48x48), got {len(tokens)}"
    return np.array([int(t) for t in tokens], dtype=np.uint8), ""

"""FER2013 CSV reading: formats, the fast parser, and every bad-input case of issue 3."""
from __future__ import annotations

import gzip
import io
import logging
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from lhcnet.data import CLASSES_FER2013, SPLITS, load_fer2013

HEADER = "emotion,pixels,Usage"


def fake_faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Random uint8 48x48 images, labels 0-6 and Usage cycling through the three splits."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), rng.integers(0, 7, n),
            [SPLITS[i % 3] for i in range(n)])


def fer_csv_text(images: np.ndarray, labels, usages, header: str = HEADER) -> str:
    rows = [f"{y},{' '.join(map(str, img.ravel()))},{u}" for img, y, u in zip(images, labels, usages)]
    return "\n".join([header, *rows]) + "\n"


def write_fer_csv(path: Path, n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Write a small Kaggle-style CSV (gzip-compressed when ``path`` ends with .gz)."""
    images, labels, usages = fake_faces(n, seed)
    data = fer_csv_text(images, labels, usages).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return images, labels, usages


def _check(ds, images, labels, usages) -> None:
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert [SPLITS[s] for s in ds.splits] == usages
    assert ds.classes == CLASSES_FER2013
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64 and ds.splits.dtype == np.uint8


@pytest.mark.parametrize("name", ["fer2013.csv", "fer2013.csv.gz"])
def test_reads_plain_and_gzip(tmp_path, name):
    truth = write_fer_csv(tmp_path / name, n=7)
    _check(load_fer2013(tmp_path / name), *truth)


@pytest.mark.parametrize("piece", [1 << 20, 1000])
def test_reads_multi_member_gzip_in_pieces(tmp_path, monkeypatch, piece):
    """``cat a.gz b.gz`` is a valid gzip file; members may end inside a decompression piece."""
    monkeypatch.setattr("lhcnet.data.fer2013._GZIP_PIECE", piece)
    images, labels, usages = fake_faces(5)
    text = fer_csv_text(images, labels, usages).encode()
    cut = text.index(b"\n", len(text) // 2) + 1
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]))
    _check(load_fer2013(tmp_path / "m.csv.gz"), images, labels, usages)


def _kaggle_tar_gz(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, payload in [("fer2013/README", b"readme"), ("fer2013/fer2013.csv", data)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_reads_kaggle_tar_gz(tmp_path):
    images, labels, usages = fake_faces(5)
    (tmp_path / "fer2013.tar.gz").write_bytes(_kaggle_tar_gz(fer_csv_text(images, labels, usages).encode()))
    ds = load_fer2013(tmp_path / "fer2013.tar.gz")
    _check(ds, images, labels, usages)
    assert ds.source.endswith("fer2013.tar.gz:fer2013/fer2013.csv")


def test_truncated_tar_gz(tmp_path):
    images, labels, usages = fake_faces(6)
    packed = _kaggle_tar_gz(fer_csv_text(images, labels, usages).encode())
    (tmp_path / "cut.tar.gz").write_bytes(packed[:len(packed) // 2])
    with pytest.raises(ValueError, match=r"cut\.tar\.gz:fer2013/fer2013\.csv: line \d+: truncated gzip"):
        load_fer2013(tmp_path / "cut.tar.gz")
    ds = load_fer2013(tmp_path / "cut.tar.gz", skip_bad=True)
    assert 0 < len(ds) < 6
    _check(ds, images[:len(ds)], labels[:len(ds)], usages[:len(ds)])


def test_utf8_bom_header(tmp_path):
    images, labels, usages = fake_faces(2)
    (tmp_path / "b.csv").write_bytes(b"\xef\xbb\xbf" + fer_csv_text(images, labels, usages).encode())
    _check(load_fer2013(tmp_path / "b.csv"), images, labels, usages)


def test_tar_without_csv_is_an_error(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("fer2013/README")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "x.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"x\.tar\.gz: no \.csv file in the archive"):
        load_fer2013(tmp_path / "x.tar.gz")


def test_tolerated_variants(tmp_path):
    """Other column order, spaced/quoted header and fields, CRLF, odd spacing, leading zeros."""
    images, labels, usages = fake_faces(4)
    lines = [' Usage , "pixels" ,emotion']
    for img, y, u in zip(images, labels, usages):
        pixels = "  ".join(f"{v:03d}" for v in img.ravel())  # double spaces, zero-padded
        lines.append(f'{u}, " {pixels} " ,{y}')
    (tmp_path / "v.csv").write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode())
    _check(load_fer2013(tmp_path / "v.csv"), images, labels, usages)


def test_fast_parser_agrees_with_python_on_tabs(tmp_path):
    """Characters the vectorised path does not expect go through the exact slow path."""
    images, labels, usages = fake_faces(3)
    text = fer_csv_text(images, labels, usages)
    (tmp_path / "t.csv").write_text(text.replace(" ", "\t", 50))
    _check(load_fer2013(tmp_path / "t.csv"), images, labels, usages)


def _pixels(line: str) -> list[str]:
    return line.split(",")[1].split()


def _replace_pixels(line: str, pixels: list[str]) -> str:
    label, _, usage = line.split(",")
    return f"{label},{' '.join(pixels)},{usage}"


def _set_pixel(line: str, index: int, value: str) -> str:
    pixels = _pixels(line)
    pixels[index] = value
    return _replace_pixels(line, pixels)


# how to break one data line -> what the message must say (after "<file>: line <n>: ")
BAD_ROWS = {
    "too few pixels": (lambda l: _replace_pixels(l, _pixels(l)[:-1]),
                       r"expected 2304 pixels \(48x48\), got 2303"),
    "too many pixels": (lambda l: _replace_pixels(l, _pixels(l) + ["7"]),
                        "expected 2304 pixels.*got 2305"),
    "non-integer pixel": (lambda l: _set_pixel(l, 0, "1.5"),
                          "pixel 1 is '1.5': expected an integer 0-255"),
    "negative pixel": (lambda l: _set_pixel(l, 9, "-3"), "pixel 10 is '-3'"),
    "pixel over 255": (lambda l: _set_pixel(l, 4, "256"),
                       "pixel 5 is '256': expected an integer 0-255"),
    "long number": (lambda l: _set_pixel(l, 4, "1000"), "pixel 5 is '1000'"),
    "label 7": (lambda l: "7" + l[1:], "emotion '7': expected a label 0-6"),
    "label -1": (lambda l: "-1" + l[1:], "emotion '-1': expected a label 0-6"),
    "unknown usage": (lambda l: l.rsplit(",", 1)[0] + ",Validation",
                      "Usage 'Validation': expected one of Training, PublicTest, PrivateTest"),
    "missing field": (lambda l: l.rsplit(",", 1)[0], "expected 3 comma-separated fields"),
}


def _broken_csv(tmp_path: Path, breaks, n: int = 6) -> tuple[Path, tuple]:
    images, labels, usages = fake_faces(n)
    lines = fer_csv_text(images, labels, usages).splitlines()
    for data_row, brk in breaks:
        lines[data_row + 1] = brk(lines[data_row + 1])
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, (images, labels, usages)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_line_and_expectation(tmp_path, case):
    brk, message = BAD_ROWS[case]
    path, _ = _broken_csv(tmp_path, [(2, brk)])
    with pytest.raises(ValueError, match=rf"bad\.csv: line 4: {message}") as info:
        load_fer2013(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_skip_bad_drops_and_reports_the_row(tmp_path, case, caplog):
    brk, message = BAD_ROWS[case]
    path, (images, labels, usages) = _broken_csv(tmp_path, [(2, brk)])
    with caplog.at_level(logging.WARNING):
        ds = load_fer2013(path, skip_bad=True)
    keep = [0, 1, 3, 4, 5]
    _check(ds, images[keep], labels[keep], [usages[i] for i in keep])
    np.testing.assert_array_equal(ds.row_ids, keep)  # FER+ alignment survives the gap
    assert [(b.line, b.path) for b in ds.bad_rows] == [(4, str(path))]
    assert "skipped 1 bad rows" in caplog.text and "line 4" in caplog.text


def test_several_bad_rows_first_is_raised_all_are_reported(tmp_path):
    path, _ = _broken_csv(tmp_path, [(4, BAD_ROWS["label 7"][0]), (1, BAD_ROWS["too few pixels"][0])])
    with pytest.raises(ValueError, match=r"line 3: expected 2304 pixels.*\(1 more bad rows"):
        load_fer2013(path)
    assert [b.line for b in load_fer2013(path, skip_bad=True).bad_rows] == [3, 6]


def test_bad_rows_across_parser_blocks(tmp_path, monkeypatch):
    """Block boundaries of the vectorised parser must not shift rows or line numbers."""
    monkeypatch.setattr("lhcnet.data.fer2013._ROWS_PER_BLOCK", 4)
    path, (images, labels, usages) = _broken_csv(
        tmp_path, [(3, BAD_ROWS["pixel over 255"][0]), (6, BAD_ROWS["too few pixels"][0])], n=11)
    ds = load_fer2013(path, skip_bad=True)
    keep = [i for i in range(11) if i not in (3, 6)]
    _check(ds, images[keep], labels[keep], [usages[i] for i in keep])
    assert [b.line for b in ds.bad_rows] == [5, 8]


@pytest.mark.parametrize("header", ["emotion,pixels", "label,pixels,Usage", "emotion,Usage"])
def test_missing_column(tmp_path, header):
    (tmp_path / "h.csv").write_text(header + "\n0,1 2 3,Training\n")
    with pytest.raises(ValueError, match=r"h\.csv: line 1: missing column .*expected the header "
                                         "emotion,pixels,Usage"):
        load_fer2013(tmp_path / "h.csv", skip_bad=True)  # a header cannot be skipped


@pytest.mark.parametrize("header", ["emotion,pixels,Usage,emotion", "emotion,pixels,Usage,Pixels"])
def test_duplicate_column_is_refused(tmp_path, header):
    """Which of two 'emotion' columns holds the labels is anyone's guess: refuse, do not pick one."""
    images, labels, usages = fake_faces(2)
    rows = [f"{y},{' '.join(map(str, img.ravel()))},{u},{(y + 1) % 7}" for img, y, u in zip(images, labels, usages)]
    (tmp_path / "d.csv").write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(ValueError, match=r"d\.csv: line 1: column '(emotion|pixels)' appears 2 times"):
        load_fer2013(tmp_path / "d.csv", skip_bad=True)


@pytest.mark.parametrize("content", [b"", b"\n\n", gzip.compress(b"")])
def test_empty_file(tmp_path, content):
    (tmp_path / "e.csv.gz").write_bytes(content)
    with pytest.raises(ValueError, match=r"e\.csv\.gz: empty file; expected a CSV header"):
        load_fer2013(tmp_path / "e.csv.gz")


def test_header_only(tmp_path):
    (tmp_path / "h.csv").write_text(HEADER + "\n")
    with pytest.raises(ValueError, match=r"h\.csv: no data rows after the header"):
        load_fer2013(tmp_path / "h.csv")


def _truncated_gzip(tmp_path: Path, n: int = 8) -> tuple[Path, tuple, int]:
    images, labels, usages = fake_faces(n)
    text = fer_csv_text(images, labels, usages).encode()
    packed = gzip.compress(text)
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(packed[:len(packed) // 2])
    complete = gzip.decompress(packed)  # how many rows survive is what zlib can still decode
    survived = len(_partial_gunzip(path.read_bytes()))
    return path, (images, labels, usages), complete[:survived].count(b"\n") - 1


def _partial_gunzip(raw: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(raw)


def test_truncated_gzip(tmp_path):
    path, _, full_rows = _truncated_gzip(tmp_path)
    assert 0 < full_rows < 8
    with pytest.raises(ValueError, match=rf"cut\.csv\.gz: line {full_rows + 2}: truncated gzip: "
                                         "the data ends in this line; expected the rest"):
        load_fer2013(path)


def test_truncated_gzip_skip_bad_keeps_complete_rows(tmp_path):
    path, (images, labels, usages), full_rows = _truncated_gzip(tmp_path)
    ds = load_fer2013(path, skip_bad=True)
    _check(ds, images[:full_rows], labels[:full_rows], usages[:full_rows])
    assert len(ds.bad_rows) == 1 and "truncated gzip" in ds.bad_rows[0].reason


def test_corrupt_gzip(tmp_path):
    packed = bytearray(gzip.compress(b"emotion,pixels,Usage\n" * 50))
    packed[12:20] = b"\xff" * 8
    (tmp_path / "c.csv.gz").write_bytes(bytes(packed))
    with pytest.raises(ValueError, match=r"c\.csv\.gz: corrupt gzip data"):
        load_fer2013(tmp_path / "c.csv.gz")

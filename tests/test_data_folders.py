"""Image folders: root/<class>/... and root/<split>/<class>/..., unreadable files reported."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from lhcnet.data import CLASSES_FER2013, SPLITS, load_dataset, load_image_folder


def _save(path, value: int, size: int = 48, mode: str = "L", fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value,) * 3).save(path, fmt)


def test_class_folders(tmp_path):
    _save(tmp_path / "happy" / "a.png", 10)
    _save(tmp_path / "happy" / "b.jpg", 20, mode="RGB")
    _save(tmp_path / "sad" / "c.png", 30, size=96)  # resized to 48
    (tmp_path / "sad" / "notes.txt").write_text("not an image, ignored")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ("happy", "sad") and ds.labels.tolist() == [0, 0, 1]
    assert ds.images.shape == (3, 48, 48) and ds.images.dtype == np.uint8
    assert [int(np.median(im)) for im in ds.images] == [10, 20, 30]
    assert ds.splits.tolist() == [0, 0, 0] and not ds.bad_rows


def test_folder_images_read_like_photos(tmp_path):
    """16-bit greys are scaled (not clipped), EXIF orientation applied, transparency on white."""
    tmp_path.joinpath("happy").mkdir()
    Image.fromarray(np.full((48, 48), 257 * 40, dtype=np.uint16)).save(tmp_path / "happy" / "wide.png")
    tall = np.zeros((60, 48), dtype=np.uint8)
    tall[:30] = 200  # top half bright; stored sideways with EXIF "rotate 90 CW to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(tall)).save(tmp_path / "happy" / "turned.png", exif=exif)
    Image.new("LA", (48, 48), (0, 0)).save(tmp_path / "happy" / "clear.png")  # black, fully transparent
    (tmp_path / "happy" / ".hidden.png").write_bytes(b"macOS metadata, not an image")
    ds = load_image_folder(tmp_path)
    clear, turned, wide = ds.images  # sorted by file name
    assert int(wide[0, 0]) == 40 and int(clear[0, 0]) == 255
    assert turned[:20].mean() > 190 and turned[-20:].mean() < 10  # upright: bright top half
    assert not ds.bad_rows


def test_split_folders_and_fer2013_label_set(tmp_path):
    _save(tmp_path / "train" / "Happy" / "a.png", 1)
    _save(tmp_path / "train" / "Angry" / "b.png", 2)
    _save(tmp_path / "val" / "happy" / "c.png", 3)
    _save(tmp_path / "PrivateTest" / "neutral" / "d.png", 4)
    ds = load_image_folder(tmp_path, labels="fer2013")
    assert ds.classes == CLASSES_FER2013
    by_value = {int(im[0, 0]): (CLASSES_FER2013[y], SPLITS[s])
                for im, y, s in zip(ds.images, ds.labels, ds.splits)}
    assert by_value == {1: ("happy", "Training"), 2: ("angry", "Training"),
                        3: ("happy", "PublicTest"), 4: ("neutral", "PrivateTest")}
    assert len(ds.split("val")) == 1


def test_unreadable_images_are_named_skipped_and_reported(tmp_path, caplog):
    _save(tmp_path / "happy" / "a.png", 10)
    (tmp_path / "happy" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "happy" / "empty.png").write_bytes(b"")
    _save(tmp_path / "sad" / "z.png", 30)
    truncated = tmp_path / "sad" / "y.png"
    _save(truncated, 40, size=200)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with caplog.at_level(logging.WARNING):
        ds = load_image_folder(tmp_path)
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1]
    assert sorted(b.path.rsplit("/", 1)[1] for b in ds.bad_rows) == ["broken.jpg", "empty.png", "y.png"]
    assert all("unreadable image" in b.reason for b in ds.bad_rows)
    assert "skipped 3 unreadable images" in caplog.text and "broken.jpg" in caplog.text


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "happy").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        load_image_folder(tmp_path)
    _save(tmp_path / "smiling" / "a.png", 1)
    with pytest.raises(ValueError, match="class folder 'smiling' is not a fer2013 class"):
        load_image_folder(tmp_path, labels="fer2013")
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")


def test_load_dataset_caches_folders(tmp_path, monkeypatch):
    _save(tmp_path / "faces" / "happy" / "a.png", 10)
    first = load_dataset(tmp_path / "faces", cache_dir=tmp_path / "cache", image_size=32)
    assert first.images.shape == (1, 32, 32)
    monkeypatch.setattr("lhcnet.data.load.load_image_folder",
                        lambda *a, **k: pytest.fail("folder decoded again"))
    again = load_dataset(tmp_path / "faces", cache_dir=tmp_path / "cache", image_size=32)
    np.testing.assert_array_equal(again.images, first.images)


def test_symlink_loops_and_broken_links_are_counted(tmp_path, caplog):
    _save(tmp_path / "happy" / "a.png", 10)
    (tmp_path / "happy" / "loop.png").symlink_to("loop.png")        # ELOOP
    (tmp_path / "happy" / "gone.png").symlink_to("missing.png")     # target missing
    (tmp_path / "happy" / "up").symlink_to("..")                    # a folder link: not followed
    with caplog.at_level(logging.WARNING):
        ds = load_image_folder(tmp_path)
    assert len(ds) == 1
    assert [(b.path.split("/")[-1], b.reason) for b in ds.bad_rows] == [
        ("gone.png", "broken symlink (its target is missing)"), ("loop.png", "symlink loop")]
    assert "skipped 2 unreadable images or links" in caplog.text

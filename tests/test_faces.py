"""Face detection and FER-style crops (lhcnet.faces), image reading (lhcnet.images), video frames."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import requires_shared_data
from predict_helpers import (PHOTO, PHOTO_FACE, fer2013_faces, photo_rgb, png_claiming_size,
                             write_video)
from predict_helpers import one_thread  # noqa: F401  (autouse fixture)

from lhcnet import faces as faces_module
from lhcnet.faces import FER_PAD, HaarDetector, cascade_path, crop_faces, square_region, to_grey
from lhcnet.images import InputError, find_images, load_image
from lhcnet.video import read_frames


@pytest.fixture(scope="module")
def detector() -> HaarDetector:
    return HaarDetector()


# -- detection ----------------------------------------------------------------------------------

def test_cascade_ships_with_opencv_4() -> None:
    assert cv2.__version__.split(".")[0] == "4"
    assert cascade_path().name == "haarcascade_frontalface_default.xml"


def test_detects_the_example_face(detector) -> None:
    boxes = detector(to_grey(photo_rgb()))
    assert boxes.shape == (1, 4) and boxes.dtype == np.int64
    np.testing.assert_allclose(boxes[0], PHOTO_FACE, atol=4)


def test_no_face_in_a_plain_image(detector) -> None:
    assert detector(np.full((480, 640), 128, np.uint8)).shape == (0, 4)


def test_detection_does_not_depend_on_the_photo_resolution(detector) -> None:
    big = cv2.resize(to_grey(photo_rgb()), None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)
    boxes = detector(big)  # searched at the same scale as the 512 px original
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0] / 4, PHOTO_FACE, atol=12)


def test_faces_below_the_minimum_size_are_ignored(detector) -> None:
    small = cv2.resize(to_grey(photo_rgb()), (256, 256), interpolation=cv2.INTER_AREA)
    assert len(detector(small)) == 0                     # the face is 47 px < min_size 48
    assert len(HaarDetector(min_size=30)(small)) == 1


def test_missing_cascade_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(faces_module.cv2.data, "haarcascades", str(tmp_path) + "/")
    with pytest.raises(FileNotFoundError, match=r"opencv-python-headless>=4.5,<5"):
        HaarDetector()
    broken = tmp_path / "broken.xml"
    broken.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(ValueError, match="not a valid OpenCV cascade"):
        HaarDetector(path=broken)


@requires_shared_data
def test_default_padding_reproduces_fer2013_framing() -> None:
    """On FER2013's own faces, the cascade's box plus FER_PAD per side fills the 48-px frame."""
    detector = HaarDetector(min_size=24, min_fraction=0.3)
    sides, centres = [], []
    for face in fer2013_faces(300):
        boxes = detector(cv2.resize(face, (192, 192), interpolation=cv2.INTER_LINEAR)) / 4
        if len(boxes) == 1:
            x, y, w, h = boxes[0]
            sides.append(w / 48)
            centres.append(((x + w / 2) / 48, (y + h / 2) / 48))
    assert len(sides) > 100
    frame = float(np.median(sides)) * (1 + 2 * FER_PAD)     # padded crop side / FER frame side
    assert 0.95 < frame < 1.05
    np.testing.assert_allclose(np.median(centres, axis=0), (0.5, 0.5), atol=0.03)


# -- crops ----------------------------------------------------------------------------------------

def test_square_region_is_centred_and_padded() -> None:
    assert square_region([10, 20, 40, 20], pad=0.1) == (6, 6, 48)  # side 40 * 1.2, centre (30, 30)
    assert square_region([0, 0, 50, 50], pad=0.0) == (0, 0, 50)
    with pytest.raises(ValueError, match="no area"):
        square_region([0, 0, 0, 10], pad=0.1)


def test_crop_at_native_size_is_the_exact_pixels() -> None:
    grey = np.random.default_rng(0).integers(0, 256, (100, 120), dtype=np.uint8)
    crop = crop_faces(grey, [[10, 20, 48, 48]], pad=0.0)
    assert crop.shape == (1, 48, 48) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop[0], grey[20:68, 10:58])


def test_crop_outside_the_photo_repeats_the_border() -> None:
    grey = np.tile(np.arange(100, dtype=np.uint8), (100, 1))  # value = column
    crop = crop_faces(grey, [[-10, -10, 48, 48]], pad=0.0)[0]
    np.testing.assert_array_equal(crop[:, :10], 0)                 # left of the photo: column 0
    np.testing.assert_array_equal(crop[0, 10:], np.arange(38))     # above: the first row again
    with pytest.raises(ValueError, match="outside"):
        crop_faces(grey, [[200, 200, 20, 20]])


def test_downscaling_averages_instead_of_aliasing() -> None:
    stripes = np.zeros((96, 96), np.uint8)
    stripes[:, ::2] = 255  # 1-px stripes: area averaging gives flat grey, point sampling stripes
    crop = crop_faces(stripes, [[0, 0, 96, 96]], pad=0.0)[0]
    assert abs(float(crop.mean()) - 127.5) < 1 and crop.std() < 1


def test_grey_uses_the_luma_of_pillow() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.int16)
    assert np.abs(to_grey(rgb).astype(np.int16) - pillow).max() <= 1


# -- image files: what must work -------------------------------------------------------------------

def test_reads_the_example_photo() -> None:
    rgb = load_image(PHOTO)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8


def test_16_bit_grey_png_keeps_its_full_range(tmp_path) -> None:
    values = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = load_image(tmp_path / "deep.png")
    assert rgb.shape == (64, 64, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 120 <= rgb[32, 0, 0] <= 135


def test_rgba_is_composited_on_white(tmp_path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (200, 10, 10, 255)          # opaque red top half, transparent bottom half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(rgb[0, 0], (200, 10, 10))
    np.testing.assert_array_equal(rgb[-1, -1], (255, 255, 255))


def test_cmyk_jpeg_becomes_rgb(tmp_path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # red
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    red, green, blue = load_image(tmp_path / "c.jpg")[8, 8].astype(int)
    assert red > 230 and green < 30 and blue < 30


def test_palette_images_with_and_without_transparency(tmp_path) -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png")[0, 0], (10, 200, 30))
    palette.save(tmp_path / "t.gif", transparency=1)
    np.testing.assert_array_equal(load_image(tmp_path / "t.gif")[0, 0], (255, 255, 255))


def test_exif_orientation_is_applied(tmp_path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored landscape, shown portrait
    image.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").shape == (40, 20, 3)


# -- image files: what must fail, with one line naming the file -------------------------------------

def _error(path) -> str:
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file(tmp_path) -> None:
    assert "no such file" in _error(tmp_path / "nope.jpg")


def test_not_an_image(tmp_path) -> None:
    (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 20)
    assert "not an image" in _error(tmp_path / "notes.jpg")


def test_empty_file(tmp_path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "empty.png")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image(tmp_path, suffix) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[:len(data) // 2])
    assert "truncated or corrupt" in _error(tmp_path / f"cut{suffix}")


def test_decompression_bomb(tmp_path) -> None:
    bomb = png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000)
    assert bomb.stat().st_size < 200
    assert "decompression-bomb" in _error(bomb)
    modest = png_claiming_size(tmp_path / "modest.png", 12_000, 10_000)  # 120 Mpx: Pillow only warns
    assert "above the 89 Mpx limit" in _error(modest)


def test_folder_search_is_recursive_and_skips_hidden(tmp_path) -> None:
    for name in ("a.jpg", "sub/b.PNG", "sub/deeper/c.webp", ".hidden/d.jpg", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.jpg", "sub/b.PNG", "sub/deeper/c.webp"]


# -- video ------------------------------------------------------------------------------------------

def test_video_frames_every_n(tmp_path) -> None:
    frames = [np.full((48, 64, 3), 30 * i, np.uint8) for i in range(7)]
    video = write_video(tmp_path / "clip.avi", frames)
    read = list(read_frames(video, every=3))
    assert [i for i, _ in read] == [0, 3, 6]
    assert all(abs(float(f.mean()) - 30 * i) < 4 for i, f in read)


def test_unreadable_video_is_one_line_naming_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"definitely not a video" * 50)
    with pytest.raises(InputError) as info:
        list(read_frames(bad))
    assert str(bad) in str(info.value) and "cannot read video" in str(info.value)

"""Face detection and FER-style crops (lhcnet.faces), image reading (lhcnet.images), video frames."""
from __future__ import annotations

import hashlib
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, requires_shared_data
from predict_helpers import (PHOTO, PHOTO_FACE, fer2013_faces, head, photo_rgb, png_claiming_size,
                             scene, write_video)
from predict_helpers import one_thread  # noqa: F401  (autouse fixture)

from lhcnet import faces as faces_module
from lhcnet.faces import (CASCADE_FILE, FER_PAD, LANDMARK_NAMES, HaarDetector, YuNetDetector,
                          cascade_path, crop_faces, eye_angle, make_detector, square_region, to_grey,
                          yunet_path)
from lhcnet.images import InputError, find_images, load_image
from lhcnet.tracking import box_iou
from lhcnet.video import read_frames

OPENCV_MAJOR = int(cv2.__version__.split(".")[0])
requires_haar = pytest.mark.skipif(OPENCV_MAJOR >= 5, reason="OpenCV 5 wheels ship no Haar cascades")


@pytest.fixture(scope="module")
def detector() -> HaarDetector:
    return HaarDetector()


@pytest.fixture(scope="module")
def yunet() -> YuNetDetector:
    return YuNetDetector()


def _turned(rgb: np.ndarray, angle: float) -> np.ndarray:
    """The photo turned ``angle`` degrees counter-clockwise about its centre."""
    height, width = rgb.shape[:2]
    turn = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
    return cv2.warpAffine(rgb, turn, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# -- YuNet --------------------------------------------------------------------------------------------

def test_vendored_yunet_is_the_documented_file() -> None:
    """The model and its licence as /work/shared/models/README.md describes them (sha256, size)."""
    path = yunet_path()
    data = path.read_bytes()
    assert len(data) == 232_589
    assert hashlib.sha256(data).hexdigest() == "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
    assert "Apache License" in (path.parent / "LICENSE-yunet.txt").read_text()
    assert path.parent == REPO / "src" / "lhcnet" / "assets"


def test_yunet_finds_the_example_face_with_landmarks(yunet) -> None:
    found = yunet.detect(photo_rgb())
    assert len(found) == 1 and found.landmarks.shape == (1, 5, 2)
    assert 0.7 <= found.scores[0] <= 1.0
    # frames the face like the Haar cascade, whose box sets FER2013's crop margin
    assert box_iou(found.boxes, [PHOTO_FACE])[0, 0] > 0.6
    x, y, w, h = found.boxes[0]
    points = dict(zip(LANDMARK_NAMES, found.landmarks[0]))
    for px, py in points.values():
        assert x <= px <= x + w and y <= py <= y + h
    assert points["right_eye"][0] < points["nose"][0] < points["left_eye"][0]  # subject's right: image left
    assert max(points["right_eye"][1], points["left_eye"][1]) < points["nose"][1]
    assert points["nose"][1] < min(points["mouth_right"][1], points["mouth_left"][1])
    np.testing.assert_array_equal(yunet(photo_rgb()), np.rint(found.boxes).astype(np.int64))


# Heads pasted at (x, y, side, angle): faces of ~36 to ~170 px, upright and turned up to 30 degrees.
SCENES = [
    [(40, 60, 100, 0), (300, 80, 220, 20), (600, 380, 130, -25)],
    [(50, 50, 80, 0), (200, 300, 90, 30), (450, 100, 300, -15), (650, 450, 110, 10)],
    [(100, 100, 60, 0)],
    [],  # no face
]


@pytest.mark.parametrize("placements", SCENES, ids=lambda p: f"{len(p)}-faces")
def test_yunet_finds_every_pasted_face(yunet, placements) -> None:
    rgb, centres = scene(placements)
    found = yunet.detect(rgb)
    assert len(found) == len(placements)
    got = found.boxes[:, :2] + found.boxes[:, 2:] / 2
    for (cx, cy), (x, y, side, _) in zip(sorted(centres), sorted(placements, key=lambda p: p[0])):
        nearest = got[np.argmin(np.hypot(*(got - (cx, cy)).T))]
        assert np.hypot(*(nearest - (cx, cy))) < 0.1 * side
    for box, points in zip(found.boxes, found.landmarks):
        x, y, w, h = box
        assert ((points >= (x, y)) & (points <= (x + w, y + h))).all()


def test_no_face_in_face_free_photos(yunet) -> None:
    assert len(yunet.detect(photo_rgb()[300:])) == 0   # the spacesuit and flag below the face
    assert len(yunet.detect(np.full((480, 640, 3), 128, np.uint8))) == 0


def test_grey_input_finds_the_same_face(yunet) -> None:
    colour, grey = yunet.detect(photo_rgb()), yunet.detect(to_grey(photo_rgb()))
    assert len(grey) == 1 and box_iou(colour.boxes, grey.boxes)[0, 0] > 0.9


def test_large_photos_are_downscaled_for_detection_and_mapped_back(yunet, monkeypatch) -> None:
    sizes = []
    net = yunet.net

    class Spy:
        def setInputSize(self, size):
            sizes.append(tuple(size))
            net.setInputSize(size)

        def detect(self, image):
            return net.detect(image)

    big = cv2.resize(photo_rgb(), None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)
    monkeypatch.setattr(yunet, "net", Spy())
    found = yunet.detect(big)
    # smallest face searched for: 2% of 2048 px = 41 px, searched as 24 px: the photo at 24/41
    assert sizes == [(1200, 1200)]
    assert len(found) == 1
    # mapped back: exactly YuNet's answer on the photo at 1200 px, times 2048 / 1200
    monkeypatch.setattr(yunet, "net", net)
    direct = yunet.detect(cv2.resize(big, (1200, 1200), interpolation=cv2.INTER_AREA))
    np.testing.assert_allclose(found.boxes, direct.boxes * 2048 / 1200, rtol=1e-9)
    np.testing.assert_allclose(found.landmarks, direct.landmarks * 2048 / 1200, rtol=1e-9)
    # and the face of the 512 px original, 4x
    assert box_iou(found.boxes, yunet.detect(photo_rgb()).boxes * 4)[0, 0] > 0.85


def test_min_face_and_score_threshold() -> None:
    small = cv2.resize(photo_rgb(), (160, 160), interpolation=cv2.INTER_AREA)  # face box ~30 px
    assert len(YuNetDetector().detect(small)) == 1
    assert len(YuNetDetector(min_face=40).detect(small)) == 0
    assert len(YuNetDetector(score_threshold=0.99).detect(photo_rgb())) == 0
    assert len(make_detector("yunet", min_face=40, threshold=0.5).detect(small)) == 0


def test_image_smaller_than_the_smallest_face_is_a_clear_error(yunet) -> None:
    for shape in ((1, 1, 3), (1, 30, 3), (30, 1, 3), (1, 2, 3), (20, 300, 3)):
        with pytest.raises(InputError, match=r"smaller than the smallest face searched for .*--whole-image"):
            yunet.detect(np.zeros(shape, np.uint8))
    assert len(YuNetDetector(min_face=1).detect(np.zeros((1, 2, 3), np.uint8))) == 0


def test_bad_yunet_files(tmp_path, monkeypatch) -> None:
    (tmp_path / "fake.onnx").write_text("not a network")
    with pytest.raises(ValueError, match="not a YuNet ONNX model"):
        YuNetDetector(path=tmp_path / "fake.onnx")
    with pytest.raises(FileNotFoundError, match="YuNet model file not found"):
        YuNetDetector(path=tmp_path / "none.onnx")
    damaged = tmp_path / faces_module.YUNET_FILE
    damaged.write_bytes(yunet_path().read_bytes()[:-1] + b"x")
    monkeypatch.setattr(faces_module, "_package_asset", lambda name: tmp_path / name)
    with pytest.raises(ValueError, match="damaged"):
        yunet_path()
    with pytest.raises(ValueError, match="unknown detector 'mtcnn'"):
        make_detector("mtcnn")


@requires_shared_data
def test_yunet_squares_reproduce_fer2013_framing(yunet) -> None:
    """``fer_square`` was calibrated on FER2013's first 600 rows; on the next 300 its square plus
    FER_PAD per side fills the 48-px frame, centred."""
    sides, centres = [], []
    for face in fer2013_faces(300, skip=600):
        found = YuNetDetector(min_face=24).detect(cv2.resize(face, (192, 192), interpolation=cv2.INTER_LINEAR))
        if len(found) == 1:
            x, y, w, h = found.boxes[0] / 4
            sides.append(w / 48)
            centres.append(((x + w / 2) / 48, (y + h / 2) / 48))
    assert len(sides) > 250
    assert 0.97 < float(np.median(sides)) * (1 + 2 * FER_PAD) < 1.03
    np.testing.assert_allclose(np.median(centres, axis=0), (0.5, 0.5), atol=0.02)


# -- alignment ------------------------------------------------------------------------------------------

def test_eye_angle_by_hand() -> None:
    level = np.array([[0, 0], [10, 0], [5, 5], [2, 8], [8, 8]], np.float64)
    assert eye_angle(level) == 0.0
    raised = level.copy()
    raised[1] = (10, -10)                  # the left eye (image right) higher: counter-clockwise
    assert eye_angle(raised) == pytest.approx(45.0)


def test_crop_with_a_roll_levels_a_turned_line() -> None:
    grey = np.zeros((101, 101), np.uint8)
    cv2.line(grey, (10, 50), (90, 50), 255, 3)
    turned = _turned(grey, 30.0)                      # the line now rises 30 degrees to the right
    plain = crop_faces(turned, [[10, 10, 81, 81]], pad=0.0, size=81)[0]
    levelled = crop_faces(turned, [[10, 10, 81, 81]], pad=0.0, size=81, rolls=[30.0])[0]
    rows = np.nonzero(levelled[:, 20:61].max(axis=1) > 128)[0]
    assert rows.max() - rows.min() <= 4               # level: a few rows thick
    assert np.count_nonzero(plain[:, 20:61].max(axis=1) > 128) > 15
    np.testing.assert_array_equal(crop_faces(turned, [[10, 10, 81, 81]], 0.0, 81, rolls=[0.0]), [plain])


@pytest.mark.parametrize("angle", [-30, -15, 15, 30])
def test_alignment_undoes_a_known_rotation(yunet, angle) -> None:
    upright = photo_rgb()
    base = yunet.roll(upright, yunet.detect(upright).boxes[0])
    assert abs(base) < 5                                         # she holds her head nearly level
    turned = _turned(upright, angle)
    box = yunet.detect(turned).boxes[0]
    roll = yunet.roll(turned, box)
    assert roll - base == pytest.approx(angle, abs=4)
    # the levelled crop of the turned photo looks like the crop of the upright one
    reference = crop_faces(to_grey(upright), yunet.detect(upright).boxes).astype(np.float64)[0]
    levelled = crop_faces(to_grey(turned), [box], rolls=[roll - base]).astype(np.float64)[0]
    plain = crop_faces(to_grey(turned), [box]).astype(np.float64)[0]
    correlation = (lambda a: np.corrcoef(a.ravel(), reference.ravel())[0, 1])
    assert correlation(levelled) > 0.75 and correlation(levelled) > correlation(plain) + 0.2


# -- Haar ---------------------------------------------------------------------------------------------

@requires_haar
def test_cascade_ships_with_opencv_4() -> None:
    assert cascade_path().name == CASCADE_FILE


@pytest.mark.skipif(OPENCV_MAJOR < 5, reason="OpenCV 4 ships the cascade")
def test_opencv_5_names_the_missing_cascade(tmp_path) -> None:
    for path in (None, tmp_path / "own.xml"):
        with pytest.raises(FileNotFoundError, match=rf"no Haar cascades .*{CASCADE_FILE}.*--detector yunet"):
            HaarDetector(path=path)
    with pytest.raises(FileNotFoundError, match="removed in OpenCV 5"):
        make_detector("haar")


@requires_haar
def test_detects_the_example_face(detector) -> None:
    boxes = detector(to_grey(photo_rgb()))
    assert boxes.shape == (1, 4) and boxes.dtype == np.int64
    np.testing.assert_allclose(boxes[0], PHOTO_FACE, atol=4)


@requires_haar
def test_no_face_in_a_plain_image(detector) -> None:
    assert detector(np.full((480, 640), 128, np.uint8)).shape == (0, 4)


@requires_haar
def test_detection_does_not_depend_on_the_photo_resolution(detector) -> None:
    big = cv2.resize(to_grey(photo_rgb()), None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)
    boxes = detector(big)  # searched at the same scale as the 512 px original
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0] / 4, PHOTO_FACE, atol=12)


@requires_haar
def test_faces_below_the_minimum_size_are_ignored(detector) -> None:
    small = cv2.resize(to_grey(photo_rgb()), (256, 256), interpolation=cv2.INTER_AREA)
    assert len(detector(small)) == 0                     # the face is 47 px < min_size 48
    assert len(HaarDetector(min_size=30)(small)) == 1


@requires_haar
def test_missing_cascade_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(faces_module.cv2.data, "haarcascades", str(tmp_path) + "/")
    with pytest.raises(FileNotFoundError, match=rf"Haar cascade {CASCADE_FILE} is missing .*"
                                                 r"--detector yunet.*opencv-python-headless>=4.10,<5"):
        HaarDetector()
    broken = tmp_path / "broken.xml"
    broken.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(ValueError, match="not a valid OpenCV cascade"):
        HaarDetector(path=broken)


@requires_haar
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

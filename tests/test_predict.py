"""The Predictor API and ``lhcnet predict``: faces, probabilities, batching, bad inputs, outputs."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from predict_helpers import (PHOTO, PHOTO_FACE, photo_rgb, png_claiming_size, synthetic_faces,
                             tiny_model_file, write_video)
from predict_helpers import one_thread  # noqa: F401  (autouse fixture)

from lhcnet import predict as predict_module
from lhcnet.cli import main
from lhcnet.data import CLASSES_FER2013, to_model_input
from lhcnet.faces import crop_faces, to_grey
from lhcnet.images import InputError
from lhcnet.predict import Predictor, bundled_model_path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def predictor(model_file) -> Predictor:
    return Predictor(model_file, device="cpu")


def _reference_probs(predictor: Predictor, faces48: np.ndarray) -> np.ndarray:
    """The training pipeline's view of 48x48 faces: to_model_input, model, softmax."""
    with torch.no_grad():
        x = to_model_input(torch.from_numpy(faces48), predictor.input_size)
        return torch.softmax(predictor.model(x), dim=1).numpy()


def _check_face(face: dict, classes=CLASSES_FER2013) -> None:
    assert set(face) == {"box", "scores", "label", "label_score"}
    assert list(face["scores"]) == list(classes)
    assert abs(sum(face["scores"].values()) - 1) < 1e-5
    assert face["label"] == max(face["scores"], key=face["scores"].get)
    assert face["label_score"] == face["scores"][face["label"]]


# -- the API ----------------------------------------------------------------------------------------

def test_one_face_in_the_example_photo(predictor) -> None:
    faces = predictor.predict(PHOTO)
    assert len(faces) == 1
    _check_face(faces[0])
    np.testing.assert_allclose(faces[0]["box"], PHOTO_FACE, atol=4)


def test_faces_reach_the_model_exactly_as_training_data(predictor) -> None:
    """Photo -> box -> square padded grey crop -> 48x48 uint8 -> to_model_input: nothing else."""
    face = predictor.predict(PHOTO)[0]
    crop = crop_faces(to_grey(photo_rgb()), [face["box"]], pad=predictor.pad)
    expected = _reference_probs(predictor, crop)[0]
    np.testing.assert_allclose(list(face["scores"].values()), expected, atol=1e-6)


def test_already_cropped_faces(predictor) -> None:
    faces48 = synthetic_faces(3)
    results = predictor.predict_batch(list(faces48), whole_image=True)
    assert [r[0]["box"] for r in results] == [[0, 0, 48, 48]] * 3
    got = np.array([list(r[0]["scores"].values()) for r in results])
    np.testing.assert_allclose(got, _reference_probs(predictor, faces48), atol=1e-6)
    np.testing.assert_allclose(predictor.classify(faces48), got, atol=1e-6)


def test_detector_none_treats_every_image_as_a_face(model_file) -> None:
    predictor = Predictor(model_file, device="cpu", detector=None)
    assert predictor.predict(np.full((60, 80), 90, np.uint8))[0]["box"] == [0, 0, 80, 60]


def test_user_boxes(predictor) -> None:
    boxes = [[172, 62, 106, 106], [300, 300, 60, 60]]
    faces = predictor.predict(PHOTO, boxes=boxes)
    assert [f["box"] for f in faces] == boxes
    detected = predictor.predict(PHOTO)[0]
    assert faces[0]["scores"] == pytest.approx(detected["scores"], abs=1e-6)


def test_user_detector(model_file) -> None:
    calls = []

    def detector(grey: np.ndarray) -> np.ndarray:
        calls.append(grey.shape)
        return np.array([[10, 10, 50, 50]])

    faces = Predictor(model_file, device="cpu", detector=detector).predict(np.zeros((100, 120, 3), np.uint8))
    assert calls == [(100, 120)] and faces[0]["box"] == [10, 10, 50, 50]


def test_batch_is_one_forward_and_matches_single_calls(predictor) -> None:
    images = [PHOTO, np.full((480, 640, 3), 128, np.uint8), Image.open(PHOTO), photo_rgb()[:, :, 0]]
    forwards = []
    handle = predictor.model.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
    try:
        results = predictor.predict_batch(images)
    finally:
        handle.remove()
    assert forwards == [3]                            # three faces, one forward pass
    assert [len(r) for r in results] == [1, 0, 1, 1]  # the grey plate has no face
    single = predictor.predict(PHOTO)[0]["scores"]
    assert results[0][0]["scores"] == pytest.approx(single, abs=1e-6)
    assert results[2][0]["scores"] == pytest.approx(single, abs=1e-6)  # PIL image, same pixels


def test_batch_size_splits_forwards(model_file) -> None:
    predictor = Predictor(model_file, device="cpu", batch_size=2, detector=None)
    forwards = []
    predictor.model.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
    predictor.predict_batch(list(synthetic_faces(5)))
    assert forwards == [2, 2, 1]


def test_classes_come_from_the_model_file(tmp_path) -> None:
    names = ["a", "b", "c", "d", "e", "f", "g"]
    predictor = Predictor(tiny_model_file(tmp_path, extra={"classes": names}), device="cpu")
    assert predictor.classes == names
    _check_face(predictor.predict(PHOTO)[0], names)
    wrong = tiny_model_file(tmp_path, extra={"classes": names[:3]})
    with pytest.raises(ValueError, match="7 outputs but 3 class names"):
        Predictor(wrong, device="cpu")


def test_tta_views_are_averaged(model_file) -> None:
    faces48 = synthetic_faces(2)
    plain = Predictor(model_file, device="cpu")
    p = _reference_probs(plain, faces48)
    p_flipped = _reference_probs(plain, np.ascontiguousarray(faces48[:, :, ::-1]))
    np.testing.assert_allclose(Predictor(model_file, device="cpu", tta="none").classify(faces48), p, atol=1e-5)
    flip = Predictor(model_file, device="cpu", tta="flip").classify(faces48)
    np.testing.assert_allclose(flip, (p + p_flipped) / 2, atol=1e-4)  # identity and mirror, 1:1


def test_bad_arguments(model_file, tmp_path) -> None:
    with pytest.raises(ValueError, match="backend"):
        Predictor(model_file, backend="tensorflow")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Predictor(tmp_path / "missing.safetensors")
    predictor = Predictor(model_file, device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="outside"):
        predictor.predict(np.zeros((50, 50), np.uint8), boxes=[[100, 100, 10, 10]])


def test_images_that_must_work(predictor, tmp_path) -> None:
    rgb = photo_rgb()
    Image.fromarray((to_grey(rgb).astype(np.uint16) * 257)).save(tmp_path / "deep.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    for name in ("deep.png", "rgba.png", "cmyk.jpg", "palette.png"):
        faces = predictor.predict(tmp_path / name)
        assert len(faces) == 1, name
        np.testing.assert_allclose(faces[0]["box"], PHOTO_FACE, atol=8, err_msg=name)


def test_images_that_must_fail(predictor, tmp_path) -> None:
    (tmp_path / "text.jpg").write_text("not pixels\n" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(PHOTO.read_bytes()[:5000])
    png_claiming_size(tmp_path / "bomb.png", 50_000, 50_000)
    for name, reason in (("missing.jpg", "no such file"), ("text.jpg", "not an image"),
                         ("empty.png", "empty file"), ("cut.jpg", "truncated"),
                         ("bomb.png", "decompression-bomb")):
        with pytest.raises(InputError, match=reason) as info:
            predictor.predict(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_bundled_model_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(predict_module, "BUNDLED_MODEL", "weights/no-such-model.safetensors")
    with pytest.raises(FileNotFoundError, match="bundled model .* is not in this install"):
        Predictor()


def _bundled_model_present() -> bool:
    try:
        bundled_model_path()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _bundled_model_present(),
                    reason="src/lhcnet/weights/default.safetensors does not exist yet "
                           "(made by the train-and-ship issue)")
def test_bundled_model_on_the_example_photo() -> None:
    predictor = Predictor(device="cpu")
    faces = predictor.predict(PHOTO)
    assert len(faces) == 1
    _check_face(faces[0], predictor.classes)


# -- the command line -------------------------------------------------------------------------------

def _run(capture, *args) -> tuple[int, str, str]:
    """``lhcnet ARGS`` in this process; ``capture`` is pytest's capsys or capfd."""
    code = main([str(a) for a in args])
    out, err = capture.readouterr()
    return code, out, err


def test_cli_json_on_the_example_photo(model_file, capsys) -> None:
    code, out, err = _run(capsys, "predict", PHOTO, "--model", model_file, "--json")
    assert code == 0 and err == ""
    records = json.loads(out)
    assert len(records) == 1 and records[0]["source"] == str(PHOTO)
    (face,) = records[0]["faces"]
    assert len(face["scores"]) == 7 and abs(sum(face["scores"].values()) - 1) < 1e-5


def test_cli_batch_with_failures_and_outputs(model_file, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.open(PHOTO).save(folder / "a.jpg")
    Image.open(PHOTO).convert("L").save(folder / "sub" / "b.png")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "plain.png")
    (folder / "sub" / "broken.jpg").write_bytes(PHOTO.read_bytes()[:3000])
    bad_video = tmp_path / "broken.mp4"
    bad_video.write_bytes(b"not a video" * 100)
    video = write_video(tmp_path / "clip.avi", [photo_rgb()] * 5)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "predict", folder, tmp_path / "missing.jpg", bad_video, video,
                             "--model", model_file, "--every", "2", "--out", out)
    assert code == 1                                   # some inputs failed, the others ran
    errors = err.strip().splitlines()
    assert len(errors) == 3
    for name in ("broken.jpg", "missing.jpg", "broken.mp4"):
        assert sum(name in line for line in errors) == 1
    assert "no face found" in stdout and "3 failed" in stdout

    records = json.loads((out / "predictions.json").read_text())
    by_source = {(r["source"], r.get("frame")): r for r in records}
    assert len(by_source[(str(folder / "a.jpg"), None)]["faces"]) == 1
    assert len(by_source[(str(folder / "sub" / "b.png"), None)]["faces"]) == 1
    assert by_source[(str(folder / "plain.png"), None)]["faces"] == []
    assert [r["frame"] for r in records if r["source"] == str(video)] == [0, 2, 4]
    assert all("error" in by_source[(str(p), None)]
               for p in (folder / "sub" / "broken.jpg", tmp_path / "missing.jpg", bad_video))

    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["status"] for r in rows].count("ok") == 5          # a.jpg, b.png, 3 frames
    assert [r["status"] for r in rows].count("error") == 3
    ok = rows[[r["status"] for r in rows].index("ok")]
    assert abs(sum(float(ok[c]) for c in CLASSES_FER2013) - 1) < 1e-4
    annotated = out / "photos" / "a.jpg"
    assert annotated.is_file() and (out / "clip" / "frame_000004.jpg").is_file()
    drawn = np.asarray(Image.open(annotated)).astype(int)
    x, y, w, h = by_source[(str(folder / "a.jpg"), None)]["faces"][0]["box"]
    assert drawn[y + h // 2, x, 1] > 200 and drawn[y + h // 2, x, 0] < 60  # the green box edge


def test_cli_whole_image_and_onnx_backend(model_file, tmp_path, capfd) -> None:
    """capfd: exporters may print from C++; stdout must still be exactly the JSON."""
    Image.fromarray(synthetic_faces(1)[0]).save(tmp_path / "face.png")
    code, out, _ = _run(capfd, "predict", tmp_path / "face.png", "--model", model_file,
                        "--whole-image", "--json")
    assert code == 0
    torch_face = json.loads(out)[0]["faces"][0]
    assert torch_face["box"] == [0, 0, 48, 48]
    pytest.importorskip("onnxruntime")
    code, out, _ = _run(capfd, "predict", tmp_path / "face.png", "--model", model_file,
                        "--whole-image", "--json", "--backend", "onnx")
    onnx_face = json.loads(out)[0]["faces"][0]
    assert onnx_face["scores"] == pytest.approx(torch_face["scores"], abs=1e-4)


def test_cli_table_and_tta(model_file, capsys) -> None:
    code, out, _ = _run(capsys, "predict", PHOTO, "--model", model_file, "--tta", "--tta-views", "flip")
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split() == ["INPUT", "FACE", "BOX", "LABEL", "SCORE"]
    assert row.split()[0] == str(PHOTO) and row.split()[3] in CLASSES_FER2013


def test_cli_usage_errors(model_file, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["predict", str(PHOTO), "--every", "0"])
    assert info.value.code == 2
    code, _, err = _run(capsys, "predict", PHOTO, "--model", tmp_path / "none.safetensors")
    assert code == 2 and "model file not found" in err

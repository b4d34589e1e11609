"""The Predictor API and ``lhcnet predict``: faces, probabilities, batching, bad inputs, outputs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from predict_helpers import (PHOTO, PHOTO_FACE, background, photo_rgb, png_claiming_size, scene,
                             synthetic_faces, tiny_model_file, write_video)
from predict_helpers import one_thread  # noqa: F401  (autouse fixture)

import lhcnet
from lhcnet import predict as predict_module
from lhcnet.cli import main
from lhcnet.data import CLASSES_FER2013, to_model_input
from lhcnet.faces import LANDMARK_NAMES, crop_faces, to_grey
from lhcnet.images import InputError
from lhcnet.models import create_model, save_model
from lhcnet.nn import LHC
from lhcnet.predict import Predictor, bundled_model_path
from lhcnet.predict_files import LOCK_NAME, ResultWriter
from lhcnet.tracking import box_iou
from lhcnet.video import read_frames


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
    assert set(face) == {"box", "det_score", "landmarks", "scores", "label", "label_score"}
    assert list(face["scores"]) == list(classes)
    assert abs(sum(face["scores"].values()) - 1) < 1e-5
    assert face["label"] == max(face["scores"], key=face["scores"].get)
    assert face["label_score"] == face["scores"][face["label"]]


# -- the API ----------------------------------------------------------------------------------------

def test_one_face_in_the_example_photo(predictor) -> None:
    faces = predictor.predict(PHOTO)
    assert len(faces) == 1
    _check_face(faces[0])
    assert box_iou([faces[0]["box"]], [PHOTO_FACE])[0, 0] > 0.6   # YuNet frames it like Haar
    assert 0.7 <= faces[0]["det_score"] <= 1 and list(faces[0]["landmarks"]) == list(LANDMARK_NAMES)
    x, y, w, h = faces[0]["box"]
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in faces[0]["landmarks"].values())


@pytest.mark.skipif(cv2.__version__.startswith("5"), reason="OpenCV 5 wheels ship no Haar cascades")
def test_haar_detector_still_works(model_file) -> None:
    (face,) = Predictor(model_file, device="cpu", detector="haar").predict(PHOTO)
    np.testing.assert_allclose(face["box"], PHOTO_FACE, atol=4)
    assert face["det_score"] is None and face["landmarks"] is None


def test_pasted_faces_in_a_scene(predictor) -> None:
    rgb, centres = scene([(40, 60, 100, 0), (300, 80, 220, 20), (600, 380, 130, -25)])
    faces = predictor.predict(rgb)
    assert len(faces) == 3
    assert [f["box"][0] for f in faces] == sorted(f["box"][0] for f in faces)   # left to right
    for face, (cx, cy) in zip(faces, sorted(centres)):
        x, y, w, h = face["box"]
        assert x <= cx <= x + w and y <= cy <= y + h
    assert predictor.predict(background(800, 600)) == []


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
    detected = predictor.predict(PHOTO)[0]
    boxes = [detected["box"], [300, 300, 60, 60]]
    faces = predictor.predict(PHOTO, boxes=boxes)
    assert [f["box"] for f in faces] == boxes
    assert faces[0]["scores"] == pytest.approx(detected["scores"], abs=1e-6)
    assert faces[0]["det_score"] is None and faces[0]["landmarks"] is None


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
    original = predictor.predict(PHOTO)[0]["box"]
    for name in ("deep.png", "rgba.png", "cmyk.jpg", "palette.png"):
        faces = predictor.predict(tmp_path / name)
        assert len(faces) == 1, name
        assert box_iou([faces[0]["box"]], [original])[0, 0] > 0.8, name


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
    monkeypatch.setitem(predict_module.BUNDLED_MODELS, "default", "weights/no-such-model.safetensors")
    with pytest.raises(FileNotFoundError, match="bundled model .* is not in this install"):
        Predictor()
    with pytest.raises(ValueError, match="no bundled model 'vgg'; the bundled models are default, lhcnet"):
        bundled_model_path("vgg")


def test_a_bundled_model_by_name_and_a_file_of_that_name_wins(tmp_path, monkeypatch) -> None:
    """``Predictor(model="lhcnet")`` / ``--model lhcnet`` load the bundled LHC-Net, unless a file
    of that name exists in the working folder."""
    tiny = save_model(create_model("resnet18v2_48"), tmp_path / "tiny.safetensors")
    monkeypatch.setattr(predict_module, "bundled_model_path", {"lhcnet": tiny}.__getitem__)  # a stand-in
    monkeypatch.chdir(tmp_path)
    model = predict_module._load_model("lhcnet", "torch", torch.device("cpu"))[0]
    assert not any(isinstance(m, LHC) for m in model.modules())
    save_model(create_model("lhcnet_resnet18v2_48"), tmp_path / "lhcnet")  # now a file named lhcnet
    model = predict_module._load_model("lhcnet", "torch", torch.device("cpu"))[0]
    assert any(isinstance(m, LHC) for m in model.modules())


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
    assert annotated.is_file() and (out / "clip_timeline.png").is_file()
    assert len(list(read_frames(out / "clip_annotated.mp4"))) == 3    # frames 0, 2, 4
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


# -- reliability: one input's failure stays its own; output folders are never mixed up ----------------

def _one_pixel_folder(folder):
    folder.mkdir()
    Image.open(PHOTO).save(folder / "a.jpg")
    Image.open(PHOTO).convert("L").save(folder / "b.png")
    for width, height in ((1, 1), (1, 7), (7, 1), (2, 1)):
        Image.new("RGB", (width, height), (120, 80, 60)).save(folder / f"tiny_{width}x{height}.png")
    return folder


def test_one_pixel_images_fail_alone(model_file, tmp_path, capsys) -> None:
    folder = _one_pixel_folder(tmp_path / "photos")
    for detector in ("yunet", "haar"):
        if detector == "haar" and cv2.__version__.startswith("5"):
            continue
        code, out, err = _run(capsys, "predict", folder, "--model", model_file, "--json", "--detector", detector)
        assert code == 1
        records = {Path(r["source"]).name: r for r in json.loads(out)}
        assert len(records) == 6
        assert len(records["a.jpg"]["faces"]) == 1 and len(records["b.png"]["faces"]) == 1
        errors = err.strip().splitlines()
        assert len(errors) == 4
        for name in ("tiny_1x1.png", "tiny_1x7.png", "tiny_7x1.png", "tiny_2x1.png"):
            assert "smaller than the smallest face" in records[name]["error"]
            assert sum(name in line and "smaller than the smallest face" in line for line in errors) == 1
    code, _, _ = _run(capsys, "predict", folder, "--model", model_file, "--out", tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert code == 1 and [r["status"] for r in rows].count("ok") == 2 and len(rows) == 6


def test_out_folder_in_use_is_refused(model_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    with ResultWriter(out, CLASSES_FER2013):         # another predict writing there
        code, _, err = _run(capsys, "predict", PHOTO, "--model", model_file, "--out", out)
        assert code == 2 and f"{out}: in use by PID {os.getpid()}" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] != []      # (its tables)
    # held by another process: refused, naming it; once that process is gone (killed), free
    out2 = tmp_path / "out2"
    out2.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
         " fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('locked', flush=True);"
         " time.sleep(60)", str(out2 / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _run(capsys, "predict", PHOTO, "--model", model_file, "--out", out2)
        assert code == 2 and f"in use by PID {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    code, _, _ = _run(capsys, "predict", PHOTO, "--model", model_file, "--out", out2)
    assert code == 0 and (out2 / "predictions.json").is_file()


@pytest.mark.slow  # two processes importing torch: ~10 s on an idle machine; part of the default run
def test_two_predicts_into_one_out_folder(model_file, tmp_path) -> None:
    """Run together, one writes its complete results and the other is refused (never a mix)."""
    inputs = []
    for i in range(6):
        Image.open(PHOTO).save(tmp_path / f"p{i}.jpg")
        inputs.append(str(tmp_path / f"p{i}.jpg"))
    command = [sys.executable, "-m", "lhcnet.cli", "predict", *inputs, "--model", str(model_file),
               "--out", str(tmp_path / "out")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by PID" in refused or "folder not empty" in refused
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [r["source"] for r in records] == inputs and all(len(r["faces"]) == 1 for r in records)
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [r["source"] for r in rows] == inputs


def test_used_out_folder_needs_overwrite(model_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    Image.open(PHOTO).save(tmp_path / "first.jpg")
    Image.open(PHOTO).save(tmp_path / "second.jpg")
    assert _run(capsys, "predict", tmp_path / "first.jpg", "--model", model_file, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "first.jpg" in before
    code, _, err = _run(capsys, "predict", tmp_path / "second.jpg", "--model", model_file, "--out", out)
    assert code == 2 and "folder not empty" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # nothing touched
    (out / "my-notes.txt").write_text("mine")
    code, _, _ = _run(capsys, "predict", tmp_path / "second.jpg", "--model", model_file, "--out", out,
                      "--overwrite")
    assert code == 0
    assert not (out / "first.jpg").exists()                 # the previous run's annotated copy
    assert (out / "second.jpg").is_file() and (out / "my-notes.txt").read_text() == "mine"
    records = json.loads((out / "predictions.json").read_text())
    assert [Path(r["source"]).name for r in records] == ["second.jpg"]
    assert not list(out.glob(".*.tmp"))


def test_non_finite_model_outputs_are_an_error(model_file, tmp_path, capsys) -> None:
    model = lhcnet.load_model(model_file)
    with torch.no_grad():
        model.head.logits.bias[2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite outputs \(NaN or inf\) for 1 of 1 faces"):
        Predictor(model, device="cpu").predict(PHOTO)
    with torch.no_grad():       # finite weights whose logits overflow float32
        model.head.logits.bias[2] = 0.0
        model.head.logits.weight.fill_(3e38)
    overflowing = lhcnet.save_model(model, tmp_path / "overflow.safetensors")
    code, out, err = _run(capsys, "predict", PHOTO, "--model", overflowing, "--json")
    assert code == 2 and "non-finite outputs" in err and "NaN" not in out

"""Videos: faces tracked across frames, smoothed probabilities, annotated MP4, timeline, bad files."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from predict_helpers import scene, tiny_model_file, write_video
from predict_helpers import one_thread  # noqa: F401  (autouse fixture)

from lhcnet.cli import main
from lhcnet.tracking import FaceTracker, box_iou
from lhcnet.video import Mp4Writer, read_frames

FRAMES = 10
GONE = (4, 5)   # frames without the right-hand face (it "looks away")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("model"))


def clip_frames() -> list[np.ndarray]:
    """640x480 frames: a head moving right 6 px a frame, a second one still, gone in GONE."""
    frames = []
    for i in range(FRAMES):
        placements = [(40 + 6 * i, 60, 150, 0)] + ([] if i in GONE else [(420, 250, 130, 10)])
        frames.append(scene(placements, size=(640, 480))[0])
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.avi", clip_frames())


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- tracking by hand -----------------------------------------------------------------------------------

def test_box_iou_by_hand() -> None:
    iou = box_iou([[0, 0, 10, 10]], [[5, 0, 10, 10], [20, 20, 5, 5], [0, 0, 10, 10]])
    np.testing.assert_allclose(iou, [[50 / 150, 0.0, 1.0]])


def _face(box, scores=(0.5, 0.5)):
    return {"box": list(box), "scores": dict(zip("ab", scores)), "label": "a", "label_score": scores[0]}


def test_tracks_follow_boxes_not_list_order() -> None:
    tracker = FaceTracker(max_missed=2)
    first = [_face((0, 0, 10, 10)), _face((100, 0, 10, 10))]
    tracker.update(first)
    assert [f["track"] for f in first] == [1, 2]
    second = [_face((102, 1, 10, 10)), _face((1, 0, 10, 10)), _face((300, 300, 10, 10))]
    tracker.update(second)
    assert [f["track"] for f in second] == [2, 1, 3]
    tracker.update([_face((2, 0, 10, 10))])                 # 2 and 3 missed once
    tracker.update([_face((3, 0, 10, 10))])                 # twice: they end
    back = [_face((3, 0, 10, 10)), _face((102, 1, 10, 10))]
    tracker.update(back)
    assert [f["track"] for f in back] == [1, 4]


def test_smoothing_is_the_mean_of_the_last_frames() -> None:
    tracker = FaceTracker(window=2)
    frames = [[_face((0, 0, 10, 10), (0.9, 0.1))], [_face((1, 0, 10, 10), (0.2, 0.8))],
              [_face((1, 1, 10, 10), (0.6, 0.4))]]
    for faces in frames:
        tracker.update(faces)
    assert frames[0][0]["scores"] == pytest.approx({"a": 0.9, "b": 0.1})
    assert frames[1][0]["scores"] == pytest.approx({"a": 0.55, "b": 0.45}) and frames[1][0]["label"] == "a"
    assert frames[2][0]["scores"] == pytest.approx({"a": 0.4, "b": 0.6}) and frames[2][0]["label"] == "b"
    assert frames[2][0]["frame_scores"] == {"a": 0.6, "b": 0.4} and frames[2][0]["label_score"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="window"):
        FaceTracker(window=0)


# -- a video made from the example photo -----------------------------------------------------------------

def test_video_tracks_csv_annotated_video_and_timeline(model_file, clip, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "predict", clip, "--model", model_file, "--out", out, "--smooth", "3")
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 2 * FRAMES - len(GONE)
    tracks: dict[int, set[str]] = {}
    for row in rows:
        side = "left" if int(row["x"]) < 320 else "right"
        tracks.setdefault(side, set()).add(row["track"])
    assert tracks == {"left": {"1"}, "right": {"2"}}    # one number per face, over the gap too
    per_frame = [sum(r["frame"] == str(i) for r in rows) for i in range(FRAMES)]
    assert per_frame == [1 if i in GONE else 2 for i in range(FRAMES)]

    # --smooth 3: a face's scores are the mean of its track's last three frames' own scores
    records = json.loads((out / "predictions.json").read_text())
    history: dict[int, list[list[float]]] = {}
    for record in records:
        for face in record["faces"]:
            history.setdefault(face["track"], []).append(list(face["frame_scores"].values()))
            np.testing.assert_allclose(list(face["scores"].values()),
                                       np.mean(history[face["track"]][-3:], axis=0), atol=1e-6)
            assert face["label"] == max(face["scores"], key=face["scores"].get)

    video = out / "clip_annotated.mp4"
    assert all(r["annotated"] == str(video) for r in records)
    frames = [rgb for _, rgb in read_frames(video)]
    assert len(frames) == FRAMES and frames[0].shape == (480, 640, 3)
    x, y, w, h = records[0]["faces"][0]["box"]
    edge = frames[0][y + h // 2, x - 1:x + 2].astype(int)        # the green box edge (MPEG-4 blurs it)
    assert (edge[:, 1] > 150).any() and (edge[:, 1] - edge[:, 0] > 80).any()

    timeline = Image.open(out / "clip_timeline.png")
    assert timeline.size[0] == 1000 and timeline.size[1] > 400      # two panels
    assert len(np.unique(np.asarray(timeline.convert("RGB")).reshape(-1, 3), axis=0)) > 20
    manifest = (out / ".lhcnet-predict-files").read_text().split()
    assert sorted(manifest) == ["clip_annotated.mp4", "clip_timeline.png", "predictions.csv",
                                "predictions.json"]


def _truncated(clip, folder):
    data = clip.read_bytes()
    (folder / "cut.avi").write_bytes(data[:len(data) // 2])
    return folder / "cut.avi"


def _garbled(clip, folder):
    writer = Mp4Writer(folder / "garbled.mp4", 10)
    for frame in clip_frames() * 2:
        writer.write(frame)
    writer.close()
    data = bytearray((folder / "garbled.mp4").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 20_000] = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    (folder / "garbled.mp4").write_bytes(bytes(data))
    return folder / "garbled.mp4"


@pytest.mark.parametrize("damage", [_truncated, _garbled], ids=["truncated", "garbled"])
def test_damaged_video_is_an_error_after_the_frames_read(model_file, clip, tmp_path, capsys, damage) -> None:
    bad = damage(clip, tmp_path)
    declared = len(clip_frames()) * (2 if "garbled" in bad.name else 1)
    code, stdout, err = _run(capsys, "predict", bad, "--model", model_file, "--json", "--whole-image")
    assert code == 1
    (line,) = err.strip().splitlines()
    assert str(bad) in line and f"of the {declared} frames its header declares" in line
    records = json.loads(stdout)
    frames = [r for r in records if "frame" in r]
    assert 0 < len(frames) < declared and records[-1]["error"] in line


def test_mp4_writer_is_all_or_nothing(tmp_path) -> None:
    writer = Mp4Writer(tmp_path / "a.mp4", 5)
    writer.write(np.zeros((48, 64, 3), np.uint8))
    assert not (tmp_path / "a.mp4").exists()                   # only the temp file so far
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    assert Mp4Writer(tmp_path / "b.mp4", 5).close() is None     # no frames: no file

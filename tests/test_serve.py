"""``lhcnet serve``'s HTTP API through FastAPI's test client: results, every error path, the token,
the timeout, and several clients at once (one inference thread, results unchanged)."""
from __future__ import annotations

import csv
import io
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

try:
    import fastapi_offline  # noqa: F401
    from fastapi import testclient  # needs httpx2 (or httpx): a RuntimeError without
except (ImportError, RuntimeError) as exc:
    pytest.skip(f"needs the serve-test extra: pip install -e '.[serve-test]' ({' '.join(str(exc).split())})",
                allow_module_level=True)

from predict_helpers import PHOTO, one_thread, photo_rgb, png_claiming_size, tiny_model, write_video  # noqa: F401

from lhcnet.cli import main
from lhcnet.images import load_image
from lhcnet.predict import Predictor, draw_faces
from lhcnet.predict_files import table_header
from lhcnet.serve import ServeSettings, create_app

PHOTO_BYTES = PHOTO.read_bytes()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(tiny_model(), device="cpu")


@pytest.fixture(scope="module")
def client(predictor):
    with testclient.TestClient(create_app(predictor)) as client:
        yield client


def photo_form(name: str = "astronaut.jpg", data: bytes = PHOTO_BYTES, field: str = "image"):
    return {"files": [(field, (name, data, "image/jpeg"))]}


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return encoded.tobytes()


def assert_same_faces(got: list[dict], expected: list[dict]) -> None:
    assert [f["box"] for f in got] == [f["box"] for f in expected]
    assert [f["label"] for f in got] == [f["label"] for f in expected]
    for g, e in zip(got, expected):
        assert g["scores"] == pytest.approx(e["scores"], abs=1e-6)


def assert_one_line_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for fragment in fragments:
        assert fragment in detail, detail


# -- results -------------------------------------------------------------------------------------

def test_predict_returns_what_the_predictor_finds_in_the_file(client, predictor):
    response = client.post("/v1/predict", **photo_form())
    assert response.status_code == 200
    (record,) = response.json()
    expected = predictor.predict(PHOTO)  # read from the path, not from the upload's bytes
    assert record["source"] == "astronaut.jpg" and len(expected) == 1
    assert_same_faces(record["faces"], expected)
    assert sum(record["faces"][0]["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_several_photos_one_without_a_face(client, predictor):
    blank = png_bytes(np.full((200, 300, 3), 128, np.uint8))
    files = [("image", ("a.jpg", PHOTO_BYTES, "image/jpeg")), ("image", ("blank.png", blank, "image/png"))]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200
    first, second = response.json()
    assert (first["source"], second["source"]) == ("a.jpg", "blank.png")
    assert_same_faces(first["faces"], predictor.predict(PHOTO))
    assert second["faces"] == []


def test_whole_image_is_one_face(client, predictor):
    response = client.post("/v1/predict?whole_image=true", **photo_form())
    (face,) = response.json()[0]["faces"]
    assert face["box"] == [0, 0, 512, 512]
    assert_same_faces([face], predictor.predict(PHOTO, whole_image=True))


def test_annotate_draws_the_faces(client, predictor):
    response = client.post("/v1/annotate", **photo_form())
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    drawn = cv2.cvtColor(cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR),
                         cv2.COLOR_BGR2RGB)
    rgb = load_image(PHOTO)
    faces = predictor.predict(rgb)
    assert response.headers["x-faces"] == str(len(faces)) == "1"
    np.testing.assert_array_equal(drawn, draw_faces(rgb, faces))  # PNG: lossless
    x, y, w, h = faces[0]["box"]
    assert tuple(drawn[y + h, x + w // 2]) == (0, 255, 0)  # the box's bottom edge is green
    jpeg = client.post("/v1/annotate?format=jpeg", **photo_form())
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"


def test_video_gives_records_timeline_and_csv(client, predictor, tmp_path):
    photo, blank = photo_rgb(), np.full((512, 512, 3), 90, np.uint8)
    video = write_video(tmp_path / "clip.avi", [photo, blank, photo, blank], fps=10).read_bytes()
    form = {"files": [("video", ("clip.avi", video, "video/x-msvideo"))]}
    result = client.post("/v1/video", **form).json()
    assert result["source"] == "clip.avi" and result["fps"] == pytest.approx(10.0)
    assert [r["frame"] for r in result["frames"]] == [0, 1, 2, 3]
    assert [len(r["faces"]) for r in result["frames"]] == [1, 0, 1, 0]
    timeline = result["timeline"]
    assert [p["time_s"] for p in timeline] == [0.0, 0.1, 0.2, 0.3]
    assert [p["faces"] for p in timeline] == [1, 0, 1, 0]
    assert timeline[1]["label"] is None and timeline[1]["scores"] is None
    expected = predictor.predict(photo)[0]  # MJPG frames are lossy: same face, nearby scores
    assert timeline[0]["label"] == expected["label"]
    assert timeline[0]["scores"] == pytest.approx(expected["scores"], abs=0.05)

    every = client.post("/v1/video?every=2", **form).json()
    assert [r["frame"] for r in every["frames"]] == [0, 2] and every["every"] == 2

    table = client.post("/v1/video?format=csv", **form)
    assert table.headers["content-type"].startswith("text/csv")
    assert table.text.splitlines()[0] == ",".join(table_header(predictor.classes))
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert [(row["frame"], row["status"]) for row in rows] == [("0", "ok"), ("1", "no_face"), ("2", "ok"),
                                                                ("3", "no_face")]
    assert float(rows[0]["label_score"]) == pytest.approx(timeline[0]["label_score"], abs=1e-6)


def test_model_health_page_and_offline_docs(client, predictor):
    model = client.get("/v1/model").json()
    assert model["classes"] == predictor.classes and model["name"] == "lhcnet_resnet18v2_48"
    assert model["limits"]["max_upload_bytes"] == ServeSettings().max_upload_bytes
    assert "token" not in model["limits"]
    assert client.get("/v1/health").json() == {"status": "ok", "pending": 0}
    page = client.get("/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    docs = client.get("/docs").text
    assert re.findall(r'(?:src|href)="([^"]*)"', docs) == [  # every asset from this server
        "/static-offline-docs/swagger-ui.css", "/static-offline-docs/favicon.png",
        "/static-offline-docs/swagger-ui-bundle.js"]
    for src in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css"):
        assert src in docs and client.get(src).status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/annotate", "/v1/video", "/v1/health", "/v1/model"} <= set(paths)


# -- bad input -----------------------------------------------------------------------------------

def test_empty_body(client):
    assert_one_line_error(client.post("/v1/predict"), 400, "empty request body", "-F image=@")


def test_wrong_field(client):
    response = client.post("/v1/predict", **photo_form(field="file"))
    assert_one_line_error(response, 400, "no file in form field 'image'", "fields sent: file")


def test_not_a_form(client):
    assert_one_line_error(client.post("/v1/predict", json={"image": "x"}), 415, "multipart/form-data")


def test_empty_file(client):
    assert_one_line_error(client.post("/v1/predict", **photo_form(data=b"")), 400, "astronaut.jpg: empty file")


def test_text_file_named_jpg(client):
    response = client.post("/v1/predict", **photo_form("notes.jpg", b"just some text\n" * 20))
    assert_one_line_error(response, 422, "notes.jpg: not an image")


def test_truncated_jpeg(client):
    response = client.post("/v1/predict", **photo_form("cut.jpg", PHOTO_BYTES[: len(PHOTO_BYTES) // 3]))
    assert_one_line_error(response, 422, "cut.jpg: truncated or corrupt image")


def test_decompression_bomb(client, tmp_path):
    bomb = png_claiming_size(tmp_path / "bomb.png", 30000, 30000).read_bytes()
    assert len(bomb) < 200
    response = client.post("/v1/predict", **photo_form("bomb.png", bomb))
    assert_one_line_error(response, 422, "bomb.png: image above the 89 Mpx limit", "900000000 pixels",
                          "decompression-bomb guard")


def test_50_mb_upload(client):
    response = client.post("/v1/predict", **photo_form("big.jpg", b"\0" * 50_000_000))
    assert_one_line_error(response, 413, "above the server's 20.0 MB limit")


def test_oversize_body_without_content_length(predictor):
    app = create_app(predictor, ServeSettings(max_upload_bytes=100_000))
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def chunks():  # a streamed body: the size is only known by counting it
        yield head
        for _ in range(50):
            yield b"\0" * 10_000

    with testclient.TestClient(app) as client:
        response = client.post("/v1/predict", content=chunks(),
                               headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_one_line_error(response, 413, "above the server's 0.1 MB limit")


def test_too_many_files(predictor):
    with testclient.TestClient(create_app(predictor, ServeSettings(max_files=2))) as client:
        response = client.post("/v1/predict", files=[("image", (f"{i}.jpg", PHOTO_BYTES)) for i in range(3)])
    assert_one_line_error(response, 400, "Too many files")


def test_bad_query_parameter(client):
    assert_one_line_error(client.post("/v1/video?every=0", **photo_form(field="video")), 422,
                          "every", "greater than or equal to 1")
    assert_one_line_error(client.post("/v1/annotate?format=gif", **photo_form()), 422, "format")


def test_not_a_video(client):
    response = client.post("/v1/video", files={"video": ("clip.mp4", b"not a video at all" * 50)})
    assert_one_line_error(response, 422, "clip.mp4: cannot read video")
    assert "/tmp" not in response.json()["detail"] and "/dev/shm" not in response.json()["detail"]


def test_video_above_the_frame_limit(predictor, tmp_path):
    video = write_video(tmp_path / "long.avi", [photo_rgb()] * 5).read_bytes()
    with testclient.TestClient(create_app(predictor, ServeSettings(max_video_frames=2))) as client:
        form = {"files": {"video": ("long.avi", video)}}
        assert_one_line_error(client.post("/v1/video", **form), 413, "more than 2 frames", "every=3")
        assert client.post("/v1/video?every=3", **form).status_code == 200  # frames 0 and 3


def test_unknown_path_and_method(client):
    assert_one_line_error(client.get("/v1/nothing"), 404, "Not Found")
    assert_one_line_error(client.get("/v1/predict"), 405, "Method Not Allowed")


def test_server_fault_is_json_without_traceback(predictor, monkeypatch):
    app = create_app(predictor)
    monkeypatch.setattr(predictor, "classify", lambda faces: 1 / 0)
    with testclient.TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/predict", **photo_form())
    assert_one_line_error(response, 500, "internal server error (ZeroDivisionError)")


# -- safety --------------------------------------------------------------------------------------

def test_token(predictor):
    with testclient.TestClient(create_app(predictor, ServeSettings(token="s3cret"))) as client:
        missing = client.post("/v1/predict", **photo_form())
        assert_one_line_error(missing, 401, "Authorization: Bearer")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_one_line_error(client.get("/v1/health", headers={"Authorization": "Bearer nope"}), 401,
                              "wrong token")
        assert_one_line_error(client.get("/v1/model", headers={"Authorization": "Basic czNjcmV0"}), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/predict", headers=good, **photo_form()).status_code == 200
        assert client.get("/v1/health", headers=good).status_code == 200
        assert client.get("/").status_code == 200  # the page: a constant file, which then asks for it


def test_uploads_stay_in_memory(client, predictor, monkeypatch):
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    big = png_bytes(noise)
    assert len(big) > 2_000_000  # above Starlette's 1 MB spool size, which would go to a file

    def no_disk(self, *args, **kwargs):
        raise AssertionError("an upload was rolled over to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", no_disk)
    response = client.post("/v1/predict", **photo_form("noise.png", big))
    assert response.status_code == 200 and response.json()[0]["source"] == "noise.png"


def test_timeout(predictor, monkeypatch):
    classify, finished = predictor.classify, []

    def slow(faces):
        time.sleep(0.6)
        probabilities = classify(faces)
        finished.append(time.monotonic())
        return probabilities

    app = create_app(predictor, ServeSettings(timeout_s=0.3))
    monkeypatch.setattr(predictor, "classify", slow)
    with testclient.TestClient(app) as client:
        def timed(_: int) -> tuple[object, float]:
            started = time.monotonic()
            response = client.post("/v1/predict", **photo_form())
            return response, time.monotonic() - started

        with ThreadPoolExecutor(2) as pool:  # the second request waits behind the first
            results = list(pool.map(timed, range(2)))
        for response, seconds in results:
            assert_one_line_error(response, 504, "longer than the server's 0.3 s limit")
            assert seconds < 0.55  # answered at the deadline, not after the job
        assert not finished
    # the queued job was dropped, not run; the app's shutdown waited for the running one
    assert len(finished) == 1


def test_concurrent_clients_share_one_inference_thread(predictor, monkeypatch):
    classify, lock = predictor.classify, threading.Lock()
    calls = {"active": 0, "most": 0, "threads": set()}

    def watched(faces):
        with lock:
            calls["active"] += 1
            calls["most"] = max(calls["most"], calls["active"])
            calls["threads"].add(threading.current_thread().name)
        time.sleep(0.02)  # widen the window in which two calls could overlap
        try:
            return classify(faces)
        finally:
            with lock:
                calls["active"] -= 1

    expected = predictor.predict(PHOTO)
    app = create_app(predictor)
    monkeypatch.setattr(predictor, "classify", watched)
    with testclient.TestClient(app) as client:
        def one_client(_: int) -> list[int]:
            return [client.post("/v1/predict", **photo_form()) for _ in range(3)]

        with ThreadPoolExecutor(4) as pool:
            responses = [r for batch in pool.map(one_client, range(4)) for r in batch]
    assert [r.status_code for r in responses] == [200] * 12
    for response in responses:
        assert_same_faces(response.json()[0]["faces"], expected)
    assert calls["most"] == 1
    assert len(calls["threads"]) == 1 and calls["threads"].pop().startswith("lhcnet-inference")


# -- command line --------------------------------------------------------------------------------

def test_cli_starts_uvicorn_with_the_app_and_warns_off_loopback(monkeypatch, capsys, tmp_path):
    import uvicorn

    from predict_helpers import tiny_model_file
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.setenv("LHCNET_TOKEN", "from-env")
    model = tiny_model_file(tmp_path)
    assert main(["serve", "--model", str(model), "--port", "8123", "--max-upload-mb", "2"]) == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    settings = started["app"].state.settings
    assert settings.token == "from-env" and settings.max_upload_bytes == 2_000_000
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", "--model", str(model), "--host", "0.0.0.0", "--token", "t"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "they need the token" in err
    assert started["app"].state.settings.token == "t"


def test_cli_names_the_missing_extra(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lhcnet[serve]'" in err and "\n" == err[-1] and err.count("\n") == 1

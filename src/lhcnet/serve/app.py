"""The FastAPI app of ``lhcnet serve``: the web page at ``/``, the HTTP API under ``/v1``.

Every error is ``{"detail": "<one line>"}`` with a 4xx status (5xx only for the server's own
faults and the 504 timeout), never a traceback. With a token set, every ``/v1`` request needs
``Authorization: Bearer <token>``; the page, the API docs and the schema are constant files that
carry no data and take no input, so a browser can load them and then send the token with its
API calls. The docs page (``/docs``) loads Swagger UI from the ``fastapi-offline`` package, not
from a CDN: it works offline.
"""
from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from .. import __version__
from ..predict import Predictor
from ..predict_files import records_csv
from . import jobs
from .uploads import RequestError, Upload, read_uploads
from .worker import Deadline, InferenceWorker

__all__ = ["ServeSettings", "create_app"]

STATIC = resources.files("lhcnet.serve") / "static"


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits and its optional token (``lhcnet serve`` options of the same names)."""

    token: str | None = None
    max_upload_bytes: int = 20_000_000   # a whole request body
    max_files: int = 16                  # images per /v1/predict request
    timeout_s: float = 60.0              # per request, upload included
    max_video_frames: int = 300          # frames read from one video


class ErrorBody(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "empty body, no file in the expected field, malformed form"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token (when the server has one)"},
    413: {"model": ErrorBody, "description": "upload above the size limit (video: above the frame limit)"},
    415: {"model": ErrorBody, "description": "the body is not multipart/form-data"},
    422: {"model": ErrorBody, "description": "not an image / video, corrupt, or above the pixel limit "
                                             "(decompression-bomb guard); a bad query parameter"},
    504: {"model": ErrorBody, "description": "the request took longer than the server's timeout"},
}


def _form(field: str, many: bool, what: str) -> dict[str, Any]:
    """The OpenAPI request body of a multipart upload (the endpoints read the form themselves)."""
    file = {"type": "string", "format": "binary", "description": what}
    schema = {"type": "object", "required": [field],
              "properties": {field: {"type": "array", "items": file} if many else file}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _safe_name(upload: Upload) -> Upload:
    """A client's file name as one short line (it ends up in messages and records)."""
    return Upload(_one_line(upload.filename)[:200] or "upload", upload.data)


def model_card(predictor: Predictor) -> dict[str, Any]:
    """The model's name, classes and accuracy, from the metadata saved with it."""
    model = predictor.model
    meta = getattr(model, "lhcnet_metadata", None) or getattr(model, "lhcnet_config", None) or {}
    info = meta.get("info") or {}
    accuracy = {"FER2013 PrivateTest": info["privatetest_accuracy"]} if "privatetest_accuracy" in info else {}
    detector = predictor.detector
    return {"name": meta.get("name", type(model).__name__), "classes": predictor.classes,
            "accuracy": accuracy, "input_size": predictor.input_size, "backend": predictor.backend,
            "device": str(predictor.device),
            "detector": "none" if detector is None else getattr(detector, "name", type(detector).__name__),
            "info": info}


def create_app(predictor: Predictor, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The app serving ``predictor``; all model calls run on one thread (``InferenceWorker``)."""
    worker = InferenceWorker()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()  # at shutdown: drop the queued jobs, let the running one finish

    app = FastAPIOffline(
        title="lhcnet", version=__version__, redoc_url=None, lifespan=lifespan,
        description="Facial expression recognition (LHC-Net), local and offline. Errors are "
                    '`{"detail": "<one line>"}`. See docs/serve.md.')
    app.state.worker, app.state.settings = worker, settings
    bearer = HTTPBearer(auto_error=False, description="only when the server was started with a token")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        if credentials is None:
            raise RequestError(401, "this server needs a token: send the header "
                                    "'Authorization: Bearer <token>'")
        if not hmac.compare_digest(credentials.credentials.encode(), settings.token.encode()):
            raise RequestError(401, "wrong token")

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message}, exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": _one_line(f"{where}: {error.get('msg', 'invalid')}")}, 422)

    @app.exception_handler(Exception)
    async def server_fault(_: Request, exc: Exception) -> JSONResponse:  # traceback: server log only
        return JSONResponse({"detail": f"internal server error ({type(exc).__name__}); "
                                       "the server's log has the details"}, 500)

    async def uploads(request: Request, field: str, deadline: Deadline, max_files: int) -> list[Upload]:
        files = await deadline.wait(read_uploads(request, field, settings.max_upload_bytes, max_files))
        return [_safe_name(upload) for upload in files]

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=ERRORS)

    @api.get("/health", summary="the server is up; jobs queued or running")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pending": worker.pending}

    @api.get("/model", summary="the model: name, classes, accuracy (model card metadata), limits")
    async def model() -> dict[str, Any]:
        limits = {key: value for key, value in asdict(settings).items() if key != "token"}
        return {**model_card(predictor), "limits": limits}

    @api.post("/predict", openapi_extra=_form("image", True, "a photo (repeat the field for more)"),
              summary="faces and emotion probabilities of one or more photos")
    async def predict(request: Request, whole_image: bool = False) -> JSONResponse:
        """One record per photo, as `lhcnet predict --json` prints them: `[{"source": file name,
        "faces": [{"box": [x, y, w, h], "scores": {emotion: p}, "label", "label_score"}]}]`;
        `faces` is `[]` when no face was found. `whole_image`: the photo is one face (a crop)."""
        deadline = Deadline(settings.timeout_s)
        files = await uploads(request, "image", deadline, settings.max_files)
        return JSONResponse(await worker.run(
            lambda: jobs.predict_records(predictor, files, deadline, whole_image), deadline))

    @api.post("/annotate", openapi_extra=_form("image", False, "a photo"),
              response_class=Response, summary="the photo with its faces boxed and labelled",
              responses={200: {"content": {"image/png": {}, "image/jpeg": {}},
                               "description": "the annotated image; header X-Faces: face count"}})
    async def annotate(request: Request,
                       image_format: Literal["png", "jpeg"] = Query("png", alias="format"),
                       whole_image: bool = False) -> Response:
        deadline = Deadline(settings.timeout_s)
        file = (await uploads(request, "image", deadline, 1))[0]
        image, faces = await worker.run(
            lambda: jobs.annotated_image(predictor, file, image_format, whole_image), deadline)
        return Response(image, media_type=f"image/{image_format}", headers={"X-Faces": str(faces)})

    @api.post("/video", openapi_extra=_form("video", False, "a short video"),
              summary="per frame and face: boxes and probabilities (JSON or CSV), and a timeline")
    async def video(request: Request, every: int = Query(1, ge=1, description="read every N-th frame"),
                    table_format: Literal["json", "csv"] = Query("json", alias="format"),
                    whole_image: bool = False) -> Response:
        """JSON: `{"source", "fps", "every", "frames": [record per read frame, with "frame"],
        "timeline": [{"frame", "time_s", "faces", "label", "label_score", "scores"}]}` (the
        timeline follows the largest face). CSV: the `predictions.csv` of `lhcnet predict --out`."""
        deadline = Deadline(settings.timeout_s)
        file = (await uploads(request, "video", deadline, 1))[0]
        records, rate = await worker.run(lambda: jobs.video_records(
            predictor, file, every, settings.max_video_frames, deadline, whole_image), deadline)
        if table_format == "csv":
            return PlainTextResponse(records_csv(records, predictor.classes), media_type="text/csv")
        return JSONResponse({"source": file.filename, "fps": rate, "every": every, "frames": records,
                             "timeline": jobs.timeline(records, rate)})

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app

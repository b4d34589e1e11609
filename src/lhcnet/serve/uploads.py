"""Reading a multipart upload into memory, within limits, or one clear ``RequestError``.

Starlette's own form parsing spools files above 1 MB to a temporary file on disk; here the body
is read through a size guard (413 as soon as it passes ``max_bytes``, before anything is parsed
when ``Content-Length`` already says so) and every file part stays in memory.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

__all__ = ["RequestError", "Upload", "read_uploads"]

FORM_HINT = "send a multipart form, e.g. curl -F {field}=@photo.jpg"


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Upload:
    """One uploaded file, in memory."""

    filename: str
    data: bytes


def too_large(size: int, max_bytes: int) -> RequestError:
    return RequestError(413, f"upload of {size / 1e6:.1f} MB is above the server's "
                             f"{max_bytes / 1e6:.1f} MB limit (lhcnet serve --max-upload-mb)")


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise too_large(total, max_bytes)
        yield chunk


class _InMemoryParser(MultiPartParser):
    spool_max_size = 2**62  # never roll a part over to a file: the body limit bounds the memory


async def read_uploads(request: Request, field: str, max_bytes: int, max_files: int) -> list[Upload]:
    """The files sent under form field ``field`` (at least one), read into memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(int(declared), max_bytes)
    content_type = request.headers.get("content-type", "")
    if declared == "0" or (not content_type and declared is None):
        raise RequestError(400, "empty request body: " + FORM_HINT.format(field=field))
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(415, f"expected a multipart/form-data body, got "
                                f"{content_type or 'no Content-Type'}: " + FORM_HINT.format(field=field))
    parser = _InMemoryParser(request.headers, _limited(request, max_bytes), max_files=max_files,
                             max_fields=max_files)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart form ({exc})") from None
    try:
        uploads, other = [], []
        for name, value in form.multi_items():
            if name == field and isinstance(value, UploadFile):
                value.file.seek(0)
                uploads.append(Upload(value.filename or field, value.file.read()))
            else:
                other.append(name if isinstance(value, UploadFile) else f"{name} (a text field)")
    finally:
        await form.close()
    if not uploads:
        got = ", ".join(other) if other else "none"
        raise RequestError(400, f"no file in form field '{field}' (fields sent: {got}): "
                                + FORM_HINT.format(field=field))
    for upload in uploads:
        if not upload.data:
            raise RequestError(400, f"{upload.filename}: empty file")
    return uploads

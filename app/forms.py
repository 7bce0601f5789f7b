"""Upload forms read with their limits applied as the bytes arrive.

Starlette's multipart parser spools every file of a form to disk before a route sees it, and reads a text
field that is not valid in the form's charset as Latin-1. The upload routes (``POST /retrieve``,
``POST /experts``) read their forms through :class:`BoundedMultiPartParser` instead, before FastAPI does:

- a file field's parts are counted and sized while they stream in: the first file over its route's limit
  (``SGLORA_MAX_IMAGE_BYTES``, ``SGLORA_MAX_EXPERT_BYTES``) or past its count is a 413 / 422 naming it,
  and the rest of the body is not read (it had been spooled in full, up to ``SGLORA_MAX_BODY_BYTES``);
- a text field is decoded strictly: bytes that are not valid UTF-8 (or the form's declared charset) are a
  422 naming the field, not a Latin-1 reading of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi.routing import APIRoute
from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

from app.errors import APIError
from app.settings import Settings

# A route's file fields: name -> (most files, most bytes each).
FileLimits = dict[str, tuple[int, int]]

# The upload routes' file fields, by path (their POST).
UPLOAD_LIMITS: dict[str, Callable[[Settings], FileLimits]] = {
    "/retrieve": lambda s: {"images": (s.max_images, s.max_image_bytes)},
    "/experts": lambda s: {"mean": (1, s.max_expert_bytes), "variance": (1, s.max_expert_bytes)},
}

CLOSE = {"Connection": "close"}  # the rest of the body is not read


class BoundedMultiPartParser(MultiPartParser):
    """Starlette's parser, with ``files`` counted and sized as they stream in and text fields decoded strictly."""

    def __init__(self, headers: Headers, stream: Any, files: FileLimits, **limits: Any) -> None:
        super().__init__(headers, stream, **limits)
        self._files = files
        self._counts: Counter[str] = Counter()
        self._label = ""  # the file part in progress, as errors name it (images[3], mean)
        self._limit: int | None = None  # its most bytes; None: a text field or a file field without a limit
        self._size = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._limit, self._size = None, 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.file is None or part.field_name not in self._files:
            return
        most, self._limit = self._files[part.field_name]
        index = self._counts[part.field_name]
        self._counts[part.field_name] += 1
        if index >= most:
            why = "given more than once; send it once" if most == 1 else f"more than {most} files; send at most {most}"
            raise APIError(422, part.field_name, why, headers=CLOSE)
        self._label = f"{part.field_name}[{index}]" if most > 1 else part.field_name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._limit is not None:
            self._size += end - start
            if self._size > self._limit:
                raise APIError(413, self._label, f"larger than {self._limit} bytes", headers=CLOSE)
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except UnicodeDecodeError:
                raise APIError(
                    422, part.field_name, f"not valid {self._charset}: send text fields as UTF-8", headers=CLOSE
                ) from None
        super().on_part_end()


class BoundedFormRequest(Request):
    """A request whose multipart form is read by :class:`BoundedMultiPartParser` with ``files``."""

    def __init__(self, request: Request, files: FileLimits) -> None:
        super().__init__(request.scope, request.receive, request._send)
        self._files = files

    async def read_form(self) -> FormData:
        """Parses the form now (a later ``form()`` gets the same object). Raises APIError for a file over its
        limits or a text field in another encoding, HTTPException(400) for a malformed body, as Starlette does."""
        if self._form is None:
            async with aclosing(self.stream()) as stream:
                parser = BoundedMultiPartParser(self.headers, stream, self._files)
                try:
                    self._form = await parser.parse()
                except MultiPartException as e:
                    raise HTTPException(400, detail=e.message) from None
        return self._form


class UploadRoute(APIRoute):
    """A route whose POST multipart form, when its path is in :data:`UPLOAD_LIMITS`, is read with those limits
    before FastAPI reads it (FastAPI then gets the parsed form). Other content types go on to FastAPI, and
    to the route's own 415."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        limits = UPLOAD_LIMITS.get(self.path)
        if limits is None or "POST" not in self.methods:
            return handler

        async def bounded(request: Request) -> Response:
            if request.method != "POST" or not _is_multipart(request):
                return await handler(request)
            form_request = BoundedFormRequest(request, limits(request.app.state.settings))
            await form_request.read_form()
            return await handler(form_request)

        return bounded


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower() == "multipart/form-data"

"""Upload forms read with their limits applied as the bytes arrive.

Starlette's multipart parser spools every file of a form to disk before a route sees it, and reads a text
field that is not valid in the form's charset as Latin-1. The upload routes (``POST /retrieve``,
``POST /experts``) read their forms through :class:`BoundedMultiPartParser` instead, before FastAPI does:

- a file field's parts are counted and sized while they stream in: the first file over its route's limit
  (``SGLORA_MAX_IMAGE_BYTES``, ``SGLORA_MAX_EXPERT_BYTES``) or past its count, or a file in a field that
  takes none, is a 413 / 422 naming it, and the rest of the body is not stored (it had been spooled in
  full, up to ``SGLORA_MAX_BODY_BYTES``);
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
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from app.deps import media_type
from app.errors import APIError
from app.settings import Settings

# A route's file fields: name -> (most files, most bytes each).
FileLimits = dict[str, tuple[int, int]]

# The upload routes' file fields, by path (their POST).
UPLOAD_LIMITS: dict[str, Callable[[Settings], FileLimits]] = {
    "/retrieve": lambda s: {"images": (s.max_images, s.max_image_bytes)},
    "/experts": lambda s: {"mean": (1, s.max_expert_bytes), "variance": (1, s.max_expert_bytes)},
}
PARSE_ERROR = "There was an error parsing the body"  # FastAPI's detail for a body read that failed


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
        name = part.field_name
        if part.file is None:
            if name in self._files:  # no filename: Starlette reads it as text
                raise APIError(422, name, f"send it as a file: a part with a filename (curl -F '{name}=@FILE')")
            return
        if name not in self._files:  # refused later anyway: not stored first
            takes = ", ".join(self._files)
            raise APIError(422, name, f"not a file field; this endpoint takes files in {takes}")
        most, self._limit = self._files[name]
        index = self._counts[name]
        self._counts[name] += 1
        if index >= most:
            why = "given more than once; send it once" if most == 1 else f"more than {most} files; send at most {most}"
            raise APIError(422, name, why)
        self._label = f"{name}[{index}]" if most > 1 else name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._limit is not None:
            self._size += end - start
            if self._size > self._limit:
                raise APIError(413, self._label, f"larger than {self._limit} bytes")
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            super().on_part_end()
            return
        charset = self._charset  # the form's (UTF-8 unless its Content-Type names one), or the part's own
        for key, value in part.item_headers:
            if key == b"content-type" and (named := parse_options_header(value)[1].get(b"charset")):
                charset = named.decode("latin-1") if isinstance(named, bytes) else named
        try:
            text = bytes(part.data).decode(charset)
        except UnicodeDecodeError:
            raise APIError(422, part.field_name, f"not valid {charset}: send text fields as UTF-8") from None
        except (LookupError, ValueError):  # unknown, or no text encoding (hex, base64): Starlette read Latin-1
            raise APIError(422, part.field_name, f"{charset[:40]!r} is not a text encoding: send UTF-8") from None
        self.items.append((part.field_name, text))


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
                except APIError:
                    if self._drains_first():
                        await self._drain(stream)
                    raise
                except HTTPException:
                    raise
                except MultiPartException as e:
                    raise HTTPException(400, detail=e.message) from None
                except Exception as e:  # a client gone mid-body (a 499 then), a read cut: as FastAPI answers them
                    raise HTTPException(400, detail=PARSE_ERROR) from e
        return self._form

    def _drains_first(self) -> bool:
        """Whether a refused body is read to its end before the answer. Closing a connection with bytes
        unread resets it, and a client still sending never reads the answer. uvicorn drains a body of
        declared length after the answer on a kept-alive connection; it closes one the client asked to
        close, and any HTTP/1.0 one, and closes a chunked one left unread."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        chunked = "content-length" not in self.headers
        return chunked or "close" in tokens or self.scope.get("http_version") == "1.0"

    @staticmethod
    async def _drain(stream: Any) -> None:
        """Reads the rest of the body, storing nothing. Bounded as any body is: by the body limit
        (app/limits.py) and the body's pause deadline. A client gone meanwhile is a 499, as elsewhere."""
        try:
            async for _ in stream:
                pass
        except ClientDisconnect as e:
            raise HTTPException(400, detail=PARSE_ERROR) from e


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
            if request.method != "POST" or media_type(request) != "multipart/form-data":
                return await handler(request)
            form_request = BoundedFormRequest(request, limits(request.app.state.settings))
            await form_request.read_form()
            return await handler(form_request)

        return bounded

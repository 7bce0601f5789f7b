"""``X-Request-ID`` on every response, and on the service's log lines of that request.

A request that brings a sane ``X-Request-ID`` (a proxy's or a client's: 1-128 characters of
``A-Z a-z 0-9 . _ : / + = -``) keeps it; any other gets a fresh one (32 hex). While the request is
served, ``sglora.*`` log lines carry it (``[request <id>]``, through :class:`RequestIdFilter`).

An exception that no handler answered (a bug) is answered here, as long as nothing of the response
was sent: a 500 in the service's error shape whose reason names the request ID, and the traceback
logged once, under that ID, so a user's report can be matched to the log line. A request that the
server cancels at shutdown (uvicorn's graceful timeout) gets a 503 in that shape.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from contextvars import ContextVar
from urllib.parse import quote

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body

HEADER = "X-Request-ID"
_VALID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
current: ContextVar[str | None] = ContextVar("sglora_request_id", default=None)
log = logging.getLogger("sglora.app")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The request's own ID when it is sane, else a fresh one."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _VALID.match(text):
                return text
            break
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (None outside a request) and ``record.request``: `` [request <id>]``
    inside a request, else empty (for a text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current.get()
        record.request_id = rid
        record.request = f" [request {rid}]" if rid else ""
        return True


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope["headers"])
        token = current.set(rid)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when its graceful-shutdown timeout ends, and would
            # answer them with its own plain-text 500 (no ID, counted as a bug): a 503 in the service's shape.
            if started:
                raise
            body = error_body(None, f"the service stopped before this request finished; retry (request {rid})")
            await JSONResponse(body, status_code=503, headers={"Retry-After": "1"})(scope, receive, send_with_id)
            # Answered: not re-raised, which made uvicorn log a traceback per request cut off at the graceful timeout.
            asyncio.current_task().uncancel()
        except Exception as e:
            if started:  # too late for an answer: the server closes the connection and logs it
                raise
            # The path percent-encoded, as in uvicorn's access line: the server decoded it, and a %0A would start a forged line.
            method, path = scope.get("method", ""), quote(scope.get("path", ""))
            log.exception("internal error answering %s %s", method, path)
            body = error_body(None, f"internal error ({type(e).__name__}); see the service log, request {rid}")
            await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
        finally:
            current.reset(token)

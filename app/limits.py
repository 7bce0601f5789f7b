"""Request body size limit: 413 before the body is parsed or spooled to disk.

A declared ``Content-Length`` above the limit is refused before the body is read (under a limit below
:data:`REFUSED_DRAIN_BYTES`, a body within that bound is read and dropped first, so that the client reads its
413); a chunked body is counted as it streams and refused as soon as it passes the limit. The per-field limits (image bytes,
expert bytes, description length) still apply inside it.

The JSON endpoints have a lower limit of their own: the body limit is sized for uploads (hundreds of MB
by default), and a JSON body is parsed into Python objects several times its size (about 7x for a
list of small objects), before any dependency (the API key) runs.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from ``receive``; FastAPI re-raises HTTPExceptions met while reading a body, so the app's
    handler answers it (413, field ``body``)."""

    def __init__(self, limit: int):
        # Connection: close: else the server went on reading the rest of a chunked body, without a limit, to
        # reuse the connection (a declared Content-Length over the limit is refused so already).
        super().__init__(
            413, {"field": "body", "reason": f"request body larger than {limit} bytes"}, headers={"Connection": "close"}
        )


def route_path(scope: Scope) -> str:
    """The request's path as the routes see it (behind a proxy's path prefix, uvicorn --root-path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        """``path_limits``: exact paths with another limit than ``max_bytes``."""
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.path_limits.get(route_path(scope), self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                await refuse(400, "Content-Length", "not a non-negative integer", scope, receive, send, drain=False)
                return
            if length > max_bytes:
                await refuse(413, "body", f"request body larger than {max_bytes} bytes", scope, receive, send)
                return

        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise BodyTooLarge(max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as e:  # raised where no exception handler saw it
            if started:
                raise
            await refuse(413, "body", e.detail["reason"], scope, receive, send, drain=False)  # read up to the limit


# Of a body refused before it is read (a 401/403 or 429 at the gates, a 400 for the Host, a 413 of a declared
# length, a 503 over capacity), read and dropped before the answer: closing a connection with bytes unread
# resets it, and a client still sending then loses the answer (asyncio's transports drop what they had
# received). A body declared longer is not read at all (the reset cannot be avoided by reading part of it),
# nor one whose client waits for "100 Continue" before sending it (reading would ask for it).
REFUSED_DRAIN_BYTES = 1 << 20
CLIENT_CLOSED = 499  # the status a request is counted with when its client left before the answer (nginx's)


def drains(scope: Scope, limit: int = REFUSED_DRAIN_BYTES) -> bool:
    """Whether a refused request's body is read and dropped before its answer (see :data:`REFUSED_DRAIN_BYTES`)."""
    if any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope["headers"]):  # as uvicorn reads it
        return False
    declared = dict(scope["headers"]).get(b"content-length")
    try:
        return declared is None or int(declared) <= limit
    except ValueError:
        return False


async def drain_refused(receive: Receive, limit: int = REFUSED_DRAIN_BYTES) -> bool:
    """Reads and drops a request's body, up to about ``limit`` bytes; False where the client left meanwhile."""
    drained = 0
    while drained <= limit:
        try:
            message = await receive()
        except BodyTooLarge:  # a chunked body past the body limit while drained: the refusal is answered
            return True
        if message["type"] != "http.request":  # the client went
            return False
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return True


async def answer_before_body(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    """``response`` to a request whose body nothing will parse: the body drained first where :func:`drains`,
    and the connection closed after it. A client gone meanwhile is counted as one (499), not answered."""
    response.headers["Connection"] = "close"
    if drains(scope) and not await drain_refused(receive):
        await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})  # dropped by the server
        return
    await response(scope, receive, send)


async def refuse(status: int, field: str, reason: str, scope: Scope, receive: Receive, send: Send, drain: bool = True) -> None:
    """The JSON error ``status`` naming ``field``, with the connection closed; ``drain``: the body read and
    dropped first (:func:`answer_before_body`), for a request refused before its body was looked at."""
    response = JSONResponse({"detail": {"field": field, "reason": reason}}, status_code=status)
    if drain:
        await answer_before_body(response, scope, receive, send)
        return
    response.headers["Connection"] = "close"
    await response(scope, receive, send)

"""One error body for every refusal: ``{"detail": {"field": ..., "reason": ...}}``.

Request-validation errors keep that shape too (the first error names the field; all of them are
listed under ``errors``). Bad input is always a 4xx; a 500 means a bug or a broken disk, a 503 a service
that cannot answer now (starting, stopping, out of memory): retry after ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.metrics import Metrics
from app.worker import Overloaded, ShuttingDown, WorkerTimeout
from sglora.devices import error_line

log = logging.getLogger("sglora.app")
# Sources FastAPI puts first in a validation error's location; the field is what follows.
_LOC_SOURCES = ("body", "query", "path", "header", "cookie", "form")
OUT_OF_MEMORY = "out of memory: the service could not allocate what this request needs now; retry later"
# What a framework-raised HTTP error (routing, body parsing, body size) is about.
_HTTP_ERROR_FIELDS = {400: "body", 404: "path", 405: "method", 413: "body", 415: "Content-Type"}


class APIError(Exception):
    def __init__(self, status: int, field: str | None, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.field = field
        self.reason = reason
        self.headers = headers


def error_body(field: str | None, reason: str, **extra: Any) -> dict:
    return {"detail": {"field": field, "reason": reason, **extra}}


def _field_of(loc: tuple | list) -> str:
    parts = list(loc)
    if parts and parts[0] in _LOC_SOURCES:
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _error_item(err: dict) -> dict:
    if err.get("type") == "json_invalid":  # loc is ("body", <character position>)
        loc = err.get("loc", ())
        where = f" at character {loc[-1]}" if len(loc) > 1 else ""
        return {"field": "body", "reason": f"not valid JSON{where}: {err.get('ctx', {}).get('error', 'decode error')}"}
    return {"field": _field_of(err.get("loc", ())), "reason": str(err.get("msg", "invalid")).removeprefix("Value error, ")}


def note_out_of_memory(metrics: Metrics | None, where: str, e: BaseException) -> None:
    """Counts (``sglora_rejected_total{reason="out_of_memory"}``) and logs, in one line, a request or a batch
    item refused for want of memory; ``where``: what was being answered."""
    if metrics is not None:
        metrics.rejected.labels(reason="out_of_memory").inc()
    log.warning("out of memory %s: %s", where, error_line(e))


def overloaded_response(retry_after_s: int) -> JSONResponse:
    """The 429 of a full model queue (:class:`Overloaded`), with ``Retry-After``."""
    return JSONResponse(
        error_body(None, "model is overloaded: the request queue is full, retry later"),
        status_code=429,
        headers={"Retry-After": str(retry_after_s)},
    )


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.field, e.reason), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = [_error_item(err) for err in e.errors()]
        first = errors[0] if errors else {"field": "body", "reason": "invalid request"}
        return JSONResponse(error_body(first["field"], first["reason"], errors=errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # Framework errors (unknown path, wrong method, unparsable or too large body) in the same shape.
        if isinstance(e.detail, dict) and "reason" in e.detail:
            field, reason = e.detail.get("field"), str(e.detail["reason"])
        else:
            field, reason = _HTTP_ERROR_FIELDS.get(e.status_code), str(e.detail)
        if e.status_code == 405:
            reason = f"{request.method} is not allowed on {request.url.path}"
        elif e.status_code == 404 and field == "path":
            reason = f"nothing at {request.url.path}"
        elif e.status_code == 400 and e.__cause__ is not None:  # FastAPI's "error parsing the body": say which
            reason = f"{reason}: {e.__cause__}"
        return JSONResponse(error_body(field, reason), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        # A bug, never bad input. The app's own bugs are answered (and logged) by RequestIdMiddleware with the
        # request ID; this is the last resort beyond it. Starlette re-raises after it, so the server logs the traceback.
        return JSONResponse(error_body(None, f"internal error ({type(e).__name__}); see the service log"), status_code=500)

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, e: Overloaded) -> JSONResponse:
        return overloaded_response(retry_after_s)

    @app.exception_handler(torch.OutOfMemoryError)  # a GPU's, or the CPU allocator's in a model job (app/worker.py)
    @app.exception_handler(MemoryError)
    async def _out_of_memory(request: Request, e: Exception) -> JSONResponse:
        # Not a bug and not bad input: the device (or the host) lacked memory for this request at this moment,
        # as beside a burst or another process on the same GPU. Nothing was changed; a retry may pass.
        service = getattr(request.app.state, "service", None)
        note_out_of_memory(
            None if service is None else service.metrics, f"answering {request.method} {quote(request.url.path)}", e
        )
        return JSONResponse(error_body(None, OUT_OF_MEMORY), status_code=503, headers={"Retry-After": str(retry_after_s)})

    @app.exception_handler(WorkerTimeout)
    async def _timeout(_: Request, e: WorkerTimeout) -> JSONResponse:
        return JSONResponse(error_body(None, "the model did not answer within the request timeout"), status_code=504)

    @app.exception_handler(ShuttingDown)
    async def _closing(_: Request, e: ShuttingDown) -> JSONResponse:
        return JSONResponse(error_body(None, "the service is shutting down"), status_code=503, headers={"Retry-After": "5"})

"""One error body for every refusal: ``{"detail": {"field": ..., "reason": ...}}``.

Request-validation errors keep that shape too (the first error names the field; all of them are
listed under ``errors``). Bad input is always a 4xx; a 5xx means a bug or a broken disk.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.worker import Overloaded, ShuttingDown, WorkerTimeout

log = logging.getLogger("sglora.app")
# Sources FastAPI puts first in a validation error's location; the field is what follows.
_LOC_SOURCES = ("body", "query", "path", "header", "cookie", "form")


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


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.field, e.reason), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field_of(err.get("loc", ())), "reason": err.get("msg", "invalid")} for err in e.errors()]
        first = errors[0] if errors else {"field": "body", "reason": "invalid request"}
        return JSONResponse(error_body(first["field"], first["reason"], errors=errors), status_code=422)

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, e: Overloaded) -> JSONResponse:
        return JSONResponse(
            error_body(None, "model is overloaded: the request queue is full, retry later"),
            status_code=429,
            headers={"Retry-After": str(retry_after_s)},
        )

    @app.exception_handler(WorkerTimeout)
    async def _timeout(_: Request, e: WorkerTimeout) -> JSONResponse:
        return JSONResponse(error_body(None, "the model did not answer within the request timeout"), status_code=504)

    @app.exception_handler(ShuttingDown)
    async def _closing(_: Request, e: ShuttingDown) -> JSONResponse:
        return JSONResponse(error_body(None, "the service is shutting down"), status_code=503, headers={"Retry-After": "5"})

"""Typed dependencies: the running service, the settings and the API / admin key checks.

All ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
dependency per request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import APIError, error_body, overloaded_response
from app.limits import answer_before_body, route_path
from app.metrics import leaf_routes
from app.service import Service
from app.settings import Settings
from app.worker import Overloaded


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_service(request: Request) -> Service:
    service: Service | None = request.app.state.service
    if service is None:
        raise APIError(503, None, "the artefacts are not loaded yet", headers={"Retry-After": "5"})
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[Service, Depends(get_service)]


# How the optional X-API-Key header is documented, by its Header() parameter and by header_parameters.
API_KEY_DOC = "an API key, when SGLORA_API_KEYS is set"


def _presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key sent, blanks around it dropped (as around the configured keys); None when none was."""
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    if authorization and authorization.lower().startswith("bearer ") and authorization[7:].strip():
        return authorization[7:].strip()
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant time: every configured key is compared (no early exit), on sha256 digests, so neither
    which key matched nor the length of a key shows in the timing."""
    p = _digest(presented)
    matched = False
    for k in keys:
        matched |= hmac.compare_digest(p, _digest(k))
    return matched


def _check(keys: list[str], presented: str | None, kind: str) -> None:
    if presented is None:
        reason = f"{kind} is required (X-API-Key header or Authorization: Bearer)"
        raise APIError(401, "X-API-Key", reason, headers={"WWW-Authenticate": 'Bearer realm="sglora"'})
    if not key_matches(presented, keys):
        raise APIError(403, "X-API-Key", f"this key is not accepted here: {kind} is required")


def check_key(settings: Settings, presented: str | None, admin: bool) -> None:
    """APIError (401, 403) unless ``presented`` is a key the route takes: an admin key for expert changes,
    an API or admin key elsewhere (anything when no API keys are configured)."""
    if admin:
        if not settings.admin_keys:
            raise APIError(403, "X-API-Key", "expert changes are disabled: no admin key is configured (SGLORA_ADMIN_KEYS)")
        _check(settings.admin_keys, presented, "an admin key (SGLORA_ADMIN_KEYS)")
    elif settings.api_keys:
        _check(settings.api_keys + settings.admin_keys, presented, "an API key")


async def require_api_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(description=API_KEY_DOC)] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """Open when no API keys are configured; admin keys are accepted too."""
    check_key(settings, _presented_key(x_api_key, authorization), admin=False)


async def require_admin_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(description="an admin key (SGLORA_ADMIN_KEYS)")] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    check_key(settings, _presented_key(x_api_key, authorization), admin=True)


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
# OpenAPI's description of what the key checks and the upload gate (UploadGateMiddleware) answer.
KEY_ERRORS: dict[int | str, dict] = {401: {"description": "API key missing"}, 403: {"description": "API key not accepted"}}
UPLOAD_BUSY: dict[int | str, dict] = {
    429: {"description": "the model queue is full, refused before the upload is parsed; retry after `Retry-After` seconds"}
}


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, lower-case ("" where it has none)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    """Whether a :func:`media_type` is JSON: application/json, or a JSON-based application/...+json."""
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def require_json_body(request: Request) -> None:
    """The JSON endpoints' body must be sent as JSON. FastAPI reads a body of another Content-Type, or of
    none, as raw bytes and refuses it as "not a valid dictionary", which hides the cause (``curl -d``
    sends application/x-www-form-urlencoded)."""
    media = media_type(request)
    if is_json(media):
        return
    sent = f"not {media}" if media else "the request had none"
    raise APIError(415, "Content-Type", f"send the body as JSON (Content-Type: application/json); {sent}")


JsonBody = Depends(require_json_body)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: an object with a key twice is refused (json.loads keeps the last value)."""
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"the key {twice!r} appears twice in one JSON object; send each field once")
    return out


class _StrictJsonRequest(Request):
    """A request whose JSON body refuses repeated keys: `{"description": "cats", "description": "dogs"}` was
    a LoRA for "dogs", as if the first had never been sent (the forms and the configs refuse a repeated field)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_unique_keys)
        return self._json


class JsonRoute(APIRoute):
    """A route whose JSON body is parsed once, before FastAPI reads it, refusing a repeated key with a 422
    (field ``body``). A body that is not valid JSON goes on to FastAPI's own 422, which names the position."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            if is_json(media_type(request)):
                request = _StrictJsonRequest(request.scope, request.receive)
                try:
                    await request.json()
                except _DuplicateKey as e:
                    raise APIError(422, "body", str(e)) from None
                except (ValueError, ClientDisconnect):  # not JSON, not UTF-8, cut short: FastAPI's own answer
                    pass
            return await handler(request)

        return strict


async def json_model_call(request: Request) -> Service:
    """The API key (as :func:`require_api_key`), a JSON body (:func:`require_json_body`) and the running
    service, in one dependency of the request alone: FastAPI solves each dependency and header parameter per
    request, and the four of /generate cost about 0.1 ms on a 2-core host (a fifth of a hit from memory).
    The routes document the headers read here with :func:`header_parameters`."""
    headers = request.headers
    check_key(request.app.state.settings, _presented_key(headers.get("x-api-key"), headers.get("authorization")), admin=False)
    await require_json_body(request)
    return await get_service(request)


JsonModelCall = Annotated[Service, Depends(json_model_call)]

# OpenAPI parameters of the headers that json_model_call and the /generate routes read themselves, as FastAPI
# documents a Header() parameter.
_HEADER_DOCS = {
    "x-api-key": API_KEY_DOC,
    "accept": "application/zip for a zipped PEFT adapter folder",
    "if-none-match": None,
}


def header_parameters(*names: str) -> dict:
    """``openapi_extra`` documenting the optional string headers ``names``."""
    params = []
    for name in names:
        schema = {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "-".join(w.capitalize() for w in name.split("-"))}
        param = {"name": name, "in": "header", "required": False, "schema": schema}
        if description := _HEADER_DOCS[name]:
            schema["description"] = param["description"] = description
        params.append(param)
    return {"parameters": params}


async def require_multipart_body(request: Request) -> None:
    """The upload endpoints' body must be multipart/form-data. FastAPI reads a JSON body there as an empty
    form and refuses it as "images: Field required", which hides the cause."""
    media = media_type(request)
    if media != "multipart/form-data":
        sent = f"not {media}" if media else "the request had none"
        raise APIError(415, "Content-Type", f"send the body as multipart/form-data (curl -F); {sent}")


MultipartBody = Depends(require_multipart_body)


async def check_form_fields(request: Request, single: tuple[str, ...], repeatable: tuple[str, ...] = ()) -> None:
    """APIError(422, name) for a form field the endpoint does not take (FastAPI ignores it silently, so a
    misspelt optional field would quietly get its default) or a single-value field sent more than once
    (FastAPI takes the last one silently)."""
    form = await request.form()  # parsed already for the endpoint's parameters: the same object
    for name in form:
        if name not in single and name not in repeatable:
            raise APIError(422, name, f"unknown field; this endpoint takes {', '.join(sorted((*single, *repeatable)))}")
    for name in single:
        if (n := len(form.getlist(name))) > 1:
            raise APIError(422, name, f"given {n} times; send it once")


ZIP, SAFETENSORS = "application/zip", "application/octet-stream"


def wants_zip(accept: str | None) -> bool:
    """Whether an Accept header asks for a zipped PEFT folder rather than the safetensors file: it names
    application/zip with a q above 0, and at least the q it gives application/octet-stream (directly, or
    through application/* or */*). q-values by RFC 9110; a range whose q does not parse is left out."""
    if not accept:
        return False
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = -1.0
        if media and 0.0 <= q <= 1.0:
            ranges[media.lower()] = max(q, ranges.get(media.lower(), 0.0))
    if ranges.get(ZIP, 0.0) <= 0.0:
        return False
    safetensors_q = next((ranges[m] for m in (SAFETENSORS, "application/*", "*/*") if m in ranges), 0.0)
    return ranges[ZIP] >= safetensors_q


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header matches ``etag`` (weak comparison, as RFC 9110 asks of it; ``*``
    matches any)."""
    if if_none_match is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or f'"{etag}"' in tags


def _key_routes(routes: list) -> list[tuple[APIRoute, bool]]:
    """(route, admin) for every route that checks a key."""
    out = []
    for route in leaf_routes(routes):
        if isinstance(route, APIRoute):
            calls, todo = set(), list(route.dependant.dependencies)
            while todo:
                d = todo.pop()
                calls.add(d.call)
                todo.extend(d.dependencies)
            if require_admin_key in calls or require_api_key in calls or json_model_call in calls:
                out.append((route, require_admin_key in calls))
    return out


class KeyGateMiddleware:
    """Checks a route's key from the request's headers before anything reads its body. FastAPI reads a body
    (and spools a multipart upload to disk) before it runs a route's dependencies: without this, a request
    without a key had an upload of up to the body limit stored, or megabytes of JSON parsed, before its 401.
    The routes' own dependencies still check (and document) the key."""

    BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._routes: list[tuple[APIRoute, bool]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in self.BODY_METHODS:
            if self._routes is None:
                self._routes = _key_routes(scope["app"].router.routes)
            for route, admin in self._routes:
                if route.matches(scope)[0] == Match.FULL:
                    headers = Headers(scope=scope)
                    try:
                        check_key(self.settings, _presented_key(headers.get("x-api-key"), headers.get("authorization")), admin)
                    except APIError as e:
                        response = JSONResponse(error_body(e.field, e.reason), e.status, headers=e.headers)
                        await answer_before_body(response, scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


class UploadGateMiddleware:
    """A 429 for an upload (``POST /retrieve``, ``POST /experts``) while the model worker's queue is full, before
    its body is parsed (a small one is drained: :func:`app.limits.answer_before_body`). The worker admits a job
    only after the handler has read, spooled and decoded the upload: under a full queue each such request held
    up to the body limit and decoded every image (20 concurrent /retrieve of 16 MB each: 18 s to their 429s,
    +400 MB) for the same 429 that /generate gives at once."""

    PATHS = frozenset({"/retrieve", "/experts"})

    def __init__(self, app: ASGIApp, retry_after_s: int) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and route_path(scope) in self.PATHS:
            worker = getattr(getattr(scope["app"].state, "service", None), "worker", None)
            try:
                if worker is not None:
                    worker.refuse_if_full()
            except Overloaded:
                await answer_before_body(overloaded_response(self.retry_after_s), scope, receive, send)
                return
        await self.app(scope, receive, send)

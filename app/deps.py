"""Typed dependencies: the running service, the settings and the API / admin key checks.

All ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
dependency per request.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import APIError
from app.service import Service
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_service(request: Request) -> Service:
    service: Service | None = request.app.state.service
    if service is None:
        raise APIError(503, None, "the artefacts are not loaded yet", headers={"Retry-After": "5"})
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[Service, Depends(get_service)]


def _presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
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
        raise APIError(401, "X-API-Key", f"{kind} is required (X-API-Key header or Authorization: Bearer)")
    if not key_matches(presented, keys):
        raise APIError(403, "X-API-Key", f"this key is not accepted here: {kind} is required")


async def require_api_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(description="an API key, when SGLORA_API_KEYS is set")] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """Open when no API keys are configured; admin keys are accepted too."""
    if settings.api_keys:
        _check(settings.api_keys + settings.admin_keys, _presented_key(x_api_key, authorization), "an API key")


async def require_admin_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(description="an admin key (SGLORA_ADMIN_KEYS)")] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    if not settings.admin_keys:
        raise APIError(403, "X-API-Key", "expert changes are disabled: no admin key is configured (SGLORA_ADMIN_KEYS)")
    _check(settings.admin_keys, _presented_key(x_api_key, authorization), "an admin key (SGLORA_ADMIN_KEYS)")


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)

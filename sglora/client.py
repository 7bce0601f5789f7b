"""A small Python client of the SG-LoRA service (httpx; no torch needed).

    from sglora.client import Client

    with Client("http://127.0.0.1:8000") as service:          # api_key="..." where the service wants one
        adapter = service.generate("a photo of a persian", seed=7)
        adapter.save("persian.safetensors")                    # the LoRA, PEFT tensor names
        service.generate_peft("a photo of a persian", "persian/", seed=7)   # adapter_config.json + weights
        scores = service.retrieve(["cat.png"], captions=["a persian"], etag=adapter.etag)

    # then: peft.PeftModel.from_pretrained(clip_model, "persian/")

The service's refusals raise :class:`ServiceError` with its status, the field it names, its reason and
the request ID (to match the service's log). A full queue (429) or a service that is starting or
draining (503) is retried after its ``Retry-After`` (at most ``retries`` times, each wait capped at
``max_wait_s``). Files are written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sglora.io import safetensors_metadata, write_bytes

# The two files of a PEFT adapter folder (sglora.export.PEFT_CONFIG / PEFT_WEIGHTS, without importing torch).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
RETRIED = (429, 503)


class ServiceError(Exception):
    """A refusal of the service: ``status``, the ``field`` it names (or None), its ``reason`` and the
    ``request_id`` of the answer."""

    def __init__(self, status: int, field: str | None, reason: str, request_id: str | None):
        where = f" ({field})" if field else ""
        rid = f" [request {request_id}]" if request_id else ""
        super().__init__(f"HTTP {status}{where}: {reason}{rid}")
        self.status, self.field, self.reason, self.request_id = status, field, reason, request_id


@dataclass(frozen=True)
class Adapter:
    """A generated LoRA: the safetensors bytes and what the service said of them."""

    data: bytes
    etag: str
    cache: str  # "hit" | "miss"
    seed: int | None
    request_id: str | None
    metadata: dict[str, str] = field(repr=False)

    @classmethod
    def from_response(cls, r: httpx.Response) -> Adapter:
        data = r.content
        metadata = safetensors_metadata(data)
        seed = r.headers.get("x-seed")
        etag, cache, request_id = r.headers["etag"].strip('"'), r.headers.get("x-cache", ""), r.headers.get("x-request-id")
        return cls(data, etag, cache, int(seed) if seed else None, request_id, metadata)

    @property
    def method(self) -> str:
        return self.metadata.get("method", "")

    @property
    def experts(self) -> list[dict[str, Any]]:
        """The chosen experts: ``[{"name", "weight" (alpha), "similarity"}]``."""
        return json.loads(self.metadata.get("experts", "[]"))

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the safetensors file (atomically); returns its path."""
        path = Path(path)
        write_bytes(path, self.data)
        return path


class Client:
    """The service at ``url``. ``http``: an ``httpx.Client`` to use instead of a new one (e.g. Starlette's
    TestClient); its base URL then applies."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
        http: httpx.Client | None = None,
    ):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self._own = http is None
        self._http = http if http is not None else httpx.Client(base_url=url, timeout=timeout)
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self.retries = retries
        self.max_wait_s = max_wait_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._http.close()

    # ---- requests --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        retried = 0
        while True:
            r = self._http.request(method, path, headers=headers, **kwargs)
            if r.status_code < 400:
                return r
            if r.status_code not in RETRIED or retried == self.retries:
                raise _error(r)
            retried += 1
            time.sleep(min(_retry_after(r), self.max_wait_s))

    def generate(
        self,
        description: str,
        *,
        method: str | None = None,
        seed: int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> Adapter:
        """A LoRA for ``description`` (safetensors with PEFT names). Without a seed the service draws one
        (``Adapter.seed``); the same request with that seed gives the same bytes."""
        r = self._request("POST", "/generate", json=_body(description, method, seed, top_k, temperature))
        return Adapter.from_response(r)

    def generate_peft(
        self,
        description: str,
        folder: str | os.PathLike,
        *,
        method: str | None = None,
        seed: int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> Path:
        """The LoRA as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``),
        written into ``folder`` (created if needed; each file atomically); returns the folder."""
        body = _body(description, method, seed, top_k, temperature)
        r = self._request("POST", "/generate", json=body, headers={"Accept": "application/zip"})
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            names = sorted(z.namelist())
            if names != sorted(PEFT_FILES):
                raise ValueError(f"the service sent a zip of {names}, not a PEFT adapter folder")
            files = {name: z.read(name) for name in PEFT_FILES}
        folder = Path(folder)
        for name, data in files.items():
            write_bytes(folder / name, data)
        return folder

    def retrieve(
        self,
        images: Sequence[str | os.PathLike | bytes | bytearray | memoryview],
        captions: Iterable[str] | None = None,
        *,
        description: str | None = None,
        etag: str | None = None,
        method: str | None = None,
        seed: int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
        zero_shot: bool = False,
    ) -> dict[str, Any]:
        """Ranks ``images`` (paths or bytes) against ``captions`` (else the description) with the LoRA of
        ``description`` or of an earlier adapter's ``etag`` applied; the service's JSON answer."""
        options = {"etag": etag, **_body(description, method, seed, top_k, temperature)}
        form: dict[str, Any] = {k: str(v) for k, v in options.items() if v is not None}
        form["zero_shot"] = "true" if zero_shot else "false"
        if captions is not None:
            if isinstance(captions, str):  # a str is an iterable of one-character captions
                raise TypeError("captions: give a list of strings (one caption per image or query), not one string")
            form["captions"] = list(captions)
        files = [("images", (f"{i}", _image_bytes(im))) for i, im in enumerate(images)]
        return self._request("POST", "/retrieve", data=form, files=files).json()

    def experts(self) -> list[dict[str, Any]]:
        """The repository's experts (name, description, ...), as ``GET /experts`` lists them under ``experts``."""
        return self._request("GET", "/experts").json()["experts"]

    def ready(self) -> dict[str, Any]:
        return self._request("GET", "/ready").json()


def _body(description: str | None, method: str | None, seed: int | None, top_k: int | None, temperature: float | None) -> dict:
    body: dict[str, Any] = {"description": description}
    for key, value in (("method", method), ("seed", seed), ("top_k", top_k), ("temperature", temperature)):
        if value is not None:
            body[key] = value
    return body


def _image_bytes(image: str | os.PathLike | bytes | bytearray | memoryview) -> bytes:
    """An image given as data (bytes-like) or as a path -> its bytes."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _error(r: httpx.Response) -> ServiceError:
    try:
        body = r.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        field, reason = detail.get("field"), str(detail.get("reason", r.reason_phrase))
    else:
        field, reason = None, r.text[:200] or r.reason_phrase
    return ServiceError(r.status_code, field, reason, r.headers.get("x-request-id"))

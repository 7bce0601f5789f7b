"""A small Python client of the SG-LoRA service (httpx; no torch needed).

    from sglora.client import Client

    with Client("http://127.0.0.1:8000") as service:          # api_key="..." where the service wants one
        adapter = service.generate("a photo of a persian", seed=7)
        adapter.save("persian.safetensors")                    # the LoRA, PEFT tensor names
        service.generate_peft("a photo of a persian", "persian/", seed=7)   # adapter_config.json + weights
        answer = service.retrieve(["cat.png"], captions=["a persian"], etag=adapter.etag)
        answer["lora"]["scores"]                                 # [image][caption] cosine similarities

    # then: peft.PeftModel.from_pretrained(clip_model, "persian/")

The service's refusals raise :class:`ServiceError` with its status, the field it names, its reason and
the request ID (to match the service's log). A full queue (429) or a service that is starting or
draining (503) is retried after its ``Retry-After``, at most ``retries`` times, each wait capped at
``max_wait_s``; a refused or timed-out connection (a server starting or restarting: uvicorn opens its port
only once the model is loaded) every second until ``connect_wait_s`` (60 s) have passed since the call
began. What still fails to connect, or outlasts ``timeout``, raises
httpx's own ``httpx.ConnectError`` / ``httpx.TimeoutException`` (a request that timed out once sent is not
sent again: the model may still be working on it). Files are written atomically (a temporary file renamed over the target).
:class:`AsyncClient` has the same calls for asyncio (``await service.generate(...)``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import io
import json
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from sglora.io import atomic_path, safetensors_metadata, write_bytes

# The two files of a PEFT adapter folder (sglora.export.PEFT_CONFIG / PEFT_WEIGHTS, without importing torch).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
RETRIED = (429, 503)
CONNECT_WAIT_S = 1.0  # before connecting again after a refused connection
_now = time.monotonic  # the refused connections' clock


class ServiceError(Exception):
    """A refusal of the service: ``status``, the ``field`` it names (or None), its ``reason`` and the
    ``request_id`` of the answer."""

    def __init__(self, status: int, field: str | None, reason: str, request_id: str | None):
        where = f" ({field})" if field else ""
        rid = f" [request {request_id}]" if request_id else ""
        super().__init__(f"HTTP {status}{where}: {reason}{rid}")
        self.status, self.field, self.reason, self.request_id = status, field, reason, request_id

    def __reduce__(self):  # across processes (multiprocessing, ProcessPoolExecutor): the arguments, not the message
        return ServiceError, (self.status, self.field, self.reason, self.request_id)


@dataclass(frozen=True)
class Adapter:
    """A generated LoRA: the safetensors bytes and what the service said of them."""

    data: bytes = field(repr=False)  # a repr of megabytes of bytes filled a log line or a notebook cell
    etag: str
    cache: str  # "hit" | "miss"
    seed: int | None
    request_id: str | None
    # Read from data's header: not compared or hashed apart from it (a dict made Adapter unhashable).
    metadata: dict[str, str] = field(repr=False, compare=False)

    @classmethod
    def from_response(cls, r: httpx.Response) -> Adapter:
        data = r.content
        metadata = safetensors_metadata(data)
        seed = r.headers.get("x-seed")
        etag, cache, request_id = _etag(r.headers["etag"]), r.headers.get("x-cache", ""), r.headers.get("x-request-id")
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


@dataclass(frozen=True)
class _Call:
    """One request of the API and what makes its answer a result; run by :class:`Client` or :class:`AsyncClient`."""

    method: str
    path: str
    kwargs: dict[str, Any]
    parse: Callable[[httpx.Response], Any]
    probe: bool = False  # asked once; a 503 with JSON is an answer too (/ready while starting or draining)


@dataclass
class _Tries:
    """What one call has been through: when it began (the refused connections' budget) and how many busy
    answers (429, 503) it has been sent again after."""

    started: float = field(default_factory=lambda: _now())
    busy: int = 0


class _Api:
    """The service's calls, written once: each builds a :class:`_Call` that ``_run`` sends (and retries) and
    parses; ``Client._run`` returns the result, ``AsyncClient._run`` a coroutine of it."""

    retries: int
    max_wait_s: float
    connect_wait_s: float
    _headers: dict[str, str]

    def _configure(self, api_key: str | None, retries: int, max_wait_s: float, connect_wait_s: float) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:  # 2.5 retried for ever
            raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")
        for name, value in (("max_wait_s", max_wait_s), ("connect_wait_s", connect_wait_s)):
            # a negative wait failed in time.sleep at the first retry; inf or nan never ended one
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if api_key and (not (api_key.isascii() and api_key.isprintable()) or " " in api_key):
            # else every call failed to encode it, or (a space) was refused by a service that holds no such key
            raise ValueError("api_key must be printable ASCII without spaces (the service's keys are)")
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self.retries = retries
        self.max_wait_s = max_wait_s
        self.connect_wait_s = connect_wait_s

    @staticmethod
    def _check_url(url: str) -> None:
        if not url.lower().startswith(("http://", "https://")):  # httpx's UnsupportedProtocol named no fix
            raise ValueError(f"url must start with http:// or https://, got {url!r}")

    def _run(self, call: _Call) -> Any:
        raise NotImplementedError

    def _step(self, call: _Call, tries: _Tries, r: httpx.Response | None, error: httpx.TransportError | None) -> tuple[bool, Any]:
        """(True, the result) or (False, seconds to wait before sending again); raises what ends the call."""
        if error is not None:  # nothing was sent: safe to send again, whatever the method
            wait = min(CONNECT_WAIT_S, self.max_wait_s)
            # A server starting loads its model before it opens its port (seconds, a minute for a large one):
            # a budget of time, not of tries (three tries a second apart gave up on a restart of 6 s).
            if call.probe or _now() - tries.started + wait > self.connect_wait_s:
                raise error
            return False, wait
        assert r is not None
        if call.probe and r.status_code in (200, 503) and r.headers.get("content-type", "").startswith("application/json"):
            return True, _parsed(call, r)
        if 200 <= r.status_code < 300 and not call.probe:  # a redirect (a proxy's login) is not the answer
            return True, _parsed(call, r)
        if call.probe or r.status_code not in RETRIED or tries.busy >= self.retries:
            raise _error(r)
        tries.busy += 1
        return False, min(_retry_after(r), self.max_wait_s)

    def _send_args(self, call: _Call) -> dict[str, Any]:
        kwargs = dict(call.kwargs)
        kwargs["headers"] = {**self._headers, **kwargs.get("headers", {})}
        return kwargs

    # ---- the API ---------------------------------------------------------------------------------
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
        body = _body(description, method, seed, top_k, temperature)
        return self._run(_Call("POST", "/generate", {"json": body}, Adapter.from_response))

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
        written into ``folder`` (created if needed; both files written in full before either replaces its old
        copy); returns the folder."""
        body = _body(description, method, seed, top_k, temperature)
        kwargs = {"json": body, "headers": {"Accept": "application/zip"}}
        return self._run(_Call("POST", "/generate", kwargs, lambda r: _write_peft_folder(r.content, Path(folder))))

    def preview(
        self,
        description: str,
        *,
        method: str | None = None,
        seed: int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> dict[str, Any]:
        """What ``generate`` would make, as the service's JSON (``POST /generate/preview``): the chosen experts
        (name, weight, similarity), the seed, the ETag and the size, without the file. Same cache and bytes:
        ``generate`` with the seed it reports gives the file with this ETag."""
        body = _body(description, method, seed, top_k, temperature)
        return self._run(_Call("POST", "/generate/preview", {"json": body}, httpx.Response.json))

    def generate_batch(self, items: Iterable[str | dict[str, Any]]) -> list[Adapter | ServiceError]:
        """One LoRA per item (a description, or a dict of ``generate``'s arguments with its ``description``),
        micro-batched together by the service; in order, each an :class:`Adapter` or, for an item the service
        refused alone (``top_k`` too large, a full queue), its :class:`ServiceError`. A malformed item refuses
        the whole call (a ServiceError naming ``items[i]...``)."""
        # A dict's None values are left out, as generate leaves out its None arguments (the service's defaults).
        body = {"items": [{"description": it} if isinstance(it, str) else _without_none(it) for it in items]}
        return self._run(_Call("POST", "/generate/batch", {"json": body}, _batch_results))

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
        if isinstance(images, str | os.PathLike | bytes | bytearray | memoryview):  # one image, not a list of them
            raise TypeError("images: give a list of images (paths or bytes), not one image")
        images = list(images)
        if not images:  # else the form went url-encoded, and the service answered 415
            raise ValueError("images: give at least one image")
        options = {"etag": etag, **_body(description, method, seed, top_k, temperature)}
        form: dict[str, Any] = {k: str(v) for k, v in options.items() if v is not None}
        form["zero_shot"] = "true" if zero_shot else "false"
        if captions is not None:
            if isinstance(captions, str):  # a str is an iterable of one-character captions
                raise TypeError("captions: give a list of strings (one caption per image or query), not one string")
            form["captions"] = list(captions)
        files = [("images", (f"{i}", _file_bytes(im))) for i, im in enumerate(images)]
        return self._run(_Call("POST", "/retrieve", {"data": form, "files": files}, httpx.Response.json))

    def experts(self, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """The repository's experts (name, description, ...), as ``GET /experts`` lists them under ``experts``:
        all, or ``limit`` of them from ``offset`` (in the repository's order)."""
        params = {"offset": offset} | ({} if limit is None else {"limit": limit})
        return self._run(_Call("GET", "/experts", {"params": params}, lambda r: r.json()["experts"]))

    def expert_file(self, name: str, part: str = "mean") -> bytes:
        """One expert's ``part`` (``mean``: its LoRA, or ``variance``) as safetensors with PEFT names, the
        format ``add_expert`` takes back (``GET /experts/{name}``)."""
        return self._run(_Call("GET", f"/experts/{quote(name, safe='')}", {"params": {"part": part}}, _safetensors))

    def add_expert(
        self,
        name: str,
        description: str,
        mean: str | os.PathLike | bytes | bytearray | memoryview,
        *,
        variance: str | os.PathLike | bytes | bytearray | memoryview | None = None,
        num_snapshots: int = 1,
    ) -> dict[str, Any]:
        """Registers an expert (``POST /experts``; needs an admin key as ``api_key``): its mean LoRA and
        optionally its variances, as paths or bytes of safetensors with PEFT names. The service's answer
        (``name``, ``action``, the new ``artifact_version``, the number of ``experts``)."""
        files = [("mean", ("mean.safetensors", _file_bytes(mean)))]
        if variance is not None:
            files.append(("variance", ("variance.safetensors", _file_bytes(variance))))
        form = {"name": name, "description": description, "num_snapshots": str(num_snapshots)}
        return self._run(_Call("POST", "/experts", {"data": form, "files": files}, httpx.Response.json))

    def remove_expert(self, name: str) -> dict[str, Any]:
        """Removes an expert (``DELETE /experts/{name}``; needs an admin key as ``api_key``)."""
        return self._run(_Call("DELETE", f"/experts/{quote(name, safe='')}", {}, httpx.Response.json))

    def ready(self) -> dict[str, Any]:
        """``/ready``'s answer, asked once (a readiness probe is not retried): ``status`` is "ready", or
        "starting" / "draining" (the service's 503). A refused connection raises ``httpx.ConnectError``."""
        return self._run(_Call("GET", "/ready", {}, httpx.Response.json, probe=True))


class Client(_Api):
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
        connect_wait_s: float = 60.0,
    ):
        self._configure(api_key, retries, max_wait_s, connect_wait_s)
        if http is None:
            self._check_url(url)
        self._own = http is None
        self._http = http if http is not None else httpx.Client(base_url=url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._http.close()

    def _run(self, call: _Call) -> Any:
        tries = _Tries()
        while True:
            r, error = None, None
            try:
                r = self._http.request(call.method, call.path, **self._send_args(call))
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # nothing was sent
                error = e
            done, value = self._step(call, tries, r, error)
            if done:
                return value
            time.sleep(value)


class AsyncClient(_Api):
    """:class:`Client` for asyncio: the same calls, each awaited (``await service.generate(...)``), on an
    ``httpx.AsyncClient`` (``http``: one to use instead of a new one). Many concurrent calls share its
    connection pool (``max_connections``)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
        max_connections: int = 100,
        http: httpx.AsyncClient | None = None,
        connect_wait_s: float = 60.0,
    ):
        self._configure(api_key, retries, max_wait_s, connect_wait_s)
        if http is None:
            self._check_url(url)
        self._own = http is None
        limits = httpx.Limits(max_connections=max_connections)
        self._http = http if http is not None else httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def _run(self, call: _Call) -> Any:
        tries = _Tries()
        while True:
            r, error = None, None
            try:
                r = await self._http.request(call.method, call.path, **self._send_args(call))
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # nothing was sent
                error = e
            done, value = self._step(call, tries, r, error)
            if done:
                return value
            await asyncio.sleep(value)


def _coroutine_of(call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    async def awaited(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
        return await call(self, *args, **kwargs)

    return awaited


# Each call a coroutine function: its arguments are checked, and its files read, when it is awaited. Called
# as _Api's, a bad argument raised at once, so in asyncio.gather the calls made before it were never awaited.
for _name, _call in list(vars(_Api).items()):
    if not _name.startswith("_") and inspect.isfunction(_call):
        setattr(AsyncClient, _name, _coroutine_of(_call))


def _write_peft_folder(data: bytes, folder: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = sorted(z.namelist())
        if names != sorted(PEFT_FILES):
            raise ValueError(f"the service sent a zip of {names}, not a PEFT adapter folder")
        files = {name: z.read(name) for name in PEFT_FILES}
    # Both written in full before either is renamed into place: an interrupted overwrite left a new config
    # beside the old weights (another rank or alpha) when each file was written in turn.
    with ExitStack() as stack:
        for name, data in files.items():
            stack.enter_context(atomic_path(folder / name)).write_bytes(data)
    return folder


def _batch_results(r: httpx.Response) -> list[Adapter | ServiceError]:
    request_id = r.headers.get("x-request-id")
    results: list[Adapter | ServiceError] = []
    for item in r.json()["results"]:
        if item["status"] != 200:
            error = item.get("error") or {}
            results.append(ServiceError(item["status"], error.get("field"), str(error.get("reason", "")), request_id))
            continue
        data = base64.b64decode(item["data"])
        results.append(Adapter(data, item["etag"], item["cache"], item["seed"], request_id, safetensors_metadata(data)))
    return results


def _without_none(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(item).items() if v is not None}


def _body(description: str | None, method: str | None, seed: int | None, top_k: int | None, temperature: float | None) -> dict:
    body: dict[str, Any] = {"description": description}
    for key, value in (("method", method), ("seed", seed), ("top_k", top_k), ("temperature", temperature)):
        if value is not None:
            body[key] = value
    return body


def _file_bytes(file: str | os.PathLike | bytes | bytearray | memoryview) -> bytes:
    """A file given as data (bytes-like) or as a path -> its bytes."""
    if isinstance(file, bytes | bytearray | memoryview):
        return bytes(file)
    return Path(file).read_bytes()


def _safetensors(r: httpx.Response) -> bytes:
    """The answer's bytes, once they read as a safetensors file (ValueError else: a proxy's page)."""
    safetensors_metadata(r.content)
    return r.content


def _etag(value: str) -> str:
    """An ETag header's value as /retrieve takes it: without quotes, nor the weak mark a proxy may add
    (``W/"..."``: a compressing proxy marks what it re-encodes)."""
    return value.removeprefix("W/").strip('"')


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _parsed(call: _Call, r: httpx.Response) -> Any:
    """``call.parse(r)``; a ServiceError where the answer is not the service's (a proxy's login page, an HTML
    error page with status 200), instead of the parser's JSON or safetensors error."""
    try:
        return call.parse(r)
    except (ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:  # json.JSONDecodeError is a ValueError
        kind = r.headers.get("content-type") or "no content type"
        reason = f"the answer to {call.method} {call.path} is not the service's ({kind}): {e}"
        raise ServiceError(r.status_code, None, reason, r.headers.get("x-request-id")) from e


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

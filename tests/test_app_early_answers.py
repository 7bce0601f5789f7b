"""Answers given before a request's body is read (a missing or wrong key, a full queue, a body over the limit),
on a real socket and to an asyncio client: the body still on its way is drained, up to a bound, before the
answer. Answered with ``Connection: close`` and the body unread, the connection was reset under the client,
and asyncio's transports dropped the answer they had already received (3 to 7 of 10 such requests)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from app_helpers import uvicorn_in_thread

from app.http_protocol import BoundedHttpToolsProtocol
from app.limits import REFUSED_DRAIN_BYTES
from app.main import create_app

TRIES = 10
BODY = 480_000  # what an image upload is: well within the drain bound, far beyond the socket's buffers


@pytest.fixture(scope="module")
def server(make_settings):
    """(port, app) of the service under uvicorn on the project's protocol, with keys and a JSON body limit."""
    settings = make_settings(api_keys=["user-key"], admin_keys=["admin-key"], retry_after_s=2, max_json_bytes=4096)
    app = create_app(settings)
    for port in uvicorn_in_thread(app, http=BoundedHttpToolsProtocol):
        yield port, app


async def _statuses(port: int, build) -> list[tuple[int, str]]:
    """``TRIES`` requests one after another from an asyncio client: (status, Retry-After) each, or (0, the
    transport error) where the answer was lost."""
    out = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for _ in range(TRIES):
            try:
                r = await client.send(build(client))
                out.append((r.status_code, r.headers.get("retry-after", "")))
            except httpx.TransportError as e:
                out.append((0, type(e).__name__))
    return out


def _upload(client: httpx.AsyncClient, path: str, key: str) -> httpx.Request:
    files = {"images": ("a.png", b"\x89PNG" + b"\0" * BODY, "image/png")}
    return client.build_request("POST", path, data={"description": "a red circle"}, files=files, headers={"X-API-Key": key})


def test_a_refused_key_reaches_an_asyncio_client_whose_body_was_still_on_its_way(server):
    port, _ = server
    assert asyncio.run(_statuses(port, lambda c: _upload(c, "/experts", "user-key"))) == [(403, "")] * TRIES
    assert asyncio.run(_statuses(port, lambda c: _upload(c, "/retrieve", "nobody"))) == [(403, "")] * TRIES


def test_the_full_queues_429_reaches_an_asyncio_client_whose_upload_was_still_on_its_way(server):
    port, app = server
    worker = app.state.service.worker
    worker._pending = worker.max_queue  # full
    try:
        got = asyncio.run(_statuses(port, lambda c: _upload(c, "/retrieve", "user-key")))
    finally:
        worker._pending = 0
    assert got == [(429, "2")] * TRIES


def test_a_json_body_over_its_limit_gets_its_413(server):
    port, _ = server
    body = b'{"description": "' + b"a" * 200_000 + b'"}'
    build = lambda c: c.build_request(  # noqa: E731
        "POST", "/generate", content=body, headers={"X-API-Key": "user-key", "Content-Type": "application/json"}
    )
    assert asyncio.run(_statuses(port, build)) == [(413, "")] * TRIES


def test_a_refused_body_declared_past_the_bound_is_not_read(server):
    """A refused body declared larger than the bound is not read: the server closes the connection (reading
    part of it would not spare the client the reset)."""
    port, _ = server
    declared = 64 * REFUSED_DRAIN_BYTES
    head = (
        f"POST /experts HTTP/1.1\r\nHost: x\r\nX-API-Key: user-key\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        chunk = b"x" * 65536
        try:
            while sent < declared:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < declared // 4, f"the server read {sent} of a refused body's {declared} bytes"


def test_a_refused_key_whose_chunked_body_passes_the_body_limit_is_answered_at_once(server):
    """The drain reads through the body limit: a chunked body past it (the limit below 1 MiB) raised the
    limit's 413 inside the key gate's drain, which drained again and, the body being over, waited for a
    disconnect: the request hung with no answer."""
    port, _ = server

    async def go() -> int:
        async def chunks():
            yield b'{"description": "' + b"a" * 5000 + b'"}'

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            r = await client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
            return r.status_code

    assert asyncio.run(go()) == 401


def test_a_client_waiting_for_100_continue_is_refused_without_being_asked_for_its_body(server):
    """Reading a body makes uvicorn send "100 Continue": a refusal that drained it invited the upload
    (curl sends "Expect: 100-continue" for large ones) only to close the connection on it."""
    port, _ = server
    head = (
        b"POST /experts HTTP/1.1\r\nHost: x\r\nX-API-Key: user-key\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 500000\r\nExpect: 100-continue\r\nExpect: x-other\r\n\r\n"  # uvicorn reads any of them
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        answer = b""
        while data := s.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 403 ") and b"100 Continue" not in answer, answer[:200]

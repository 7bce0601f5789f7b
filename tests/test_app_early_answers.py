"""Answers given before a request's body is read (a missing or wrong key, a full queue, a body over the limit),
on a real socket and to an asyncio client: the body still on its way is drained, up to a bound, before the
answer. Answered with ``Connection: close`` and the body unread, the connection was reset under the client,
and asyncio's transports dropped the answer they had already received (3 to 7 of 10 such requests)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from app.http_protocol import BoundedHttpToolsProtocol
from app.limits import REFUSED_DRAIN_BYTES
from app.main import create_app
from app.processes import free_port

TRIES = 10
BODY = 480_000  # what an image upload is: well within the drain bound, far beyond the socket's buffers


@pytest.fixture(scope="module")
def server(make_settings):
    """(port, app) of the service under uvicorn on the project's protocol, with keys and a JSON body limit."""
    settings = make_settings(api_keys=["user-key"], admin_keys=["admin-key"], retry_after_s=2, max_json_bytes=4096)
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=BoundedHttpToolsProtocol, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < end, "the server did not start"
        time.sleep(0.05)
    yield port, app
    uv.should_exit = True
    thread.join(30)


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


def test_the_drain_stops_at_its_bound_and_the_connection_is_closed(server):
    """A refused body larger than the bound is not read to its end: the server closes the connection after
    about REFUSED_DRAIN_BYTES, whatever the body's declared length."""
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

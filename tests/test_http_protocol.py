"""app.http_protocol: uvicorn's httptools protocol with a bound on a request's head, on a real socket."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from app.http_protocol import MAX_HEAD_BYTES, BoundedHttpToolsProtocol
from app.processes import free_port


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    size = 0
    while True:  # the whole body: its size is the answer
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(size).encode()})


@pytest.fixture(scope="module")
def port():
    port = free_port()
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http=BoundedHttpToolsProtocol, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end
        time.sleep(0.01)
    yield port
    server.should_exit = True
    thread.join(10)


def _exchange(port: int, chunks: list[bytes]) -> bytes:
    """Sends the chunks (a pause between each, so that they arrive as separate reads) and returns all the
    server answered until it closed the connection or fell silent."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for c in chunks:
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):  # closed on us: what it answered is read below
                break
            time.sleep(0.002)
        s.settimeout(1)
        out = b""
        try:
            while data := s.recv(65536):
                out += data
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_a_head_past_the_bound_is_answered_431_and_closed(port):
    """A header sent in many reads (each appended to what the parser held: quadratic CPU for a large one)
    is cut once the head passes the bound, not parsed to its end."""
    pad = b"a" * 8192
    chunks = [b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: "] + [pad] * (4 * MAX_HEAD_BYTES // len(pad))
    out = _exchange(port, chunks)  # never ended: however the reads fall, the head is incomplete past the bound
    assert out.startswith(b"HTTP/1.1 431 ") and b"connection: close" in out


def test_heads_within_the_bound_and_large_bodies_are_served(port):
    """A head near the bound, and a large body on a kept-alive connection followed by a pipelined request:
    the body's bytes are never counted as a head."""
    near = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES - 200) + b"\r\n\r\n"
    assert _exchange(port, [near[i : i + 4096] for i in range(0, len(near), 4096)]).startswith(b"HTTP/1.1 200 ")
    body = b"b" * (4 * MAX_HEAD_BYTES)
    post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    pipelined = post + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = _exchange(port, [pipelined])
    assert out.count(b"HTTP/1.1 200 ") == 2 and str(len(body)).encode() in out and b"431" not in out

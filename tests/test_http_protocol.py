"""app.http_protocol: uvicorn's httptools protocol with bounds on a request's head and on slow clients, on a
real socket."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import logging
import os
import socket
import time

import pytest
from app_helpers import uvicorn_in_thread

from app import http_protocol
from app.http_protocol import MAX_HEAD_BYTES, BoundedHttpToolsProtocol


async def _app(scope, receive, send):
    if scope["type"] == "websocket":  # an echo
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text") or ""})
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/host":  # the Host header the app reads
        host = b",".join(v for k, v in scope["headers"] if k == b"host")
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(host))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": host})
        return
    if scope["path"] == "/late":  # takes the body up only after a while (a request waiting for the model)
        await asyncio.sleep(1.5)
    size = 0
    while True:  # the whole body: its size is the answer
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/slow-answer":  # an answer that takes a while, as a streamed one
        await send({"type": "http.response.body", "body": b"part-", "more_body": True})
        await asyncio.sleep(1.5)
    await send({"type": "http.response.body", "body": str(size).encode()})


def _serve(protocol: type[BoundedHttpToolsProtocol]):
    ws = "wsproto" if importlib.util.find_spec("wsproto") else "none"
    yield from uvicorn_in_thread(_app, start_s=10, http=protocol, ws=ws, lifespan="off")


@pytest.fixture(scope="module")
def port():
    yield from _serve(BoundedHttpToolsProtocol)


# Deadlines short enough for a test, long against a loaded machine's scheduling hiccups.
HEAD_S, BODY_S = 0.5, 1.0


@pytest.fixture(scope="module")
def quick_port():
    yield from _serve(BoundedHttpToolsProtocol.with_timeouts(HEAD_S, BODY_S))


def _exchange(port: int, chunks: list[bytes], pause: float = 0.002, silence: float = 1) -> bytes:
    """Sends the chunks (``pause`` between each, so that they arrive as separate reads) and returns all the
    server answered until it closed the connection or fell silent for ``silence`` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for c in chunks:
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):  # closed on us: what it answered is read below
                break
            time.sleep(pause)
        s.settimeout(silence)
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


def _closed_after(port: int, chunks: list[bytes]) -> tuple[bytes, float]:
    """Sends the chunks, then waits without sending: (what the server answered, seconds until it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for c in chunks:
            s.sendall(c)
        start = time.monotonic()
        out = b""
        while data := s.recv(65536):  # until the server closes (the socket's timeout fails the test)
            out += data
        return out, time.monotonic() - start


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        ([], "head_timeout"),  # a connection that never sends a byte
        ([b"GET / HTTP/1.1\r\nHost: x\r\n"], "head_timeout"),  # a head never ended
        ([b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", b"b" * 10], "body_timeout"),  # a body that stalls
    ],
    ids=["silent", "head", "body"],
)
def test_a_client_too_slow_is_answered_408_and_closed(quick_port, sent, reason):
    """uvicorn bounded only the idle wait between two requests: these held a connection (a body: its request's
    task) for good. Each is cut once its deadline passes and counted by reason."""
    before = dict(http_protocol.closed)
    out, waited = _closed_after(quick_port, sent)
    assert out.startswith(b"HTTP/1.1 408 ") and b"connection: close" in out
    assert (b"headers not received" if reason == "head_timeout" else b"request body paused") in out
    assert waited < 5
    assert http_protocol.closed[reason] == before[reason] + 1


def test_a_slow_body_that_keeps_moving_and_a_kept_alive_connection_are_served(quick_port):
    """The body deadline is a pause between reads, not a total: an upload on a slow link is served. The head
    deadline does not run while a kept-alive connection waits for its next request."""
    body = b"b" * 30
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    out = _exchange(quick_port, [head] + [body[i : i + 1] for i in range(len(body))], pause=BODY_S / 10)
    assert out.startswith(b"HTTP/1.1 200 ") and b"\r\n30\r\n" in out  # 3 s in all, 3x the deadline
    with socket.create_connection(("127.0.0.1", quick_port), timeout=5) as s:
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(2 * HEAD_S)  # within uvicorn's keep-alive (5 s)


def test_a_body_the_app_has_not_taken_up_yet_is_not_the_client_s_pause(quick_port):
    """A body larger than uvicorn's buffer waits, reading paused, until the app reads it (here 1.5 s, a request
    queued for the model): the client is not cut meanwhile."""
    body = b"b" * (4 << 20)
    out = _exchange(quick_port, [b"POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body], silence=5)
    assert out.startswith(b"HTTP/1.1 200 ") and b"\r\n%d\r\n" % len(body) in out


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        BoundedHttpToolsProtocol.with_timeouts(0, 1)


def _read_until_closed(s: socket.socket) -> bytes:
    out = b""
    while data := s.recv(65536):
        out += data
    return out


def test_a_client_waiting_for_100_continue_is_not_pausing(quick_port):
    """uvicorn sends ``100 Continue`` when the app first reads the body (here after 1.5 s, longer than the body
    deadline): the client's wait for it is not a pause of its body, which gets the whole deadline from there."""
    with socket.create_connection(("127.0.0.1", quick_port), timeout=10) as s:
        s.sendall(b"POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        time.sleep(BODY_S / 2)
        s.sendall(b"hello")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_a_stalled_pipelined_body_is_answered_after_the_answer_ahead_of_it(quick_port):
    """A request pipelined behind one whose answer takes longer than the body deadline: its 408 came in the
    middle of that answer, and cut it. Now the answer ahead ends whole, then the stalled body gets its 408."""
    with socket.create_connection(("127.0.0.1", quick_port), timeout=10) as s:
        s.sendall(
            b"POST /slow-answer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
        )
        out = _read_until_closed(s)
    first, _, rest = out.partition(b"0\r\n\r\n")  # the end of the first (chunked) answer
    assert first.startswith(b"HTTP/1.1 200 ") and b"part-" in first and b"\r\n2\r\n" in first and b"408" not in first
    assert rest.startswith(b"HTTP/1.1 408 ")


def test_a_blank_line_between_requests_does_not_hold_the_connection(quick_port):
    """Any bytes cancel uvicorn's keep-alive timer, and llhttp skips a blank line between requests without
    beginning one: a connection kept alive by one CRLF was held for good. It gets the head deadline."""
    with socket.create_connection(("127.0.0.1", quick_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.1)
        s.sendall(b"\r\n")
        start = time.monotonic()
        assert _read_until_closed(s).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - start < 4  # the head deadline (0.5 s), not uvicorn's keep-alive (5 s), nor never


def test_an_open_websocket_is_not_cut_by_the_http_deadlines(quick_port):
    """An upgraded connection belongs to uvicorn's WebSocket protocol: the head deadline armed on connect
    wrote an HTTP 408 into it."""
    pytest.importorskip("wsproto")
    with socket.create_connection(("127.0.0.1", quick_port), timeout=10) as s:
        key = base64.b64encode(os.urandom(16))
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 101 ")
        time.sleep(3 * max(HEAD_S, BODY_S))
        mask = os.urandom(4)
        s.sendall(bytes([0x81, 0x82]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hi")))  # a masked "hi"
        assert s.recv(4096) == b"\x81\x02hi"


def _wait_for(condition, within: float = 5) -> None:
    end = time.monotonic() + within
    while not condition():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.01)


def test_connections_beyond_the_bound_get_a_503_with_retry_after_and_those_open_keep_being_served():
    """As nginx's ``limit_conn``: a connection opened while the most allowed are open has its request answered
    503 (the service's JSON, ``Retry-After``) and is closed; probes and scrapes are still answered on it; the
    connections already open are served as before, and once one closes a new one is served."""
    import json

    served = _serve(BoundedHttpToolsProtocol.with_timeouts(30, 60, max_connections=2, retry_after_s=7))
    port = next(served)
    refused_before = http_protocol.closed["over_capacity"]
    request = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        a = socket.create_connection(("127.0.0.1", port), timeout=5)
        b = socket.create_connection(("127.0.0.1", port), timeout=5)
        for s in (a, b):
            s.sendall(request)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # a probe: answered, the connection kept
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
            c.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            out = _read_until_closed(c)
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 7" in head.lower() and b"connection: close" in head.lower()
        assert "most connections (2)" in json.loads(body)["detail"]["reason"]
        assert http_protocol.closed["over_capacity"] == refused_before + 1
        a.sendall(request)  # an open one is still served
        assert a.recv(65536).startswith(b"HTTP/1.1 200 ")
        opened = http_protocol.open_connections()
        b.close()
        _wait_for(lambda: http_protocol.open_connections() == opened - 1)
        assert _exchange(port, [request], silence=0.5).startswith(b"HTTP/1.1 200 ")
        a.close()
    finally:
        next(served, None)


def test_a_websocket_upgrade_is_counted_while_open_and_over_the_bound_gets_the_503():
    """An upgraded connection passes to uvicorn's WebSocket protocol and its HTTP protocol's connection_lost is
    never called: a gauge counted in the HTTP protocol kept it for good, or dropped it while the bound still
    counted it. Over the bound, an upgrade reached the app (its 403) instead."""
    pytest.importorskip("wsproto")
    served = _serve(BoundedHttpToolsProtocol.with_timeouts(30, 60, max_connections=1, retry_after_s=3))
    port = next(served)

    def upgrade(s: socket.socket) -> None:
        key = base64.b64encode(os.urandom(16))
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    access = logging.getLogger("uvicorn.access")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        refused_before = http_protocol.closed["over_capacity"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as ws:
            upgrade(ws)
            assert ws.recv(4096).startswith(b"HTTP/1.1 101 ")
            assert http_protocol.open_connections() == 1  # this server's one connection, as the bound counts it
            with socket.create_connection(("127.0.0.1", port), timeout=5) as over:  # the WebSocket still holds one
                upgrade(over)
                head = _read_until_closed(over).partition(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 503 ") and b"retry-after: 3" in head
            assert http_protocol.closed["over_capacity"] == refused_before + 1
            assert [line for line in lines if line.endswith('"GET /ws HTTP/1.1" 503')], lines  # its access line
        _wait_for(lambda: http_protocol.open_connections() == 0)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
        next(served, None)


def test_a_target_in_absolute_form_names_the_host_the_app_reads(quick_port):
    """RFC 9112 3.2.2: with ``GET http://name/path`` the server ignores the Host header and uses the target's.
    The app read the Host header, so the Host check let a target naming any host through."""
    for target, host, seen in (
        (b"http://evil.test/host", b"localhost", b"evil.test"),
        (b"http://[::1]:8000/host?x=1", b"localhost", b"[::1]:8000"),
        (b"https://user:pw@a.example:443/host", None, b"a.example:443"),
        (b"/host", b"localhost", b"localhost"),  # origin form: as sent
    ):
        head = b"GET " + target + b" HTTP/1.1\r\n" + (b"Host: " + host + b"\r\n" if host else b"") + b"\r\n"
        answer = _exchange(quick_port, [head], silence=0.3)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n" + seen), answer


def test_one_client_address_is_bounded_apart_and_others_are_still_served():
    """SGLORA_MAX_CLIENT_CONNECTIONS: the bound on the whole process let one client take every connection.
    A third connection from one address gets the 503 (its own reason); another address is served."""
    import json

    served = _serve(BoundedHttpToolsProtocol.with_timeouts(30, 60, max_connections=100, max_client_connections=2))
    port = next(served)
    refused_before = dict(http_protocol.closed)
    request = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        mine = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        for s in mine:
            s.sendall(request)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            third.sendall(request)
            head, _, body = _read_until_closed(third).partition(b"\r\n\r\n")
        assert (
            head.startswith(b"HTTP/1.1 503 ")
            and "this client holds its most connections (2)" in json.loads(body)["detail"]["reason"]
        )
        assert http_protocol.closed["client_over_capacity"] == refused_before["client_over_capacity"] + 1
        assert http_protocol.closed["over_capacity"] == refused_before["over_capacity"]
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as other:
            other.sendall(request)  # another address: its own count
            assert other.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert http_protocol.client_connections["127.0.0.1"] == 2
        mine[0].close()
        _wait_for(lambda: http_protocol.client_connections["127.0.0.1"] == 1)
        assert _exchange(port, [request], silence=0.5).startswith(b"HTTP/1.1 200 ")  # room again
        mine[1].close()
        _wait_for(lambda: "127.0.0.1" not in http_protocol.client_connections)
    finally:
        next(served, None)


@pytest.mark.parametrize(
    "address, key",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same subscriber's /64
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64: another client
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: the IPv4 client
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
        (None, ""),
        ("", ""),
        ("not-an-address", "not-an-address"),
    ],
)
def test_clients_are_counted_by_ipv4_address_or_ipv6_slash_64(address, key):
    """A host given an IPv6 /64 can open connections from any of its 2**64 addresses: counted per exact
    address, SGLORA_MAX_CLIENT_CONNECTIONS bounded none of them."""
    assert http_protocol.client_key(address) == key


def test_the_connection_bound_must_not_be_negative():
    with pytest.raises(ValueError, match=">= 0"):
        BoundedHttpToolsProtocol.with_timeouts(1, 1, max_connections=-1)
    with pytest.raises(ValueError, match=">= 0"):
        BoundedHttpToolsProtocol.with_timeouts(1, 1, max_client_connections=-1)


def test_the_open_file_limit_is_raised_for_the_connections_allowed_or_the_shortfall_said(monkeypatch, caplog):
    import resource

    from app import serve

    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.update(now=value))
    serve.allow_open_files(1000)
    assert limits["now"] == (1000 + serve.OTHER_FILES, 4096)  # raised to what is needed, within the hard limit
    assert not caplog.records
    limits["now"] = (1024, 1100)
    serve.allow_open_files(1000)
    assert limits["now"] == (1100, 1100)
    assert "open files are limited to 1100" in caplog.text and "SGLORA_MAX_CONNECTIONS=1000" in caplog.text
    limits["now"] = (1024, 1100)
    serve.allow_open_files(0)  # unbounded: left as it is
    assert limits["now"] == (1024, 1100)


def test_a_body_sent_on_a_connection_over_the_bound_is_read_before_the_503():
    """The 503 closed the connection with the body unread: the client, still sending (urllib sends it all
    before it reads), got a reset instead of the answer and its Retry-After."""
    import urllib.error
    import urllib.request

    served = _serve(BoundedHttpToolsProtocol.with_timeouts(30, 60, max_connections=1, retry_after_s=4))
    port = next(served)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
            held.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
            request = urllib.request.Request(f"http://127.0.0.1:{port}/upload", data=bytes(900_000), method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=10)
            assert e.value.code == 503 and e.value.headers["Retry-After"] == "4"
    finally:
        next(served, None)


def test_a_handed_connection_tells_its_supervisor_once_when_it_closes_websocket_upgrades_included():
    """``--workers N``: a worker reports each handed connection's close (app.workers.HandedConnections), for
    the supervisor's count of its open connections; after an upgrade the WebSocket protocol gets the loss,
    and a close it did not report would leave the worker counted busier for good."""
    pytest.importorskip("wsproto")
    import threading

    import uvicorn
    from uvicorn.server import ServerState

    from app.workers import HandedConnections

    config = uvicorn.Config(_app, http=BoundedHttpToolsProtocol, ws="wsproto", lifespan="off", log_level="warning")
    config.load()
    state = ServerState()
    supervisor, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor.settimeout(5)
    listener = socket.create_server(("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handed = HandedConnections(worker)

    async def start() -> None:
        handed.start(lambda: config.http_protocol_class(config=config, server_state=state, app_state={}))

    def hand() -> socket.socket:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        conn, _ = listener.accept()
        with conn:
            socket.send_fds(supervisor, [b"c"], [conn.fileno()])
        return client

    try:
        asyncio.run_coroutine_threadsafe(start(), loop).result(5)
        assert supervisor.recv(16) == b"R"
        with hand() as client:  # plain HTTP
            client.sendall(b"GET /size HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _read_until_closed(client).startswith(b"HTTP/1.1 200 ")
        assert supervisor.recv(16) == b"C"
        with hand() as client:  # upgraded
            key = base64.b64encode(os.urandom(16))
            client.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert client.recv(4096).startswith(b"HTTP/1.1 101 ")
        assert supervisor.recv(16) == b"C"
        supervisor.settimeout(0.5)
        with pytest.raises(TimeoutError):
            supervisor.recv(16)  # once each
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        listener.close()
        supervisor.close()
        worker.close()

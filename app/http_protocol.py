"""uvicorn's httptools protocol with bounds on how much and how slowly a client may send.

httptools, the parser uvicorn picks where it is installed (faster than h11, less CPU per request), caps
no header, and uvicorn appends each chunk of a header's value to what it holds: a 96 MiB header sent by a
client without any key cost ~10 s of the event loop's CPU, stalling every request meanwhile (h11 caps a
head at 16 KiB). Here a head still incomplete past :data:`MAX_HEAD_BYTES` is answered 431 and the
connection closed (a head that arrives whole in one read, parsed once, is let through).

uvicorn also bounds no time but the idle wait between two requests of a kept-alive connection: a
connection that sends nothing, a head sent a byte at a time or a body that stalls halfway each held a
connection, its buffers and (for a body) the request's task for good. Here, as nginx's
``client_header_timeout`` and ``client_body_timeout`` do:

- a request's head must be complete within ``head_timeout_s`` of the connection's opening or of the
  request's first byte (a kept-alive connection's wait for that byte stays uvicorn's ``timeout_keep_alive``);
- a body must not pause longer than ``body_timeout_s`` between two reads (a large upload on a slow link
  is fine as long as it moves). A pause that is the server's is not counted: the body waiting in uvicorn's
  buffer until the request is taken up, a client waiting for the ``100 Continue`` that uvicorn sends when
  the app first reads, a pipelined request behind one still being answered.

Either is answered 408 and the connection closed (only closed where an answer has begun). Bytes between
requests that begin none (llhttp skips blank lines there) arm the head deadline: uvicorn's keep-alive
timer, which any bytes cancel, held such a connection for good.

And it bounds how many connections are open, as nginx's ``limit_conn`` does: a connection opened while
``max_connections`` others are open has its first request answered 503 with ``Retry-After`` and is closed
(uvicorn's ``limit_concurrency`` answers such a request a plain-text 503 without ``Retry-After``, and
refuses the requests of connections already open too). ``/health``, ``/ready`` and ``/metrics`` are still
answered on it: probes and scrapers see the service, not its load.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections import Counter

import httptools
from uvicorn._types import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr

from app.limits import drain_refused, drains

# Request line and headers together; browsers send a few KiB, proxies commonly allow 8-64 KiB.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 60.0

# Connections this process's protocol cut, by reason (the app's sglora_connections_closed_total reads it):
# no request reaches the app, so its request metrics never see them.
CLOSE_REASONS = ("head_too_large", "head_timeout", "body_timeout", "over_capacity", "client_over_capacity")
closed: Counter[str] = Counter(dict.fromkeys(CLOSE_REASONS, 0))
# The server's set of open connections, HTTP and upgraded alike: what the bound counts (set on the first
# connection; uvicorn adds a connection when it opens and drops it when it is lost, WebSockets included).
_connections: set | None = None


def open_connections() -> int:
    """Connections this process holds open (sglora_open_connections): the count the bound compares."""
    return len(_connections) if _connections is not None else 0


# HTTP connections open by client (SGLORA_MAX_CLIENT_CONNECTIONS, keyed by client_key); an upgraded one leaves it.
client_connections: Counter[str] = Counter()


def client_key(address: str | None) -> str:
    """What SGLORA_MAX_CLIENT_CONNECTIONS counts a connection under: an IPv4 address as it is, an IPv6
    address by its /64 (one subscriber's prefix: a host given one picks any of its 2**64 addresses, so a
    bound per exact address would not bound it), an IPv4-mapped IPv6 address as the IPv4 one; "" for a
    connection without an address (a Unix socket)."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # without an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# Answered on a connection over capacity: probes and scrapers (their paths as sent).
UNBOUNDED_PATHS = frozenset({b"/health", b"/ready", b"/metrics"})
OVER_CAPACITY_LOG_S = 10.0  # at most one warning this often while connections are refused

log = logging.getLogger("sglora.app")


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes received while a request's head is incomplete: only chunks that arrive with a head
    already in progress (a chunk that ends a body and starts the next pipelined request is not counted, so
    a large body is never mistaken for a head). A head is cut within :data:`MAX_HEAD_BYTES` plus two reads.

    The deadlines are class attributes: :meth:`with_timeouts` makes a subclass with others."""

    head_timeout_s: float = HEAD_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_connections: int = 0  # 0: unbounded
    max_client_connections: int = 0  # per client (client_key); 0: unbounded
    retry_after_s: int = 1

    _over_capacity: str | None = None  # why its requests are refused: over_capacity, client_over_capacity
    _peer: str | None = None  # the client_key it is counted under, until it is lost or upgraded
    _head: int | None = 0  # bytes of the head in progress; None once its headers are complete
    _upgraded = False  # handed to the WebSocket protocol
    _heading = False  # a request's head is being received
    _in_body = False  # a request's body is being received
    _watched: RequestResponseCycle | None = None  # the request whose app's reads restart the body's pause
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeouts(
        cls,
        head_timeout_s: float,
        body_timeout_s: float,
        max_connections: int = 0,
        retry_after_s: int = 1,
        max_client_connections: int = 0,
    ) -> type[BoundedHttpToolsProtocol]:
        if head_timeout_s <= 0 or body_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if max_connections < 0 or retry_after_s < 0 or max_client_connections < 0:
            raise ValueError("max_connections, max_client_connections and retry_after_s must be >= 0")
        attrs = {
            "head_timeout_s": head_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
            "max_client_connections": max_client_connections,
            "retry_after_s": retry_after_s,
        }
        return type(cls.__name__, (cls,), attrs)

    # ---- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        global _connections
        super().connection_made(transport)
        _connections = self.connections
        # this one included: the connections the server holds (a closed one leaves the set when it is lost)
        if 0 < self.max_connections < len(self.connections):
            self._over_capacity = "over_capacity"
        if self.max_client_connections:
            self._peer = client_key(self.client[0] if self.client else None)
            client_connections[self._peer] += 1
            if self._over_capacity is None and client_connections[self._peer] > self.max_client_connections:
                self._over_capacity = "client_over_capacity"
        self._arm_head()  # a connection that never sends a byte is held no longer than a slow head

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head()
        self._cancel_body()
        self._uncount_peer()
        super().connection_lost(exc)

    def _uncount_peer(self) -> None:
        if self._peer is not None:
            client_connections[self._peer] -= 1
            if client_connections[self._peer] <= 0:
                del client_connections[self._peer]
            self._peer = None

    def handle_websocket_upgrade(self) -> None:
        """The connection passes to uvicorn's WebSocket protocol, which has its own pings and timeouts: this
        one's deadlines no longer apply (they cut an open WebSocket with an HTTP 408); it stays in the count,
        as uvicorn's WebSocket protocol, but leaves its client's (this protocol's connection_lost is not called
        after an upgrade). An upgrade over capacity is refused as any request is (uvicorn hands it to the app
        without on_headers_complete's cycle), with its access-log line written here."""
        self._cancel_head()
        self._cancel_body()
        self._heading = self._in_body = False
        self._head = None
        self._upgraded = True  # data_received, returning from the parser, arms nothing more
        if self._over_capacity:
            body = self._count_refusal()
            if self.access_log:  # as uvicorn writes the line of an answered request
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    self.url.decode("latin-1"),  # the target as sent: an upgrade's scope has no path yet
                    self.scope["http_version"],
                    503,
                )
            self.transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"retry-after: %d\r\nconnection: close\r\n\r\n" % (len(body), self.retry_after_s) + body
            )
            self.transport.close()
            return
        self._uncount_peer()
        super().handle_websocket_upgrade()

    # ---- parser callbacks ------------------------------------------------------------------------
    # The parser calls these from data_received, which arms the deadlines once the read is parsed: a request
    # whose head (and body) arrive in one read never arms one.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0
        self._heading = True

    def on_headers_complete(self) -> None:
        self._head = None
        self._heading = False
        self._cancel_head()
        self._host_from_absolute_target()
        if not self._over_capacity or self._target_path() in UNBOUNDED_PATHS:
            super().on_headers_complete()
        else:  # the request goes to the refusal instead of the app (uvicorn reads self.app here)
            app, self.app = self.app, self._refuse_over_capacity
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        # until on_message_complete, which a request without a body calls at once
        self._in_body = not self.transport.is_closing()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._watched = None
        self._cancel_body()
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        counted = self._head is not None
        super().data_received(data)
        if self._upgraded or self.transport.is_closing():
            return
        if self._in_body:  # the body moved (or its head came whole without it): its pause starts again
            self._arm_body()
            if self._watched is not self.cycle:  # before its task starts, which reads cycle.receive
                self._watched = self.cycle
                self._restart_body_on_receive(self.cycle)
        elif self._head_timer is None and (self._heading or (self.timeout_keep_alive_task is None and not self._answering())):
            # a head in progress (a kept-alive connection's next request; the first's was armed on connect), or
            # bytes that began no request (a blank line), which cancelled uvicorn's keep-alive timer
            self._arm_head()
        if not counted or self._head is None:
            return
        self._head += len(data)
        if self._head > MAX_HEAD_BYTES:
            log.warning("request head over %d bytes from %s: 431, connection closed", MAX_HEAD_BYTES, self.client)
            # pipelined behind a request still being answered: a 431 would land inside that answer
            answer = not self._answering()
            self._refuse(431, "head_too_large", f"request line and headers over {MAX_HEAD_BYTES} bytes", answer)

    # ---- deadlines -------------------------------------------------------------------------------
    def _arm_head(self) -> None:
        self._cancel_head()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def _cancel_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _restart_body_on_receive(self, cycle: RequestResponseCycle) -> None:
        """The body's pause restarts when the app asks for more of it: until then a client waiting for a
        ``100 Continue`` (sent on the app's first ``receive``) or for a pipelined request ahead of its own to
        be answered is not pausing, and gets the whole deadline from there."""
        inner = cycle.receive

        async def receive() -> ASGIReceiveEvent:
            if self._in_body and self.cycle is cycle and not self.transport.is_closing():
                self._arm_body()
            return await inner()

        cycle.receive = receive  # type: ignore[method-assign]  # read by its task, which has not started yet

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._answering():  # a pipelined head behind a request still being answered: the wait is ours
            self._arm_head()
            return
        log.warning("request head incomplete after %g s from %s: 408, connection closed", self.head_timeout_s, self.client)
        self._refuse(408, "head_timeout", f"request line and headers not received within {self.head_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or not self._in_body:
            return
        if self.flow.read_paused or self.pipeline or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            # The app has not taken the body up yet, or the client waits for its 100 Continue, or the request
            # is queued behind one still being answered: not the client's pause.
            self._arm_body()
            return
        answer = self.cycle is None or not self.cycle.response_started  # else an answer has begun: only close
        log.warning(
            "request body paused over %g s from %s: %sconnection closed", self.body_timeout_s, self.client, "408, " * answer
        )
        self._refuse(408, "body_timeout", f"request body paused over {self.body_timeout_s:g} s", answer)

    def _host_from_absolute_target(self) -> None:
        """A request target in absolute form (``GET http://name/path``) names the host: RFC 9112 (3.2.2) has the
        server ignore the Host header then and use the target's. The headers the app reads (and the Host
        check, SGLORA_ALLOWED_HOSTS) get it; a target naming another host passed a Host header allowed."""
        if self.url.startswith(b"/"):  # origin form, the usual: nothing to parse
            return
        try:
            target = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            return  # uvicorn answers it 400
        if not target.schema or not target.host:
            return
        host = b"[%s]" % target.host if b":" in target.host else target.host
        if target.port is not None:
            host += b":%d" % target.port
        self.headers[:] = [(k, v) for k, v in self.headers if k != b"host"] + [(b"host", host)]

    def _target_path(self) -> bytes | None:
        """The request target's path, as sent (uvicorn parses it in on_headers_complete)."""
        try:
            return httptools.parse_url(self.url).path
        except httptools.HttpParserInvalidURLError:
            return None  # uvicorn answers it 400

    async def _refuse_over_capacity(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        """The service's JSON 503 with ``Retry-After``; the connection is then closed (and so freed)."""
        body = self._count_refusal()
        if drains(scope) and not await drain_refused(receive):  # the client went
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.retry_after_s).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _count_refusal(self) -> bytes:
        """Counts and logs a refusal over capacity; returns its JSON body."""
        why = self._over_capacity or "over_capacity"
        closed[why] += 1
        if why == "over_capacity":
            most, whose, setting = self.max_connections, "", "SGLORA_MAX_CONNECTIONS"
            reason = f"the service holds its most connections ({most}); retry on a new one later"
        else:
            most, setting = self.max_client_connections, "SGLORA_MAX_CLIENT_CONNECTIONS"
            whose = f" by client {self._peer or 'without an address'}"
            reason = f"this client holds its most connections ({most}); close one, or retry on a new one later"
        _log_over_capacity(why, f"{most} connections open{whose}", setting, self.client)
        return json.dumps({"detail": {"field": None, "reason": reason}}).encode()

    def _refuse(self, status: int, why: str, msg: str, answer: bool = True) -> None:
        """Answers ``status`` with ``msg`` (unless ``answer`` is false: another answer is on the wire) and
        closes the connection, counted under ``why``; the request's task, if any, then reads a disconnect."""
        closed[why] += 1
        if not answer:
            self.transport.close()
            return
        phrase = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = msg.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, phrase, len(body))
            + body
        )
        self.transport.close()


_last_over_capacity_log = {"over_capacity": -OVER_CAPACITY_LOG_S, "client_over_capacity": -OVER_CAPACITY_LOG_S}


def _log_over_capacity(why: str, held: str, setting: str, client: tuple[str, int] | None) -> None:
    """One warning per :data:`OVER_CAPACITY_LOG_S` and reason while connections are refused (a flood would
    write one a request); the counts are in sglora_connections_closed_total{reason}."""
    now = time.monotonic()
    if now - _last_over_capacity_log[why] >= OVER_CAPACITY_LOG_S:
        _last_over_capacity_log[why] = now
        log.warning(
            "%s, the most allowed: a request of a newer one (%s) answered 503 and closed (%s; %d refused so far)",
            held,
            client,
            setting,
            closed[why],
        )

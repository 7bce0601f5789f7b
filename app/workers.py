"""``sglora serve --workers N``: N server processes behind one address, served as one service.

One process leaves cores idle on a CPU: its event loop and its model threads share one GIL (docs/service.md,
"Several worker processes"). With ``--workers N`` a supervisor binds the address once and starts N copies of the
single-process server (``python -m app``). Each worker loads its own copy of the weights and micro-batches the
requests of its connections. What makes them one service:

* **Connections.** The supervisor alone accepts, and hands each new connection (its file descriptor, over a
  Unix socket pair: SCM_RIGHTS) to the ready worker that holds the fewest open connections, taking turns
  on a tie (:class:`Dispatcher`). Workers tell it when they are ready, when a connection of theirs closes and
  when they drain. Left to the kernel (every worker accepting on the shared socket), connections went to
  whichever worker woke first: 32 opened at once split 20/12 as often as 16/16, and a keep-alive connection
  stays where it landed.
* **Metrics.** Each worker serves its own registry, unchanged, on a Unix socket in a private folder, from a
  thread of its own (a worker whose event loop is busy still answers). ``GET /metrics``, answered by any
  worker, reads every sibling's and sums them (:func:`merge_expositions`): counters and histograms add up, so do
  the gauges (requests in flight, queue depth, model threads, resident memory), except the ``*_info`` series
  (the largest: 1) and ``process_start_time_seconds`` and ``process_max_fds`` (the least).
  ``sglora_workers`` says how many answered. prometheus-client's multiprocess mode was not used: it has no
  Info metric and no custom collectors (the connection metrics, the GC pauses, ``process_*``).
* **Expert changes.** Every worker follows the repository on disk (``SGLORA_FOLLOW_REPOSITORY``): before it
  serves a request it compares the index's inode, size and mtime with the one it last loaded (one ``stat``)
  and loads the repository again where another process changed it. A change answered 200 by one worker is
  served by every worker from the next request on.
* **Lifetime.** SIGTERM or SIGINT to the supervisor closes the listening socket (new connections are refused)
  and is passed to every worker; each drains as a lone server does, and the supervisor exits 0 once all have; a
  supervisor killed outright sends its workers SIGTERM (``PR_SET_PDEATHSIG``). A worker that fails to start
  stops the others (status 2); one that dies while serving (killed, out of memory) stops the others too and the
  supervisor exits 1, for the orchestrator to restart the whole service: a lone worker started again would
  restart its counters while the others' went on, and the sums would go backwards.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

from sglora.cli import EXIT_USAGE

# Set by the supervisor in each worker's environment (internal: not settings).
WORKER_FD = "SGLORA_WORKER_FD"  # the worker's end of its channel to the supervisor (a Unix socket pair)
WORKER_DIR = "SGLORA_WORKER_DIR"  # the private folder of the workers' metrics sockets
WORKER_INDEX = "SGLORA_WORKER_INDEX"  # 0 .. N-1
SCRAPE_TIMEOUT_S = 2.0  # a sibling's metrics, at most
POLL_S = 0.2  # the supervisor's look at its workers
LEAST = frozenset(("process_start_time_seconds", "process_max_fds"))
# A channel's messages, one byte each: worker -> supervisor; supervisor -> worker carries a connection's fd.
READY, CLOSED, DRAINING, CONNECTION = b"R", b"C", b"D", b"c"
ACCEPT_BATCH = 64  # connections accepted a wake-up at most, then the channels are read again
ACCEPT_RETRY_S = 1.0
log = logging.getLogger("sglora.workers")


@dataclass(frozen=True)
class WorkerPlace:
    """This process's place among the supervisor's workers."""

    index: int
    count: int
    directory: Path

    @classmethod
    def from_environment(cls) -> WorkerPlace | None:
        """None outside ``--workers`` (a lone server, a test's app)."""
        directory = os.environ.get(WORKER_DIR)
        if not directory:
            return None
        return cls(int(os.environ[WORKER_INDEX]), int(os.environ.get("SGLORA_WORKERS", "1")), Path(directory))

    def socket_path(self, index: int) -> Path:
        return self.directory / f"metrics-{index}.sock"


# ---- metrics ------------------------------------------------------------------------------------------
class MetricsSocket:
    """Serves ``generate_latest(registry)`` to each connection on this worker's Unix socket, from a thread."""

    def __init__(self, registry: CollectorRegistry, path: Path) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.sendall(generate_latest(registry))

        path.unlink(missing_ok=True)
        self.path = path
        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="sglora-metrics-socket", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)


def read_socket(path: Path, timeout_s: float = SCRAPE_TIMEOUT_S) -> str | None:
    """A sibling's exposition; None where it does not answer in time (starting, stopping, gone)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(path))
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        return b"".join(chunks).decode()
    except OSError:
        return None


def merge_expositions(texts: list[str], extra: list[tuple[str, str, float]] = ()) -> bytes:
    """One exposition of several processes' (Prometheus text format): samples with the same name and labels
    summed, but the ``*_info`` gauges' largest value and :data:`LEAST`'s least. ``extra``: gauges (name,
    help, value) added."""
    families: dict[str, tuple[str, str, dict]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            _, _, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in samples:
                    samples[key] = s.value
                elif family.name.endswith("_info"):
                    samples[key] = max(samples[key], s.value)
                elif family.name in LEAST:
                    samples[key] = min(samples[key], s.value)
                else:
                    samples[key] = samples[key] + s.value
    for name, documentation, value in extra:
        families[name] = ("gauge", documentation, {(name, ()): value})

    class Merged:
        def collect(self):
            for name, (kind, documentation, samples) in families.items():
                metric = Metric(name, documentation, kind)
                metric.samples = [Sample(n, dict(labels), v) for (n, labels), v in samples.items()]
                yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def service_metrics(registry: CollectorRegistry, place: WorkerPlace) -> bytes:
    """``GET /metrics`` under ``--workers``: this worker's registry and every sibling's, summed (blocking: run it
    off the event loop)."""
    texts = [generate_latest(registry).decode()]
    for index in range(place.count):
        if index != place.index and (text := read_socket(place.socket_path(index))) is not None:
            texts.append(text)
    return merge_expositions(
        texts,
        [
            ("sglora_workers", "server processes whose metrics are summed here (sglora serve --workers)", len(texts)),
            ("sglora_workers_configured", "server processes started (sglora serve --workers)", place.count),
        ],
    )


# ---- the supervisor -----------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the supervisor dies (Linux's ``PR_SET_PDEATHSIG``), so that a
    supervisor killed outright (SIGKILL, the OOM killer) leaves no workers serving on without it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the workers outlive a killed supervisor
        pass


class Dispatcher(threading.Thread):
    """The supervisor's accepting thread: accepts the listening socket's connections once a worker is ready and
    sends each to the ready worker with the fewest open connections (taking turns on a tie), over that
    worker's channel; reads the channels' messages (:data:`READY`, :data:`CLOSED`, :data:`DRAINING`; an
    end of file: the worker is gone). :meth:`stop` ends it and closes the listening socket, so connections
    are refused from then on, as a lone server's are once it drains."""

    def __init__(self, listener: socket.socket, channels: list[socket.socket]) -> None:
        super().__init__(name="sglora-dispatch", daemon=True)
        self.listener, self.channels = listener, channels
        n = len(channels)
        self.ready, self.open = [False] * n, [0] * n
        self._turn = 0
        self._stopping = threading.Event()
        self.failed = False  # ended by an error, not by stop() or its workers' ends
        listener.setblocking(False)
        for c in channels:
            c.setblocking(False)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                live = [c for c in self.channels if c.fileno() >= 0]  # a gone worker's is closed
                watch = live + ([self.listener] if any(self.ready) else [])
                if not watch:
                    break
                readable, _, _ = select.select(watch, [], [], POLL_S)
                for s in readable:
                    if s is self.listener:
                        self._accept()
                    else:
                        self._hear(self.channels.index(s))
        except Exception:  # noqa: BLE001 - logged: the workers then get no new connections; the supervisor stops them
            log.exception("the connection dispatcher failed")
            self.failed = True
        finally:
            self.listener.close()

    def _hear(self, index: int) -> None:
        channel = self.channels[index]
        while True:
            try:
                message = channel.recv(16)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:  # the worker is gone
                self.ready[index] = False
                channel.close()
                return
            if message == READY:
                self.ready[index] = True
            elif message == CLOSED:
                self.open[index] = max(0, self.open[index] - 1)
            elif message == DRAINING:
                self.ready[index] = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # reset before it was accepted
                continue
            except OSError as e:  # out of file descriptors (EMFILE): as asyncio does, try again in a second
                log.warning("could not accept a connection: %s; trying again in %.0f s", e, ACCEPT_RETRY_S)
                self._stopping.wait(ACCEPT_RETRY_S)
                return
            with conn:
                self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        n = len(self.channels)
        order = sorted((i for i in range(n) if self.ready[i]), key=lambda i: (self.open[i], (i - self._turn) % n))
        for index in order:
            try:
                socket.send_fds(self.channels[index], [CONNECTION], [conn.fileno()])
            except BlockingIOError:  # its channel is full: a worker that does not read; try another
                continue
            except OSError:  # gone
                self.ready[index] = False
                continue
            self.open[index] += 1
            self._turn = (index + 1) % n
            return
        log.warning("no worker could take a new connection: closed it")


class HandedConnections:
    """A worker's end of its channel (:class:`Dispatcher`): serves the connections the supervisor hands it with
    the server's own protocol, as if the worker had accepted them, and tells the supervisor when it is ready,
    when one of them closes and when it drains."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._draining = False
        channel.setblocking(False)

    def start(self, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        """From the event loop, once the server is ready: the supervisor sends connections from now on."""
        self._loop = asyncio.get_running_loop()
        self._factory = protocol_factory
        self._loop.add_reader(self.channel, self._receive)
        self._tell(READY)

    def drain(self) -> None:
        """No more connections: those already sent but not read are closed with the channel."""
        self._draining = True
        if self._loop is not None:
            self._loop.remove_reader(self.channel)
        self._tell(DRAINING)

    def _tell(self, message: bytes) -> None:
        try:
            self.channel.send(message)
        except OSError:  # the supervisor is gone (the worker then gets SIGTERM), or its end is full
            pass

    def _protocol(self) -> asyncio.Protocol:
        """The server's protocol, which tells the supervisor once when its connection is lost: also where the
        connection was upgraded to a WebSocket, whose own protocol then gets the loss."""
        protocol = self._factory()
        told = False

        def report(p: asyncio.BaseProtocol) -> None:
            lost = p.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                nonlocal told
                try:
                    lost(exc)
                finally:
                    if not told:
                        told = True
                        self._tell(CLOSED)

            p.connection_lost = connection_lost  # type: ignore[method-assign]

        report(protocol)
        upgrade = getattr(protocol, "handle_websocket_upgrade", None)
        if upgrade is not None:

            def handle_websocket_upgrade() -> None:
                upgrade()
                transport = getattr(protocol, "transport", None)
                taken = transport.get_protocol() if transport is not None else protocol
                if taken is not protocol:
                    report(taken)

            protocol.handle_websocket_upgrade = handle_websocket_upgrade  # type: ignore[method-assign]
        return protocol

    def _receive(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 16, 16)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message and not fds:  # the supervisor is gone
                self._loop.remove_reader(self.channel)
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                if self._draining:
                    conn.close()
                    self._tell(CLOSED)
                    continue
                conn.setblocking(False)
                task = self._loop.create_task(self._serve(conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol, conn)
        except OSError as e:  # reset before it was taken up
            log.debug("a handed connection could not be served: %s", e)
            conn.close()
            self._tell(CLOSED)


def supervise(argv: list[str], sock: socket.socket, workers: int, graceful_timeout_s: float, backlog: int) -> int:
    """Starts ``workers`` copies of ``python -m app argv``, hands them the connections of ``sock`` (bound, not
    yet listening) and waits for them (see the module's docstring); the exit status of the service."""
    sock.listen(backlog)
    directory = Path(tempfile.mkdtemp(prefix="sglora-workers-"))
    stopping = threading.Event()
    procs: list[subprocess.Popen] = []
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(workers)]
    dispatcher = Dispatcher(sock, [mine for mine, _ in pairs])

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(procs))
        stopping.set()
        dispatcher.stop()  # no new connections: refused, as a lone server's once it drains
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for index, (_, theirs) in enumerate(pairs):
            env = {
                **os.environ,
                WORKER_FD: str(theirs.fileno()),
                WORKER_DIR: str(directory),
                WORKER_INDEX: str(index),
                "SGLORA_WORKERS": str(workers),
                "SGLORA_FOLLOW_REPOSITORY": "1",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "app", *argv], env=env, pass_fds=(theirs.fileno(),), preexec_fn=_stop_with_parent
                )
            )
            theirs.close()  # the worker holds it: its end of file is the worker's end
            if stopping.is_set():  # a signal while they started: this one too
                stop(signal.SIGTERM, None)
        log.info("started %d workers (pids %s)", workers, " ".join(str(p.pid) for p in procs))
        dispatcher.start()
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and not stopping.is_set():
                index, code = failed[0]
                if code == EXIT_USAGE:
                    log.error("worker %d could not start (status %d): stopping the others", index, code)
                    status = EXIT_USAGE
                else:
                    log.error("worker %d (pid %d) ended with status %d: stopping the others", index, procs[index].pid, code)
                    status = 1
                stop(signal.SIGTERM, None)
            elif codes.count(0) and not stopping.is_set():  # a worker that stopped on its own, as asked by nobody
                log.error("worker %d ended while serving: stopping the others", codes.index(0))
                status = 1
                stop(signal.SIGTERM, None)
            elif dispatcher.failed and not stopping.is_set():  # it logged why; no connection would come
                log.error("the connection dispatcher failed: stopping the workers")
                status = 1
                stop(signal.SIGTERM, None)
            if all(c is not None for c in codes):  # after the look above: workers that all failed at once are named
                break
            time.sleep(POLL_S)
        if status == 0:
            bad = [c for c in codes if c != 0]
            status = EXIT_USAGE if EXIT_USAGE in bad else (1 if bad else 0)
    finally:
        dispatcher.stop()
        if dispatcher.is_alive():
            dispatcher.join()
        else:
            sock.close()  # never started
        deadline = time.monotonic() + graceful_timeout_s + 30
        for p in procs:
            if p.poll() is None:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(directory, ignore_errors=True)
        for mine, theirs in pairs:
            mine.close()
            theirs.close()
    return status

"""``sglora serve --workers N``: N server processes behind one listening socket, served as one service.

One process leaves cores idle on a CPU: its event loop and its model threads share one GIL (docs/service.md,
"Several worker processes"). With ``--workers N`` a supervisor binds the address once and starts N copies of the
single-process server (``python -m app``), each handed the listening socket; the kernel gives each new
connection to whichever worker accepts it first. Each worker loads its own copy of the weights and
micro-batches the requests it accepted. What makes them one service:

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
* **Lifetime.** SIGTERM or SIGINT to the supervisor is passed to every worker, each drains as a lone server
  does, and the supervisor exits 0 once all have; a supervisor killed outright sends its workers SIGTERM
  (``PR_SET_PDEATHSIG``). A worker that fails to start stops the others (status 2); one
  that dies while serving (killed, out of memory) stops the others too and the supervisor exits 1, for the
  orchestrator to restart the whole service: a lone worker started again would restart its counters while
  the others' went on, and the sums would go backwards.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

from sglora.cli import EXIT_USAGE

# Set by the supervisor in each worker's environment (internal: not settings).
WORKER_FD = "SGLORA_WORKER_FD"  # the listening socket's file descriptor
WORKER_DIR = "SGLORA_WORKER_DIR"  # the private folder of the workers' metrics sockets
WORKER_INDEX = "SGLORA_WORKER_INDEX"  # 0 .. N-1
SCRAPE_TIMEOUT_S = 2.0  # a sibling's metrics, at most
POLL_S = 0.2  # the supervisor's look at its workers
LEAST = frozenset(("process_start_time_seconds", "process_max_fds"))
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


def supervise(argv: list[str], sock: socket.socket, workers: int, graceful_timeout_s: float) -> int:
    """Starts ``workers`` copies of ``python -m app argv`` on ``sock`` and waits for them (see the module's
    docstring); the exit status of the service."""
    directory = Path(tempfile.mkdtemp(prefix="sglora-workers-"))
    stopping = threading.Event()
    procs: list[subprocess.Popen] = []

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(procs))
        stopping.set()
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for index in range(workers):
            env = {
                **os.environ,
                WORKER_FD: str(sock.fileno()),
                WORKER_DIR: str(directory),
                WORKER_INDEX: str(index),
                "SGLORA_WORKERS": str(workers),
                "SGLORA_FOLLOW_REPOSITORY": "1",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "app", *argv], env=env, pass_fds=(sock.fileno(),), preexec_fn=_stop_with_parent
                )
            )
            if stopping.is_set():  # a signal while they started: this one too
                stop(signal.SIGTERM, None)
        log.info("started %d workers (pids %s)", workers, " ".join(str(p.pid) for p in procs))
        sock.close()  # the workers hold it; the supervisor accepts nothing
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
            if all(c is not None for c in codes):  # after the look above: workers that all failed at once are named
                break
            time.sleep(POLL_S)
        if status == 0:
            bad = [c for c in codes if c != 0]
            status = EXIT_USAGE if EXIT_USAGE in bad else (1 if bad else 0)
    finally:
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
    return status

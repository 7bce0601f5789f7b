"""The service and Redis as child processes, for the benchmarks, the load test and the tests that need
a real server (SIGTERM, a browser): a free port, start, wait until ready, stop."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict[str, str], *args: str, **popen: object) -> subprocess.Popen:
    """``python -m app`` on 127.0.0.1:``port`` with ``env`` (the whole environment) and more CLI ``args``;
    ``popen``: extra :class:`subprocess.Popen` arguments (e.g. ``stderr=subprocess.PIPE``)."""
    cmd = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux; none elsewhere): the workers of ``--workers N``'s supervisor."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_ready(base_url: str, proc: subprocess.Popen | None, timeout: float = 90.0) -> dict:
    """Polls ``base_url``/ready until it answers 200 and returns its JSON. RuntimeError if ``proc`` (None: a
    server started elsewhere) exits first, with the tail of its stderr when that was piped, or on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr is not None else None
            tail = f":\n{err[-3000:] if isinstance(err, str) else err.decode(errors='replace')[-3000:]}" if err else ""
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready{tail}")
        try:
            r = httpx.get(f"{base_url}/ready", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {base_url} was not ready within {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int | None:
    """SIGTERM (the server finishes its in-flight requests), then SIGKILL after ``timeout`` seconds.
    Returns the exit status, or None when it had to be killed."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def start_redis(port: int, workdir: Path, *args: str) -> subprocess.Popen:
    """A private ``redis-server`` on 127.0.0.1:``port`` without persistence, with more ``args``
    (e.g. ``--maxmemory 256mb``); returns once it answers PING. RuntimeError if it does not."""
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*cmd, "--dir", str(workdir), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    stop(proc, timeout=5)
    raise RuntimeError(f"redis-server did not start on port {port}")

"""``sglora serve --workers N`` (app/workers.py): several server processes behind one address, one service."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.processes import children, free_port, start_server, stop, wait_ready
from app.settings import Settings
from app.workers import Dispatcher, WorkerPlace, merge_expositions, read_socket
from tests.test_app_experts import expert_files

ADMIN = {"X-API-Key": "admin-secret"}


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_merged_exposition_sums_counters_histograms_and_gauges_but_not_info_or_start_time():
    a = """# HELP req_total requests
# TYPE req_total counter
req_total{code="200"} 3.0
# HELP lat latency
# TYPE lat histogram
lat_bucket{le="0.1"} 1.0
lat_bucket{le="+Inf"} 2.0
lat_count 2.0
lat_sum 0.5
# HELP inflight in flight
# TYPE inflight gauge
inflight 1.0
# HELP build_info build
# TYPE build_info gauge
build_info{version="1"} 1.0
# HELP process_start_time_seconds start
# TYPE process_start_time_seconds gauge
process_start_time_seconds 100.0
"""
    b = a.replace('req_total{code="200"} 3.0', 'req_total{code="200"} 4.0\nreq_total{code="429"} 1.0')
    b = b.replace("inflight 1.0", "inflight 2.0").replace("process_start_time_seconds 100.0", "process_start_time_seconds 90.0")
    merged = samples(merge_expositions([a, b], [("workers", "workers", 2)]).decode())
    assert merged[("req_total", (("code", "200"),))] == 7
    assert merged[("req_total", (("code", "429"),))] == 1  # one worker's only
    assert merged[("lat_bucket", (("le", "0.1"),))] == 2 and merged[("lat_bucket", (("le", "+Inf"),))] == 4
    assert merged[("lat_count", ())] == 4 and merged[("lat_sum", ())] == 1.0
    assert merged[("inflight", ())] == 3
    assert merged[("build_info", (("version", "1"),))] == 1  # an info series is 1, not the number of workers
    assert merged[("process_start_time_seconds", ())] == 90  # the oldest worker's
    assert merged[("workers", ())] == 2


def test_the_dispatcher_hands_connections_to_ready_workers_only_the_fewest_first():
    """In process, with the workers' ends of the channels held by the test: nothing is accepted before a
    worker is ready; a draining worker and a gone one get nothing; counts follow CLOSED."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    theirs = [t for _, t in pairs]
    for t in theirs:
        t.settimeout(5)
    dispatcher = Dispatcher(listener, [m for m, _ in pairs])
    dispatcher.start()
    clients: list[socket.socket] = []

    def connect(n: int) -> list[int]:
        """``n`` new connections: the worker each went to."""
        went = []
        for _ in range(n):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            ready = select.select([t for t in theirs if t.fileno() >= 0], [], [], 5)[0]
            assert ready, "no worker was handed the connection"
            message, fds, _, _ = socket.recv_fds(ready[0], 16, 4)
            assert message == b"c" and len(fds) == 1
            os.close(fds[0])
            went.append(theirs.index(ready[0]))
        return went

    try:
        clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))  # none ready: it waits
        assert select.select(theirs, [], [], 0.5)[0] == []
        theirs[1].send(b"R")
        assert select.select(theirs, [], [], 5)[0] == [theirs[1]]  # the waiting one, once a worker is ready
        os.close(socket.recv_fds(theirs[1], 16, 4)[1][0])
        theirs[0].send(b"R")
        theirs[2].send(b"R")
        time.sleep(0.3)  # the readiness is read before the next connection
        assert sorted(connect(5)) == [0, 0, 1, 2, 2]  # worker 1 held one already
        for _ in range(2):
            theirs[0].send(b"C")
        time.sleep(0.3)
        assert connect(2) == [0, 0]  # the fewest first
        theirs[2].send(b"D")  # draining
        theirs[1].close()  # gone
        time.sleep(0.3)
        assert connect(2) == [0, 0]
        assert not dispatcher.failed
    finally:
        dispatcher.stop()
        dispatcher.join(5)
        for c in clients:
            c.close()
        for m, t in pairs:
            m.close()
            t.close()
    assert not dispatcher.is_alive() and listener.fileno() == -1  # stop() closes the listening socket


def test_each_worker_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert Settings(workers=1).resolved_parallelism("cpu") == (7, 1)  # one core for the event loop
    assert Settings(workers=2).resolved_parallelism("cpu") == (3, 1)  # 4 cores each
    assert Settings(workers=8).resolved_parallelism("cpu") == (1, 1)
    assert Settings(workers=16).resolved_parallelism("cpu") == (1, 1)  # at least one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert Settings(workers=2).resolved_parallelism("cpu") == (1, 1)  # two cores: one model thread each


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_bad_worker_count_is_a_usage_error(value, tiny_artifacts_session):
    r = subprocess.run(
        [sys.executable, "-m", "app", "--artifacts", str(tiny_artifacts_session), "--workers", value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--workers: must be a whole number from 1 to 64" in r.stderr, r.stderr


@pytest.fixture
def workers(tiny_artifacts, shared_redis):
    """Two workers on a private copy of the tiny artefacts, one model thread each."""
    url, prefix = shared_redis
    port = free_port()
    env = {
        **os.environ,
        "SGLORA_REDIS_URL": url,
        "SGLORA_CACHE_PREFIX": prefix(),
        "SGLORA_ADMIN_KEYS": "admin-secret",
        "SGLORA_THREADS": "1",
        "SGLORA_MODEL_THREADS": "1",
    }
    args = ("--artifacts", str(tiny_artifacts), "--workers", "2")
    proc = start_server(port, env, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        # /ready answers once one worker does; the test needs both.
        end = time.monotonic() + 90
        while samples(httpx.get(f"{base}/metrics", timeout=10).text).get(("sglora_workers", ())) != 2:
            assert time.monotonic() < end, "the second worker was not ready within 90 s"
            time.sleep(0.3)
        yield proc, base, tiny_artifacts
    finally:
        stop(proc)


def test_two_workers_serve_one_address_with_summed_metrics_and_follow_each_others_expert_changes(workers):
    proc, base, root = workers
    assert len(children(proc.pid)) == 2
    body = {"description": "an orange disc", "seed": 4}
    for i in range(12):  # a new connection each: the kernel hands them to either worker
        r = httpx.post(f"{base}/generate", json={**body, "seed": i})
        assert r.status_code == 200, r.text
    # Whichever worker answers the scrape, it counts every worker's requests.
    ok = ("sglora_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "200")))
    for _ in range(6):
        m = samples(httpx.get(f"{base}/metrics").text)
        assert m[ok] == 12 and m[("sglora_workers", ())] == 2 and m[("sglora_model_threads", ())] == 2

    before = httpx.get(f"{base}/experts").json()["artifact_version"]
    files, _ = expert_files(root, scale=1.5)
    form = {"name": "disc", "description": "an orange disc", "num_snapshots": "4"}
    r = httpx.post(f"{base}/experts", data=form, files=files, headers=ADMIN)
    assert r.status_code == 201, r.text
    version = r.json()["artifact_version"]
    assert version != before
    # Every worker serves the change from the next request on, whichever made it.
    for _ in range(8):
        listed = httpx.get(f"{base}/experts").json()
        assert listed["artifact_version"] == version and "disc" in [e["name"] for e in listed["experts"]]
        r = httpx.post(f"{base}/generate", json=body)
        assert r.headers["x-artifact-version"] == version and r.headers["x-experts"].startswith("disc=")
    r = httpx.delete(f"{base}/experts/disc", headers=ADMIN)
    assert r.status_code == 200, r.text
    for _ in range(8):
        assert httpx.post(f"{base}/generate", json={**body, "top_k": 5}).status_code == 422  # 4 experts again

    assert stop(proc) == 0  # SIGTERM to the supervisor: every worker drains, status 0
    err = proc.stderr.read()
    assert "Traceback" not in err
    # Each worker's lines name it.
    assert "[worker 0] sglora.service: ready" in err and "[worker 1] sglora.service: ready" in err


def test_the_supervisor_hands_each_connection_to_the_worker_holding_the_fewest(workers):
    """Connections are handed, not raced for: eight kept open split 4/4; after the four of one worker close,
    the next four all go to it (taking turns would split them 2/2)."""
    proc, base, _ = workers
    environ = Path(f"/proc/{children(proc.pid)[0]}/environ").read_bytes().split(b"\0")
    directory = Path(next(v for k, _, v in (e.decode().partition("=") for e in environ) if k == "SGLORA_WORKER_DIR"))
    place = WorkerPlace(0, 2, directory)

    def open_per_worker(want: list[int]) -> list[int]:
        end = time.monotonic() + 10
        while True:  # a closed connection reaches the counts a moment later
            got = [samples(read_socket(place.socket_path(i)))[("sglora_open_connections", ())] for i in (0, 1)]
            if sorted(got) == sorted(want) or time.monotonic() > end:
                return got
            time.sleep(0.1)

    clients = [httpx.Client(base_url=base) for _ in range(8)]
    try:
        for c in clients:  # one after the other: each connection is handed before the next is opened
            assert c.get("/health").status_code == 200
        assert open_per_worker([4, 4]) == [4, 4]
        for c in clients[::2]:  # the ones handed to the same worker: ties take turns
            c.close()
        assert sorted(open_per_worker([0, 4])) == [0, 4]
        fresh = [httpx.Client(base_url=base) for _ in range(4)]
        clients += fresh
        for c in fresh:
            assert c.get("/health").status_code == 200
        assert open_per_worker([4, 4]) == [4, 4]
    finally:
        for c in clients:
            c.close()


def test_a_worker_that_dies_stops_the_service_with_status_1(workers):
    proc, base, _ = workers
    first, second = children(proc.pid)
    os.kill(first, signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    assert not Path(f"/proc/{second}").exists() or Path(f"/proc/{second}/status").read_text().find("zombie") >= 0
    assert "ended with status -9: stopping the others" in proc.stderr.read()


def test_workers_of_a_supervisor_killed_outright_drain_and_end(workers):
    proc, base, _ = workers
    pids = children(proc.pid)
    proc.kill()
    proc.wait(timeout=10)
    end = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in pids):
        assert time.monotonic() < end, "the workers outlived their supervisor by 60 s"
        time.sleep(0.2)


def test_workers_that_cannot_start_end_the_service_with_status_2(tiny_artifacts):
    (tiny_artifacts / "generator" / "cvae.safetensors").write_bytes(b"corrupt")
    r = subprocess.run(
        [sys.executable, "-m", "app", "--artifacts", str(tiny_artifacts), "--port", str(free_port()), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SGLORA_REDIS_URL": ""},
    )
    assert r.returncode == 2, r.stderr
    assert "could not start (status 2): stopping the others" in r.stderr


def test_a_server_following_the_repository_takes_up_another_ones_changes(tiny_artifacts, make_settings, caplog):
    """SGLORA_FOLLOW_REPOSITORY, in process: one app changes the experts, the other serves the change from its
    next request, reading only the files that changed; its own change is not loaded again; an index it
    cannot load leaves it serving what it had."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(artifacts=tiny_artifacts, admin_keys=["admin-secret"], follow_repository=True)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        files, _ = expert_files(tiny_artifacts, scale=1.5)
        form = {"name": "disc", "description": "an orange disc", "num_snapshots": "4"}
        own = a.app.state.service.artifacts.repository
        keys = b.app.state.service.artifacts.repository.row_keys()
        buffer = b.app.state.service.artifacts.repository.stacked()[0].data_ptr()
        r = a.post("/experts", data=form, files=files, headers=ADMIN)
        assert r.status_code == 201, r.text
        version = r.json()["artifact_version"]
        assert a.get("/experts").json()["artifact_version"] == version
        assert a.app.state.service.artifacts.repository is own  # its own change: not loaded again

        listed = b.get("/experts").json()
        assert listed["artifact_version"] == version and "disc" in [e["name"] for e in listed["experts"]]
        # The experts b had are taken from its memory, not read again (ExpertRepository.load's reuse).
        assert b.app.state.service.artifacts.repository.row_keys()[: len(keys)] == keys
        # ... and their stack taken over: the added expert went into its spare row, nothing copied.
        assert b.app.state.service.artifacts.repository.stacked()[0].data_ptr() == buffer
        g = b.post("/generate", json={"description": "an orange disc", "seed": 1})
        assert g.headers["x-artifact-version"] == version and g.headers["x-experts"].startswith("disc=")
        # b removes it (its repository is the one on disk now, so no 409), and a follows.
        assert b.delete("/experts/disc", headers=ADMIN).status_code == 200
        assert "disc" not in [e["name"] for e in a.get("/experts").json()["experts"]]

        index = tiny_artifacts / "repository" / "repository.json"
        good = index.read_bytes()
        served = b.get("/experts").json()["artifact_version"]
        index.write_bytes(b"{ not json")
        with caplog.at_level("WARNING", logger="sglora.service"):
            r = b.get("/experts")
        assert r.status_code == 200 and r.json()["artifact_version"] == served
        assert any("changed, but is not taken up" in m for m in caplog.messages)
        index.write_bytes(good)
        assert b.post("/generate", json={"description": "a ring", "seed": 1}).status_code == 200


def test_json_log_lines_of_a_worker_name_it():
    import json
    import logging

    from app.logs import JsonFormatter, log_config

    record = logging.LogRecord("sglora.service", logging.INFO, __file__, 1, "ready", None, None)
    assert json.loads(JsonFormatter(worker=1).format(record))["worker"] == 1
    assert "worker" not in json.loads(JsonFormatter().format(record))  # a lone server's
    assert log_config("json", worker=3)["formatters"]["access"]["worker"] == 3

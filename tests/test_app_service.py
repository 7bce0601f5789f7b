"""Start-up checks, health, metrics and the worker: micro-batching, 429, 504 and graceful shutdown."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from app_helpers import block_worker, file_metadata, serving, until
from fastapi.testclient import TestClient
from onednn_support import onednn_reorders_bfloat16
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as load_safetensors

from app import processes, runtime
from app.main import create_app
from app.metrics import metric_sum
from app.settings import Settings
from app.worker import WorkerTimeout
from sglora.artifacts import ArtifactError
from sglora.engine import MAX_PASS_ROWS
from sglora.export import from_peft_tensors

pytestmark = pytest.mark.anyio


def block(service) -> tuple[threading.Event, asyncio.Task]:
    """Occupies the service's model thread until the returned event is set."""
    return block_worker(service.worker)


# ---- start-up --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda root: (root / "generator" / "cvae.safetensors").write_bytes(b"garbage"), "cvae.safetensors"),
        (lambda root: (root / "backbone" / "open_clip_model.safetensors").unlink(), "open_clip_model.safetensors"),
        (lambda root: (root / "repository" / "experts" / "ring.safetensors").write_bytes(b"x"), "ring.safetensors"),
        (lambda root: (root / "manifest.json").write_text("{"), "manifest.json"),
    ],
)
def test_startup_refuses_damaged_artefacts_naming_the_file(tiny_artifacts, make_settings, damage, named):
    damage(tiny_artifacts)
    with pytest.raises(ArtifactError, match=named):
        with TestClient(create_app(make_settings(artifacts=tiny_artifacts))):
            pass


def test_sglora_serve_exits_2_when_it_cannot_bind_before_loading_anything(tmp_path):
    """Address in use: `sglora serve` exited 0 (uvicorn logged it), which a supervisor restarting on failure
    takes for a clean stop; then it said so only after loading the artefacts. The artefact directory here
    does not exist: the bind is checked first."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        p = subprocess.run(
            [sys.executable, "-m", "sglora.cli", "serve", "--artifacts", str(tmp_path / "none"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "SGLORA_REDIS_URL": "", "SGLORA_DEVICE": "cpu"},
        )
    assert p.returncode == 2, p.stderr
    assert f"sglora serve: error: cannot listen on 127.0.0.1:{port}: address already in use" in p.stderr
    assert "Traceback" not in p.stderr and "artefact" not in p.stderr


def test_the_bind_check_lets_go_of_the_port():
    import socket

    from app.serve import bind_problem

    assert bind_problem("127.0.0.1", 0) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert bind_problem("127.0.0.1", port) is None
    with socket.socket() as again:  # free again: uvicorn binds it next
        again.bind(("127.0.0.1", port))
        again.listen()
        assert "address already in use" in bind_problem("127.0.0.1", port)
    try:
        six = socket.socket(socket.AF_INET6)
        six.bind(("::1", 0))
    except OSError:
        return  # no IPv6 loopback here
    with six:
        six.listen()
        port = six.getsockname()[1]
        assert bind_problem("::1", port).startswith(f"cannot listen on [::1]:{port}: address already in use")


def test_startup_without_artefact_path_says_so(make_settings):
    with pytest.raises(ArtifactError, match="SGLORA_ARTIFACTS"):
        with TestClient(create_app(make_settings(artifacts=None))):
            pass


def test_sglora_serve_exits_with_the_problem(tiny_artifacts):
    (tiny_artifacts / "generator" / "cvae.json").write_text("{}")
    env = {**os.environ, "SGLORA_REDIS_URL": ""}
    p = subprocess.run(
        [sys.executable, "-m", "sglora.cli", "serve", "--artifacts", str(tiny_artifacts), "--port", "0", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 2  # as the CLI's other errors (uvicorn's own status for a failed start-up is 3)
    assert "cvae.json" in p.stderr and "sha256" in p.stderr
    assert "Traceback" not in p.stderr  # the problem, not a stack trace


def test_json_logs_are_one_object_per_line_with_the_request_id(tiny_artifacts_session):
    port = processes.free_port()
    env = {**os.environ, "SGLORA_ARTIFACTS": str(tiny_artifacts_session), "SGLORA_REDIS_URL": "", "SGLORA_THREADS": "1"}
    cmd = [sys.executable, "-m", "sglora.cli", "serve", "--artifacts", str(tiny_artifacts_session), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--log-format", "json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        processes.wait_ready(f"http://127.0.0.1:{port}", proc)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"description": "a ring"}, headers={"X-Request-ID": "job-9"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "job-9"
    finally:
        assert processes.stop(proc) == 0
    out, err = proc.communicate()
    lines = [json.loads(line) for line in (out + err).splitlines()]  # every line is JSON: no progress bar either
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "uvicorn.access" and line["path"] == "/generate"]
    assert len(access) == 1 and access[0]["method"] == "POST" and access[0]["status"] == 200
    assert access[0]["request_id"] == "job-9"
    assert any(line["logger"] == "sglora.service" and line["message"].startswith("ready:") for line in lines)


def _answer(s: socket.socket) -> bytes:
    """One whole HTTP answer with a Content-Length (its head and body may come in separate reads)."""
    out = b""
    while b"\r\n\r\n" not in out:
        chunk = s.recv(65536)
        assert chunk, f"closed before a whole head: {out!r}"
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"closed before a whole body: {out!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_sglora_serve_takes_its_connection_timeouts_from_the_environment(tiny_artifacts_session):
    """SGLORA_CLIENT_HEADER_TIMEOUT_S reaches the HTTP protocol of `sglora serve` (the cut is counted),
    SGLORA_KEEP_ALIVE_TIMEOUT_S uvicorn's keep-alive, and SGLORA_MAX_CONNECTIONS the connection bound."""
    port = processes.free_port()
    env = {
        **os.environ,
        "SGLORA_ARTIFACTS": str(tiny_artifacts_session),
        "SGLORA_REDIS_URL": "",
        "SGLORA_THREADS": "1",
        "SGLORA_CLIENT_HEADER_TIMEOUT_S": "0.5",
        "SGLORA_KEEP_ALIVE_TIMEOUT_S": "2",  # the default is 5 s
        "SGLORA_MAX_CONNECTIONS": "1",
        "SGLORA_RETRY_AFTER_S": "3",
    }
    cmd = [sys.executable, "-m", "sglora.cli", "serve", "--artifacts", str(tiny_artifacts_session), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        processes.wait_ready(f"http://127.0.0.1:{port}", proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never ended
            assert s.recv(65536).startswith(b"HTTP/1.1 408 ")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'sglora_connections_closed_total{reason="head_timeout"} 1.0' in metrics
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(s).startswith(b"HTTP/1.1 200 ")
            s.settimeout(4.5)  # the server closes the idle connection after 2 s, not the default 5 s
            assert s.recv(1) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(s).startswith(b"HTTP/1.1 200 ")
            with socket.create_connection(("127.0.0.1", port), timeout=30) as over:  # a second: over the bound
                over.sendall(b"GET /experts HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = _answer(over)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 3\r\n" in answer.lower()
            s.sendall(b"GET /experts HTTP/1.1\r\nHost: x\r\n\r\n")  # the first is still served
            assert _answer(s).startswith(b"HTTP/1.1 200 ")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'sglora_connections_closed_total{reason="over_capacity"} 1.0' in metrics
    finally:
        assert processes.stop(proc) == 0
    assert "request head incomplete after 0.5 s" in proc.communicate()[0]


def test_json_logs_route_transformers_output_through_the_root_logger():
    """transformers' own handler ("[transformers] ..." lines) and its weight-loading bars wrote past the JSON
    formatter (the offline backbone's MiniLM loads through it); in JSON mode its records reach the root logger."""
    hf_logging = pytest.importorskip("transformers.utils.logging")
    from app.logs import route_library_output

    logger = hf_logging.get_logger()  # the library's root logger, which holds its default handler
    try:
        route_library_output()
        assert logger.propagate and not hf_logging.is_progress_bar_enabled()
        assert not [h for h in logger.handlers if type(h) is logging.StreamHandler]
        seen = []

        class Catch(logging.Handler):
            def emit(self, record):
                seen.append(record)

        catch = Catch()
        logging.getLogger().addHandler(catch)
        try:
            hf_logging.get_logger("transformers.modeling_utils").warning("loss_type=None")
        finally:
            logging.getLogger().removeHandler(catch)
        assert [r.getMessage() for r in seen] == ["loss_type=None"]
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()


def test_text_log_lines_of_a_request_end_with_its_id():
    import uvicorn.logging

    from app.logs import log_config
    from app.request_id import RequestIdFilter, current

    formats = log_config("text")["formatters"]
    access = uvicorn.logging.AccessFormatter(fmt=formats["access"]["fmt"], use_colors=False)
    service = uvicorn.logging.DefaultFormatter(fmt=formats["service"]["fmt"], use_colors=False)
    args = ("127.0.0.1:5000", "POST", "/generate", "1.1", 200)
    token = current.set("job-9")
    try:
        line = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None)
        warning = logging.LogRecord("sglora.cache", logging.WARNING, "", 0, "redis get failed", None, None)
        RequestIdFilter().filter(line), RequestIdFilter().filter(warning)
    finally:
        current.reset(token)
    assert access.format(line) == 'INFO:     127.0.0.1:5000 - "POST /generate HTTP/1.1" 200 OK [request job-9]'
    assert service.format(warning) == "WARNING:  sglora.cache: [request job-9] redis get failed"
    outside = logging.LogRecord("sglora.service", logging.INFO, "", 0, "ready", None, None)
    RequestIdFilter().filter(outside)
    assert service.format(outside) == "INFO:     sglora.service: ready"


def test_unknown_log_format_is_refused_by_name():
    env = {**os.environ, "SGLORA_LOG_FORMAT": "xml"}
    p = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "SGLORA_LOG_FORMAT must be one of text, json, got 'xml'" in p.stderr
    assert "Traceback" not in p.stderr


def test_python_m_app_sets_the_passive_wait_policy_before_torch_loads(tmp_path):
    """libgomp reads OMP_WAIT_POLICY once, as torch loads it: `python -m app` set it after app.serve had
    imported torch, so its OpenMP threads spun (GOMP_SPINCOUNT 300000 rather than 0). Torch loads with the
    app, which then finds no artefacts."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"SGLORA_REDIS_URL": ""}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"  # libgomp prints its settings at its first parallel region
    cmd = [sys.executable, "-m", "app", "--artifacts", str(tmp_path / "none"), "--port", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "artefact directory not found" in p.stderr, p.stderr
    if "GOMP_SPINCOUNT" not in p.stderr:
        pytest.skip("this torch's OpenMP runtime prints no GOMP_SPINCOUNT")
    assert "GOMP_SPINCOUNT = '0'" in p.stderr


@pytest.mark.parametrize(
    ("env", "status", "needle"),
    [
        ({"SGLORA_DEVICE": "gpu"}, 2, "SGLORA_DEVICE: unknown device 'gpu'"),
        ({"SGLORA_REDIS_URL": "localhost:6379"}, 2, "SGLORA_REDIS_URL must start with one of redis://"),
        # the scheme alone is shown: the rest may hold a password
        ({"SGLORA_REDIS_URL": "redis+sentinel://:S3cret@host/0"}, 2, "got redis+sentinel://..."),
        ({"SGLORA_THREADS": "-1"}, 2, "SGLORA_THREADS: Input should be greater than or equal to 0"),
        # the rest of the URL as redis-py reads it when it connects, after the artefacts have loaded
        ({"SGLORA_REDIS_URL": "redis://:S3cret@127.0.0.1:99999/0"}, 2, "not a valid Redis URL: Port out of range"),
        ({"SGLORA_REDIS_URL": "redis://[::1/0"}, 2, "not a valid Redis URL: Invalid IPv6 URL"),
        ({"SGLORA_REDIS_URL": "redis://:S3cret@127.0.0.1:6379/cache"}, 2, "names the database by its number"),
        # inf passed as a float: batches held open until their requests' 504s
        ({"SGLORA_BATCH_WAIT_MS": "inf"}, 2, "SGLORA_BATCH_WAIT_MS: Input should be a finite number"),
        ({"SGLORA_REDIS_TIMEOUT_S": "nan"}, 2, "SGLORA_REDIS_TIMEOUT_S: Input should be a finite number"),
        ({"SGLORA_BATCH_WAIT_MS": "3000", "SGLORA_REQUEST_TIMEOUT_S": "2"}, 2, "must be shorter than SGLORA_REQUEST_TIMEOUT_S"),
    ],
)
def test_bad_settings_are_refused_by_name_before_the_app_loads(env, status, needle):
    p = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert p.returncode == status and needle in p.stderr and p.stderr.startswith("python -m app: error:")
    assert "Traceback" not in p.stderr and "S3cret" not in p.stderr


def test_sglora_serve_reads_the_artefact_directory_from_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SGLORA_ARTIFACTS"} | {"SGLORA_REDIS_URL": ""}
    cmd = [sys.executable, "-m", "sglora.cli", "serve", "--port", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert "sglora serve: error: no artefact directory: pass --artifacts DIR or set SGLORA_ARTIFACTS" in p.stderr
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env | {"SGLORA_ARTIFACTS": str(tmp_path / "gone")})
    assert p.returncode != 0 and f"artefact directory not found: {tmp_path / 'gone'}" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_at_start_up(tiny_artifacts_session):
    env = {**os.environ, "SGLORA_REDIS_URL": "", "SGLORA_DEVICE": "cuda"}
    cmd = [sys.executable, "-m", "app", "--artifacts", str(tiny_artifacts_session), "--port", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and "cannot start: SGLORA_DEVICE=cuda: CUDA is not available" in p.stderr
    assert "Traceback" not in p.stderr
    env["SGLORA_DEVICE"] = "auto"  # --device given: named as given, the user set no SGLORA_DEVICE
    p = subprocess.run([*cmd, "--device", "cuda"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "error: --device=cuda: CUDA is not available" in p.stderr
    assert "Traceback" not in p.stderr


def test_wait_ready_reports_a_server_that_dies_with_its_stderr(tmp_path):
    """app.processes, as the benchmark and the load test use it: a server that cannot start is reported
    with its exit status and the end of its stderr, not waited for until the timeout."""
    from app.processes import free_port, start_server, wait_ready

    env = {**os.environ, "SGLORA_ARTIFACTS": str(tmp_path / "missing"), "SGLORA_REDIS_URL": ""}
    proc = start_server(free_port(), env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with pytest.raises(RuntimeError, match=r"exited with status [1-9]\d* before it was ready:\n(.|\n)*missing") as e:
        wait_ready("http://127.0.0.1:1", proc, timeout=120)
    assert "artefact directory not found" in str(e.value) and "Traceback" not in str(e.value)


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLORA_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("SGLORA_ADMIN_KEYS", "a, b")
    monkeypatch.setenv("SGLORA_CACHE_TTL_S", "60")
    monkeypatch.setenv("SGLORA_THREADS", "3")
    s = Settings()
    assert (s.artifacts, s.admin_keys, s.cache_ttl_s, s.threads) == (tmp_path, ["a", "b"], 60, 3)
    monkeypatch.setenv("SGLORA_CACHE_TTL_S", "0")
    with pytest.raises(ValueError, match="cache_ttl_s"):
        Settings()


# ---- health and metrics ------------------------------------------------------------------------------
async def test_health_ready_and_metrics(make_settings):
    async with serving(make_settings()) as (service, client):
        assert (await client.get("/health")).json() == {"status": "ok"}
        ready = (await client.get("/ready")).json()
        assert ready["status"] == "ready" and ready["redis"] == "ok" and ready["experts"] == 4
        assert ready["artifact_version"] == service.version
        fewest, most = ready["cvae_pass_rows"]
        assert [fewest, most] == list(service.engine.pass_rows) and ((fewest, most) == (1, 1) or most == MAX_PASS_ROWS)
        assert (await client.post("/generate", json={"description": "a cross", "seed": 1})).status_code == 200
        assert (await client.post("/generate", json={"description": "a cross", "seed": 1})).status_code == 200
        assert (await client.post("/generate", json={"description": ""})).status_code == 422
        assert (await client.get("/static/app.js")).status_code == 200
        text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(name.startswith(("sglora_", "process_", "python_")) for name in families)
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("sglora_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "200")))] == 2
    assert value[("sglora_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "422")))] == 1
    assert value[("sglora_cache_events_total", (("result", "hit"),))] == 1
    assert value[("sglora_cache_events_total", (("result", "miss"),))] == 1
    # metric_sum (the benchmarks' and tests' reader): every matching series summed, 0 where none matches
    assert metric_sum(text, "sglora_requests_total", endpoint="/generate") == 3
    assert metric_sum(text, "sglora_requests_total", endpoint="/generate", status="422") == 1
    assert metric_sum(text, "sglora_cache_events_total") == 2
    assert metric_sum(text, "sglora_requests_total", endpoint="/nowhere") == 0
    # One model job, the miss's: the start-up's warm-up and batching check are not requests, and not counted.
    for stage in ("queue", "text_encoding", "prior", "sampling", "serialisation"):
        assert value[("sglora_stage_duration_seconds_count", (("stage", stage),))] == 1, stage
    for cache in ("hit", "miss", ""):  # the 422 has no X-Cache
        assert value[("sglora_request_duration_seconds_count", (("cache", cache), ("endpoint", "/generate")))] == 1, cache
    assert value[("sglora_batch_size_count", ())] == 1 and value[("sglora_model_threads_busy", ())] == 0
    assert value[("sglora_embedding_cache_events_total", (("result", "miss"),))] == 1
    assert families["sglora_in_flight_requests"].type == "gauge"
    assert value[("sglora_in_flight_requests", ())] == 0  # the scrape itself is not counted
    # A mount rewrites the path it passes on: static files were counted as "other", with the unknown paths
    assert value[("sglora_requests_total", (("endpoint", "/static"), ("method", "GET"), ("status", "200")))] == 1
    info = families["sglora_artifacts_info"].samples[0].labels
    assert info["backbone"] == "tiny-vit" and info["artifact_version"] == service.version
    assert value[("process_resident_memory_bytes", ())] > 50e6 and value[("process_cpu_seconds_total", ())] > 0
    assert sum(v for (name, _), v in value.items() if name == "sglora_gc_pause_seconds_count") >= 1


def test_prometheus_multiprocess_mode_is_refused(monkeypatch):
    """prometheus-client's multiprocess variable made it keep values in files: a restarted process with the same
    PID (PID 1 in a container) took up the last one's counts and gauges."""
    from app.metrics import Metrics
    from app.settings import StartupError

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/metrics")
    with pytest.raises(StartupError, match="PROMETHEUS_MULTIPROC_DIR is set: each server process keeps its own metrics"):
        Metrics()
    p = subprocess.run([sys.executable, "-m", "app", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error: PROMETHEUS_MULTIPROC_DIR is set" in p.stderr and "Traceback" not in p.stderr


async def test_start_up_heap_is_frozen_while_serving_and_collections_are_timed(make_settings):
    holders = runtime.freezers()  # apps of this process already serving (module-scoped fixtures)
    async with serving(make_settings()) as (service, client):
        assert runtime.freezers() == holders + 1 and gc.get_freeze_count() > 10_000  # the loaded model, the libraries
        pauses = service.metrics.gc_pauses

        def counts():
            return {s.labels["generation"]: s.value for s in next(pauses.collect()).samples if s.name.endswith("_count")}

        before = counts()
        gc.collect()
        assert counts()["2"] == before["2"] + 1
        text = (await client.get("/metrics")).text
        async with serving(make_settings()):  # a second app in the process: its stop leaves the first frozen
            assert runtime.freezers() == holders + 2
        assert runtime.freezers() == holders + 1 and gc.get_freeze_count() > 10_000
    assert runtime.freezers() == holders
    assert holders > 0 or gc.get_freeze_count() == 0  # handed back when the last app stopped
    buckets = [s for f in text_string_to_metric_families(text) if f.name == "sglora_gc_pause_seconds" for s in f.samples]
    full = [s.value for s in buckets if s.name.endswith("_bucket") and s.labels["generation"] == "2"]
    assert full == sorted(full) and full[-1] >= 1  # cumulative; +Inf holds the forced collection
    stopped = counts()
    gc.collect()  # no longer timed once the app stopped
    assert counts() == stopped
    async with serving(make_settings(gc_freeze=False)):
        assert runtime.freezers() == holders


def test_every_setting_has_a_row_in_the_docs():
    doc = (processes.ROOT / "docs" / "service.md").read_text()
    rows = set(re.findall(r"^\| `(SGLORA_[A-Z0-9_]+)` \|", doc, flags=re.M))
    # SGLORA_LOG_FORMAT is read by `python -m app` / `sglora serve` before the app exists (app/serve.py)
    assert rows == {f"SGLORA_{name.upper()}" for name in Settings.model_fields} | {"SGLORA_LOG_FORMAT"}


def test_openapi_documents_every_endpoint_with_examples(make_settings):
    app = create_app(make_settings())
    spec = app.openapi()
    paths = spec["paths"]
    for path, method in [
        ("/generate", "post"),
        ("/generate/batch", "post"),
        ("/retrieve", "post"),
        ("/experts", "get"),
        ("/experts", "post"),
        ("/experts/{name}", "get"),
        ("/experts/{name}", "delete"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
    ]:
        op = paths[path][method]
        assert op.get("description") and op.get("summary"), path
    text = str(spec)
    assert "a photo of a sunflower" in text and "examples" in text
    assert "application/zip" in str(paths["/generate"]["post"]["responses"]["200"])


def test_openapi_lists_the_refusals_of_the_key_checks_and_the_upload_gate(make_settings):
    """Every route behind a key check documents its 401 and 403, every upload the upload gate's 429 (its
    middleware answers before the route runs, so FastAPI cannot know of it), read from the routes themselves."""
    from fastapi.routing import APIRoute

    from app.deps import UploadGateMiddleware, json_model_call, require_admin_key, require_api_key
    from app.metrics import leaf_routes

    def calls(dependant) -> set:
        return {dependant.call} | {c for d in dependant.dependencies for c in calls(d)}

    app = create_app(make_settings())
    paths = app.openapi()["paths"]
    keyed = 0
    for route in leaf_routes(app.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods:
            documented = set(paths[route.path][method.lower()]["responses"])
            if calls(route.dependant) & {require_api_key, require_admin_key, json_model_call}:  # the last checks the key too
                keyed += 1
                assert {"401", "403"} <= documented, (method, route.path)
            if method == "POST" and route.path in UploadGateMiddleware.PATHS:
                assert "429" in documented, route.path
    assert keyed == 8  # /generate, /generate/preview, /generate/batch, /retrieve and the four expert routes


# ---- request IDs ------------------------------------------------------------------------------------
async def test_every_answer_carries_a_request_id_and_keeps_a_sane_one(make_settings):
    async with serving(make_settings()) as (_, client):
        first, second = (
            (await client.get("/health")).headers["x-request-id"],
            (await client.get("/health")).headers["x-request-id"],
        )
        assert re.fullmatch("[0-9a-f]{32}", first) and re.fullmatch("[0-9a-f]{32}", second) and first != second
        kept = await client.post("/generate", json={"description": "a ring", "seed": 1}, headers={"X-Request-ID": "lb-7f3a.2:x"})
        assert kept.status_code == 200 and kept.headers["x-request-id"] == "lb-7f3a.2:x"
        for bad in ("has space", "x" * 129, "semi;colon", ""):
            r = await client.get("/nowhere", headers={"X-Request-ID": bad})
            assert r.status_code == 404 and re.fullmatch("[0-9a-f]{32}", r.headers["x-request-id"]), bad
        r = await client.post("/generate", json={"description": "a ring", "top_k": 0})
        assert r.status_code == 422 and re.fullmatch("[0-9a-f]{32}", r.headers["x-request-id"])


async def test_a_bug_is_a_500_naming_the_request_id_logged_once_with_its_traceback(make_settings, caplog):
    async with serving(make_settings()) as (service, client):

        async def broken(params):
            raise RuntimeError("a bug")

        service.generate = broken
        with caplog.at_level(logging.ERROR, logger="sglora"):
            r = await client.post("/generate", json={"description": "a ring"}, headers={"X-Request-ID": "report-42"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "report-42"
        detail = r.json()["detail"]
        assert detail["field"] is None and "RuntimeError" in detail["reason"] and "request report-42" in detail["reason"]
        errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info and "POST /generate" in errors[0].getMessage()
        text = (await client.get("/metrics")).text
        assert 'sglora_requests_total{endpoint="/generate",method="POST",status="500"} 1.0' in text
        del service.generate  # the class's method again: the service answers as before
        assert (await client.post("/generate", json={"description": "a ring"})).status_code == 200


async def test_a_bug_s_log_line_shows_the_path_percent_encoded(make_settings, caplog):
    """The path is percent-decoded by the server: a %0A in it would start a forged log line."""
    async with serving(make_settings()) as (service, client):

        def broken(name, part):
            raise RuntimeError("a bug")

        service.expert_file = broken
        with caplog.at_level(logging.ERROR, logger="sglora"):
            r = await client.get("/experts/x%0AERROR:%20forged%1B[2J")
        assert r.status_code == 500
        (record,) = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        message = record.getMessage()
        assert "\n" not in message and "\x1b" not in message
        assert message.endswith("GET /experts/x%0AERROR%3A%20forged%1B%5B2J"), message


async def test_service_log_lines_of_a_request_carry_its_id(make_settings):
    from app.request_id import RequestIdFilter

    lines: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lines.append
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("sglora")
    logger.addHandler(handler)
    try:
        # Redis on a closed port, no back-off: the lookup fails and the service logs it while serving the request.
        async with serving(make_settings(redis_url=f"redis://127.0.0.1:{processes.free_port()}/0", redis_backoff_s=0)) as (
            _,
            client,
        ):
            r = await client.post("/generate", json={"description": "a ring", "seed": 3}, headers={"X-Request-ID": "abc-1"})
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"
    finally:
        logger.removeHandler(handler)
    by_op = {rec.getMessage().split()[1]: rec.request for rec in lines if rec.getMessage().startswith("redis ")}
    # The start-up's ping is outside any request; the lookup and the write-behind it started are the request's.
    assert by_op == {"ping": "", "get": " [request abc-1]", "set": " [request abc-1]"}


# ---- the worker ------------------------------------------------------------------------------------
async def test_concurrent_descriptions_share_one_text_encoding(make_settings):
    async with serving(make_settings()) as (service, client):
        calls = []
        embed = service.worker._embed
        service.worker._embed = lambda texts: (calls.append(len(texts)), embed(texts))[1]
        gate, blocker = block(service)
        await until(lambda: service.worker.pending == 1)
        requests = [
            asyncio.create_task(client.post("/generate", json={"description": f"shape {i}", "seed": i})) for i in range(12)
        ]
        await until(lambda: service.worker.pending == 13)
        gate.set()
        responses = await asyncio.gather(*requests)
        await blocker
        assert [r.status_code for r in responses] == [200] * 12
        assert sum(calls) == 12 and max(calls) >= 8, calls  # one batched call took (nearly) all queued descriptions
        # Each answer is still its own: same bytes as a lone request.
        lone = await client.post("/generate", json={"description": "shape 3", "seed": 3})
        assert lone.headers["x-cache"] == "hit" and lone.content == responses[3].content
        # ... and, byte for byte, the LoRA the engine makes for it alone, outside any batch.
        engine = service.engine
        for i in (0, 3, 11):
            alone = engine.generate(engine.embed([f"shape {i}"])[0], "sg-lora", seed=i).lora
            got = from_peft_tensors(service.spec, load_safetensors(responses[i].content))
            assert got.numpy().tobytes() == alone.numpy().tobytes(), i


async def test_full_queue_answers_429_with_retry_after(make_settings):
    async with serving(make_settings(max_queue=3, retry_after_s=2)) as (service, client):
        gate, blocker = block(service)
        queued = [asyncio.create_task(client.post("/generate", json={"description": f"q{i}", "seed": i})) for i in range(2)]
        await until(lambda: service.worker.pending == 3)
        r = await client.post("/generate", json={"description": "one too many", "seed": 9})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        gate.set()
        assert [x.status_code for x in await asyncio.gather(*queued)] == [200, 200]
        await blocker
        hit = await client.post("/generate", json={"description": "q0", "seed": 0})
        assert hit.status_code == 200 and hit.headers["x-cache"] == "hit"


async def test_a_warm_up_slower_than_the_request_timeout_still_starts_the_service(make_settings):
    """The first generation may be much slower than a request may wait (a first CUDA call, a cold disk):
    start-up gets its own limit, and the request timeout applies from then on."""
    async with serving(make_settings(request_timeout_s=0.3, test_model_delay_s=0.5)) as (service, client):
        assert service.worker.timeout_s == 0.3
        r = await client.post("/generate", json={"description": "slow", "seed": 1})
        assert r.status_code == 504


async def test_slow_model_answers_504_and_recovers(make_settings):
    async with serving(make_settings(request_timeout_s=0.3)) as (service, client):
        gate, blocker = block(service)
        await until(lambda: service.worker.pending == 1)  # the blocker holds the model before the request comes
        r = await client.post("/generate", json={"description": "too slow", "seed": 1})
        assert r.status_code == 504 and r.json()["detail"]["reason"]
        gate.set()
        with pytest.raises(WorkerTimeout):  # the blocker timed out as well
            await blocker
        await until(lambda: service.worker.pending == 0)
        ok = await client.post("/generate", json={"description": "too slow", "seed": 1})
        assert ok.status_code == 200


async def test_graceful_shutdown_finishes_in_flight_requests(make_settings):
    app = create_app(make_settings())
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    service = app.state.service
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sglora") as client:
        gate, blocker = block(service)
        in_flight = asyncio.create_task(client.post("/generate", json={"description": "finish me", "seed": 1}))
        await until(lambda: service.worker.pending == 2)
        shutdown = asyncio.create_task(lifespan.__aexit__(None, None, None))
        await until(lambda: service.worker.closing)
        late = await client.post("/generate", json={"description": "too late", "seed": 1})
        assert late.status_code == 503
        assert (await client.get("/ready")).status_code == 503
        assert not shutdown.done()
        gate.set()
        r = await in_flight
        assert r.status_code == 200 and r.headers["x-cache"] == "miss"
        await blocker
        await asyncio.wait_for(shutdown, 10)


async def test_batching_is_turned_off_where_it_would_change_bytes(make_settings, monkeypatch, caplog):
    import app.service as service_module

    # On this CPU the check passes (the tiny text tower pads to a fixed length): batching stays on.
    async with serving(make_settings(max_batch=8)) as (service, client):
        assert service.worker.max_batch == 8
        assert (await client.get("/ready")).json()["max_batch"] == 8
        embed = functools.partial(service.engine.embed, truncate=True)  # as the service runs it: a probe is long
    # An encoder whose rows depend on their batch (as a multi-threaded or GPU matrix product can) is caught ...
    assert service_module.batching_mismatch(embed, ["a photo of a star"], 8) is None
    found = service_module.batching_mismatch(lambda texts: embed(texts) + 1e-7 * len(texts), ["a photo of a star"], 8)
    assert found is not None and "differs in a batch of" in found
    # ... and then the service encodes one description at a time, and says why.
    monkeypatch.setattr(service_module, "batching_mismatch", lambda *a: "the embedding of 'x' differs in a batch of 2")
    with caplog.at_level("WARNING", logger="sglora.service"):
        async with serving(make_settings(max_batch=8)) as (service, client):
            assert service.worker.max_batch == 1
            assert (await client.get("/ready")).json()["max_batch"] == 1
            assert (await client.post("/generate", json={"description": "a red ring", "seed": 1})).status_code == 200
    assert "micro-batching off" in caplog.text and "differs in a batch of 2" in caplog.text
    # SGLORA_BATCH_INVARIANCE=ignore skips the check.
    async with serving(make_settings(max_batch=8, batch_invariance="ignore")) as (service, _):
        assert service.worker.max_batch == 8


async def test_results_of_a_batch_are_answered_as_they_are_made():
    """finish may yield: the first request of a batch is answered while the rest are still being made
    (answering a whole batch at once made cache hits queue behind a burst of responses)."""
    import torch

    from app.metrics import Metrics
    from app.worker import ModelWorker

    first_answered = threading.Event()

    def finish(embeddings, jobs):
        yield f"done {jobs[0]}"
        assert first_answered.wait(5), "the first job was not answered before the second was made"
        for j in jobs[1:]:
            yield f"done {j}"

    worker = ModelWorker(lambda texts: torch.zeros(len(texts), 4), Metrics(), finish=finish, threads=1)
    worker.start()
    try:
        gate, blocker = block_worker(worker)
        await until(lambda: worker.pending == 1)
        a = asyncio.create_task(worker.encode("a", "a"))
        b = asyncio.create_task(worker.encode("b", "b"))
        await until(lambda: worker.pending == 3)
        gate.set()
        assert await asyncio.wait_for(a, 5) == "done a"
        first_answered.set()
        assert await asyncio.wait_for(b, 5) == "done b"
        await blocker
    finally:
        await worker.close()


async def test_a_batch_waits_for_arrivals_within_the_window_only_after_a_batch_with_company():
    """A request meeting an idle model thread runs at once. One that queued behind a busy thread forms a batch
    that waits up to SGLORA_BATCH_WAIT_MS for more, but only where the last batch had company: a lone client
    would otherwise pay the window on every request that found the thread busy."""
    import torch

    from app.metrics import Metrics
    from app.worker import ModelWorker

    sizes: list[int] = []

    def embed(texts):
        sizes.append(len(texts))
        return torch.zeros(len(texts), 4)

    worker = ModelWorker(embed, Metrics(), threads=1, batch_wait_ms=2000)
    worker.start()

    async def behind_the_thread(first: str, later: str | None = None) -> None:
        """``first`` queued behind a busy thread; ``later`` sent 0.3 s after the thread is free again."""
        gate, blocker = block_worker(worker)
        await until(lambda: worker.pending == 1)
        queued = [asyncio.create_task(worker.encode(t)) for t in first.split(",")]
        await until(lambda: worker.pending == 1 + len(queued))
        gate.set()
        await blocker
        if later is not None:
            await asyncio.sleep(0.3)
            queued.append(asyncio.create_task(worker.encode(later)))
        await asyncio.gather(*queued)

    try:
        start = time.monotonic()
        await worker.encode("alone")  # an idle thread: at once
        assert sizes == [1] and time.monotonic() - start < 1.0  # far from the 2 s window
        await behind_the_thread("after a lone one", later="too late")
        assert sizes[1:] == [1, 1]  # the last batch was alone: no wait, and the later one ran on its own
        await behind_the_thread("a,b")
        assert sizes[-1] == 2  # queued together: one batch, with company
        await behind_the_thread("c", later="d")
        assert sizes[-1] == 2, sizes  # the window held c for d
    finally:
        await worker.close()


async def test_a_job_run_alone_sees_its_requests_id():
    """An expert change runs on a model thread through ModelWorker.run: its log lines ("expert repository
    changed") lacked the request ID the docs promise, as run_in_executor leaves context variables behind."""
    from app.metrics import Metrics
    from app.request_id import current
    from app.worker import ModelWorker

    worker = ModelWorker(lambda texts: None, Metrics(), model_threads=2)
    worker.start()
    try:
        token = current.set("job-42")
        try:
            seen = await worker.run(current.get)
        finally:
            current.reset(token)
        assert seen == "job-42"
        assert await worker.run(current.get) is None  # outside a request
    finally:
        await worker.close()


async def test_model_threads_run_batches_side_by_side_and_run_jobs_alone():
    """Two model threads encode two micro-batches at once; a run() job (retrieval, expert change)
    waits for them and runs with no batch beside it."""
    import time

    import torch

    from app.metrics import Metrics
    from app.worker import ModelWorker

    lock, active, peak, seen_by_job, threads = threading.Lock(), [0], [0], [], []

    def embed(texts):
        threads.append(threading.current_thread().name)
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        return torch.zeros(len(texts), 4)

    def alone():
        for _ in range(5):  # no batch starts while this job runs
            seen_by_job.append(active[0])
            time.sleep(0.02)
        return "alone"

    metrics = Metrics()
    busy = lambda: metrics.registry.get_sample_value("sglora_model_threads_busy")  # noqa: E731
    worker = ModelWorker(embed, metrics, finish=lambda e, jobs: list(jobs), threads=1, model_threads=2, max_batch=1)
    worker.start()
    try:
        assert metrics.registry.get_sample_value("sglora_model_threads") == 2 and busy() == 0
        first = [asyncio.create_task(worker.encode(f"d{i}", i)) for i in range(2)]
        await until(lambda: active[0] == 2)
        assert busy() == 2
        job = asyncio.create_task(worker.run(alone))
        later = [asyncio.create_task(worker.encode(f"e{i}", 10 + i)) for i in range(2)]
        assert await asyncio.wait_for(asyncio.gather(*first, job, *later), 10) == [0, 1, "alone", 10, 11]
        assert len({t.rsplit("_", 1)[0] for t in threads}) == 2  # both model threads worked
        threads.clear()
        await until(lambda: busy() == 0)  # both threads handed back (just after the answers they made)
        for i in range(3):  # one request at a time: always the first thread (its core's caches stay warm)
            assert await worker.encode(f"lone {i}", i) == i
            await until(lambda: busy() == 0)  # the thread is handed back just after its answer
        assert {t.rsplit("_", 1)[0] for t in threads} == {"sglora-torch-0"}
        await until(lambda: busy() == 0)  # released just after the last answer
    finally:
        await worker.close()
    assert peak[0] == 2  # the two batches ran side by side
    assert seen_by_job == [0] * 5  # the job started after both, and the later batches waited for it


async def test_a_job_run_beside_takes_one_model_thread_while_batches_run_on_the_other():
    """ModelWorker.run_beside (an uploaded expert's probe forwards): batches go on on the other model thread
    meanwhile; a run() job waits for it, as for a batch; a caller that gives up before it begins leaves it
    unrun; a close answers one that waits for a thread."""
    import torch

    from app.metrics import Metrics
    from app.worker import ModelWorker, ShuttingDown

    release, ran = threading.Event(), []

    def beside(tag):
        ran.append(tag)
        assert release.wait(10)
        return threading.current_thread().name

    worker = ModelWorker(lambda texts: torch.zeros(len(texts), 4), Metrics(), model_threads=2, max_batch=1)
    worker.start()
    try:
        job = asyncio.create_task(worker.run_beside(beside, "probe"))
        await until(lambda: ran == ["probe"])
        for i in range(3):  # on the other thread, while the job holds its own
            assert (await asyncio.wait_for(worker.encode(f"d{i}"), 5)).shape == (4,)
        alone = asyncio.create_task(worker.run(lambda: "alone"))
        await asyncio.sleep(0.1)
        assert not alone.done()  # waits for the thread the job holds
        release.set()
        assert (await asyncio.wait_for(job, 5)).startswith("sglora-torch-") and await asyncio.wait_for(alone, 5) == "alone"

        release.clear()
        first, second = (asyncio.create_task(worker.run_beside(beside, t)) for t in ("a", "b"))
        await until(lambda: ran[-2:] in (["a", "b"], ["b", "a"]))  # two at once, one a thread
        third = asyncio.create_task(worker.run_beside(beside, "gone"))
        await asyncio.sleep(0.05)
        third.cancel()  # waiting for a thread: never runs
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        with pytest.raises(asyncio.CancelledError):
            await third
        await until(lambda: worker.busy == 0)
        assert "gone" not in ran

        release.clear()
        holders = [asyncio.create_task(worker.run_beside(beside, f"h{i}")) for i in range(2)]
        await until(lambda: worker.busy == 2)
        waiting = asyncio.create_task(worker.run_beside(beside, "late"))
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(worker.close())
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(waiting, 5)
        release.set()
        await closing
        await asyncio.gather(*holders)
        assert "late" not in ran
    finally:
        release.set()
        await worker.close()


async def test_the_service_gates_the_split_cvae_layers_with_its_worker_and_lets_go_when_it_stops(make_settings):
    import models.packed as packed

    async with serving(make_settings()) as (service, client):
        assert packed._split_gate == service.worker.alone and packed._split_gate()  # idle: alone
    assert packed._split_gate != service.worker.alone and packed._split_gate()


async def test_a_model_thread_is_alone_only_while_no_other_work_runs_or_waits():
    """ModelWorker.alone, the gate of the CVAE's split layers: a second core only for a lone request."""
    from app.metrics import Metrics
    from app.worker import ModelWorker

    gate, seen = threading.Event(), []

    def embed(texts):
        seen.append((texts[0], worker.alone()))
        if texts == ["hold"]:
            gate.wait(10)
        return torch.zeros(len(texts), 4)

    worker = ModelWorker(embed, Metrics(), finish=lambda e, jobs: list(jobs), threads=1, model_threads=2, max_batch=1)
    worker.start()
    try:
        assert await worker.encode("lone", 0) == 0
        await until(lambda: len(worker._free) == 2)  # its thread handed back (just after the answer)
        held = asyncio.create_task(worker.encode("hold", 1))  # one thread busy
        await until(lambda: len(worker._free) == 1)
        assert await worker.encode("beside", 2) == 2
        gate.set()
        assert await held == 1
    finally:
        await worker.close()
    assert seen == [("lone", True), ("hold", True), ("beside", False)]


async def test_embedding_cache_encodes_only_descriptions_it_has_not_seen():
    import torch

    from app.metrics import Metrics
    from app.worker import ModelWorker

    calls: list[list[str]] = []

    def embed(texts):
        calls.append(list(texts))
        return torch.stack([torch.full((4,), float(len(t))) for t in texts])

    metrics = Metrics()
    events = lambda result: metrics.registry.get_sample_value("sglora_embedding_cache_events_total", {"result": result})  # noqa: E731
    worker = ModelWorker(
        embed,
        metrics,
        finish=lambda e, jobs: [(j, e[i].tolist()) for i, j in enumerate(jobs)],
        threads=1,
        embedding_cache_items=2,
    )
    worker.start()
    try:
        assert await worker.encode("ab", 1) == (1, [2.0] * 4)
        assert await worker.encode("ab", 2) == (2, [2.0] * 4)  # another seed of the same description
        assert calls == [["ab"]] and (events("hit"), events("miss")) == (1, 1)
        # A batch of known and new descriptions encodes the new ones alone, and answers each its own row.
        gate, blocker = block_worker(worker)
        await until(lambda: worker.pending == 1)
        jobs = [asyncio.create_task(worker.encode(t, i)) for i, t in enumerate(["xyz", "ab", "q"])]
        await until(lambda: worker.pending == 4)
        gate.set()
        assert await asyncio.gather(*jobs) == [(0, [3.0] * 4), (1, [2.0] * 4), (2, [1.0] * 4)]
        await blocker
        assert calls[1:] == [["xyz", "q"]]
        assert worker.metrics.registry.get_sample_value("sglora_batch_size_sum") == 3  # texts the encoder saw
        # Two entries at most, least recently used out first: "ab" was evicted by "xyz" and "q".
        assert torch.equal(await worker.encode("ab"), torch.full((4,), 2.0))
        assert calls[-1] == ["ab"] and len(worker.embeddings) == 2
        assert (events("hit"), events("miss")) == (2, 4)
    finally:
        await worker.close()


async def test_embedding_cache_off_encodes_every_time():
    import torch

    from app.metrics import Metrics
    from app.worker import ModelWorker

    calls = []
    worker = ModelWorker(lambda texts: (calls.append(texts), torch.zeros(len(texts), 4))[1], Metrics(), threads=1)
    worker.start()
    try:
        for _ in range(3):
            await worker.encode("same")
        assert len(calls) == 3 and len(worker.embeddings) == 0
    finally:
        await worker.close()


async def test_repeated_description_skips_the_text_encoder_with_the_same_bytes(make_settings):
    """A request without a seed is never looked up in Redis; its description's embedding is reused, and a
    seeded LoRA made from a reused embedding is byte for byte the one a fresh encoding makes."""
    body = {"description": "a striped shape, seen before"}
    async with serving(make_settings(embedding_cache_items=0)) as (_, client):
        fresh = await client.post("/generate", json={**body, "seed": 7})
    async with serving(make_settings()) as (service, client):
        calls = []
        embed = service.worker._embed
        service.worker._embed = lambda texts: (calls.append(list(texts)), embed(texts))[1]
        first = await client.post("/generate", json=body)  # no seed: drawn, Redis not asked
        again = await client.post("/generate", json={**body, "seed": 7})
        assert first.status_code == again.status_code == 200 and again.headers["x-cache"] == "miss"
        assert calls == [[body["description"]]]
        assert again.content == fresh.content
        text = (await client.get("/metrics")).text
        hits = [
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "sglora_embedding_cache_events_total" and s.labels["result"] == "hit"
        ]
        assert hits == [1.0]


async def test_generation_on_two_model_threads_gives_the_bytes_of_one(make_settings):
    async with serving(make_settings(model_threads=2, max_batch=3)) as (service, client):
        assert (await client.get("/ready")).json()["model_threads"] == 2
        bodies = [{"description": f"a shape of kind {i}", "seed": i} for i in range(12)]
        responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        assert [r.status_code for r in responses] == [200] * 12
        engine = service.engine
        for b, r in zip(bodies, responses, strict=True):
            alone = engine.generate(engine.embed([b["description"]])[0], "sg-lora", seed=b["seed"]).lora
            got = from_peft_tensors(service.spec, load_safetensors(r.content))
            assert got.numpy().tobytes() == alone.numpy().tobytes(), b


@pytest.mark.parametrize(
    ("threads", "model_threads", "device", "cores", "expected"),
    [
        (0, 0, "cpu", 16, (15, 1)),  # one single-threaded model thread per spare core
        (0, 0, "cpu", 2, (2, 1)),  # two cores: both, beside the event loop (1.4x the answers per second)
        (0, 1, "cpu", 2, (1, 1)),
        (2, 0, "cpu", 2, (1, 2)),
        (0, 0, "cpu", 1, (1, 1)),
        (4, 0, "cpu", 16, (3, 4)),
        (0, 3, "cpu", 16, (3, 5)),
        (2, 2, "cpu", 16, (2, 2)),
        (0, 0, "cuda", 16, (1, 15)),
        (0, 2, "cuda:1", 16, (2, 15)),
    ],
)
def test_parallelism_defaults(monkeypatch, threads, model_threads, device, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)
    assert Settings(threads=threads, model_threads=model_threads).resolved_parallelism(device) == expected


# ---- text tower dtype ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "device", "flags", "expected"),
    [
        ("auto", "cpu", "fpu avx512f avx512_bf16 avx512_vnni", "bfloat16"),
        ("auto", "cpu", "fpu amx_bf16 amx_tile", "bfloat16"),
        ("auto", "cpu", "fpu avx2 avx512f", "float32"),  # bf16 would be emulated: slower than float32
        ("auto", "cuda", "fpu avx512_bf16", "float32"),
        ("float32", "cpu", "fpu avx512_bf16", "float32"),
        ("bfloat16", "cpu", "fpu avx2", "bfloat16"),
        (None, "cpu", "fpu amx_bf16 amx_tile", "bfloat16"),  # None: the settings' defaults, 'auto' both
        (None, "cpu", "fpu avx2 avx512f", "float32"),
    ],
)
def test_text_and_generator_dtype_defaults(monkeypatch, tmp_path, setting, device, flags, expected):
    from app import settings as settings_module

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    real = settings_module.cpu_has_bf16
    monkeypatch.setattr(settings_module, "cpu_has_bf16", lambda: real(cpuinfo))
    if setting is None:
        text = generator = Settings()
    else:
        text, generator = Settings(text_dtype=setting), Settings(generator_dtype=setting)
    assert text.resolved_text_dtype(device) == expected
    assert generator.resolved_generator_dtype(device) == expected  # the same rule
    assert not real(tmp_path / "no-such-file")  # no /proc (not Linux): float32


async def test_bfloat16_text_tower_batches_bit_identically_and_has_its_own_cache_entries(make_settings, tiny_artifacts_session):
    from sglora.artifacts import load_artifacts

    settings = make_settings(text_dtype="bfloat16", max_batch=4, batch_wait_ms=50)
    async with serving(settings) as (service, client):
        ready = (await client.get("/ready")).json()
        assert ready["text_dtype"] == "bfloat16" and ready["max_batch"] == 4  # the start-up check found it batch-invariant
        bodies = [{"description": f"a bf16 shape {i}", "seed": i} for i in range(6)]
        responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        assert [r.status_code for r in responses] == [200] * 6
        assert file_metadata(responses[0].content)["text_dtype"] == "bfloat16"
        metrics = (await client.get("/metrics")).text
        assert 'text_dtype="bfloat16"' in metrics
    # The library with its text tower in bfloat16 makes the same bytes, row by row.
    reference = load_artifacts(tiny_artifacts_session, "auto")  # the service's device
    reference.backbone.set_text_dtype(torch.bfloat16)
    engine = reference.engine
    for b, r in zip(bodies, responses, strict=True):
        alone = engine.generate(engine.embed([b["description"]])[0], "sg-lora", seed=b["seed"]).lora
        got = from_peft_tensors(reference.backbone.spec, load_safetensors(r.content))
        assert got.numpy().tobytes() == alone.numpy().tobytes(), b
    # A float32 server on the same Redis prefix does not answer from the bfloat16 entries.
    async with serving(settings.model_copy(update={"text_dtype": "float32"})) as (service32, client32):
        r32 = await client32.post("/generate", json=bodies[0])
        assert r32.status_code == 200 and r32.headers["x-cache"] == "miss"
        assert file_metadata(r32.content)["text_dtype"] == "float32"


async def test_the_text_tower_runs_as_a_traced_graph_with_the_eager_forwards_bytes(make_settings):
    bodies = [{"description": f"a traced shape {i}" + " and more" * i, "seed": i} for i in range(5)]
    async with serving(make_settings(max_batch=4, batch_wait_ms=50)) as (service, client):
        ready = (await client.get("/ready")).json()
        assert ready["text_graph"] == ("traced" if service.device == "cpu" else "eager") and ready["max_batch"] == 4
        traced = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    async with serving(make_settings(text_graph="eager")) as (service, client):  # another cache prefix: all misses
        assert (await client.get("/ready")).json()["text_graph"] == "eager"
        for b, r in zip(bodies, traced, strict=True):
            eager = await client.post("/generate", json=b)
            assert eager.headers["x-cache"] == "miss" and r.status_code == 200 and eager.content == r.content, b


async def test_a_text_graph_that_cannot_be_traced_leaves_the_eager_forward_and_says_why(make_settings, monkeypatch, caplog):
    def fails(module, example, **kw):
        raise RuntimeError("an op the tracer cannot record")

    monkeypatch.setattr(torch.jit, "trace", fails)
    async with serving(make_settings()) as (service, client):
        assert (await client.get("/ready")).json()["text_graph"] == "eager"
        assert (await client.post("/generate", json={"description": "still served", "seed": 1})).status_code == 200
    if service.device == "cpu":
        assert "the text tower runs eagerly: tracing failed (RuntimeError: an op the tracer cannot record)" in caplog.text


async def test_bfloat16_generator_batches_bit_identically_and_has_its_own_cache_entries(make_settings, tiny_artifacts_session):
    from sglora.artifacts import load_artifacts

    reference = load_artifacts(tiny_artifacts_session, "auto")  # the service's device
    if reference.generator.x_mean.device.type != "cpu":
        pytest.skip("a GPU service refuses bfloat16 sampling (a CPU-only option)")
    if not onednn_reorders_bfloat16():
        pytest.skip("oneDNN reorders no bfloat16 weights on this CPU (the service refuses the setting; tested elsewhere)")
    assert reference.generator.packed(torch.bfloat16) is not None
    settings = make_settings(generator_dtype="bfloat16", max_batch=4, batch_wait_ms=50)
    bodies = [{"description": f"a bf16 sample {i}", "seed": i} for i in range(6)]
    async with serving(settings) as (service, client):
        ready = (await client.get("/ready")).json()
        assert ready["generator_dtype"] == "bfloat16" and ready["text_dtype"] == "float32"
        responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        assert [r.status_code for r in responses] == [200] * 6
        assert {file_metadata(r.content)["generator_dtype"] for r in responses} == {"bfloat16"}
        assert 'generator_dtype="bfloat16"' in (await client.get("/metrics")).text
        soup = await client.post("/generate", json={"description": "a bf16 sample 0", "method": "topk-weighted"})
        assert file_metadata(soup.content)["generator_dtype"] == ""  # no sample, no generator dtype
    # The library sampling in bfloat16 makes the same bytes, row by row, within ~1e-2 of float32's.
    engine = reference.engine
    float32 = [engine.generate(engine.embed([b["description"]])[0], "sg-lora", seed=b["seed"]).lora for b in bodies]
    engine.set_generator_dtype(torch.bfloat16)
    for b, r, lora32 in zip(bodies, responses, float32, strict=True):
        alone = engine.generate(engine.embed([b["description"]])[0], "sg-lora", seed=b["seed"]).lora
        got = from_peft_tensors(reference.backbone.spec, load_safetensors(r.content))
        assert got.numpy().tobytes() == alone.numpy().tobytes(), b
        assert not torch.equal(got, lora32) and float((got - lora32).norm() / lora32.norm()) < 1e-2
    # A float32 server on the same Redis prefix does not answer samples from the bfloat16 entries; the
    # deterministic methods never sampled, so their entries are shared.
    async with serving(settings.model_copy(update={"generator_dtype": "float32"})) as (service32, client32):
        r32 = await client32.post("/generate", json=bodies[0])
        assert r32.status_code == 200 and r32.headers["x-cache"] == "miss"
        assert file_metadata(r32.content)["generator_dtype"] == "float32"
        again = await client32.post("/generate", json={"description": "a bf16 sample 0", "method": "topk-weighted"})
        assert again.headers["x-cache"] == "hit" and again.content == soup.content


def test_generator_dtype_that_cannot_run_refuses_to_start(make_settings, monkeypatch):
    from models.cvae import CVAE

    monkeypatch.setattr(CVAE, "packed", lambda self, dtype=torch.float32: None)
    with pytest.raises(ArtifactError, match="SGLORA_GENERATOR_DTYPE=bfloat16: .*cannot sample in torch.bfloat16"):
        with TestClient(create_app(make_settings(generator_dtype="bfloat16"))):
            pass


def test_generator_dtype_auto_falls_back_to_float32_without_bfloat16_kernels(make_settings, monkeypatch, caplog):
    """'auto' goes by the CPU's flags; a torch build without oneDNN's bfloat16 kernels on such a CPU must
    still start (in float32, with a warning), as an explicit SGLORA_GENERATOR_DTYPE=bfloat16 does not."""
    from app import settings as settings_module
    from models.cvae import CVAE

    packed = CVAE.packed
    monkeypatch.setattr(settings_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(CVAE, "packed", lambda self, dtype=torch.float32: packed(self, dtype) if dtype == torch.float32 else None)
    with caplog.at_level(logging.WARNING, logger="sglora.service"):
        # On the CPU: on a GPU 'auto' is float32 whatever the CPU's flags, and nothing falls back.
        with TestClient(create_app(make_settings(generator_dtype="auto", device="cpu"))) as c:
            ready = c.get("/ready").json()
            r = c.post("/generate", json={"description": "a photo of a cat", "seed": 1})
    assert ready["generator_dtype"] == "float32" and r.status_code == 200
    assert file_metadata(r.content)["generator_dtype"] == "float32"
    assert "SGLORA_GENERATOR_DTYPE=auto" in caplog.text and "sampling in float32" in caplog.text


def test_text_dtype_that_the_backbone_cannot_run_refuses_to_start(make_settings, monkeypatch):
    from models.open_clip_backbone import OpenClipBackbone

    def fail(self, dtype):
        raise ValueError("OpenClipBackbone runs its text tower in float32 only")

    monkeypatch.setattr(OpenClipBackbone, "_cast_text", fail)
    with pytest.raises(ArtifactError, match="SGLORA_TEXT_DTYPE=bfloat16: .*float32 only"):
        with TestClient(create_app(make_settings(text_dtype="bfloat16"))):
            pass


def _slow_server(artifacts, tmp_path, port: int, job_s: float, env: dict[str, str], *args: str):
    """``python -m app`` whose model jobs (the warm-up too) each sleep ``job_s``, logging to tmp_path/server.log:
    (the process, the open log file, to close once it has exited)."""
    from app.processes import start_server

    env = {
        **os.environ,
        "SGLORA_ARTIFACTS": str(artifacts),
        "SGLORA_REDIS_URL": "",
        "SGLORA_TEST_MODEL_DELAY_S": str(job_s),
        "SGLORA_BATCH_INVARIANCE": "ignore",  # one slow start-up job (the warm-up), not two
        **env,
    }
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the server writes it until it exits
    return start_server(port, env, *args, stdout=log, stderr=subprocess.STDOUT), log


def _sigterm(proc: subprocess.Popen, timeout: float) -> float:
    """SIGTERM to ``proc``; the seconds until it exited, with status 0."""
    import signal
    import time

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=timeout) == 0
    return time.monotonic() - t0


def test_shutdown_does_not_wait_past_its_timeout_for_a_running_job(tiny_artifacts_session, tmp_path):
    """SIGTERM with a job on the model thread whose request uvicorn cut off at --graceful-timeout: the
    lifespan waits SGLORA_SHUTDOWN_TIMEOUT_S for it, then logs it and the process ends without it (Python
    would otherwise join the thread at exit, for as long as the job takes: a hung device, forever)."""
    import time

    from app.processes import free_port, wait_ready

    port, job_s = free_port(), 8.0
    proc, log = _slow_server(
        tiny_artifacts_session, tmp_path, port, job_s, {"SGLORA_SHUTDOWN_TIMEOUT_S": "0.5"}, "--graceful-timeout", "0.5"
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120)
        answers = []
        sent = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"http://127.0.0.1:{port}/generate",
                    json={"description": "slow"},
                    headers={"X-Request-ID": "cut-off-1"},
                    timeout=30,
                )
            ),
            daemon=True,
        )
        sent.start()
        end = time.monotonic() + 30
        while metric_sum(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text, "sglora_model_threads_busy") < 1:
            assert time.monotonic() < end, "the job never reached the model thread"
            time.sleep(0.02)
        took = _sigterm(proc, 60)  # the job is on the model thread now
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "model thread(s) still busy after 0.5 s; not waiting for them" in text
    # The request uvicorn cut off at --graceful-timeout: a 503 in the service's shape, not uvicorn's plain 500.
    sent.join(timeout=10)
    (cut,) = answers
    assert cut.status_code == 503 and cut.headers["x-request-id"] == "cut-off-1" and cut.headers["retry-after"] == "1"
    assert "stopped before this request finished" in cut.json()["detail"]["reason"]
    assert took < job_s - 3, f"the process waited {took:.1f} s for a job of {job_s} s"
    # Answered, so not logged as a crash: each request cut off logged a traceback (log-based alerting).
    assert "Exception in ASGI application" not in text and "Traceback" not in text, text


def test_a_second_sigterm_while_the_process_exits_keeps_status_0(tiny_artifacts_session, tmp_path):
    """After a graceful stop Python takes a second or two to exit (torch's teardown); a second SIGTERM then (an
    orchestrator's repeat) killed it with 143."""
    import signal
    import time

    from app.processes import ROOT, free_port, wait_ready

    port = free_port()
    env = {**os.environ, "SGLORA_ARTIFACTS": str(tiny_artifacts_session), "SGLORA_REDIS_URL": ""}
    # `python -m app`, with a teardown as slow as the service's own (an exit handler that sleeps)
    code = "import atexit, sys, time; atexit.register(time.sleep, 2); from app.serve import main; sys.exit(main(sys.argv[1:]))"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the server writes it until it exits
    cmd = [sys.executable, "-c", code, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "Finished server process" not in (tmp_path / "server.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_sigterm_during_start_up_stops_at_once(tiny_artifacts_session, tmp_path):
    """uvicorn looks at a stop request only after the lifespan start-up; a slow start-up (here a warm-up
    job of 30 s) must not hold a SIGTERM for that long."""
    import time

    from app.processes import free_port

    log_path = tmp_path / "server.log"
    proc, log = _slow_server(tiny_artifacts_session, tmp_path, free_port(), 30.0, {})
    try:
        deadline = time.monotonic() + 60
        while "Waiting for application startup" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        time.sleep(0.5)  # into the lifespan: loading or the warm-up
        took = _sigterm(proc, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "SIGTERM during start-up: stopped" in log_path.read_text()
    assert took < 10, f"the process took {took:.1f} s to stop"  # not the warm-up's 30 s


def test_the_alerted_request_series_exist_from_the_start_for_real_routes(make_settings):
    from app.metrics import ALERTED_STATUSES, MODEL_ENDPOINTS, leaf_routes

    app = create_app(make_settings())
    posts = {r.path for r in leaf_routes(app.routes) if "POST" in (getattr(r, "methods", None) or ())}
    assert set(MODEL_ENDPOINTS) <= posts  # a renamed route cannot leave a dead pre-created series behind
    with TestClient(app) as c:
        samples = {
            (s.labels["endpoint"], s.labels["method"], s.labels["status"]): s.value
            for f in text_string_to_metric_families(c.get("/metrics").text)
            for s in f.samples
            if s.name == "sglora_requests_total"
        }
    for endpoint in MODEL_ENDPOINTS:
        for status in ALERTED_STATUSES:
            assert samples[(endpoint, "POST", status)] == 0


async def test_start_up_turns_fixed_row_blocks_on_where_they_make_batching_invariant(make_settings, monkeypatch):
    # On AMX CPUs the text tower's long reductions were blocked by row count: the check failed and batching
    # went off. The service now retries with fixed-row blocks, keeps them only if that passes.
    import app.service as svc
    from models.backbone import Backbone
    from models.packed import FIXED_ROWS

    rows: dict[str, int | None] = {"now": None}

    def set_rows(self, n):
        rows["now"] = n
        return 6

    monkeypatch.setattr(Backbone, "set_text_fixed_rows", set_rows)
    monkeypatch.setattr(Backbone, "text_fixed_rows", property(lambda self: rows["now"]))
    monkeypatch.setattr(svc, "batching_mismatch", lambda embed, probes, n: None if rows["now"] else "row 3 differs")
    async with serving(make_settings()) as (service, client):
        ready = (await client.get("/ready")).json()
        assert ready["max_batch"] > 1 and ready["text_fixed_rows"] == FIXED_ROWS
        assert service.text_numerics == f"{service.text_dtype}/rows{FIXED_ROWS}"  # in the cache key
        assert len(service.worker.embeddings) == 0  # the warm-up's embedding, made without blocks, dropped
    monkeypatch.setattr(svc, "batching_mismatch", lambda embed, probes, n: "row 3 differs")  # blocks do not help
    async with serving(make_settings()) as (service, client):
        ready = (await client.get("/ready")).json()
        assert ready["max_batch"] == 1 and ready["text_fixed_rows"] is None and rows["now"] is None
        assert service.text_numerics == service.text_dtype


def test_sigterm_while_the_server_imports_its_modules_exits_0(tmp_path, monkeypatch):
    """The docs promise status 0 for a signal before the server is ready; importing torch and uvicorn
    takes a second or more before app/serve.py installs its handlers, and a SIGTERM then ended
    `python -m app` with -15 and `sglora serve` with 143."""
    import signal
    import sys
    import time
    from pathlib import Path

    from sglora import cli

    def importing(args):  # the SIGTERM lands while cmd_serve imports app.serve
        raise cli.Terminated(signal.SIGTERM)

    monkeypatch.setattr(cli, "cmd_serve", importing)
    assert cli.main(["serve", "--artifacts", str(tmp_path)]) == 0

    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc to see when the process handles SIGTERM")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--artifacts", str(tmp_path / "nowhere"), "--port", "0"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:  # SIGTERM handled, torch not loaded yet: inside the imports
            assert proc.poll() is None and time.monotonic() < deadline, "never saw the import window"
            try:
                lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                caught = int(next(x for x in lines if x.startswith("SigCgt:")).split()[1], 16)
                loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
            except (OSError, StopIteration):
                caught, loaded = 0, False
            if caught & (1 << (signal.SIGTERM - 1)) and not loaded:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "SIGTERM during start-up: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_while_the_server_imports_its_modules_exits_0(tmp_path, monkeypatch, capsys):
    """Ctrl-C (SIGINT, a KeyboardInterrupt) in the same window ends `sglora serve` with status 0 too, as it
    ends `python -m app` and a later start-up; it gave 130. Other commands still give 130."""
    from sglora import cli

    def importing(args):  # the KeyboardInterrupt lands while cmd_serve imports app.serve
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_serve", importing)
    assert cli.main(["serve", "--artifacts", str(tmp_path)]) == 0
    assert "SIGINT during start-up: stopped" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_select", importing)
    assert cli.main(["select", "x", "--artifacts", str(tmp_path)]) == 130


def test_sglora_serve_forwards_an_explicit_device_even_auto(monkeypatch):
    """--device auto was dropped on the way to app.serve, so an exported SGLORA_DEVICE=cpu still won."""
    import app.serve
    from sglora import cli

    seen: list[list[str]] = []
    monkeypatch.setattr(app.serve, "main", lambda argv, prog: seen.append(argv) or 0)
    for extra in ([], ["--device", "auto"], ["--device", "cuda:1"]):
        assert cli.main(["serve", "--artifacts", "somewhere", *extra]) == 0
    devices = [argv[argv.index("--device") + 1] if "--device" in argv else None for argv in seen]
    assert devices == [None, "auto", "cuda:1"]  # none given: $SGLORA_DEVICE or auto, as app.serve reads it


def test_the_app_gives_torch_thread_count_back_when_it_stops_or_fails_to_start(make_settings, tmp_path):
    """The service sets torch's thread count for the process (new threads inherit it); an app run inside a
    larger process (a notebook, this test session) gives the caller's count back when it stops, and when its
    start fails after setting it."""

    def seen_by_a_new_thread() -> int:
        out = []
        t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
        t.start()
        t.join()
        return out[0]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # none of the settings below asks for 3
        with TestClient(create_app(make_settings(threads=1))) as c:
            assert c.get("/ready").status_code == 200
            assert c.portal.call(asyncio.to_thread, seen_by_a_new_thread) == 1  # the service's count meanwhile
        assert seen_by_a_new_thread() == 3
        with pytest.raises(ArtifactError), TestClient(create_app(make_settings(threads=1, artifacts=tmp_path / "none"))):
            pass
        assert seen_by_a_new_thread() == 3
    finally:
        torch.set_num_threads(before)

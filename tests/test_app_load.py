"""scripts/loadtest.py, small: a few clients for a few seconds against a server it starts itself.

The full run (200 clients x 60 s) is in docs/benchmarks.md ("Service under load"). Here the queue holds a single
job, so the server has to refuse with 429s: the script must see them carry Retry-After, honour them,
and count nothing else as an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# The scripts import this checkout's packages (not those of another checkout installed in the venv).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_loadtest_script_few_clients_no_errors_but_429s(tiny_artifacts_session, tmp_path):
    out = tmp_path / "load.json"
    env = {**ENV, "SGLORA_MAX_QUEUE": "1", "SGLORA_RETRY_AFTER_S": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--artifacts", str(tiny_artifacts_session)]
    cmd += ["--clients", "8", "--duration", "3", "--warmup", "1", "--new-fraction", "0.6", "--max-rss-growth", "0.25"]
    cmd += ["--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    result = json.loads(out.read_text())
    run = result["run"]
    assert run["errors"] == 0 and result["warmup"]["errors"] == 0, run["error_samples"]
    assert set(run["statuses"]) <= {"200", "429"} and run["statuses"]["200"] > 20
    assert run["throttled_429"] > 0  # deliberate back-pressure happened, with Retry-After
    assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
    assert result["rss_mib"]["after_run"] > 0 and result["server_exit"] == 0
    # The server's own view of the same phase: every answered /generate is a hit or a miss there; the
    # counts differ from the client's by at most the requests in flight when the phase began and ended.
    server = result["server_latency_ms_by_cache"]
    assert set(server) == {"hit", "miss"}
    assert abs(server["hit"]["requests"] + server["miss"]["requests"] - run["statuses"]["200"]) <= 2 * 8
    assert all(0 < q["p50"] <= q["p90"] <= q["p99"] for q in server.values())
    assert "server's own histogram" in p.stdout and "PASS" in p.stdout


def test_loadtest_pauses_redis_and_the_timeline_shows_the_service_failing_open(tiny_artifacts_session, tmp_path):
    """--redis-pause stalls the run's private Redis past the cache timeout: the server logs its back-off,
    every answer stays a 200, and the per-second timeline adds up to the run's counts; the plot script
    draws it."""
    out = tmp_path / "load.json"
    env = {**ENV, "SGLORA_REDIS_TIMEOUT_S": "0.1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--artifacts", str(tiny_artifacts_session)]
    cmd += ["--clients", "8", "--duration", "4", "--warmup", "1", "--max-rss-growth", "0.25", "--redis-pause", "1.5:600"]
    cmd += ["--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "skipping the cache" in p.stdout + p.stderr  # a Redis call timed out during the pause
    result = json.loads(out.read_text())
    run, t = result["run"], result["run"]["timeline"]
    assert result["redis_pauses"] == [{"at_s": 1.5, "ms": 600}] and result["environment"]["SGLORA_REDIS_TIMEOUT_S"] == "0.1"
    assert run["errors"] == 0 and set(run["statuses"]) == {"200"}
    assert len(t["answers"]) >= 5 and sum(t["answers"]) == run["requests"] and sum(t["hits"]) == run["cache_hits"]
    assert sum(t["throttled_429"]) == run["throttled_429"] and sum(t["errors"]) == 0

    figure = tmp_path / "timeline.png"
    plot = [sys.executable, str(ROOT / "scripts" / "plot_loadtest.py"), str(out), "--label", "paused", "--out", str(figure)]
    p = subprocess.run(plot, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "old.json").write_text(json.dumps({"run": {"requests": 1}}))
    p = subprocess.run([*plot[:2], str(tmp_path / "old.json")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no run timeline" in p.stderr and "Traceback" not in p.stderr


def test_a_redis_pause_that_fails_fails_the_run_with_a_message(tiny_artifacts_session, tmp_path):
    """No Redis where --redis-url points: the server fails open, the pause cannot be made, and the run
    says so (exit 1, the JSON and the report written) instead of a traceback."""
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--artifacts", str(tiny_artifacts_session)]
    cmd += ["--redis-url", "redis://127.0.0.1:1/0", "--clients", "2", "--duration", "2", "--warmup", "0"]
    cmd += ["--redis-pause", "0.5:100", "--max-rss-growth", "1", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr[-3000:]
    assert "FAIL: CLIENT PAUSE at 0.5 s failed: ConnectionError" in p.stdout
    result = json.loads(out.read_text())
    assert result["run"]["errors"] == 0 and result["failures"] == result["run"]["redis_pause_errors"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--redis-pause", "5:100", "--duration", "3"], "inside the measured --duration"),
        (["--redis-pause", "1:100", "--redis-url", "none"], "needs the server's Redis"),
        (["--redis-pause", "soon"], "expected AT:MS"),
        (["--redis-pause", "1:0"], "MS > 0"),
        (["--redis-pause", "nan:100"], "AT must be >= 0"),
    ],
)
def test_loadtest_refuses_a_redis_pause_it_cannot_make(tmp_path, args, message):
    cmd = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--artifacts", str(tmp_path), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr


def test_loadtest_bucket_quantile_interpolates_as_prometheus_does():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from loadtest import bucket_quantile
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    buckets = [(0.1, 50.0), (0.5, 90.0), (float("inf"), 100.0)]  # cumulative
    assert bucket_quantile(0.5, buckets) == 0.1
    assert bucket_quantile(0.7, buckets) == pytest.approx(0.3)
    assert bucket_quantile(0.9, buckets) == pytest.approx(0.5)
    assert bucket_quantile(0.95, buckets) == 0.5  # in +Inf: the highest finite bound, as histogram_quantile
    assert bucket_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_bench_service_script_small_run_reports_every_ratio(tiny_artifacts_session, private_redis, tmp_path):
    """scripts/bench_service.py end to end, small: it checks X-Cache of every answer and the server's
    text-embedding cache counts of every lone block itself (a miss that comes back as a hit, a measured
    miss that skipped the text encoder, or the reverse, ends the run), so a completed run means both
    caches behaved."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_service.py"), "--artifacts", str(tiny_artifacts_session)]
    cmd += ["--redis-url", private_redis.url, "--threads", "1", "--requests", "8", "--throughput-requests", "32"]
    cmd += ["--clients", "4", "--text-dtype", "bfloat16", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    r = json.loads(out.read_text())
    default_threads = Settings(threads=1).resolved_parallelism("cpu")[0]  # the script leaves the server its default
    assert r["redis"] == "ok" and r["model_threads"] == default_threads and r["text_dtype"] == "bfloat16"
    assert r["generator_dtype"] in ("float32", "bfloat16")  # the server's, as /ready reports it
    assert r["hits_from_memory"] == 1.0  # the hot keys, on by default
    for key in ("bare_embed_ms", "bare_after_idle_ms", "miss_ms", "hit_ms", "miss_seen_ms", "rps_1", "rps_4"):
        assert r[key] > 0, key
    assert r["miss_over_bare"] == r["miss_ms"] / r["bare_embed_ms"]
    assert r["miss_seen_over_bare"] == r["miss_seen_ms"] / r["bare_embed_ms"]
    assert r["throughput_ratio"] == r["rps_4"] / r["rps_1"]
    assert 1 <= r["mean_batch"] <= 4
    lone = r["lone_miss_ms"]  # the server's own clock sits inside the client's, its model stages inside it
    assert 0 < lone["text_encoding"] + lone["prior"] + lone["sampling"] < lone["server"] <= lone["client"]
    for clients in (1, 4):  # where the CPU of the throughput blocks went (/proc counts in 10 ms ticks: loose bounds)
        cpu = r[f"cpu_ms_per_request_{clients}"]
        assert cpu["server"] > 0.25 * r["bare_embed_ms"] and cpu["clients"] > 0 and cpu["redis"] >= 0, cpu
        assert 0 < cpu["cores"] <= (os.cpu_count() or 1) + 0.5, cpu
    assert "CPU per request, 4 client(s): server" in p.stdout
    assert r["stampede_made_per_round"] == 1.0 and r["stampede_ms"] > 0  # 4 identical requests at once: one LoRA made
    assert "4 clients sending one new request at once" in p.stdout
    assert "| `/generate` cache miss, median |" in p.stdout
    assert "| the same forward after 5 ms of idle each (for reference, not the target's measure) |" in p.stdout


def test_bench_service_script_spreads_the_many_clients_over_replicas(tiny_artifacts_session, private_redis, tmp_path):
    """--replicas 2: two servers side by side on one Redis; the many-client blocks and the stampede use both
    (their batches and CPU are summed over both), the lone measures the first."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_service.py"), "--artifacts", str(tiny_artifacts_session)]
    cmd += ["--redis-url", private_redis.url, "--threads", "1", "--model-threads", "1", "--requests", "4"]
    cmd += ["--throughput-requests", "32", "--clients", "4", "--replicas", "2", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["replicas"] == 2 and r["model_threads"] == 1
    assert r["throughput_ratio"] == r["rps_4"] / r["rps_1"] and r["rps_4"] > 0
    # Each replica micro-batches its own requests: a batch holds at most its 2 connections' descriptions.
    assert 1 <= r["mean_batch"] <= 2
    # 4 identical requests, 2 to each replica: one LoRA per replica, or one in all when the second replica
    # finds the first one's in Redis.
    assert 1.0 <= r["stampede_made_per_round"] <= 2.0
    assert "2 replicas of this: 4 clients and the stampede over all" in p.stdout
    assert r["cpu_ms_per_request_4"]["server"] > 0


def test_bench_service_script_measures_workers_behind_one_address(tiny_artifacts_session, private_redis, tmp_path):
    """--workers 2: one server of two worker processes; its CPU counts both, its metrics are their sums."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_service.py"), "--artifacts", str(tiny_artifacts_session)]
    cmd += ["--redis-url", private_redis.url, "--requests", "4", "--throughput-requests", "32", "--clients", "4"]
    cmd += ["--workers", "2", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["workers"] == 2 and r["replicas"] == 1 and r["rps_4"] > 0
    # The summed metrics saw every request: the embeddings checks of the lone blocks passed, and the many
    # clients' batches (each worker's at most its connections' descriptions) were counted.
    assert 1 <= r["mean_batch"] <= 4
    assert 1.0 <= r["stampede_made_per_round"] <= 2.0  # one LoRA per worker at most
    assert "`--workers 2`: that many processes behind the address" in p.stdout

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

ROOT = Path(__file__).resolve().parents[1]


def test_loadtest_script_few_clients_no_errors_but_429s(tiny_artifacts_session, tmp_path):
    out = tmp_path / "load.json"
    env = {**os.environ, "SGLORA_MAX_QUEUE": "1", "SGLORA_RETRY_AFTER_S": "1", "OMP_WAIT_POLICY": "PASSIVE"}
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
    assert "PASS" in p.stdout


def test_bench_service_script_small_run_reports_every_ratio(tiny_artifacts_session, shared_redis, tmp_path):
    """scripts/bench_service.py end to end, small: it checks X-Cache of every answer and the server's
    text-embedding cache counts of every lone block itself (a miss that comes back as a hit, a measured
    miss that skipped the text encoder, or the reverse, ends the run), so a completed run means both
    caches behaved."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_service.py"), "--artifacts", str(tiny_artifacts_session)]
    cmd += ["--redis-url", shared_redis[0], "--threads", "1", "--requests", "8", "--throughput-requests", "32"]
    cmd += ["--clients", "4", "--text-dtype", "bfloat16", "--json", str(out)]
    p = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["redis"] == "ok" and r["model_threads"] == 1 and r["text_dtype"] == "bfloat16"
    for key in ("bare_embed_ms", "miss_ms", "hit_ms", "miss_seen_ms", "rps_1", "rps_4"):
        assert r[key] > 0, key
    assert r["miss_over_bare"] == r["miss_ms"] / r["bare_embed_ms"]
    assert r["miss_seen_over_bare"] == r["miss_seen_ms"] / r["bare_embed_ms"]
    assert r["throughput_ratio"] == r["rps_4"] / r["rps_1"]
    assert 1 <= r["mean_batch"] <= 4
    lone = r["lone_miss_ms"]  # the server's own clock sits inside the client's, its model stages inside it
    assert 0 < lone["text_encoding"] + lone["prior"] + lone["sampling"] < lone["server"] <= lone["client"]
    assert "| `/generate` cache miss, median |" in p.stdout

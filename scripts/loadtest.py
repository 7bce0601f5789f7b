"""Load test: many concurrent clients against /generate on loopback, mixed repeated and new descriptions.

    python scripts/loadtest.py --artifacts artifacts/offline-default            # starts the server itself
    python scripts/loadtest.py --url http://127.0.0.1:8000 [--pid 1234]         # an already running server
    python scripts/loadtest.py --artifacts DIR --clients 200 --duration 60 --warmup 15 --json out.json

Every client is one asyncio task with its own keep-alive HTTP/1.1 connection (a minimal client on
``asyncio.open_connection``: the load generator shares the machine with the server and must stay cheap).
Each request is, by default, with probability 0.3 a NEW description (unseeded sg-lora: always a cache
miss, through the text encoder, the prior and the CVAE), else one of 48 REPEATED requests (fixed seed
or a deterministic method: a cache hit after the first), 10 % of those as a PEFT zip. A warm-up phase runs
the same mix first; the server's resident memory (VmRSS from /proc/<pid>/status) is read after the
warm-up and after the measured phase.

Pass (exit 0): no error (anything but 200, or a 429 that carries Retry-After; a 429 is then honoured
by sleeping Retry-After) and resident memory after the run within --max-rss-growth of after warm-up.
Reports p50/p90/p99/max latency, throughput, status counts, cache hits and the mean micro-batch size,
and /generate's latency per cache result as the server's own histogram has it over the measured phase
(quantiles interpolated within its buckets, as Prometheus's histogram_quantile does): the difference to
the client's is time outside the app (connection queues, this load generator).

The JSON also holds each phase's timeline: per second of the phase, the answers, the cache hits, the
429s and the errors. ``--redis-pause AT:MS`` (repeatable) has Redis hold every client's commands for MS
milliseconds (``CLIENT PAUSE``), AT seconds into the measured phase: a Redis that stalls under load, to
see the cache fail open and come back (``scripts/plot_loadtest.py`` draws the timelines).

Started by this script (``--artifacts``), the server is ``python -m app`` on a free loopback port without
access log, with SGLORA_THREADS (default 1) and OMP_WAIT_POLICY=PASSIVE, and by default a private
``redis-server`` (``--maxmemory 256mb --maxmemory-policy allkeys-lru``, no persistence) on another free
port, so the run never fills a shared Redis; ``--redis-url URL`` uses that one with a fresh key prefix
deleted at the end, ``--redis-url none`` runs uncached. Only 127.0.0.1 is ever contacted; every loop is
bounded by the deadline and by --max-requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from app import processes
from sglora.io import atomic_path, output_path_problem

SUBJECTS = [
    "sandal", "sneaker", "ankle boot", "coat", "dress", "shirt", "trouser", "bag", "pullover", "t-shirt",
    "circle", "square", "cross", "ring", "sunflower", "tulip", "daisy", "rose", "tabby cat", "beagle",
    "robin", "sparrow", "penguin", "owl",
]  # fmt: skip
TEMPLATES = [
    "a photo of a {}",
    "This is a classification task for recognizing {}",
    "pictures of a {} in the wild",
    "a close-up photo of a {} on a plain background",
]


# ---- a minimal keep-alive HTTP/1.1 client -----------------------------------------------------------
class HTTPError(Exception):
    pass


class Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        status_line = await self.reader.readline()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            await self.close()
            raise HTTPError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        resp_headers: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            resp_headers[k.strip().lower()] = v.strip()
        if "content-length" in resp_headers:
            data = await self.reader.readexactly(int(resp_headers["content-length"]))
        elif resp_headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readline()
            data = b"".join(chunks)
        else:
            data = await self.reader.read()
            resp_headers["connection"] = "close"
        if resp_headers.get("connection", "").lower() == "close":
            await self.close()
        return status, resp_headers, data


SECRETS = ("SGLORA_API_KEYS", "SGLORA_ADMIN_KEYS")  # never written to the JSON


# ---- the workload -----------------------------------------------------------------------------------
@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests (any status)
    by_cache: dict[str, list[float]] = field(default_factory=lambda: {"hit": [], "miss": []})  # 200s only
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    hits: int = 0
    throttled: int = 0
    pause_errors: list[str] = field(default_factory=list)  # --redis-pause: the pauses not made
    start: float = field(default_factory=time.monotonic)  # of the phase: the timeline's zero
    # per second of the phase: [answers, cache hits, 429s, errors]
    timeline: dict[int, list[int]] = field(default_factory=dict)

    def tick(self, column: int) -> None:
        row = self.timeline.setdefault(int(time.monotonic() - self.start), [0, 0, 0, 0])
        row[column] += 1

    def add_error(self, text: str) -> None:
        self.tick(3)
        if len(self.errors) < 1000:
            self.errors.append(text)
        else:
            self.errors[-1] = f"... and more; last: {text}"


def repeated_pool(size: int) -> list[dict]:
    """Fixed requests that are cache hits after their first answer."""
    methods = ["sg-lora"] * 4 + ["topk-weighted", "adapter-soup"]
    pool = []
    for i in range(size):
        body = {"description": TEMPLATES[i % len(TEMPLATES)].format(SUBJECTS[i % len(SUBJECTS)]), "method": methods[i % 6]}
        if body["method"] == "sg-lora":
            body["seed"] = i
        pool.append(body)
    return pool


def next_request(rng: random.Random, pool: list[dict], new_fraction: float, zip_fraction: float) -> tuple[dict, bool]:
    if rng.random() < new_fraction:
        subject = f"{rng.choice(SUBJECTS)} no. {uuid.uuid4().hex[:10]}"
        return {"description": rng.choice(TEMPLATES).format(subject)}, False  # unseeded: a new sample, a miss
    return rng.choice(pool), rng.random() < zip_fraction


async def client_loop(
    i: int, host: str, port: int, deadline: float, budget: list[int], stats: Stats, args: argparse.Namespace, pool: list[dict]
) -> None:
    rng = random.Random(args.seed * 100_003 + i)
    conn = Connection(host, port)
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["X-API-Key"] = args.api_key
    try:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            body, as_zip = next_request(rng, pool, args.new_fraction, args.zip_fraction)
            h = {**headers, "Accept": "application/zip"} if as_zip else headers
            t0 = time.perf_counter()
            try:
                status, resp_headers, data = await asyncio.wait_for(
                    conn.request("POST", "/generate", json.dumps(body).encode(), h), args.request_timeout
                )
            except (OSError, asyncio.IncompleteReadError, HTTPError, TimeoutError) as e:
                stats.add_error(f"{type(e).__name__}: {e}")
                await conn.close()
                await asyncio.sleep(0.05)
                continue
            stats.latencies.append(time.perf_counter() - t0)
            stats.statuses[status] = stats.statuses.get(status, 0) + 1
            stats.tick(0)
            if status == 200:
                cache = resp_headers.get("x-cache", "miss")
                if cache == "hit":
                    stats.hits += 1
                    stats.tick(1)
                stats.by_cache.setdefault(cache, []).append(stats.latencies[-1])
                if not data:
                    stats.add_error("200 with an empty body")
            elif status == 429 and resp_headers.get("retry-after", "").isdigit():
                stats.throttled += 1  # deliberate back-pressure: honour it
                stats.tick(2)
                await asyncio.sleep(min(float(resp_headers["retry-after"]), max(0.0, deadline - time.monotonic())))
            else:
                stats.add_error(f"{status}: {data[:200]!r}")
    finally:
        await conn.close()


async def run_phase(
    host: str,
    port: int,
    seconds: float,
    args: argparse.Namespace,
    pool: list[dict],
    redis_pauses: list[tuple[float, int]] = (),
    redis_url: str = "",
) -> tuple[Stats, float]:
    """The clients for ``seconds``; ``redis_pauses`` (seconds in, milliseconds) paused on the Redis at ``redis_url``."""
    stats = Stats()
    budget = [args.max_requests]
    deadline = stats.start + seconds
    pauses = [asyncio.create_task(pause_redis(redis_url, at, ms)) for at, ms in redis_pauses]
    await asyncio.gather(*(client_loop(i, host, port, deadline, budget, stats, args, pool) for i in range(args.clients)))
    seconds = time.monotonic() - stats.start
    for task in pauses:  # the clients stopped early (--max-requests): a pause still waiting is not made
        task.cancel()
    made = await asyncio.gather(*pauses, return_exceptions=True)
    stats.pause_errors = [
        "not made: the phase ended first" if isinstance(e, asyncio.CancelledError) else e for e in made if e is not None
    ]
    return stats, seconds


async def pause_redis(url: str, at: float, ms: int) -> str | None:
    """``CLIENT PAUSE ms ALL`` on the Redis at ``url``, ``at`` seconds from now (on a connection of its own).
    None when made, else what went wrong."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    await asyncio.sleep(at)
    r = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        await r.execute_command("CLIENT", "PAUSE", ms, "ALL")
    except (RedisError, OSError) as e:  # unreachable, or a Redis before 6.2 (no ALL | WRITE argument)
        return f"CLIENT PAUSE at {at:g} s failed: {type(e).__name__}: {e}"
    finally:
        await r.aclose()
    return None


def parse_pause(text: str) -> tuple[float, int]:
    """'AT:MS' -> (seconds into the measured phase, milliseconds)."""
    try:
        at, ms = text.split(":")
        at_s, ms_i = float(at), int(ms)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AT:MS (seconds into the run : milliseconds), got {text!r}") from None
    if not math.isfinite(at_s) or at_s < 0 or ms_i <= 0:
        raise argparse.ArgumentTypeError(f"AT must be >= 0 and MS > 0, got {text!r}")
    return at_s, ms_i


async def get(host: str, port: int, path: str) -> tuple[int, bytes]:
    conn = Connection(host, port)
    try:
        status, _, data = await asyncio.wait_for(conn.request("GET", path), 10)
        return status, data
    finally:
        await conn.close()


async def server_counters(host: str, port: int) -> dict[tuple[str, tuple], float]:
    """The server's /metrics samples this script reads: the micro-batch histogram's sum and count, and
    /generate's latency buckets by cache result. {(sample name, sorted labels): value}; empty when /metrics
    does not answer 200. With --url behind a load balancer, two reads may reach two replicas: compare
    the server-side numbers only against a single server."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = await get(host, port, "/metrics")
    if status != 200:  # e.g. behind a proxy that does not pass /metrics: no server-side numbers
        return {}
    wanted = {"sglora_batch_size_sum", "sglora_batch_size_count", "sglora_request_duration_seconds_bucket"}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
        if s.name in wanted and s.labels.get("endpoint", "/generate") == "/generate"
    }


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) pairs sorted by bound, the last
    +Inf: linear within the bucket the rank falls in; the highest finite bound when it falls in +Inf."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def server_latency_ms(before: dict, after: dict) -> dict:
    """/generate latency as the server measured it, per cache result, over the phase between two
    :func:`server_counters`: request count and p50/p90/p99 interpolated within the histogram's buckets."""
    out = {}
    for cache in ("hit", "miss"):
        rows = []
        for (name, labels), value in after.items():
            d = dict(labels)
            if name == "sglora_request_duration_seconds_bucket" and d.get("cache") == cache:
                rows.append((float(d["le"]), value - before.get((name, labels), 0.0)))
        rows.sort()
        if rows and rows[-1][1] > 0:
            out[cache] = {"requests": int(rows[-1][1])} | {
                f"p{round(100 * q)}": round(1000 * bucket_quantile(q, rows), 1) for q in (0.5, 0.9, 0.99)
            }
    return out


# ---- the server process -------------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:<port> (same user), from /proc/net/tcp socket inodes."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(cols[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def start_server(args: argparse.Namespace, port: int, redis_url: str, prefix: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "SGLORA_ARTIFACTS": str(args.artifacts),
        "SGLORA_REDIS_URL": redis_url,
        "SGLORA_CACHE_PREFIX": prefix,
        "SGLORA_THREADS": str(args.threads),
        "SGLORA_MODEL_THREADS": str(args.model_threads),
        "SGLORA_TEXT_DTYPE": args.text_dtype,
        "SGLORA_DEVICE": args.device,
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    if args.api_key:
        env["SGLORA_API_KEYS"] = args.api_key
    return processes.start_server(port, env, "--log-level", "warning")


def delete_prefix(redis_url: str, prefix: str) -> int | None:
    """Deletes the run's keys; None (and a note) when that Redis cannot be reached: they expire anyway."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    n = 0
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            n += client.delete(key)
    except (redis.RedisError, OSError) as e:
        print(f"loadtest: could not delete the run's keys {prefix}* ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    finally:
        client.close()
    return n


# ---- report -------------------------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def quantiles_ms(values: list[float]) -> dict:
    v = sorted(values)
    return {
        "p50": round(1000 * percentile(v, 0.50), 2),
        "p90": round(1000 * percentile(v, 0.90), 2),
        "p99": round(1000 * percentile(v, 0.99), 2),
        "max": round(1000 * v[-1], 2) if v else None,
    }


def summarise(stats: Stats, seconds: float) -> dict:
    lat = stats.latencies
    ok = stats.statuses.get(200, 0)
    return {
        "requests": len(lat),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(lat) / seconds, 1) if seconds else 0.0,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "cache_hits": stats.hits,
        "hit_ratio": round(stats.hits / ok, 3) if ok else 0.0,
        "throttled_429": stats.throttled,
        "errors": len(stats.errors),
        "error_samples": stats.errors[:5],
        "latency_ms": quantiles_ms(lat),
        "latency_ms_by_cache": {k: quantiles_ms(v) for k, v in stats.by_cache.items() if v},
        "timeline": timeline(stats, seconds),
        **({"redis_pause_errors": stats.pause_errors} if stats.pause_errors else {}),
    }


def timeline(stats: Stats, seconds: float) -> dict[str, list[int]]:
    """Per whole second of the phase (the last, partial one included): answers, hits, 429s, errors."""
    n = max(int(seconds) + 1, *(k + 1 for k in stats.timeline)) if stats.timeline else int(seconds) + 1
    rows = [stats.timeline.get(k, [0, 0, 0, 0]) for k in range(n)]
    return {name: [r[i] for r in rows] for i, name in enumerate(("answers", "hits", "throttled_429", "errors"))}


async def main_async(args: argparse.Namespace) -> int:
    pool = repeated_pool(args.pool)
    proc = redis_proc = None
    redis_url, prefix = "", f"sglora-load-{uuid.uuid4().hex[:8]}:"
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    if args.url:
        u = urlsplit(args.url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("loadtest: --url must be a loopback address")
        host, port = "127.0.0.1" if u.hostname == "localhost" else u.hostname, u.port or 80
        pid = args.pid or listener_pid(port)
    else:
        host, port = "127.0.0.1", processes.free_port()
        if args.redis_url == "private":
            if shutil.which("redis-server") is None:
                print("loadtest: redis-server not found, running uncached", file=sys.stderr)
            else:
                redis_port = processes.free_port()
                redis_proc = processes.start_redis(
                    redis_port, workdir, "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"
                )
                redis_url = f"redis://127.0.0.1:{redis_port}/0"
        elif args.redis_url != "none":
            redis_url = args.redis_url
        if args.redis_pause and not redis_url:  # redis-server was not found
            raise SystemExit("loadtest: --redis-pause needs a Redis, and this run has none")
        proc = start_server(args, port, redis_url, prefix)
        pid = proc.pid
    # The Redis to pause: the server's when started here; with --url, the one --redis-url names.
    pause_url = redis_url if proc is not None else args.redis_url
    result: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "clients": args.clients,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
        "cache": "private redis" if redis_proc else (redis_url or "none") if proc else "as configured",
        "redis_pauses": [{"at_s": at, "ms": ms} for at, ms in args.redis_pause],
        # the server's settings from this environment (a server started here inherits them), keys left out
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SGLORA_") and k not in SECRETS},
    }
    try:
        t0 = time.monotonic()
        await asyncio.to_thread(processes.wait_ready, f"http://{host}:{port}", proc, args.start_timeout)
        result["startup_s"] = round(time.monotonic() - t0, 1)
        if args.warmup > 0:
            warm, warm_s = await run_phase(host, port, args.warmup, args, pool)
            result["warmup"] = summarise(warm, warm_s)
        rss_warm = rss_kib(pid) if pid else None
        c0 = await server_counters(host, port)
        stats, seconds = await run_phase(host, port, args.duration, args, pool, args.redis_pause, pause_url)
        c1 = await server_counters(host, port)
        rss_after = rss_kib(pid) if pid else None
        result["run"] = summarise(stats, seconds)
        batch_sum, batch_count = (
            c1.get((n, ()), 0.0) - c0.get((n, ()), 0.0) for n in ("sglora_batch_size_sum", "sglora_batch_size_count")
        )
        result["mean_batch"] = round(batch_sum / batch_count, 1) if batch_count > 0 else None
        result["server_latency_ms_by_cache"] = server_latency_ms(c0, c1)
        result["rss_mib"] = {
            "after_warmup": round(rss_warm / 1024, 1) if rss_warm else None,
            "after_run": round(rss_after / 1024, 1) if rss_after else None,
            "growth": round(rss_after / rss_warm - 1, 4) if rss_warm and rss_after else None,
        }
        result["load_average_after"] = os.getloadavg()[0]
    finally:
        if proc is not None:
            status = processes.stop(proc)
            result["server_exit"] = "killed" if status is None else status
        if redis_proc is not None:
            processes.stop(redis_proc, timeout=10)
        elif proc is not None and redis_url:
            result["redis_keys_deleted"] = delete_prefix(redis_url, prefix)

    failures = []
    if not result["run"]["requests"]:
        failures.append("no answers in the measured phase")
    if result["run"]["errors"] or result.get("warmup", {}).get("errors"):
        failures.append("errors other than 429 with Retry-After")
    failures += result["run"].get("redis_pause_errors", [])
    growth = result["rss_mib"]["growth"]
    if growth is not None and growth > args.max_rss_growth:
        failures.append(f"resident memory grew by {100 * growth:.1f} % (limit {100 * args.max_rss_growth:.0f} %)")
    result["pass"] = not failures
    result["failures"] = failures
    print_report(result)
    if args.json:
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not failures else 1


def print_report(r: dict) -> None:
    run = r["run"]
    lat = run["latency_ms"]
    rss = r["rss_mib"]
    print(f"clients {r['clients']}, {run['seconds']} s measured, {r['cores']} cores, cache: {r['cache']}")
    print(f"requests {run['requests']}  throughput {run['throughput_rps']} req/s  statuses {run['statuses']}")
    print(f"latency p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  max {lat['max']} ms")
    for cache, q in run["latency_ms_by_cache"].items():
        print(f"  cache {cache:4s} p50 {q['p50']} ms  p90 {q['p90']} ms  p99 {q['p99']} ms")
    for cache, q in r.get("server_latency_ms_by_cache", {}).items():
        print(f"  server's own histogram, {cache:4s} p50 {q['p50']} ms  p90 {q['p90']} ms  p99 {q['p99']} ms  (within buckets)")
    hits = f"{run['cache_hits']} ({100 * run['hit_ratio']:.0f} % of 200s)"
    print(f"cache hits {hits}  429s {run['throttled_429']}  mean batch {r['mean_batch']}")
    print(f"RSS after warm-up {rss['after_warmup']} MiB, after run {rss['after_run']} MiB, growth {rss['growth']}")
    print(f"errors {run['errors']} {run['error_samples'] if run['errors'] else ''}")
    print("PASS" if r["pass"] else f"FAIL: {'; '.join(r['failures'])}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    where.add_argument("--artifacts", type=Path, help="start `python -m app` on these artefacts (and stop it at the end)")
    p.add_argument("--pid", type=int, help="with --url: the server's pid for VmRSS (default: found from the port)")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of the same load before the measurement")
    p.add_argument("--new-fraction", type=float, default=0.3, help="share of requests with a new description")
    p.add_argument("--zip-fraction", type=float, default=0.1, help="share of repeated requests asking for the PEFT zip")
    p.add_argument("--pool", type=int, default=48, help="number of distinct repeated requests")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="bound on requests per phase")
    p.add_argument("--request-timeout", type=float, default=60.0, help="client-side limit per request (counted as error)")
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth from after warm-up to after the run")
    p.add_argument("--api-key", default="", help="X-API-Key to send (and, with --artifacts, to require)")
    p.add_argument("--redis-url", default="private", help="with --artifacts: 'private' (own redis-server), 'none', or a URL")
    p.add_argument(
        "--redis-pause",
        type=parse_pause,
        action="append",
        default=[],
        metavar="AT:MS",
        help="pause the server's Redis (CLIENT PAUSE ... ALL, Redis 6.2 or later) for MS ms, AT s into the measured phase; "
        "repeatable. It pauses every client of that Redis: use the private one, not a shared Redis",
    )
    p.add_argument("--threads", type=int, default=1, help="with --artifacts: SGLORA_THREADS")
    p.add_argument("--model-threads", type=int, default=0, help="with --artifacts: SGLORA_MODEL_THREADS (0: the default)")
    p.add_argument("--text-dtype", default="auto", help="with --artifacts: SGLORA_TEXT_DTYPE")
    p.add_argument("--device", default="cpu", help="with --artifacts: SGLORA_DEVICE")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the numbers here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error("--clients must be >= 1")
    if not (math.isfinite(args.duration) and args.duration > 0):
        parser.error(f"--duration must be a finite number of seconds > 0, got {args.duration}")
    if not (math.isfinite(args.warmup) and args.warmup >= 0):
        parser.error(f"--warmup must be a finite number of seconds >= 0, got {args.warmup}")
    if args.max_requests < 1:
        parser.error(f"--max-requests must be >= 1, got {args.max_requests}")
    if args.url:
        try:
            urlsplit(args.url).port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
        except ValueError as e:
            parser.error(f"--url {args.url}: {e}")
    if args.json and (problem := output_path_problem(Path(args.json), "--json")) is not None:
        parser.error(problem)
    if any(at >= args.duration for at, _ in args.redis_pause):
        raise SystemExit("loadtest: every --redis-pause must fall inside the measured --duration")
    if args.redis_pause and (args.redis_url == "none" or (args.url and args.redis_url == "private")):
        raise SystemExit("loadtest: --redis-pause needs the server's Redis: --redis-url private or a URL (with --url: its URL)")
    try:
        return asyncio.run(main_async(args))
    except RuntimeError as e:  # Redis or the server did not start
        raise SystemExit(f"loadtest: {e}") from None


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the HTTP service against the bare text encoder, in one run.

    python scripts/bench_service.py --artifacts artifacts/offline-default [--redis-url redis://127.0.0.1:6379/0]

Measures, on one machine:
  1. the bare ``engine.embed([description])`` forward (in this process), of descriptions never sent before,
     back to back (the target's measure) and, for reference, each after 5 ms of idle as a lone request's;
  2. /generate cache-miss median latency of the same descriptions      target <= 1.25x the bare forward;
  3. /generate cache-hit median latency (one request repeated)            target <= 0.1x the miss;
     answered from process memory (the hot keys), or from Redis with SGLORA_HOT_KEYS=0 in the environment;
  4. throughput of cache misses with 32 concurrent clients vs 1 client    target >= 3x (micro-batching);
  5. (no target) a miss whose description the server has seen (a fresh seed each): the server reuses
     the description's embedding, so this is the miss without the text forward.
  6. (no target) the stampede: the clients of 4 all send one new request (description and seed) at
     once, a few rounds; the time until every one is answered, and how many LoRAs the server made for
     a round (identical requests in flight share one generation: 1).
Every description of 2 and 4 is new to the server, so its text encoder runs for each. 1, 2 and 5
alternate in blocks, and so do the two sides of 4, so that a drift in the machine's speed falls on
both sides of each ratio. The server is started here (`python -m app`: uvicorn, one worker, on a free
loopback port) against the given Redis, with a fresh key prefix that is deleted at the
end. Prints a Markdown table.

``--replicas N`` starts N such servers side by side (replicas of one machine, sharing Redis, as
docs/service.md suggests on small machines with ``SGLORA_MODEL_THREADS=1``): the many-client side of 4
and the stampede spread their connections over all of them, as a balancer would; 1, 2, 3, 5 and the
one-client side of 4 use the first.

``--workers N`` runs each server as ``--workers N``: N processes behind one address (docs/service.md,
"Several worker processes"). A lone measure's one connection is served by one of them; the clients of 4
and the stampede open their connections to the one address, and the kernel hands each to a worker. The
CPU figures count every worker.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app import processes
from app.metrics import metric_sum
from sglora.io import output_path_problem, write_json

IDLE_S = 0.005  # the bare forward's idle for reference: about what a lone miss's model thread waits between requests
BLOCKS = 4  # alternating blocks of each measured pair (bare / miss, 1 client / many clients)
STAMPEDE_ROUNDS = 8
DESCRIPTION = "This is a classification task for recognizing footwear, which includes sandal, sneaker and ankle boot"


class BareForward:
    """The bare ``engine.embed([description])`` forward, in this process, with the server's torch threads."""

    def __init__(self, artifacts: Path, device: str, threads: int, text_dtype: str):
        import torch

        from sglora.artifacts import load_artifacts

        torch.set_num_threads(threads)
        self.engine = load_artifacts(artifacts, device).engine
        self.engine.backbone.set_text_dtype(getattr(torch, text_dtype))

    def trace(self) -> None:
        """Runs the text tower as one traced graph, as the server does; SystemExit where it cannot here."""
        from app.service import TEXT_PROBES  # the server's probes: its first descriptions

        repository = self.engine.repository
        why = self.engine.backbone.trace_text([repository[n].description for n in repository.names[:TEXT_PROBES]])
        if why:
            raise SystemExit(f"the server runs its text tower as a traced graph, this process cannot: {why}")

    def times_ms(self, descriptions: list[str], idle_s: float = 0.0) -> list[float]:
        """Back to back, or each after ``idle_s`` of sleep (as a lone request's model thread waits between its
        requests: an idle core wakes up slower, and on a shared machine may find its caches taken)."""
        import torch

        out = []
        with torch.inference_mode():
            for d in descriptions:
                if idle_s:
                    time.sleep(idle_s)
                t0 = time.perf_counter()
                self.engine.embed([d])
                out.append(1000 * (time.perf_counter() - t0))
        return out


def start_server(args: argparse.Namespace, port: int, prefix: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "SGLORA_ARTIFACTS": str(args.artifacts),
        "SGLORA_REDIS_URL": args.redis_url,
        "SGLORA_CACHE_PREFIX": prefix,
        "SGLORA_DEVICE": args.device,
        "SGLORA_THREADS": str(args.threads),
        "SGLORA_MODEL_THREADS": str(args.model_threads),
        "SGLORA_TEXT_DTYPE": args.text_dtype,
        "SGLORA_MAX_QUEUE": "4096",
        "SGLORA_WORKERS": str(args.workers),
    }
    return processes.start_server(port, env, "--log-level", "warning")


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams. It costs far less CPU per request than
    httpx, which matters here: the clients share the machine's cores with the server they measure."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def post_json(self, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        raw = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in raw[1:] if line))
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(raw[0].split()[1]), headers, payload

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def _check(status: int, headers: dict[str, str], payload: bytes, expect_cache: str | None) -> None:
    if status != 200 or (expect_cache is not None and headers.get("x-cache") != expect_cache):
        raise SystemExit(f"unexpected answer {status} X-Cache={headers.get('x-cache')}: {payload[:200]!r}")


async def latencies_ms(port: int, bodies: list[dict], expect_cache: str) -> list[float]:
    conn = await Connection.open("127.0.0.1", port)
    out = []
    try:
        for body in bodies:
            t0 = time.perf_counter()
            answer = await conn.post_json("/generate", body)
            out.append(1000 * (time.perf_counter() - t0))
            _check(*answer, expect_cache)
    finally:
        await conn.close()
    return out


async def open_connections(ports: list[int], clients: int) -> list[Connection]:
    """``clients`` connections, to the servers at ``ports`` in turn (as a round-robin balancer would)."""
    return [await Connection.open("127.0.0.1", ports[i % len(ports)]) for i in range(clients)]


async def throughput(ports: list[int], clients: int, bodies: list[dict]) -> float:
    """Requests per second of the cache misses ``bodies`` spread over ``clients`` concurrent connections
    (:func:`open_connections`).

    Every request should have a description new to the server (it encodes identical descriptions of one
    batch once, and reuses a known description's embedding; new ones measure the batching of the text
    encoder itself)."""
    todo = iter(bodies)
    conns = await open_connections(ports, clients)

    async def worker(conn: Connection) -> None:
        for body in todo:
            _check(*await conn.post_json("/generate", body), "miss")

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        return len(bodies) / (time.perf_counter() - t0)
    finally:
        for c in conns:
            await c.close()


async def stampede_ms(ports: list[int], clients: int, body: dict) -> float:
    """Milliseconds until ``clients`` connections (:func:`open_connections`) that send ``body`` at once are
    all answered; SystemExit unless every answer is a 200 with the same bytes."""
    conns = await open_connections(ports, clients)
    try:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(c.post_json("/generate", body) for c in conns))
        elapsed = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.close()
    for answer in answers:
        _check(*answer, None)
    if len({payload for _, _, payload in answers}) != 1:
        raise SystemExit("identical requests sent at once were answered different bytes")
    return 1000 * elapsed


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used; NaN where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def redis_cpu_s(redis_url: str) -> float:
    """CPU seconds the Redis server has used (INFO cpu: the whole server's, other clients' work included);
    NaN without Redis, or when it does not answer (the service fails open, and so does this run)."""
    if not redis_url:
        return float("nan")
    import redis

    try:
        with redis.Redis.from_url(redis_url, socket_timeout=1) as r:
            info = r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return float("nan")


class CpuMeter:
    """CPU seconds, per process, of one side of the throughput measurement: the server, this process (the
    clients; the bare engine sits idle meanwhile) and Redis, over the wall time they took."""

    def __init__(self, server_pids: list[int], redis_url: str):
        self.server_pids, self.redis_url = server_pids, redis_url
        self.used = dict.fromkeys(("server", "clients", "redis", "wall"), 0.0)

    @contextmanager
    def measure(self) -> Iterator[None]:
        start = (self._servers_s(), time.process_time(), redis_cpu_s(self.redis_url), time.perf_counter())
        yield
        end = (self._servers_s(), time.process_time(), redis_cpu_s(self.redis_url), time.perf_counter())
        for k, a, b in zip(self.used, start, end, strict=True):
            self.used[k] += b - a

    def _servers_s(self) -> float:
        return sum(cpu_s(pid) for pid in self.server_pids)

    def per_request_ms(self, requests: int) -> dict[str, float]:
        """CPU ms a request, per process, and ``cores``: the CPU of all three over the wall time."""
        u = self.used
        out = {k: 1000 * u[k] / requests for k in ("server", "clients", "redis")}
        busy = u["server"] + u["clients"] + (u["redis"] if math.isfinite(u["redis"]) else 0.0)  # Redis unread: left out
        out["cores"] = busy / u["wall"] if u["wall"] else float("nan")
        return out


def wait_workers(url: str, workers: int, timeout_s: float = 300.0) -> None:
    """Until ``url``'s /metrics sums ``workers`` worker processes (one of a lone server's)."""
    end = time.monotonic() + timeout_s
    while workers > 1 and metric_sum(httpx.get(url + "/metrics", timeout=10).text, "sglora_workers") < workers:
        if time.monotonic() > end:
            raise RuntimeError(f"the {workers} workers at {url} were not all ready within {timeout_s:.0f} s")
        time.sleep(0.5)


def warm_every_worker(url: str, port: int, description: str, seeds: Iterator[int], streak: int = 8) -> None:
    """Sends ``description`` (fresh seeds), each on a new connection, until ``streak`` in a row found its
    embedding cached: whichever worker the kernel hands a connection to has encoded it (a worker left out
    that long has odds of 2^-8 with two workers)."""
    run = 0
    for tries in itertools.count(1):
        if run >= streak:
            return
        if tries > 50 * streak:
            raise SystemExit(f"{description!r} was encoded again after {tries} requests: is the embedding cache off?")
        before = httpx.get(url + "/metrics").text
        asyncio.run(latencies_ms(port, [{"description": description, "seed": next(seeds)}], "miss"))
        hit = metric_delta(before, httpx.get(url + "/metrics").text, "sglora_embedding_cache_events_total", result="hit")
        run = run + 1 if hit == 1 else 0


def metric_delta(before: str, after: str, name: str, **labels: str) -> float:
    """How much :func:`metric_sum` grew between two /metrics texts."""
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


STAGE_SUM = "sglora_stage_duration_seconds_sum"
STAGE_COUNT = "sglora_stage_duration_seconds_count"


def expect_embeddings(before: str, after: str, result: str, n: int) -> None:
    """Ends the run unless the server's text-embedding cache counted ``n`` events ``result`` between the
    two /metrics texts: a measured miss must run the text encoder, a "seen" miss must not."""
    got = metric_delta(before, after, "sglora_embedding_cache_events_total", result=result)
    if got != n:
        raise SystemExit(f"expected {n} text-embedding cache {result}es in this block, the server counted {got:g}")


def metrics_texts(urls: list[str]) -> list[str]:
    """The /metrics text of every server."""
    return [httpx.get(u + "/metrics").text for u in urls]


def metrics_delta(before: list[str], after: list[str], name: str, **labels: str) -> float:
    """:func:`metric_delta` summed over the servers."""
    return sum(metric_delta(b, a, name, **labels) for b, a in zip(before, after, strict=True))


def cleanup(redis_url: str, prefix: str) -> None:
    if not redis_url:
        return
    try:
        import redis

        r = redis.Redis.from_url(redis_url, socket_timeout=2)
        for key in r.scan_iter(match=prefix + "*", count=1000):
            r.delete(key)
    except Exception as e:  # noqa: BLE001 - best effort; the keys expire anyway
        print(f"(could not delete the benchmark's Redis keys: {e})", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    from app.settings import Settings

    # The server's rule, so that the bare forward runs with the server's intra-op threads.
    settings = Settings(threads=args.threads, model_threads=args.model_threads, text_dtype=args.text_dtype, workers=args.workers)
    args.model_threads, args.threads = settings.resolved_parallelism(args.device)
    args.text_dtype = settings.resolved_text_dtype(args.device)
    forward = BareForward(args.artifacts, args.device, args.threads, args.text_dtype)
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    ports: list[int] = []
    while len(ports) < args.replicas:
        if (free := processes.free_port()) not in ports:  # a port is taken only once its server binds it
            ports.append(free)
    procs = [start_server(args, p, prefix) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    port, url = ports[0], urls[0]
    seed0 = random.randrange(1 << 40)
    try:
        ready = [processes.wait_ready(u, pr, timeout=300) for u, pr in zip(urls, procs, strict=True)][0]
        for u in urls:  # /ready answers once one worker is; every one must be
            wait_workers(u, args.workers)
        forward.engine.backbone.set_text_fixed_rows(ready.get("text_fixed_rows"))  # the server's text numerics
        if ready.get("text_graph") == "traced":  # the server's forward: one traced graph (SGLORA_TEXT_GRAPH)
            forward.trace()
        d = args.description
        fresh = (f"{d} (request {i})" for i in itertools.count())  # descriptions the server has not seen
        forward.times_ms([next(fresh) for _ in range(5)])  # warm-up
        warm = [{"description": next(fresh), "seed": seed0 - 1 - i} for i in range(5)]
        asyncio.run(latencies_ms(port, [*warm, {"description": d, "seed": seed0 - 1}], "miss"))  # warm up
        if args.workers > 1:  # the "seen" misses need d's embedding in whichever worker takes their connection
            warm_every_worker(url, port, d, (seed0 - 100 - i for i in itertools.count()))
        # Each pair of measurements alternates in blocks, so that a drift in the machine's speed (these
        # shared cores drift by tens of per cent within minutes) falls on both sides of a ratio.
        bare_ms: list[float] = []
        idle_ms: list[float] = []  # the bare forward after IDLE_S of idle, for reference
        miss: list[float] = []
        seen: list[float] = []  # misses of a description the server has encoded before
        n = -(-args.requests // BLOCKS)
        names = ("text_encoding", "prior", "sampling", "serialisation")  # the model stages of a request
        lone = dict.fromkeys(("server", "queue", *names), 0.0)  # where a lone miss's time goes (means, ms)
        for b in range(BLOCKS):
            descriptions = [next(fresh) for _ in range(n)]
            bare_ms += forward.times_ms(descriptions)
            idle_ms += forward.times_ms([next(fresh) for _ in range(n)], IDLE_S)
            bodies = [{"description": t, "seed": seed0 + 1_000_000 + b * n + i} for i, t in enumerate(descriptions)]
            before = httpx.get(url + "/metrics").text
            miss += asyncio.run(latencies_ms(port, bodies, "miss"))
            after = httpx.get(url + "/metrics").text
            expect_embeddings(before, after, "miss", n)
            server_s = metric_delta(before, after, "sglora_request_duration_seconds_sum", endpoint="/generate")
            lone["server"] += 1000 * server_s / (BLOCKS * n)
            for stage in ("queue", *names):
                lone[stage] += 1000 * metric_delta(before, after, STAGE_SUM, stage=stage) / (BLOCKS * n)
            seen += asyncio.run(latencies_ms(port, [{"description": d, "seed": seed0 + b * n + i} for i in range(n)], "miss"))
            expect_embeddings(after, httpx.get(url + "/metrics").text, "hit", n)
        before = httpx.get(url + "/metrics").text
        hit = asyncio.run(latencies_ms(port, [{"description": d, "seed": seed0}] * args.requests, "hit"))
        # From process memory (the hot keys, the default) or, with SGLORA_HOT_KEYS=0, from Redis.
        hits_from_memory = metric_delta(before, httpx.get(url + "/metrics").text, "sglora_cache_memory_hits_total")
        n = -(-args.throughput_requests // BLOCKS)
        one_s = many_s = calls = texts = 0.0
        stages = dict.fromkeys(names, 0.0)
        pids = [pid for p in procs for pid in (p.pid, *processes.children(p.pid))]  # with --workers: theirs too
        cpu_one, cpu_many = CpuMeter(pids, args.redis_url), CpuMeter(pids, args.redis_url)
        for b in range(BLOCKS):
            bodies = [{"description": next(fresh), "seed": seed0 + 2_000_000 + b * n + i} for i in range(n)]
            with cpu_one.measure():
                one_s += n / asyncio.run(throughput([port], 1, bodies))
            bodies = [{"description": next(fresh), "seed": seed0 + 3_000_000 + b * n + i} for i in range(n)]
            before_all = metrics_texts(urls)  # batches and stages of the many-client blocks only
            with cpu_many.measure():
                many_s += n / asyncio.run(throughput(ports, args.clients, bodies))
            after_all = metrics_texts(urls)
            calls += metrics_delta(before_all, after_all, "sglora_batch_size_count")
            texts += metrics_delta(before_all, after_all, "sglora_batch_size_sum")
            for stage in names:
                stages[stage] += 1000 * metrics_delta(before_all, after_all, STAGE_SUM, stage=stage) / (BLOCKS * n)
        one, many = BLOCKS * n / one_s, BLOCKS * n / many_s
        before_all = metrics_texts(urls)
        herd = [
            asyncio.run(stampede_ms(ports, args.clients, {"description": next(fresh), "seed": seed0 + 4_000_000 + i}))
            for i in range(STAMPEDE_ROUNDS)
        ]
        herd_made = metrics_delta(before_all, metrics_texts(urls), STAGE_COUNT, stage="serialisation")
    finally:
        for p in procs:
            p.terminate()  # all at once: each finishes its in-flight requests
        for p in procs:
            processes.stop(p)
        cleanup(args.redis_url, prefix)
    bare, miss_ms, hit_ms, seen_ms = (statistics.median(x) for x in (bare_ms, miss, hit, seen))
    return {
        "artifacts": str(args.artifacts),
        "backbone": ready.get("backbone"),
        "device": ready.get("device"),
        "redis": ready.get("redis"),
        "max_batch": ready.get("max_batch"),
        "cvae_pass_rows": ready.get("cvae_pass_rows"),
        "model_threads": ready.get("model_threads"),
        "text_dtype": ready.get("text_dtype"),
        "text_graph": ready.get("text_graph", "eager"),
        "text_fixed_rows": ready.get("text_fixed_rows"),
        "generator_dtype": ready.get("generator_dtype"),
        "bare_embed_ms": bare,
        "miss_ms": miss_ms,
        "hit_ms": hit_ms,
        "miss_over_bare": miss_ms / bare,
        "bare_after_idle_ms": statistics.median(idle_ms),
        "hit_over_miss": hit_ms / miss_ms,
        "hits_from_memory": hits_from_memory / len(hit),
        "miss_seen_ms": seen_ms,
        "miss_seen_over_bare": seen_ms / bare,
        "rps_1": one,
        f"rps_{args.clients}": many,
        "throughput_ratio": many / one,
        "mean_batch": texts / calls if calls else float("nan"),
        "stage_ms_per_request": stages,
        "cpu_ms_per_request_1": cpu_one.per_request_ms(BLOCKS * n),
        f"cpu_ms_per_request_{args.clients}": cpu_many.per_request_ms(BLOCKS * n),
        "lone_miss_ms": {"client": statistics.fmean(miss), **lone},
        "stampede_ms": statistics.median(herd),
        "stampede_made_per_round": herd_made / STAMPEDE_ROUNDS,
        "threads": args.threads,
        "clients": args.clients,
        "replicas": args.replicas,
        "workers": args.workers,
    }


def table(r: dict) -> str:
    def ok(flag: bool) -> str:
        return "yes" if flag else "**no**"

    c = r["clients"]
    rows = [
        ("bare `engine.embed([desc])` median, the misses' descriptions", f"{r['bare_embed_ms']:.2f} ms", "", ""),
        (
            "`/generate` cache miss, median",
            f"{r['miss_ms']:.2f} ms ({r['miss_over_bare']:.2f}x bare)",
            "<= 1.25x",
            ok(r["miss_over_bare"] <= 1.25),
        ),
        (
            f"`/generate` cache hit, median ({r.get('hits_from_memory', 0):.0%} from process memory)",
            f"{r['hit_ms']:.2f} ms ({r['hit_over_miss']:.2f}x miss)",
            "<= 0.1x",
            ok(r["hit_over_miss"] <= 0.1),
        ),
        (
            "`/generate` cache miss, description seen before (embedding reused), median",
            f"{r['miss_seen_ms']:.2f} ms ({r['miss_seen_over_bare']:.2f}x bare)",
            "",
            "",
        ),
        ("misses/s, 1 client", f"{r['rps_1']:.1f}", "", ""),
        (
            f"misses/s, {c} clients",
            f"{r[f'rps_{c}']:.1f} ({r['throughput_ratio']:.2f}x)",
            ">= 3x",
            ok(r["throughput_ratio"] >= 3),
        ),
        (f"mean text-encoder batch, {c} clients", f"{r['mean_batch']:.1f}", "", ""),
        (
            f"model threads' time per request, {c} clients",
            ", ".join(f"{k.replace('_', ' ')} {v:.2f} ms" for k, v in r["stage_ms_per_request"].items()),
            "",
            "",
        ),
        *(
            (
                f"CPU per request, {k} client(s): server, clients, Redis (cores busy)",
                ", ".join(f"{name} {v:.2f} ms" for name, v in cpu.items() if name != "cores") + f" ({cpu['cores']:.2f})",
                "",
                "",
            )
            for k in (1, c)
            if (cpu := r.get(f"cpu_ms_per_request_{k}"))
        ),
        (
            "lone miss, mean: client, server, and the server's model stages",
            ", ".join(f"{k.replace('_', ' ')} {v:.2f} ms" for k, v in r["lone_miss_ms"].items()),
            "",
            "",
        ),
    ]
    if "bare_after_idle_ms" in r:  # since release 0.9.28
        idle = f"the same forward after {1000 * IDLE_S:.0f} ms of idle each (for reference, not the target's measure)"
        rows.insert(1, (idle, f"{r['bare_after_idle_ms']:.2f} ms", "", ""))
    if "stampede_ms" in r:  # since release 0.9.23
        herd = f"{r['stampede_ms']:.2f} ms; {r['stampede_made_per_round']:.2f}"
        rows.insert(-1, (f"{c} clients sending one new request at once: all answered, median; LoRAs made a round", herd, "", ""))
    setup = (
        f"backbone {r['backbone']}, {r['device']}, {r.get('model_threads', 1)} model thread(s) with {r['threads']} torch "
        f"thread(s), text tower in {r.get('text_dtype', 'float32')}"
        + (f" ({r['text_fixed_rows']}-row blocks)" if r.get("text_fixed_rows") else "")
        + (", traced" if r.get("text_graph") == "traced" else "")
        + (f", CVAE in {r['generator_dtype']}" if r.get("generator_dtype") else "")
        + f", Redis {r['redis']}, max batch {r['max_batch']}"
        + (f", CVAE passes of {'-'.join(map(str, r['cvae_pass_rows']))} rows" if r.get("cvae_pass_rows") else "")
    )
    if r.get("workers", 1) > 1:
        setup += f"; `--workers {r['workers']}`: that many processes behind the address"
    if r.get("replicas", 1) > 1:
        setup += f"; {r['replicas']} replicas of this: {c} clients and the stampede over all, the rest on one"
    head = f"Artefacts `{r['artifacts']}` ({setup})\n\n"
    lines = ["| measure | value | target | met |", "|---|---|---|---|"] + [f"| {a} | {b} | {t} | {m} |" for a, b, t, m in rows]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # As in the API image: sleeping (not spinning) OpenMP threads, for this process and the server.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="empty: no cache (the hit row then fails)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads of the bare forward and the server; 0: the server's default"
    )
    p.add_argument("--model-threads", type=int, default=0, help="the server's model threads; 0: its default")
    p.add_argument(
        "--text-dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="of the bare forward and the server"
    )
    p.add_argument("--description", default=DESCRIPTION)
    p.add_argument("--requests", type=int, default=200, help="sequential requests per latency measurement")
    p.add_argument("--throughput-requests", type=int, default=640, help="requests per throughput measurement")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="servers started side by side (sharing Redis); the many-client measures spread over them (default 1)",
    )
    p.add_argument("--workers", type=int, default=1, help="each server's worker processes (sglora serve --workers; default 1)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    if args.threads < 0 or args.model_threads < 0:
        p.error("--threads and --model-threads must be >= 0 (0: the server's default)")
    if min(args.requests, args.clients, args.throughput_requests, args.replicas, args.workers) < 1:
        p.error("--requests, --throughput-requests, --clients, --replicas and --workers must be >= 1")
    if args.json and (problem := output_path_problem(args.json, "--json")) is not None:
        p.error(problem)
    from sglora.artifacts import ArtifactError

    try:
        result = run(args)
    except ArtifactError as e:  # missing or broken artefacts
        raise SystemExit(f"bench_service: {e}") from None
    except RuntimeError as e:  # the server did not start
        raise SystemExit(f"bench_service: {e}") from None
    print(table(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

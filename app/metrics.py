"""Prometheus metrics (prefix ``sglora_``) on a registry owned by one app.

One registry per app, not the global default: tests build many apps in one process. Each server
process has its own; under ``sglora serve --workers N`` a scrape sums every worker's (app/workers.py).
prometheus-client's multiprocess mode is not used, and refused when its environment variable would
turn it on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import http_protocol
from app.limits import route_path
from app.runtime import GcPauses
from app.settings import StartupError

# No `*_created` series: a gauge beside every counter and histogram child (65 series) that no rule or panel reads.
disable_created_metrics()

# Steps of 1.2-2.5x, the finest (1.2-1.5x) between 0.5 and 2.5 s where misses lie under load, so that quantiles
# interpolated within a bucket (histogram_quantile) stay near the truth; 0.5 and 2.5 s are the alert thresholds
# (deploy/alerts.yml). Replicas with other buckets (during a rolling update from release 0.9.2) make sums
# over `le` non-monotonic for a while: Prometheus repairs them, and quantiles are off until the update ends.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Up to 30 s, the default request timeout: a queue wait lasts up to it, and quantiles past the last bucket read
# as that bucket (the dashboard's queue p99 could show at most 5 s exactly when the service was overloaded).
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
REJECT_REASONS = ("overloaded", "timeout", "out_of_memory")  # sglora_rejected_total{reason}
REDIS_OPS = ("get", "set", "ping")  # sglora_redis_errors_total{op}
STAGES = ("queue", "text_encoding", "prior", "sampling", "serialisation", "image_encoding", "scoring")
# sglora_requests_total series that exist from the start: the model endpoints' refusals and errors, which the
# 5xx and 429 alerts divide (a series that appears with its first increment loses that burst to rate()).
MODEL_ENDPOINTS = ("/generate", "/generate/preview", "/generate/batch", "/retrieve")
ALERTED_STATUSES = ("200", "429", "500", "503", "504")
# sglora_requests_total{method}: HTTP accepts any token as a method, and each made-up one would add series for good.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"))


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` in a /metrics text whose labels include ``labels`` (0 where none
    match): how the benchmarks and the tests read the service from outside."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def single_process_metrics() -> None:
    """StartupError when prometheus-client's multiprocess mode is asked for: it reads the variable at import and
    keeps every value in files there, so values of an earlier process with the same PID (PID 1 in a container)
    came back, and a missing folder failed the first metric."""
    for var in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        if os.environ.get(var):
            raise StartupError(f"{var} is set: each server process keeps its own metrics (--workers sums them); unset it")


class Metrics:
    def __init__(self) -> None:
        single_process_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sglora_requests", "HTTP requests by endpoint and status", ["endpoint", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "sglora_request_duration_seconds",
            "end-to-end request latency; cache: the answer's X-Cache (hit or miss, /generate), else empty",
            ["endpoint", "cache"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "sglora_stage_duration_seconds", "latency of one stage of a model job", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.cache = Counter(
            "sglora_cache_events",
            "LoRA cache decisions: hit, miss, error (Redis failed or in its back-off), skip (no seed: no lookup)",
            ["result"],
            registry=r,
        )
        self.memory_hits = Counter(
            "sglora_cache_memory_hits",
            "cache hits answered from process memory without a Redis round trip (a part of the hits)",
            registry=r,
        )
        self.shared = Counter(
            "sglora_generations_shared",
            "requests answered with the LoRA of an identical request already in flight (counted as hits from memory)",
            registry=r,
        )
        self.embeddings = Counter(
            "sglora_embedding_cache_events",
            "descriptions whose text embedding was reused (hit) or encoded (miss)",
            ["result"],
            registry=r,
        )
        self.redis_errors = Counter("sglora_redis_errors", "failed or refused Redis calls", ["op"], registry=r)
        self.cache_writes_dropped = Counter(
            "sglora_cache_writes_dropped",
            "write-behind cache writes dropped because too many were already in flight",
            registry=r,
        )
        self.batch_size = Histogram("sglora_batch_size", "descriptions per text-encoder call", buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("sglora_in_flight_requests", "HTTP requests being served", registry=r)
        self.queue_depth = Gauge("sglora_queue_depth", "jobs waiting for or in the model worker", registry=r)
        self.busy_threads = Gauge(
            "sglora_model_threads_busy", "model threads held by a job (a retrieval or an expert change holds all)", registry=r
        )
        self.model_threads = Gauge("sglora_model_threads", "model threads of the worker", registry=r)
        self.lru_bytes = Gauge("sglora_lora_memory_bytes", "bytes of LoRA files in process memory (the ETag LRU)", registry=r)
        self.hot_keys = Gauge("sglora_hot_keys", "requests whose LoRA a repeat gets from process memory", registry=r)
        self.rejected = Counter("sglora_rejected", "requests refused by the worker", ["reason"], registry=r)
        self.info = Info("sglora_artifacts", "loaded artefacts", registry=r)
        # What prometheus-client's default registry would carry: process_* (CPU, RSS, open files),
        # python_info and python_gc_*; and the collector's pauses (app/runtime.py), timed while serving.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.gc_pauses = GcPauses()
        r.register(self.gc_pauses)
        r.register(ConnectionMetrics())
        for result in ("hit", "miss", "error", "skip"):
            self.cache.labels(result=result)
        for endpoint in MODEL_ENDPOINTS:
            for status in ALERTED_STATUSES:
                self.requests.labels(endpoint=endpoint, method="POST", status=status)
        for result in ("hit", "miss"):
            self.embeddings.labels(result=result)
        for stage in STAGES:
            self.stage.labels(stage=stage)
        # Every label value the code uses exists from the start, so that rate() and the alert rules
        # (deploy/alerts.yml) see a series at 0 rather than none.
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for op in REDIS_OPS:
            self.redis_errors.labels(op=op)

    def set_info(
        self, backbone: str, version: str, code_version: str, device: str, text_dtype: str, generator_dtype: str
    ) -> None:
        labels = {"backbone": backbone, "artifact_version": version, "code_version": code_version, "device": device}
        self.info.info({**labels, "text_dtype": text_dtype, "generator_dtype": generator_dtype})


class ConnectionMetrics:
    """``sglora_connections_closed_total{reason}``: connections the HTTP protocol (app/http_protocol.py) cut
    (a head too large or too slow, a stalled body, one over the connection bound), which the request
    metrics never see or see as a 499; ``sglora_open_connections``. Per process."""

    def describe(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        return [self._closed(), self._open()]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        family = self._closed()
        for reason in http_protocol.CLOSE_REASONS:
            family.add_metric([reason], http_protocol.closed[reason])
        yield family
        yield self._open(http_protocol.open_connections())

    @staticmethod
    def _closed() -> CounterMetricFamily:
        return CounterMetricFamily(
            "sglora_connections_closed",
            "connections cut by the HTTP protocol: head_too_large (431), head_timeout, body_timeout (408), "
            "over_capacity (503: opened beyond SGLORA_MAX_CONNECTIONS), client_over_capacity (503: beyond "
            "SGLORA_MAX_CLIENT_CONNECTIONS from one address)",
            labels=["reason"],
        )

    @staticmethod
    def _open(value: float | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "sglora_open_connections",
            "connections open, upgraded WebSockets included: what SGLORA_MAX_CONNECTIONS bounds "
            "(sglora serve / python -m app; 0 under another server)",
            value=value,
        )


class MetricsMiddleware:
    """Counts requests by route template (not raw path: bounded label values) and status; in-flight gauge."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, cache, started = 500, "", False
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, cache, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                cache = next((v.decode("latin-1") for k, v in message.get("headers", ()) if k.lower() == b"x-cache"), "")
            await send(message)

        watched = route_path(scope) != "/metrics"  # else an idle replica's scrape showed one request in flight
        routed = dict(scope)  # a mount (/static) rewrites the scope's path: route it as sent
        if watched:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            if not started:  # cut off at shutdown: RequestIdMiddleware answers 503
                status = 503
            raise
        finally:
            if watched:
                self.metrics.in_flight.dec()
            endpoint = getattr(scope.get("route"), "path", None) or _route_of(routed)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint, cache=cache).observe(time.perf_counter() - start)


def leaf_routes(routes) -> list:
    """The routes of an app or router, those of included routers in place of them (FastAPI wraps each
    ``include_router`` in a router of its own)."""
    out = []
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        out.extend(leaf_routes(inner) if inner is not None else [route])
    return out


def _route_of(scope: Scope) -> str:
    """The route template of a request answered before routing (a 413 of the body limit), else "other"."""
    app = scope.get("app")
    for route in leaf_routes(getattr(getattr(app, "router", None), "routes", ())):
        match, _ = route.matches(scope)
        if match != Match.NONE and isinstance(getattr(route, "path", None), str):
            return route.path
    return "other"

"""The monitoring files in deploy/: Prometheus configs and alert rules (checked and unit-tested with
promtool), the Grafana dashboard and its provisioning, all against the metrics the service exposes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from app_helpers import serving
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sglora.json"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and os.environ.get("CI") != "true",
    reason="promtool is not installed (apt-get install prometheus); under CI=true this fails instead",
)


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is not installed; .ci/run installs it (Debian package prometheus)"
    p = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in as Grafana would."""
    return expr.replace("$__rate_interval", "5m").replace('=~"$instance"', '=~".*"')


# ---- Prometheus ---------------------------------------------------------------------------------
@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-local.yml"])
def test_prometheus_configs_and_their_rules_pass_promtool(config):
    out = promtool("check", "config", str(DEPLOY / config)).stdout
    assert "1 rule files found" in out and f"{len(alert_rules())} rules found" in out


# Per alert: input series (1-minute steps), when it must fire, and a variant in which it must not.
# Every series carries job/instance as a Prometheus scrape adds them.
_T = 'job="sglora-api", instance="api:8000"'


def _requests(status: str, per_min: int, endpoint: str = "/generate", steps: int = 30) -> dict:
    method = "GET" if endpoint in ("/ready", "/health", "/metrics") else "POST"
    series = f'sglora_requests_total{{{_T}, endpoint="{endpoint}", method="{method}", status="{status}"}}'
    return {"series": series, "values": f"0+{per_min}x{steps}"}


def _latency(cache: str, bucket: str, other: str) -> list[dict]:
    """/generate answers ``cache``, 100 a minute, all in the bucket whose upper bound is ``bucket``; as many
    of the other cache result, all in the bucket ``other``."""
    out = []
    for result, upper in ((cache, bucket), ("miss" if cache == "hit" else "hit", other)):
        for le in ("0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "+Inf"):
            series = f'sglora_request_duration_seconds_bucket{{{_T}, endpoint="/generate", cache="{result}", le="{le}"}}'
            out.append({"series": series, "values": "0+100x40" if float(le) >= float(upper) else "0x40"})
    return out


def _cache(error_per_min: int, memory_hits_per_min: int | None = None) -> list[dict]:
    """60 hits, 30 misses and ``error_per_min`` errors a minute; of the hits, ``memory_hits_per_min`` from
    process memory (None: a target without that counter)."""
    hits = 60 + (memory_hits_per_min or 0)
    out = [
        {"series": f'sglora_cache_events_total{{{_T}, result="{r}"}}', "values": f"0+{n}x30"}
        for r, n in (("hit", hits), ("miss", 30), ("error", error_per_min))
    ]
    if memory_hits_per_min is not None:
        out.append({"series": f"sglora_cache_memory_hits_total{{{_T}}}", "values": f"0+{memory_hits_per_min}x30"})
    return out


SCENARIOS = {
    # alert: (series when it fires, eval time, series when it does not, the alert's own labels beyond severity)
    "SGLoRAApiDown": (
        [{"series": f"up{{{_T}}}", "values": "1 1 0 0 0 0 0 0 0 0"}],
        "5m",
        [{"series": f"up{{{_T}}}", "values": "1 1 1 1 0 1 1 1 1 1"}],  # one failed scrape is not down
        {"job": "sglora-api", "instance": "api:8000"},
    ),
    "SGLoRAServerErrors": (
        # 2 % 500s of the API requests, under a flood of scrapes that must not water the ratio down
        [_requests("200", 600), _requests("500", 12), _requests("200", 60000, endpoint="/metrics")],
        "15m",
        # 0.5 % 5xx, and /ready's 503s (a draining replica says so) are not errors
        [_requests("200", 600), _requests("504", 3), _requests("503", 600, endpoint="/ready")],
        {"job": "sglora-api"},
    ),
    "SGLoRAOverloaded": (
        [_requests("200", 600), _requests("429", 60)],
        "15m",
        [_requests("200", 600), _requests("429", 12)],
        {"job": "sglora-api"},
    ),
    "SGLoRAConnectionsRefused": (
        [{"series": f'sglora_connections_closed_total{{{_T}, reason="over_capacity"}}', "values": "0+10x30"}],
        "15m",
        [  # slow clients cut are not the bound
            {"series": f'sglora_connections_closed_total{{{_T}, reason="over_capacity"}}', "values": "0x30"},
            {"series": f'sglora_connections_closed_total{{{_T}, reason="head_timeout"}}', "values": "0+5x30"},
        ],
        {"job": "sglora-api"},
    ),
    "SGLoRAModelTimeouts": (
        [{"series": f'sglora_rejected_total{{{_T}, reason="timeout"}}', "values": "0+1x30"}],
        "15m",
        [
            {"series": f'sglora_rejected_total{{{_T}, reason="timeout"}}', "values": "0x30"},
            {"series": f'sglora_rejected_total{{{_T}, reason="overloaded"}}', "values": "0+5x30"},
        ],
        {"job": "sglora-api"},
    ),
    "SGLoRACacheDegraded": (_cache(60), "15m", _cache(3, 0), {"job": "sglora-api"}),
    "SGLoRACacheWritesFailing": (  # writes refused all along (while reads succeed) against one outage of a minute
        [{"series": f'sglora_redis_errors_total{{{_T}, op="set"}}', "values": "0+2x30"}],
        "15m",
        [
            {"series": f'sglora_redis_errors_total{{{_T}, op="set"}}', "values": "0x5 3x25"},
            {"series": f'sglora_redis_errors_total{{{_T}, op="get"}}', "values": "0+5x30"},
        ],
        {"job": "sglora-api"},
    ),
    # slow misses fire it, slow hits beside fast misses do not (and the other way round for hits)
    "SGLoRAGenerateSlow": (_latency("miss", "5.0", "0.1"), "30m", _latency("hit", "5.0", "1.0"), {"job": "sglora-api"}),
    "SGLoRACacheHitsSlow": (_latency("hit", "1.0", "2.5"), "30m", _latency("miss", "5.0", "0.25"), {"job": "sglora-api"}),
    "SGLoRAGcPauses": (  # seconds paused per minute, all generations of one process: 3.6 (6 %)
        [
            {"series": f'sglora_gc_pause_seconds_sum{{{_T}, generation="0"}}', "values": "0+0.6x40"},
            {"series": f'sglora_gc_pause_seconds_sum{{{_T}, generation="2"}}', "values": "0+3x40"},
        ],
        "35m",
        # two healthy replicas at 3 % each: a share of one process's time, not summed over the replicas
        [
            {"series": f'sglora_gc_pause_seconds_sum{{job="sglora-api", instance="{i}", generation="0"}}', "values": "0+1.8x40"}
            for i in ("api-1:8000", "api-2:8000")
        ],
        {"job": "sglora-api", "instance": "api:8000"},
    ),
    "SGLoRAModelSaturated": (
        [
            {"series": f"sglora_model_threads_busy{{{_T}}}", "values": "1x40"},
            {"series": f"sglora_model_threads{{{_T}}}", "values": "1x40"},
        ],
        "35m",
        [
            {"series": f"sglora_model_threads_busy{{{_T}}}", "values": " ".join(["1", "0"] * 20)},  # busy half the time
            {"series": f"sglora_model_threads{{{_T}}}", "values": "1x40"},
        ],
        {"job": "sglora-api"},
    ),
}


# More scenarios for some alerts: (alert, what the scenario shows, firing series, eval time, benign series, labels).
MORE_SCENARIOS = [
    # 60 errors among 1,050 events a minute (5.7 %), but 900 of them hits from process memory: 60 of the 150
    # that needed Redis failed. Benign: 3 of 150.
    ("SGLoRACacheDegraded", "behind hits from memory", _cache(60, 900), "15m", _cache(3, 900), {"job": "sglora-api"}),
]


def test_every_alert_has_a_scenario():
    assert set(SCENARIOS) == set(alert_rules())


@needs_promtool
def test_each_alert_fires_on_its_scenario_and_not_on_the_benign_one(tmp_path):
    rules = alert_rules()
    tests = []
    scenarios = [(name, "", *scenario) for name, scenario in SCENARIOS.items()] + MORE_SCENARIOS
    for name, what, firing, at, benign, labels in scenarios:
        rule = rules[name]
        expected = {
            "exp_labels": {"severity": rule["labels"]["severity"], **labels},
            "exp_annotations": {
                k: v.replace("{{ $labels.instance }}", labels.get("instance", "")) for k, v in rule["annotations"].items()
            },
        }
        tests.append(
            {
                "name": f"{name} fires {what}",
                "interval": "1m",
                "input_series": firing,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": [expected]}],
            }
        )
        tests.append(
            {
                "name": f"{name} stays quiet {what}",
                "interval": "1m",
                "input_series": benign,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}],
            }
        )
    spec = tmp_path / "alerts-test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    out = promtool("test", "rules", str(spec), cwd=tmp_path)
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_a_scenario_that_should_fire_is_caught_when_the_rule_is_wrong(tmp_path):
    """The unit test above can fail: the same scenario against a rule with a threshold nobody reaches."""
    broken = ALERTS.read_text().replace("> 0.01\n", "> 0.5\n")
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    firing, at, _, labels = SCENARIOS["SGLoRAServerErrors"]
    rule = alert_rules()["SGLoRAServerErrors"]
    expected = {"exp_labels": {"severity": "critical", **labels}, "exp_annotations": rule["annotations"]}
    check = {"eval_time": at, "alertname": "SGLoRAServerErrors", "exp_alerts": [expected]}
    case = {"interval": "1m", "input_series": firing, "alert_rule_test": [check]}
    (tmp_path / "t.yml").write_text(yaml.safe_dump({"rule_files": ["alerts.yml"], "tests": [case]}))
    p = subprocess.run([PROMTOOL, "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "SGLoRAServerErrors" in p.stdout + p.stderr


# ---- Grafana --------------------------------------------------------------------------------------
def test_dashboard_layout_and_variables():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["allValue"] == ".*"
    for expr in dashboard_exprs():
        assert '{instance=~"$instance"' in expr or 'instance=~"$instance"' in expr, f"not filtered by replica: {expr}"


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = [{"record": f"sglora:panel_query_{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"{len(rules)} rules found" in promtool("check", "rules", str(path)).stdout


@needs_promtool
def test_the_batch_size_p90_panel_reads_whole_descriptions(tmp_path):
    """histogram_quantile interpolates within a bucket: every call with one description read 0.9; batches are
    whole descriptions, so the panel rounds up (the bucket's bound when all calls fall in one)."""
    expr = next(e for e in dashboard_exprs() if "histogram_quantile" in e and "sglora_batch_size_bucket" in e)
    bounds = ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "+Inf")

    def calls(size: int) -> list[dict]:  # 60 calls a minute, each of ``size`` descriptions
        return [
            {"series": f'sglora_batch_size_bucket{{{_T}, le="{le}"}}', "values": "0+60x20" if float(le) >= size else "0x20"}
            for le in bounds
        ]

    tests = [
        {
            "interval": "1m",
            "input_series": calls(size),
            "promql_expr_test": [{"expr": as_promql(expr), "eval_time": "15m", "exp_samples": [{"labels": "{}", "value": want}]}],
        }
        for size, want in ((1, 1), (6, 8))
    ]
    (tmp_path / "t.yml").write_text(yaml.safe_dump({"tests": tests}))
    assert "SUCCESS" in promtool("test", "rules", "t.yml", cwd=tmp_path).stdout


def test_grafana_provisioning_is_wired_in_compose():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    env, mounts = compose["environment"], dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["volumes"][:2])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "$SGLORA_PROMETHEUS_URL"
    assert env["SGLORA_PROMETHEUS_URL"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "sglora.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "$SGLORA_GRAFANA_DASHBOARDS"
    assert mounts["./deploy/grafana/dashboards"] == env["SGLORA_GRAFANA_DASHBOARDS"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == env["SGLORA_GRAFANA_DASHBOARDS"] + "/" + DASHBOARD.name


# ---- both, against the service's own /metrics -------------------------------------------------------
_SELECTOR = re.compile(r"\b((?:sglora|process|python)_[a-z_]+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_ADDED = {"job", "instance"}  # labels Prometheus adds to every scraped series


@pytest.mark.anyio
async def test_rules_and_dashboard_name_only_metrics_and_labels_the_service_exposes(make_settings):
    async with serving(make_settings()) as (_, client):
        for cache in ("miss", "hit"):
            r = await client.post("/generate", json={"description": "a photo of a cat", "seed": 1})
            assert r.status_code == 200 and r.headers["x-cache"] == cache
        text = (await client.get("/metrics")).text
    labels: dict[str, set[str]] = {}  # sample name -> label names
    values: dict[str, set[str]] = {}  # label name -> values seen
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
            for k, v in s.labels.items():
                values.setdefault(k, set()).add(v)
    exprs = [r["expr"] for r in alert_rules().values()] + [as_promql(e) for e in dashboard_exprs()]
    checked = 0
    for expr in exprs:
        named = _SELECTOR.findall(expr)
        assert named or "sglora_" not in expr, expr  # every query but `up` names a metric of the service
        for name, matchers in named:
            assert name in labels, f"{name} is not in the service's /metrics (in {expr!r})"
            for label, op, value in _MATCHER.findall(matchers):
                assert label in labels[name] | _ADDED, f"{name} has no label {label!r} (in {expr!r})"
                if op == "=" and label not in _ADDED | {"status"}:
                    assert value in values.get(label, set()), f"no {name} series has {label}={value!r}"
            checked += 1
        known = set().union(*(labels[n] for n, _ in named)) | _ADDED if named else _ADDED
        for group in _BY.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in known, f"'by ({group})' names {label!r}, which none of its metrics has (in {expr!r})"
    assert checked >= 30


# ---- a real Prometheus against the real service ------------------------------------------------------
PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(
    PROMETHEUS is None and os.environ.get("CI") != "true",
    reason="prometheus is not installed (apt-get install prometheus); under CI=true this fails instead",
)
def test_prometheus_scrapes_the_service_loads_the_rules_and_every_panel_has_data(tiny_artifacts_session, shared_redis, tmp_path):
    """deploy/prometheus-local.yml with the service on a free port and a 1 s scrape: the rules load and
    evaluate, and every dashboard query returns a number (not NaN) once the service has answered a few
    requests."""
    from app.processes import free_port, start_server, stop, wait_ready

    assert PROMETHEUS, "prometheus is not installed; .ci/run installs it (Debian package prometheus)"
    url, prefix = shared_redis
    port, prom_port = free_port(), free_port()
    env = {**os.environ, "SGLORA_ARTIFACTS": str(tiny_artifacts_session), "SGLORA_REDIS_URL": url,
           "SGLORA_CACHE_PREFIX": prefix(), "SGLORA_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # fmt: skip
    config = yaml.safe_load((DEPLOY / "prometheus-local.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    server = start_server(port, env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _scrape_and_query(f"http://127.0.0.1:{prom_port}/api/v1", f"http://127.0.0.1:{port}", prom)
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
    finally:
        stop(server)


def _scrape_and_query(api: str, service: str, prom: subprocess.Popen) -> None:
    import httpx

    def query(expr: str) -> list:
        r = httpx.get(f"{api}/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.text)
        return r.json()["data"]["result"]

    def until(expr: str) -> None:
        end = time.monotonic() + 30
        while not query(expr):
            assert prom.poll() is None, prom.communicate()[1][-2000:]
            assert time.monotonic() < end, f"Prometheus never saw {expr}"
            time.sleep(0.3)

    end = time.monotonic() + 30
    while True:  # Prometheus answers 503 until its storage is open
        try:
            if httpx.get(api.removesuffix("/api/v1") + "/-/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert prom.poll() is None, prom.communicate()[1][-2000:]
        assert time.monotonic() < end, "Prometheus did not get ready"
        time.sleep(0.3)
    until('up{job="sglora-api"} == 1')  # scraping before the traffic, so that rates see it start
    with httpx.Client(base_url=service, timeout=30) as client:
        # A miss and a hit in every scrape interval: a series' first sample shows no increase to rate().
        for i in range(8):
            for cache in ("miss", "hit"):
                r = client.post("/generate", json={"description": f"a red circle {i}", "seed": 1})
                assert r.status_code == 200 and r.headers["x-cache"] == cache
            client.get("/experts")
            time.sleep(0.4)
    until('sum(rate(sglora_request_duration_seconds_count{endpoint="/generate", cache="hit"}[30s])) > 0')
    rules = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(loaded) == set(alert_rules())
    assert all(r["health"] == "ok" for r in loaded.values()), [(n, r.get("lastError")) for n, r in loaded.items()]
    assert all(r["state"] == "inactive" for r in loaded.values())  # a healthy service fires nothing
    empty = []
    for expr in dashboard_exprs():
        values = [float(v["value"][1]) for v in query(expr.replace("$__rate_interval", "30s").replace('=~"$instance"', '=~".+"'))]
        if not any(v == v for v in values):  # no series, or only NaN (a quantile or ratio of nothing)
            empty.append(expr)
    # Only the 5xx and 429 ratios may be empty: no such answer happened, so their numerators have no series.
    allowed = ('status=~"5..', 'status="429"')
    assert [e for e in empty if not any(a in e for a in allowed)] == []
    assert len(empty) <= 2, empty


def test_a_queue_wait_up_to_the_request_timeout_has_its_own_bucket():
    """The stage buckets stopped at 5 s: a 20 s queue wait (the timeout is 30 s) read as 5 s in every quantile."""
    from app.metrics import Metrics
    from app.settings import Settings

    m = Metrics()
    m.stage.labels(stage="queue").observe(20.0)
    buckets = {
        s.labels["le"]: s.value
        for f in m.registry.collect()
        for s in f.samples
        if s.name == "sglora_stage_duration_seconds_bucket" and s.labels["stage"] == "queue"
    }
    assert buckets["10.0"] == 0 and buckets["30.0"] == 1
    assert float(max((k for k in buckets if k != "+Inf"), key=float)) >= Settings.model_fields["request_timeout_s"].default

"""Deployment files: docker-compose.yml validates offline, the images and the trainer's skip logic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(
    COMPOSE is None and os.environ.get("CI") != "true",
    reason="docker-compose is not installed (apt-get install docker-compose); under CI=true this fails instead",
)
def test_compose_file_is_valid_and_wires_the_services():
    assert COMPOSE, "docker-compose is not installed; .ci/run installs it"
    subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], check=True, cwd=ROOT, timeout=60)
    out = subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"], check=True, cwd=ROOT, capture_output=True, text=True
    )
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) == {"redis", "trainer", "api", "prometheus", "grafana"}
    assert services["api"]["depends_on"] == {
        "trainer": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
    }
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory " in redis_cmd and "allkeys-lru" in redis_cmd and services["redis"]["healthcheck"]
    assert "offline-default.yaml" in services["trainer"]["command"][0]
    assert services["api"]["environment"]["SGLORA_REDIS_URL"] == "redis://redis:6379/0"
    # prometheus.yml names its rule file relative to itself: both are mounted in the same folder
    binds = [v.split(":") for v in services["prometheus"]["volumes"] if v.startswith("/")]  # host:container:mode
    mounts = {host.rsplit("/", 1)[-1]: container for host, container, *_ in binds}
    assert mounts == {"prometheus.yml": "/etc/prometheus/prometheus.yml", "alerts.yml": "/etc/prometheus/alerts.yml"}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_started"}}


@pytest.mark.parametrize(("config", "target"), [("prometheus.yml", "api:8000"), ("prometheus-local.yml", "127.0.0.1:8000")])
def test_prometheus_scrapes_the_api_and_loads_the_alerts(config, target):
    cfg = yaml.safe_load((ROOT / "deploy" / config).read_text())
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [target]
    assert cfg["rule_files"] == ["alerts.yml"]


def test_images_run_as_a_user_with_cpu_torch():
    api = (ROOT / "docker" / "Dockerfile.api").read_text()
    trainer = (ROOT / "docker" / "Dockerfile.trainer").read_text()
    for text in (api, trainer):
        assert "download.pytorch.org/whl/cpu" in text and "\nUSER sglora" in text
    assert "HEALTHCHECK --interval" in api and "/ready" in api
    assert "--no-install-recommends dataset-fashion-mnist tuxpaint-stamps-default" in trainer


@pytest.mark.parametrize("done", [True, False])
def test_trainer_skips_complete_artefacts(tmp_path, done):
    out = tmp_path / "offline-default"
    out.mkdir()
    stages = {"experts": {}, "repository": {}, "generator": {}} | ({"evaluate": {}} if done else {})
    (out / "manifest.json").write_text(json.dumps({"stages": stages}))
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "sglora").write_text('#!/bin/sh\necho "sglora $*"\n')
    (stub / "sglora").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"}
    p = subprocess.run(
        ["sh", str(ROOT / "docker" / "trainer-entrypoint.sh"), "configs/offline-default.yaml", str(out)],
        capture_output=True, text=True, env=env, timeout=30, check=True,
    )  # fmt: skip
    if done:
        assert "nothing to do" in p.stdout and "sglora pipeline" not in p.stdout
    else:
        assert f"sglora pipeline --config configs/offline-default.yaml --out {out}" in p.stdout

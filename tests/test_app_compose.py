"""Deployment files: docker-compose.yml validates offline, the images and the trainer's skip logic."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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


@pytest.mark.skipif(
    COMPOSE is None and os.environ.get("CI") != "true",
    reason="docker-compose is not installed (apt-get install docker-compose); under CI=true this fails instead",
)
def test_gpu_override_reserves_a_gpu_for_the_api_with_cuda_torch():
    """docker-compose.gpu.yml on top of docker-compose.yml: the api service alone changes (a GPU reserved,
    CUDA torch, SGLORA_DEVICE=cuda, its own image tag), the rest of the stack and the api's wiring as they were."""
    assert COMPOSE, "docker-compose is not installed; .ci/run installs it"

    def config(*files: str, env: dict | None = None) -> dict:
        args = [COMPOSE] + [a for f in files for a in ("-f", str(ROOT / f))] + ["config"]
        out = subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
        services = yaml.safe_load(out.stdout)["services"]
        for service in services.values():  # a merge of several files lists the volumes in another order
            service["volumes"] = sorted(service.get("volumes", []), key=str)
        return services

    cpu = config("docker-compose.yml")
    gpu = config("docker-compose.yml", "docker-compose.gpu.yml")
    assert {k: v for k, v in gpu.items() if k != "api"} == {k: v for k, v in cpu.items() if k != "api"}
    api, base = gpu["api"], cpu["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert api["build"]["args"] == {"TORCH_INDEX": ""} and "args" not in base["build"]  # "": PyPI's CUDA build
    assert api["environment"] == {**base["environment"], "SGLORA_DEVICE": "cuda"}
    assert api["image"] != base["image"]
    for key in ("depends_on", "healthcheck", "volumes", "ports", "stop_grace_period"):
        assert api[key] == base[key], key
    index = "https://download.pytorch.org/whl/cu126"
    assert config("docker-compose.yml", "docker-compose.gpu.yml", env={"SGLORA_TORCH_INDEX": index})["api"]["build"]["args"] == {
        "TORCH_INDEX": index
    }


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
    # The API image's torch index is a build argument (docker-compose.gpu.yml empties it), the CPU one by default.
    assert ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in _instructions("Dockerfile.api")
    assert "HEALTHCHECK --interval" in api and "/ready" in api
    assert "--no-install-recommends dataset-fashion-mnist tuxpaint-stamps-default" in trainer


@pytest.mark.parametrize("state", ["complete", "incomplete", "complete-but-damaged", "config-edited"])
def test_trainer_skips_complete_artefacts_that_load(tiny_artifacts, tmp_path, state):
    """Skips only a complete run built with the config's settings that loads here: an edited config (it
    served the old run) runs the pipeline, which keeps what the edit leaves valid."""
    out, config = tiny_artifacts, "configs/tiny.yaml"
    if state == "incomplete":
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["stages"]["evaluate"]
        (out / "manifest.json").write_text(json.dumps(manifest))
    elif state == "complete-but-damaged":  # as a volume written under other package versions: it refuses to load
        with open(out / "backbone" / "backbone.json", "a") as f:
            f.write(" ")
    elif state == "config-edited":
        text = (ROOT / config).read_text()
        config = str(tmp_path / "edited.yaml")
        assert "  sg_samples: 2" in text
        Path(config).write_text(text.replace("  sg_samples: 2", "  sg_samples: 3"))  # an evaluation setting
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "sglora").write_text('#!/bin/sh\necho "sglora $*"\n')
    (stub / "sglora").chmod(0o755)
    python = Path(sys.executable).parent  # the venv's python3 stands for the image's, which has the package
    env = {**os.environ, "PATH": f"{stub}:{python}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        ["sh", str(ROOT / "docker" / "trainer-entrypoint.sh"), config, str(out)],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )  # fmt: skip
    if state == "complete":
        assert p.returncode == 0 and "nothing to do" in p.stdout and "sglora pipeline" not in p.stdout, p.stderr
    elif state in ("incomplete", "config-edited"):
        assert p.returncode == 0 and f"sglora pipeline --config {config} --out {out}" in p.stdout, p.stderr
        assert ("changed since" in p.stdout) == (state == "config-edited")
    else:
        assert p.returncode == 1 and "sglora pipeline" not in p.stdout
        assert "is complete but does not load here" in p.stderr and "backbone.json" in p.stderr
        assert "docker volume rm" in p.stderr and "Traceback" not in p.stderr


# ---- the images' files: what a build would find, and the commands they run -----------------------------
def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether BuildKit leaves ``path`` (relative to the context) out, for the patterns the images use: a
    ``**`` catch-all, ``!dir/`` or ``!file`` re-inclusions and ``**/name`` exclusions; the last match wins."""
    parts = path.split("/")
    ignored = False
    for raw in patterns:
        negate, pat = raw.startswith("!"), raw.lstrip("!").rstrip("/")
        if pat == "**":
            hit = True
        elif pat.startswith("**/"):
            hit = pat[3:] in parts
        else:
            hit = path == pat or path.startswith(pat + "/")
        if hit:
            ignored = not negate
    return ignored


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    text = (ROOT / "docker" / dockerfile).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("image", ["api", "trainer"])
def test_every_copied_file_exists_and_is_in_the_build_context(image):
    dockerfile = f"Dockerfile.{image}"
    patterns = [
        line.strip()
        for line in (ROOT / "docker" / f"{dockerfile}.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    copies = [args.split() for op, args in _instructions(dockerfile) if op == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            files = [f for f in tracked if f == src or f.startswith(src + "/")]
            assert files, f"{dockerfile}: COPY {src}: no such file in the repository"
            sent = [f for f in files if not _dockerignored(f, patterns)]
            assert sent, f"{dockerfile}: COPY {src}: {dockerfile}.dockerignore leaves it out of the build context"


def _pins(path: Path) -> dict[str, str]:
    """A pip constraints file's ``name==version`` lines as {name: version} (comments and blank lines skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


def test_both_images_install_the_versions_the_artefacts_record():
    """The offline backbone refuses artefacts written under other versions of its packages: the trainer
    and API images pin them alike (docker/constraints.txt), at the torchvision of their CPU-wheel line."""
    from models.offline_backbone import PINNED_PACKAGES

    pins = _pins(ROOT / "docker" / "constraints.txt")
    assert set(PINNED_PACKAGES) <= set(pins) and all(pins.values()), pins
    for image in ("api", "trainer"):
        runs = [args for op, args in _instructions(f"Dockerfile.{image}") if op == "RUN" and "pip install" in args]
        index = "whl/cpu" if image == "trainer" else '${TORCH_INDEX:+--index-url "$TORCH_INDEX"}'  # api: the ARG's
        assert any(f"torchvision=={pins['torchvision']}" in r and index in r for r in runs), runs
        assert any("-c docker/constraints.txt '.[offline]'" in r for r in runs), runs
    makefile = (ROOT / "Makefile").read_text()  # a local venv too
    assert "install -q -c docker/constraints.txt -c tests/constraints.txt -e '.[offline,dev]'" in makefile


def test_the_test_only_packages_are_pinned_and_installed_at_their_pins():
    """Every package of the `dev` extra has an exact pin in tests/constraints.txt, which `make install`
    applies (above): the installed release is the pinned one."""
    import tomllib
    from importlib import metadata

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in dev}
    pins = {name.lower(): version for name, version in _pins(ROOT / "tests" / "constraints.txt").items()}
    assert names <= set(pins) and all(pins.values()), (names, pins)
    installed = {name: metadata.version(name) for name in pins}
    assert installed == pins


def test_the_images_commands_parse_with_the_cli():
    from sglora.cli import build_parser

    def command(dockerfile: str, op: str) -> list[str]:
        (args,) = [a for o, a in _instructions(dockerfile) if o == op]
        return json.loads(args)

    api = command("Dockerfile.api", "CMD")
    assert api[:2] == ["sh", "-c"] and api[2].startswith("exec sglora serve ")  # exec: the server is PID 1
    argv = api[2].removeprefix("exec sglora ").replace('"$SGLORA_ARTIFACTS"', "/artifacts/offline-default").split()
    args = build_parser().parse_args(argv)
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert ("EXPOSE", "8000") in _instructions("Dockerfile.api")

    assert command("Dockerfile.trainer", "ENTRYPOINT") == ["sh", "/usr/local/bin/sglora-train"]
    config, out = command("Dockerfile.trainer", "CMD")
    assert (ROOT / config).is_file()
    entry = (ROOT / "docker" / "trainer-entrypoint.sh").read_text()
    assert 'build = ["sglora", "pipeline", "--config", config, "--out", str(out)]' in entry and "os.execvp" in entry
    args = build_parser().parse_args(["pipeline", "--config", config, "--out", out])
    assert args.command == "pipeline" and args.stage is None


def test_every_sglora_variable_the_deployment_files_set_is_read():
    """A variable no setting reads is dropped with a start-up warning naming it as misspelt: the GPU
    override's SGLORA_TORCH_INDEX was named so, though the compose file reads it."""
    import re

    from app.settings import unknown_variables

    files = [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml", *sorted((ROOT / "docker").iterdir())]
    files += sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())
    names = {m for f in files for m in re.findall(r"SGLORA_[A-Z0-9_]+", f.read_text(errors="replace"))}
    assert "SGLORA_TORCH_INDEX" in names and "SGLORA_ARTIFACTS" in names
    assert unknown_variables(dict.fromkeys(names, "")) == []

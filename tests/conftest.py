import os
import shutil
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning
# threads of two processes slow each other down by an order of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from app.processes import free_port, start_redis, stop  # noqa: E402

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test starts from the session's environment: the CLI's ``main()`` sets variables for its process
    (``TQDM_MININTERVAL``, ``OMP_WAIT_POLICY``) that, called in-process, outlived the test that called it."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_backbone():
    from models.backbone import BackboneConfig, create_backbone

    return create_backbone(BackboneConfig(kind="open_clip", model="tiny-vit", model_config=TINY_MODEL))


@pytest.fixture(scope="session")
def tiny_config():
    from training.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_artifacts_session(tmp_path_factory, tiny_config):
    """One full tiny pipeline run shared by the tests that only read artefacts."""
    from training.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("art") / "tiny"
    run_pipeline(tiny_config, out)
    return out


@pytest.fixture
def tiny_artifacts(tiny_artifacts_session, tmp_path):
    """A private copy, for tests that modify or corrupt artefacts."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts_session, dst)
    return dst


# ---- service tests (tests/test_app_*.py) ------------------------------------------------------------
SHARED_REDIS = "redis://127.0.0.1:6379/13"  # the machine's shared Redis; these tests use db 13 + unique prefixes


def missing(message: str) -> None:
    """Skips the test for want of a tool or server, except under CI=true, where that is a failure (.ci/run
    installs and starts them), as tests/test_ui.py does for the browser."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_redis():
    """(url, prefix factory) on the shared Redis; every key written under the prefixes is deleted at the end."""
    import uuid

    import redis

    client = redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError as e:
        missing(f"no Redis at {SHARED_REDIS}: {e} (start one: redis-server --save '' --appendonly no --daemonize yes)")
    session = f"sglora-test-{uuid.uuid4().hex[:8]}"
    counter = iter(range(1_000_000))

    def prefix() -> str:
        return f"{session}-{next(counter)}:"

    yield SHARED_REDIS, prefix
    for key in client.scan_iter(match=f"{session}-*", count=1000):
        client.delete(key)
    client.close()


class RedisProcess:
    """A private ``redis-server`` on a free loopback port that a test may stop and restart."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc = None

    def start(self) -> None:
        self.proc = start_redis(self.port, self.workdir)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path):
    """A started private Redis (never the shared one); stopped at the end."""
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed (apt-get install redis-server)")
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def make_settings(tiny_artifacts_session, shared_redis):
    """Settings for a test app: the shared tiny artefacts and a fresh cache prefix, with overrides. The text
    tower and the CVAE run in float32 (not 'auto'), so that answers compare bit for bit with a library engine's.
    One model thread, whatever the machine's cores (the default follows them): tests that want more say so."""
    from app.settings import Settings

    url, prefix = shared_redis

    def make(**overrides):
        values = {"artifacts": tiny_artifacts_session, "redis_url": url, "cache_prefix": prefix()}
        values["threads"] = values["model_threads"] = 1
        values["text_dtype"] = values["generator_dtype"] = "float32"
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def client(make_settings):
    """The service on the tiny artefacts behind a TestClient (lifespan included), one per test module."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings())) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_artifacts_session):
    """An independent load of the same artefacts on the device the service and the CLI pick ('auto'): what
    they would produce (bit for bit only on the same device)."""
    from sglora.artifacts import load_artifacts

    return load_artifacts(tiny_artifacts_session, "auto")

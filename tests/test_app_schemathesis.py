"""Property-based run of the OpenAPI schema (schemathesis): valid and invalid requests to every
operation, in-process against the ASGI app; whatever the input, never a 5xx.

The cases come from ``operation.as_strategy(mode)`` under a plain hypothesis ``@given``: schemathesis'
own ``pytest.from_fixture`` relies on a pytest attribute that pytest 9.2 no longer has.
"""

from __future__ import annotations

import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402

ADMIN = {"X-API-Key": "admin-key"}
EXAMPLES = 50  # per operation and mode
# Every documented operation (building the app loads nothing; the artefacts load in its lifespan), with
# valid inputs, and with invalid ones where a body makes them possible (a path or header string has none).
CASES = [
    pytest.param(path, m.upper(), mode, id=f"{m.upper()} {path} {mode.value}")
    for path, ops in create_app(Settings(redis_url="")).openapi()["paths"].items()
    for m, op in ops.items()
    for mode in ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if "requestBody" in op else [GenerationMode.POSITIVE])
]


@pytest.fixture(scope="module")
def api_schema(tiny_artifacts_session, tmp_path_factory, make_settings):
    root = tmp_path_factory.mktemp("fuzz") / "tiny"  # the fuzzer may try to change the repository
    shutil.copytree(tiny_artifacts_session, root)
    app = create_app(make_settings(artifacts=root, admin_keys=["admin-key"], threads=1, max_images=4, max_batch_items=4))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # the app's lifespan ran on schemathesis' own event-loop thread


@pytest.mark.parametrize(("path", "method", "mode"), CASES)
def test_no_input_makes_a_server_error(api_schema, path, method, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def run(case):
        # The admin key on every call, so the expert operations get past the key check to the validation.
        case.call_and_validate(headers=ADMIN, checks=[not_a_server_error])

    run()

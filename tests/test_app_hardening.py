"""Bad input never yields a 5xx, and the access rules: one table of hostile requests, one of keys.

Every bad request gets a 4xx whose JSON body names the field and the reason, and leaves the service
(same bytes for the same request) and the artefact directory (same files, same hashes) unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import shutil
import struct
import zlib

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save

from app.deps import key_matches
from app.main import create_app
from app.metrics import metric_sum
from expert_store.repository import ExpertRepository
from sglora.export import safetensors_bytes, to_peft_tensors

USER = {"X-API-Key": "user-key"}
ADMIN = {"X-API-Key": "admin-key"}
LIMITS = {"max_image_bytes": 40_000, "max_expert_bytes": 32_000, "max_body_bytes": 3_000_000, "max_request_pixels": 30_000_000}


def png(size=(32, 32), mode="RGB", color="red") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width x height, with (almost) no pixel data: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    return buf.getvalue()


GOOD_PNG = png()
BOMB_PNG = png((5000, 5000), mode="1", color=0)  # 25 M pixels (over the default 16.7 M), a few kB on the wire
LARGE_PNG = png((3000, 3000), mode="1", color=0)  # 9 M pixels: allowed alone, not four of them (30 M together)
IMAGE_CASES = {
    "not-an-image": b"hello, I am text",
    "truncated-png": GOOD_PNG[: len(GOOD_PNG) // 2],
    "bomb-png": BOMB_PNG,
    "bomb-header": png_claiming(100_000, 100_000),  # 1e10 pixels: PIL's own DecompressionBombError
    "tiff-not-allowed": tiff(),
    "svg-not-allowed": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "empty-file": b"",
    "too-large": b"\x89PNG\r\n\x1a\n" + bytes(LIMITS["max_image_bytes"]),
}
IMAGE_STATUS = {"too-large": 413}
IMAGES = list(IMAGE_CASES.items())


def files(*images: bytes) -> list:
    return [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]


@pytest.fixture(scope="module")
def served(tiny_artifacts_session, tmp_path_factory, make_settings):
    root = tmp_path_factory.mktemp("hardening") / "tiny"
    shutil.copytree(tiny_artifacts_session, root)
    # No cache of LoRAs (Redis, the in-process LRU, the hot keys): a repeated request is generated again, so
    # that "the same answer as before" checks the model's state after a refused request, not a cached copy.
    no_cache = {"redis_url": "", "lru_bytes": 0, "hot_keys": 0}
    settings = make_settings(artifacts=root, api_keys=["user-key"], admin_keys=["admin-key"], threads=1, **no_cache, **LIMITS)
    with TestClient(create_app(settings), headers=USER, raise_server_exceptions=False) as client:
        repo = ExpertRepository.load(root / "repository")
        mean = repo["circle"].mean
        peft = to_peft_tensors(repo.spec, mean)
        first = next(iter(peft))
        experts = {
            "good": safetensors_bytes(repo.spec, mean, {}),
            "renamed": save({k.replace("lora_A", "lora_Z"): v for k, v in peft.items()}),
            "missing": save({k: v for k, v in peft.items() if k != first}),
            "reshaped": save({**peft, first: torch.zeros(3, 3)}),
            "nan": safetensors_bytes(repo.spec, torch.full_like(mean, float("nan")), {}),
            "inf": safetensors_bytes(repo.spec, mean.clone().index_fill_(0, torch.tensor([0]), float("inf")), {}),
            "negative": safetensors_bytes(repo.spec, -torch.ones_like(mean), {}),
            "huge": safetensors_bytes(repo.spec, torch.full_like(mean, 1e10), {}),  # finite, but not as a LoRA
            "huge-variance": safetensors_bytes(repo.spec, torch.full_like(mean, 1e20), {}),
            "integers": save({k: v.round().to(torch.int32) for k, v in peft.items()}),
            "garbage": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage",
            "huge-header": struct.pack("<Q", 1 << 60) + b"{}",
            "oversized": bytes(LIMITS["max_expert_bytes"] + 1),
        }
        assert len(experts["good"]) < LIMITS["max_expert_bytes"]
        yield client, root, experts


def snapshot(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def expert_form(name="disc", description="an orange disc", **extra):
    return {"name": name, "description": description, **extra}


def upload(experts, mean="good", variance=None):
    out = {"mean": ("mean.safetensors", experts[mean], "application/octet-stream")}
    if variance is not None:
        out["variance"] = ("variance.safetensors", experts[variance], "application/octet-stream")
    return out


def gen(body):
    return lambda c, x: c.post("/generate", json=body)


def batch(items):
    return lambda c, x: c.post("/generate/batch", json={"items": items})


def raw(path, content, content_type, method="POST"):
    return lambda c, x: c.request(method, path, content=content, headers={"Content-Type": content_type})


def retrieve(data, images=(GOOD_PNG,)):
    return lambda c, x: c.post("/retrieve", data=data, files=files(*images))


def register(form, mean="good", variance=None, headers=ADMIN):
    return lambda c, x: c.post("/experts", data=form, files=upload(x, mean, variance), headers=headers)


BAD = [
    # ---- descriptions ----
    ("empty", gen({"description": ""}), 422, "description"),
    ("whitespace-only", gen({"description": " \t\n  "}), 422, "description"),
    ("over-long", gen({"description": "x" * 1001}), 422, "description"),
    ("nul", gen({"description": "a\x00b"}), 422, "description"),
    ("bell", gen({"description": "ring the bell\x07"}), 422, "description"),
    ("ansi-escape", gen({"description": "\x1b[31ma red circle"}), 422, "description"),
    ("c1-control", gen({"description": "a\x9bcircle"}), 422, "description"),
    ("unit-separator", gen({"description": "a\x1fcircle"}), 422, "description"),
    ("zero-width-space-only", gen({"description": "\u200b"}), 422, "description"),
    ("byte-order-mark-and-space", gen({"description": "\ufeff \u200b"}), 422, "description"),
    ("missing", gen({}), 422, "description"),
    # ---- JSON types ----
    ("description-number", gen({"description": 12}), 422, "description"),
    ("description-list", gen({"description": ["a"]}), 422, "description"),
    ("seed-string", gen({"description": "a", "seed": "abc"}), 422, "seed"),
    ("seed-bool", gen({"description": "a", "seed": True}), 422, "seed"),
    ("seed-float", gen({"description": "a", "seed": 1.5}), 422, "seed"),
    ("top-k-float", gen({"description": "a", "top_k": 2.5}), 422, "top_k"),
    ("temperature-string", gen({"description": "a", "temperature": "hot"}), 422, "temperature"),
    ("temperature-numeric-string", gen({"description": "a", "temperature": "0.5"}), 422, "temperature"),
    ("temperature-bool", gen({"description": "a", "temperature": True}), 422, "temperature"),
    ("method-number", gen({"description": "a", "method": 3}), 422, "method"),
    ("unknown-field", gen({"description": "a", "topk": 2}), 422, "topk"),
    ("body-list", gen([{"description": "a"}]), 422, "body"),
    ("body-null", raw("/generate", b"null", "application/json"), 422, "body"),
    ("malformed-json", raw("/generate", b'{"description": "a",', "application/json"), 422, "body"),
    ("not-utf8", raw("/generate", b'{"description": "a\xff"}', "application/json"), 400, "body"),
    (
        "seed-5000-digits",
        raw("/generate", b'{"description": "a", "seed": ' + b"9" * 5000 + b"}", "application/json"),
        400,
        "body",
    ),  # noqa: E501
    ("text-plain", raw("/generate", b'{"description": "a"}', "text/plain"), 415, "Content-Type"),
    ("form-to-generate", lambda c, x: c.post("/generate", data={"description": "a"}), 415, "Content-Type"),
    ("batch-text-plain", raw("/generate/batch", b'{"items": [{"description": "a"}]}', "text/plain"), 415, "Content-Type"),
    ("batch-items-not-list", batch({"description": "a"}), 422, "items"),
    ("batch-over-long", batch([{"description": "a"}, {"description": "x" * 1001}]), 422, "items[1].description"),
    ("batch-empty", batch([]), 422, "items"),
    ("batch-too-many", batch([{"description": "a"}] * 33), 422, "items"),
    ("batch-bad-item", batch([{"description": "a\x00"}]), 422, "items[0].description"),
    # ---- ranges ----
    ("seed-negative", gen({"description": "a", "seed": -1}), 422, "seed"),
    ("seed-2^63", gen({"description": "a", "seed": 2**63}), 422, "seed"),
    ("top-k-zero", gen({"description": "a", "top_k": 0}), 422, "top_k"),
    ("top-k-over-experts", gen({"description": "a", "top_k": 5}), 422, "top_k"),
    ("top-k-huge", gen({"description": "a", "top_k": 2**80}), 422, "top_k"),
    ("temperature-zero", gen({"description": "a", "temperature": 0}), 422, "temperature"),
    ("temperature-negative", gen({"description": "a", "temperature": -0.5}), 422, "temperature"),
    ("temperature-underflow", gen({"description": "a", "temperature": 1e-300}), 422, "temperature"),
    ("method-unknown", gen({"description": "a", "method": "lora-magic"}), 422, "method"),
    ("preview-top-k", lambda c, x: c.post("/generate/preview", json={"description": "a", "top_k": 9}), 422, "top_k"),
    # ---- multipart ----
    ("multipart-no-boundary", raw("/retrieve", b"xyz", "multipart/form-data"), 400, "body"),
    ("multipart-garbage", raw("/retrieve", b"garbage", "multipart/form-data; boundary=zz"), 400, "body"),
    (
        "multipart-cut",
        raw(
            "/retrieve",
            b'--zz\r\nContent-Disposition: form-data; name="description"\r\n\r\na',
            "multipart/form-data; boundary=zz",
        ),
        422,
        "images",
    ),  # noqa: E501
    ("form-urlencoded", lambda c, x: c.post("/retrieve", data={"description": "a"}), 415, "Content-Type"),
    ("retrieve-json", lambda c, x: c.post("/retrieve", json={"description": "a"}), 415, "Content-Type"),
    ("retrieve-description-twice", retrieve({"description": ["a", "b"]}), 422, "description"),
    ("retrieve-no-text", retrieve({}), 422, "description"),
    ("retrieve-both", retrieve({"description": "a", "etag": "0" * 32}), 422, "description"),
    ("retrieve-caption-blank", retrieve({"description": "a", "captions": ["ok", " "]}), 422, "captions[1]"),
    ("retrieve-caption-control", retrieve({"description": "a", "captions": ["a\x00"]}), 422, "captions[0]"),
    ("retrieve-caption-long", retrieve({"description": "a", "captions": ["y" * 1001]}), 422, "captions[0]"),
    ("retrieve-top-k", retrieve({"description": "a", "top_k": "9"}), 422, "top_k"),
    ("retrieve-temperature", retrieve({"description": "a", "temperature": "0"}), 422, "temperature"),
    ("retrieve-seed-text", retrieve({"description": "a", "seed": "x"}), 422, "seed"),
    ("retrieve-method", retrieve({"description": "a", "method": "nope"}), 422, "method"),
    ("retrieve-misspelt-field", retrieve({"description": "a", "caption": "a red thing"}), 422, "caption"),
    ("retrieve-misspelt-flag", retrieve({"description": "a", "zero-shot": "true"}), 422, "zero-shot"),
    # ---- images ----
    *[(f"image-{k}", retrieve({"description": "a"}, (GOOD_PNG, v)), IMAGE_STATUS.get(k, 422), "images[1]") for k, v in IMAGES],
    ("too-many-images", retrieve({"description": "a"}, [GOOD_PNG] * 65), 422, "images"),
    ("too-many-pixels-together", retrieve({"description": "a"}, [LARGE_PNG] * 4), 422, "images"),
    ("body-over-limit", retrieve({"description": "a"}, [GOOD_PNG + bytes(35_000)] * 90), 413, "body"),
    ("chunked-body-over-limit", lambda c, x: c.post("/generate", content=iter([b"x" * 1_000_000] * 4)), 413, "body"),
    # ---- adapter references ----
    ("etag-unknown", retrieve({"etag": '"' + "0" * 32 + '"'}), 404, "etag"),
    ("etag-malformed", retrieve({"etag": "../../manifest.json"}), 422, "etag"),
    # ---- expert uploads ----
    ("expert-form-urlencoded", lambda c, x: c.post("/experts", data=expert_form(), headers=ADMIN), 415, "Content-Type"),
    ("expert-name-twice", register(expert_form(name=["disc", "ring"])), 422, "name"),
    ("expert-misspelt-field", register(expert_form(snapshots="10")), 422, "snapshots"),
    (
        "expert-misspelt-file",
        lambda c, x: c.post(
            "/experts", data=expert_form(), files={**upload(x), "varaince": ("v.safetensors", x["good"])}, headers=ADMIN
        ),
        422,
        "varaince",
    ),
    ("expert-renamed-tensors", register(expert_form(), "renamed"), 422, "mean"),
    ("expert-missing-tensor", register(expert_form(), "missing"), 422, "mean"),
    ("expert-wrong-shape", register(expert_form(), "reshaped"), 422, "mean"),
    ("expert-nan", register(expert_form(), "nan"), 422, "mean"),
    ("expert-inf", register(expert_form(), "inf"), 422, "mean"),
    ("expert-not-safetensors", register(expert_form(), "garbage"), 422, "mean"),
    ("expert-huge-header", register(expert_form(), "huge-header"), 422, "mean"),
    ("expert-over-size-limit", register(expert_form(), "oversized"), 413, "mean"),
    ("expert-variance-negative", register(expert_form(), "good", "negative"), 422, "variance"),
    ("expert-variance-nan", register(expert_form(), "good", "nan"), 422, "variance"),
    ("expert-variance-over-limit", register(expert_form(), "good", "oversized"), 413, "variance"),
    ("expert-huge-values", register(expert_form(), "huge"), 422, "mean"),
    ("expert-variance-huge", register(expert_form(), "good", "huge-variance"), 422, "variance"),
    ("expert-name-traversal", register(expert_form(name="../../manifest")), 422, "name"),
    ("expert-name-final-newline", register(expert_form(name="disc\n")), 422, "name"),
    ("expert-name-hidden", register(expert_form(name=".hidden")), 422, "name"),
    ("expert-name-taken", register(expert_form(name="circle")), 409, "name"),
    ("expert-description-blank", register(expert_form(description="  ")), 422, "description"),
    ("expert-description-control", register(expert_form(description="a\x00")), 422, "description"),
    ("expert-description-long", register(expert_form(description="z" * 1001)), 422, "description"),
    ("expert-snapshots-zero", register(expert_form(num_snapshots="0")), 422, "num_snapshots"),
    ("expert-snapshots-huge", register(expert_form(num_snapshots=str(10**30))), 422, "num_snapshots"),
    ("expert-integer-tensors", register(expert_form(), "integers"), 422, "mean"),
    (
        "expert-no-mean",
        lambda c, x: c.post("/experts", data=expert_form(), files={"variance": ("v.safetensors", x["good"])}, headers=ADMIN),
        422,
        "mean",
    ),
    ("delete-unknown", lambda c, x: c.delete("/experts/nobody", headers=ADMIN), 404, "name"),
    ("delete-bad-name", lambda c, x: c.delete("/experts/..manifest.json", headers=ADMIN), 422, "name"),
    ("delete-traversal", lambda c, x: c.delete("/experts/..%2F..%2Fmanifest.json", headers=ADMIN), 404, "path"),
    # ---- routing ----
    ("unknown-path", lambda c, x: c.get("/generate/../../etc/passwd"), 404, "path"),
    ("wrong-method", lambda c, x: c.get("/generate"), 405, "method"),
    ("static-traversal", lambda c, x: c.get("/static/../settings.py"), 404, "path"),
    ("static-encoded-traversal", lambda c, x: c.get("/static/%2e%2e/settings.py"), 404, "path"),
]


@pytest.fixture(scope="module")
def baseline(served):
    client, root, _ = served
    body = {"description": "a red circle", "seed": 3}
    r = client.post("/generate", json=body)
    assert r.status_code == 200
    return body, r.content, snapshot(root), client.get("/experts").json()


@pytest.mark.parametrize(("make", "status", "field"), [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(served, baseline, make, status, field):
    client, root, experts = served
    body, data, files_before, listing = baseline
    r = make(client, experts)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert re.fullmatch("[0-9a-f]{32}", r.headers["x-request-id"])  # to match a report with the log
    detail = r.json()["detail"]
    assert detail["field"] == field and isinstance(detail["reason"], str) and detail["reason"], detail
    # Nothing changed: the files, the repository, the answer to the same request.
    assert snapshot(root) == files_before
    assert client.get("/experts").json() == listing
    again = client.post("/generate", json=body)
    assert again.status_code == 200 and again.headers["x-cache"] == "miss" and again.content == data
    assert client.get("/ready").status_code == 200


def test_description_limit_is_configurable(make_settings):
    with TestClient(create_app(make_settings(max_description_chars=10, threads=1))) as c:
        assert c.post("/generate", json={"description": "a" * 10, "seed": 1}).status_code == 200
        r = c.post("/generate", json={"description": "a" * 11})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "description" and "10" in r.json()["detail"]["reason"]
        # Whitespace is normalised first: runs of spaces do not count against the limit.
        assert c.post("/generate", json={"description": "  a    b  c   ", "seed": 1}).status_code == 200


def test_allowed_images_decode(served):
    client, _, _ = served
    imgs = []
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), "blue").save(buf, format=fmt)
        imgs.append(buf.getvalue())
    r = client.post("/retrieve", data={"description": "a blue square", "seed": "1"}, files=files(*imgs))
    assert r.status_code == 200, r.text
    assert len(r.json()["lora"]["scores"]) == 5


# ---- access ------------------------------------------------------------------------------------------
OPEN = [
    *[("GET", p) for p in ("/health", "/ready", "/metrics", "/", "/static/app.js", "/openapi.json", "/docs", "/redoc")],
    ("GET", "/static-docs/swagger-ui-bundle.js"),
]
MODEL = [
    ("POST", "/generate", {"json": {"description": "a ring", "seed": 1}}),
    ("POST", "/generate/preview", {"json": {"description": "a ring", "seed": 1}}),
    ("POST", "/generate/batch", {"json": {"items": [{"description": "a ring", "seed": 1}]}}),
    ("POST", "/retrieve", {"data": {"description": "a ring", "seed": "1"}, "files": files(GOOD_PNG)}),
    ("GET", "/experts", {}),
]
NO_KEY = {"X-API-Key": ""}


@pytest.mark.parametrize(("method", "path"), OPEN)
def test_operational_endpoints_stay_open(served, method, path):
    client, _, _ = served
    assert client.request(method, path, headers=NO_KEY).status_code == 200
    assert client.request(method, path, headers={"X-API-Key": "wrong"}).status_code == 200
    if method == "GET" and path in ("/", "/health", "/ready", "/metrics"):  # HEAD wherever GET answers: it was a 405
        head = client.head(path)
        assert head.status_code == 200 and head.content == b""


def test_the_page_may_not_be_framed_and_loads_its_own_files_only(served):
    r = served[0].get("/")
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (" , ", "SGLORA_API_KEYS holds only blanks and commas"),  # the API was left open without a word
        ("ok,clé-secrète", "SGLORA_API_KEYS: key 2 is not printable ASCII"),  # a UTF-8 client never matched it
        ("two words", "SGLORA_API_KEYS: key 1 is not printable ASCII without spaces"),
    ],
)
def test_key_settings_that_cannot_work_are_refused_without_echoing_them(monkeypatch, value, needle):
    from pydantic import ValidationError

    from app.settings import Settings

    monkeypatch.setenv("SGLORA_API_KEYS", value)
    with pytest.raises(ValidationError, match=needle) as e:
        Settings()
    assert "input_value" not in str(e.value) and "secr" not in str(e.value) and "words" not in str(e.value)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (NO_KEY, 401),
        ({"X-API-Key": "wrong"}, 403),
        ({"X-API-Key": "user-key\t "}, 200),  # blanks around a field value are not part of it (RFC 9110), as for Bearer
        ({"X-API-Key": "USER-KEY"}, 403),
        ({"X-API-Key": "", "Authorization": "Bearer wrong"}, 403),
        ({"X-API-Key": "", "Authorization": "Basic dXNlci1rZXk="}, 401),  # only Bearer is read
        ({"X-API-Key": "", "Authorization": "Bearer  "}, 401),  # no key sent, as with an empty X-API-Key
        (USER, 200),
        (ADMIN, 200),  # an admin key works everywhere
        ({"X-API-Key": "", "Authorization": "Bearer user-key"}, 200),
    ],
    ids=["none", "wrong", "trailing-blanks", "case", "bearer-wrong", "basic", "bearer-empty", "user", "admin", "bearer-user"],
)
@pytest.mark.parametrize("endpoint", MODEL, ids=[f"{m} {p}" for m, p, _ in MODEL])
def test_model_endpoints_need_an_api_key(served, endpoint, headers, status):
    client, _, _ = served
    method, path, kwargs = endpoint
    r = client.request(method, path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    if status >= 400:
        assert r.json()["detail"]["field"] == "X-API-Key"
    assert (r.headers.get("www-authenticate") == 'Bearer realm="sglora"') == (status == 401)  # RFC 9110 asks it of a 401


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/experts", [], 401),
        ("/experts", [(b"x-api-key", b"user-key")], 403),
        ("/retrieve", [], 401),
        ("/generate", [(b"x-api-key", b"x")], 403),
        ("/sglora/experts", [], 401),  # behind a proxy's path prefix (root_path "/sglora")
    ],
)
def test_a_key_is_checked_before_the_body_is_read(served, path, headers, status):
    """FastAPI reads a body (spooling an upload to disk) before a route's key dependency runs: the key is
    checked from the headers first, so a request without one never has its body parsed or stored. What is on
    its way is drained, up to a bound, and dropped (else the connection is reset under the answer)."""
    from app.limits import REFUSED_DRAIN_BYTES

    client, _, _ = served
    read, sent = [], []

    async def receive():  # a body that never ends: the drain must stop by itself
        read.append(65536)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "/sglora" if path.startswith("/sglora/") else "",
        "query_string": b"",
        "headers": [(b"host", b"test"), (b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"900000")]
        + headers,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == status and REFUSED_DRAIN_BYTES <= sum(read) <= REFUSED_DRAIN_BYTES + 65536
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["detail"]["field"] == "X-API-Key"
    # A client gone while its body is drained is counted as gone (499), not as the 500 of a request never answered.
    before = _requests_with_status(client, "499")

    async def gone():
        return {"type": "http.disconnect"}

    sent.clear()
    asyncio.run(client.app(scope, gone, send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert _requests_with_status(client, "499") == before + 1


def test_admin_operations_need_the_admin_key(served):
    client, root, experts = served
    before = snapshot(root)
    form, files_ = expert_form(name="keyed"), upload(experts)
    for headers, status in ((NO_KEY, 401), (USER, 403), ({"X-API-Key": "wrong"}, 403)):
        r = client.post("/experts", data=form, files=files_, headers=headers)
        assert (r.status_code, r.json()["detail"]["field"]) == (status, "X-API-Key")
        r = client.delete("/experts/circle", headers=headers)
        assert (r.status_code, r.json()["detail"]["field"]) == (status, "X-API-Key")
    assert snapshot(root) == before
    r = client.post("/experts", data=form, files=files_, headers={"X-API-Key": "", "Authorization": "Bearer admin-key"})
    assert r.status_code == 201, r.text
    assert (root / "repository" / "experts" / "keyed.safetensors").exists()
    assert client.delete("/experts/keyed", headers=ADMIN).status_code == 200
    assert not (root / "repository" / "experts" / "keyed.safetensors").exists()


def test_without_admin_keys_expert_changes_are_disabled(tiny_artifacts, make_settings):
    settings = make_settings(artifacts=tiny_artifacts, api_keys=["admin-key"], threads=1)  # the key is only a user key here
    with TestClient(create_app(settings), headers=ADMIN) as c:
        r = c.delete("/experts/circle")
        assert r.status_code == 403 and "disabled" in r.json()["detail"]["reason"]
        assert c.get("/experts").status_code == 200


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared (no early exit on a match), on equal-length digests."""
    import app.deps as deps

    calls = []
    real = deps.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", counting)
    assert key_matches("k1", ["k1", "k2", "a-much-longer-key-3"])
    assert len(calls) == 3 and all(a == b == 32 for a, b in calls)
    calls.clear()
    assert not key_matches("nope", ["k1", "k2"])
    assert len(calls) == 2


def test_refusals_before_routing_are_counted_under_their_endpoint(served):
    """The body limit answers 413 before FastAPI routes the request: the metric still names the route
    template (an unknown path stays 'other')."""
    client, _, _ = served

    def count(endpoint: str, status: str) -> float:
        return metric_sum(client.get("/metrics").text, "sglora_requests_total", endpoint=endpoint, status=status)

    before, other = count("/generate", "413"), count("other", "404")
    too_big = {"Content-Length": str(10**9), "Content-Type": "application/json"}  # refused from the header alone
    assert client.post("/generate", content=b"{}", headers=too_big).status_code == 413
    assert client.get("/nowhere").status_code == 404
    assert count("/generate", "413") == before + 1 and count("other", "404") == other + 1


def test_request_methods_of_the_metrics_are_a_fixed_set(served):
    """The method label takes the standard methods only: each made-up method (any token passes HTTP
    parsing) would otherwise add series to sglora_requests_total for good."""
    from prometheus_client.parser import text_string_to_metric_families

    client, _, _ = served
    for i in range(5):
        assert client.request(f"MADEUP{i}", "/health").status_code == 405
    assert client.request("DELETE", "/health").status_code == 405
    samples = [s for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples]
    methods = {s.labels["method"] for s in samples if s.name == "sglora_requests_total"}
    assert not any(m.startswith("MADEUP") for m in methods), methods
    assert {"GET", "POST", "DELETE", "other"} <= methods
    assert sum(s.value for s in samples if s.name == "sglora_requests_total" and s.labels["method"] == "other") >= 5


@pytest.mark.parametrize(("path", "root_path"), [("/generate", ""), ("/sglora/generate", "/sglora")])
def test_a_json_limit_applies_behind_a_path_prefix(path, root_path):
    """Under uvicorn --root-path the request's path carries the prefix; the limit is the route's."""
    from app.limits import BodyLimitMiddleware

    sent = []

    async def inner(scope, receive, send):
        raise AssertionError("the body should have been refused")

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    gate = BodyLimitMiddleware(inner, max_bytes=10_000, path_limits={"/generate": 100})
    headers = [(b"content-length", b"5000"), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": path, "root_path": root_path, "headers": headers, "query_string": b""}
    asyncio.run(gate(scope, receive, send))
    assert sent[0]["status"] == 413


def test_json_bodies_have_a_limit_of_their_own(served):
    """The body limit is sized for uploads (hundreds of MB by default); a JSON body that large is parsed
    into Python objects several times its size, before the API key is even looked at. The JSON endpoints
    take what their largest valid body needs (SGLORA_MAX_JSON_BYTES, derived by default)."""
    client, _, _ = served
    many = b'{"items":[' + b",".join([b'{"description":"a"}'] * 110_000) + b"]}"  # 2.1 MB, under the body limit
    assert 2_000_000 < len(many) < LIMITS["max_body_bytes"]
    json_type = {"Content-Type": "application/json"}
    for path in ("/generate", "/generate/preview", "/generate/batch"):
        for headers in (NO_KEY, USER):
            r = client.post(path, content=many, headers={**json_type, **headers})
            assert (r.status_code, r.json()["detail"]["field"]) == (413, "body"), r.text
    r = client.post("/generate/batch", content=iter([many[:1_000_000], many[1_000_000:]]), headers=json_type)  # chunked
    assert (r.status_code, r.json()["detail"]["field"]) == (413, "body"), r.text
    # The largest batch the character limit lets through still fits: every item at the description limit,
    # every character escaped (12 bytes). It is parsed and answered item by item (the tiny text tower reads
    # 32 tokens, so each item is then refused for its length in tokens, a limit of the backbone's).
    items = [{"description": "\U0001f600" * 1000, "method": "topk-weighted"}] * 32
    body = json.dumps({"items": items}).encode()
    assert len(body) > 32 * 12_000
    r = client.post("/generate/batch", content=body, headers=json_type)
    assert r.status_code == 200 and len(r.json()["results"]) == 32, r.text[:300]
    assert {(x["status"], x["error"]["field"]) for x in r.json()["results"]} == {(422, "description")}
    assert "tokens long, and the text tower reads at most 32" in r.json()["results"][0]["error"]["reason"]


def test_a_misspelt_setting_is_named_at_start_up(make_settings, monkeypatch, caplog):
    """SGLORA_MAX_QUEU=5 started the service with the default queue, without a word."""
    from app.main import create_app
    from app.settings import unknown_variables

    monkeypatch.setenv("SGLORA_MAX_QUEU", "5")
    monkeypatch.setenv("SGLORA_LOG_FORMAT", "json")  # read by `sglora serve`, not the settings: known
    monkeypatch.setenv("sglora_redis_url", "")  # the settings read names in any case
    unknown = unknown_variables()
    assert "SGLORA_MAX_QUEU" in unknown and not {"SGLORA_LOG_FORMAT", "sglora_redis_url"} & set(unknown)
    with caplog.at_level("WARNING", logger="sglora.app"):
        create_app(make_settings())
    assert "ignoring unknown environment variables SGLORA_MAX_QUEU" in caplog.text


def _requests_with_status(c, status: str) -> float:
    return metric_sum(c.get("/metrics").text, "sglora_requests_total", status=status)


def test_an_upload_is_refused_before_its_body_is_read_while_the_queue_is_full(make_settings):
    """The worker admits a job once the handler has read, spooled and decoded the upload: under a full queue
    each /retrieve held its body and decoded every image (18 s to its 429 under 20 such requests). It is
    answered from the headers; what is on its way is drained (up to a bound) and dropped."""
    with TestClient(create_app(make_settings(retry_after_s=3))) as c:
        worker = c.app.state.service.worker
        read = []

        def body():
            read.append(1)
            yield b"--x\r\n"

        worker._pending = worker.max_queue  # full
        try:
            r = c.post("/retrieve", content=body(), headers={"Content-Type": "multipart/form-data; boundary=x"})
            assert r.status_code == 429 and r.headers["retry-after"] == "3" and r.headers["connection"] == "close"
            # drained and dropped, not parsed: a malformed form, parsed, is a 400
            assert "queue is full" in r.json()["detail"]["reason"] and read == [1]
        finally:
            worker._pending = 0
        files = [("images", ("a.png", png()))]
        assert c.post("/retrieve", data={"description": "a red circle"}, files=files).status_code == 200


def test_a_chunked_body_over_the_limit_closes_the_connection(make_settings):
    """A declared Content-Length over the limit closed it; a chunked body's 413 kept it open, and the server
    read the rest of the body, without a limit, to reuse the connection."""
    with TestClient(create_app(make_settings(max_json_bytes=1024))) as c:
        r = c.post("/generate", content=(b"x" * 512 for _ in range(8)), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.headers["connection"] == "close"


def test_a_client_gone_while_sending_its_body_counts_as_499_not_400(make_settings, caplog):
    """The framework answers a body cut short with 400 "error parsing the body": client aborts inflated the
    4xx rate. Nobody reads the answer; it is counted as the client closing the request, and logged (uvicorn
    writes no access line for an answer to a closed connection: the 499s were in the metrics alone)."""
    with TestClient(create_app(make_settings())) as c:
        before = (_requests_with_status(c, "499"), _requests_with_status(c, "400"))
        messages = iter([{"type": "http.request", "body": b'{"descrip', "more_body": True}, {"type": "http.disconnect"}])
        sent: list[dict] = []

        async def receive():
            return next(messages, {"type": "http.disconnect"})

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/generate", "raw_path": b"/generate", "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"40")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": c.app,
        }  # fmt: skip
        with caplog.at_level("INFO", logger="sglora.app"):
            c.portal.call(c.app, scope, receive, send)
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
        assert "POST /generate 499: the client closed the connection before the answer" in caplog.text
        assert (_requests_with_status(c, "499"), _requests_with_status(c, "400")) == (before[0] + 1, before[1])


@pytest.mark.parametrize(("path", "root_path"), [("/metrics", ""), ("/sglora/metrics", "/sglora")])
def test_the_scrape_is_not_in_flight_behind_a_path_prefix(path, root_path):
    """Under uvicorn --root-path the scrape's path carries the prefix: an idle replica showed one request in flight."""
    from app.metrics import Metrics, MetricsMiddleware

    metrics = Metrics()
    seen = []

    async def inner(scope, receive, send):
        seen.append(metrics.in_flight._value.get())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        pass

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": [], "query_string": b""}
    asyncio.run(MetricsMiddleware(inner, metrics)(scope, receive, send))
    assert seen == [0]


HOSTS = ["localhost", "127.0.0.1", "[::1]", "*.example.org"]


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("localhost:8000", 200),
        ("LOCALHOST", 200),
        ("127.0.0.1:8000", 200),
        ("[::1]:8000", 200),  # Starlette's TrustedHostMiddleware read this as "[" (split at the first colon)
        ("api.example.org", 200),
        ("example.org", 400),  # '*.example.org' is its subdomains
        ("evil-example.org", 400),
        ("rebound.attacker.test:8000", 400),  # a page's own name, resolved to the loopback
        ("localhost.attacker.test", 400),
        ("localhost.", 200),  # a fully qualified name, as nginx and Django read it
        ("[0:0:0:0:0:0:0:1]:8000", 200),  # IPv6 compared in its short form
        ("[::1]evil.test", 400),  # malformed: not read as [::1]
        ("localhost:8000@evil.test", 400),
    ],
)
def test_a_host_not_allowed_is_refused_before_anything_runs(make_settings, host, status):
    """DNS rebinding: a page can make a browser send the service requests under the page's own name and read
    the answers; such a Host is refused (400 naming it) before a key, a body or the model is looked at."""
    with TestClient(create_app(make_settings(allowed_hosts=HOSTS, api_keys=["k"])), raise_server_exceptions=False) as c:
        r = c.post("/generate", json={"description": "a ring", "seed": 1}, headers={"Host": host, "X-API-Key": "k"})
        assert r.status_code == status, r.text
        if status == 400:
            assert c.post("/generate", content=b"{", headers={"Host": host}).status_code == 400  # not 401, nor 422
            assert r.json()["detail"]["field"] == "Host" and "SGLORA_ALLOWED_HOSTS" in r.json()["detail"]["reason"]
            assert c.get("/", headers={"Host": host}).status_code == 400  # the page too
            for path in ("/health", "/ready", "/metrics"):  # probes and scrapers address a replica by its IP
                assert c.get(path, headers={"Host": host}).status_code == 200
            metrics = c.get("/metrics").text
            assert re.search(r'sglora_requests_total\{endpoint="/generate",method="POST",status="400"\} 2\.0', metrics)


@pytest.mark.parametrize(
    ("headers", "reason"), [([], "no Host headers"), ([(b"host", b"evil.test"), (b"host", b"localhost")], "2 Host headers")]
)
def test_a_request_without_one_host_is_refused(headers, reason):
    """HTTP/1.0 may send no Host, and httptools passes two: the check read the last one."""
    from app.hosts import AllowedHostsMiddleware

    sent = []

    async def inner(scope, receive, send):
        raise AssertionError("reached the app")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": headers, "query_string": b""}
    asyncio.run(AllowedHostsMiddleware(inner, ["localhost"])(scope, receive, send))
    detail = json.loads(sent[1]["body"])["detail"]
    assert sent[0]["status"] == 400 and detail == {"field": "Host", "reason": f"{reason}: one is required"}


def test_allowed_hosts_setting_is_checked(monkeypatch):
    from pydantic import ValidationError

    from app.settings import Settings

    monkeypatch.setenv("SGLORA_ALLOWED_HOSTS", " Localhost , *.Example.org.,[0:0::1] ")
    assert Settings().allowed_hosts == ["localhost", "*.example.org", "[::1]"]
    for value, needle in [
        (" , ", "is empty"),
        ("localhost:8000", "'localhost:8000' is not a host name"),
        ("http://x", "no scheme"),
        ("a..b", "not a host name"),
        ("[:]", "not a host name"),
        ("*.[::1]", "not a host name"),
        ("*, localhost", "list no other name with it"),
    ]:
        monkeypatch.setenv("SGLORA_ALLOWED_HOSTS", value)
        with pytest.raises(ValidationError, match=needle):
            Settings()


def _multipart(parts: list[tuple], boundary: bytes = b"sglora-test") -> list[bytes]:
    """A multipart body as chunks, one per part: (field, file name or None, bytes[, the part's Content-Type])."""
    chunks = []
    for name, filename, data, *kind in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = b"Content-Disposition: " + disposition.encode() + b"".join(b"\r\nContent-Type: " + k for k in kind)
        chunks.append(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n")
    return [*chunks, b"--" + boundary + b"--\r\n"]


def _parse_counting(parts, files, length: bool = True):
    """Parses ``parts`` with the upload parser and ``files`` (a body of declared length, or chunked); returns
    (outcome, chunks read, chunks in all)."""
    from starlette.datastructures import Headers

    from app.errors import APIError
    from app.forms import BoundedMultiPartParser

    chunks = _multipart(parts)
    read = []

    async def stream():
        for c in chunks:
            read.append(c)
            yield c

    headers = Headers(
        {"content-type": "multipart/form-data; boundary=sglora-test"}
        | ({"content-length": str(sum(map(len, chunks)))} if length else {"transfer-encoding": "chunked"})
    )
    try:
        outcome = asyncio.run(BoundedMultiPartParser(headers, stream(), files).parse())
    except APIError as e:
        outcome = e
    return outcome, len(read), len(chunks)


def test_an_upload_is_refused_at_its_first_file_over_a_limit_before_the_rest_is_read():
    """Starlette spooled every file of a form to disk before the route's per-image limit refused the first:
    up to the body limit (hundreds of MB by default) stored for a 413. The limits now apply as parts arrive."""
    big = [("description", None, b"a"), ("images", "0.png", GOOD_PNG), ("images", "1.png", bytes(5000))]
    tail = [("images", f"{i}.png", bytes(5000)) for i in range(2, 40)]
    e, read, total = _parse_counting(big + tail, {"images": (64, 4000)})
    assert (e.status, e.field, e.reason) == (413, "images[1]", "larger than 4000 bytes") and read == 3 < total
    many = [("images", f"{i}.png", GOOD_PNG) for i in range(10)]
    e, read, total = _parse_counting(many, {"images": (4, 40_000)})
    assert (e.status, e.field) == (422, "images") and "at most 4" in e.reason and read == 5 < total
    e, _, _ = _parse_counting([("mean", "m", b"x"), ("mean", "m", b"y")], {"mean": (1, 10)})
    assert (e.status, e.field, e.reason) == (422, "mean", "given more than once; send it once")
    form, read, total = _parse_counting([("description", None, "a café".encode()), *many[:4]], {"images": (4, 40_000)})
    assert read == total and form["description"] == "a café" and len(form.getlist("images")) == 4
    # a file in a field that takes none is refused before it is stored (it was, then refused as unknown)
    e, read, total = _parse_counting([("bogus", "b.bin", b"x"), *many[:3]], {"images": (4, 40_000)})
    assert (e.status, e.field) == (422, "bogus") and "takes files in images" in e.reason and read == 1 < total
    # an image without a filename is text to the parser: named as such, not as text that is not UTF-8
    e, _, _ = _parse_counting([("images", None, GOOD_PNG)], {"images": (4, 40_000)})
    assert (e.status, e.field) == (422, "images") and "curl -F 'images=@FILE'" in e.reason
    e, _, _ = _parse_counting([("mean", None, b"x")], {"mean": (1, 10)})
    assert "curl -F 'mean=@FILE'" in e.reason  # the field's own name


def test_a_text_field_that_is_not_utf8_is_refused_naming_it(served):
    """Starlette read such a field as Latin-1: a description of bytes 0xff 0xfe became 'ÿþ', and generated."""
    client, _, _ = served
    body = b"".join(_multipart([("description", None, b"a photo of \xff\xfe"), ("images", "0.png", GOOD_PNG)]))
    r = client.post("/retrieve", content=body, headers={"Content-Type": "multipart/form-data; boundary=sglora-test"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["field"] == "description" and "not valid utf-8" in r.json()["detail"]["reason"]
    r = client.post("/retrieve", data={"description": "a photo of a café"}, files=files(GOOD_PNG))
    assert r.status_code == 200, r.text
    # a part's own charset is honoured; a charset that is no text encoding (or none known) is named
    latin = [("description", None, "a café".encode("latin-1"), b"text/plain; charset=ISO-8859-1"), ("images", "0.png", GOOD_PNG)]
    r = client.post(
        "/retrieve", content=b"".join(_multipart(latin)), headers={"Content-Type": "multipart/form-data; boundary=sglora-test"}
    )
    assert r.status_code == 200 and r.json()["texts"] == ["a café"], r.text
    body = b"".join(_multipart([("description", None, b"a photo"), ("images", "0.png", GOOD_PNG)]))
    r = client.post(
        "/retrieve", content=body, headers={"Content-Type": "multipart/form-data; charset=base64; boundary=sglora-test"}
    )
    assert r.status_code == 422 and "'base64' is not a text encoding" in r.json()["detail"]["reason"], r.text
    bogus = [("description", None, b"a \xff", b"text/plain; charset=bogus"), ("images", "0.png", GOOD_PNG)]
    r = client.post(
        "/retrieve", content=b"".join(_multipart(bogus)), headers={"Content-Type": "multipart/form-data; boundary=sglora-test"}
    )
    assert r.status_code == 422 and r.json()["detail"]["field"] == "description", r.text


def _form_request(receive, files, headers=(), version="1.1"):
    """A BoundedFormRequest for a multipart POST /retrieve with ``headers`` besides its Content-Type."""
    from starlette.requests import Request

    from app.forms import BoundedFormRequest

    headers = [(b"content-type", b"multipart/form-data; boundary=sglora-test"), *headers]
    scope = {"type": "http", "method": "POST", "path": "/retrieve", "headers": headers, "query_string": b""}
    scope["http_version"] = version
    return BoundedFormRequest(Request(scope, receive), files)


@pytest.mark.parametrize(
    ("first", "headers"),
    [
        (("description", None, b"a"), [(b"content-length", b"100000")]),  # while the form is parsed
        (("images", "0.png", bytes(5000)), [(b"connection", b"close")]),  # while a refused body is drained
    ],
)
def test_a_client_gone_mid_upload_is_a_client_error_not_a_500(first, headers):
    """Reading the form before FastAPI skipped its turning of a failed body read into a 400 (which the
    service then counts as the client's 499): a client that hung up mid-upload was a logged 500, and so was
    one gone (or cut by the body deadline) while the body of a refused upload was drained."""
    from starlette.exceptions import HTTPException

    chunks = _multipart([first, ("images", "1.png", GOOD_PNG)])
    messages = [{"type": "http.request", "body": chunks[0], "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    with pytest.raises(HTTPException) as e:
        asyncio.run(_form_request(receive, {"images": (4, 4000)}, headers).read_form())
    assert e.value.status_code == 400


@pytest.mark.parametrize(
    ("connection", "version", "length", "drained"),
    [
        (b"close", "1.1", True, True),
        (b"keep-alive", "1.1", True, False),
        (b"keep-alive", "1.0", True, True),  # uvicorn closes every HTTP/1.0 connection
        (b"keep-alive", "1.1", False, True),  # chunked: uvicorn closes one left unread
    ],
)
def test_a_refused_upload_is_read_to_its_end_first_where_the_connection_then_closes(connection, version, length, drained):
    """A client that asked to close (urllib does) had its connection reset by the early 413: the server closed
    it with bytes unread, and a client still sending never read the answer. Its body is read (not stored)
    first; on a kept-alive connection the server drains a body of declared length after the answer."""
    from app.errors import APIError

    chunks = _multipart([("images", "0.png", bytes(5000)), *[("images", f"{i}.png", GOOD_PNG) for i in range(1, 9)]])
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages[-1]["more_body"] = False
    read = []

    async def receive():
        read.append(messages[len(read)])
        return read[-1]

    headers = [(b"connection", connection)]
    if length:
        headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
    with pytest.raises(APIError) as e:
        asyncio.run(_form_request(receive, {"images": (64, 4000)}, headers, version).read_form())
    assert (e.value.status, e.value.field) == (413, "images[0]")
    assert (len(read) == len(chunks)) is drained and len(read) >= 1

"""sglora.client against the service (in process, through Starlette's TestClient) and a scripted transport."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import httpx
import pytest
from app_helpers import file_metadata
from test_app_generate import tiny_hf_clip
from test_app_retrieve import CAPTIONS, IMAGES

from sglora.client import PEFT_FILES, Client, ServiceError
from sglora.export import PEFT_CONFIG, PEFT_WEIGHTS


@pytest.fixture(scope="module")
def service(client):
    with Client(http=client) as c:
        yield c


def test_generate_returns_the_service_bytes_and_what_it_said_of_them(service, client, tmp_path):
    adapter = service.generate("a red circle", seed=3, top_k=2)
    raw = client.post("/generate", json={"description": "a red circle", "seed": 3, "top_k": 2})
    assert adapter.data == raw.content and adapter.etag == raw.headers["etag"].strip('"')
    assert adapter.seed == 3 and adapter.method == "sg-lora"
    assert adapter.cache == "miss" and raw.headers["x-cache"] == "hit"  # the client's call came first
    assert adapter.metadata == file_metadata(raw.content)
    assert adapter.experts == json.loads(file_metadata(raw.content)["experts"])
    assert len(adapter.experts) == 2 and abs(sum(e["weight"] for e in adapter.experts) - 1) < 1e-6
    assert adapter.request_id and adapter.request_id != raw.headers["x-request-id"]
    assert adapter.save(tmp_path / "out" / "a.safetensors").read_bytes() == raw.content
    drawn = service.generate("a red circle")
    assert drawn.seed is not None and drawn.cache == "miss"
    assert service.generate("a red circle", seed=drawn.seed).data == drawn.data


def test_generate_peft_writes_a_folder_that_peft_loads(service, client, tmp_path):
    from peft import PeftModel

    folder = service.generate_peft("a yellow triangle", tmp_path / "adapter", seed=9)
    assert sorted(p.name for p in folder.iterdir()) == sorted(PEFT_FILES) == sorted([PEFT_CONFIG, PEFT_WEIGHTS])
    zipped = client.post("/generate", json={"description": "a yellow triangle", "seed": 9}, headers={"Accept": "application/zip"})
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as z:
        for name in PEFT_FILES:
            assert (folder / name).read_bytes() == z.read(name)
    model = PeftModel.from_pretrained(tiny_hf_clip(), str(folder))
    assert any(hasattr(m, "lora_A") for m in model.modules())


def test_retrieve_by_etag_and_by_description(service):
    adapter = service.generate("a red circle", seed=3)
    by_etag = service.retrieve(IMAGES, CAPTIONS, etag=adapter.etag, zero_shot=True)
    assert by_etag["adapter"]["etag"] == adapter.etag and by_etag["texts"] == CAPTIONS
    assert len(by_etag["lora"]["scores"]) == len(IMAGES) and by_etag["zero_shot"] is not None
    by_description = service.retrieve(IMAGES, CAPTIONS, description="a red circle", seed=3)
    assert by_description["lora"]["scores"] == by_etag["lora"]["scores"] and by_description["zero_shot"] is None


def test_experts_lists_the_repository_as_the_service_does(service, client):
    experts = service.experts()
    assert isinstance(experts, list) and experts == client.get("/experts").json()["experts"]
    assert {"name", "description"} <= set(experts[0])


def test_retrieve_takes_bytes_like_images_and_refuses_one_string_of_captions(service):
    as_bytes = service.retrieve(IMAGES, CAPTIONS, description="a red circle", seed=3)
    as_bytearray = service.retrieve([bytearray(im) for im in IMAGES], CAPTIONS, description="a red circle", seed=3)
    assert as_bytearray["lora"]["scores"] == as_bytes["lora"]["scores"]
    with pytest.raises(TypeError, match="captions: give a list"):
        service.retrieve(IMAGES, CAPTIONS[0], description="a red circle")


def test_refusals_raise_with_the_field_reason_and_request_id(service):
    with pytest.raises(ServiceError) as e:
        service.generate("a red circle", top_k=10_000)
    assert e.value.status == 422 and e.value.field == "top_k" and "between 1 and" in e.value.reason
    assert e.value.request_id and e.value.request_id in str(e.value)
    with pytest.raises(ServiceError) as e:
        service.retrieve(IMAGES[:1], etag="0" * 32)
    assert e.value.status == 404 and e.value.field == "etag"


def test_api_key_is_sent(make_settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(api_keys=["k1"]))) as http:
        with pytest.raises(ServiceError) as e:
            Client(http=http).generate("a ring", seed=1)
        assert e.value.status == 401
        assert Client(http=http, api_key="k1").generate("a ring", seed=1).seed == 1


def scripted(*answers: httpx.Response) -> tuple[Client, list[httpx.Request]]:
    """A client whose transport answers ``answers`` in order and records the requests."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    http = httpx.Client(transport=httpx.MockTransport(handle), base_url="http://service")
    return Client(http=http, retries=2, max_wait_s=0.01), seen


def test_a_full_queue_is_retried_after_retry_after_then_reported():
    busy = httpx.Response(429, headers={"Retry-After": "5"}, json={"detail": {"field": None, "reason": "queue full"}})
    ok = httpx.Response(200, json={"artifact_version": "v", "experts": [{"name": "ring"}]})  # GET /experts's shape
    c, seen = scripted(busy, busy, ok)
    assert c.experts() == [{"name": "ring"}] and len(seen) == 3  # waits capped at max_wait_s
    c, seen = scripted(busy, busy, busy)
    with pytest.raises(ServiceError) as e:
        c.experts()
    assert e.value.status == 429 and e.value.reason == "queue full" and len(seen) == 3
    c, seen = scripted(httpx.Response(500, text="upstream broke"))
    with pytest.raises(ServiceError) as e:
        c.ready()
    assert e.value.status == 500 and e.value.reason == "upstream broke" and len(seen) == 1  # not retried


def test_the_client_needs_no_torch():
    code = "import sys, sglora.client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0

"""sglora.client against the service (in process, through Starlette's TestClient) and a scripted transport."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import httpx
import pytest
from app_helpers import file_metadata
from PIL import Image
from test_app_generate import tiny_hf_clip
from test_app_retrieve import CAPTIONS, IMAGES

from sglora.client import PEFT_FILES, Adapter, AsyncClient, Client, ServiceError
from sglora.export import PEFT_CONFIG, PEFT_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def service(client):
    with Client(http=client) as c:
        yield c


def test_generate_returns_the_service_bytes_and_what_it_said_of_them(service, client, tmp_path):
    # a request no other test of the module sends: the client's call is its first, whatever the order
    adapter = service.generate("a red circle, asked through the client", seed=3, top_k=2)
    raw = client.post("/generate", json={"description": "a red circle, asked through the client", "seed": 3, "top_k": 2})
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
    assert service.experts(offset=1, limit=2) == experts[1:3] and service.experts(offset=len(experts)) == []


def test_retrieve_takes_bytes_like_images_and_refuses_one_string_of_captions(service):
    as_bytes = service.retrieve(IMAGES, CAPTIONS, description="a red circle", seed=3)
    as_bytearray = service.retrieve([bytearray(im) for im in IMAGES], CAPTIONS, description="a red circle", seed=3)
    assert as_bytearray["lora"]["scores"] == as_bytes["lora"]["scores"]
    with pytest.raises(TypeError, match="captions: give a list"):
        service.retrieve(IMAGES, CAPTIONS[0], description="a red circle")
    for one in ("cat.png", Path("cat.png"), IMAGES[0]):  # a str would be read as one path per character
        with pytest.raises(TypeError, match="images: give a list"):
            service.retrieve(one, CAPTIONS[:1], description="a red circle")


def test_preview_says_what_generate_makes(service):
    info = service.preview("a blue square", seed=5, top_k=2)
    adapter = service.generate("a blue square", seed=5, top_k=2)
    assert info["etag"] == adapter.etag and info["seed"] == 5 and info["size_bytes"] == len(adapter.data)
    assert info["experts"] == adapter.experts and info["top_k"] == 2
    drawn = service.preview("a blue square")
    assert service.generate("a blue square", seed=drawn["seed"]).etag == drawn["etag"]


def test_generate_batch_gives_adapters_and_per_item_refusals(service):
    items = ["a red circle", {"description": "a red circle", "seed": 3, "top_k": 2}, {"description": "a ring", "top_k": 10_000}]
    drawn, seeded, refused = service.generate_batch(items)
    alone = service.generate("a red circle", seed=3, top_k=2)
    assert isinstance(seeded, Adapter) and seeded.data == alone.data and seeded.etag == alone.etag
    assert seeded.seed == 3 and seeded.experts == alone.experts and seeded.request_id
    shown = repr(seeded)  # what it is, not its bytes
    assert seeded.etag in shown and "seed=3" in shown and "data=" not in shown and len(shown) < len(seeded.data)
    assert isinstance(drawn, Adapter) and service.generate("a red circle", seed=drawn.seed).data == drawn.data
    assert isinstance(refused, ServiceError) and refused.status == 422 and refused.field == "top_k"
    with pytest.raises(ServiceError) as e:  # a malformed item refuses the whole call
        service.generate_batch(["a ring", {"description": "a ring", "colour": "red"}])
    assert e.value.status == 422 and e.value.field == "items[1].colour"
    # None is the service's default, as for generate (it was a 422 on items[0].method)
    (defaulted,) = service.generate_batch([{"description": "a red circle", "seed": 3, "top_k": 2, "method": None}])
    assert defaulted.data == alone.data


def test_experts_are_downloaded_registered_and_removed(tiny_artifacts, make_settings, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(artifacts=tiny_artifacts, admin_keys=["admin-secret"])
    with TestClient(create_app(settings)) as http:
        user, admin = Client(http=http), Client(http=http, api_key="admin-secret")
        mean = user.expert_file("circle")
        variance = tmp_path / "variance.safetensors"
        variance.write_bytes(user.expert_file("circle", part="variance"))
        assert mean == http.get("/experts/circle").content and file_metadata(mean)["part"] == "mean"
        with pytest.raises(ServiceError) as e:
            user.add_expert("disc", "an orange disc", mean)
        assert e.value.status == 401 and e.value.field == "X-API-Key"
        added = admin.add_expert("disc", "an orange disc", mean, variance=variance, num_snapshots=4)
        assert added["action"] == "added" and added["experts"] == 5
        assert "disc" in [x["name"] for x in user.experts()]
        disc = file_metadata(user.expert_file("disc", part="variance"))
        assert disc["name"] == "disc" and disc["part"] == "variance" and disc["num_snapshots"] == "4"
        assert admin.remove_expert("disc")["experts"] == 4
        with pytest.raises(ServiceError) as e:
            user.expert_file("disc")
        assert e.value.status == 404 and e.value.field == "name"
        with pytest.raises(ServiceError) as e:  # quoted: one path segment, never another route
            user.expert_file("../health")
        assert e.value.status in (404, 422)


def test_the_documented_examples_run(client, tmp_path, monkeypatch):
    """The module docstring's example and docs/service.md's, against the in-process service."""
    import sglora.client

    for name, colour in (("cat.png", "orange"), ("dog.png", "brown")):
        Image.new("RGB", (40, 40), colour).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    docstring = sglora.client.__doc__.split("\n\n", 1)[1].split("\n\nThe service's refusals")[0]
    service_md = (ROOT / "docs" / "service.md").read_text().split("### Python client")[1]
    examples = [textwrap.dedent(docstring), service_md.split("```python\n")[1].split("```")[0]]
    for code in examples:
        assert 'Client("http://127.0.0.1:8000"' in code
        code = code.replace('Client("http://127.0.0.1:8000"', "Client(http=http")
        exec(compile(code, "example", "exec"), {"http": client})
        assert sorted(p.name for p in (tmp_path / "persian").iterdir()) == sorted(PEFT_FILES)
        assert (tmp_path / "persian.safetensors").read_bytes()[8:9] == b"{"


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


def scripted(
    *answers: httpx.Response | Exception, asynchronous: bool = False, max_wait_s: float = 0.01, connect_wait_s: float = 60.0
) -> tuple[Client, list[httpx.Request]]:
    """A client (``asynchronous``: an AsyncClient) whose transport answers ``answers`` in order (raising the
    exceptions) and records the requests."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    if asynchronous:
        from sglora.client import AsyncClient

        http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://service")
        return AsyncClient(http=http, retries=2, max_wait_s=max_wait_s, connect_wait_s=connect_wait_s), seen
    http = httpx.Client(transport=httpx.MockTransport(handle), base_url="http://service")
    return Client(http=http, retries=2, max_wait_s=max_wait_s, connect_wait_s=connect_wait_s), seen


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


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_waits_between_retries_are_retry_after_capped_at_max_wait(monkeypatch, asynchronous):
    """A 429 or 503 is sent again after its Retry-After (at most max_wait_s), a refused connection after
    CONNECT_WAIT_S: the sleeps themselves, recorded."""
    import asyncio

    import sglora.client as client_module

    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    monkeypatch.setattr(client_module.asyncio, "sleep", asleep)
    ok = httpx.Response(200, json={"artifact_version": "v", "experts": [{"name": "ring"}]})
    refused = httpx.ConnectError("[Errno 111] Connection refused")

    def busy(status: int, retry_after: str) -> httpx.Response:
        return httpx.Response(status, headers={"Retry-After": retry_after}, json={"detail": {"field": None, "reason": "busy"}})

    def run(c):
        return asyncio.run(c.experts()) if asynchronous else c.experts()

    for answers, max_wait, want in (
        ((busy(429, "2"), busy(503, "3"), ok), 30.0, [2.0, 3.0]),
        ((busy(429, "60"), busy(429, "2"), ok), 5.0, [5.0, 2.0]),  # capped at max_wait_s
        ((refused, busy(429, "2"), ok), 30.0, [client_module.CONNECT_WAIT_S, 2.0]),
    ):
        waits.clear()
        c, seen = scripted(*answers, asynchronous=asynchronous, max_wait_s=max_wait)
        assert run(c) == [{"name": "ring"}] and len(seen) == 3
        assert waits == want


def test_a_refused_connection_is_retried_a_timeout_is_not():
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    ok = httpx.Response(200, json={"artifact_version": "v", "experts": [{"name": "ring"}]})
    c, seen = scripted(refused, refused, ok)
    assert c.experts() == [{"name": "ring"}] and len(seen) == 3  # a restarting server
    c, seen = scripted(refused, refused, connect_wait_s=0)
    with pytest.raises(httpx.ConnectError):
        c.experts()
    assert len(seen) == 1  # connect_wait_s=0: not retried
    c, seen = scripted(httpx.ReadTimeout("timed out"), ok)
    with pytest.raises(httpx.TimeoutException):
        c.generate("a ring", seed=1)
    assert len(seen) == 1  # the model may still be working on it: not sent twice
    c, seen = scripted(httpx.ConnectTimeout("timed out connecting"), ok)  # nothing was sent: sent again
    assert c.experts() == [{"name": "ring"}] and len(seen) == 2


@pytest.mark.parametrize("asynchronous", [False, True])
def test_refused_connections_are_retried_for_connect_wait_s_whatever_the_retries(monkeypatch, asynchronous):
    """A server restarting opens its port once its model is loaded: the tiny artefacts' took 6 s, and the
    client gave up after three tries a second apart (retries=3). Now a budget of time (connect_wait_s), on a
    clock the waits advance here; the busy answers' retries count apart."""
    import asyncio

    import sglora.client as client_module

    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    async def asleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(client_module, "_now", lambda: clock[0])
    monkeypatch.setattr(client_module.time, "sleep", sleep)
    monkeypatch.setattr(client_module.asyncio, "sleep", asleep)
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    ok = httpx.Response(200, json={"artifact_version": "v", "experts": [{"name": "ring"}]})
    busy = httpx.Response(429, headers={"Retry-After": "1"}, json={"detail": {"field": None, "reason": "busy"}})

    def run(c):
        return asyncio.run(c.experts()) if asynchronous else c.experts()

    c, seen = scripted(*[refused] * 6, busy, busy, ok, asynchronous=asynchronous, max_wait_s=30.0)  # retries=2
    assert run(c) == [{"name": "ring"}] and len(seen) == 9 and clock[0] == 8.0
    clock[0] = 0.0
    c, seen = scripted(*[refused] * 10, asynchronous=asynchronous, max_wait_s=30.0, connect_wait_s=4.5)
    with pytest.raises(httpx.ConnectError):
        run(c)
    assert len(seen) == 5 and clock[0] == 4.0  # tried at 0, 1, 2, 3 and 4 s; a sixth at 5 s is past 4.5 s


def test_answers_that_are_not_the_service_s_are_service_errors(tmp_path):
    """A proxy's login page (a 200 of HTML, or a 302 to it): expert_file returned its bytes (an empty body
    for the redirect) and generate_peft raised zipfile.BadZipFile."""
    page = httpx.Response(200, html="<html>login</html>")
    redirect = httpx.Response(302, headers={"Location": "https://proxy.example/login"})
    for answer in (page, redirect):
        c, _ = scripted(answer)
        with pytest.raises(ServiceError) as e:
            c.expert_file("ring")
        assert e.value.status == answer.status_code
    c, _ = scripted(page)
    with pytest.raises(ServiceError, match="is not the service's"):
        c.generate_peft("a ring", tmp_path / "persian", seed=1)
    assert not (tmp_path / "persian").exists()


def test_an_adapter_is_hashable_and_takes_a_weak_etag_as_retrieve_does(service):
    adapter = service.generate("a red circle", seed=3)
    assert adapter in {adapter}  # was: unhashable type 'dict'
    weak = httpx.Response(200, content=adapter.data, headers={"ETag": f'W/"{adapter.etag}"', "X-Seed": "3"})
    assert Adapter.from_response(weak).etag == adapter.etag  # a proxy's weak mark: /retrieve refused it


def test_a_service_error_crosses_processes_whole():
    import pickle

    e = pickle.loads(pickle.dumps(ServiceError(422, "top_k", "too large", "r1")))
    assert (e.status, e.field, e.reason, e.request_id, str(e)) == (
        422,
        "top_k",
        "too large",
        "r1",
        "HTTP 422 (top_k): too large [request r1]",
    )


def test_client_side_mistakes_are_named_before_anything_is_sent():
    c, seen = scripted()
    with pytest.raises(ValueError, match="images: give at least one image"):  # was a 415 from the service
        c.retrieve([], ["a ring"], description="a ring")
    with pytest.raises(ValueError, match="api_key must be printable ASCII"):  # was a UnicodeEncodeError per call
        Client(api_key="clé")
    with pytest.raises(ValueError, match="without spaces"):  # no service key has one: a 403 per call
        Client(api_key="wrong key")
    for bad, needle in (
        ({"retries": 2.5}, "retries must be a whole number >= 0, got 2.5"),  # was retried for ever
        ({"retries": -1}, "retries must be a whole number"),
        ({"max_wait_s": -1}, "max_wait_s must be a finite number of seconds >= 0, got -1"),  # failed in time.sleep
        ({"connect_wait_s": float("inf")}, "connect_wait_s must be a finite number"),
    ):
        with pytest.raises(ValueError, match=re.escape(needle)):
            Client(**bad)
    for make in (Client, AsyncClient):  # was httpx's UnsupportedProtocol on the first call
        with pytest.raises(ValueError, match="url must start with http:// or https://, got '127.0.0.1:8000'"):
            make("127.0.0.1:8000")
    assert seen == []


def test_a_port_nothing_listens_on_raises_httpx_connect_error():
    from app.processes import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=1, max_wait_s=0.01, connect_wait_s=0.05) as c, pytest.raises(httpx.ConnectError):
        c.generate("a ring", seed=1)


def test_the_client_needs_no_torch():
    code = "import sys, sglora.client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_ready_is_a_probe_asked_once():
    """A starting or draining service's 503 is its answer, not an error to retry."""
    draining = httpx.Response(503, json={"status": "draining"})
    c, seen = scripted(draining, httpx.Response(200, json={"status": "ready"}))
    assert c.ready() == {"status": "draining"} and len(seen) == 1
    assert c.ready() == {"status": "ready"} and len(seen) == 2
    c, seen = scripted(httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(httpx.ConnectError):
        c.ready()
    assert len(seen) == 1


def test_the_async_client_makes_the_same_calls_concurrently(tiny_artifacts_session, tmp_path):
    """AsyncClient against a real server: concurrent generations give the bytes the sync client gets, and
    the other calls (preview, PEFT folder, refusals, the probe) answer as the sync ones do."""
    import asyncio
    import os

    from app.processes import free_port, start_server, stop, wait_ready
    from sglora.client import AsyncClient

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SGLORA_REDIS_URL": "", "SGLORA_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = start_server(
        port, env, "--artifacts", str(tiny_artifacts_session), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_ready(base, proc)

        async def calls():
            async with AsyncClient(base) as service:
                adapters = await asyncio.gather(*(service.generate("a red circle", seed=s) for s in range(6)))
                preview = await service.preview("a red circle", seed=3)
                folder = await service.generate_peft("a red circle", tmp_path / "peft", seed=3)
                with pytest.raises(ServiceError) as refused:
                    await service.generate("a red circle", top_k=99)
                return adapters, preview, folder, refused.value, await service.ready()

        adapters, preview, folder, refused, ready = asyncio.run(calls())
        with Client(base) as sync:
            assert [a.data for a in adapters] == [sync.generate("a red circle", seed=s).data for s in range(6)]
            assert preview["etag"] == adapters[3].etag
            assert sorted(p.name for p in folder.iterdir()) == sorted(PEFT_FILES)
            assert (refused.status, refused.field) == (422, "top_k")
            assert ready["status"] == "ready" == sync.ready()["status"]
    finally:
        stop(proc, timeout=30)


def test_the_async_client_retries_as_the_sync_one_does():
    import asyncio

    busy = httpx.Response(429, headers={"Retry-After": "5"}, json={"detail": {"field": None, "reason": "queue full"}})
    ok = httpx.Response(200, json={"artifact_version": "v", "experts": [{"name": "ring"}]})
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    c, seen = scripted(busy, refused, ok, asynchronous=True)
    assert asyncio.run(c.experts()) == [{"name": "ring"}] and len(seen) == 3
    c, seen = scripted(busy, busy, busy, asynchronous=True)
    with pytest.raises(ServiceError) as e:
        asyncio.run(c.experts())
    assert e.value.status == 429 and len(seen) == 3
    c, seen = scripted(httpx.Response(503, json={"status": "draining"}), asynchronous=True)
    assert asyncio.run(c.ready()) == {"status": "draining"} and len(seen) == 1  # a probe, asked once


def test_the_async_clients_calls_check_their_arguments_when_awaited():
    """A bad argument raised when the call was made: in asyncio.gather, the calls made before it were then
    never awaited ("coroutine ... was never awaited")."""
    import asyncio
    import inspect

    from sglora.client import AsyncClient

    assert all(inspect.iscoroutinefunction(getattr(AsyncClient, n)) for n in ("generate", "retrieve", "experts", "ready"))
    c, seen = scripted(asynchronous=True)
    pending = c.retrieve("cat.png", ["a cat"], description="a cat")  # one path, not a list: not raised here
    with pytest.raises(TypeError, match="images: give a list"):
        asyncio.run(pending)
    assert seen == []


def test_an_answer_that_is_not_the_services_is_a_service_error():
    """A 200 from something else (a proxy's login page): experts() raised json.JSONDecodeError and generate()
    a safetensors ValueError, outside the documented errors."""
    login = httpx.Response(200, text="<html>sign in</html>", headers={"content-type": "text/html"})
    c, _ = scripted(login)
    with pytest.raises(ServiceError) as e:
        c.experts()
    assert e.value.status == 200 and "is not the service's (text/html)" in e.value.reason
    c, _ = scripted(login)
    with pytest.raises(ServiceError, match="POST /generate is not the service's"):
        c.generate("a photo of a circle", seed=1)

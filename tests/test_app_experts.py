"""GET/POST/DELETE /experts on a private copy of the tiny artefacts."""

from __future__ import annotations

import base64
import gc
import threading
import weakref

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from app.main import create_app
from expert_store.repository import ExpertRepository
from sglora.artifacts import load_artifacts
from sglora.export import safetensors_bytes, to_peft_tensors

ADMIN = {"X-API-Key": "admin-secret"}


@pytest.fixture
def app_root(tiny_artifacts, make_settings):
    settings = make_settings(artifacts=tiny_artifacts, admin_keys=["admin-secret"], api_keys=["user-key"])
    with TestClient(create_app(settings), headers={"X-API-Key": "user-key"}) as c:
        yield c, tiny_artifacts


def expert_files(root, name="circle", scale=1.0):
    repo = ExpertRepository.load(root / "repository")
    e = repo[name]
    return {
        "mean": ("mean.safetensors", safetensors_bytes(repo.spec, e.mean * scale, {}), "application/octet-stream"),
        "variance": ("var.safetensors", safetensors_bytes(repo.spec, e.variance, {}), "application/octet-stream"),
    }, repo


def test_register_list_delete_persist_and_invalidate(app_root):
    client, root = app_root
    listed = client.get("/experts").json()
    assert sorted(e["name"] for e in listed["experts"]) == ["circle", "cross", "ring", "square"]
    assert listed["lora"]["num_params"] > 0
    body = {"description": "an orange disc", "seed": 4}
    before = client.post("/generate", json=body)
    assert client.post("/generate", json=body).headers["x-cache"] == "hit"

    files, repo = expert_files(root, scale=1.5)
    r = client.post(
        "/experts", data={"name": "disc", "description": "an orange disc", "num_snapshots": "4"}, files=files, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    assert r.json()["action"] == "added" and r.json()["experts"] == 5
    assert r.json()["artifact_version"] != listed["artifact_version"]
    # The change's job restacked the experts and worked out the new one's generator features: the next
    # generation does not; the published state lists the experts without holding their tensors.
    service = client.app.state.service
    assert service.engine._features[0]() is service.artifacts.repository.stacked()[0]
    assert not any(isinstance(v, torch.Tensor) for e in service.state.experts for v in vars(e).values())
    # Persisted (atomically, with its sha256 in the index): a fresh load sees and verifies it.
    fresh = load_artifacts(root)
    assert "disc" in fresh.repository and fresh.version == r.json()["artifact_version"]
    torch.testing.assert_close(fresh.repository["disc"].mean, repo["circle"].mean * 1.5)
    torch.testing.assert_close(fresh.repository["disc"].variance, repo["circle"].variance)
    # The old cache entry is not served for the new repository; the new expert is picked.
    after = client.post("/generate", json=body)
    assert after.headers["x-cache"] == "miss" and after.headers["x-artifact-version"] == r.json()["artifact_version"]
    assert after.headers["x-experts"].startswith("disc=") and after.content != before.content
    assert client.post("/generate", json={**body, "top_k": 5}).status_code == 200

    r = client.delete("/experts/disc", headers=ADMIN)
    assert r.status_code == 200 and r.json()["action"] == "removed" and r.json()["experts"] == 4
    assert "disc" not in load_artifacts(root).repository
    assert not (root / "repository" / "experts" / "disc.safetensors").exists()
    assert client.post("/generate", json={**body, "top_k": 5}).json()["detail"]["field"] == "top_k"


def test_cannot_remove_the_last_expert(app_root):
    client, _ = app_root
    for name in ("circle", "cross", "ring"):
        assert client.delete(f"/experts/{name}", headers=ADMIN).status_code == 200
    r = client.delete("/experts/square", headers=ADMIN)
    assert r.status_code == 409 and r.json()["detail"]["field"] == "name"
    # top_k shrank with the repository: a default request still works.
    assert client.post("/generate", json={"description": "a square"}).status_code == 200


def test_keys_are_required(app_root, make_settings, tiny_artifacts):
    client, root = app_root
    files, _ = expert_files(root)
    anonymous = {"X-API-Key": ""}
    assert client.get("/experts", headers=anonymous).status_code == 401
    assert client.get("/experts", headers={"X-API-Key": "wrong"}).status_code == 403
    assert client.get("/experts", headers={"Authorization": "Bearer user-key", "X-API-Key": ""}).status_code == 200
    assert client.post("/generate", json={"description": "a"}, headers=anonymous).status_code == 401
    r = client.post("/experts", data={"name": "x", "description": "x"}, files=files)  # user key, not admin
    assert r.status_code == 403 and r.json()["detail"]["field"] == "X-API-Key"
    assert "an admin key (SGLORA_ADMIN_KEYS) is required" in r.json()["detail"]["reason"]
    r = client.delete("/experts/circle", headers=anonymous)
    assert r.status_code == 401 and r.json()["detail"]["reason"].startswith("an admin key")
    assert client.delete("/experts/circle").status_code == 403
    assert client.get("/health", headers=anonymous).status_code == 200
    with TestClient(create_app(make_settings(artifacts=tiny_artifacts))) as open_client:  # no keys configured
        assert open_client.get("/experts").status_code == 200
        assert open_client.delete("/experts/circle", headers=ADMIN).status_code == 403  # changes disabled


def test_bad_registrations_are_4xx_naming_the_field(app_root):
    client, root = app_root
    files, repo = expert_files(root)
    mean = files["mean"]
    wrong_shape = dict(to_peft_tensors(repo.spec, repo["circle"].mean))
    first = next(iter(wrong_shape))
    wrong_shape[first] = torch.zeros(3, 3)
    renamed = {k.replace("lora_A", "lora_X"): v for k, v in to_peft_tensors(repo.spec, repo["circle"].mean).items()}
    negative = (
        "v.safetensors",
        safetensors_bytes(repo.spec, -torch.ones_like(repo["circle"].mean), {}),
        "application/octet-stream",
    )
    nan = (
        "m.safetensors",
        safetensors_bytes(repo.spec, torch.full_like(repo["circle"].mean, float("nan")), {}),
        "application/octet-stream",
    )
    cases = [
        ({"name": "../evil", "description": "x"}, {"mean": mean}, 422, "name"),
        ({"name": "circle", "description": "x"}, {"mean": mean}, 409, "name"),
        ({"name": "Circle", "description": "x"}, {"mean": mean}, 409, "name"),  # one file where case is not told apart
        ({"name": "ok", "description": "  "}, {"mean": mean}, 422, "description"),
        ({"name": "ok", "description": "x"}, {"mean": ("m", b"garbage", "application/octet-stream")}, 422, "mean"),
        ({"name": "ok", "description": "x"}, {"mean": ("m", save(wrong_shape), "application/octet-stream")}, 422, "mean"),
        ({"name": "ok", "description": "x"}, {"mean": ("m", save(renamed), "application/octet-stream")}, 422, "mean"),
        ({"name": "ok", "description": "x"}, {"mean": nan}, 422, "mean"),
        ({"name": "ok", "description": "x"}, {"mean": mean, "variance": negative}, 422, "variance"),
        ({"name": "ok", "description": "x", "num_snapshots": "0"}, {"mean": mean}, 422, "num_snapshots"),
        ({"name": "ok"}, {"mean": mean}, 422, "description"),
        ({"name": "ok", "description": "x"}, {"variance": negative}, 422, "mean"),  # multipart without a mean
        ({"name": "ok", "description": "x"}, {}, 415, "Content-Type"),  # no file: httpx sends the form urlencoded
    ]
    for data, f, status, field in cases:
        r = client.post("/experts", data=data, files=f, headers=ADMIN)
        assert (r.status_code, r.json()["detail"]["field"]) == (status, field), (data, r.text)
    assert client.delete("/experts/nobody", headers=ADMIN).status_code == 404
    assert len(client.get("/experts").json()["experts"]) == 4


def test_download_an_expert_and_register_it_back(app_root, reference):
    """GET /experts/{name}: the mean and the variance as /generate's format (PEFT names, metadata), the mean as
    a zipped PEFT folder; what it answers, POST /experts takes back unchanged."""
    import io
    import json
    import zipfile

    from safetensors.torch import load

    from sglora.export import PEFT_CONFIG, PEFT_WEIGHTS, from_peft_tensors

    client, root = app_root
    repo = ExpertRepository.load(root / "repository")
    mean = client.get("/experts/circle")
    assert mean.status_code == 200 and mean.headers["content-type"] == "application/octet-stream"
    assert mean.headers["x-artifact-version"] == client.get("/experts").json()["artifact_version"]
    assert 'filename="circle-mean.safetensors"' in mean.headers["content-disposition"]
    assert torch.equal(from_peft_tensors(repo.spec, load(mean.content)), repo["circle"].mean)
    n = int.from_bytes(mean.content[:8], "little")
    meta = json.loads(mean.content[8 : 8 + n])["__metadata__"]
    assert meta["format"] == "sglora-expert" and meta["name"] == "circle" and meta["part"] == "mean"
    assert meta["description"] == repo["circle"].description and meta["num_snapshots"] == str(repo["circle"].num_snapshots)
    assert meta["lora_fingerprint"] == repo.spec.fingerprint() and meta["rank"] == str(repo.spec.rank)
    variance = client.get("/experts/circle", params={"part": "variance"})
    assert torch.equal(from_peft_tensors(repo.spec, load(variance.content)), repo["circle"].variance)
    assert variance.headers["etag"] != mean.headers["etag"]

    zipped = client.get("/experts/circle", headers={"Accept": "application/zip"})
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as z:
        assert sorted(z.namelist()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS]) and z.read(PEFT_WEIGHTS) == mean.content
        assert json.loads(z.read(PEFT_CONFIG))["r"] == repo.spec.rank

    files = {
        "mean": ("m.safetensors", mean.content, "application/octet-stream"),
        "variance": ("v.safetensors", variance.content, "application/octet-stream"),
    }
    data = {"name": "circle-copy", "description": repo["circle"].description, "num_snapshots": meta["num_snapshots"]}
    assert client.post("/experts", data=data, files=files, headers=ADMIN).status_code == 201
    copy = load_artifacts(root).repository["circle-copy"]
    assert torch.equal(copy.mean, repo["circle"].mean) and torch.equal(copy.variance, repo["circle"].variance)
    # The service encodes the description again, on its own device: the repository's bits on the CPU that
    # built it, the same values within rounding on a GPU.
    assert torch.equal(copy.embedding, reference.engine.embed([repo["circle"].description])[0])
    torch.testing.assert_close(copy.embedding, repo["circle"].embedding)


def test_a_file_whose_metadata_names_another_layout_or_part_is_refused(app_root):
    """The shapes alone pass a LoRA of another alpha (applied here at this repository's scale) and a variance
    sent as the mean; the metadata /generate and GET /experts write says so, and is read. A PEFT file without
    it is still taken (its shapes are all there is to check)."""
    import json

    client, root = app_root
    repo = ExpertRepository.load(root / "repository")
    mean, variance = client.get("/experts/circle").content, client.get("/experts/circle", params={"part": "variance"}).content

    def with_meta(data: bytes, **changes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header["__metadata__"].update(changes)
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + data[8 + n :]

    def post(name: str, m: bytes, v: bytes | None = None):
        files = {"mean": ("m.safetensors", m, "application/octet-stream")}
        if v is not None:
            files["variance"] = ("v.safetensors", v, "application/octet-stream")
        data = {"name": name, "description": "a red circle", "num_snapshots": "3"}
        return client.post("/experts", data=data, files=files, headers=ADMIN)

    cases = [
        (with_meta(mean, alpha="8.0"), None, "mean", "alpha"),
        (with_meta(mean, scaling="rslora"), None, "mean", "scaling"),
        (with_meta(mean, lora_fingerprint="0" * 16), None, "mean", "lora_fingerprint"),
        (with_meta(mean, backbone_kind="offline"), None, "mean", "backbone kind"),
        (with_meta(mean, format="sglora-cvae"), None, "mean", "format"),
        (with_meta(mean, activation="quick_gelu"), None, "mean", "MLPs use quick_gelu, this backbone's use gelu"),
        (with_meta(mean, visual_tower='{"layers": 2, "patch_size": [16, 16]}'), None, "mean", "patch size [16, 16]"),
        (with_meta(mean, visual_tower='{"layers": 5, "patch_size": [8, 8]}'), None, "mean", "with 5 blocks"),
        (with_meta(mean, visual_tower="[" * 100_000), None, "mean", "names an image tower that is not one"),  # was a 500
        (variance, None, "mean", "variance, not its mean"),
        (mean, mean, "variance", "mean, not its variance"),
    ]
    for m, v, field, words in cases:
        r = post("refused", m, v)
        assert r.status_code == 422, (words, r.text)
        assert r.json()["detail"]["field"] == field and words in r.json()["detail"]["reason"], r.json()
    assert "refused" not in load_artifacts(root).repository
    # A generation (format sglora-lora, no part) is a mean of this layout; a bare PEFT file carries no metadata.
    generated = client.post("/generate", json={"description": "a red circle", "seed": 1}).content
    assert post("from-generate", generated).status_code == 201
    bare = save(to_peft_tensors(repo.spec, repo["circle"].mean))
    assert post("from-peft", bare).status_code == 201
    saved_by_peft = save(to_peft_tensors(repo.spec, repo["circle"].mean), metadata={"format": "pt"})  # save_pretrained's
    assert post("saved-by-peft", saved_by_peft).status_code == 201


def test_downloading_an_expert_refuses_bad_requests_by_name(app_root):
    client, _ = app_root
    cases = [
        ("/experts/nobody", {}, {}, 404, "name"),
        ("/experts/circle", {"part": "both"}, {}, 422, "part"),
        ("/experts/circle", {"part": "variance"}, {"Accept": "application/zip"}, 422, "part"),
    ]
    for path, params, headers, status, field in cases:
        r = client.get(path, params=params, headers=headers)
        assert r.status_code == status and r.json()["detail"]["field"] == field, (path, params, r.text)
    assert client.get("/experts/circle", headers={"X-API-Key": ""}).status_code == 401


@pytest.mark.anyio
async def test_a_default_top_k_is_the_one_of_the_repository_the_job_runs_on(tiny_artifacts, make_settings):
    from app_helpers import serving

    from app.errors import APIError

    async with serving(make_settings(artifacts=tiny_artifacts)) as (service, client):
        assert len(service.state.experts) == 4 and service.state.top_k == 3
        # Resolved while 4 experts exist, run after two were removed: a request that sent no top_k
        # gets the new default (it was a 422 blaming the top_k it never sent); an explicit one keeps its own.
        defaulted = service.resolve("a red ring", "sg-lora", 5, None, None)
        explicit = service.resolve("a red ring", "sg-lora", 5, 3, None)
        for name in ("square", "cross"):
            await service.remove_expert(name)
        assert service.state.top_k == 2
        lora = await service.generate(defaulted)
        assert lora.metadata["top_k"] == "2" and len(lora.experts) == 2
        with pytest.raises(APIError) as e:
            await service.generate(explicit)
        assert e.value.status == 422 and e.value.field == "top_k"
        same = await client.post("/generate", json={"description": "a red ring", "seed": 5, "top_k": 2})
        assert same.status_code == 200 and same.content == lora.data


@pytest.mark.anyio
async def test_the_listing_and_ready_read_one_published_state(tiny_artifacts, make_settings):
    from app_helpers import serving

    async with serving(make_settings(artifacts=tiny_artifacts)) as (service, client):
        before = (await client.get("/experts")).json()
        ready = (await client.get("/ready")).json()
        # Mid-change, on the model thread: the repository's dict already changed, the new version not yet
        # computed. Readers on the event loop keep seeing the last published state, whole (the listing
        # read the live dict: a KeyError 500, or a version paired with another set of experts).
        service.artifacts.repository.remove("ring")
        assert (await client.get("/experts")).json() == before
        now = (await client.get("/ready")).json()
        assert (
            (now["artifact_version"], now["experts"])
            == (ready["artifact_version"], ready["experts"])
            == (before["artifact_version"], 4)
        )


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["saved", "failed"])
async def test_an_expert_file_is_of_one_published_state_never_of_a_change_in_progress(tiny_artifacts, make_settings, outcome):
    """GET /experts/{name} read the live repository: mid-change (in memory already, not yet saved) it served
    an expert the listing did not have, stamped with the version before it; and one whose save then failed
    ("nothing was changed") was served all the same. It now waits for the change and answers its outcome."""
    import asyncio
    import threading

    from app_helpers import serving

    files, _ = expert_files(tiny_artifacts)
    async with serving(make_settings(artifacts=tiny_artifacts, admin_keys=["admin-secret"])) as (service, client):
        repo = service.artifacts.repository
        write, started, go = repo._write_expert, threading.Event(), threading.Event()

        def slow_write(directory, expert):  # on the model thread, after the in-memory add
            started.set()
            assert go.wait(10)
            if outcome == "failed":
                raise OSError(28, "No space left on device")
            write(directory, expert)

        repo._write_expert = slow_write
        post = asyncio.create_task(
            client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
        )
        assert await asyncio.to_thread(started.wait, 10)
        get = asyncio.create_task(client.get("/experts/disc"))
        await asyncio.sleep(0.3)
        assert not get.done()  # it waits for the change in progress
        go.set()
        changed, got = await post, await get
        listed = (await client.get("/experts")).json()
        if outcome == "failed":
            assert changed.status_code == 500 and got.status_code == 404
            assert "disc" not in [e["name"] for e in listed["experts"]]
        else:
            assert changed.status_code == 201 and got.status_code == 200
            assert got.headers["x-artifact-version"] == changed.json()["artifact_version"] == listed["artifact_version"]
            assert changed.json()["experts"] == len(listed["experts"]) == 5


def test_a_change_made_on_disk_by_another_process_is_a_409_not_a_lost_update(app_root):
    client, root = app_root
    other = ExpertRepository.load(root / "repository")  # a second server on the same directory
    files, repo = expert_files(root)
    other.remove_and_save("ring", root / "repository")
    r = client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
    assert r.status_code == 409 and "another process changed the experts" in r.json()["detail"]["reason"]
    assert client.delete("/experts/square", headers=ADMIN).status_code == 409
    assert ExpertRepository.load(root / "repository").names == other.names  # the other writer's change stands
    assert len(client.get("/experts").json()["experts"]) == 4  # this server: as loaded, until restarted


def test_a_change_after_a_pipeline_rebuilt_the_directory_is_a_409(app_root):
    """A pipeline rerun into the served directory rewrites its manifest (a generator trained again) and may
    leave the repository index byte-identical: a registration passed the repository's check and was saved
    beside artefacts this server does not serve, under a version no restart would give."""
    import json

    client, root = app_root
    files, _ = expert_files(root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["stages"]["generator"]["completed"] = "2099-01-01T00:00:00Z"  # as a rerun of the stage leaves it
    (root / "manifest.json").write_text(json.dumps(manifest))
    index = (root / "repository" / "repository.json").read_bytes()
    r = client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
    assert r.status_code == 409 and "rebuilt since this server loaded them" in r.json()["detail"]["reason"], r.text
    assert client.delete("/experts/square", headers=ADMIN).status_code == 409
    assert (root / "repository" / "repository.json").read_bytes() == index  # nothing changed
    assert not (root / "repository" / "experts" / "disc.safetensors").exists()


def test_a_change_while_another_process_holds_the_lock_is_a_503_and_changes_nothing(app_root, monkeypatch):
    """Another replica's change, or a pipeline rebuilding the repository, holds its lock: a change waits for
    it a bounded time (it holds every model thread meanwhile) and then answers 503 with Retry-After."""
    import time

    import app.service as service_module
    from expert_store.repository import locked

    monkeypatch.setattr(service_module, "REPOSITORY_LOCK_WAIT_S", 0.3)
    client, root = app_root
    files, _ = expert_files(root)
    index = (root / "repository" / "repository.json").read_bytes()
    with locked(root / "repository") as held:
        assert held
        t0 = time.monotonic()
        r = client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
        waited = time.monotonic() - t0
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "held the expert repository's lock" in r.json()["detail"]["reason"] and waited < 10
        d = client.delete("/experts/ring", headers=ADMIN)
        assert d.status_code == 503 and d.headers["retry-after"] == "1", d.text
        assert client.post("/generate", json={"description": "a ring", "seed": 1}).status_code == 200
    assert (root / "repository" / "repository.json").read_bytes() == index
    assert not (root / "repository" / "experts" / "disc.safetensors").exists()
    assert len(client.get("/experts").json()["experts"]) == 4
    r = client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
    assert r.status_code == 201, r.text  # the lock free again: the same change is made


def test_a_file_that_is_not_safetensors_is_named_for_what_it_is(app_root):
    """A PEFT zip (what /generate and GET /experts/{name} answer with Accept: application/zip), text or other
    bytes were refused as 'the safetensors header is larger than 1048576 bytes'; a float64 file of values
    beyond float32's range as 'NaN/Inf values'."""
    import io
    import zipfile

    client, root = app_root
    files, repo = expert_files(root)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("adapter_model.safetensors", files["mean"][1])
    wide = {k: v.double() * 1e300 for k, v in to_peft_tensors(repo.spec, repo["circle"].mean).items()}
    cases = (
        (buf.getvalue(), "a zip file, not a safetensors file"),
        (b'{"not": "safetensors"}', "not a safetensors file"),
        (b"PK", "not a safetensors file"),
        (save(wide), "overflow float32"),
    )
    for data, reason in cases:
        upload = {"mean": ("m", data, "application/octet-stream")}
        r = client.post("/experts", data={"name": "odd", "description": "x"}, files=upload, headers=ADMIN)
        assert r.status_code == 422 and r.json()["detail"]["field"] == "mean", r.text
        assert reason in r.json()["detail"]["reason"], r.text
    assert len(client.get("/experts").json()["experts"]) == 4


def test_an_expert_file_with_an_outsized_header_is_refused_before_it_is_read(app_root, monkeypatch):
    """A safetensors header may list any number of empty tensors: 29 MB of them took 4.6 s and 690 MB to
    load (256 MB, the default upload limit: ~40 s and ~6 GB). A LoRA's header is a few kB."""
    import json
    import struct

    import app.service as service_module

    client, root = app_root
    loads = []
    real = service_module.load_safetensors
    monkeypatch.setattr(service_module, "load_safetensors", lambda data: loads.append(len(data)) or real(data))
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(40_000)}).encode()
    assert len(header) > service_module.MAX_LORA_HEADER_BYTES
    empty = ("m.safetensors", struct.pack("<Q", len(header)) + header, "application/octet-stream")
    files, _ = expert_files(root)
    for parts, field in (({"mean": empty}, "mean"), ({"mean": files["mean"], "variance": empty}, "variance")):
        r = client.post("/experts", data={"name": "empty", "description": "nothing"}, files=parts, headers=ADMIN)
        assert (r.status_code, r.json()["detail"]["field"]) == (422, field), r.text
        assert "header" in r.json()["detail"]["reason"]
    assert all(n < 100_000 for n in loads), loads  # only the good mean was read
    assert len(client.get("/experts").json()["experts"]) == 4


def test_experts_of_values_too_large_are_refused_and_never_answered_with_a_200(tiny_artifacts, make_settings, monkeypatch):
    """An expert of finite 1e10s registered fine, then every LoRA it took part in held 1e9s and retrieval
    with them answered null scores; of 1e19s, NaN LoRAs came back with a 200."""
    import dataclasses

    import app.service

    repo = ExpertRepository.load(tiny_artifacts / "repository")
    circle = repo["circle"]
    # One already on disk (written before the check existed): generation and retrieval refuse to answer NaN.
    repo.add_and_save(dataclasses.replace(circle, name="huge", mean=circle.mean * 1e19), tiny_artifacts / "repository")
    settings = make_settings(artifacts=tiny_artifacts, admin_keys=["admin-secret"])
    png = expert_png()
    with TestClient(create_app(settings)) as c:
        body = {"description": circle.description, "seed": 1, "top_k": 2}
        r = c.post("/generate", json=body)
        assert r.status_code == 422 and "not finite" in r.json()["detail"]["reason"] and "huge" in r.json()["detail"]["reason"]
        assert c.post("/generate", json={**body, "description": "a red square"}).status_code == 200  # others unaffected
        r = c.post(
            "/retrieve",
            data={"description": circle.description, "method": "topk-weighted", "top_k": "2"},
            files=[("images", ("a.png", png))],
        )
        assert r.status_code == 422 and "not finite" in r.json()["detail"]["reason"], r.text
        assert c.delete("/experts/huge", headers=ADMIN).status_code == 200
        # A new one is refused at the door: over 1000x the repository's scale ...
        files = {"mean": ("m.safetensors", safetensors_bytes(repo.spec, circle.mean * 1e4, {}))}
        r = c.post("/experts", data={"name": "big", "description": "a big circle"}, files=files, headers=ADMIN)
        assert r.status_code == 422 and r.json()["detail"]["field"] == "mean" and "1000 times" in r.json()["detail"]["reason"]
        assert (
            c.post(
                "/experts",
                data={"name": "big", "description": "a big circle"},
                files={"mean": ("m", safetensors_bytes(repo.spec, circle.mean * 900, {}))},
                headers=ADMIN,
            ).status_code
            == 201
        )
        # ... and, without that bound (an empty repository has no scale), by the probe image's embeddings.
        monkeypatch.setattr(app.service, "MAX_EXPERT_SCALE", float("inf"))
        files = {"mean": ("m.safetensors", safetensors_bytes(repo.spec, circle.mean * 1e19, {}))}
        r = c.post("/experts", data={"name": "bigger", "description": "a bigger circle"}, files=files, headers=ADMIN)
        assert (
            r.status_code == 422
            and r.json()["detail"]["field"] == "mean"
            and "non-finite image embeddings" in r.json()["detail"]["reason"]
        )
        assert "bigger" not in [e["name"] for e in c.get("/experts").json()["experts"]]


def expert_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.linear_gradient("L").resize((32, 32)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.anyio
async def test_a_batch_across_an_expert_change_names_each_items_version(tiny_artifacts, make_settings):
    """A batch answered partly before a DELETE /experts (a hit) and partly after it reported the version read
    after the whole call, which one item's file contradicted; items had no version of their own."""
    import asyncio

    from app_helpers import file_metadata, serving

    settings = make_settings(artifacts=tiny_artifacts, admin_keys=["admin-secret"], test_model_delay_s=0.3)
    async with serving(settings) as (service, client):
        old = service.version
        first = {"description": "a red ring", "seed": 1}
        assert (await client.post("/generate", json=first)).status_code == 200
        delete = asyncio.create_task(client.delete("/experts/square", headers=ADMIN))
        await asyncio.sleep(0.05)  # the removal waits for the model thread, then holds the next jobs back
        items = [first, {"description": "a blue cross", "seed": 2}]
        r = await client.post("/generate/batch", json={"items": items})
        new = (await delete).json()["artifact_version"]
        body = r.json()
        made = [file_metadata(base64.b64decode(it["data"]))["artifact_version"] for it in body["results"]]
        assert [it["artifact_version"] for it in body["results"]] == made
        assert made == [old, new]  # the hit from before the change, the miss after it
        assert body["artifact_version"] is None
        # Without a change in between, one version for all.
        r = (await client.post("/generate/batch", json={"items": items})).json()
        assert r["artifact_version"] == new and {it["artifact_version"] for it in r["results"]} == {new}


@pytest.mark.anyio
async def test_a_repository_of_zero_means_has_no_scale_to_bound_a_new_expert(tiny_artifacts, make_settings, monkeypatch):
    """With every stored mean zero (a zero expert registered, the others deleted) the 1000x bound refused any
    real expert, and the last expert cannot be deleted: the repository was locked. The probe still bounds it."""
    from app_helpers import serving

    from app.errors import APIError
    from expert_store.repository import _Stack

    async with serving(make_settings(artifacts=tiny_artifacts)) as (service, _):
        repo = service.artifacts.repository
        means, variances, embeddings = repo.stacked()
        # A stack of zero means (and nothing worked out from it yet), as stacked() and derived() read it.
        monkeypatch.setattr(repo, "_stack", _Stack((torch.zeros_like(means), variances, embeddings), {}, None))
        circle = repo["circle"]
        service._check_scale(circle.mean, circle.variance)  # no exception: a real expert is welcome
        with pytest.raises(APIError, match="non-finite image embeddings"):
            service._check_scale(circle.mean * 1e19, circle.variance)


def test_a_change_leaves_no_former_stack_alive(app_root):
    """The experts are held once: the caches kept per state of the repository (model-soup's mean, the unit
    embeddings, the generator features, the upload check's largest value) must not keep the stack of a
    former state alive after a change (E x P floats each: 442 MB at 1,000 experts of ViT-B-16's shape)."""
    client, root = app_root
    service = client.app.state.service
    assert client.post("/generate", json={"description": "a ring", "method": "model-soup"}).status_code == 200
    assert client.post("/generate", json={"description": "a ring", "seed": 1}).status_code == 200
    former = weakref.ref(service.artifacts.repository.stacked()[0])
    buffer = former().data_ptr()
    files, _ = expert_files(root)
    r = client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
    assert r.status_code == 201, r.text
    gc.collect()
    assert former() is None  # the former state's tensors (its rows of the buffers the new state extends)
    assert service.artifacts.repository.stacked()[0].data_ptr() == buffer  # a spare row filled, nothing copied
    former = weakref.ref(service.artifacts.repository.stacked()[0])
    assert client.post("/generate", json={"description": "a ring", "method": "model-soup"}).status_code == 200
    assert client.delete("/experts/disc", headers=ADMIN).status_code == 200
    gc.collect()
    assert former() is None


def test_a_change_stands_when_working_out_the_new_state_ahead_fails(app_root, monkeypatch, caplog):
    client, root = app_root
    service = client.app.state.service
    version = client.get("/experts").json()["artifact_version"]

    def fail():
        raise MemoryError("no room for the new stack")

    monkeypatch.setattr(service.engine, "refresh", fail)
    files, _ = expert_files(root)
    r = client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
    assert r.status_code == 201, r.text  # saved, and published: not a 500 for a change that was made
    listed = client.get("/experts").json()
    assert "disc" in [e["name"] for e in listed["experts"]] and listed["artifact_version"] != version
    assert "working out the new state ahead failed" in caplog.text
    g = client.post("/generate", json={"description": "an orange disc", "method": "model-soup"})
    assert g.status_code == 200 and g.headers["x-experts-count"] == "5"  # the next generation did the work
    assert g.headers["x-artifact-version"] == listed["artifact_version"]


def test_the_listing_pages_in_the_repositorys_order(app_root):
    client, _ = app_root
    everything = client.get("/experts").json()
    names = [e["name"] for e in everything["experts"]]
    assert everything["total"] == len(names) == 4 and everything["offset"] == 0
    page = client.get("/experts", params={"offset": 1, "limit": 2}).json()
    assert [e["name"] for e in page["experts"]] == names[1:3] and page["total"] == 4 and page["offset"] == 1
    assert page["artifact_version"] == everything["artifact_version"]  # pages of one version fit together
    past = client.get("/experts", params={"offset": 9}).json()
    assert past["experts"] == [] and past["total"] == 4
    for params, field in (({"limit": 0}, "limit"), ({"offset": -1}, "offset"), ({"limit": "all"}, "limit")):
        r = client.get("/experts", params=params)
        assert r.status_code == 422 and r.json()["detail"]["field"] == field, (params, r.text)


def test_a_config_top_k_above_the_experts_serves_and_registration_keeps_the_default_within_the_cap(tiny_artifacts, make_settings):
    """A config's prior.top_k above the number of experts merges them all (as the pipeline and the CLI do):
    the start-up check compares that default, not the config's number, with SGLORA_MAX_TOP_K. An expert added
    beyond the cap would raise the default past it: refused, the repository left as it was."""
    import dataclasses
    import json

    from training.config import PipelineConfig, from_dict
    from training.pipeline import stage_generator

    built = from_dict(PipelineConfig, json.loads((tiny_artifacts / "config.json").read_text()))
    stage_generator(dataclasses.replace(built, prior=dataclasses.replace(built.prior, top_k=10)), tiny_artifacts)
    index = (tiny_artifacts / "repository" / "repository.json").read_bytes()
    settings = make_settings(artifacts=tiny_artifacts, admin_keys=["admin-secret"], redis_url="", max_top_k=4)
    with TestClient(create_app(settings)) as client:  # 4 experts: a default of 4, within the cap
        r = client.post("/generate", json={"description": "a circle", "method": "topk-weighted"})
        assert r.status_code == 200 and r.headers["x-experts-count"] == "4"
        files, _ = expert_files(tiny_artifacts)
        r = client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
        assert r.status_code == 409, r.text
        assert "with 5 experts the artefacts' default top_k (10)" in r.json()["detail"]["reason"]
        assert "SGLORA_MAX_TOP_K=4" in r.json()["detail"]["reason"]
        assert len(client.get("/experts").json()["experts"]) == 4
    assert (tiny_artifacts / "repository" / "repository.json").read_bytes() == index


def test_an_additions_probe_forwards_run_beside_generations_and_its_job_checks_the_scale_again(app_root, monkeypatch):
    """The probe forwards through the image tower (0.7 s on ViT-B-16's shape) run on a model thread outside
    the change (ModelWorker.run_beside), not in the job every generation waits for; the bound by the
    repository's largest mean is checked again inside the job, against the state it changes."""
    client, root = app_root
    service = client.app.state.service
    seen = []
    probe, bound = service._check_scale, service._check_repository_scale

    def check_scale(mean, variance):
        seen.append(("probe", service._change_lock.locked(), threading.current_thread().name))
        return probe(mean, variance)

    def check_repository_scale(mean, variance):
        seen.append(("bound", service._change_lock.locked(), threading.current_thread().name))
        return bound(mean, variance)

    monkeypatch.setattr(service, "_check_scale", check_scale)
    monkeypatch.setattr(service, "_check_repository_scale", check_repository_scale)
    files, _ = expert_files(root)
    r = client.post("/experts", data={"name": "disc", "description": "an orange disc"}, files=files, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert [(what, held) for what, held, _ in seen] == [("probe", False), ("bound", False), ("bound", True)]
    assert all(thread.startswith("sglora-torch-") for _, _, thread in seen)


def test_a_removals_copy_of_the_other_experts_runs_beside_generations_and_its_job_takes_it(app_root):
    """DELETE copies the remaining experts into a new stack (0.5 s at 1,000 experts of ViT-B-16's shape) on a
    model thread outside the change (ModelWorker.run_beside), and the change takes that stack instead of
    copying inside the job every generation waits for. A name that is not there makes no copy."""
    client, root = app_root
    service = client.app.state.service
    repo = service.artifacts.repository
    seen, made = [], []
    ahead = repo.stack_without

    def stack_without(name):
        seen.append((name, service._change_lock.locked(), threading.current_thread().name))
        made.append(ahead(name))
        return made[-1]

    repo.stack_without = stack_without
    assert client.delete("/experts/nobody", headers=ADMIN).status_code == 404
    assert seen == []
    name = repo.names[0]
    r = client.delete(f"/experts/{name}", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert [(n, held) for n, held, _ in seen] == [(name, False)] and seen[0][2].startswith("sglora-torch-")
    assert repo._stack is made[0].stack and name not in repo
    assert ExpertRepository.load(root / "repository").names == repo.names
    assert client.post("/generate", json={"description": "a red circle", "seed": 1}).status_code == 200

"""Faults: Redis restarted under load, damaged artefacts, a disk failing during an expert change,
requests past their timeout, and SIGTERM with requests in flight (a real server process)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from app_helpers import block_worker, serving, until
from fastapi.testclient import TestClient

import expert_store.repository as repository_module
from app.main import create_app
from app.processes import free_port, start_server, stop, wait_ready
from app.worker import WorkerTimeout
from expert_store.repository import ExpertRepository
from sglora.artifacts import ArtifactError
from sglora.export import safetensors_bytes
from sglora.io import atomic_path

ADMIN = {"X-API-Key": "admin-key"}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- Redis -----------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_redis_stopped_and_restarted_during_a_stream_of_requests(private_redis, make_settings):
    # Without the hot keys: the pool's repeats would be answered from memory, Redis or not.
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=0.2, redis_backoff_s=0.2, threads=1, hot_keys=0)
    # A pool of its own per stream: identical requests in flight share one generation (a hit, not a miss).
    pools = [[{"description": f"a stream shape {k}.{i}", "seed": i} for i in range(5)] for k in range(4)]
    state = {"phase": "up"}
    results: list[tuple[str, int, str | None]] = []
    stop = asyncio.Event()
    async with serving(settings) as (service, client):

        async def stream(k: int) -> None:
            i = k
            while not stop.is_set():
                phase = state["phase"]
                r = await client.post("/generate", json=pools[k][i % 5])
                results.append((phase, r.status_code, r.headers.get("x-cache")))
                i += 1
                await asyncio.sleep(0.005)

        tasks = [asyncio.create_task(stream(k)) for k in range(4)]
        await until(lambda: sum(c == "hit" for _, _, c in results) >= 10, timeout=10.0)
        state["phase"] = "down"
        await asyncio.to_thread(private_redis.stop)
        n = len(results)
        await until(lambda: len(results) >= n + 30, timeout=10.0)
        state["phase"] = "restarted"
        await asyncio.to_thread(private_redis.start)  # same port, empty
        # The cache is used again: the first requests refill it, the next are hits.
        await until(lambda: sum(p == "restarted" and c == "hit" for p, _, c in results) >= 10, timeout=10.0)
        stop.set()
        await asyncio.gather(*tasks)
        assert (await client.get("/ready")).json()["redis"] == "ok"
    assert [s for _, s, _ in results if s != 200] == []  # no failed request, whatever the phase
    down = [c for p, _, c in results if p == "down"]
    assert down.count("miss") >= 20  # served uncached while Redis was away


# ---- artefacts ---------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "relative",
    [
        "generator/cvae.safetensors",
        "generator/cvae.json",
        "backbone/open_clip_model.safetensors",
        "repository/experts/ring.safetensors",
        "repository/repository.json",
        "config.json",
        "manifest.json",
    ],
)
def test_truncated_artefact_refuses_start_naming_the_file(tiny_artifacts, make_settings, relative):
    truncate(tiny_artifacts / relative)
    with pytest.raises(ArtifactError, match=Path(relative).name.replace(".", r"\.")):
        with TestClient(create_app(make_settings(artifacts=tiny_artifacts, threads=1))):
            pass


# ---- a disk failing during an expert change ------------------------------------------------------------
def failing_write(path: Path, *args, **kwargs) -> None:
    """Fails like a full disk half-way through an atomic write."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("fails", ["expert file", "index"])
def test_failed_expert_change_leaves_the_repository_as_it_was(tiny_artifacts, make_settings, monkeypatch, fails):
    settings = make_settings(artifacts=tiny_artifacts, admin_keys=["admin-key"], threads=1)
    repo = ExpertRepository.load(tiny_artifacts / "repository")
    mean = safetensors_bytes(repo.spec, repo["circle"].mean * 0.5, {})
    form = {"name": "disc", "description": "an orange disc"}
    with TestClient(create_app(settings)) as c:
        body = {"description": "an orange disc", "seed": 2}
        before_bytes = c.post("/generate", json=body).content
        before_files, before_list = snapshot(tiny_artifacts), c.get("/experts").json()

        real_write = repository_module.write_bytes
        failing = ".safetensors" if fails == "expert file" else ".json"

        def write_bytes(path: Path, data: bytes) -> None:
            (failing_write if path.suffix == failing else real_write)(path, data)

        monkeypatch.setattr(repository_module, "write_bytes", write_bytes)
        r = c.post("/experts", data=form, files={"mean": ("m.safetensors", mean)}, headers=ADMIN)
        assert r.status_code == 500 and "nothing was changed" in r.json()["detail"]["reason"]
        if fails == "index":  # the expert file was written before the index write failed
            r = c.delete("/experts/circle", headers=ADMIN)
            assert r.status_code == 500 and "nothing was changed" in r.json()["detail"]["reason"]
        assert snapshot(tiny_artifacts) == before_files  # no new, half-written or temporary file
        assert c.get("/experts").json() == before_list
        assert c.post("/generate", json=body).content == before_bytes

        monkeypatch.undo()  # the disk is back: the same upload now works
        r = c.post("/experts", data=form, files={"mean": ("m.safetensors", mean)}, headers=ADMIN)
        assert r.status_code == 201, r.text
        assert "disc" in ExpertRepository.load(tiny_artifacts / "repository")


# ---- timeouts ------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_requests_past_their_timeout_get_504_and_free_the_worker(make_settings):
    async with serving(make_settings(request_timeout_s=0.3, max_queue=4, threads=1)) as (service, client):
        encoded: list[str] = []
        embed = service.worker._embed
        service.worker._embed = lambda texts: (encoded.extend(texts), embed(texts))[1]
        gate = threading.Event()
        blocker = asyncio.create_task(service.worker.run(gate.wait, 10))  # the model thread hangs
        await until(lambda: service.worker.pending == 1, timeout=10.0)
        late = await asyncio.gather(*(client.post("/generate", json={"description": f"late {i}", "seed": i}) for i in range(3)))
        assert [r.status_code for r in late] == [504] * 3
        assert all(r.json()["detail"]["reason"] for r in late)
        # Their admission slots are free at once (no 429 although max_queue is 4), while the thread still hangs.
        assert service.worker.pending == 0
        more = [asyncio.create_task(client.post("/generate", json={"description": f"more {i}", "seed": i})) for i in range(4)]
        await asyncio.sleep(0.05)
        gate.set()
        with pytest.raises(WorkerTimeout):  # the blocker timed out as well
            await blocker
        assert {r.status_code for r in await asyncio.gather(*more)} <= {200, 504}
        ok = await client.post("/generate", json={"description": "on time", "seed": 1})
        assert ok.status_code == 200  # within request_timeout_s: the worker is free
        assert not any(t.startswith("late") for t in encoded)  # the given-up jobs were skipped, not run


@pytest.mark.anyio
async def test_a_retrieval_by_description_waits_for_the_model_within_one_request_timeout(make_settings):
    """Its two waits (its LoRA, then the retrieval) each had the whole SGLORA_REQUEST_TIMEOUT_S: 0.7 s + 0.7 s of
    model work under a 1 s timeout was answered 200, after 1.4 s."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    image = [("images", ("a.png", buf.getvalue()))]
    async with serving(make_settings(request_timeout_s=1.0, test_model_delay_s=0.7, threads=1)) as (service, client):
        r = await client.post("/retrieve", data={"description": "a red ring", "seed": "1"}, files=image)
        assert r.status_code == 504, r.text
        made = await client.post("/generate", json={"description": "a red ring", "seed": 1})  # its LoRA was made
        assert made.status_code == 200
        await until(lambda: service.worker.busy == 0, timeout=5.0)  # the given-up retrieval had begun: it ends
        r = await client.post("/retrieve", data={"etag": made.headers["etag"]}, files=image)  # one wait: in time
        assert r.status_code == 200, r.text


@pytest.mark.anyio
async def test_an_expert_change_that_began_is_answered_with_its_outcome_not_a_504(tiny_artifacts, make_settings):
    """A registration that got the model threads just before its deadline was made, while its client got a
    504: the expert was on disk, a retry said 409. One that has not begun when the time is up never does."""
    repo = ExpertRepository.load(tiny_artifacts / "repository")
    mean = safetensors_bytes(repo.spec, repo["circle"].mean * 0.5, {})
    settings = make_settings(artifacts=tiny_artifacts, admin_keys=["admin-key"], request_timeout_s=0.5, test_model_delay_s=1.0)
    async with serving(settings) as (service, client):
        form = {"name": "disc", "description": "an orange disc"}
        r = await client.post("/experts", data=form, files={"mean": ("m.safetensors", mean)}, headers=ADMIN)
        assert r.status_code == 201, r.text  # begun at once, finished after the timeout: its outcome
        assert "disc" in ExpertRepository.load(tiny_artifacts / "repository")
        # Behind a job holding the model threads past the timeout: never begun, never made. The blocker is
        # seen running (not only a thread seen taken, which the registration's thread, handed back a moment
        # after its answer, also was: the removal then began first on a loaded machine, and was made).
        await service.worker.settle()
        gate, running = threading.Event(), threading.Event()

        def hold() -> None:
            running.set()
            gate.wait(10)

        blocker = asyncio.create_task(service.worker.run(hold))
        await until(running.is_set, timeout=10.0)
        r = await client.delete("/experts/disc", headers=ADMIN)
        assert r.status_code == 504
        gate.set()
        with pytest.raises(WorkerTimeout):  # the blocker timed out as well
            await blocker
        await until(lambda: service.worker.busy == 0, timeout=10.0)
        await asyncio.sleep(1.2)  # long enough for the removal to have run, had it been left queued
        assert "disc" in ExpertRepository.load(tiny_artifacts / "repository")
        assert "disc" in [e["name"] for e in (await client.get("/experts")).json()["experts"]]


@pytest.mark.anyio
@pytest.mark.parametrize("commit", [False, True])
async def test_a_job_given_up_as_its_thread_comes_free_ends_cleanly(commit):
    """The caller of a run() job waiting for the model thread gives up in the very loop step in which the thread
    is given back: _give dropped the cancelled waiter, then _take removed it again and the job's task died with
    ValueError ("Task exception was never retrieved" and a traceback in the log)."""
    from app.metrics import Metrics
    from app.worker import ModelWorker

    loop = asyncio.get_running_loop()
    worker = ModelWorker(lambda texts: torch.zeros(len(texts), 4), Metrics(), model_threads=1, timeout_s=30)
    worker.start()
    gate, waiting = threading.Event(), {}

    def blocker() -> None:
        gate.wait()
        loop.call_soon_threadsafe(waiting["caller"].cancel)  # the second caller leaves as the thread frees

    first = asyncio.create_task(worker.run(blocker))
    await until(lambda: worker.busy == 1)
    ran: list[int] = []
    waiting["caller"] = asyncio.create_task(worker.run(ran.append, 1, commit=commit))
    await until(lambda: len(worker._waiting_alone) == 1)
    task = next(iter(worker._waiting_alone.values()))
    gate.set()
    await asyncio.gather(first, waiting["caller"], return_exceptions=True)
    await until(lambda: task.done())
    assert task.cancelled() and ran == []  # not a ValueError; the job never ran
    assert worker._free == [0] and not worker._thread_waiters and worker.pending == 0
    await worker.close()


@pytest.mark.anyio
async def test_an_expert_change_that_began_outlives_its_callers_cancellation():
    """Cut off after it began (uvicorn's graceful-shutdown timeout cancels the requests still running, which then
    read 503 "retry" while the drain let the change be made; a retry met 409): its outcome instead."""
    from app.metrics import Metrics
    from app.worker import ModelWorker

    worker = ModelWorker(lambda texts: torch.zeros(len(texts), 4), Metrics(), model_threads=1, timeout_s=30)
    worker.start()
    gate = threading.Event()
    caller = asyncio.create_task(worker.run(lambda: (gate.wait(), "changed")[1], commit=True))
    await until(lambda: worker.busy == 1)  # begun
    caller.cancel()
    await asyncio.sleep(0.05)
    gate.set()
    assert await caller == "changed"
    await worker.close()


@pytest.mark.anyio
async def test_given_up_jobs_that_run_alone_do_not_pile_up_waiting_for_the_threads(make_settings):
    """A run() job (a retrieval) whose caller timed out kept its task, and the decoded images it holds, alive
    until every model thread was free: beyond max_queue, by the hundred, gigabytes of them."""
    async with serving(make_settings(request_timeout_s=0.2, max_queue=4, threads=1)) as (service, _):
        worker = service.worker
        gate = threading.Event()
        blocker = asyncio.create_task(worker.run(gate.wait, 10))
        await until(lambda: worker.busy == 1, timeout=10.0)
        ran: list[int] = []
        outcomes = await asyncio.gather(*(worker.run(ran.append, i) for i in range(20)), return_exceptions=True)
        assert {type(o).__name__ for o in outcomes} <= {"WorkerTimeout", "Overloaded"}
        assert worker.pending == 0 and not worker._waiting_alone
        await until(lambda: len(worker._tasks) <= 2, timeout=5.0)  # the blocker's and the batcher's at most
        gate.set()
        with pytest.raises(WorkerTimeout):  # the blocker timed out as well
            await blocker
        await until(lambda: worker.busy == 0, timeout=10.0)
        assert ran == []  # none of them ran


@pytest.mark.anyio
async def test_a_drain_that_times_out_answers_the_queued_jobs(make_settings, monkeypatch):
    """After a drain that timed out, close() cancelled the batcher and left the queued requests to wait for
    their own timeout (a 504 after 30 s) instead of a 503 at once."""
    from app import worker as worker_module
    from app.worker import ShuttingDown

    monkeypatch.setattr(worker_module, "_abandoned", [])  # this process's record, which app.serve acts on
    async with serving(make_settings(shutdown_timeout_s=0.3, threads=1)) as (service, _):
        worker = service.worker
        gate = threading.Event()
        blocker = asyncio.create_task(worker.run(gate.wait, 10))
        await until(lambda: worker.busy == 1, timeout=10.0)
        queued = [asyncio.create_task(worker.encode(f"queued {i}")) for i in range(3)]
        alone = asyncio.create_task(worker.run(time.sleep, 0))
        await until(lambda: worker.pending == 5, timeout=5.0)
        assert not await worker.drain(0.3)
        t0 = time.perf_counter()
        await worker.close(wait=False)
        outcomes = await asyncio.gather(*queued, alone, return_exceptions=True)
        # at once, not after their own timeout (30 s), which would have been a WorkerTimeout
        assert all(isinstance(o, ShuttingDown) for o in outcomes) and time.perf_counter() - t0 < 10, outcomes
        gate.set()
        await asyncio.gather(blocker, return_exceptions=True)


# ---- out of memory -------------------------------------------------------------------------------------
@pytest.fixture
def app_faults_root(tiny_artifacts, make_settings):
    with TestClient(create_app(make_settings(artifacts=tiny_artifacts, admin_keys=["admin-key"]))) as c:
        yield c, tiny_artifacts


def _gpu_out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)")


def _cpu_out_of_memory(*args, **kwargs):
    torch.empty(2**58, dtype=torch.uint8)  # past any address space, overcommit or not: the CPU allocator's RuntimeError


@pytest.mark.anyio
@pytest.mark.parametrize("fail", [_gpu_out_of_memory, _cpu_out_of_memory], ids=["gpu", "cpu"])
async def test_a_model_job_out_of_memory_is_a_503_to_retry_and_the_service_goes_on(make_settings, caplog, fail):
    """Not a bug (500) and not bad input: the request could not be served at this moment. The worker, the
    cache and the metrics stay as they were, and the same request passes once memory is there."""
    import logging

    async with serving(make_settings()) as (service, client):
        body = {"description": "a photo of a ring", "seed": 5}
        service.engine.generate_many = fail  # on a model thread, after the text encoding
        with caplog.at_level(logging.WARNING, logger="sglora"):
            r = await client.post("/generate", json=body, headers={"X-Request-ID": "oom-1"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and r.headers["x-request-id"] == "oom-1"
        assert r.json()["detail"]["field"] is None and r.json()["detail"]["reason"].startswith("out of memory")
        assert any("out of memory answering POST /generate" in rec.getMessage() for rec in caplog.records)
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]  # no traceback: not a bug
        text = (await client.get("/metrics")).text
        assert 'sglora_requests_total{endpoint="/generate",method="POST",status="503"} 1.0' in text
        assert 'sglora_rejected_total{reason="out_of_memory"} 1.0' in text
        del service.engine.generate_many  # memory is there again
        r = await client.post("/generate", json=body)
        assert r.status_code == 200 and r.headers["x-cache"] == "miss"  # the failure cached nothing
        assert service.worker.pending == 0


@pytest.mark.anyio
async def test_a_batch_item_out_of_memory_is_that_item_s_503(make_settings):
    async with serving(make_settings()) as (service, client):
        generate = service.generate

        async def short_of_memory(params):
            if params.description == "a photo of a huge ring":
                _gpu_out_of_memory()
            return await generate(params)

        service.generate = short_of_memory
        items = [{"description": "a photo of a huge ring", "seed": 1}, {"description": "a photo of a cross", "seed": 1}]
        r = await client.post("/generate/batch", json={"items": items})
        assert r.status_code == 200
        first, second = r.json()["results"]
        assert first["status"] == 503 and first["error"]["reason"].startswith("out of memory")
        assert second["status"] == 200 and second["data"]
        text = (await client.get("/metrics")).text  # inside a 200: only the refusals' counter sees it
        assert 'sglora_rejected_total{reason="out_of_memory"} 1.0' in text


@pytest.mark.anyio
async def test_a_text_batch_out_of_memory_is_retried_one_by_one_without_the_failed_batch_s_tensors(caplog):
    """Retried inside the except block, the error's traceback kept the failed forward's frames, and their
    tensors, alive through every retry: on a GPU the memory the retries need."""
    import weakref

    from app.metrics import Metrics
    from app.worker import ModelWorker

    held, alive_at_retry = [], []

    def embed(texts):
        if len(texts) > 1:
            activations = torch.ones(1 << 16)  # what a failed forward holds
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        alive_at_retry.append(held[0]() is not None)
        return torch.zeros(len(texts), 4)

    worker = ModelWorker(embed, Metrics(), finish=lambda e, jobs: [f"done {j}" for j in jobs], threads=1)
    worker.start()
    try:
        gate, blocker = block_worker(worker)
        await until(lambda: worker.pending == 1)
        a, b = (asyncio.create_task(worker.encode(t, t)) for t in "ab")
        await until(lambda: worker.pending == 3)
        gate.set()  # "a" and "b" now form one batch
        assert [await asyncio.wait_for(a, 5), await asyncio.wait_for(b, 5)] == ["done a", "done b"]
        await blocker
    finally:
        await worker.close()
    assert len(held) == 1 and alive_at_retry == [False, False]
    (warning,) = [r.getMessage() for r in caplog.records if "retrying them one by one" in r.getMessage()]
    assert "a text batch of 2 descriptions failed (OutOfMemoryError: CUDA out of memory" in warning


def ring_files(client) -> dict:
    """The upload of a copy of the expert "ring", as GET /experts/ring gives its mean and variance."""
    part = {p: client.get("/experts/ring", params={"part": p}).content for p in ("mean", "variance")}
    return {p: (f"{p}.safetensors", data, "application/octet-stream") for p, data in part.items()}


def test_an_expert_change_saved_but_not_taken_up_says_so(app_faults_root, monkeypatch):
    """Out of memory after the change was saved: a 503 "retry" would have met a 409 and said the opposite of
    the truth. A 500 that says the change was saved, and the expert is on disk."""
    client, root = app_faults_root
    files = ring_files(client)
    service = client.app.state.service
    monkeypatch.setattr(service, "_state_of", lambda version: (_ for _ in ()).throw(MemoryError()))
    r = client.post("/experts", data={"name": "ring-2", "description": "a photo of a ring"}, files=files, headers=ADMIN)
    assert r.status_code == 500 and "the change was saved" in r.json()["detail"]["reason"]
    assert "ring-2" in ExpertRepository.load(root / "repository").names


def test_the_version_after_an_expert_change_is_the_directory_s_without_reading_it(app_faults_root, monkeypatch):
    """The state after a change is worked out from the bytes the server holds: the same version a restart (or
    another replica) reads from the directory, and a disk that fails to read after the save cannot stop it."""
    import sglora.artifacts as artifacts_module
    from sglora.artifacts import artefact_version

    client, root = app_faults_root
    files = ring_files(client)
    before = client.get("/experts").json()["artifact_version"]
    assert before == artefact_version(root)
    real_read = Path.read_bytes

    def unreadable(path):  # the writes go through temporary files and renames; any read of the directory fails
        if root in path.parents:
            raise OSError(5, "Input/output error", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    monkeypatch.setattr(artifacts_module, "artefact_version", lambda root: pytest.fail("read the directory"))
    r = client.post("/experts", data={"name": "ring-2", "description": "a photo of a ring"}, files=files, headers=ADMIN)
    assert r.status_code == 201, r.text
    added = r.json()["artifact_version"]
    assert client.delete("/experts/ring-2", headers=ADMIN).status_code == 200
    removed = client.get("/experts").json()["artifact_version"]
    monkeypatch.undo()
    assert added not in (before, removed)
    assert removed == artefact_version(root)  # what the directory holds now


# ---- SIGTERM -------------------------------------------------------------------------------------------
def test_a_client_that_hangs_up_cancels_its_request_and_its_job(tiny_artifacts_session):
    """uvicorn lets a handler run on after its client went away: 4 clients that gave up after 0.3 s kept the
    queue full (a 5th got 429), their descriptions were all encoded for nobody, and they counted as 200s."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict:
        text = httpx.get(f"{base}/metrics", timeout=5).text
        families = text_string_to_metric_families(text)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SGLORA_REDIS_URL": "", "SGLORA_THREADS": "1", "SGLORA_TEST_MODEL_DELAY_S": "1.0"}
    env["SGLORA_MAX_QUEUE"], env["SGLORA_MODEL_THREADS"] = "4", "1"  # one job runs at a time
    artifacts = ("--artifacts", str(tiny_artifacts_session))
    proc = start_server(port, env, *artifacts, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(base, proc)
        misses = ("sglora_embedding_cache_events_total", (("result", "miss"),))
        before = samples().get(misses, 0.0)

        def hang_up(i: int) -> None:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{base}/generate", json={"description": f"gone {i}", "seed": i}, timeout=0.3)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(hang_up, range(4)))
        r = httpx.post(f"{base}/generate", json={"description": "a patient client", "seed": 9}, timeout=30)
        assert r.status_code == 200  # their slots were freed (it was a 429)
        after = samples()
        assert after[("sglora_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "499")))] == 4
        assert ("sglora_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "200"))) in after
        assert after[("sglora_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "200")))] == 1
        # The job already running when its client left ran on; those still queued were skipped.
        assert after[misses] - before <= 2, after[misses] - before
    finally:
        assert stop(proc) == 0  # SIGTERM; killed (and None) if it has not exited within 60 s
    assert "Traceback" not in proc.stderr.read()


def test_sigterm_finishes_in_flight_requests_then_exits_0(tiny_artifacts_session):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SGLORA_REDIS_URL": "",
        "SGLORA_THREADS": "1",
        "SGLORA_TEST_MODEL_DELAY_S": "1.0",  # every model job takes a second: requests stay in flight
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    artifacts = ("--artifacts", str(tiny_artifacts_session))
    proc = start_server(port, env, *artifacts, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(base, proc)
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(httpx.post, f"{base}/generate", json={"description": f"slow {i}", "seed": i}, timeout=60)
                for i in range(4)
            ]
            end = time.monotonic() + 20
            while httpx.get(f"{base}/ready", timeout=5).json().get("queue", 0) < 4:
                assert time.monotonic() < end, "the requests never reached the model"
                time.sleep(0.02)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.content and r.headers["x-seed"] == str(i) for i, r in enumerate(responses))
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 >= 0.5  # it did wait for them
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "Finished server process" in err

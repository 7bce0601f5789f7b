"""Identical requests in flight share one lookup and generation (no cache stampede). It belongs to none of
them: a request that times out or whose client goes away leaves it running for the others."""

from __future__ import annotations

import asyncio

import pytest
from app_helpers import block_worker, serving, until

from app.metrics import metric_sum
from app.worker import REQUEST_DEADLINE, Deadline, WorkerTimeout


async def made(client) -> float:
    """LoRA files made on the model threads so far (one serialisation each)."""
    return metric_sum((await client.get("/metrics")).text, "sglora_stage_duration_seconds_count", stage="serialisation")


@pytest.mark.anyio
async def test_identical_requests_in_flight_are_generated_once(make_settings):
    async with serving(make_settings(test_model_delay_s=0.3)) as (_, client):
        before = await made(client)
        body = {"description": "a herd of red circles", "seed": 7}
        answers = await asyncio.gather(
            *(client.post("/generate", json=body) for _ in range(8)),
            client.post("/generate", json={**body, "seed": 8}),  # another request: its own generation
        )
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        same, other = answers[:8], answers[8]
        assert len({r.content for r in same}) == 1 and other.content != same[0].content
        assert len({r.headers["etag"] for r in same}) == 1
        assert sorted(r.headers["x-cache"] for r in same) == ["hit"] * 7 + ["miss"]
        assert other.headers["x-cache"] == "miss"
        assert await made(client) - before == 2
        metrics = (await client.get("/metrics")).text
        assert metric_sum(metrics, "sglora_generations_shared_total") == 7
        assert metric_sum(metrics, "sglora_cache_memory_hits_total") >= 7  # no Redis asked: out of the degraded alert


@pytest.mark.anyio
async def test_identical_items_of_one_batch_are_generated_once(make_settings):
    async with serving(make_settings()) as (_, client):
        before = await made(client)
        item = {"description": "a pair of blue squares", "seed": 3}
        r = await client.post("/generate/batch", json={"items": [item, item, {**item, "method": "topk-weighted"}]})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results] == [200, 200, 200]
        assert results[0]["data"] == results[1]["data"] and results[0]["etag"] == results[1]["etag"]
        assert sorted(x["cache"] for x in results[:2]) == ["hit", "miss"]
        assert await made(client) - before == 2


@pytest.mark.anyio
async def test_requests_without_a_seed_are_never_shared(make_settings):
    async with serving(make_settings(test_model_delay_s=0.2)) as (_, client):
        before = await made(client)
        answers = await asyncio.gather(*(client.post("/generate", json={"description": "a green ring"}) for _ in range(4)))
        assert [r.headers["x-cache"] for r in answers] == ["miss"] * 4
        assert len({r.headers["x-seed"] for r in answers}) == 4  # each drew its own sample
        assert await made(client) - before == 4


@pytest.mark.anyio
async def test_the_first_request_leaving_does_not_take_the_shared_generation_with_it(make_settings):
    async with serving(make_settings(test_model_delay_s=0.3)) as (service, client):
        before = await made(client)
        params = service.resolve("a lone yellow star", "sg-lora", 11, None, None)
        first = asyncio.create_task(service.generate(params))
        await until(lambda: service._in_flight)  # noqa: SLF001 - its lookup is in flight
        others = [asyncio.create_task(service.generate(params)) for _ in range(3)]
        await asyncio.sleep(0.05)  # they wait for it
        first.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await first
        loras = await asyncio.gather(*others)
        assert {lora.cache for lora in loras} == {"hit"} and len({lora.data for lora in loras}) == 1
        assert await made(client) - before == 1  # made once, for the three still waiting
        assert not service._in_flight  # noqa: SLF001


@pytest.mark.anyio
async def test_an_earlier_deadline_does_not_fail_a_later_request(make_settings):
    """Under one request timeout the first request has the earliest deadline: when the shared generation was
    its own, its 504 cancelled the model job and the next identical request, with time left, got a 504 too."""
    async with serving(make_settings(test_model_delay_s=0.4)) as (service, client):
        params = service.resolve("a patient blue pentagon", "sg-lora", 9, None, None)
        loop = asyncio.get_running_loop()

        async def within(seconds: float):
            REQUEST_DEADLINE.set(Deadline(loop.time() + seconds))
            return await service.generate(params)

        first = asyncio.create_task(within(0.2))
        await until(lambda: service._in_flight)  # noqa: SLF001
        later = asyncio.create_task(within(5.0))
        with pytest.raises(WorkerTimeout):
            await first
        lora = await later
        assert lora.cache == "hit"  # the LoRA of the generation the first request began
        metrics = (await client.get("/metrics")).text
        assert metric_sum(metrics, "sglora_rejected_total", reason="timeout") == 1
        assert metric_sum(metrics, "sglora_generations_shared_total") == 1


@pytest.mark.anyio
async def test_when_every_request_has_left_the_shared_generation_is_cancelled(make_settings):
    async with serving(make_settings(test_model_delay_s=0.3)) as (service, client):
        params = service.resolve("an abandoned grey square", "sg-lora", 4, None, None)
        waiting = [asyncio.create_task(service.generate(params)) for _ in range(2)]
        await until(lambda: service._in_flight)  # noqa: SLF001
        task = next(iter(service._in_flight.values())).task  # noqa: SLF001
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and not service._in_flight  # noqa: SLF001
        lora = await service.generate(params)  # a new request starts afresh
        assert lora.cache == "miss"


@pytest.mark.anyio
async def test_a_request_arriving_as_the_last_one_leaves_starts_afresh(make_settings):
    """The last request to leave cancels the shared lookup; an identical one arriving before the cancelled
    task had finished joined it, and its CancelledError was answered as the service stopping (a 503)."""
    async with serving(make_settings(test_model_delay_s=0.3)) as (service, client):
        params = service.resolve("a hurried orange ring", "sg-lora", 42, None, None)
        leaving = asyncio.create_task(service.generate(params))
        await until(lambda: service._in_flight)  # noqa: SLF001
        cancelled = next(iter(service._in_flight.values())).task  # noqa: SLF001
        leaving.cancel()  # its client hung up
        await asyncio.sleep(0)  # its finally ran: nobody waits, the lookup is cancelled
        lora = await service.generate(params)  # in the same turn of the loop as the cancellation
        assert lora.cache == "miss" and cancelled.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert not service._in_flight  # noqa: SLF001


@pytest.mark.anyio
async def test_a_request_waits_no_longer_than_its_own_deadline_and_counts_its_cache_event(make_settings):
    async with serving(make_settings(test_model_delay_s=0.6)) as (service, client):
        params = service.resolve("a slow purple triangle", "sg-lora", 5, None, None)
        before = (await client.get("/metrics")).text
        first = asyncio.create_task(service.generate(params))
        await until(lambda: service._in_flight)  # noqa: SLF001

        async def impatient():
            REQUEST_DEADLINE.set(Deadline(asyncio.get_running_loop().time() + 0.1))
            return await service.generate(params)

        with pytest.raises(WorkerTimeout):
            await impatient()
        lora = await first  # its timeout left the generation running
        assert lora.cache == "miss"
        after = (await client.get("/metrics")).text
        assert metric_sum(after, "sglora_rejected_total", reason="timeout") == 1
        assert metric_sum(after, "sglora_generations_shared_total") == 0
        events = sum(
            metric_sum(after, "sglora_cache_events_total", result=r) - metric_sum(before, "sglora_cache_events_total", result=r)
            for r in ("hit", "miss", "error")
        )
        assert events == 2  # one per request: the lookup's miss, and the 504's


@pytest.mark.anyio
async def test_with_the_cache_off_a_shared_generation_is_a_miss_for_every_request(make_settings):
    async with serving(make_settings(redis_url="", test_model_delay_s=0.2)) as (_, client):
        before = await made(client)
        answers = await asyncio.gather(
            *(client.post("/generate", json={"description": "an uncached ring", "seed": 1}) for _ in range(3))
        )
        assert [r.headers["x-cache"] for r in answers] == ["miss"] * 3 and len({r.content for r in answers}) == 1
        assert await made(client) - before == 1
        metrics = (await client.get("/metrics")).text
        assert metric_sum(metrics, "sglora_generations_shared_total") == 2
        assert metric_sum(metrics, "sglora_cache_events_total", result="hit") == 0
        assert metric_sum(metrics, "sglora_cache_memory_hits_total") == 0


@pytest.mark.anyio
async def test_concurrent_requests_for_an_etag_whose_file_left_are_made_once(make_settings):
    from app.cache import BytesLRU

    async with serving(make_settings(redis_url="", test_model_delay_s=0.3)) as (service, client):
        r = await client.post("/generate", json={"description": "a forgotten octagon", "seed": 2})
        assert r.status_code == 200
        etag = r.headers["etag"].strip('"')
        service.lru = BytesLRU(0)  # the file has left the process (the cache is off: nowhere else holds it)
        before = await made(client)
        found = await asyncio.gather(*(service.adapter(etag) for _ in range(4)))
        assert all(a.data == r.content for a in found)
        assert await made(client) - before == 1


@pytest.mark.anyio
async def test_under_one_request_timeout_a_later_identical_request_is_answered(make_settings):
    """SGLORA_REQUEST_TIMEOUT_S is everyone's: the shared generation must not stop at the first request's
    deadline (the worker's own timeout), or the later request, with time left, gets the same 504."""
    async with serving(make_settings(test_model_delay_s=1.0, request_timeout_s=1.6)) as (service, client):
        gate, blocker = block_worker(service.worker)  # the model thread busy for the first second
        gate.set()
        body = {"description": "a popular indigo spiral", "seed": 46}
        first = asyncio.create_task(client.post("/generate", json=body))
        await asyncio.sleep(0.8)
        second = asyncio.create_task(client.post("/generate", json=body))
        r1, r2 = await first, await second
        await blocker
        assert r1.status_code == 504  # its LoRA is ready at about 2 s, past its deadline
        assert r2.status_code == 200 and r2.headers["x-cache"] == "hit", r2.text

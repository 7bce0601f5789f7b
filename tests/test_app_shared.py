"""Identical requests in flight share one generation (no cache stampede), and a shared one that fails leaves
the others to try by themselves."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.worker import REQUEST_DEADLINE, Deadline, WorkerTimeout
from tests.app_helpers import serving, until


def counter(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def made(client) -> float:
    """LoRA files made on the model threads so far (one serialisation each)."""
    return counter((await client.get("/metrics")).text, "sglora_stage_duration_seconds_count", stage="serialisation")


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
        assert counter(metrics, "sglora_generations_shared_total") == 7
        assert counter(metrics, "sglora_cache_memory_hits_total") >= 7  # no Redis asked: out of the degraded alert


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
async def test_a_follower_whose_shared_request_went_away_generates_by_itself(make_settings):
    async with serving(make_settings(test_model_delay_s=0.3)) as (service, _):
        params = service.resolve("a lone yellow star", "sg-lora", 11, None, None)
        leader = asyncio.create_task(service.generate(params))
        await until(lambda: service._in_flight)  # noqa: SLF001 - the leader's lookup is in flight
        follower = asyncio.create_task(service.generate(params))
        await asyncio.sleep(0.05)  # the follower waits for the leader
        leader.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await leader
        lora = await follower
        assert lora.cache == "miss"  # made for itself, not lost with the leader
        again = await service.generate(params)
        assert again.cache == "hit" and again.data == lora.data
        assert not service._in_flight  # noqa: SLF001


@pytest.mark.anyio
async def test_a_follower_waits_no_longer_than_its_own_deadline(make_settings):
    async with serving(make_settings(test_model_delay_s=0.6)) as (service, client):
        params = service.resolve("a slow purple triangle", "sg-lora", 5, None, None)
        leader = asyncio.create_task(service.generate(params))
        await until(lambda: service._in_flight)  # noqa: SLF001

        async def impatient():
            REQUEST_DEADLINE.set(Deadline(asyncio.get_running_loop().time() + 0.1))
            return await service.generate(params)

        with pytest.raises(WorkerTimeout):
            await impatient()
        lora = await leader  # the follower's timeout left the leader running
        assert lora.cache == "miss"
        metrics = (await client.get("/metrics")).text
        assert counter(metrics, "sglora_rejected_total", reason="timeout") == 1
        assert counter(metrics, "sglora_generations_shared_total") == 0


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

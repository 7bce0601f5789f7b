"""The Redis cache fails open: Redis stopped or silent, /generate still answers; it is used again once back."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import threading
import time

import redis
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import TimeoutError as RedisTimeout

from app import cache as cache_module
from app.cache import BytesLRU, CacheKey, HotKeys, RedisCache
from app.main import create_app
from app.metrics import Metrics


def _red_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    return buf.getvalue()


RED_PNG = _red_png()


def _ready_redis(client) -> tuple[str, str | None]:
    """/ready's ``redis`` and ``redis_problem``."""
    ready = client.get("/ready").json()
    return ready["redis"], ready["redis_problem"]


def _assert_cached_after_a_miss(client, body: dict) -> None:
    """``body`` is generated (a miss), written to Redis, and then served from it (a hit)."""
    cache = client.app.state.service.cache
    assert client.post("/generate", json=body).headers["x-cache"] == "miss"
    assert wait_for(lambda: not cache._writing)
    assert client.post("/generate", json=body).headers["x-cache"] == "hit"


def samples(client) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def cache_events(client, result: str) -> float:
    return samples(client)[("sglora_cache_events_total", (("result", result),))]


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_fail_open_when_redis_stops_and_recovery_when_it_returns(private_redis, make_settings):
    # Without the hot keys, whose repeats would not ask Redis at all (test_hot_keys_...).
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=0.2, redis_backoff_s=0.3, hot_keys=0)
    body = {"description": "a red circle", "seed": 1}
    with TestClient(create_app(settings)) as c:
        first = c.post("/generate", json=body)
        assert first.headers["x-cache"] == "miss"
        assert c.post("/generate", json=body).headers["x-cache"] == "hit"
        assert c.get("/ready").json()["redis"] == "ok"
        errors_before = cache_events(c, "error")

        private_redis.stop()
        for _ in range(3):  # the first fails fast (connection refused), the next skip Redis (back-off)
            r = c.post("/generate", json=body)
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"
            assert r.content == first.content
        assert cache_events(c, "error") >= errors_before + 3
        assert sum(v for (name, _), v in samples(c).items() if name == "sglora_redis_errors_total") >= 1
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json()["redis"] == "degraded"

        private_redis.start()  # same port, empty (no persistence)
        assert wait_for(lambda: c.get("/ready").json()["redis"] == "ok")
        assert c.post("/generate", json=body).headers["x-cache"] == "miss"
        again = c.post("/generate", json=body)
        assert again.headers["x-cache"] == "hit" and again.content == first.content


def test_silent_redis_costs_one_short_timeout(make_settings):
    """A Redis that accepts connections but never answers (hung, or a black-holed network)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    conns = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        port = server.getsockname()[1]
        settings = make_settings(
            redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2, redis_backoff_s=30, redis_backoff_min_s=30, hot_keys=0
        )
        with TestClient(create_app(settings)) as c:  # start-up pings Redis too: it must not hang
            t0 = time.perf_counter()
            ready = c.get("/ready")  # a live call into the silent Redis: bounded by the socket timeout
            assert time.perf_counter() - t0 < 5.0  # a bound against a hang (25x the timeout), not a speed target
            assert ready.status_code == 200 and ready.json()["redis"] == "degraded"
            tried = _redis_errors(c)
            results = []
            for _ in range(2):  # inside the back-off: Redis is not even tried
                results.append(c.post("/generate", json={"description": "a square", "seed": 2}))
            assert _redis_errors(c) == tried  # no call into Redis failed: none was made
            assert [r.status_code for r in results] == [200, 200] and results[0].content == results[1].content
            assert [r.headers["x-cache"] for r in results] == ["miss", "miss"]
            assert cache_events(c, "error") == 2
    finally:
        stop.set()
        t.join()
        for conn in conns:
            conn.close()
        server.close()


def test_cache_key_covers_every_input():
    base = CacheKey("v1", "a cat", "sg-lora", 1, 3, 0.1)
    variants = [
        CacheKey("v2", "a cat", "sg-lora", 1, 3, 0.1),
        CacheKey("v1", "a dog", "sg-lora", 1, 3, 0.1),
        CacheKey("v1", "a cat", "topk-weighted", 1, 3, 0.1),
        CacheKey("v1", "a cat", "sg-lora", 2, 3, 0.1),
        CacheKey("v1", "a cat", "sg-lora", None, 3, 0.1),
        CacheKey("v1", "a cat", "sg-lora", 1, 2, 0.1),
        CacheKey("v1", "a cat", "sg-lora", 1, 3, 0.2),
    ]
    digests = {v.digest() for v in variants}
    assert base.digest() == CacheKey("v1", "a cat", "sg-lora", 1, 3, 0.1).digest()
    assert base.digest() not in digests and len(digests) == len(variants)


def test_lru_is_bounded_by_bytes():
    lru = BytesLRU(10)
    lru.put("a", b"1234")
    lru.put("b", b"1234")
    assert lru.get("a") == b"1234"  # a is now the most recent
    lru.put("c", b"1234")  # evicts b
    assert lru.get("b") is None and lru.get("a") and lru.get("c") and len(lru) == 2
    lru.put("huge", b"x" * 11)
    assert lru.get("huge") is None


def test_writes_go_behind_the_response_and_land_in_redis(make_settings):
    settings = make_settings()
    body = {"description": "a blue star", "seed": 4}
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        first = c.post("/generate", json=body)
        again = c.post("/generate", json=body)  # from memory while the write is in flight, else from Redis
        assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
        assert again.content == first.content
        assert wait_for(lambda: not cache._writing)
        etag = first.headers["etag"].strip('"')
        r = redis.Redis.from_url(settings.redis_url)
        pointer = r.get(settings.cache_prefix + "etag:" + etag)  # the ETag entry points at the gen: entry
        assert pointer.startswith(b"->gen:") and len(pointer) < 100  # as earlier releases read it
        request = r.get(settings.cache_prefix + "req:" + etag)  # beside it, the request that made it
        assert json.loads(request) == {**body, "method": "sg-lora", "top_k": None, "temperature": 0.1}
        assert r.get(settings.cache_prefix + pointer[2:].decode()) == first.content
        # /retrieve by ETag follows the pointer once the in-process LRU no longer has it.
        service = c.app.state.service
        service.lru = BytesLRU(0)
        found = c.portal.call(service.adapter, etag)
        assert found.data == first.content and found.etag == etag


def test_an_etag_whose_file_left_the_cache_is_made_again_from_its_request(make_settings):
    """Under allkeys-lru or a TTL the file's entry can go while its ETag pointer stays: /retrieve by that
    ETag was a 404. The pointer records the request, so the file is generated again (the same bytes, filed
    again); a request that no longer gives those bytes, or is not one the service takes, is still a 404."""
    settings = make_settings(hot_keys=0)
    body = {"description": "a lost hexagon", "seed": 3}
    images = [("images", ("a.png", RED_PNG, "image/png"))]
    with TestClient(create_app(settings)) as c:
        service = c.app.state.service
        made = c.post("/generate", json=body)
        etag = made.headers["etag"].strip('"')
        assert wait_for(lambda: not service.cache._writing)
        r = redis.Redis.from_url(settings.redis_url)
        request_key = settings.cache_prefix + "req:" + etag
        file_key = settings.cache_prefix + r.get(settings.cache_prefix + "etag:" + etag)[2:].decode()
        assert r.delete(file_key) == 1  # evicted; the pointer stays
        service.lru = BytesLRU(0)  # and this process no longer holds it
        service._requests.clear()  # nor its request, as on another replica: Redis's req: entry makes it again
        again = c.post("/retrieve", data={"etag": etag}, files=images)
        assert again.status_code == 200, again.text
        assert wait_for(lambda: r.get(file_key) == made.content)  # generated again, byte for byte, and filed again
        for request in (
            json.dumps({**body, "seed": 4}).encode(),  # other bytes: another ETag
            b'{"description": "a lost hexagon", "method": "no-such-method"}',
            b"not json",
            None,  # as before releases recorded the request
        ):
            r.delete(file_key)
            r.set(request_key, request) if request is not None else r.delete(request_key)
            service._requests.clear()  # as on another replica: only Redis has the request
            gone = c.post("/retrieve", data={"etag": etag}, files=images)
            assert gone.status_code == 404 and gone.json()["detail"]["field"] == "etag", (request, gone.text)
        # Both requests known (this process's and Redis's), neither giving these bytes: one generation, not two.
        from app.service import GenerateParams

        r.delete(file_key)
        r.set(request_key, json.dumps({**body, "seed": 4}))
        service._requests[etag] = GenerateParams(body["description"], "sg-lora", 4, None, 0.1)

        def lookups() -> float:  # the seed-4 LoRA was made above: a hit now, but one lookup each time
            return cache_events(c, "miss") + cache_events(c, "hit")

        before = lookups()
        gone = c.post("/retrieve", data={"etag": etag}, files=images)
        assert gone.status_code == 404 and lookups() == before + 1


def test_with_the_cache_off_an_etag_this_process_handed_out_is_made_again(make_settings):
    """SGLORA_REDIS_URL empty: an ETag lived only while the bytes-bounded LRU held its file (a few hundred
    ViT-B/16 LoRAs), then /retrieve by it was a 404. The process remembers the request of each ETag it hands
    out and makes the file again; an ETag it never handed out is still a 404."""
    images = [("images", ("a.png", RED_PNG, "image/png"))]
    with TestClient(create_app(make_settings(redis_url=""))) as c:
        service = c.app.state.service
        made = c.post("/generate", json={"description": "a forgotten hexagon"})  # unseeded: the drawn seed is kept
        assert made.status_code == 200
        service.lru = BytesLRU(0)  # the file has left the process
        again = c.post("/retrieve", data={"etag": made.headers["etag"]}, files=images)
        assert again.status_code == 200, again.text
        found = c.portal.call(service.adapter, made.headers["etag"])
        assert found.data == made.content
        unknown = c.post("/retrieve", data={"etag": "0" * 32}, files=images)
        assert unknown.status_code == 404 and unknown.json()["detail"]["field"] == "etag"


def test_retrieve_by_an_etag_whose_entry_is_not_this_services_lora_is_a_404(make_settings):
    """The etag: keys carry no artefact version: another deployment sharing the Redis prefix (or a damaged
    entry) can leave bytes under a valid ETag that are not a LoRA this service can apply. A 404 naming
    ``etag``, not the 500 of the failed parse."""
    import torch
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from app.service import etag_of
    from sglora.io import safetensors_metadata

    settings = make_settings()
    with TestClient(create_app(settings)) as c:
        made = c.post("/generate", json={"description": "a green ring", "seed": 2})
        assert made.status_code == 200
        tensors = load_safetensors(made.content)
        metadata = safetensors_metadata(made.content)
        other_rank = {k: torch.cat([t, t], dim=0 if "lora_A" in k else 1) for k, t in tensors.items()}  # rank 2r
        planted = {  # why: (bytes, what the reason names)
            "not safetensors": (b"not a safetensors file at all", "not a LoRA of this service"),
            "another layout": (save_safetensors(other_rank, metadata), "not a LoRA of this service"),
            "another format": (save_safetensors(tensors, {**metadata, "format": "pt"}), "its format is 'pt'"),
            # Same shapes, another model: the activation, the tower's depth or its patch size.
            "another activation": (
                save_safetensors(tensors, {**metadata, "activation": "quick_gelu"}),
                "MLPs use quick_gelu, this backbone's use gelu",
            ),
            "another tower": (
                save_safetensors(tensors, {**metadata, "visual_tower": '{"layers": 12, "patch_size": [8, 8]}'}),
                "with 12 blocks",
            ),
        }
        r = redis.Redis.from_url(settings.redis_url)
        for why, (data, named) in planted.items():
            r.set(settings.cache_prefix + "etag:" + etag_of(data), data)
            got = c.post("/retrieve", data={"etag": etag_of(data)}, files={"images": ("a.png", RED_PNG, "image/png")})
            assert got.status_code == 404 and got.json()["detail"]["field"] == "etag", (why, got.text)
            reason = got.json()["detail"]["reason"]
            assert "not a LoRA of this service" in reason and named in reason, (why, reason)
        # The service's own entry, found in Redis alone, is still applied.
        c.app.state.service.lru = BytesLRU(0)
        assert wait_for(lambda: not c.app.state.service.cache._writing)
        own = c.post("/retrieve", data={"etag": made.headers["etag"]}, files={"images": ("a.png", RED_PNG, "image/png")})
        assert own.status_code == 200, own.text


def test_cache_key_names_the_code_version(monkeypatch):
    import app.cache as cache_module

    before = CacheKey("v1", "a cat", "sg-lora", 1, 4, 0.1).digest()
    assert CacheKey("v1", "a cat", "sg-lora", 1, 4, 0.1).digest() == before
    monkeypatch.setattr(cache_module, "__version__", cache_module.__version__ + ".next")
    assert CacheKey("v1", "a cat", "sg-lora", 1, 4, 0.1).digest() != before


def test_with_the_cache_off_a_lookup_is_a_miss_not_an_error(make_settings):
    """SGLORA_REDIS_URL empty: nothing is stored, so nothing is found; counting errors would keep the
    cache-degraded alert (deploy/alerts.yml) firing for a service configured without a cache."""
    with TestClient(create_app(make_settings(redis_url=""))) as c:
        assert c.get("/ready").json()["redis"] == "disabled"
        for _ in range(2):
            r = c.post("/generate", json={"description": "a red circle", "seed": 1})
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"
        assert (cache_events(c, "miss"), cache_events(c, "error"), cache_events(c, "hit")) == (2, 0, 0)


def test_every_key_the_cache_writes_expires_after_the_ttl(make_settings):
    """SGLORA_CACHE_TTL_S bounds every entry: the file, its ETag pointer and its request (a key written
    without it would stay until Redis's memory policy evicts it)."""
    settings = make_settings(cache_ttl_s=777)
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        assert c.post("/generate", json={"description": "a timed circle", "seed": 2}).status_code == 200
        assert c.post("/generate/batch", json={"items": [{"description": "a timed square", "seed": 1}]}).status_code == 200
        assert wait_for(lambda: not cache._writing)
        r = redis.Redis.from_url(settings.redis_url)
        keys = list(r.scan_iter(match=settings.cache_prefix + "*"))
        kinds = {k.decode()[len(settings.cache_prefix) :].split(":")[0] for k in keys}
        assert {"gen", "etag", "req"} <= kinds, kinds
        ttls = [r.ttl(k) for k in keys]
        assert all(700 < t <= 777 for t in ttls), ttls


def test_a_value_that_is_not_a_whole_lora_file_is_regenerated_and_overwritten(make_settings):
    """A foreign or damaged value under a cache key (a shared Redis, a truncated write) costs a miss, counted as a
    cache error, and the fresh file replaces it; it is never served and never a 500."""
    settings = make_settings(hot_keys=0)  # else a repeat never reads Redis
    body = {"description": "a green hexagon", "seed": 5}
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        good = c.post("/generate", json=body)
        assert good.headers["x-cache"] == "miss" and wait_for(lambda: not cache._writing)
        r = redis.Redis.from_url(settings.redis_url)
        pointer = r.get(settings.cache_prefix + "etag:" + good.headers["etag"].strip('"'))
        key = settings.cache_prefix + pointer[2:].decode()
        # Whole safetensors files that are not this request's LoRA: an empty one (it was served as a 10-byte
        # hit, and /generate/preview failed with a 500 on its missing top_k), and another request's file.
        empty = b"\x02\0\0\0\0\0\0\0{}"
        other = c.post("/generate", json={**body, "description": "a red hexagon"}).content
        # and the same description's file of another seed, top_k or temperature (another seed's was served as
        # this seed's, X-Seed and metadata naming the other)
        others = [
            c.post("/generate", json={**body, **change}).content for change in ({"seed": 6}, {"top_k": 2}, {"temperature": 0.5})
        ]
        for bad in (b"not a safetensors file", good.content[:-5], good.content + b"\0", empty, other, *others):
            r.set(key, bad)
            errors = cache_events(c, "error")
            again = c.post("/generate", json=body)
            assert again.status_code == 200 and again.headers["x-cache"] == "miss"
            assert again.content == good.content and cache_events(c, "error") == errors + 1
            preview = c.post("/generate/preview", json=body)
            assert preview.status_code == 200, preview.text
            assert wait_for(lambda: r.get(key) == good.content)  # overwritten by the fresh file


def test_requests_without_a_seed_skip_the_cache_and_count_as_errors_while_redis_is_out(private_redis, make_settings):
    """A sampling request without a seed is never looked up (it asks for a new sample): `skip`, outside the
    hit ratio. While Redis fails (its back-off) such a request could not have used the cache either:
    `error`, so that an outage moves the SGLoRACacheDegraded ratio even when no client sends seeds."""
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=0.2, redis_backoff_s=30, redis_backoff_min_s=30)
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        before = {r: cache_events(c, r) for r in ("hit", "miss", "error", "skip")}
        assert c.post("/generate", json={"description": "a red circle"}).status_code == 200
        assert cache_events(c, "skip") == before["skip"] + 1 and cache_events(c, "miss") == before["miss"]
        assert wait_for(lambda: not cache._writing)
        private_redis.stop()
        c.post("/generate", json={"description": "a red circle", "seed": 9})  # fails: Redis is in its back-off now
        errors = cache_events(c, "error")
        for _ in range(3):
            assert c.post("/generate", json={"description": "a red circle"}).status_code == 200
        assert cache_events(c, "error") == errors + 3 and cache_events(c, "skip") == before["skip"] + 1
        private_redis.start()


class FakeRedis:
    """Answers ``get`` or raises, as the test says; with a ``gate``, only once the gate opens (a call in flight)."""

    def __init__(self):
        self.fail = False
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def get(self, key):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.fail, Exception):
            raise self.fail
        if self.fail:
            raise RedisTimeout("Timeout reading from socket")
        return b"v"


def test_the_back_off_doubles_with_each_failed_retry_and_a_success_resets_it(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: now[0])
    cache = RedisCache("redis://127.0.0.1:1/0", 60, "t:", 0.2, backoff_s=5.0, metrics=Metrics(), backoff_min_s=0.5)
    fake = cache._client = FakeRedis()

    def get():
        return asyncio.run(cache.get("k"))

    def skipped_for() -> float:
        """How long the cache now skips Redis, to the nearest 10 ms."""
        start, calls = now[0], fake.calls
        while not cache.available():
            now[0] += 0.01
        period = round(now[0] - start, 2)
        assert fake.calls == calls  # nothing was tried meanwhile
        return period

    assert get() == (b"v", True)
    fake.fail = True
    periods = []
    for _ in range(6):
        assert get() == (None, False)
        periods.append(skipped_for())
    assert periods == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]

    fake.fail = False
    assert get() == (b"v", True)
    fake.fail = True
    assert get() == (None, False)
    assert skipped_for() == 0.5  # the success reset it
    assert get() == (None, False)
    assert skipped_for() == 1.0
    fake.fail = False
    assert get() == (b"v", True)

    async def scenario() -> list[float]:
        """A call begun before the cache trips fails after the period is over (under load it waited for a
        connection, then for its answer): it neither begins a period nor doubles the next one."""
        fake.fail = True
        first_gate = asyncio.Event()
        fake.gate = first_gate
        slow = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)  # begun, waiting at its gate
        fake.gate = None
        now[0] += 0.05
        assert await cache.get("k") == (None, False)  # fails at once: the cache trips
        periods = [round(cache._outages.until - now[0], 2)]
        now[0] += 0.6  # the period is over when the slow call fails
        first_gate.set()
        assert await slow == (None, False)
        assert cache.available()  # it did not begin a period
        assert await cache.get("k") == (None, False)  # the first retry
        periods.append(round(cache._outages.until - now[0], 2))
        return periods

    assert asyncio.run(scenario()) == [0.5, 1.0]
    errors = sum(s.value for f in cache.metrics.registry.collect() for s in f.samples if s.name == "sglora_redis_errors_total")
    assert errors == 11  # every failure counts, the slow call's too


def test_a_lone_slow_call_skips_the_cache_briefly(private_redis, make_settings):
    """Redis stalls past the timeout once (CLIENT PAUSE: the server holds every client's commands), then
    answers again. Hits resume after the short first period, not after the 30 s longest one."""
    settings = make_settings(
        redis_url=private_redis.url, redis_timeout_s=0.2, redis_backoff_s=30, redis_backoff_min_s=0.3, hot_keys=0
    )
    body = {"description": "a brief stall", "seed": 3}
    with TestClient(create_app(settings)) as c:
        _assert_cached_after_a_miss(c, body)
        errors = cache_events(c, "error")
        admin = redis.Redis.from_url(private_redis.url)
        admin.execute_command("CLIENT", "PAUSE", 600, "ALL")
        try:
            stalled = c.post("/generate", json=body)
        finally:
            admin.close()
        assert stalled.status_code == 200 and stalled.headers["x-cache"] == "miss"
        assert cache_events(c, "error") == errors + 1
        assert wait_for(lambda: c.post("/generate", json=body).headers["x-cache"] == "hit", timeout=10.0)


def memory_hits(client) -> float:
    return samples(client)[("sglora_cache_memory_hits_total", ())]


def test_hot_keys_answer_repeats_from_memory_without_redis(private_redis, make_settings):
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=0.2)
    body = {"description": "a hot key", "seed": 4}
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        redis_gets = []
        real_get = cache.get

        async def counted_get(key):
            redis_gets.append(key)
            return await real_get(key)

        cache.get = counted_get
        first = c.post("/generate", json=body)
        assert first.headers["x-cache"] == "miss" and len(redis_gets) == 1
        hits = cache_events(c, "hit")
        again = c.post("/generate", json=body)
        assert again.headers["x-cache"] == "hit" and len(redis_gets) == 1  # Redis was not asked
        assert again.content == first.content
        for name in ("etag", "x-seed", "x-experts", "x-artifact-version"):
            assert again.headers[name] == first.headers[name]
        assert cache_events(c, "hit") == hits + 1 and memory_hits(c) == 1
        gauges = samples(c)
        assert gauges[("sglora_hot_keys", ())] == 1 and gauges[("sglora_lora_memory_bytes", ())] == len(first.content)
        as_zip = c.post("/generate", json=body, headers={"Accept": "application/zip"})
        assert as_zip.headers["x-cache"] == "hit" and as_zip.content.startswith(b"PK") and len(redis_gets) == 1

        private_redis.stop()  # repeats this process has answered stay hits; anything new is a miss
        assert c.post("/generate", json=body).headers["x-cache"] == "hit"
        errors = cache_events(c, "error")
        new = c.post("/generate", json={**body, "seed": 5})
        assert new.status_code == 200 and new.headers["x-cache"] == "miss"
        assert cache_events(c, "error") == errors + 1
        private_redis.start()


def test_a_hit_from_redis_becomes_a_hot_key_and_the_lru_bounds_what_memory_answers(make_settings):
    body = {"description": "a shared key", "seed": 6}
    writer = make_settings()
    with TestClient(create_app(writer)) as c:
        made = c.post("/generate", json=body)
        assert made.headers["x-cache"] == "miss"
        assert wait_for(lambda: not c.app.state.service.cache._writing)
    # Another process on the same Redis: its first answer comes from Redis, the next from memory.
    with TestClient(create_app(make_settings(cache_prefix=writer.cache_prefix))) as c:
        assert c.post("/generate", json=body).headers["x-cache"] == "hit" and memory_hits(c) == 0
        again = c.post("/generate", json=body)
        assert again.headers["x-cache"] == "hit" and again.content == made.content and memory_hits(c) == 1
    # An LRU too small for a LoRA keeps no bytes: every repeat goes to Redis.
    with TestClient(create_app(make_settings(cache_prefix=writer.cache_prefix, lru_bytes=1024))) as c:
        for _ in range(2):
            assert c.post("/generate", json=body).headers["x-cache"] == "hit"
        assert memory_hits(c) == 0


def test_hot_keys_expire_and_are_bounded_by_count(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: now[0])
    hot = HotKeys(max_items=2, ttl_s=10)
    hot.put("a", "etag-a", {"seed": "1"})
    hot.put("b", "etag-b", {})
    assert hot.get("a") == ("etag-a", {"seed": "1"})  # "a" is now the most recent
    hot.put("c", "etag-c", {})
    assert hot.get("b") is None and len(hot) == 2
    now[0] = 9.99
    assert hot.get("a") is not None
    now[0] = 10.0
    assert hot.get("a") is None and hot.get("c") is None and len(hot) == 0
    off = HotKeys(max_items=0, ttl_s=10)
    off.put("a", "etag-a", {})
    assert off.get("a") is None


def test_requests_without_a_seed_do_not_push_repeats_out_of_the_hot_keys(make_settings):
    """A drawn seed is new to the client, so its key is hardly ever asked for again: it is not kept."""
    with TestClient(create_app(make_settings(hot_keys=1))) as c:
        body = {"description": "a kept key", "seed": 8}
        assert c.post("/generate", json=body).headers["x-cache"] == "miss"
        for _ in range(2):
            assert c.post("/generate", json={"description": "a new sample"}).headers["x-cache"] == "miss"
        assert c.post("/generate", json=body).headers["x-cache"] == "hit" and memory_hits(c) == 1


def test_a_key_of_another_type_is_mended_without_switching_the_cache_off(make_settings):
    """WRONGTYPE for one key (a foreign writer left a list there) was handled as a Redis outage: the back-off
    turned the cache off for every request, and the write that would mend the key was skipped with it."""
    settings = make_settings(hot_keys=0)
    body = {"description": "a listed hexagon", "seed": 5}
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        good = c.post("/generate", json=body)
        assert wait_for(lambda: not cache._writing)
        r = redis.Redis.from_url(settings.redis_url)
        pointer = r.get(settings.cache_prefix + "etag:" + good.headers["etag"].strip('"'))
        key = settings.cache_prefix + pointer[2:].decode()
        r.delete(key)
        r.rpush(key, b"x")
        errors = cache_events(c, "error")
        again = c.post("/generate", json=body)
        assert again.status_code == 200 and again.content == good.content and cache_events(c, "error") == errors + 1
        assert cache.available()  # no back-off: other keys are served from Redis meanwhile
        assert wait_for(lambda: r.type(key) == b"string" and r.get(key) == good.content)  # mended
        assert c.post("/generate", json=body).headers["x-cache"] == "hit"


def test_a_hit_from_redis_writes_its_etag_pointer_again(make_settings):
    """Under allkeys-lru the ETag pointer (read by /retrieve alone) can be evicted while the file, read by every
    repeat, stays: another replica then handed out an ETag that /retrieve answered with a 404."""
    writer = make_settings()
    body = {"description": "a pointed hexagon", "seed": 8}
    with TestClient(create_app(writer)) as c:
        made = c.post("/generate", json=body)
        assert wait_for(lambda: not c.app.state.service.cache._writing)
    r = redis.Redis.from_url(writer.redis_url)
    pointer = writer.cache_prefix + "etag:" + made.headers["etag"].strip('"')
    assert r.delete(pointer) == 1  # evicted
    with TestClient(create_app(make_settings(cache_prefix=writer.cache_prefix))) as c:
        assert c.post("/generate", json=body).headers["x-cache"] == "hit"
        assert wait_for(lambda: r.exists(pointer))
    with TestClient(create_app(make_settings(cache_prefix=writer.cache_prefix))) as c:  # a third replica
        found = c.post("/retrieve", data={"etag": made.headers["etag"]}, files=[("images", ("a.png", RED_PNG))])
        assert found.status_code == 200, found.text


def test_only_wrongtype_is_a_keys_problem_other_refusals_back_off_reads():
    """WRONGTYPE is the key's problem (no back-off, so the write that mends it runs); a refusal such as
    NOPERM holds for every key and backs reads off, else each request would try Redis in vain. Redis
    answered: writes, which it may well accept, go on."""
    cache = RedisCache("redis://127.0.0.1:1/0", 60, "t:", 0.2, backoff_s=5.0, metrics=Metrics(), backoff_min_s=0.5)
    fake = cache._client = FakeRedis()
    fake.fail = redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert asyncio.run(cache.get("k")) == (None, False) and cache.readable()
    fake.fail = redis.exceptions.NoPermissionError("NOPERM User has no permissions to run the 'get' command")
    assert asyncio.run(cache.get("k")) == (None, False) and not cache.readable()
    assert cache.available() and cache.writable() and cache.problem == "reads refused"


def test_refusals_met_together_begin_one_period(caplog):
    """Lookups in flight together, all refused: each began a period of its own and doubled the next, so one
    burst took the read back-off to its maximum at once, with a warning per lookup. The refusal that began
    the period stands for the others, as a failure does for calls timing out together."""
    cache = RedisCache("redis://127.0.0.1:1/0", 60, "t:", 0.2, backoff_s=5.0, metrics=Metrics(), backoff_min_s=0.5)
    fake = cache._client = FakeRedis()
    fake.fail = redis.exceptions.NoPermissionError("NOPERM User has no permissions to run the 'get' command")
    caplog.set_level(logging.WARNING, logger="sglora.cache")

    async def burst():
        fake.gate = asyncio.Event()
        calls = [asyncio.create_task(cache.get(f"k{i}")) for i in range(8)]
        while fake.calls < 8:
            await asyncio.sleep(0.001)
        fake.gate.set()
        return await asyncio.gather(*calls)

    assert asyncio.run(burst()) == [(None, False)] * 8
    assert re.findall(r"skipping reads for ([0-9.]+) s", caplog.text) == ["0.50"]
    assert cache.problem == "reads refused" and not cache.readable()
    assert cache.metrics.registry.get_sample_value("sglora_redis_errors_total", {"op": "get"}) == 8  # each counted


def _redis_errors(c) -> float:
    return sum(v for (name, _), v in samples(c).items() if name == "sglora_redis_errors_total")


def test_a_connection_redis_closed_while_idle_is_replaced_without_an_error(private_redis, make_settings):
    """Redis's idle `timeout`, a proxy or a restart closes pooled connections: the next call on one failed, was
    counted as an outage and switched the cache off for a back-off period, after every idle spell."""
    settings = make_settings(redis_url=private_redis.url, hot_keys=0)
    body = {"description": "an idle circle", "seed": 2}
    with TestClient(create_app(settings)) as c:
        _assert_cached_after_a_miss(c, body)
        errors, cache_errors = _redis_errors(c), cache_events(c, "error")
        admin = redis.Redis.from_url(private_redis.url)
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1  # the service's pooled connections
        for _ in range(2):
            assert c.post("/generate", json=body).headers["x-cache"] == "hit"
        assert (_redis_errors(c), cache_events(c, "error")) == (errors, cache_errors)
        assert c.app.state.service.cache.available()


def _alert_quotes(alert: str) -> list[str]:
    """The log phrases that ``alert``'s description in deploy/alerts.yml quotes, ("...")."""
    import yaml

    from app.processes import ROOT

    groups = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())["groups"]
    (rule,) = [r for g in groups for r in g["rules"] if r.get("alert") == alert]
    return re.findall(r'\("([^"]+)"\)', rule["annotations"]["description"])


def test_refused_writes_stop_writes_alone_and_show_in_ready(private_redis, make_settings, caplog):
    """Redis out of memory under noeviction (or a read-only replica) refuses writes but still answers reads: the
    entries it holds kept being hit only 3 times in 20, since a refused write switched the whole cache off."""
    settings = make_settings(redis_url=private_redis.url, hot_keys=0, redis_backoff_min_s=0.3, redis_backoff_s=0.6)
    held = {"description": "a held square", "seed": 1}
    caplog.set_level(logging.INFO, logger="sglora")
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        assert c.post("/generate", json=held).headers["x-cache"] == "miss"
        assert wait_for(lambda: not cache._writing)
        admin = redis.Redis.from_url(private_redis.url)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        for i in range(5):
            assert c.post("/generate", json={"description": f"a refused square {i}", "seed": 1}).headers["x-cache"] == "miss"
            assert wait_for(lambda: not cache._writing)
            assert c.post("/generate", json=held).headers["x-cache"] == "hit"  # reads go on
        refused = samples(c)[("sglora_redis_errors_total", (("op", "set"),))]
        assert refused >= 1 and samples(c)[("sglora_redis_errors_total", (("op", "get"),))] == 0
        # The alert on refused writes sends the operator to the log line that says which refusal: it must be there.
        (quoted,) = _alert_quotes("SGLoRACacheWritesFailing")
        assert quoted in caplog.text, (quoted, caplog.text[-2000:])
        assert c.get("/ready").json()["redis"] == "degraded"
        time.sleep(0.7)  # past the longest write back-off: Redis still refuses, /ready still says so
        assert cache.writable()
        assert _ready_redis(c) == ("degraded", "writes refused")
        admin.config_set("maxmemory", 0)
        assert _ready_redis(c) == ("ok", None) and cache.writable()  # its probe's write is accepted
        new = {"description": "a square written again", "seed": 1}
        _assert_cached_after_a_miss(c, new)


def test_hits_from_redis_rewrite_the_etag_pointer_once_a_minute(private_redis, make_settings):
    """With the hot keys off every hit from Redis wrote its ETag pointer again: twice Redis's calls under load.
    Once a minute still mends a pointer evicted while the file stayed, for the replica that made it too."""
    settings = make_settings(redis_url=private_redis.url, hot_keys=0)
    body = {"description": "a quiet hexagon", "seed": 6}
    admin = redis.Redis.from_url(private_redis.url)

    def sets() -> int:
        return int(admin.info("commandstats").get("cmdstat_set", {}).get("calls", 0))

    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        made = c.post("/generate", json=body)
        assert made.headers["x-cache"] == "miss"
        assert wait_for(lambda: not cache._writing)
        pointer = settings.cache_prefix + "etag:" + made.headers["etag"].strip('"')
        assert admin.delete(pointer) == 1  # evicted (allkeys-lru) while the file stayed
        before = sets()
        for _ in range(5):
            assert c.post("/generate", json=body).headers["x-cache"] == "hit"
        assert wait_for(lambda: not cache._writing)
        # mended by the first hit (the pointer and its request: two SETs), not rewritten by the rest
        assert sets() == before + 2 and admin.exists(pointer)
        etag = made.headers["etag"].strip('"')
        c.app.state.service._pointers[etag] -= 61  # a minute later
        assert c.post("/generate", json=body).headers["x-cache"] == "hit"
        assert wait_for(lambda: not cache._writing)
        assert sets() == before + 4


def test_write_behind_tasks_are_capped_and_the_rest_counted():
    cache = RedisCache("redis://127.0.0.1:1/0", 60, "t:", 0.2, backoff_s=5.0, metrics=Metrics(), max_connections=4)
    assert cache.max_writes == 2

    class Pipe:
        gate = asyncio.Event()

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def set(self, *a, **k):
            pass

        async def execute(self):
            await Pipe.gate.wait()

    class Client:
        def pipeline(self, transaction=False):
            return Pipe()

    cache._client = Client()

    async def scenario() -> tuple[int, bool]:
        Pipe.gate = asyncio.Event()
        for i in range(5):
            cache.set_behind({f"k{i}": b"v"})
        await asyncio.sleep(0)
        in_flight, kept = len(cache._writes), "k4" in cache._writing
        Pipe.gate.set()
        await asyncio.gather(*cache._writes)
        return in_flight, kept

    assert asyncio.run(scenario()) == (2, False)
    dropped = [
        s.value for f in cache.metrics.registry.collect() for s in f.samples if s.name == "sglora_cache_writes_dropped_total"
    ]
    assert dropped == [3.0]


def test_retrieve_by_etag_while_redis_is_out_is_a_503_not_a_404(private_redis, make_settings):
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=0.2)
    with TestClient(create_app(settings)) as c:
        made = c.post("/generate", json={"description": "an etag kept in redis", "seed": 3})
        assert wait_for(lambda: not c.app.state.service.cache._writing)
    private_redis.stop()
    with TestClient(
        create_app(make_settings(redis_url=private_redis.url, redis_timeout_s=0.2, cache_prefix=settings.cache_prefix))
    ) as c:
        r = c.post("/retrieve", data={"etag": made.headers["etag"]}, files=[("images", ("a.png", RED_PNG))])
        assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
        assert r.json()["detail"]["field"] == "etag" and "unreachable" in r.json()["detail"]["reason"]


def _acl_url(private_redis, user: str, *rules: str) -> str:
    admin = redis.Redis.from_url(private_redis.url)
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", *rules)
    return f"redis://{user}:pw@127.0.0.1:{private_redis.port}/0"


def test_refused_reads_show_in_ready_and_back_off_alone(private_redis, make_settings, caplog):
    """An ACL without GET (or limited to other keys): Redis answers, refusing every lookup. /ready said "ok"
    (a PING succeeded), and each write Redis accepted reset the shared back-off, so a lookup was tried and
    refused, with a warning, every 0.5 s whatever the back-off. Now reads back off alone, doubling up to
    SGLORA_REDIS_BACKOFF_S, and /ready names the refusal until reads work again."""
    settings = make_settings(hot_keys=0, redis_backoff_min_s=0.2, redis_backoff_s=5.0)
    settings = settings.model_copy(update={"redis_url": _acl_url(private_redis, "noget", "~*", "+@all", "-get")})
    caplog.set_level(logging.WARNING, logger="sglora.cache")
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.service.cache
        assert _ready_redis(c) == ("degraded", "reads refused")

        def periods() -> list[float]:
            return [float(m) for m in re.findall(r"skipping reads for ([0-9.]+) s", caplog.text)]

        end, i = time.monotonic() + 30, 0
        while len(periods()) < 4:  # the probe's refusal, then lookups, each written back (accepted)
            assert time.monotonic() < end, periods()
            r = c.post("/generate", json={"description": f"a refused read {i}", "seed": 1})
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"
            i += 1
            time.sleep(0.02)
        assert periods() == [0.2, 0.4, 0.8, 1.6]
        # The start-up's probe and /ready's began one or two of them (the second only where the start-up
        # took longer than the first period), lookups the rest.
        assert 2 <= samples(c)[("sglora_redis_errors_total", (("op", "get"),))] <= 3
        assert cache.available() and cache.writable() and not cache.readable()
        by_etag = c.post("/retrieve", data={"etag": "0" * 32}, files={"images": ("a.png", RED_PNG, "image/png")})
        assert by_etag.status_code == 503 and "refuses reads" in by_etag.json()["detail"]["reason"], by_etag.text
        redis.Redis.from_url(private_redis.url).execute_command("ACL", "SETUSER", "noget", "+get")
        assert _ready_redis(c) == ("ok", None) and cache.readable()  # its probe's read is accepted: reads resume at once
        body = {"description": "a read again", "seed": 1}
        _assert_cached_after_a_miss(c, body)


def test_an_acl_with_only_get_and_set_on_the_prefix_is_enough(private_redis, make_settings):
    """The cache needs GET and SET on its own keys and nothing else: an ACL made for it (no PING) gave a
    working cache that /ready called degraded, and each probe's failed PING began a back-off (18 % of
    lookups counted as errors with a probe every 3 s). Keys outside the prefix are refused, and said so."""
    settings = make_settings(hot_keys=0)
    url = _acl_url(private_redis, "cache", f"~{settings.cache_prefix}*", "+get", "+set")
    with TestClient(create_app(settings.model_copy(update={"redis_url": url}))) as c:
        assert _ready_redis(c) == ("ok", None)
        body = {"description": "an acl square", "seed": 1}
        _assert_cached_after_a_miss(c, body)
        assert c.get("/ready").json()["redis"] == "ok"
        assert _redis_errors(c) == 0
    url = _acl_url(private_redis, "elsewhere", "~other:*", "+get", "+set")
    with TestClient(create_app(settings.model_copy(update={"redis_url": url}))) as c:
        assert _ready_redis(c) == ("degraded", "reads and writes refused")
        assert c.post("/generate", json={"description": "an acl circle", "seed": 1}).status_code == 200
    # Another database than 0: redis-py selects it on connecting, which the ACL must allow (docs/service.md).
    url = _acl_url(private_redis, "cache", f"~{settings.cache_prefix}*", "+get", "+set").replace("/0", "/1")
    with TestClient(create_app(settings.model_copy(update={"redis_url": url}))) as c:
        assert _ready_redis(c) == ("degraded", "reads and writes refused")  # refused on connecting: a refusal, not an outage
        redis.Redis.from_url(private_redis.url).execute_command("ACL", "SETUSER", "cache", "+select")
        assert c.get("/ready").json()["redis"] == "ok"


def test_a_refused_login_is_named_in_ready(private_redis, make_settings):
    """A Redis that wants a password the URL lacks (or a wrong one) was reported as "unreachable", which
    points an operator at the network rather than at the credentials."""
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("requirepass", "secret")
    try:
        with TestClient(create_app(make_settings(redis_url=private_redis.url))) as c:
            assert _ready_redis(c) == ("degraded", "login refused")
            assert c.post("/generate", json={"description": "a locked square", "seed": 1}).status_code == 200
            admin.config_set("requirepass", "")
            assert c.get("/ready").json()["redis"] == "ok"
    finally:
        admin.config_set("requirepass", "")

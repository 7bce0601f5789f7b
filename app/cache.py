"""LoRA cache: Redis (``redis.asyncio``, binary values) that fails open, an in-process LRU by ETag, and
the hot keys (a repeated request answered from that LRU without asking Redis).

Writes go behind the response (``set_behind``): a miss is answered as soon as the LoRA is made, and
until its write lands the same key is answered from memory. Fail open: every Redis call has a short
connect/socket timeout and no retries; after an error the cache is skipped for a back-off period so a
dead Redis costs one timeout per period, not one per request. Requests keep being answered meanwhile
(generated anew, or from the hot keys); the next call after the period tries Redis again. The period
starts at ``backoff_min_s`` and doubles with each retry that fails, up to ``backoff_s``; a success
resets it. So a lone slow call (one timeout under a burst of load) costs the cache a short period, while
a dead Redis is soon tried only every ``backoff_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ConnectionError, RedisError, ResponseError

from app.metrics import Metrics
from sglora import __version__

log = logging.getLogger("sglora.cache")

# /ready writes and reads this key under the prefix (with the entries' TTL): whether the cache's own
# commands (GET, SET) on its own keys work, which PING does not tell. Apart from the gen:, req: and etag: entries.
PROBE_KEY = "ready-probe"


@dataclass(frozen=True)
class CacheKey:
    """Everything that fixes the bytes of a generated LoRA (format-independent: the zip is derived)."""

    version: str  # artefact version: changes with the manifest and the expert repository
    description: str  # normalised
    method: str
    seed: int | None  # None for the deterministic methods
    top_k: int
    temperature: float | None  # None: the method uses none
    text_dtype: str = "float32"  # the text tower's: bfloat16 embeddings differ in their last bits
    generator_dtype: str = ""  # the CVAE's, for the methods that sample ("" for the others)

    def digest(self) -> str:
        blob = json.dumps(
            # The code version too: a release may change the numerics (and so the bytes) of a generation.
            [
                __version__,
                self.version,
                self.description,
                self.method,
                self.seed,
                self.top_k,
                None if self.temperature is None else repr(float(self.temperature)),
                self.text_dtype,
                self.generator_dtype,
            ],
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def _outage(e: BaseException) -> str:
    """How /ready names a failed call: a login Redis refused (NOAUTH, WRONGPASS: redis-py's
    AuthenticationError, a ConnectionError) points at the credentials, not at the network."""
    return "login refused" if isinstance(e, AuthenticationError) else "unreachable"


class _BackOff:
    """Periods in which calls to Redis are skipped: each one begun lasts twice the last, from ``min_s`` up to
    ``max_s``, until a success starts them again from ``min_s``."""

    def __init__(self, min_s: float, max_s: float):
        self.min_s, self.max_s = min_s, max_s
        self.began = float("-inf")  # when the last period began
        self.until = 0.0  # calls are skipped until then
        self.next = min_s  # the length of the next period

    def skipping(self) -> bool:
        return time.monotonic() < self.until

    def begin(self) -> float:
        """Begins the next period now; returns its length."""
        now, period = time.monotonic(), self.next
        self.began, self.until = now, now + period
        self.next = min(2 * period, self.max_s)
        return period

    def end(self, started: float) -> bool:
        """A call begun at ``started`` succeeded: the period ends and the next starts again from ``min_s``.
        False (nothing changed) where the call began before the last period: it says nothing of Redis since."""
        if started < self.began:
            return False
        self.until, self.next = 0.0, self.min_s
        return True


class _Refusals(_BackOff):
    """Redis answering one kind of the cache's commands (``reads``: GET, ``writes``: SET) with a refusal: out
    of memory under noeviction, a read-only replica, an ACL without the command or limited to other keys.
    Such calls are skipped for back-off periods of their own; a call of this kind that Redis accepts ends
    them. Apart from the outage back-off: a refusal is Redis answering."""

    def __init__(self, kind: str, min_s: float, max_s: float, meanwhile: str = ""):
        super().__init__(min_s, max_s)
        self.kind, self.meanwhile = kind, meanwhile
        self.refused = False  # the last call of this kind that reached Redis was refused

    def refused_by(self, e: Exception, started: float) -> None:
        """A call begun at ``started`` was refused. One begun before the period's end (in flight when another's
        refusal began it, or a /ready probe, which ignores it) neither begins a period nor doubles the next."""
        self.refused = True
        if started < self.until:
            return
        period = self.begin()
        log.warning("redis refused %s (%s); skipping %s for %.2f s%s", self.kind, e, self.kind, period, self.meanwhile)

    def accepted(self, started: float) -> None:
        if not self.end(started):
            return
        if self.refused:
            log.info("redis accepts %s again", self.kind)
        self.refused = False


class RedisCache:
    """``get``/``set`` never raise: a failure is logged, counted and answered as 'not cached'."""

    def __init__(
        self,
        url: str,
        ttl_s: int,
        prefix: str,
        timeout_s: float,
        backoff_s: float,
        metrics: Metrics,
        max_connections: int = 128,
        backoff_min_s: float | None = None,
    ):
        self.url = url
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.backoff_s = backoff_s
        self.backoff_min_s = backoff_s if backoff_min_s is None else min(backoff_min_s, backoff_s)
        self.metrics = metrics
        self._outages = _BackOff(self.backoff_min_s, backoff_s)  # Redis failing: every call is skipped
        self._writing: dict[str, bytes] = {}  # values of write-behind sets still on their way to Redis
        self._writes: set[asyncio.Task] = set()
        # Write-behind tasks in flight at most: beyond, a write is dropped (counted), so that under load writes
        # never take every pooled connection from the lookups.
        self.max_writes = max(1, max_connections // 2)
        # Redis answering with refusals (see _Refusals): writes are skipped while it refuses writes, and reads
        # go on (the entries it holds are still good); reads likewise.
        self._read_refusals = _Refusals("reads", self.backoff_min_s, backoff_s)
        self._write_refusals = _Refusals("writes", self.backoff_min_s, backoff_s, ", reads go on")
        self.last_problem: str | None = None  # what the last /ready probe found (see problem)
        self._outage = "unreachable"  # what began the last outage back-off (see problem)
        self._client: Redis | None = None
        self._pool: BlockingConnectionPool | None = None
        if url:
            # A blocking pool: under load the calls queue for a connection (up to the timeout) instead of
            # failing with "Too many connections" past redis-py's default pool size, which would read as a
            # Redis outage and switch the cache off for a back-off period exactly when it helps most.
            self._pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout_s,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                # One retry, on a closed connection only: a pooled connection that Redis, a proxy or a restart
                # closed while it idled fails on its next use, and that is no outage. A timeout is not retried
                # (the default retries would multiply it).
                retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
                decode_responses=False,
                health_check_interval=0,
                # RESP2: under redis-py 8's RESP3 default its maintenance notifications ("auto") keep a pooled
                # connection from being checked for a close before use (one failure, one back-off, per idle spell).
                protocol=2,
            )
            self._client = Redis(connection_pool=self._pool)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def available(self) -> bool:
        """False when disabled or inside the back-off window after an error."""
        return self._client is not None and not self._outages.skipping()

    def readable(self) -> bool:
        """False when disabled, backing off, or while Redis refuses reads (see :meth:`get`)."""
        return self.available() and not self._read_refusals.skipping()

    def _failed(self, op: str, e: Exception, started: float) -> None:
        """A call begun at ``started`` failed. A call begun before the last period did (the calls in flight
        time out together, and under load a call may wait for a connection, then for its answer, past the
        period) only counts: the failure that began the period stands for it."""
        self.metrics.redis_errors.labels(op=op).inc()
        if started < self._outages.began:
            return
        period = self._outages.begin()
        self._outage = _outage(e)
        log.warning("redis %s failed (%s: %s); skipping the cache for %.2f s", op, type(e).__name__, e, period)

    def _succeeded(self, started: float) -> None:
        self._outages.end(started)  # a request's call began after its period anyway; a /ready probe's ends it early

    async def get(self, key: str) -> tuple[bytes | None, bool]:
        """-> (value or None, ok); ok is False when Redis failed or was skipped."""
        if key in self._writing:  # stored a moment ago, not yet in Redis
            return self._writing[key], True
        if not self.readable():
            return None, False
        assert self._client is not None
        started = time.monotonic()
        try:
            value = await self._client.get(self.prefix + key)
        except ResponseError as e:
            self.metrics.redis_errors.labels(op="get").inc()
            self._succeeded(started)  # Redis answered
            if not str(e).startswith("WRONGTYPE"):  # NOPERM and the like: every key's, until Redis is changed
                self._read_refusals.refused_by(e, started)
                return None, False
            # Redis answered, refusing this key (another writer left a list there): the key's problem, not
            # Redis's. Counted, not a back-off, which would also stop the write that mends it.
            log.warning("redis get %s refused (%s); the value will be written again", key, e)
            return None, False
        except (RedisError, OSError) as e:
            self._failed("get", e, started)
            return None, False
        self._succeeded(started)
        self._read_refusals.accepted(started)
        return value, True

    def reads_failing(self) -> bool:
        """Whether a lookup now would not be answered: an outage, or Redis refusing reads (also between
        two of its back-off periods, while the last read that reached it was refused)."""
        return self.enabled and (not self.readable() or self._read_refusals.refused)

    def writable(self) -> bool:
        """False when disabled, backing off, or while Redis refuses writes (see :meth:`set_many`)."""
        return self.available() and not self._write_refusals.skipping()

    async def set_many(self, items: dict[str, bytes]) -> bool:
        if not self.writable() or not items:
            return False
        assert self._client is not None
        started = time.monotonic()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for k, v in items.items():
                    pipe.set(self.prefix + k, v, ex=self.ttl_s)
                await pipe.execute()
        except ResponseError as e:
            # Redis answered, refusing the write (OOM under noeviction, READONLY, NOPERM): what it holds can
            # still be read, so only writes back off.
            self.metrics.redis_errors.labels(op="set").inc()
            self._succeeded(started)
            self._write_refusals.refused_by(e, started)
            return False
        except (RedisError, OSError) as e:
            self._failed("set", e, started)
            return False
        self._succeeded(started)
        self._write_refusals.accepted(started)
        return True

    def set_behind(self, items: dict[str, bytes]) -> None:
        """``set_many`` in a background task: the response need not wait for Redis. Until the write
        lands, ``get`` answers these keys from memory; ``close`` waits for the writes in flight. With
        :attr:`max_writes` in flight already, the write is dropped and counted."""
        if not self.writable() or not items:
            return
        if len(self._writes) >= self.max_writes:
            self.metrics.cache_writes_dropped.inc()
            return
        self._writing.update(items)

        async def write() -> None:
            try:
                await self.set_many(items)
            finally:
                for k, v in items.items():
                    if self._writing.get(k) is v:
                        del self._writing[k]

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def ping(self) -> str:
        """'ok', 'degraded' or 'disabled', from a write and a read of a probe key under the prefix (not PING:
        a reachable Redis can still refuse the cache's own commands or keys, and an ACL made for the cache
        need not allow PING). 'degraded': unreachable, or refusing reads or writes; :attr:`problem` then
        says which. The probe's outcome ends a back-off early, or begins one, as a request's would."""
        self.last_problem = None
        if self._client is None:
            return "disabled"
        started = time.monotonic()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self.prefix + PROBE_KEY, b"1", ex=self.ttl_s)
                pipe.get(self.prefix + PROBE_KEY)
                outcomes = await pipe.execute(raise_on_error=False)
        except ResponseError as e:  # refused before either command ran (SELECT, on connecting, by an ACL)
            outcomes = [e, e]
        except (RedisError, OSError) as e:
            self._failed("ping", e, started)
            self.last_problem = _outage(e)
            return "degraded"
        self._succeeded(started)
        if any(isinstance(outcome, ResponseError) for outcome in outcomes):
            self.metrics.redis_errors.labels(op="ping").inc()  # one probe, one count
        for refusals, outcome in zip((self._write_refusals, self._read_refusals), outcomes, strict=True):
            if isinstance(outcome, ResponseError):
                refusals.refused_by(outcome, started)
            else:
                refusals.accepted(started)
        self.last_problem = self.problem
        return "degraded" if self.last_problem else "ok"

    @property
    def problem(self) -> str | None:
        """What keeps the cache from working now, in words /ready can show (no Redis message: they name
        hosts and users): "unreachable", "login refused", "reads refused", "writes refused", "reads and writes
        refused"."""
        if self._client is None:
            return None
        if not self.available():
            return self._outage
        refused = [r.kind for r in (self._read_refusals, self._write_refusals) if r.refused]
        return " and ".join(refused) + " refused" if refused else None

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._client is not None:
            try:
                await self._client.aclose()
                if self._pool is not None:
                    await self._pool.disconnect()
            except (RedisError, OSError):
                pass


class BytesLRU:
    """Bounded by total bytes; most recently used last."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    def get(self, key: str) -> bytes | None:
        v = self._items.get(key)
        if v is not None:
            self._items.move_to_end(key)
        return v

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old)
        self._items[key] = value
        self._size += len(value)
        while self._size > self.max_bytes:
            _, v = self._items.popitem(last=False)
            self._size -= len(v)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        return self._size


class HotKeys:
    """Request key -> (ETag, file metadata) of the LoRAs this process generated or read from Redis lately.
    A repeated request whose bytes are still in the ETag LRU is answered from memory, without the Redis
    round trip, the file check and the hash of a Redis hit. Bounded by count (the bytes by the LRU's
    budget); an entry lives at most ``ttl_s`` from when it was stored here (after a Redis hit, that can
    outlast the Redis entry, whose remaining lifetime is not read)."""

    def __init__(self, max_items: int, ttl_s: float):
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[str, dict[str, str], float]] = OrderedDict()

    def get(self, key: str) -> tuple[str, dict[str, str]] | None:
        item = self._items.get(key)
        if item is None:
            return None
        etag, metadata, expires = item
        if time.monotonic() >= expires:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return etag, metadata

    def put(self, key: str, etag: str, metadata: dict[str, str]) -> None:
        if self.max_items <= 0:
            return
        self._items.pop(key, None)
        self._items[key] = (etag, metadata, time.monotonic() + self.ttl_s)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

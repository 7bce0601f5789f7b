"""The model worker: all torch work on dedicated model threads, text encodings micro-batched.

Requests never run torch on the event loop. ``model_threads`` threads share one copy of the weights
(on a CPU each runs torch ops with the process's intra-op threads, one by default, so N of them keep
N cores busy while every op keeps the shape, and so the rounding, it has alone). Two kinds of job
reach them:

* ``encode(text, job)``: queued on an asyncio queue; a batcher task takes whatever is queued
  (up to ``max_batch``), waiting up to ``batch_wait_ms`` for more only while the previous batch
  was not alone (no wait for a lone client), and runs ONE ``engine.embed(batch)`` call (identical
  descriptions encoded once; descriptions whose embedding is still in the :class:`EmbeddingCache`
  not at all) followed, in the same thread hop, by ONE ``finish(embeddings, jobs)``
  call over every item that has a job (prior, sampling, serialisation), whose results are handed to
  the event loop one by one as ``finish`` yields them. A batch starts when a model thread is free;
  while every thread is busy, new arrivals queue up and form the next batch: under load the batch
  size adapts to the arrival rate. An item that finds nothing queued, no batch being formed and a
  model thread idle goes to that thread at once (``_submit``), as the batcher would send it alone.
* ``run(fn)``: any other job (retrieval, expert registration). It runs alone: it waits for the
  running batches, and no batch starts until it is done.

Admission: at most ``max_queue`` jobs wait or run; beyond that :class:`Overloaded` (-> 429 with
Retry-After). A caller waits at most ``timeout_s`` (-> 504); a job whose caller gave up before it
started is skipped (a ``run`` job also stops waiting for the threads). A ``run(..., commit=True)`` job
(a change of state) that has begun is waited for to its end instead. ``drain`` stops admission and
waits for the accepted jobs (graceful shutdown); ``close`` answers what is still queued with
:class:`ShuttingDown`.
Running ``run`` jobs alone keeps expert registration apart from generation, so a generation never
sees a half-updated repository, and keeps two retrievals (which swap LoRA weights into the image
tower for one forward) apart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from app.metrics import Metrics
from sglora.devices import error_line, out_of_memory

T = TypeVar("T")
log = logging.getLogger("sglora.worker")


@dataclass
class Deadline:
    """The event-loop time by which a request's model waits must end, all of them together (a /retrieve by
    description waits for its LoRA, then for the retrieval); None until its body is read."""

    at: float | None = None


# Set per request by app/lifetime.py (a holder it fills once the body is read); None outside a request.
REQUEST_DEADLINE: ContextVar[Deadline | None] = ContextVar("sglora_request_deadline", default=None)
# The deadline of a job that several requests wait for (app/service.py: identical requests in flight): none of
# its own. Each request waits no longer than its own deadline, and the last to leave cancels the job.
UNBOUNDED = Deadline(math.inf)


class Overloaded(Exception):
    """The worker queue is full."""


class ShuttingDown(Exception):
    """The service is draining; no new jobs."""


class WorkerTimeout(Exception):
    """The job did not finish within the request timeout."""


@dataclass
class _Item:
    text: str
    job: Any  # handed to ``finish``; None: the caller wants the embedding itself
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class EmbeddingCache:
    """The text embeddings of recent descriptions (LRU by count), shared by the model threads.

    The text tower is frozen and its dtype fixed for the life of the process, so a description's
    embedding never changes; with batching on, the start-up check has found it bit-identical alone and
    in any batch, so a reused row is the row a fresh encoding would give."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, texts: list[str]) -> dict[str, torch.Tensor]:
        with self._lock:
            found = {t: self._items[t] for t in texts if t in self._items}
            for t in found:
                self._items.move_to_end(t)
        return found

    def put_many(self, texts: list[str], embeddings: torch.Tensor) -> None:
        if self.max_items <= 0:
            return
        rows = [e.clone() for e in embeddings]  # not views: a cached row must not keep its whole batch alive
        with self._lock:
            for t, e in zip(texts, rows, strict=True):
                self._items[t] = e
                self._items.move_to_end(t)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# finish(embeddings (B, D), jobs) -> one result per job, in order (a list, or a generator that yields
# them as they are made); an Exception instance fails that job alone.
Finish = Callable[[torch.Tensor, list[Any]], Iterable[Any]]


class ModelWorker:
    def __init__(
        self,
        embed: Callable[[list[str]], torch.Tensor],
        metrics: Metrics,
        finish: Finish | None = None,
        threads: int = 0,
        model_threads: int = 1,
        max_batch: int = 32,
        batch_wait_ms: float = 2.0,
        max_queue: int = 256,
        timeout_s: float = 30.0,
        delay_s: float = 0.0,
        embedding_cache_items: int = 0,
    ):
        self._embed = embed
        self.embeddings = EmbeddingCache(embedding_cache_items)
        self._finish = finish
        self.metrics = metrics
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.delay_s = delay_s  # tests only (Settings.test_model_delay_s): a slow model
        if model_threads < 1:
            raise ValueError(f"model_threads must be >= 1, got {model_threads}")
        self._threads = threads
        self.model_threads = model_threads
        # One single-thread executor per model thread, and a batch goes to the free one with the lowest
        # index: a lone client's requests then always run on the same thread, whose core keeps the
        # weights it touched in its caches (alternating threads cost a lone miss 1-2 ms, measured).
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sglora-torch-{i}", initializer=self._init_thread)
            for i in range(model_threads)
        ]
        # A batch takes one idle model thread, a run() job takes them all; whoever waits for one is handed
        # the next thread given back, in order of arrival.
        self._free = list(range(model_threads))  # indices of idle model threads
        self._thread_waiters: deque[asyncio.Future[int]] = deque()
        metrics.model_threads.set(model_threads)
        self._exclusive = asyncio.Lock()  # one run() job at a time gathers the threads (no deadlock)
        self._forming = False  # the batcher holds items of a batch it has not dispatched yet
        self._tasks: set[asyncio.Task] = set()
        self._waiting_alone: dict[asyncio.Future, asyncio.Task] = {}  # run(), run_beside() jobs not begun: their future -> task
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pending = 0  # admitted jobs not yet finished (queued + running)
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._batcher: asyncio.Task | None = None
        self._last_batch = 1

    def _init_thread(self) -> None:
        if self._threads > 0:
            torch.set_num_threads(self._threads)

    def start(self) -> None:
        self._batcher = asyncio.get_running_loop().create_task(self._batch_loop(), name="sglora-batcher")

    @property
    def pending(self) -> int:
        return self._pending

    def alone(self) -> bool:
        """Whether the calling model thread's job is all the work there is: every other model thread idle,
        nothing queued, no batch being formed and nobody waiting for a thread. Read from a model thread
        without a lock: a hint (models.packed.set_split_gate)."""
        return (
            len(self._free) >= self.model_threads - 1 and self._queue.empty() and not self._forming and not self._thread_waiters
        )

    @property
    def closing(self) -> bool:
        return self._closing

    # ---- admission ------------------------------------------------------------------------------
    def refuse_if_full(self) -> None:
        """:class:`Overloaded` (counted) where a job submitted now would be refused for a full queue."""
        if self._pending >= self.max_queue:
            self.metrics.rejected.labels(reason="overloaded").inc()
            raise Overloaded()

    def _admit(self) -> None:
        if self._closing:
            raise ShuttingDown()
        self.refuse_if_full()
        self._pending += 1
        self._idle.clear()
        self.metrics.queue_depth.set(self._pending)

    def _release(self) -> None:
        self._pending -= 1
        self.metrics.queue_depth.set(self._pending)
        if self._pending == 0:
            self._idle.set()

    def time_left(self) -> float | None:
        """Seconds a model wait of the current request may last: ``timeout_s``, or what is left of the request's
        (:data:`REQUEST_DEADLINE`); None (no bound) for a job under :data:`UNBOUNDED`."""
        deadline = REQUEST_DEADLINE.get()
        if deadline is None or deadline.at is None:
            return self.timeout_s
        if deadline.at == math.inf:
            return None
        return min(self.timeout_s, deadline.at - asyncio.get_running_loop().time())

    async def _wait(self, future: asyncio.Future) -> Any:
        """The result of a job's future, within the request timeout (-> :class:`WorkerTimeout`). A timeout or
        a cancelled caller cancels the future: the worker skips a job that has not started yet, and drops
        the result of one that has (a request whose client went away is cancelled: app/lifetime.py)."""
        try:
            # The future itself is awaited (no shield, no wait_for task): one event-loop step fewer
            # between the model thread's result and the request, and cancelling the caller cancels it.
            async with asyncio.timeout(self.time_left()):
                return await future
        except TimeoutError as e:
            self.metrics.rejected.labels(reason="timeout").inc()
            raise WorkerTimeout() from e

    # ---- jobs -----------------------------------------------------------------------------------
    def _submit(self, text: str, job: Any = None) -> asyncio.Future:
        """Admits ``text`` (:class:`Overloaded` / :class:`ShuttingDown` at once) for a micro-batch; the
        future of its result (see :meth:`encode`)."""
        if job is not None and self._finish is None:
            raise TypeError("this worker has no finish step: encode(text) without a job")
        self._admit()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(lambda _: self._release())
        item = _Item(text, job, future)
        # Nothing queued, no batch being formed and a model thread idle: the batcher would take this item
        # alone and dispatch it at once, so do that here, a few event-loop steps sooner.
        index = None if self._forming or not self._queue.empty() else self._try_take()
        if index is None:
            self._queue.put_nowait(item)
        else:
            self._last_batch = 1
            self._dispatch([item], index, loop)
        return future

    async def encode(self, text: str, job: Any = None) -> Any:
        """Embeds ``text`` in a micro-batch; returns this job's result of ``finish`` (run on the worker
        thread with the other jobs of the batch), or the embedding (D,) itself when ``job`` is None."""
        return await self._wait(self._submit(text, job))

    async def run(self, fn: Callable[..., T], *args: Any, commit: bool = False) -> T:
        """Runs ``fn(*args)`` on a model thread, under inference mode, alone (no batch runs meanwhile).

        ``commit``: ``fn`` changes state (registers or removes an expert). Such a job either never starts
        (the caller timed out or went away first) or is waited for to its end, past the request timeout:
        a 504 for a change that was then made would tell the client the opposite of the truth."""
        self._admit()
        loop = asyncio.get_running_loop()
        enqueued = time.perf_counter()
        future = loop.create_future()
        future.add_done_callback(lambda _: self._release())
        started = threading.Lock()  # held by the job once it runs; taken by a caller that gives up first

        def job() -> None:
            if future.cancelled() or not started.acquire(blocking=False):
                return
            self.metrics.stage.labels(stage="queue").observe(time.perf_counter() - enqueued)
            if self.delay_s:
                time.sleep(self.delay_s)
            try:
                with torch.inference_mode():
                    result = fn(*args)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting request
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        task = self._spawn(self._alone(job, future))
        self._waiting_alone[future] = task

        def given_up(f: asyncio.Future) -> None:
            # A caller that timed out or went away before its job began: the task waiting for the model
            # threads goes too, with the arguments it holds (a retrieval's decoded images), instead of
            # piling up beyond max_queue until every thread is free.
            if f.cancelled() and self._waiting_alone.pop(f, None) is not None:
                task.cancel()

        future.add_done_callback(given_up)
        if not commit:
            return await self._wait(future)
        try:
            async with asyncio.timeout(self.time_left()):
                return await asyncio.shield(future)
        except TimeoutError as e:
            if not started.acquire(blocking=False):  # begun: its change will be made; answer with its outcome
                return await asyncio.shield(future)
            future.cancel()  # not begun: it never will
            self.metrics.rejected.labels(reason="timeout").inc()
            raise WorkerTimeout() from e
        except asyncio.CancelledError:  # the client went away, or the server stops: a job not begun never will
            if started.acquire(blocking=False):
                future.cancel()
                raise
            # Begun: its change will be made. Its outcome, not a "retry" (503) that would then meet a 409.
            asyncio.current_task().uncancel()
            return await asyncio.shield(future)

    async def run_beside(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(*args)`` on one model thread, under inference mode, while batches run on the others,
        within the request timeout as a batch is. For work that reads nothing a change could alter halfway
        and that :meth:`run` would make every generation wait for (an uploaded expert's probe forwards through
        the image tower: 0.7 s on ViT-B-16's shape). A :meth:`run` job waits for it, as for a batch; two of
        them may run at once, on two threads."""
        self._admit()
        loop = asyncio.get_running_loop()
        enqueued = time.perf_counter()
        future = loop.create_future()
        future.add_done_callback(lambda _: self._release())

        def job() -> None:
            self.metrics.stage.labels(stage="queue").observe(time.perf_counter() - enqueued)
            try:
                with torch.inference_mode():
                    result = fn(*args)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting request
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        async def on_a_thread() -> None:
            index = await self._take()
            try:
                if self._waiting_alone.pop(future, None) is None or future.done():  # given up, or closed
                    return
                self.metrics.busy_threads.inc()
                try:
                    await loop.run_in_executor(self._executors[index], copy_context().run, job)
                finally:
                    self.metrics.busy_threads.dec()
            finally:
                self._give(index)

        task = self._spawn(on_a_thread())
        self._waiting_alone[future] = task  # until it begins: close() answers it, a caller gone cancels it

        def given_up(f: asyncio.Future) -> None:
            if f.cancelled() and self._waiting_alone.pop(f, None) is not None:
                task.cancel()  # with fn's arguments

        future.add_done_callback(given_up)
        return await self._wait(future)

    async def _alone(self, job: Callable[[], None], future: asyncio.Future) -> None:
        taken: list[int] = []
        try:
            async with self._exclusive:
                while len(taken) < self.model_threads:
                    taken.append(await self._take())
            if self._waiting_alone.pop(future, None) is None or future.done():  # given up, or closed
                return
            self.metrics.busy_threads.inc(self.model_threads)
            try:
                # In the request's context (this task's copy of it): the job's log lines carry its request ID,
                # which run_in_executor alone would leave behind.
                await asyncio.get_running_loop().run_in_executor(self._executors[0], copy_context().run, job)
            finally:
                self.metrics.busy_threads.dec(self.model_threads)
        finally:
            for index in taken:
                self._give(index)

    # ---- model threads --------------------------------------------------------------------------
    def _try_take(self) -> int | None:
        """The idle model thread with the lowest index (a lone client's jobs then always run on the same
        thread), unless none is idle or others wait for one."""
        if not self._free or self._thread_waiters:
            return None
        index = min(self._free)
        self._free.remove(index)
        return index

    async def _take(self) -> int:
        index = self._try_take()
        if index is not None:
            return index
        waiter = asyncio.get_running_loop().create_future()
        self._thread_waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a thread as it was cancelled: pass it on
                self._give(waiter.result())
            elif waiter in self._thread_waiters:  # else _give has already dropped it (a cancelled waiter)
                self._thread_waiters.remove(waiter)
            raise

    def _give(self, index: int) -> None:
        while self._thread_waiters:
            waiter = self._thread_waiters.popleft()
            if not waiter.done():
                waiter.set_result(index)
                return
        self._free.append(index)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # a reference until done (the loop keeps only weak ones)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- batching -------------------------------------------------------------------------------
    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._forming = True
            index = None
            try:
                index = await self._take()  # a free model thread; meanwhile arrivals queue up for this batch
                deadline = loop.time() + self.batch_wait_s
                while len(batch) < self.max_batch:
                    if not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                        continue
                    remaining = deadline - loop.time()
                    if self._last_batch <= 1 or remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
            except asyncio.CancelledError:  # closed (a drain that timed out) while forming a batch
                if index is not None:
                    self._give(index)
                for it in batch:
                    _set_exception(it.future, ShuttingDown())
                raise
            self._forming = False
            batch = [it for it in batch if not it.future.cancelled()]
            if not batch:
                self._give(index)
                continue
            self._last_batch = len(batch)
            self._dispatch(batch, index, loop)

    def _dispatch(self, batch: list[_Item], index: int, loop: asyncio.AbstractEventLoop) -> None:
        """Runs ``batch`` on model thread ``index`` (taken); a callback gives the thread back when it is done."""
        self.metrics.busy_threads.inc()

        def done(f: asyncio.Future) -> None:
            self.metrics.busy_threads.dec()
            self._give(index)
            if not f.cancelled() and f.exception() is not None:  # every item's future already got its error
                log.error("batch failed", exc_info=f.exception())

        loop.run_in_executor(self._executors[index], self._run_batch, batch, loop).add_done_callback(done)

    def _run_batch(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        # Requests that timed out (or went away) while this batch waited for the thread are not encoded:
        # a backlog of given-up jobs must not keep the worker busy after their 504s.
        batch = [it for it in batch if not it.future.cancelled()]
        if not batch:
            return
        now = time.perf_counter()
        for it in batch:
            self.metrics.stage.labels(stage="queue").observe(now - it.enqueued)
        texts = list(dict.fromkeys(it.text for it in batch))  # identical descriptions are encoded once
        row = {t: i for i, t in enumerate(texts)}
        if self.delay_s:
            time.sleep(self.delay_s)
        with torch.inference_mode():
            failure = None
            try:
                emb = self._encode(texts)  # (B, D)
            except Exception as e:  # noqa: BLE001
                failure = _as_reported(e)  # out of memory: without the failed forward's frames, which hold its tensors
            if failure is not None:  # out of the except block: its traceback no longer holds that memory
                if len(texts) > 1:  # one bad description must not fail its neighbours: retry them one by one
                    log.warning(
                        "a text batch of %d descriptions failed (%s); retrying them one by one", len(texts), error_line(failure)
                    )
                    failure = None  # nor the traceback of an error that is not out of memory: the retries make their own
                    for t in texts:
                        self._run_batch([it for it in batch if it.text == t], loop)
                    return
                for it in batch:
                    loop.call_soon_threadsafe(_set_exception, it.future, failure)
                return
            live = [it for it in batch if not it.future.cancelled()]
            for it in live:
                if it.job is None:
                    loop.call_soon_threadsafe(_set_result, it.future, emb[row[it.text]])
            jobs = [it for it in live if it.job is not None]
            if not jobs:
                return
            # finish may yield its results one by one: each request is answered as soon as its result
            # exists, and the event loop (answering cache hits meanwhile) is woken between them.
            done = 0
            try:
                for it, result in zip(jobs, self._finish(emb[[row[it.text] for it in jobs]], [it.job for it in jobs])):
                    done += 1
                    if isinstance(result, Exception):
                        loop.call_soon_threadsafe(_set_exception, it.future, result)
                    else:
                        loop.call_soon_threadsafe(_set_result, it.future, result)
            except Exception as e:  # noqa: BLE001 - a bug in finish: every job still open gets it
                for it in jobs[done:]:
                    loop.call_soon_threadsafe(_set_exception, it.future, e)
            else:
                for it in jobs[done:]:  # finish gave fewer results than jobs: a bug, never a hang
                    loop.call_soon_threadsafe(_set_exception, it.future, RuntimeError("no result for this job"))

    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (B, D) of distinct ``texts``: reused from the cache where known, the rest in ONE
        text-encoder call (the batch the metrics count)."""
        known = self.embeddings.get_many(texts)
        todo = [t for t in texts if t not in known]
        if todo:
            self.metrics.batch_size.observe(len(todo))
            t0 = time.perf_counter()
            fresh = self._embed(todo)
            self.metrics.stage.labels(stage="text_encoding").observe(time.perf_counter() - t0)
            self.embeddings.put_many(todo, fresh)
        # Counted once the batch is encoded: a failed batch is retried one description at a time.
        self.metrics.embeddings.labels(result="hit").inc(len(known))
        self.metrics.embeddings.labels(result="miss").inc(len(todo))
        if not todo:
            return torch.stack([known[t] for t in texts])
        if not known:
            return fresh
        rows = dict(zip(todo, fresh, strict=True)) | known
        return torch.stack([rows[t] for t in texts])

    # ---- shutdown -------------------------------------------------------------------------------
    @property
    def busy(self) -> int:
        """Model threads running a job now (a job whose caller gave up included: it runs to its end)."""
        return self.model_threads - len(self._free)

    async def settle(self) -> None:
        """Returns once every model thread is idle and handed back (a batch's result reaches its caller a
        moment before its thread is given back)."""
        while self.busy or self._pending:
            await asyncio.sleep(0.001)

    async def drain(self, timeout_s: float) -> bool:
        """Stops admitting jobs and waits, at most ``timeout_s`` in all, for the accepted ones and for the
        jobs still running on the model threads (those of requests that timed out or were cut off hold a
        thread too); False if they did not finish in time."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("shutdown: %d model jobs still pending after %.1f s", self._pending, timeout_s)
            return False
        while self.busy and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.busy:
            log.warning("shutdown: %d model thread(s) still busy after %.1f s; not waiting for them", self.busy, timeout_s)
            return False
        return True

    async def close(self, wait: bool = True) -> None:
        """Stops the batcher and the model threads; ``wait=False`` (a drain that timed out) leaves a running
        job behind: the threads are marked abandoned and ``app.serve`` ends the process without them."""
        if self._batcher is not None:
            self._batcher.cancel()
            try:
                await self._batcher
            except asyncio.CancelledError:
                pass
        # What no model thread will run now (after a drain that timed out): answered, not left to time out.
        while not self._queue.empty():
            _set_exception(self._queue.get_nowait().future, ShuttingDown())
        for future, task in list(self._waiting_alone.items()):
            _set_exception(future, ShuttingDown())
            task.cancel()
        if not wait and self.busy:
            _abandoned.append(self.busy)
        for executor in self._executors:
            await asyncio.to_thread(executor.shutdown, wait=wait, cancel_futures=True)


_abandoned: list[int] = []  # model threads left running by a shutdown that timed out (this process)


def abandoned_threads() -> int:
    """How many model threads shutdowns of this process left running (their jobs past SGLORA_SHUTDOWN_TIMEOUT_S)."""
    return sum(_abandoned)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, e: BaseException) -> None:
    if not future.done():
        future.set_exception(_as_reported(e))


def _as_reported(e: BaseException) -> BaseException:
    """What a request gets for its model job's error ``e``. Out of memory (a GPU's torch.OutOfMemoryError,
    the CPU allocator's failure, a plain RuntimeError in torch, or a MemoryError) as a new
    torch.OutOfMemoryError without a traceback (answered 503, not 500: app/errors.py): the failed job's
    frames, and the tensors they hold, must not live on in a future's exception until a garbage collection."""
    if out_of_memory(e):
        return torch.OutOfMemoryError(str(e) or type(e).__name__)
    return e

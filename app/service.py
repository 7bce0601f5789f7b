"""The service behind the routes: LoRA generation through the cache, adapters by ETag, retrieval
scoring and expert changes. Built once in the FastAPI lifespan; all torch work goes through
:class:`app.worker.ModelWorker`.

Caching: a generated LoRA is stored under ``gen:<sha256 of (code and artefact version, normalised
request)>``; ``etag:<its ETag>`` (for /retrieve) holds a pointer to that key, not a second copy, and
``req:<its ETag>`` the request (to make the file again once its entry is gone). The
artefact version changes whenever an expert is added or removed, so entries of an older repository
are simply never looked up again (they age out by TTL / LRU). An sg-lora request without a seed draws
a fresh seed (reported in X-Seed) and is not looked up (it is a new sample by definition), but its
result is stored under the drawn seed, so repeating the request with that seed is a cache hit. The
deterministic methods ignore the seed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from app.cache import BytesLRU, CacheKey, HotKeys, RedisCache
from app.errors import APIError
from app.images import allow_pixels, load_rgb, open_image
from app.metrics import Metrics
from app.schemas import GenerateRequest
from app.settings import Settings, StartupError
from app.worker import REQUEST_DEADLINE, UNBOUNDED, ModelWorker, WorkerTimeout
from expert_store.repository import (
    INDEX_FILE,
    Expert,
    ExpertRepository,
    PreparedRemoval,
    RepositoryBusy,
    RepositoryChanged,
    check_name,
)
from models.backbone import Backbone
from models.lora import LoraSpec, check_finite
from models.packed import FIXED_ROWS, clear_split_gate, set_split_gate
from sglora import __version__
from sglora.artifacts import MANIFEST, ArtifactError, Artifacts, load_artifacts
from sglora.devices import out_of_memory
from sglora.engine import Request
from sglora.export import (
    LORA_FORMATS,
    activation_problem,
    from_peft_tensors,
    generation_metadata,
    hf_base_model,
    layout_metadata,
    peft_zip_from_weights,
    request_metadata,
    safetensors_bytes,
    tower_problem,
)
from sglora.io import safetensors_metadata
from sglora.methods import EQUAL_WEIGHT_METHODS, EVERY_EXPERT_METHODS, SAMPLING_METHODS

log = logging.getLogger("sglora.service")
ETAG_RE = re.compile(r"^[0-9a-f]{32}$")
# Drawn seeds stay below 2^53: a JSON client (JavaScript, the UI) holds them exactly as numbers, so sending
# X-Seed / "seed" back reproduces the LoRA. (The engine's own draws go to 2^62; requests may use up to 2^63-1.)
UNSEEDED_SEEDS = 2**53
# Value of an ``etag:`` cache entry: this prefix + the key of the ``gen:`` entry that holds the bytes.
# (A safetensors file starts with its 8-byte little-endian header length, never with these bytes.) Beside
# it, ``req:<ETag>`` holds the request that made them (JSON), so that the file can be made again once its
# entry is gone: a key apart, so that the pointer stays what earlier releases read (a rolling update).
ETAG_POINTER = b"->"
POINTER_REWRITE_S = 60.0  # a Redis hit rewrites its ETag pointer at most this often (per ETag, per process)
POINTER_MEMORY = 4096  # ETags whose last rewrite is remembered
# ETags whose request this process remembers, to make their file again once no cache holds it (with the
# cache off, or Redis without the entries): a few hundred bytes each.
REQUEST_MEMORY = 16384
STARTUP_TIMEOUT_S = 600.0  # the warm-up generation and the batching check (see Service.start)
TEXT_PROBES = 6  # the repository's first descriptions, with which start-up checks the traced text graph and batching
# An uploaded expert's safetensors header: a LoRA's names, shapes, offsets and metadata take a few kB. The
# header may list any number of empty tensors, which safetensors loads as tensor objects (29 MB of header:
# 4.6 s and 690 MB), so a larger one is refused before it is read.
MAX_LORA_HEADER_BYTES = 1 << 20
# POST /experts: an expert's largest |value| at most this many times the largest among the repository's means.
MAX_EXPERT_SCALE = 1000.0
# An expert change waits at most this long for the repository's lock, which another process holds while it
# changes the experts (another replica on the same volume) or rebuilds them (sglora pipeline): the change runs
# alone on the model threads, so every generation waits with it. Then a 503 with Retry-After, nothing changed.
REPOSITORY_LOCK_WAIT_S = 2.0
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class GenerateParams:
    """A /generate request with every default filled in: what fixes the LoRA."""

    description: str
    method: str
    seed: int | None
    top_k: int | None  # None: the repository's default (min of the artefacts' top_k and its size) when it runs
    temperature: float | None  # None: not used (the soups weigh their experts equally)


class Made(NamedTuple):
    """A LoRA file made by a model thread: with its ETag and metadata, worked out there rather than on the
    event loop, and the artefact version it was made with."""

    data: bytes
    version: str
    etag: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class GeneratedLora:
    data: bytes  # safetensors, PEFT tensor names, generation metadata in __metadata__
    etag: str  # first 32 hex of sha256(data)
    cache: str  # "hit" | "miss"
    metadata: dict[str, str]

    @property
    def method(self) -> str:
        return self.metadata.get("method", "")

    @property
    def seed(self) -> int | None:
        s = self.metadata.get("seed", "")
        return int(s) if s else None

    @property
    def experts(self) -> list[dict]:
        return json.loads(self.metadata.get("experts", "[]"))


@dataclass(frozen=True)
class Scores:
    scores: list[list[float]]  # (images, texts)
    image_to_text: list[list[int]]
    text_to_image: list[list[int]]
    recall_at_1: tuple[float, float] | None  # (i2t, t2i) when texts pair 1:1 with images


@dataclass(frozen=True)
class Retrieval:
    adapter: GeneratedLora
    texts: list[str]
    lora: Scores
    zero_shot: Scores | None


@dataclass(frozen=True)
class ExpertEntry:
    """An expert as the state lists it: no tensors (the repository's stack holds those, once)."""

    name: str
    description: str
    num_snapshots: int


@dataclass(frozen=True)
class RepositoryState:
    """What readers on the event loop see of the expert repository, replaced whole after each change (one
    assignment: a reader never pairs one state's version with another's experts or default top_k)."""

    version: str
    top_k: int  # the default: min(the artefacts' top_k, number of experts)
    experts: tuple[ExpertEntry, ...]  # in the repository's order then

    def top_k_for(self, requested: int | None) -> int:
        """A request's top_k, or this repository's default where it gave none."""
        return self.top_k if requested is None else requested


@dataclass
class _Shared:
    """A lookup (and generation) in flight, and how many requests wait for it."""

    task: asyncio.Task[GeneratedLora]
    waiters: int = 0


@dataclass(frozen=True)
class _MetaSource:
    """What :func:`sglora.export.generation_metadata` reads of an Artifacts, with the version held in
    memory instead of re-hashed from disk on every request."""

    backbone: Backbone
    version: str


def etag_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _pointers(etag: str, key: str, params: GenerateParams) -> dict[str, bytes]:
    """The ``etag:`` and ``req:`` entries of the file of ``etag`` filed under ``gen:<key>`` (see
    :data:`ETAG_POINTER`)."""
    request = {"description": params.description, "method": params.method, "seed": params.seed}
    request.update(top_k=params.top_k, temperature=params.temperature)
    return {
        "etag:" + etag: ETAG_POINTER + ("gen:" + key).encode(),
        "req:" + etag: json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode(),
    }


def normalise_etag(value: str) -> str:
    """Accepts an ETag as sent (``W/"…"``, quotes, ``-zip`` suffix) or bare; -> 32 hex."""
    v = value.strip()
    v = v.removeprefix("W/").strip('"')
    v = v.removesuffix("-zip")
    if not ETAG_RE.match(v):
        raise APIError(422, "etag", "not an ETag of this service (32 hex digits, as sent by /generate)")
    return v


def _rank(scores: torch.Tensor, paired: bool) -> Scores:
    """scores (N images, T texts) -> rankings both ways (+ recall@1 when the texts are captions paired with
    the images, N == T, pairs on the diagonal)."""
    i2t = scores.argsort(dim=1, descending=True, stable=True)  # (N, T)
    t2i = scores.t().argsort(dim=1, descending=True, stable=True)  # (T, N)
    recall = None
    if paired and scores.shape[0] == scores.shape[1]:
        ar = torch.arange(scores.shape[0])
        recall = (float((i2t[:, 0] == ar).float().mean()), float((t2i[:, 0] == ar).float().mean()))
    return Scores(scores.tolist(), i2t.tolist(), t2i.tolist(), recall)


PROBES = (
    "a photo of a cat",
    "This is a classification task for recognizing coat, pullover and shirt",
    "tell footwear apart: sandals, sneakers and boots; " * 6,
)


def batching_mismatch(embed, descriptions: list[str], max_batch: int) -> str | None:
    """Whether batching changes embeddings on this device: each probe encoded alone vs inside batches
    of other sizes and orders (up to ``max_batch``). None when every row is bit-identical, else what
    differed. The probes mix the given descriptions with fixed ones of other lengths."""
    texts = list(dict.fromkeys([*descriptions, *PROBES]))[:max_batch]
    alone = torch.cat([embed([t]) for t in texts])
    filler = [f"{texts[i % len(texts)]} (variant {i})" for i in range(max_batch - len(texts))]
    for batch in (texts, texts[::-1], texts[:2], [*filler, *texts]):
        if len(batch) < 2:
            continue
        got = embed(batch)
        for row, t in enumerate(batch):
            if t in texts and not torch.equal(got[row], alone[texts.index(t)]):
                return f"the embedding of {t[:40]!r} differs in a batch of {len(batch)} from its embedding alone"
    return None


def _checked_name(name: str) -> str:
    """An expert name from a request, before it goes anywhere near a path; APIError(422, "name") otherwise."""
    try:
        return check_name(name)
    except ValueError as e:
        raise APIError(422, "name", str(e)) from e


def _check_cached(
    metadata: dict[str, str], params: GenerateParams, version: str, top_k: int | None, dtypes: tuple[str, str]
) -> None:
    """ValueError unless a cached file's metadata says it is this request's LoRA (a whole safetensors file
    of another writer, an empty one even, passed the structural check; another seed's file under this key
    was served as this seed's). ``top_k``: the experts it mixes (None: not known here); ``dtypes``: the text
    tower's and the generator's, as the metadata names them (the generator's "" for the methods that do not
    sample)."""
    want = {"format": "sglora-lora", "artifact_version": version, "description": params.description, "method": params.method}
    want |= request_metadata(params.seed, top_k, params.temperature)
    want["text_dtype"], want["generator_dtype"] = dtypes
    wrong = [k for k, v in want.items() if metadata.get(k) != v]
    if wrong:
        raise ValueError(f"its metadata's {', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not match")


def _taken(name: str, names: list[str]) -> str | None:
    """Why ``name`` cannot be registered beside ``names``, or None. Names differing in case alone are one file
    on a case-insensitive filesystem (a macOS or Windows volume): the second would overwrite the first."""
    if name in names:
        return f"expert {name!r} already exists; delete it first"
    same = next((n for n in names if n.casefold() == name.casefold()), None)
    if same is not None:
        return f"expert {same!r} exists, a name that differs in case alone (one file on a case-insensitive filesystem)"
    return None


@contextmanager
def _other_writers(following: bool = False) -> Iterator[None]:
    """An expert change refused for another process's: the repository it changed (409: this server serves it
    only once restarted; 503 where it follows the repository: that change landed between this one's look and
    its save, and is taken up by the next request), or its lock held too long (503: retry)."""
    try:
        yield
    except RepositoryChanged as e:
        if following:
            reason = f"{e}; another process changed the experts at the same moment: retry"
            raise APIError(503, None, reason, {"Retry-After": "1"}) from e
        raise APIError(409, None, f"{e}: restart this server to serve it") from e
    except RepositoryBusy as e:
        raise APIError(503, None, f"{e}; retry", {"Retry-After": "1"}) from e


def _index_stat(directory: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a repository's index: every save replaces the file (a new inode); None: none."""
    try:
        st = os.stat(directory / INDEX_FILE)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _value_error_field(message: str) -> str | None:
    for name in ("top_k", "temperature", "seed", "method", "description"):
        if name in message:
            return name
    return None


# How a /retrieve by ETag's 503 says what keeps it from the cache (RedisCache.problem; else "is unreachable").
_CACHE_PROBLEM_SAID = {
    "reads refused": "refuses reads",
    "reads and writes refused": "refuses reads",
    "login refused": "refuses the service's login",
}


class Service:
    def __init__(self, settings: Settings, artifacts: Artifacts, device: str, metrics: Metrics):
        self.settings = settings
        self.artifacts = artifacts
        self.device = device
        self.metrics = metrics
        self.engine = artifacts.engine
        self.spec = artifacts.backbone.spec
        cfg = artifacts.backbone.config
        self.backbone_name = cfg.model if cfg.kind == "open_clip" else cfg.kind
        self.default_top_k = int(artifacts.config.get("prior", {}).get("top_k", self.engine.top_k))
        self.state = self._state_of(artifacts.version)
        # Held by an expert change for its whole job (its checks, the in-memory change, the save with its
        # wait for the repository's lock, the new state's publication), and by readers of one expert's
        # tensors (expert_file): they see the state before or after the change, never the repository in
        # between (changed in memory, not yet saved, perhaps to be rolled back).
        self._change_lock = threading.Lock()
        self._probe_lock = threading.Lock()  # one probe forward through the image tower at a time (_check_scale)
        # One removal at a time from its stack made ahead to its change: at most one such stack held beside the
        # served one (885 MB at 1,000 experts of ViT-B-16's shape).
        self._removing = asyncio.Lock()
        # SGLORA_FOLLOW_REPOSITORY: the index's (inode, size, mtime) as last looked at, and the reload in flight.
        self._index_seen = _index_stat(self.repository_dir)
        self._following: asyncio.Future | None = None
        self.text_dtype = artifacts.backbone.text_dtype_name
        self.text_numerics = self.text_dtype  # what fixes an embedding's bits: the dtype, and fixed-row blocks if on
        self.generator_dtype = self.engine.generator_dtype_name
        self.cache = RedisCache(
            settings.redis_url,
            settings.cache_ttl_s,
            settings.cache_prefix,
            settings.redis_timeout_s,
            settings.redis_backoff_s,
            metrics,
            max_connections=settings.redis_max_connections,
            backoff_min_s=settings.redis_backoff_min_s,
        )
        self.lru = BytesLRU(settings.lru_bytes)
        # With the cache off (no Redis URL) nothing is cached, in memory either.
        self.hot = HotKeys(settings.hot_keys if self.cache.enabled else 0, settings.cache_ttl_s)
        self._pointers: OrderedDict[str, float] = OrderedDict()  # ETag -> when a Redis hit last rewrote its pointer
        self._requests: OrderedDict[str, GenerateParams] = OrderedDict()  # ETag -> its request (REQUEST_MEMORY)
        self._in_flight: dict[str, _Shared] = {}  # cache key -> its lookup (and generation) in flight
        metrics.lru_bytes.set_function(lambda: self.lru.size_bytes)
        metrics.hot_keys.set_function(lambda: len(self.hot))
        model_threads, threads = settings.resolved_parallelism(device)
        # Every text reaches the encoder checked (its length by the route, against the text tower's context):
        # not checked again, and a batching probe runs past a small tower's context on purpose.
        self.embed = partial(self.engine.embed, truncate=True)
        self.worker = ModelWorker(
            self.embed,
            metrics,
            finish=self._generate_jobs,
            threads=threads,
            model_threads=model_threads,
            max_batch=settings.max_batch,
            batch_wait_ms=settings.batch_wait_ms,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            delay_s=settings.test_model_delay_s,
            embedding_cache_items=settings.embedding_cache_items,
        )
        self._timing = threading.local()  # per model thread: .sampling_s of the current pass
        self._time_sampling()
        metrics.set_info(self.backbone_name, self.version, __version__, device, self.text_dtype, self.generator_dtype)

    # ---- life cycle -----------------------------------------------------------------------------
    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Service:
        """Loads and checks the artefacts (raises :class:`ArtifactError` naming the problem), starts the
        worker and warms the model up with one real generation."""
        if settings.artifacts is None:
            raise ArtifactError("no artefact directory: set SGLORA_ARTIFACTS (or `sglora serve --artifacts DIR`)")
        try:
            device = settings.resolved_device()
        except ValueError as e:
            raise StartupError(str(e)) from None
        torch.set_num_threads(settings.resolved_parallelism(device)[1])
        allow_pixels(settings.max_image_pixels)
        artifacts = await asyncio.to_thread(load_artifacts, settings.artifacts, device)
        text_dtype = settings.resolved_text_dtype(device)
        try:
            artifacts.backbone.set_text_dtype(getattr(torch, text_dtype))
        except ValueError as e:
            raise ArtifactError(f"SGLORA_TEXT_DTYPE={settings.text_dtype}: {e}") from e
        generator_dtype = settings.resolved_generator_dtype(device)
        try:
            artifacts.engine.set_generator_dtype(getattr(torch, generator_dtype))
        except ValueError as e:
            if settings.generator_dtype != "auto":
                raise ArtifactError(f"SGLORA_GENERATOR_DTYPE={settings.generator_dtype}: {e}") from e
            # 'auto' read the CPU's flags; this torch build may still lack the kernels: float32, as elsewhere.
            log.warning("SGLORA_GENERATOR_DTYPE=auto: %s; sampling in float32", e)
        service = cls(settings, artifacts, device, metrics)
        # The default a request without a top_k gets: the config's top_k, at most the number of experts (as the
        # pipeline, the CLI and each request take it: a config's top_k of 100 over 10 experts merges 10).
        if service.state.top_k > settings.max_top_k:
            raise StartupError(
                f"SGLORA_MAX_TOP_K={settings.max_top_k} is below the artefacts' default top_k ({service.state.top_k}): "
                "a request without a top_k would merge more experts than one may ask for; raise SGLORA_MAX_TOP_K"
            )
        probes = [e.description for e in service.state.experts[:TEXT_PROBES]]
        if settings.text_graph == "auto" and device == "cpu":
            why = await asyncio.to_thread(artifacts.backbone.trace_text, probes)
            if why:
                log.warning("the text tower runs eagerly: %s", why)
        if split := await asyncio.to_thread(artifacts.engine.split_sampler):
            log.info("the CVAE's %d largest layers run in two blocks on two threads for a lone request", split)
        set_split_gate(service.worker.alone)  # a split layer takes a second core only when no other work does
        service.worker.start()
        # The first generation (lazy initialisation, a first CUDA call, a cold disk) may take far longer than
        # a request may wait: the start-up jobs get STARTUP_TIMEOUT_S, not SGLORA_REQUEST_TIMEOUT_S.
        service.worker.timeout_s = max(settings.request_timeout_s, STARTUP_TIMEOUT_S)
        # The start-up's jobs are not requests: they count in a scratch registry. The warm-up, the slowest job
        # of a process's life, was the one sample of an idle replica's stage histograms and batch sizes.
        service.metrics = service.worker.metrics = Metrics()
        try:
            try:
                await service.worker.encode("warm-up", service.resolve("warm-up", "sg-lora", 0, None, None))
            except ValueError as e:  # the repository's data (an expert of absurd values): its requests get a 422
                log.warning("the warm-up generation failed: %s", e)
            mismatch = blocked = None
            if settings.batch_invariance == "require" and service.worker.max_batch > 1:

                async def check() -> str | None:
                    return await service.worker.run(batching_mismatch, service.embed, probes, service.worker.max_batch)

                mismatch = await check()
                # Where the CPU's kernels block long reductions by the number of rows (AMX), fixed-row
                # blocks make a row's product independent of its batch: try them before giving batching up.
                # Off the event loop: a traced text graph is traced and checked again at the new block size.
                if mismatch and await asyncio.to_thread(artifacts.backbone.set_text_fixed_rows, FIXED_ROWS):
                    blocked, mismatch = mismatch, await check()
                    if mismatch:
                        await asyncio.to_thread(artifacts.backbone.set_text_fixed_rows, None)
                        blocked = None
                    else:
                        service.text_numerics = f"{service.text_dtype}/rows{FIXED_ROWS}"
                        service.worker.embeddings.clear()  # the warm-up's, made without the blocks
            await service.worker.settle()  # the warm-up's model thread handed back (a gauge of the scratch registry)
        except WorkerTimeout:
            await service.stop()
            raise StartupError(f"the warm-up generation took longer than {service.worker.timeout_s:g} s") from None
        except BaseException:
            await service.stop()
            raise
        finally:
            service.metrics = service.worker.metrics = metrics
        service.worker.timeout_s = settings.request_timeout_s
        if blocked:
            log.info(
                "text tower: %s with one product per layer; its long reductions (open_clip: every linear layer) now "
                "run in fixed %d-row blocks, "
                "with which batching leaves every embedding bit-identical (micro-batching on)",
                blocked,
                FIXED_ROWS,
            )
        if mismatch:
            log.warning(
                "micro-batching off: on %s with %d torch thread(s), %s; descriptions are encoded one at a time so "
                "that a seeded LoRA never depends on its neighbours (SGLORA_BATCH_INVARIANCE=ignore batches anyway)",
                device,
                torch.get_num_threads(),
                mismatch,
            )
            service.worker.max_batch = 1
        redis = await service.cache.ping()
        if service.cache.last_problem:
            redis += f" ({service.cache.last_problem})"
        log.info(
            "ready: artefacts %s (version %s, backbone %s, %d experts) on %s (text tower %s, %s, CVAE in %s, passes of %s rows, "
            "%d model thread(s), %d torch thread(s)); redis %s",
            artifacts.root,
            service.version,
            service.backbone_name,
            len(artifacts.repository),
            device,
            service.text_dtype,
            artifacts.backbone.text_graph,
            service.generator_dtype,
            "-".join(map(str, service.engine.pass_rows)) if service.engine.generator is not None else "no",
            service.worker.model_threads,
            torch.get_num_threads(),
            redis,
        )
        return service

    async def stop(self) -> None:
        """Finishes the accepted model jobs, then releases the worker and Redis."""
        drained = await self.worker.drain(self.settings.shutdown_timeout_s)
        await self.worker.close(wait=drained)
        clear_split_gate(self.worker.alone)
        await self.cache.close()

    def _time_sampling(self) -> None:
        # Engine.generate runs prior and sampling in one call; timing the sampler's sample() lets the
        # metrics split the two stages (sampling = this, prior = the rest) without touching the engine.
        gen = self.engine.sampler
        if gen is None:
            return
        inner = gen.sample

        def timed_sample(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = inner(*args, **kwargs)
                if out.is_cuda:  # its kernels still running: their time is sampling's, not the prior's after it
                    torch.cuda.synchronize(out.device)
                return out
            finally:
                self._timing.sampling_s = getattr(self._timing, "sampling_s", 0.0) + time.perf_counter() - t0

        gen.sample = timed_sample  # instance attribute: shadows the method for this sampler only

    # ---- generation -----------------------------------------------------------------------------
    def resolve(
        self, description: str, method: str, seed: int | None, top_k: int | None, temperature: float | None
    ) -> GenerateParams:
        """Fills defaults and checks what depends on the loaded artefacts; APIError(422) naming the field."""
        if len(description) > self.settings.max_description_chars:
            raise APIError(422, "description", f"longer than {self.settings.max_description_chars} characters")
        self.check_text_length(description, "description")
        n, cap = len(self.state.experts), self.settings.max_top_k
        if top_k is not None and not 1 <= top_k <= min(n, cap):  # None: the default, fixed when the job runs
            bound = f"the number of experts ({n})" if n <= cap else f"SGLORA_MAX_TOP_K ({cap})"
            raise APIError(422, "top_k", f"must be between 1 and {bound}, got {top_k}")
        temperature = self.engine.temperature if temperature is None else float(temperature)
        if method not in SAMPLING_METHODS:
            seed = None  # the deterministic methods do not sample
        # What a method does not use does not key its cache entry (nor shows in its metadata): the soups
        # weigh their experts equally, and model-soup mixes every expert.
        if method in EQUAL_WEIGHT_METHODS:
            temperature = None
        if method in EVERY_EXPERT_METHODS:
            top_k = None
        return GenerateParams(description, method, seed, top_k, temperature)

    def lora_bytes(self, method: str, top_k: int | None) -> int:
        """About how many bytes the LoRA file of ``method`` is (float32 values; the exact merges' rank is
        top_k or top_k + 2 times the layout's), before it is made: what a batch call may ask for in all."""
        k = min(self.state.top_k_for(top_k), len(self.state.experts))  # a top_k out of range: its item's 422
        rows = {"topk-exact": k, "sg-lora-exact": k + 2}.get(method, 1)
        return rows * self.spec.num_params * 4

    def check_text_length(self, text: str, field: str) -> None:
        """APIError(422, field) for a text longer than the text tower reads: its tokenizer would cut the rest
        off, and texts alike up to there would be one embedding (one LoRA, under two cache entries)."""
        try:
            self.engine.backbone.check_text_length(text)
        except ValueError as e:
            raise APIError(422, field, str(e)) from None

    async def generate(self, params: GenerateParams) -> GeneratedLora:
        await self.follow()
        lookup = params.method not in SAMPLING_METHODS or params.seed is not None
        if params.seed is None and params.method in SAMPLING_METHODS:
            params = replace(params, seed=secrets.randbelow(UNSEEDED_SEEDS))
        state = self.state
        version = state.version
        key = CacheKey(
            version,
            params.description,
            params.method,
            params.seed,
            state.top_k_for(params.top_k),
            params.temperature,
            self.text_numerics,
            self._dtypes_of(params)[1],  # the generator's, as its file names it
        ).digest()
        if not lookup:
            return await self._generate(params, key, version, lookup)
        hot = self.hot.get(key)
        if hot is not None and (data := self.lru.get(hot[0])) is not None:
            self.metrics.cache.labels(result="hit").inc()
            self.metrics.memory_hits.inc()
            self._remember(hot[0], params)
            return GeneratedLora(data, hot[0], "hit", hot[1])
        # One lookup (and generation) per key in flight: identical requests wait for its LoRA rather than making
        # the same bytes again. It belongs to none of them: it runs on, within the worker's timeout, while any of
        # them still waits (each no longer than its own deadline); the last to leave cancels it.
        shared = self._in_flight.get(key)
        first = shared is None
        if shared is None:
            shared = self._in_flight[key] = _Shared(asyncio.get_running_loop().create_task(self._shared(params, key, version)))
            shared.task.add_done_callback(lambda task: self._shared_done(key, task))
        shared.waiters += 1
        served = False
        try:
            async with asyncio.timeout(self.worker.time_left()):
                lora = await asyncio.shield(shared.task)
            served = True
        except TimeoutError as e:
            self.metrics.rejected.labels(reason="timeout").inc()
            raise WorkerTimeout() from e
        finally:
            shared.waiters -= 1
            if not shared.waiters and not shared.task.done():
                shared.task.cancel()  # nobody waits for it now: its model job is skipped, or its result dropped
                # and it leaves now, not when its done callback runs: a request arriving in between joined the
                # cancelled lookup, and its CancelledError was answered as the service stopping (503)
                if self._in_flight.get(key) is shared:
                    del self._in_flight[key]
            if not first:  # the first request's cache event is the lookup's own (counted in _generate)
                if served:
                    self.metrics.shared.inc()
                # With the cache off nothing is a hit: a LoRA shared in flight is a miss made for several requests.
                hit = served and self.cache.enabled
                self.metrics.cache.labels(result="hit" if hit else "miss").inc()
                if hit:
                    self.metrics.memory_hits.inc()  # no Redis asked (SGLoRACacheDegraded leaves these out)
        if first:
            return lora
        self._remember(lora.etag, params)
        return replace(lora, cache="hit" if hit else "miss")

    def _top_k_of(self, params: GenerateParams, version: str) -> int | None:
        """How many experts the LoRA of ``params`` mixes at ``version``; None where the state is another now."""
        state = self.state
        if state.version != version:
            return None
        return len(state.experts) if params.method in EVERY_EXPERT_METHODS else state.top_k_for(params.top_k)

    def _dtypes_of(self, params: GenerateParams) -> tuple[str, str]:
        """The text tower's and the generator's dtypes, as the LoRA file of ``params`` names them."""
        return self.text_dtype, self.generator_dtype if params.method in SAMPLING_METHODS else ""

    def _shared_done(self, key: str, task: asyncio.Task) -> None:
        if (shared := self._in_flight.get(key)) is not None and shared.task is task:
            del self._in_flight[key]
        if not task.cancelled():
            task.exception()  # retrieved: where its last waiter left as it failed, asyncio would log it as lost

    async def _shared(self, params: GenerateParams, key: str, version: str) -> GeneratedLora:
        """:meth:`_generate` for every request of ``key`` in flight: its model wait bounded by the requests that
        wait for it (:data:`UNBOUNDED`), not by the deadline of the one that began it, which may leave first."""
        REQUEST_DEADLINE.set(UNBOUNDED)  # in this task's own copy of the context
        return await self._generate(params, key, version, True)

    async def _generate(self, params: GenerateParams, key: str, version: str, lookup: bool) -> GeneratedLora:
        """The LoRA of ``params`` (cache key ``key``): from Redis where ``lookup``, else made on a model thread."""
        if lookup:
            data, ok = await self.cache.get("gen:" + key)
            # error: Redis failed or is skipped for its back-off; with the cache off (SGLORA_REDIS_URL empty)
            # nothing is stored, so nothing is found: a miss, not an error (else the cache alert would fire).
            failed = not ok and self.cache.enabled
            if data is not None:
                try:
                    metadata = safetensors_metadata(data, whole=True)
                    _check_cached(metadata, params, version, self._top_k_of(params, version), self._dtypes_of(params))
                except ValueError as e:  # not what this service stores there: generate it again, and overwrite it
                    log.warning("cache: the value of gen:%s is not this request's LoRA file (%s); generating it again", key, e)
                    data, failed = None, True
            self.metrics.cache.labels(result="hit" if data is not None else ("error" if failed else "miss")).inc()
            if data is not None:
                etag = etag_of(data)
                self.lru.put(etag, data)
                self.hot.put(key, etag, metadata)
                # Its ETag pointer may have been evicted (allkeys-lru: /retrieve alone reads it) while the
                # file, read by every repeat, stayed: this answer hands the ETag out, so /retrieve (of any
                # replica) must find it. At most once a minute per ETag: with the hot keys off, every hit
                # rewrote it, doubling Redis's calls under load.
                if self._pointer_due(etag):
                    self.cache.set_behind(_pointers(etag, key, params))
                self._remember(etag, params)
                return GeneratedLora(data, etag, "hit", metadata)
        else:
            # No lookup: a request without a seed asks for a new sample, never a cached one. While Redis is
            # failing (its back-off) the request still could not use the cache: an error, so that an outage
            # shows in the error ratio whatever share of the traffic sends seeds.
            degraded = self.cache.reads_failing()
            self.metrics.cache.labels(result="error" if degraded else "skip").inc()
        try:
            data, used_version, etag, metadata = await self.worker.encode(params.description, params)
        except ValueError as e:  # the engine's own checks (e.g. an expert removed meanwhile)
            raise APIError(422, _value_error_field(str(e)), str(e)) from e
        self.lru.put(etag, data)
        # Else the repository changed under the request (and with it, maybe, the default top_k): not filed under the old key.
        if used_version == version:
            # The ETag entry points at the generation entry instead of holding a second copy of the bytes.
            self.cache.set_behind({"gen:" + key: data, **_pointers(etag, key, params)})
            if lookup:  # a drawn seed is new to the client: hardly ever repeated, it would only push real repeats out
                self.hot.put(key, etag, metadata)
            self._remember(etag, params)
        return GeneratedLora(data, etag, "miss", metadata)

    def _remember(self, etag: str, params: GenerateParams) -> None:
        """Keeps the request of ``etag`` among the last :data:`REQUEST_MEMORY` handed out."""
        self._requests[etag] = params
        self._requests.move_to_end(etag)
        if len(self._requests) > REQUEST_MEMORY:
            self._requests.popitem(last=False)

    def _pointer_due(self, etag: str) -> bool:
        """Whether a Redis hit of ``etag`` rewrites its pointer now (:data:`POINTER_REWRITE_S` since the last;
        the last :data:`POINTER_MEMORY` ETags remembered)."""
        now = time.monotonic()
        last = self._pointers.get(etag)
        if last is not None and now - last < POINTER_REWRITE_S:
            return False
        self._pointers[etag] = now
        self._pointers.move_to_end(etag)
        while len(self._pointers) > POINTER_MEMORY:
            self._pointers.popitem(last=False)
        return True

    def _generate_jobs(self, embeddings: torch.Tensor, jobs: list[GenerateParams]) -> Iterator[Made | Exception]:
        """On a model thread, after the micro-batched text encoding: priors, CVAE samples and files,
        up to :attr:`Engine.pass_rows` requests at a time (one CVAE pass each), each result
        yielded as soon as its file exists. Answering a whole batch at once would hand the event loop
        a burst of responses that cache hits then queue behind (measured: hit p50 1.3 -> 15 ms under the
        200-client load test). Stage metrics: prior and sampling per pass, serialisation per request."""
        state = self.state  # no change runs beside a generation job (ModelWorker.run jobs run alone)
        version = state.version
        meta_source = _MetaSource(self.artifacts.backbone, version)
        step = self.engine.pass_rows[1]
        for start in range(0, len(jobs), step):
            part = jobs[start : start + step]
            self._timing.sampling_s = 0.0
            t0 = time.perf_counter()
            gens = self.engine.generate_many(
                embeddings[start : start + step],
                [Request(p.method, p.seed, state.top_k_for(p.top_k), p.temperature) for p in part],
            )
            self.metrics.stage.labels(stage="prior").observe(time.perf_counter() - t0 - self._timing.sampling_s)
            if self._timing.sampling_s:
                self.metrics.stage.labels(stage="sampling").observe(self._timing.sampling_s)
            for params, g in zip(part, gens, strict=True):
                if isinstance(g, Exception):
                    yield g
                    continue
                if not torch.isfinite(g.lora).all():  # never a 200 of NaNs: an expert on disk holds values too large
                    names = ", ".join(e.name for e in g.experts)
                    yield ValueError(f"the generated LoRA is not finite: one of the experts {names} holds values too large")
                    continue
                t2 = time.perf_counter()
                data = safetensors_bytes(g.spec or self.spec, g.lora, generation_metadata(meta_source, params.description, g))
                made = Made(data, version, etag_of(data), safetensors_metadata(data))
                self.metrics.stage.labels(stage="serialisation").observe(time.perf_counter() - t2)
                yield made

    def spec_of(self, lora: GeneratedLora) -> LoraSpec:
        """The layout of a generated LoRA: the backbone's, or (topk-exact, sg-lora-exact) the same targets at
        the rank, alpha and scaling its metadata names (the service wrote them)."""
        meta, spec = lora.metadata, self.spec
        layout = (int(meta.get("rank", spec.rank)), float(meta.get("alpha", spec.alpha)), meta.get("scaling", spec.scaling))
        # All three: a top-1 exact merge has the backbone's rank but alpha = rank and standard scaling (its
        # scale folded into B), which the backbone's alpha or rslora would scale again.
        if layout == (spec.rank, spec.alpha, spec.scaling):
            return spec
        return replace(spec, rank=layout[0], alpha=layout[1], scaling=layout[2])

    @property
    def base_model(self) -> str | None:
        """The HF hub id the zips name as their base model (None for backbones without one)."""
        return hf_base_model(self.artifacts.backbone.config)

    async def zip_of(self, lora: GeneratedLora) -> bytes:
        t0 = time.perf_counter()
        data = await asyncio.to_thread(
            peft_zip_from_weights, self.spec_of(lora), lora.data, self.base_model
        )  # zlib releases the GIL
        self.metrics.stage.labels(stage="serialisation").observe(time.perf_counter() - t0)
        return data

    async def adapter(self, etag: str) -> GeneratedLora:
        """A recently generated LoRA by its ETag: in-process LRU first, then Redis."""
        key = normalise_etag(etag)
        data = self.lru.get(key)
        if data is None:
            data, ok = await self.cache.get("etag:" + key)
            pointed = False  # the file's entry is gone (TTL, allkeys-lru) but not its pointer
            if data is not None and data.startswith(ETAG_POINTER):
                data, ok = await self.cache.get(data[len(ETAG_POINTER) :].decode(errors="replace"))
                pointed = data is None and ok
            if data is None:
                # Made again from its request, byte for byte while the artefact version is the one it was
                # made with: the one this process remembers handing it out for (the cache off, down, or
                # without these entries), else the one recorded beside the pointer. One generation at most.
                request: bytes | GenerateParams | None = self._requests.get(key)
                if request is None and pointed:
                    request, ok = await self.cache.get("req:" + key)
                if request is not None:
                    data = await self._made_again(key, request)
            if data is None and not ok and self.cache.enabled and not self.cache.readable():  # an outage, refused reads
                retry = str(max(1, math.ceil(self.settings.redis_backoff_s)))
                why = _CACHE_PROBLEM_SAID.get(self.cache.problem or "", "is unreachable")
                reason = f"the cache that holds adapters by ETag {why}; retry later, or send the description"
                raise APIError(503, "etag", reason, headers={"Retry-After": retry})
        if data is None or etag_of(data) != key:
            raise APIError(404, "etag", "unknown or expired adapter ETag; send the description instead")
        try:
            adapter = GeneratedLora(data, key, "hit", safetensors_metadata(data, whole=True))
            self._check_adapter(adapter)
        except (ValueError, SafetensorError, struct.error) as e:
            # Not what this service stores: another deployment's (the etag: keys carry no artefact version, so
            # two sharing a Redis prefix find each other's) or a damaged entry; never a 500.
            reason = f"the adapter under this ETag is not a LoRA of this service's backbone and layout ({e})"
            raise APIError(404, "etag", reason) from e
        self.lru.put(key, data)
        return adapter

    async def _made_again(self, etag: str, request: bytes | GenerateParams) -> bytes | None:
        """The LoRA file of ``etag`` generated again from its request (as ``req:<ETag>`` recorded it, or as
        this process remembers it) through :meth:`generate`, which files it again; None where that request
        is not one this service takes, or gives other bytes (the repository changed since: another artefact
        version). It is a generation like any (a full queue is its 429, a cache miss counted), so it costs
        one before such a 404."""
        try:
            if isinstance(request, bytes):
                body = GenerateRequest.model_validate_json(request)
                request = self.resolve(body.description, body.method, body.seed, body.top_k, body.temperature)
            made = await self.generate(request)
        except (ValidationError, APIError):  # the APIError of a request this service no longer takes (422)
            return None
        if made.etag != etag:
            return None
        log.info("adapter %s: its file had left the cache; generated again from its request", etag)
        return made.data

    def _check_adapter(self, adapter: GeneratedLora) -> None:
        """ValueError unless ``adapter`` (found in Redis by its ETag) is a generated LoRA this service can apply:
        /generate's format, this backbone's kind and MLP activation, and tensors of the layout its metadata names."""
        meta, backbone = adapter.metadata, self.artifacts.backbone
        if meta.get("format") != "sglora-lora":
            raise ValueError(f"its format is {meta.get('format')!r}")
        if meta.get("backbone_kind") != backbone.config.kind:
            raise ValueError(f"it was made for the {meta.get('backbone_kind')!r} backbone kind")
        if problem := activation_problem(getattr(backbone, "activation", None), meta, "this backbone's"):
            raise ValueError(f"it {problem}")
        if problem := tower_problem(getattr(backbone, "tower", None), meta):
            raise ValueError(f"it {problem}")
        from_peft_tensors(self.spec_of(adapter), load_safetensors(adapter.data))

    # ---- retrieval ------------------------------------------------------------------------------
    async def decode_images(self, images: list[bytes]) -> list[torch.Tensor]:
        """Uploaded bytes -> the backbone's input pixels, (C, H, W) each, off the event loop; APIError(422,
        "images[i]") for a bad image, and (422, "images") when together they have more pixels than allowed,
        checked before any decoding. Each image is decoded and preprocessed in one step, so that a request
        waiting for the model threads holds its images at the model's input size, not at full resolution
        (four 4096 x 4096 uploads held 833 MB decoded, each queued request as much)."""
        per_image, total = self.settings.max_image_pixels, self.settings.max_request_pixels
        opened = await asyncio.to_thread(lambda: [open_image(b, f"images[{i}]", per_image) for i, b in enumerate(images)])
        pixels = sum(im.size[0] * im.size[1] for im in opened)
        if pixels > total:
            raise APIError(422, "images", f"the images have {pixels} pixels together, more than the limit of {total}")
        preprocess = self.artifacts.backbone.preprocess

        def pixels_of(im: Image.Image, field: str) -> torch.Tensor:
            try:
                return preprocess(load_rgb(im, field))
            except RuntimeError as e:  # the CPU allocator's failure: out of memory (a 503), not a bug
                if out_of_memory(e):
                    raise torch.OutOfMemoryError(str(e)) from None
                raise

        return list(await asyncio.gather(*(asyncio.to_thread(pixels_of, im, f"images[{i}]") for i, im in enumerate(opened))))

    async def retrieve(
        self, pixels: list[torch.Tensor], texts: list[str], adapter: GeneratedLora, zero_shot: bool, paired: bool
    ) -> Retrieval:
        """``pixels`` from :meth:`decode_images`; ``paired``: the texts are captions, one per image (recall@1)."""
        await self.follow()
        lora_scores, zs_scores = await self.worker.run(
            self._retrieve_job, pixels, texts, adapter.data, self.spec_of(adapter), zero_shot, paired
        )
        return Retrieval(adapter, texts, lora_scores, zs_scores)

    def _retrieve_job(
        self, pixels: list[torch.Tensor], texts: list[str], weights: bytes, spec: LoraSpec, zero_shot: bool, paired: bool
    ) -> tuple[Scores, Scores | None]:
        backbone = self.artifacts.backbone
        lora = from_peft_tensors(spec, load_safetensors(weights))  # (P,): exactly the bytes the client holds
        t0 = time.perf_counter()
        features = backbone.image_features(torch.stack(pixels).to(backbone.device))  # (N, C, H, W)
        img = backbone.encode_image(features, lora, spec).float().cpu()  # (N, D), L2-normalised
        if not torch.isfinite(img).all():  # null scores in a 200 otherwise
            raise APIError(422, None, "with this LoRA applied the image embeddings are not finite: its values are too large")
        img0 = backbone.encode_image(features).float().cpu() if zero_shot else None
        self.metrics.stage.labels(stage="image_encoding").observe(time.perf_counter() - t0)
        t1 = time.perf_counter()
        txt = self.embed(texts).float()  # (T, D), L2-normalised
        self.metrics.stage.labels(stage="text_encoding").observe(time.perf_counter() - t1)
        t2 = time.perf_counter()
        scores = _rank(img @ txt.t(), paired), (_rank(img0 @ txt.t(), paired) if img0 is not None else None)
        self.metrics.stage.labels(stage="scoring").observe(time.perf_counter() - t2)
        return scores

    # ---- experts --------------------------------------------------------------------------------
    @property
    def repository_dir(self) -> Path:
        return self.artifacts.root / "repository"

    async def expert_file(self, name: str, part: str) -> tuple[bytes, str]:
        """An expert's mean (or element-wise variance) in the format /generate answers and POST /experts
        takes (PEFT tensor names), with the expert and the LoRA layout in its metadata, and the artefact
        version it is of (one state's: GET /experts of that version lists it); APIError(404). Off the event
        loop: it waits for an expert change in progress."""
        await self.follow()
        return await asyncio.to_thread(self._expert_file, name, part)

    # ---- following the repository on disk (SGLORA_FOLLOW_REPOSITORY) ----------------------------------
    async def follow(self) -> None:
        """Under SGLORA_FOLLOW_REPOSITORY: where the repository's index on disk is another file than the one
        last looked at (one ``stat``), takes it up before going on (:meth:`_follow_job`, alone on the model
        threads, as an expert change is). Concurrent requests wait for one reload."""
        if not self.settings.follow_repository or _index_stat(self.repository_dir) == self._index_seen:
            return
        if self._following is None or self._following.done():
            self._following = asyncio.ensure_future(self.worker.run(self._changing, self._follow_job, commit=True))
        await asyncio.shield(self._following)

    def _follow_job(self) -> RepositoryState:
        """Loads the repository again where another process changed it on disk, and serves it. Where that
        fails (a directory rebuilt under a new manifest, a file corrupt) the experts loaded are served on, with
        a warning, until the index changes again."""
        seen = _index_stat(self.repository_dir)
        if seen == self._index_seen:  # taken up meanwhile
            return self.state
        self._index_seen = seen  # before the read: a change after it is seen at the next look
        index = self.repository_dir / INDEX_FILE
        try:
            if seen is not None and hashlib.sha256(index.read_bytes()).hexdigest() == self.artifacts.repository.index_sha256:
                return self.state  # this process's own change
            self._check_artifacts_unchanged()
            # The experts whose files are unchanged come from memory, with the features worked out for them.
            repository = ExpertRepository.load(self.repository_dir, expect_spec=self.spec, reuse=self.artifacts.repository)
            if repository.backbone_fingerprint != self.artifacts.repository.backbone_fingerprint:
                raise ValueError("its experts were trained on another backbone")
        except (OSError, ValueError, APIError) as e:
            reason = e.reason if isinstance(e, APIError) else str(e)
            log.warning(
                "the expert repository in %s changed, but is not taken up (%s): serving the %d experts loaded",
                self.repository_dir,
                reason,
                len(self.state.experts),
            )
            return self.state
        before = len(self.state.experts)
        self.artifacts.repository = self.engine.repository = repository
        self.artifacts.reset_version()
        log.info("expert repository changed by another process (%d experts before): loaded again", before)
        return self._repository_changed()

    def _expert_file(self, name: str, part: str) -> tuple[bytes, str]:
        with self._change_lock:  # the repository as the published state has it
            version = self.state.version
            try:
                expert = self.artifacts.repository[name]
            except KeyError:
                raise APIError(404, "name", f"no expert named {name!r}") from None
        meta = {
            "format": "sglora-expert",
            "name": expert.name,
            "description": expert.description,
            "part": part,
            "num_snapshots": str(expert.num_snapshots),
            **layout_metadata(self.artifacts.backbone, self.spec, version),
        }
        return safetensors_bytes(self.spec, expert.mean if part == "mean" else expert.variance, meta), version

    def _parse_lora(self, data: bytes, field: str) -> torch.Tensor:
        if data.startswith(ZIP_MAGIC):
            reason = "a zip file, not a safetensors file: send the adapter_model.safetensors it holds (a PEFT adapter's weights)"
            raise APIError(422, field, reason)
        if len(data) < 10 or data[8:9] != b"{":  # a safetensors file: 8 bytes of header length, then its JSON
            raise APIError(422, field, "not a safetensors file (it does not start with a safetensors header)")
        if int.from_bytes(data[:8], "little") > MAX_LORA_HEADER_BYTES:
            raise APIError(422, field, f"the safetensors header is larger than {MAX_LORA_HEADER_BYTES} bytes: not a LoRA")
        try:
            tensors = load_safetensors(data)
            metadata = safetensors_metadata(data)
        except (SafetensorError, ValueError, OSError, struct.error) as e:
            raise APIError(422, field, f"not a readable safetensors file: {e}") from e
        if problem := self._layout_problem(metadata, field):
            raise APIError(422, field, problem)
        try:
            vec = from_peft_tensors(self.spec, tensors)
        except ValueError as e:
            raise APIError(422, field, str(e)) from e
        if not torch.isfinite(vec).all() and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            top = max(float(t.abs().max()) for t in tensors.values() if t.is_floating_point() and t.numel())
            reason = f"its values overflow float32 (largest |value| {top:.3g}): not a LoRA of this repository's scale"
            raise APIError(422, field, reason)
        try:
            check_finite(vec, field)
        except ValueError as e:
            raise APIError(422, field, str(e)) from e
        return vec

    def _layout_problem(self, metadata: dict[str, str], field: str) -> str | None:
        """Why a file's SG-LoRA metadata (/generate's, GET /experts/{name}'s) says it is not a ``field`` (mean or
        variance) of this repository's layout; None when it fits or carries none (a PEFT file: its shapes are
        checked, its scale cannot be). The shapes alone pass a file of another alpha or scaling, which would then
        be applied at this repository's scale, and a variance sent as a mean."""
        fmt, part = metadata.get("format") or "", metadata.get("part")
        # PEFT and transformers write {"format": "pt"}: no SG-LoRA metadata, like a file without any.
        if not fmt.startswith("sglora-") and "lora_fingerprint" not in metadata:
            return None
        if fmt.startswith("sglora-") and fmt not in LORA_FORMATS:
            return f"the file's format is {fmt!r}, not an SG-LoRA LoRA or expert file"
        held = part or "mean"  # a generation holds a LoRA: a mean
        if held != field:
            return f"the file holds an expert's {held}, not its {field}"
        kind, own = metadata.get("backbone_kind"), self.artifacts.backbone.config.kind
        if kind is not None and kind != own:
            return f"the file was made for the {kind!r} backbone kind, this repository's is {own!r}"
        if problem := activation_problem(getattr(self.artifacts.backbone, "activation", None), metadata, "this backbone's"):
            return f"the file {problem}"
        if problem := tower_problem(getattr(self.artifacts.backbone, "tower", None), metadata):
            return f"the file {problem}"
        mine = {"rank": self.spec.rank, "alpha": self.spec.alpha, "scaling": self.spec.scaling}
        mine["lora_fingerprint"] = self.spec.fingerprint()
        for key, value in mine.items():
            if key not in metadata:
                continue
            try:
                theirs = type(value)(metadata[key])
            except ValueError:
                return f"the file's {key} is {metadata[key]!r}, not a {type(value).__name__}"
            if theirs != value:
                return (
                    f"the file's {key} is {metadata[key]!r}, this repository's {str(value)!r}: a LoRA of another "
                    "layout or scale (its update would be applied at this repository's)"
                )
        return None

    async def add_expert(
        self, name: str, description: str, mean: bytes, variance: bytes | None, num_snapshots: int
    ) -> RepositoryState:
        """``description`` already normalised (``clean_text``). Every check runs before the repository is touched."""
        name = _checked_name(name)
        if len(description) > self.settings.max_description_chars:
            raise APIError(422, "description", f"longer than {self.settings.max_description_chars} characters")
        self.check_text_length(description, "description")
        if taken := _taken(name, self.artifacts.repository.names):
            raise APIError(409, "name", taken)
        self._check_default_top_k(len(self.artifacts.repository.names) + 1)
        # Off the event loop: an expert file may be hundreds of MB (SGLORA_MAX_EXPERT_BYTES).
        mean_vec = await asyncio.to_thread(self._parse_lora, mean, "mean")
        var_vec = (
            await asyncio.to_thread(self._parse_lora, variance, "variance")
            if variance is not None
            else torch.zeros_like(mean_vec)
        )
        if (var_vec < 0).any():
            raise APIError(422, "variance", "variances must be >= 0")
        # The probe forwards on one model thread while generations go on on the others (0.7 s on ViT-B-16's
        # shape); the job, alone, checks again against the repository it changes.
        await self.worker.run_beside(self._check_scale, mean_vec, var_vec)
        return await self.worker.run(
            self._changing, self._add_expert_job, name, description, mean_vec, var_vec, num_snapshots, commit=True
        )

    def _check_default_top_k(self, experts: int) -> None:
        """APIError(409) where ``experts`` experts would raise the default top_k (the config's, at most the
        number of experts) above SGLORA_MAX_TOP_K: requests without a top_k would then merge more experts than
        a request may ask for, as the start-up check refuses."""
        if min(self.default_top_k, experts) > self.settings.max_top_k:
            raise APIError(
                409,
                None,
                f"with {experts} experts the artefacts' default top_k ({self.default_top_k}) would merge more experts "
                f"than SGLORA_MAX_TOP_K={self.settings.max_top_k} allows a request; raise SGLORA_MAX_TOP_K to add experts",
            )

    def _check_artifacts_unchanged(self) -> None:
        """APIError(409) where the directory's manifest is no longer the one this server loaded: a pipeline
        ran into it since (a generator trained again, the backbone changed). The repository index may be the
        same bytes, so the repository's own check passed, and the change was saved beside artefacts this server
        does not serve, under a version that no restart would give."""
        path = self.artifacts.root / MANIFEST
        try:
            same = path.read_bytes() == self.artifacts.manifest_bytes
        except FileNotFoundError:
            same = False
        except OSError as e:  # a disk failing to read: the change goes on (the repository checks its own index)
            log.warning("could not read %s to check it is the one loaded: %s", path, e)
            return
        if not same:
            raise APIError(
                409,
                None,
                f"the artefacts in {self.artifacts.root} were rebuilt since this server loaded them (its {MANIFEST} "
                "changed): restart this server to serve them; nothing was changed",
            )

    def _changing(self, job: Callable[..., RepositoryState], *args: Any) -> RepositoryState:
        with self._change_lock:
            return job(*args)

    def _add_expert_job(
        self, name: str, description: str, mean: torch.Tensor, variance: torch.Tensor, num_snapshots: int
    ) -> RepositoryState:
        # A run() job, alone on a model thread: no generation runs while the repository changes.
        if self.settings.follow_repository:
            self._follow_job()
        repo = self.artifacts.repository
        if taken := _taken(name, repo.names):
            raise APIError(409, "name", taken)
        self._check_default_top_k(len(repo.names) + 1)
        self._check_artifacts_unchanged()
        self._check_repository_scale(mean, variance)  # the probe passed before (add_expert)
        embedding = self.embed([description])[0].float()
        # The path comes from a checked name (check_name: no separators, no '..'); the library writes the
        # expert file, then the index, each atomically, and on failure undoes both the in-memory change
        # and the expert file, so a failed upload leaves the directory exactly as it was.
        try:
            expert = Expert(name, description, mean, variance, embedding, num_snapshots)
            with _other_writers(self.settings.follow_repository):
                repo.add_and_save(expert, self.repository_dir, lock_timeout_s=REPOSITORY_LOCK_WAIT_S)
        except ValueError as e:
            raise APIError(422, _value_error_field(str(e)), str(e)) from e
        except OSError as e:
            log.error("could not persist expert %r: %s", name, e)
            raise APIError(500, None, f"could not write the expert repository ({type(e).__name__}); nothing was changed") from e
        return self._repository_changed()

    def _check_scale(self, mean: torch.Tensor, variance: torch.Tensor) -> None:
        """Refuses an expert whose values are finite but far too large. One of 1e10s registered fine, then
        every LoRA it took part in held 1e9s and retrieval with them answered null scores (1e19s: NaN LoRAs).
        Its mean and its standard deviations at most :data:`MAX_EXPERT_SCALE` times the largest |value| among
        the repository's means; and (a bound of its own where the repository is empty) the mean, and the mean
        plus one standard deviation, each applied to a probe image must give finite image embeddings.
        Runs beside generations (:meth:`ModelWorker.run_beside`): the image tower is not theirs, and one probe
        at a time uses it (the LoRA is applied by swapping the tower's parameters for the call)."""
        self._check_repository_scale(mean, variance)
        backbone, spread = self.artifacts.backbone, variance.sqrt()
        with self._probe_lock:
            probe = Image.linear_gradient("L").convert("RGB")  # 256 x 256, every pixel value
            features = backbone.image_features(backbone.preprocess(probe)[None].to(backbone.device))
            for field, lora in (("mean", mean), ("variance", mean + spread)):
                if not torch.isfinite(backbone.encode_image(features, lora, self.spec)).all():
                    reason = "applied to the backbone, this LoRA gives non-finite image embeddings: its values are too large"
                    raise APIError(422, field, reason)

    def _check_repository_scale(self, mean: torch.Tensor, variance: torch.Tensor) -> None:
        """:meth:`_check_scale`'s bound by the repository's largest |mean|: cheap (kept per state of the
        repository, extended by an addition), so the change's job checks it again against the state it changes."""
        largest = self._largest_mean() if len(self.artifacts.repository) else 0.0
        if largest <= 0:  # a repository of zero means has no scale: the probe bounds it
            return
        for field, values, what in (("mean", mean, "value"), ("variance", variance.sqrt(), "standard deviation")):
            if (top := float(values.abs().max())) > MAX_EXPERT_SCALE * largest:
                raise APIError(
                    422,
                    field,
                    f"its largest |{what}| is {top:.3g}, over {MAX_EXPERT_SCALE:g} times the largest |value| among the "
                    f"repository's expert means ({largest:.3g}): not a LoRA of this repository's scale",
                )

    def _largest_mean(self) -> float:
        """The largest |value| among the repository's expert means, once per state of the repository, and
        extended by an addition's row; from their least and greatest values (the same number as
        ``abs().max()``, without an E x P temporary)."""

        def largest(means: torch.Tensor, variances: torch.Tensor, embeddings: torch.Tensor) -> float:
            low, high = torch.aminmax(means)
            return max(-float(low), float(high))

        def extend(value: float, means: torch.Tensor, variances: torch.Tensor, embeddings: torch.Tensor) -> float:
            return max(value, largest(means, variances, embeddings))  # the same number: max is exact

        return self.artifacts.repository.derived("largest_abs_mean", largest, extend)

    async def remove_expert(self, name: str) -> RepositoryState:
        name = _checked_name(name)
        async with self._removing:
            prepared = None
            repo = self.artifacts.repository
            if name in repo and len(repo) > 1:  # else the job answers (404, 409) without the copy
                # The remaining experts' copy into a new stack (0.5 s at 1,000 experts of ViT-B-16's shape) runs
                # on one model thread while generations go on on the others; the change takes it where the
                # repository is still the one it was made from, else stacks anew itself.
                prepared = await self.worker.run_beside(self._stack_without, name)
            return await self.worker.run(self._changing, self._remove_expert_job, name, prepared, commit=True)

    def _stack_without(self, name: str) -> PreparedRemoval | None:
        try:
            return self.artifacts.repository.stack_without(name)
        except (KeyError, ValueError):  # removed meanwhile: the job answers
            return None
        except (RuntimeError, MemoryError):  # an optimisation (out of memory, say): the change stacks as before
            log.warning("could not stack the experts ahead of removing %r; the removal will", name, exc_info=True)
            return None

    def _remove_expert_job(self, name: str, prepared: PreparedRemoval | None = None) -> RepositoryState:
        if self.settings.follow_repository:
            self._follow_job()
        repo = self.artifacts.repository
        if name not in repo:
            raise APIError(404, "name", f"no expert named {name!r}")
        if len(repo) == 1:
            raise APIError(409, "name", "cannot remove the last expert")
        self._check_artifacts_unchanged()
        try:
            with _other_writers(self.settings.follow_repository):  # index first (atomic), then the expert file
                repo.remove_and_save(name, self.repository_dir, lock_timeout_s=REPOSITORY_LOCK_WAIT_S, prepared=prepared)
        except OSError as e:
            if name not in repo:  # the index was written, only deleting the expert's file failed: removed
                log.warning("expert %r removed, but its file could not be deleted: %s", name, e)
                return self._repository_changed()
            # The library's rollback restores the experts in their order, matching the index on disk.
            log.error("could not persist the removal of expert %r: %s", name, e)
            raise APIError(500, None, f"could not write the expert repository ({type(e).__name__}); nothing was changed") from e
        return self._repository_changed()

    @property
    def version(self) -> str:
        return self.state.version

    def _state_of(self, version: str) -> RepositoryState:
        repo = self.artifacts.repository
        experts = tuple(ExpertEntry(e.name, e.description, e.num_snapshots) for e in map(repo.__getitem__, repo.names))
        return RepositoryState(version, min(self.default_top_k, len(experts)), experts)

    def _repository_changed(self) -> RepositoryState:
        """On the model thread of the change, alone, once it is saved: the new state, published by one
        assignment. Its version is the artefacts' (:attr:`~sglora.artifacts.Artifacts.version`):
        :func:`~sglora.artifacts.artefact_version` of the directory now, from the bytes the server holds (the
        manifest read at start-up, the index just written), so that a disk failing after the save cannot leave
        the repository changed and the state not. Then the engine
        restacks the experts and works out the new ones' generator features, here in the change's job
        rather than in the first generation after it; where that fails (memory), the next generation does
        it, and the change, saved already, stands."""
        try:
            state = self._state_of(self.artifacts.version)
        except Exception as e:  # memory alone, now: saved, but not served; a 503 "retry" would meet a 409
            log.exception("expert repository changed on disk, but the new state could not be published")
            raise APIError(
                500, None, f"the change was saved, but the service could not take it up ({type(e).__name__}): restart it"
            ) from e
        self.state = state
        self.engine.top_k = state.top_k
        try:
            self.engine.refresh()
        except Exception:  # noqa: BLE001 - an optimisation: the change is saved and published
            log.exception("expert repository changed; working out the new state ahead failed (the next generation will)")
        self.metrics.set_info(self.backbone_name, state.version, __version__, self.device, self.text_dtype, self.generator_dtype)
        log.info("expert repository changed: %d experts, artefact version %s", len(state.experts), state.version)
        return state

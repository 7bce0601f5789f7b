"""Service settings: one class, read from ``SGLORA_*`` environment variables once per app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from redis.connection import parse_url

from app.hosts import canonical_host
from app.workers import WORKER_DIR, WORKER_FD, WORKER_INDEX
from sglora.devices import check_device_name, resolve_device

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # what redis-py's from_url takes


class StartupError(ValueError):
    """A setting that cannot work on this machine (e.g. SGLORA_DEVICE=cuda without a GPU): the service refuses to start."""


class Settings(BaseSettings):
    """Every knob of the service. Lists (API keys) take a comma-separated string."""

    # hide_input_in_errors: a refused setting is named, its value not echoed (it may be a key) into logs and stderr.
    # allow_inf_nan=False: no float setting takes inf or nan (SGLORA_BATCH_WAIT_MS=inf held every batch open until
    # its requests' 504s; SGLORA_REDIS_TIMEOUT_S=inf hung /ready on a stalled Redis).
    model_config = SettingsConfigDict(env_prefix="SGLORA_", extra="ignore", hide_input_in_errors=True, allow_inf_nan=False)

    # ---- artefacts and device ----------------------------------------------------------------------
    artifacts: Path | None = Field(None, description="artefact directory written by `sglora pipeline`")
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads (shared by the model threads); 0 = on a CPU 1, or (the cores - 1) / "
        "model_threads (at least 1) when that is set; on a GPU the cores - 1 (at least 1)",
    )
    model_threads: int = Field(
        0,
        ge=0,
        description="model threads sharing one copy of the weights, each running its own micro-batch; 0 = on a CPU "
        "(the cores - 1) / threads, at least 1, but on one or two cores the cores / threads; on a GPU 1",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes behind the one address (`sglora serve --workers`): each loads its own copy "
        "of the weights and micro-batches its own requests; the CPU defaults of threads and model_threads share "
        "the cores between them, /metrics sums them, and each follows the others' expert changes",
    )
    follow_repository: bool = Field(
        False,
        description="before serving, take up expert changes another process saved in the artefact directory (a "
        "sibling worker, a replica on the same volume, `sglora experts`) instead of refusing later changes with a "
        "409; on for every worker of `--workers N`",
    )
    text_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype of the text tower; 'auto' = bfloat16 on a CPU with bf16 dot products (AVX512-BF16 or AMX), "
        "float32 elsewhere",
    )
    text_graph: Literal["auto", "eager"] = Field(
        "auto",
        description="how the text tower's forward runs; 'auto' = on a CPU, one TorchScript graph traced from it at "
        "start-up where it gives the eager forward's bits for the repository's first descriptions (alone and "
        "batched; a lone description on the offline default 7.7 -> 5.2 ms on one core, the GIL free for the whole "
        "forward), else eagerly; 'eager' = module by module, as torch runs it",
    )
    generator_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype the CVAE's sampling layers run in (on a CPU, oneDNN); 'auto' = bfloat16 on a CPU with bf16 "
        "dot products (AVX512-BF16 or AMX), float32 elsewhere. bfloat16 reads half the weight bytes a pass (the "
        "offline default's work after the text forward: 1.61 against 1.98 ms on an AMX Xeon) with the same accuracy "
        "on the validation and test tasks; float32 gives the evaluated generator's samples bit for bit",
    )

    gc_freeze: bool = Field(
        True,
        description="after start-up, freeze the objects the loaded model left (gc.freeze), so that a full collection of "
        "Python's garbage collector skips them: on the offline default under load 300 ms -> 12-15 ms per full collection, "
        "a stall of every request",
    )

    # ---- cache -------------------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the LoRA cache; empty disables caching")
    cache_ttl_s: int = Field(24 * 3600, ge=1, description="lifetime of a cached LoRA")
    cache_prefix: str = Field("sglora:", description="prefix of every Redis key this service writes")
    redis_timeout_s: float = Field(0.25, gt=0, description="connect and socket timeout of each Redis call")
    redis_backoff_s: float = Field(
        5.0, ge=0, description="longest skip of Redis after errors (the skip doubles with each failed retry, up to this)"
    )
    redis_backoff_min_s: float = Field(
        0.5, gt=0, description="skip of Redis after an error that follows a success (at most SGLORA_REDIS_BACKOFF_S)"
    )
    redis_max_connections: int = Field(128, ge=1, description="Redis connection pool size; beyond, calls wait (timeout)")
    lru_bytes: int = Field(64 << 20, ge=0, description="in-process LRU of recent LoRAs by ETag (for /retrieve and hot keys)")
    hot_keys: int = Field(
        4096,
        ge=0,
        description="requests whose LoRA a repeat gets from process memory (the ETag LRU) without asking Redis (0: off); "
        "only with the Redis cache on",
    )
    embedding_cache_items: int = Field(
        4096,
        ge=0,
        description="in-process LRU of recent descriptions' text embeddings (0: off): a description seen before skips "
        "the text encoder, e.g. a request without a seed (never looked up in Redis) or another seed, method or top_k",
    )

    # ---- access ------------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="keys accepted on every model endpoint (X-API-Key); empty = open"
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="keys for POST/DELETE /experts; empty = expert changes disabled"
    )

    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="host names a request's Host header may carry (comma-separated; '*.example.com' for a domain's "
        "subdomains; '*' = any): elsewhere 400, against DNS rebinding; /health, /ready and /metrics answer any Host",
    )

    # ---- worker, batching, limits --------------------------------------------------------------------
    max_batch: int = Field(32, ge=1, description="most descriptions encoded in one text-encoder call")
    batch_wait_ms: float = Field(2.0, ge=0, description="under load, wait this long for a micro-batch to fill")
    batch_invariance: Literal["require", "ignore"] = Field(
        "require",
        description="'require': at start-up, check that a description's embedding is bit-identical alone and in a batch "
        "on this device and thread count, and encode one description at a time if not (a seeded LoRA then never depends "
        "on its neighbours); 'ignore': batch regardless",
    )
    max_queue: int = Field(256, ge=1, description="jobs waiting for or in the model worker; beyond: 429")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of a 429 (and of a 503 over SGLORA_MAX_CONNECTIONS)")
    request_timeout_s: float = Field(30.0, gt=0, description="longest wait for the model worker; beyond: 504")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="on shutdown, wait this long for queued jobs")
    max_description_chars: int = Field(1000, ge=1, description="length limit of a description or caption (normalised)")
    max_batch_items: int = Field(32, ge=1, description="descriptions per /generate/batch call")
    max_batch_bytes: int = Field(
        256 << 20,
        ge=1,
        description="the LoRA bytes one /generate/batch call may ask for, before base64 (an exact merge's file is "
        "top_k (+2) times a LoRA's: 32 items of sg-lora-exact at top_k 64 would be ~1 GB on ViT-B-16's shape)",
    )
    max_top_k: int = Field(
        64,
        ge=1,
        description="the largest top_k a request may ask for (also bounded by the number of experts): a merge reads "
        "top_k x P values and an exact merge makes a rank top_k x r file, so an unbounded top_k on a large "
        "repository held the model for seconds and gigabytes (1.7 s and 4 GB at 1,000 experts of ViT-B-16's shape)",
    )
    max_images: int = Field(64, ge=1, description="images per /retrieve call")
    max_image_bytes: int = Field(10 << 20, ge=1, description="size limit of one uploaded image")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height limit of one uploaded image")
    max_request_pixels: int = Field(1 << 26, ge=1, description="width x height of all images of one request together")
    max_expert_bytes: int = Field(256 << 20, ge=1, description="size limit of an uploaded expert file")
    keep_alive_timeout_s: float = Field(
        5.0,
        gt=0,
        allow_inf_nan=False,
        description="how long an idle kept-alive connection stays open (uvicorn's timeout_keep_alive); behind a load "
        "balancer, longer than its idle timeout (sglora serve / python -m app)",
    )
    client_header_timeout_s: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="a request's line and headers must arrive within this of the connection or its first byte; 408",
    )
    client_body_timeout_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="longest pause between two reads of a request body; 408 (sglora serve / python -m app)",
    )
    max_connections: int = Field(
        1000,
        ge=0,
        description="open HTTP connections beyond which a new connection's request is answered 503 with Retry-After "
        "and the connection closed (/health, /ready, /metrics still answered); 0 = unbounded (sglora serve / python -m app)",
    )
    max_client_connections: int = Field(
        0,
        ge=0,
        description="open HTTP connections from one client address beyond which its new connection's request is answered "
        "503 as over max_connections; 0 = unbounded (behind a proxy every client has the proxy's address: bound it there)",
    )
    max_body_bytes: int = Field(
        0, ge=0, description="size limit of a whole request body (413 beyond); 0 = derived from the image and expert limits"
    )
    max_json_bytes: int = Field(
        0,
        ge=0,
        description="size limit of a JSON body (/generate*; 413 beyond); 0 = derived from the batch and description limits",
    )

    # ---- tests only ----------------------------------------------------------------------------------
    test_model_delay_s: float = Field(
        0.0, ge=0, description="TEST ONLY: the model thread sleeps this long before every job (a slow model); 0 = off"
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        return check_device_name(v, "SGLORA_DEVICE")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if not v:
            return v
        if not v.startswith(REDIS_SCHEMES):
            # The scheme alone is shown: the rest may hold a password (redis+sentinel://:secret@host)
            shown = v.partition("://")[0] + "://..." if "://" in v else "a URL without a scheme"
            raise ValueError(
                f"SGLORA_REDIS_URL must start with one of {', '.join(REDIS_SCHEMES)} (or be empty: no cache), got {shown}"
            )
        # The rest as redis-py reads it when the cache connects (after the artefacts have loaded): a bad port or
        # host was a traceback there. Its messages name the part ("Port out of range 0-65535"), never the password.
        try:
            options = parse_url(v)
        except ValueError as e:
            raise ValueError(f"SGLORA_REDIS_URL is not a valid Redis URL: {e}") from None
        # redis-py drops a database path that is not a number (redis://host/cache) and uses database 0.
        path = urlsplit(v).path.strip("/")
        if not v.startswith("unix://") and "db" not in options and path:
            raise ValueError(f"SGLORA_REDIS_URL: the path names the database by its number (redis://host:6379/0), got /{path}")
        if options.get("db", 0) < 0:
            raise ValueError("SGLORA_REDIS_URL: the database number is negative")
        return v

    @model_validator(mode="after")
    def _batch_wait_within_timeout(self) -> Settings:
        if self.batch_wait_ms / 1000 >= self.request_timeout_s:
            raise ValueError(
                f"SGLORA_BATCH_WAIT_MS ({self.batch_wait_ms:g} ms) must be shorter than SGLORA_REQUEST_TIMEOUT_S "
                f"({self.request_timeout_s:g} s): requests waiting for their batch to fill would time out"
            )
        return self

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, str):
            keys = [k.strip() for k in v.split(",") if k.strip()]
            if v.strip() and not keys:  # " , " left the API open without a word
                raise ValueError(f"SGLORA_{info.field_name.upper()} holds only blanks and commas; leave it unset for no key")
            v = keys
        for i, k in enumerate(v if isinstance(v, list) else []):
            # A header value is read as Latin-1, the key hashed as UTF-8: a non-ASCII key never matched. Not echoed.
            if not isinstance(k, str) or not k or any(not 33 <= ord(c) <= 126 for c in k):
                raise ValueError(f"SGLORA_{info.field_name.upper()}: key {i + 1} is not printable ASCII without spaces")
        return v

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, v: object) -> object:
        if isinstance(v, str):
            v = [h.strip() for h in v.split(",") if h.strip()]
        if not isinstance(v, list):
            return v
        if not v:
            raise ValueError("SGLORA_ALLOWED_HOSTS is empty: no request would be answered; '*' allows any host")
        out = []
        for h in v:
            wild = isinstance(h, str) and h.startswith("*.")
            name = canonical_host(h[2:] if wild else h) if isinstance(h, str) and h != "*" else h
            if name is None or not isinstance(name, str) or (wild and name.startswith("[")):
                raise ValueError(
                    f"SGLORA_ALLOWED_HOSTS: {h!r} is not a host name, an IP address ([::1] for IPv6), '*.domain' or '*' "
                    "(no port, no scheme)"
                )
            out.append("*." + name if wild else name)
        if "*" in out and len(out) > 1:
            raise ValueError("SGLORA_ALLOWED_HOSTS: '*' allows any host; list no other name with it")
        return out

    def resolved_max_body_bytes(self) -> int:
        """0 -> room for the largest legitimate body: a full /retrieve or an expert (mean + variance), + 1 MiB of fields."""
        if self.max_body_bytes > 0:
            return self.max_body_bytes
        return max(self.max_images * self.max_image_bytes, 2 * self.max_expert_bytes) + (1 << 20)

    def resolved_max_json_bytes(self) -> int:
        """0 -> room for the largest valid /generate/batch (every character of every description escaped as a
        surrogate pair, 12 bytes), + 1 MiB for the rest."""
        if self.max_json_bytes > 0:
            return self.max_json_bytes
        return 12 * self.max_batch_items * self.max_description_chars + (1 << 20)

    def resolved_parallelism(self, device: str) -> tuple[int, int]:
        """(model threads, torch intra-op threads) for ``device``.

        On a CPU the default is one intra-op thread per model thread and one model thread per spare
        core (the event loop keeps one), or per core on one or two cores: a torch op then runs on its
        caller's thread at the shape it has alone, so micro-batches stay bit-identical (two or more
        intra-op threads round differently by batch size, and the start-up check then turns batching
        off), and N model threads use N cores. No OpenMP pool is oversubscribed: one that competes for
        busy cores can slow a forward down by an order of magnitude. On two cores a second model thread
        beside the event loop, which is idle most of the time, gave 1.4x the load test's answers per second
        and 1.12x the 32-client benchmark's misses per second, at the same server-side hit latency
        (docs/benchmarks.md, release 0.9.11). On a GPU one model thread feeds the device.
        Each of ``workers`` server processes counts its share of the cores (at least one).
        """
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cores = max(1, cores // self.workers)  # this worker's share
        spare = max(1, cores - 1)
        if device.startswith("cpu"):
            threads = self.threads or (max(1, spare // self.model_threads) if self.model_threads else 1)
            return self.model_threads or max(1, (cores if cores <= 2 else spare) // threads), threads
        return self.model_threads or 1, self.threads or spare

    def resolved_text_dtype(self, device: str) -> str:
        """'float32' or 'bfloat16'. 'auto' picks bfloat16 only where the processor multiplies bf16 natively
        (elsewhere a bf16 forward is emulated and slower than float32): about 1.5x faster for one
        description and 2x in a batch of 32 on one AVX512-BF16 core (docs/benchmarks.md)."""
        return _resolved_dtype(self.text_dtype, device)

    def resolved_generator_dtype(self, device: str) -> str:
        """'float32' or 'bfloat16'; 'auto' as for the text tower. A bfloat16 CVAE pass reads half the weight
        bytes (the generator's P x H blocks: 4 MiB instead of 8 on the offline default); its samples are
        within ~2e-3 relative of float32's (docs/benchmarks.md)."""
        return _resolved_dtype(self.generator_dtype, device)

    def resolved_device(self) -> str:
        """'auto' resolved; ValueError when the device named does not exist here (no CUDA, no such GPU)."""
        return resolve_device(self.device, "SGLORA_DEVICE")


# SGLORA_ variables read outside this class: by `sglora serve` / `python -m app`, and by the Prometheus and
# Grafana files of deploy/ run without Docker (docs/service.md tells users to export them beside the others), and
# by docker-compose.gpu.yml (the torch index of its image).
OTHER_VARIABLES = frozenset(
    {"SGLORA_LOG_FORMAT", "SGLORA_PROMETHEUS_URL", "SGLORA_GRAFANA_DASHBOARDS", "SGLORA_TORCH_INDEX"}
    # set by `--workers N`'s supervisor in each worker's environment
    | {WORKER_FD, WORKER_DIR, WORKER_INDEX}
)


def settings_error(e: ValidationError) -> str:
    """What is wrong with the ``SGLORA_*`` variables, one line each, named as the variable (pydantic names
    the field: "threads: Input should be greater than or equal to 0")."""
    prefix = Settings.model_config["env_prefix"]
    lines = []
    for err in e.errors():
        message = err["msg"].removeprefix("Value error, ")
        name = prefix + str(err["loc"][0]).upper() if err["loc"] else ""
        lines.append(message if not name or message.startswith(name) else f"{name}: {message}")
    return "; ".join(lines)


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """``SGLORA_*`` environment variables that no setting reads: a misspelt one (``SGLORA_MAX_QUEU``) was
    dropped without a word, the setting left at its default."""
    environ = os.environ if environ is None else environ
    prefix = Settings.model_config["env_prefix"]
    known = {prefix + name.upper() for name in Settings.model_fields} | OTHER_VARIABLES
    return sorted(k for k in environ if k.upper().startswith(prefix) and k.upper() not in known)


def _resolved_dtype(setting: str, device: str) -> str:
    """A dtype setting as set, or for 'auto': bfloat16 on a CPU with native bf16 dot products, else float32."""
    if setting != "auto":
        return setting
    return "bfloat16" if device.startswith("cpu") and cpu_has_bf16() else "float32"


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has native bf16 dot products (the avx512_bf16 or amx_bf16 flag; Linux only)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.partition(":")[2].split()))
    return False

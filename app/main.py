"""Builds the FastAPI app. ``sglora serve`` runs ``uvicorn app.main:create_app --factory``.

The lifespan loads and checks the artefacts (refusing to start, with the problem named, when a file
is missing, corrupt or inconsistent), starts the model worker and warms it up; on shutdown it stops
taking model jobs, finishes the accepted ones and closes Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.deps import KeyGateMiddleware, UploadGateMiddleware
from app.errors import install_error_handlers
from app.hosts import AllowedHostsMiddleware
from app.lifetime import RequestLifetimeMiddleware
from app.limits import BodyLimitMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.request_id import RequestIdFilter, RequestIdMiddleware
from app.routes import experts, generate, health, retrieve, ui
from app.runtime import freeze_heap, unfreeze_heap
from app.service import Service
from app.settings import Settings, StartupError, unknown_variables
from app.workers import MetricsSocket, WorkerPlace
from sglora import __version__
from sglora.artifacts import ArtifactError

log = logging.getLogger("sglora.app")

DOCS_STATIC = "/static-docs"  # Swagger UI's and ReDoc's scripts (fastapi-offline's copies)

DESCRIPTION = """
Generates LoRA adapters for a frozen CLIP-style model from a task description (SG-LoRA):
the description picks the most similar experts of a repository, their LoRAs form a prior,
and a conditional VAE samples a LoRA from it.

* `POST /generate` returns the LoRA as safetensors with PEFT names (or a zipped PEFT folder);
  `POST /generate/preview` answers the chosen experts, weights and seed as JSON.
* `POST /retrieve` ranks images and texts with a generated LoRA applied.
* `GET/POST/DELETE /experts` manage the expert repository.
* `GET /` is a small browser UI over these endpoints.
"""


def _configure_logging() -> None:
    """uvicorn configures only its own loggers: give ``sglora.*`` a handler unless the host set one up."""
    logger = logging.getLogger("sglora")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.addFilter(RequestIdFilter())  # " [request <id>]" on the lines logged while serving a request
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s:%(request)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app; settings default to the ``SGLORA_*`` environment."""
    settings = settings or Settings()
    _configure_logging()
    if unknown := unknown_variables():
        log.warning("ignoring unknown environment variables %s: no setting reads them (misspelt?)", ", ".join(unknown))
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The service sets torch's thread count for the process; an app run inside a larger process (a
        # notebook, a test session) gets the caller's back when it stops or fails to start.
        threads = torch.get_num_threads()
        try:
            service = await Service.start(settings, metrics)
        except BaseException as e:
            torch.set_num_threads(threads)
            if isinstance(e, ArtifactError | StartupError):
                log.error("cannot start: %s", e)
            raise
        app.state.service = service
        frozen = settings.gc_freeze
        if frozen:
            log.info("garbage collector: %d start-up objects frozen", freeze_heap())
        metrics.gc_pauses.install()
        place = app.state.worker_place
        # Under --workers: this worker's metrics for its siblings' /metrics (app/workers.py), once it serves.
        metrics_socket = MetricsSocket(metrics.registry, place.socket_path(place.index)) if place else None
        try:
            yield
        finally:
            try:
                if metrics_socket is not None:
                    metrics_socket.close()
                await service.stop()
            finally:
                metrics.gc_pauses.uninstall()  # after the drain: its pauses count too
                if frozen:
                    unfreeze_heap()
                torch.set_num_threads(threads)
            log.info("stopped")

    # /docs and /redoc with their scripts served from the package (FastAPI's own pages fetch them from
    # cdn.jsdelivr.net, and stay blank on a machine without internet access).
    app = FastAPIOffline(title="SG-LoRA", version=__version__, description=DESCRIPTION, lifespan=lifespan, static_url=DOCS_STATIC)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.worker_place = WorkerPlace.from_environment()
    if settings.workers > 1 and app.state.worker_place is None:
        log.warning(
            "SGLORA_WORKERS=%d is read by `sglora serve` and `python -m app` alone: under another server this "
            "process serves alone, with 1/%d of the cores' threads by default",
            settings.workers,
            settings.workers,
        )
    app.state.service = None
    json_limit = min(settings.resolved_max_json_bytes(), settings.resolved_max_body_bytes())
    # Innermost: one deadline for a request's model waits; a request whose client went away is cancelled (499).
    app.add_middleware(RequestLifetimeMiddleware, request_timeout_s=settings.request_timeout_s)
    # Before a body is read: an upload's 429 while the queue is full (inside the key check: a 401 comes first)
    app.add_middleware(UploadGateMiddleware, retry_after_s=settings.retry_after_s)
    app.add_middleware(KeyGateMiddleware, settings=settings)  # a key is checked before a body is read
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.resolved_max_body_bytes(),
        path_limits=dict.fromkeys((r.path for r in generate.router.routes), json_limit),  # the JSON endpoints
    )
    if "*" not in settings.allowed_hosts:  # '*' (the default) checks nothing: no layer on every request
        app.add_middleware(AllowedHostsMiddleware, allowed_hosts=settings.allowed_hosts)  # before keys and bodies
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # counts the 413s of the limit and the Host 400s too
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries X-Request-ID, a bug's 500 too
    install_error_handlers(app, settings.retry_after_s)
    for r in (generate.router, retrieve.router, experts.router, health.router, ui.router):
        app.include_router(r)
    app.mount("/static", ui.UiStaticFiles(directory=ui.STATIC_DIR), name="static")  # refuses paths outside the folder
    return app

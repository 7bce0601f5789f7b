"""GET /health (liveness), /ready (artefacts loaded, Redis state) and /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.schemas import Health, Ready
from app.workers import service_metrics

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="Liveness")
async def health() -> Health:
    """Answers while the process serves HTTP; touches neither the model nor Redis."""
    return Health(status="ok")


@router.get(
    "/ready", response_model=Ready, summary="Readiness", responses={503: {"model": Ready, "description": "starting or draining"}}
)
async def ready(request: Request) -> Ready | JSONResponse:
    """200 once the artefacts are loaded and the model answered a warm-up; reports Redis as ok, degraded or disabled."""
    service = request.app.state.service
    if service is None:
        return JSONResponse(Ready(status="starting").model_dump(), status_code=503)
    if service.worker.closing:
        return JSONResponse(Ready(status="draining").model_dump(), status_code=503)
    redis = await service.cache.ping()
    state = service.state  # one snapshot: the version and the number of experts agree
    return Ready(
        status="ready",
        redis=redis,
        redis_problem=service.cache.last_problem if redis == "degraded" else None,
        artifact_version=state.version,
        backbone=service.backbone_name,
        device=service.device,
        experts=len(state.experts),
        queue=service.worker.pending,
        max_batch=service.worker.max_batch,
        model_threads=service.worker.model_threads,
        text_dtype=service.text_dtype,
        text_graph=service.artifacts.backbone.text_graph,
        text_fixed_rows=service.artifacts.backbone.text_fixed_rows,
        generator_dtype=service.generator_dtype,
        cvae_pass_rows=list(service.engine.pass_rows) if service.engine.generator is not None else None,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": 'sglora_cache_events_total{result="hit"} 12.0\n'}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: the service's own metrics start with `sglora_`; the client library's process and
    interpreter metrics (`process_*`, `python_*`) come with them. Under `sglora serve --workers N`, every
    worker's, summed (docs/service.md)."""
    registry, place = request.app.state.metrics.registry, request.app.state.worker_place
    if place is None:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(await asyncio.to_thread(service_metrics, registry, place), media_type=CONTENT_TYPE_LATEST)


# HEAD wherever GET answers (HTTP says so; some health checkers send it): the same handler, the body left out.
for _path, _endpoint in (("/health", health), ("/ready", ready), ("/metrics", metrics)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False, response_model=None)

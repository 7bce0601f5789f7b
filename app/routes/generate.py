"""POST /generate and /generate/batch: a LoRA for a task description."""

from __future__ import annotations

import asyncio
import base64

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.deps import KEY_ERRORS, JsonModelCall, JsonRoute, etag_matches, header_parameters, wants_zip
from app.errors import OUT_OF_MEMORY, APIError, note_out_of_memory
from app.schemas import (
    BatchGenerateRequest,
    BatchGenerateResponse,
    BatchItemResult,
    ErrorDetail,
    ExpertChoiceOut,
    GenerateRequest,
    GenerationInfo,
)
from app.service import GeneratedLora, Service
from app.worker import Overloaded, ShuttingDown, WorkerTimeout

# Each route's one dependency checks the key and the JSON body and gives the service (JsonModelCall).
router = APIRouter(tags=["generate"], route_class=JsonRoute)

_ERRORS = {
    **KEY_ERRORS,
    413: {
        "description": "the body is larger than the JSON endpoints' limit (`SGLORA_MAX_JSON_BYTES`); for /generate/batch "
        "also: the items' LoRA files would be more than `SGLORA_MAX_BATCH_BYTES` in all"
    },
    415: {"description": "the body was not sent as JSON (`Content-Type: application/json`)"},
    422: {
        "description": "bad input; `field` names it",
        "content": {
            "application/json": {
                "example": {"detail": {"field": "top_k", "reason": "must be between 1 and the number of experts (40), got 50"}}
            }
        },
    },
    429: {"description": "queue full; retry after `Retry-After` seconds"},
    503: {"description": "starting, stopping, or out of memory for this request; retry after `Retry-After` seconds"},
    504: {"description": "the model did not answer in time"},
}
MAX_HEADER_EXPERTS = 16  # experts X-Experts lists
_HEADERS = {
    "X-Cache": {"description": "hit or miss", "schema": {"type": "string"}},
    "ETag": {"description": "adapter id; pass it to /retrieve as `etag`", "schema": {"type": "string"}},
    "X-Method": {"description": "the method that made the LoRA", "schema": {"type": "string"}},
    "X-Seed": {"description": "sg-lora sampling seed (drawn when the request had none)", "schema": {"type": "integer"}},
    "X-Experts": {
        "description": f"chosen experts as name=weight, comma-separated, heaviest first; at most {MAX_HEADER_EXPERTS} "
        "(the file's metadata lists them all)",
        "schema": {"type": "string"},
    },
    "X-Experts-Count": {"description": "how many experts the LoRA was made from", "schema": {"type": "integer"}},
    "X-Artifact-Version": {"description": "artefact version the LoRA was made with", "schema": {"type": "string"}},
    "X-Request-ID": {
        "description": "the request's own X-Request-ID when sane, else a fresh one (every answer has one)",
        "schema": {"type": "string"},
    },
}


def lora_headers(lora: GeneratedLora, etag: str) -> dict[str, str]:
    experts = lora.experts
    # Heaviest first (the top-K methods list them so already; model-soup in the repository's order, equal
    # weights, so by similarity), at most MAX_HEADER_EXPERTS: model-soup's every expert made a header of
    # 5.7 kB at 144 experts (past the 4-8 kB a proxy such as nginx buffers by default) and 200 kB at 4,000.
    shown = sorted(experts, key=lambda e: (-e["weight"], -e["similarity"]))[:MAX_HEADER_EXPERTS]
    headers = {
        "X-Cache": lora.cache,
        "ETag": f'"{etag}"',
        "X-Method": lora.method,
        "X-Experts": ",".join(f"{e['name']}={e['weight']:.4f}" for e in shown),
        "X-Experts-Count": str(len(experts)),
        "X-Artifact-Version": lora.metadata.get("artifact_version", ""),
    }
    if lora.seed is not None:
        headers["X-Seed"] = str(lora.seed)
    return headers


def _params(service: Service, body: GenerateRequest):
    return service.resolve(body.description, body.method, body.seed, body.top_k, body.temperature)


@router.post(
    "/generate",
    response_class=Response,
    summary="Generate a LoRA",
    responses={
        200: {
            "description": "the LoRA as safetensors with PEFT tensor names (or a zipped PEFT adapter folder)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            },
            "headers": _HEADERS,
        },
        304: {"description": "If-None-Match matched the ETag"},
        **_ERRORS,
    },
    openapi_extra=header_parameters("accept", "if-none-match", "x-api-key"),
)
async def generate(body: GenerateRequest, service: JsonModelCall, request: Request) -> Response:
    """Generates a LoRA for a task description: safetensors, or a zipped PEFT folder with `Accept: application/zip`."""
    lora = await service.generate(_params(service, body))
    want_zip = wants_zip(request.headers.get("accept"))
    etag = f"{lora.etag}-zip" if want_zip else lora.etag
    headers = lora_headers(lora, etag)
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    if want_zip:
        data, media, ext = await service.zip_of(lora), "application/zip", "zip"
    else:
        data, media, ext = lora.data, "application/octet-stream", "safetensors"
    headers["Content-Disposition"] = f'attachment; filename="sglora-{lora.etag[:12]}.{ext}"'
    return Response(data, media_type=media, headers=headers)


@router.post(
    "/generate/preview",
    response_model=GenerationInfo,
    summary="Generate a LoRA, answer JSON",
    responses=_ERRORS,
    openapi_extra=header_parameters("x-api-key"),
)
async def generate_preview(body: GenerateRequest, service: JsonModelCall) -> GenerationInfo:
    """Generates as /generate does (same cache), answers JSON: chosen experts (weight, similarity), seed and ETag."""
    lora = await service.generate(_params(service, body))
    meta = lora.metadata
    return GenerationInfo(
        etag=lora.etag,
        description=meta.get("description", ""),
        method=lora.method,
        seed=lora.seed,
        top_k=int(meta["top_k"]),
        temperature=float(meta["temperature"]) if meta["temperature"] else None,
        experts=[ExpertChoiceOut(**e) for e in lora.experts],
        artifact_version=meta.get("artifact_version", ""),
        cache=lora.cache,
        size_bytes=len(lora.data),
    )


async def _one(service: Service, i: int, body: GenerateRequest, as_zip: bool) -> BatchItemResult:
    try:
        lora = await service.generate(_params(service, body))
        data = await service.zip_of(lora) if as_zip else lora.data
    except APIError as e:
        return BatchItemResult(index=i, status=e.status, error=ErrorDetail(field=e.field, reason=e.reason))
    except Overloaded:
        return BatchItemResult(index=i, status=429, error=ErrorDetail(field=None, reason="model is overloaded, retry later"))
    except WorkerTimeout:
        return BatchItemResult(index=i, status=504, error=ErrorDetail(field=None, reason="the model did not answer in time"))
    except ShuttingDown:
        return BatchItemResult(index=i, status=503, error=ErrorDetail(field=None, reason="the service is shutting down"))
    except (torch.OutOfMemoryError, MemoryError) as e:  # this item alone: the others may fit
        note_out_of_memory(service.metrics, f"for /generate/batch item {i}", e)
        return BatchItemResult(index=i, status=503, error=ErrorDetail(field=None, reason=OUT_OF_MEMORY))
    return BatchItemResult(
        index=i,
        status=200,
        etag=f"{lora.etag}-zip" if as_zip else lora.etag,
        cache=lora.cache,
        method=lora.method,
        seed=lora.seed,
        experts=[ExpertChoiceOut(**e) for e in lora.experts],
        artifact_version=lora.metadata.get("artifact_version", ""),
        data=base64.b64encode(data).decode(),
    )


@router.post(
    "/generate/batch",
    response_model=BatchGenerateResponse,
    summary="Generate several LoRAs",
    responses=_ERRORS,
    openapi_extra=header_parameters("x-api-key"),
)
async def generate_batch(body: BatchGenerateRequest, service: JsonModelCall) -> BatchGenerateResponse:
    """Generates one LoRA per item (micro-batched together); each item has its own status, bytes in base64."""
    if len(body.items) > service.settings.max_batch_items:
        raise APIError(422, "items", f"at most {service.settings.max_batch_items} items per call, got {len(body.items)}")
    limit = service.settings.max_description_chars
    for i, it in enumerate(body.items):  # a setting, not the artefacts or the load: the whole body is malformed
        if len(it.description) > limit:
            raise APIError(422, f"items[{i}].description", f"longer than {limit} characters")
    asked = sum(service.lora_bytes(it.method, it.top_k) for it in body.items)
    if asked > (most := service.settings.max_batch_bytes):
        raise APIError(
            413,
            "items",
            f"these items' LoRAs are {asked / 2**20:.0f} MiB in all (an exact merge's file is top_k (+2) LoRAs), over "
            f"SGLORA_MAX_BATCH_BYTES ({most / 2**20:.0f} MiB): split the batch",
        )
    as_zip = body.format == "zip"
    version = service.version
    results = await asyncio.gather(*(_one(service, i, it, as_zip) for i, it in enumerate(body.items)))
    made = {r.artifact_version for r in results if r.status == 200}
    if made:  # an expert change while the call ran may have given items different versions
        version = made.pop() if len(made) == 1 else None
    return BatchGenerateResponse(artifact_version=version, format=body.format, results=list(results))

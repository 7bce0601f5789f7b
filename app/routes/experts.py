"""GET/POST /experts and DELETE /experts/{name}: the expert repository (changes need an admin key)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Header, Path, Query, Request, UploadFile
from fastapi.responses import Response

from app.deps import KEY_ERRORS, UPLOAD_BUSY, AdminKey, ApiKey, MultipartBody, ServiceDep, check_form_fields, wants_zip
from app.errors import APIError
from app.forms import UploadRoute
from app.routes.retrieve import read_upload
from app.schemas import ExpertChange, ExpertList, ExpertOut, clean_text
from app.service import etag_of
from sglora.export import peft_zip_from_weights

router = APIRouter(tags=["experts"], route_class=UploadRoute)
_ADMIN_ERRORS = {
    401: {"description": "admin key missing"},
    403: {"description": "admin key not accepted, or expert changes disabled"},
    404: {"description": "no such expert"},
    409: {"description": "name taken, the last expert, or the repository changed on disk since this server loaded it"},
    413: {"description": "the body or a file is too large"},
    422: {"description": "bad input; `field` names it"},
    503: {
        "description": "another process held the repository's lock for over 2 s (a change, a rebuild), or out of memory "
        "before anything changed; with Retry-After"
    },
}


@router.get(
    "/experts",
    response_model=ExpertList,
    dependencies=[ApiKey],
    summary="List the experts",
    responses={**KEY_ERRORS, 422: {"description": "bad paging; `field` names it"}},
)
async def list_experts(
    service: ServiceDep,
    offset: Annotated[int, Query(ge=0, description="skip this many experts (in the repository's order)")] = 0,
    limit: Annotated[int | None, Query(ge=1, description="list at most this many (default: all)")] = None,
) -> ExpertList:
    """Lists the experts of the repository (all, or a page of ``limit`` from ``offset``; ``total`` counts them
    all) and the LoRA layout an expert must have. Pages of one ``artifact_version`` fit together; another
    version means the experts changed between two pages."""
    await service.follow()  # another worker's change (SGLORA_FOLLOW_REPOSITORY)
    state = service.state  # one snapshot: the version names exactly these experts
    spec = service.spec
    page = state.experts[offset : None if limit is None else offset + limit]
    return ExpertList(
        artifact_version=state.version,
        lora={
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scaling": spec.scaling,
            "num_params": spec.num_params,
            "targets": len(spec.targets),
        },
        total=len(state.experts),
        offset=offset,
        experts=[ExpertOut(name=e.name, description=e.description, num_snapshots=e.num_snapshots) for e in page],
    )


@router.get(
    "/experts/{name}",
    response_class=Response,
    dependencies=[ApiKey],
    summary="Download an expert",
    responses={
        200: {
            "description": "the expert's mean (or variance) as safetensors with PEFT tensor names, or its mean as a zipped "
            "PEFT adapter folder",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **KEY_ERRORS,
        404: {"description": "no such expert"},
        422: {"description": "bad input; `field` names it"},
    },
)
async def get_expert(
    name: Annotated[str, Path(description="the expert's name, as GET /experts lists it", examples=["sunflower"])],
    service: ServiceDep,
    part: Annotated[
        Literal["mean", "variance"], Query(description="the expert's mean LoRA, or the element-wise variance of its snapshots")
    ] = "mean",
    accept: Annotated[str | None, Header(description="application/zip for the mean as a zipped PEFT adapter folder")] = None,
) -> Response:
    """One expert of the repository, in the format `/generate` answers and `POST /experts` takes: to inspect or
    back it up, register it elsewhere, or merge experts exactly with PEFT (docs/service.md, "Exact merges")."""
    data, version = await service.expert_file(name, part)
    if wants_zip(accept):
        if part != "mean":
            raise APIError(422, "part", "only the mean is a LoRA: a zipped PEFT adapter holds part=mean")
        data = await asyncio.to_thread(peft_zip_from_weights, service.spec, data, service.base_model)
        media, ext = "application/zip", "zip"
    else:
        media, ext = "application/octet-stream", "safetensors"
    headers = {
        "ETag": f'"{etag_of(data)}"',
        "X-Artifact-Version": version,  # the file's own: the one GET /experts listed it in
        "Content-Disposition": f'attachment; filename="{name}-{part}.{ext}"',
    }
    return Response(data, media_type=media, headers=headers)


@router.post(
    "/experts",
    response_model=ExpertChange,
    status_code=201,
    dependencies=[AdminKey, MultipartBody],
    summary="Register an expert",
    responses={**_ADMIN_ERRORS, 415: {"description": "the body is not multipart/form-data"}, **UPLOAD_BUSY},
)
async def add_expert(
    request: Request,
    service: ServiceDep,
    name: Annotated[str, Form(description="1-64 letters, digits, '.', '_' or '-'; becomes a file name", examples=["sunflower"])],
    description: Annotated[str, Form(description="what the expert is for, in words", examples=["a photo of a sunflower"])],
    mean: Annotated[UploadFile, File(description="the expert's LoRA: safetensors with PEFT tensor names (as /generate returns)")],
    variance: Annotated[
        UploadFile | None, File(description="element-wise variances, same names and shapes; default zeros")
    ] = None,
    num_snapshots: Annotated[int, Form(ge=1, le=2**31 - 1, description="snapshots the mean/variance summarise")] = 1,
) -> ExpertChange:
    """Adds an expert to the repository (persisted atomically; cached LoRAs of the old repository stop being served)."""
    await check_form_fields(request, ("name", "description", "mean", "variance", "num_snapshots"))
    try:
        description = clean_text(description)
    except ValueError as e:
        raise APIError(422, "description", str(e)) from e
    limit = service.settings.max_expert_bytes
    mean_bytes = await read_upload(mean, "mean", limit)
    var_bytes = await read_upload(variance, "variance", limit) if variance is not None else None
    state = await service.add_expert(name, description, mean_bytes, var_bytes, num_snapshots)
    return ExpertChange(name=name, action="added", artifact_version=state.version, experts=len(state.experts))


@router.delete(
    "/experts/{name}", response_model=ExpertChange, dependencies=[AdminKey], summary="Remove an expert", responses=_ADMIN_ERRORS
)
async def remove_expert(name: str, service: ServiceDep) -> ExpertChange:
    """Removes an expert from the repository (persisted atomically)."""
    state = await service.remove_expert(name)
    return ExpertChange(name=name, action="removed", artifact_version=state.version, experts=len(state.experts))

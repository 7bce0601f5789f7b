"""GET/POST /experts and DELETE /experts/{name}: the expert repository (changes need an admin key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.deps import AdminKey, ApiKey, ServiceDep
from app.errors import APIError
from app.routes.retrieve import read_upload
from app.schemas import ExpertChange, ExpertList, ExpertOut, clean_text

router = APIRouter(tags=["experts"])
_ADMIN_ERRORS = {
    401: {"description": "admin key missing"},
    403: {"description": "admin key not accepted, or expert changes disabled"},
    404: {"description": "no such expert"},
    409: {"description": "name taken, or the last expert"},
    422: {"description": "bad input; `field` names it"},
}


@router.get("/experts", response_model=ExpertList, dependencies=[ApiKey], summary="List the experts")
async def list_experts(service: ServiceDep) -> ExpertList:
    """Lists the experts of the repository and the LoRA layout an expert must have."""
    repo = service.artifacts.repository
    spec = service.spec
    return ExpertList(
        artifact_version=service.version,
        lora={
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scaling": spec.scaling,
            "num_params": spec.num_params,
            "targets": len(spec.targets),
        },
        experts=[ExpertOut(name=n, description=repo[n].description, num_snapshots=repo[n].num_snapshots) for n in repo.names],
    )


@router.post(
    "/experts",
    response_model=ExpertChange,
    status_code=201,
    dependencies=[AdminKey],
    summary="Register an expert",
    responses=_ADMIN_ERRORS,
)
async def add_expert(
    service: ServiceDep,
    name: Annotated[str, Form(description="1-64 letters, digits, '.', '_' or '-'; becomes a file name", examples=["sunflower"])],
    description: Annotated[str, Form(description="what the expert is for, in words", examples=["a photo of a sunflower"])],
    mean: Annotated[UploadFile, File(description="the expert's LoRA: safetensors with PEFT tensor names (as /generate returns)")],
    variance: Annotated[
        UploadFile | None, File(description="element-wise variances, same names and shapes; default zeros")
    ] = None,
    num_snapshots: Annotated[int, Form(ge=1, description="snapshots the mean/variance summarise")] = 1,
) -> ExpertChange:
    """Adds an expert to the repository (persisted atomically; cached LoRAs of the old repository stop being served)."""
    try:
        description = clean_text(description)
    except ValueError as e:
        raise APIError(422, "description", str(e)) from e
    limit = service.settings.max_expert_bytes
    mean_bytes = await read_upload(mean, "mean", limit)
    var_bytes = await read_upload(variance, "variance", limit) if variance is not None else None
    version = await service.add_expert(name, description, mean_bytes, var_bytes, num_snapshots)
    return ExpertChange(name=name, action="added", artifact_version=version, experts=len(service.artifacts.repository))


@router.delete(
    "/experts/{name}", response_model=ExpertChange, dependencies=[AdminKey], summary="Remove an expert", responses=_ADMIN_ERRORS
)
async def remove_expert(name: str, service: ServiceDep) -> ExpertChange:
    """Removes an expert from the repository (persisted atomically)."""
    version = await service.remove_expert(name)
    return ExpertChange(name=name, action="removed", artifact_version=version, experts=len(service.artifacts.repository))

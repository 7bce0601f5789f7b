"""POST /retrieve: image<->text rankings with a generated LoRA applied (and zero-shot beside them)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile

from app.deps import KEY_ERRORS, UPLOAD_BUSY, ApiKey, MultipartBody, ServiceDep, check_form_fields
from app.errors import APIError
from app.forms import UploadRoute
from app.schemas import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    AdapterOut,
    ExpertChoiceOut,
    Method,
    Ranking,
    Recall,
    RetrieveResponse,
    clean_text,
)
from app.service import Scores
from sglora.engine import MAX_SEED

router = APIRouter(tags=["retrieve"], dependencies=[ApiKey], route_class=UploadRoute)
MAX_CAPTION_CHARS = 20_000  # all of a request's captions together
SINGLE_FIELDS = ("description", "etag", "method", "seed", "top_k", "temperature", "zero_shot")


async def read_upload(f: UploadFile, field: str, limit: int) -> bytes:
    data = await f.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, field, f"larger than {limit} bytes")
    if not data:
        raise APIError(422, field, "empty file")
    return data


def _ranking(s: Scores) -> Ranking:
    recall = Recall(image_to_text=s.recall_at_1[0], text_to_image=s.recall_at_1[1]) if s.recall_at_1 else None
    return Ranking(scores=s.scores, image_to_text=s.image_to_text, text_to_image=s.text_to_image, recall_at_1=recall)


@router.post(
    "/retrieve",
    response_model=RetrieveResponse,
    summary="Rank images and texts with a generated LoRA",
    responses={
        **KEY_ERRORS,
        404: {"description": "unknown or expired `etag`"},
        413: {"description": "the body or an image is too large"},
        415: {"description": "the body is not multipart/form-data"},
        422: {"description": "bad input; `field` names it"},
        503: {
            "description": "by `etag`, the cache that holds it is unreachable or refuses reads; or out of memory for this "
            "request. Retry after `Retry-After` seconds"
        },
        **UPLOAD_BUSY,
        504: {"description": "the model did not answer in time"},
    },
    dependencies=[MultipartBody],
)
async def retrieve(
    request: Request,
    service: ServiceDep,
    images: Annotated[list[UploadFile], File(description="1-64 images (PNG, JPEG, WEBP, GIF or BMP)")],
    captions: Annotated[
        list[str] | None,
        Form(description="texts to rank (repeat the field); one per image gives recall@1", examples=["a blackbird"]),
    ] = None,
    description: Annotated[
        str | None, Form(description="task description to generate the LoRA from", examples=["a photo of a bird"])
    ] = None,
    etag: Annotated[str | None, Form(description="instead of a description: the ETag of an earlier /generate")] = None,
    method: Annotated[Method, Form()] = "sg-lora",
    seed: Annotated[int | None, Form(ge=0, le=MAX_SEED)] = None,
    top_k: Annotated[int | None, Form(ge=1)] = None,
    temperature: Annotated[float | None, Form(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, allow_inf_nan=False)] = None,
    zero_shot: Annotated[bool, Form(description="also score with the frozen backbone alone")] = False,
) -> RetrieveResponse:
    """Scores every image against every text with the LoRA applied; rankings both ways, zero-shot beside them on request."""
    settings = service.settings
    await check_form_fields(request, SINGLE_FIELDS, ("images", "captions"))
    if not 1 <= len(images) <= settings.max_images:
        raise APIError(422, "images", f"send 1 to {settings.max_images} images, got {len(images)}")
    # An empty form field reaches the parameters as None (not sent): the form tells the two apart, so an
    # empty description is refused as blank rather than as missing.
    form = await request.form()
    if ("description" in form) == ("etag" in form):
        raise APIError(422, "description", "send exactly one of `description` and `etag`")
    if "etag" in form and not etag:
        raise APIError(422, "etag", "must not be empty")
    if "description" in form:
        try:
            description = clean_text(description or "")
        except ValueError as e:
            raise APIError(422, "description", str(e)) from e
    texts: list[str] = []
    for i, c in enumerate(captions or []):
        try:
            texts.append(clean_text(c))
        except ValueError as e:
            raise APIError(422, f"captions[{i}]", str(e)) from e
        if len(texts[-1]) > settings.max_description_chars:
            raise APIError(422, f"captions[{i}]", f"longer than {settings.max_description_chars} characters")
        service.check_text_length(texts[-1], f"captions[{i}]")
    if len(texts) > 4 * settings.max_images:
        raise APIError(422, "captions", f"at most {4 * settings.max_images} captions")
    if (chars := sum(map(len, texts))) > MAX_CAPTION_CHARS:
        # what one request may cost the text tower: 256 captions of 1000 characters held a model thread 10 s
        raise APIError(422, "captions", f"{chars} characters in all; at most {MAX_CAPTION_CHARS} (e.g. 256 of 78)")
    data = [await read_upload(f, f"images[{i}]", settings.max_image_bytes) for i, f in enumerate(images)]
    decoded = await service.decode_images(data)  # bad images are refused before any generation
    if description is not None:
        adapter = await service.generate(service.resolve(description, method, seed, top_k, temperature))
    else:
        adapter = await service.adapter(etag or "")
    texts = texts or [adapter.metadata.get("description", "")]
    r = await service.retrieve(decoded, texts, adapter, zero_shot, paired=bool(captions))
    return RetrieveResponse(
        adapter=AdapterOut(
            etag=adapter.etag,
            description=adapter.metadata.get("description", ""),
            method=adapter.method,
            seed=adapter.seed,
            experts=[ExpertChoiceOut(**e) for e in adapter.experts],
            artifact_version=adapter.metadata.get("artifact_version", ""),
        ),
        texts=r.texts,
        lora=_ranking(r.lora),
        zero_shot=_ranking(r.zero_shot) if r.zero_shot is not None else None,
    )

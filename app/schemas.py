"""Request and response bodies of the HTTP API (kept apart from the library's internal objects)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from expert_store.prior import MAX_TEMPERATURE, MIN_TEMPERATURE
from sglora.engine import MAX_SEED
from sglora.text import clean_text

Method = Literal["sg-lora", "sg-lora-exact", "topk-weighted", "topk-exact", "adapter-soup", "model-soup"]
Format = Literal["safetensors", "zip"]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"description": "a photo of a sunflower", "seed": 7},
                {"description": "This is a classification task for recognizing footwear", "method": "topk-weighted", "top_k": 3},
            ]
        },
    )

    description: str = Field(..., min_length=1, description="the task, in words; whitespace is normalised")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        strict=True,
        description="sg-lora sampling seed; omitted: the service draws one and reports it in X-Seed",
    )
    method: Method = Field("sg-lora", description="how to build the LoRA from the chosen experts")
    top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="experts mixed (1..number of experts, at most SGLORA_MAX_TOP_K); default: the artefacts' top_k",
    )
    temperature: float | None = Field(
        None,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        allow_inf_nan=False,
        strict=True,  # a number: not true (read as 1.0) nor "0.5", as seed and top_k take no strings either
        description="softmax temperature of the expert weights (1e-6 .. 1e6); default: the artefacts'",
    )

    _clean = field_validator("description")(clean_text)


class BatchGenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"description": "a photo of a cat", "seed": 1},
                        {"description": "a photo of a dog", "method": "adapter-soup"},
                    ]
                }
            ]
        },
    )

    items: list[GenerateRequest] = Field(..., min_length=1, description="one generation per item, answered in order")
    format: Format = Field("safetensors", description="encoding of each item's `data`")


class ExpertChoiceOut(BaseModel):
    name: str
    weight: float = Field(description="mixing weight alpha")
    similarity: float = Field(description="cosine similarity of the expert's description to the request's")


class ErrorDetail(BaseModel):
    field: str | None
    reason: str


class BatchItemResult(BaseModel):
    index: int
    status: int = Field(description="HTTP status this item would have had on its own")
    etag: str | None = None
    cache: Literal["hit", "miss"] | None = None
    method: str | None = None
    seed: int | None = None
    experts: list[ExpertChoiceOut] = Field(default_factory=list)
    artifact_version: str | None = Field(None, description="the artefact version this item's LoRA was made with")
    data: str | None = Field(None, description="base64 of the safetensors file (or zip, see `format`)")
    error: ErrorDetail | None = None


class BatchGenerateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "artifact_version": "3f2a9c0d1e4b5a69",
                    "format": "safetensors",
                    "results": [
                        {
                            "index": 0,
                            "status": 200,
                            "etag": "9b1f0c7a2d4e6f8091a2b3c4d5e6f708",
                            "cache": "miss",
                            "method": "sg-lora",
                            "seed": 1,
                            "experts": [{"name": "tabby", "weight": 0.71, "similarity": 0.93}],
                            "artifact_version": "3f2a9c0d1e4b5a69",
                            "data": "<base64>",
                            "error": None,
                        },
                        {
                            "index": 1,
                            "status": 422,
                            "error": {"field": "top_k", "reason": "must be between 1 and the number of experts (4), got 5"},
                        },
                    ],
                }
            ]
        }
    )

    artifact_version: str | None = Field(
        description="the artefact version of every item's LoRA; null when an expert change during the call "
        "gave items different ones (each item names its own)"
    )
    format: Format
    results: list[BatchItemResult]


class AdapterOut(BaseModel):
    etag: str = Field(description="ETag of the LoRA's safetensors (as /generate sent it, without quotes)")
    description: str
    method: str
    seed: int | None
    experts: list[ExpertChoiceOut]
    artifact_version: str


class GenerationInfo(AdapterOut):
    """What /generate/preview answers: the choices behind a generated LoRA, without its tensors."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "etag": "9b1f0c7a2d4e6f8091a2b3c4d5e6f708",
                    "description": "a photo of a sunflower",
                    "method": "sg-lora",
                    "seed": 7,
                    "top_k": 3,
                    "temperature": 0.1,
                    "experts": [
                        {"name": "daisy", "weight": 0.62, "similarity": 0.91},
                        {"name": "rose", "weight": 0.24, "similarity": 0.82},
                        {"name": "tulip", "weight": 0.14, "similarity": 0.77},
                    ],
                    "artifact_version": "3f2a9c0d1e4b5a69",
                    "cache": "miss",
                    "size_bytes": 31232,
                }
            ]
        }
    )

    top_k: int = Field(description="experts mixed (every expert for model-soup)")
    temperature: float | None = Field(description="softmax temperature of the weights; null for the soups (equal weights)")
    cache: Literal["hit", "miss"]
    size_bytes: int = Field(description="size of the safetensors file /generate returns for the same request and seed")


class Recall(BaseModel):
    image_to_text: float
    text_to_image: float


class Ranking(BaseModel):
    scores: list[list[float]] = Field(description="(images, texts) cosine similarities of the L2-normalised embeddings")
    image_to_text: list[list[int]] = Field(description="per image: text indices, best first")
    text_to_image: list[list[int]] = Field(description="per text: image indices, best first")
    recall_at_1: Recall | None = Field(None, description="with one caption per image, image i paired with caption i")


class RetrieveResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "adapter": {
                        "etag": "9b1f0c7a2d4e6f8091a2b3c4d5e6f708",
                        "description": "a photo of a bird",
                        "method": "sg-lora",
                        "seed": 7,
                        "experts": [{"name": "sparrow", "weight": 0.64, "similarity": 0.91}],
                        "artifact_version": "3f2a9c0d1e4b5a69",
                    },
                    "texts": ["a blackbird", "a robin"],
                    "lora": {
                        "scores": [[0.31, 0.22], [0.19, 0.28]],
                        "image_to_text": [[0, 1], [1, 0]],
                        "text_to_image": [[0, 1], [1, 0]],
                        "recall_at_1": {"image_to_text": 1.0, "text_to_image": 1.0},
                    },
                    "zero_shot": None,
                }
            ]
        }
    )

    adapter: AdapterOut
    texts: list[str] = Field(description="the captions, or [description] when none were sent")
    lora: Ranking = Field(description="with the LoRA applied to the image tower")
    zero_shot: Ranking | None = Field(None, description="the frozen backbone alone (zero_shot=true)")


class ExpertOut(BaseModel):
    name: str
    description: str
    num_snapshots: int


class ExpertList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "artifact_version": "3f2a9c0d1e4b5a69",
                    "lora": {"rank": 2, "alpha": 2.0, "scaling": "standard", "num_params": 110592, "targets": 36},
                    "total": 41,
                    "offset": 0,
                    "experts": [{"name": "tabby", "description": "a photo of a tabby cat", "num_snapshots": 100}],
                }
            ]
        }
    )

    artifact_version: str
    lora: dict
    total: int = Field(description="experts in the repository (of this artifact_version)")
    offset: int = Field(description="the position of the first expert listed, in the repository's order")
    experts: list[ExpertOut]


class ExpertChange(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "sunflower", "action": "added", "artifact_version": "77ab01c2d3e4f5a6", "experts": 41}]
        }
    )

    name: str
    action: Literal["added", "removed"]
    artifact_version: str = Field(description="the new version; cached LoRAs of the old one are no longer served")
    experts: int = Field(description="number of experts now")


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"]


RedisProblem = Literal["unreachable", "login refused", "reads refused", "writes refused", "reads and writes refused"]


class Ready(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "redis": "ok",
                    "redis_problem": None,
                    "artifact_version": "3f2a9c0d1e4b5a69",
                    "backbone": "ViT-B-16",
                    "device": "cpu",
                    "experts": 40,
                    "queue": 0,
                    "max_batch": 32,
                    "model_threads": 1,
                    "text_dtype": "bfloat16",
                    "text_graph": "traced",
                    "text_fixed_rows": None,
                    "generator_dtype": "float32",
                    "cvae_pass_rows": [2, 16],
                }
            ]
        }
    )

    status: Literal["ready", "starting", "draining"]
    redis: Literal["ok", "degraded", "disabled"] | None = None
    redis_problem: RedisProblem | None = Field(None, description="why Redis is degraded (the log says more: Redis's own message)")
    artifact_version: str | None = None
    backbone: str | None = None
    device: str | None = None
    experts: int | None = None
    queue: int | None = None
    max_batch: int | None = Field(
        None, description="descriptions per text-encoder call; 1 when batching would change a seeded LoRA's bytes"
    )
    model_threads: int | None = Field(None, description="model threads, each running its own micro-batch")
    text_dtype: Literal["float32", "bfloat16"] | None = Field(None, description="dtype the text tower runs in")
    text_graph: Literal["traced", "eager"] | None = Field(
        None,
        description="'traced': the text tower's forward runs as one TorchScript graph (SGLORA_TEXT_GRAPH; the same "
        "bits as the eager forward, checked at start-up); 'eager': module by module",
    )
    text_fixed_rows: int | None = Field(
        None,
        description="rows per block of the text tower's long bfloat16 reductions (an open_clip text tower: all its "
        "linear layers), where the start-up check needed "
        "them for batching to leave embeddings bit-identical (CPUs with AMX); null: one product per layer",
    )
    generator_dtype: Literal["float32", "bfloat16"] | None = Field(None, description="dtype the CVAE samples in")
    cvae_pass_rows: list[int] | None = Field(
        None,
        description="[fewest, most] rows of a CVAE pass: [1, 1], or [f, 16] where every pass of f to 16 rows gives "
        "each row the same bits (a lone request is padded to f rows; on a GPU [16, 16])",
    )

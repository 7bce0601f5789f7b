"""Export a flat LoRA as PEFT-named safetensors and as a PEFT adapter folder.

Tensor names follow PEFT's LoRA layout, ``base_model.model.<module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r). For open_clip ViTs <module> is the HF ``CLIPModel`` path
(``vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj``), so the folder loads with
``peft.PeftModel.from_pretrained(CLIPModel, folder)``; backbones without an HF twin use the
target's canonical name. The scale is carried by ``lora_alpha`` / ``r`` (``use_rslora`` for alpha / sqrt(r)).
"""

from __future__ import annotations

import functools
import io
import json
import re
import struct
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from models.lora import LoraSpec

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# open_clip (architecture, pretrained tag) -> the HF hub CLIPModel with the same weights, named in
# adapter_config.json's base_model_name_or_path. Only OpenAI's: other tags have no like-for-like HF twin here.
HF_CLIP_MODELS = {
    ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
    ("ViT-B-16", "openai"): "openai/clip-vit-base-patch16",
    ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14",
    ("ViT-B-32-quickgelu", "openai"): "openai/clip-vit-base-patch32",
    ("ViT-B-16-quickgelu", "openai"): "openai/clip-vit-base-patch16",
    ("ViT-L-14-quickgelu", "openai"): "openai/clip-vit-large-patch14",
}


def hf_base_model(config) -> str | None:
    """The HF hub id of a backbone config's weights (a ``BackboneConfig``), or None where there is none."""
    if config.kind != "open_clip" or config.model_config is not None or config.pretrained is None:
        return None
    return HF_CLIP_MODELS.get((config.model, config.pretrained))


def module_name(target) -> str:
    return target.peft_module or target.name


def peft_names(target) -> tuple[str, str]:
    """PEFT's names of a target's (A, B) tensors."""
    prefix = f"base_model.model.{module_name(target)}"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def _by_peft_name(spec: LoraSpec, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """The flat vector's A and B blocks under their PEFT names: views of ``vec`` (:meth:`LoraSpec.unflatten`)."""
    parts = spec.unflatten(vec)
    out = {}
    for t in spec.targets:
        b, a = parts[t.name]
        name_a, name_b = peft_names(t)
        out[name_a], out[name_b] = a, b
    return out


def to_peft_tensors(spec: LoraSpec, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in _by_peft_name(spec, vec.detach().float().cpu()).items()}


def from_peft_tensors(spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`to_peft_tensors`; raises ValueError naming missing, unknown or mis-shaped tensors."""
    expected = {}
    for t in spec.targets:
        name_a, name_b = peft_names(t)
        expected[name_a], expected[name_b] = (t.name, 1), (t.name, 0)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"unknown tensor name(s): {unknown[:3]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"missing tensor(s): {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    parts: dict[str, list] = {t.name: [None, None] for t in spec.targets}
    for key, (name, which) in expected.items():
        if not isinstance(tensors[key], torch.Tensor):
            raise TypeError(f"{key}: a {type(tensors[key]).__name__}, expected a torch.Tensor (safetensors.torch.load)")
        if not tensors[key].is_floating_point():  # an index or mask file, not LoRA weights
            raise ValueError(f"{key}: dtype {str(tensors[key].dtype).removeprefix('torch.')}, expected floating point")
        parts[name][which] = tensors[key].float()
    return spec.flatten({k: (v[0], v[1]) for k, v in parts.items()})


def adapter_config(spec: LoraSpec, base_model: str | None = None) -> dict[str, Any]:
    modules = sorted({module_name(t) for t in spec.targets})
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.scaling == "rslora",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
        # A full-match regex: a plain suffix list like ["q_proj"] would also hit the text tower.
        "target_modules": "(" + "|".join(re.escape(m) for m in modules) + ")",
    }


def safetensors_bytes(spec: LoraSpec, vec: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """Serialises the LoRA; metadata values that are not strings are stored as JSON strings.

    The file is what ``safetensors.torch.save`` writes (tensors in name order, 8-byte aligned data),
    with the header's keys sorted and non-ASCII metadata escaped as JSON allows (the same strings read
    back): safetensors emits ``__metadata__`` from a hash map whose order
    varies between calls, and identical requests must give identical bytes. Each PEFT tensor is a
    contiguous slice of the flat vector, so the data section is the vector's elements in a fixed order
    (:func:`_file_layout`, once per layout) and the header's tensor entries are fixed text: a request
    costs one gather and the metadata's JSON, not a tensor per target (the per-tensor path took ~0.6 ms
    for a ViT-B/16 LoRA's 72 tensors, longer on a model thread that waits for the GIL under load).
    tests/test_export.py checks the bytes against the library's.
    """
    if not isinstance(vec, torch.Tensor):
        raise TypeError(f"the LoRA must be a flat torch.Tensor, got {type(vec).__name__}")
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of names to values, got {type(metadata).__name__}")
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    order, entries = _file_layout(spec)
    # "__metadata__" sorts before every tensor name ("base_model...."), so it opens the sorted header.
    text = b'{"__metadata__":' + json.dumps(meta, sort_keys=True, separators=(",", ":")).encode() + b"," + entries
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
    if vec.dim() != 1 or vec.numel() != spec.num_params:
        raise ValueError(f"LoRA vector must have shape ({spec.num_params},), got {tuple(vec.shape)}")
    data = vec.detach().float().cpu().index_select(0, order).numpy()
    if sys.byteorder != "little":  # safetensors is little-endian
        data = data.byteswap()
    return struct.pack("<Q", len(text)) + text + data.tobytes()


@functools.lru_cache(maxsize=16)
def _file_layout(spec: LoraSpec) -> tuple[torch.Tensor, bytes]:
    """-> (the flat vector's indices in the file's data order: never the vector's own, where each target's
    B precedes its A; the header's tensor entries as sorted JSON after its opening brace)."""
    index = _by_peft_name(spec, torch.arange(spec.num_params))  # each tensor's positions in the flat vector
    names = sorted(index)
    if names[0] <= "__metadata__":  # cannot happen with PEFT names; the header's order would differ
        raise AssertionError(f"tensor name {names[0]!r} sorts before __metadata__")
    header, offset = {}, 0
    for name in names:
        t = index[name]
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    entries = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()[1:]
    return torch.cat([index[n].reshape(-1) for n in names]), entries


def peft_zip_bytes(spec: LoraSpec, vec: torch.Tensor, metadata: dict[str, Any], base_model: str | None = None) -> bytes:
    return peft_zip_from_weights(spec, safetensors_bytes(spec, vec, metadata), base_model)


def peft_zip_from_weights(spec: LoraSpec, weights: bytes, base_model: str | None = None) -> bytes:
    """The zipped PEFT adapter folder around already-serialised ``adapter_model.safetensors`` bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        # Fixed timestamps keep the archive byte-identical for identical requests.
        for name, data in (
            (PEFT_CONFIG, json.dumps(adapter_config(spec, base_model), indent=2).encode()),
            (PEFT_WEIGHTS, weights),
        ):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16  # else unzip makes them 0600: unreadable to a server of another user
            z.writestr(info, data)
    return buf.getvalue()


# The `format` of the files holding a LoRA: a generation (/generate, sglora generate) and an expert's
# export (GET /experts/{name}), whose `part` says whether it holds the mean (a LoRA) or the variance.
LORA_FORMATS = ("sglora-lora", "sglora-expert")


def layout_metadata(backbone, spec, version: str) -> dict:
    """What every LoRA file the project writes says of its backbone and layout (generations, experts)."""
    cfg = backbone.config
    meta = {
        "backbone": json.dumps(cfg.model if cfg.kind == "open_clip" else cfg.kind),
        "backbone_kind": cfg.kind,
        "rank": str(spec.rank),
        "alpha": str(spec.alpha),
        "scaling": spec.scaling,
        "targets": [t.name for t in spec.targets],
        "lora_fingerprint": spec.fingerprint(),
        "artifact_version": version,
    }
    # GELU or QuickGELU (open_clip backbones): the model name alone does not say (OpenAI's weights need QuickGELU)
    if act := getattr(backbone, "activation", None):
        meta["activation"] = act
    # the image tower's depth and patch size (open_clip backbones): the tensors' shapes do not tell a ViT-B-32 from a B-16
    if tower := getattr(backbone, "tower", None):
        meta["visual_tower"] = tower
    return meta


def activation_problem(own: str | None, metadata: dict[str, str], ours: str = "this model's") -> str | None:
    """Why a file made on a model whose MLPs use another activation (GELU against QuickGELU: the same shapes,
    another model) does not fit ``own``; None where it fits, or either is not known. Completes "was made ..."
    in a message; ``ours`` names the other side ("this model's", "this backbone's")."""
    theirs = metadata.get("activation")
    if theirs is None or not own or theirs == own:
        return None
    return f"was made on a model whose MLPs use {theirs}, {ours} use {own}"


def tower_problem(own: dict | None, metadata: dict[str, str]) -> str | None:
    """Why a file's ``visual_tower`` (depth and patch size of the image tower it was made on) does not fit the
    tower ``own`` (:func:`models.open_clip_backbone.tower_geometry`); None where it fits, or either is not
    known (files written before the key, other backbones). Completes "was made ..." in a message."""
    if "visual_tower" not in metadata or not own:
        return None
    value = metadata["visual_tower"]
    try:
        theirs = json.loads(value) if isinstance(value, str) else None
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the parser's depth
        theirs = None
    if not isinstance(theirs, dict):
        return f"names an image tower that is not one: visual_tower is {str(value)[:100]!r}"
    for key, say in (("layers", lambda v: f"{v} blocks"), ("patch_size", lambda v: f"patch size {v}")):
        if key in theirs and key in own and theirs[key] != own[key]:
            named = f" (the file's backbone: {b})" if (b := metadata.get("backbone")) else ""
            return f"was made on an image tower with {say(theirs[key])}, this model's has {say(own[key])}: another model{named}"
    return None


def request_metadata(seed: int | None, top_k: int | None, temperature: float | None) -> dict[str, str]:
    """How a generated file's metadata spells the request's seed, top_k and temperature: "" for a seed or a
    temperature the method does not use (the deterministic methods draw nothing, the soups weigh their
    experts equally); a top_k of None is left out."""
    fields = {"seed": "" if seed is None else str(seed), "temperature": "" if temperature is None else str(temperature)}
    if top_k is not None:
        fields["top_k"] = str(top_k)
    return fields


def generation_metadata(a, description: str, g) -> dict:
    """The metadata of a generated LoRA file: the request, the chosen experts and the layout. ``a``: an
    :class:`~sglora.artifacts.Artifacts` (its backbone and version); ``g``: the engine's ``Generation``."""
    return {
        "format": "sglora-lora",
        "description": description,
        "method": g.method,
        **request_metadata(g.seed, g.top_k, g.temperature),
        "experts": [{"name": e.name, "weight": e.weight, "similarity": e.similarity} for e in g.experts],
        # an exact merge (topk-exact, sg-lora-exact) has its own rank
        **layout_metadata(a.backbone, g.spec or a.backbone.spec, a.version),
        "text_dtype": a.backbone.text_dtype_name,  # of the description's embedding
        "generator_dtype": g.generator_dtype,  # what the CVAE sampled in; "" for the methods that do not sample
    }

"""Apply a LoRA made by this project to an open_clip model loaded by the caller.

    import open_clip
    from sglora.open_clip_lora import merge_lora

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai")
    with merge_lora(model, "persian.safetensors") as lora:   # or the bytes of a /generate answer
        print(lora.metadata["description"], lora.experts)
        features = model.encode_image(images)                 # with the LoRA
    # on leaving the block the model has its own weights again (bit for bit)

The file is what ``POST /generate``, ``sglora generate`` or ``GET /experts/{name}`` write: PEFT tensor
names (``base_model.model.vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.lora_{A,B}.weight``)
and, in ``__metadata__``, the layout (rank, alpha, scaling, targets). Each rank-r update is added to its
row block of the visual ``in_proj_weight`` (Wq, Wk, Wv fused by open_clip), scaled as the metadata says
(alpha / r, or alpha / sqrt(r) for rslora): the weights the service's own retrieval uses. Anything that
does not fit the model (another backbone kind, a block or width the model lacks, a tensor of the wrong
shape) is refused with a ValueError naming it, before any weight changes.

For an HF ``transformers.CLIPModel``, load the zip of ``/generate`` (``Accept: application/zip``) with
``peft.PeftModel.from_pretrained`` instead (docs/service.md, "PEFT names").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from models.lora import LoraSpec, check_finite
from models.open_clip_backbone import qkv_target
from sglora.export import from_peft_tensors
from sglora.io import safetensors_metadata

_TARGET = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.attn\.([qkv])")


def read_lora(source: bytes | str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors LoRA file (path or bytes) -> (tensors, ``__metadata__``); ValueError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    try:
        metadata = safetensors_metadata(data)
        tensors = load(data)
    except (ValueError, SafetensorError) as e:
        raise ValueError(f"not a safetensors LoRA file: {e}") from e
    return tensors, metadata


def lora_spec(visual: nn.Module, metadata: dict[str, str]) -> LoraSpec:
    """The layout a file's metadata names, on this open_clip visual tower; ValueError where they differ."""
    kind = metadata.get("backbone_kind")
    if kind != "open_clip":
        raise ValueError(
            f"this LoRA was made for the {kind or 'unknown'!r} backbone kind, not open_clip; apply it with the library that "
            "made it (sglora) or, for a PEFT-named model of that backbone, with peft.PeftModel.from_pretrained"
        )
    try:
        names = json.loads(metadata["targets"])
        rank, alpha, scaling = int(metadata["rank"]), float(metadata["alpha"]), metadata.get("scaling", "standard")
    except (KeyError, ValueError) as e:
        raise ValueError(f"the file's metadata does not describe its LoRA layout ({e})") from e
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError(
            f"{type(visual).__name__} is not an open_clip ViT visual tower (no transformer.resblocks): merge_lora adapts "
            "open_clip ViTs; for an HF CLIPModel load the PEFT zip of /generate with peft.PeftModel.from_pretrained"
        )
    blocks = list(blocks)
    targets = []
    for name in names:
        m = _TARGET.fullmatch(name)
        if m is None:
            raise ValueError(f"target {name!r} is not a q/k/v block of an open_clip visual transformer")
        i, which = int(m.group(1)), m.group(2)
        if i >= len(blocks):
            raise ValueError(f"target {name!r}: the model's visual transformer has {len(blocks)} blocks")
        attn = getattr(blocks[i], "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            raise ValueError(f"target {name!r}: block {i} of the model has no fused q/k/v attention (nn.MultiheadAttention)")
        targets.append(qkv_target(i, which, attn.embed_dim))
    return LoraSpec(targets=tuple(targets), rank=rank, alpha=alpha, scaling=scaling)


class MergedLora:
    """A LoRA merged into a model's weights; :meth:`restore` (or leaving the ``with`` block) puts the
    model's own weights back."""

    def __init__(self, visual: nn.Module, spec: LoraSpec, vector: torch.Tensor, metadata: dict[str, str]):
        self.spec, self.vector, self.metadata = spec, vector, metadata
        params = dict(visual.named_parameters())
        base = {t.param: params[t.param] for t in spec.targets}
        with torch.no_grad():
            merged = spec.deltas(vector.to(next(iter(base.values())).device), base)  # computed before any write
            self._saved = {name: params[name].detach().clone() for name in merged}
            for name, w in merged.items():
                params[name].copy_(w)
        self._params = {name: params[name] for name in merged}

    @property
    def experts(self) -> list[dict]:
        """The experts the service chose (name, weight alpha, similarity); empty for an expert's own file."""
        return json.loads(self.metadata.get("experts", "[]"))

    def restore(self) -> None:
        with torch.no_grad():
            for name, w in self._saved.items():
                self._params[name].copy_(w)
        self._saved = {}

    def __enter__(self) -> MergedLora:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def merge_lora(model: nn.Module, source: bytes | str | Path) -> MergedLora:
    """Adds the LoRA of ``source`` (a file path or its bytes) to ``model``'s visual tower in place (an
    ``open_clip.CLIP``, or its ``.visual``); returns the handle that restores the weights."""
    visual = getattr(model, "visual", model)
    tensors, metadata = read_lora(source)
    spec = lora_spec(visual, metadata)
    vector = from_peft_tensors(spec, tensors)  # ValueError naming a missing, unknown or mis-shaped tensor
    check_finite(vector)
    return MergedLora(visual, spec, vector, metadata)

"""Apply a LoRA made by this project to an open_clip model loaded by the caller.

    import open_clip
    from sglora.open_clip_lora import merge_lora

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16-quickgelu", pretrained="openai")
    with merge_lora(model, "persian.safetensors") as lora:   # or the bytes of a /generate answer
        print(lora.metadata["description"], lora.experts)
        features = model.encode_image(images)                 # with the LoRA
    # on leaving the block the model has its own weights again (bit for bit)

Merges stack: merging a second file adds to the weights the first left. They are undone last in, first
out (nested ``with`` blocks do that by themselves); restoring a merge while a later one on the same model
is still applied raises RuntimeError, because its saved weights would erase the later merge's update
while the later handle would then write the earlier LoRA back.

The file is what ``POST /generate``, ``sglora generate`` or ``GET /experts/{name}`` write: PEFT tensor
names (``base_model.model.vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.lora_{A,B}.weight``)
and, in ``__metadata__``, the layout (rank, alpha, scaling, targets). Each rank-r update is added to its
row block of the visual ``in_proj_weight`` (Wq, Wk, Wv fused by open_clip), scaled as the metadata says
(alpha / r, or alpha / sqrt(r) for rslora): the weights the service's own retrieval uses. Anything that
does not fit the model (another backbone kind, a block or width the model lacks, an image tower of
another depth or patch size, a tensor of the wrong shape) or is not a LoRA (an expert's variance, a file
without SG-LoRA metadata) is refused with a ValueError naming it, before any weight changes.

For an HF ``transformers.CLIPModel``, load the zip of ``/generate`` (``Accept: application/zip``) with
``peft.PeftModel.from_pretrained`` instead (docs/service.md, "PEFT names").
"""

from __future__ import annotations

import io
import json
import re
import weakref
import zipfile
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from models.lora import LoraSpec, check_finite
from models.open_clip_backbone import mlp_activation, qkv_target, tower_geometry
from sglora.export import LORA_FORMATS, PEFT_WEIGHTS, activation_problem, from_peft_tensors, tower_problem
from sglora.io import safetensors_metadata

_TARGET = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.attn\.([qkv])")

Source = bytes | bytearray | memoryview | str | Path | BinaryIO


def _read_bytes(source: Source) -> bytes:
    """The safetensors bytes of ``source``; a PEFT adapter folder, or its zip (what ``/generate`` answers to
    ``Accept: application/zip``), gives its ``adapter_model.safetensors``, the same file."""
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_dir():
            weights = path / PEFT_WEIGHTS
            if not weights.is_file():
                raise ValueError(f"{path} is a folder without {PEFT_WEIGHTS}: not a PEFT adapter folder")
            path = weights
        return _unzipped(path.read_bytes())
    if isinstance(source, bytes | bytearray | memoryview):
        return _unzipped(bytes(source))
    read = getattr(source, "read", None)
    if callable(read):  # an open file, io.BytesIO, a response body
        try:
            data = read()
        except UnicodeDecodeError:  # a text-mode file of safetensors bytes
            data = ""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"the file object gave {type(data).__name__}, not bytes: open the file in binary mode ('rb')")
        return _unzipped(bytes(data))
    raise ValueError(f"a LoRA source is a path, bytes or a binary file object, not {type(source).__name__}")


def _unzipped(data: bytes) -> bytes:
    """``data``, or the ``adapter_model.safetensors`` inside it where it is a zip."""
    if not data.startswith(b"PK\x03\x04"):
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return z.read(PEFT_WEIGHTS)
    except KeyError:
        raise ValueError(f"a zip without {PEFT_WEIGHTS}: not a zipped PEFT adapter folder") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as e:
        raise ValueError(f"an unreadable zip: {e}") from e


def read_lora(source: Source) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors LoRA file (path, bytes or binary file object) -> (tensors, ``__metadata__``);
    ValueError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = _read_bytes(source)
    try:
        metadata = safetensors_metadata(data)
        tensors = load(data)
    except (ValueError, SafetensorError) as e:
        raise ValueError(f"not a safetensors LoRA file: {e}") from e
    return tensors, metadata


def check_is_lora(metadata: dict[str, str]) -> None:
    """ValueError unless the metadata is that of an SG-LoRA LoRA file (a generation or an expert's mean)."""
    if "format" not in metadata and "backbone_kind" not in metadata:
        raise ValueError(
            "the file carries no SG-LoRA metadata (no format, backbone_kind, rank, targets in its __metadata__): "
            "merge_lora takes the files /generate, sglora generate and GET /experts/{name} write"
        )
    fmt = metadata.get("format")
    if fmt == "pt" and "backbone_kind" not in metadata:  # what torch/PEFT's save_pretrained writes, and nothing else
        raise ValueError(
            "the file's metadata is {'format': 'pt'} alone, as PEFT's save_pretrained writes it: it carries none of "
            "SG-LoRA's (rank, targets, backbone); load it with PEFT beside its adapter_config.json, or merge the "
            "file /generate or sglora generate wrote"
        )
    if fmt is not None and fmt not in LORA_FORMATS:
        raise ValueError(f"the file's format is {fmt!r}, not a LoRA ({' or '.join(LORA_FORMATS)})")
    part = metadata.get("part", "mean")
    if part != "mean":
        raise ValueError(
            f"the file holds an expert's {part!r}, not a LoRA: only its mean (GET /experts/{{name}}?part=mean) is one"
        )


def lora_spec(visual: nn.Module, metadata: dict[str, str]) -> LoraSpec:
    """The layout a file's metadata names, on this open_clip visual tower; ValueError where they differ."""
    check_is_lora(metadata)
    kind = metadata.get("backbone_kind")
    if kind is None:
        raise ValueError("the file's metadata names no backbone_kind: merge_lora cannot tell what model it was made for")
    if kind != "open_clip":
        raise ValueError(
            f"this LoRA was made for the {kind!r} backbone kind, not open_clip: merge_lora adapts open_clip ViTs; "
            "apply it with the library that made it (sglora, e.g. POST /retrieve of the service)"
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
    if problem := activation_problem(mlp_activation(visual), metadata):
        raise ValueError(
            f"this LoRA {problem}: build the model with the activation of the artefacts' backbone (OpenAI's weights "
            "need QuickGELU, e.g. 'ViT-B-16-quickgelu')"
        )
    if problem := tower_problem(tower_geometry(visual), metadata):
        raise ValueError(f"this LoRA {problem}")
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


# The merges still applied to each visual tower, oldest first: restore() must undo them last in, first out.
_APPLIED: weakref.WeakKeyDictionary[nn.Module, list[MergedLora]] = weakref.WeakKeyDictionary()


class MergedLora:
    """A LoRA merged into a model's weights; :meth:`restore` (or leaving the ``with`` block) puts the
    model's weights back as they were before this merge. Merges on one model are restored last in,
    first out; restoring one under a later merge still applied raises RuntimeError."""

    def __init__(self, visual: nn.Module, spec: LoraSpec, vector: torch.Tensor, metadata: dict[str, str]):
        self.spec, self.vector, self.metadata = spec, vector, metadata
        params = dict(visual.named_parameters())
        base = {t.param: params[t.param] for t in spec.targets}
        with torch.no_grad():
            merged = spec.deltas(vector.to(next(iter(base.values())).device), base)  # computed before any write
            if not all(torch.isfinite(w).all() for w in merged.values()):
                raise ValueError("merged into the model, this LoRA gives non-finite weights: its values are too large")
            self._saved = {name: params[name].detach().clone() for name in merged}
            for name, w in merged.items():
                params[name].copy_(w)
        self._params = {name: params[name] for name in merged}
        self._visual = weakref.ref(visual)
        _APPLIED.setdefault(visual, []).append(self)

    @property
    def experts(self) -> list[dict]:
        """The experts the service chose (name, weight alpha, similarity); empty for an expert's own file."""
        return json.loads(self.metadata.get("experts", "[]"))

    def restore(self) -> None:
        """Puts back the weights this merge replaced; a second call does nothing."""
        visual = self._visual()
        stack = _APPLIED.get(visual, []) if visual is not None else []
        if self not in stack:  # already restored
            return
        if stack[-1] is not self:
            later = len(stack) - 1 - stack.index(self)
            raise RuntimeError(
                f"restore out of order: {later} later merge(s) on this model are still applied; merges are "
                "restored last in, first out (restore the most recent first, or nest the with blocks)"
            )
        with torch.no_grad():
            for name, w in self._saved.items():
                self._params[name].copy_(w)
        self._saved = {}
        stack.pop()

    def __enter__(self) -> MergedLora:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def merge_lora(model: nn.Module, source: Source) -> MergedLora:
    """Adds the LoRA of ``source`` (a file path, its bytes or a binary file object; or a PEFT adapter folder
    or its zip, as ``/generate`` answers ``Accept: application/zip``) to ``model``'s visual
    tower in place (an ``open_clip.CLIP``, or its ``.visual``); returns the handle that restores the
    weights. Several merges on one model are restored last in, first out."""
    visual = getattr(model, "visual", model)
    tensors, metadata = read_lora(source)
    spec = lora_spec(visual, metadata)
    vector = from_peft_tensors(spec, tensors)  # ValueError naming a missing, unknown or mis-shaped tensor
    check_finite(vector)
    return MergedLora(visual, spec, vector, metadata)

"""LoRA layout, flattening and functional application to a frozen backbone.

A LoRA is handled as one flat float vector (paper eq. 3): for each target in
order, B (out x r) then A (r x in), row-major. A target is a row block of one
weight parameter of the backbone, so open_clip's fused ``in_proj_weight``
(3d x d) carries three independent targets (Wq, Wk, Wv rows), each with its
own rank-r update, exactly as in the paper.

Application never copies the backbone: the updated weights W + scale * B @ A
are passed to ``torch.func.functional_call`` for the duration of one forward.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

SCALINGS = ("standard", "rslora")


@dataclass(frozen=True)
class LoraTarget:
    """One adapted weight block.

    name: canonical, backbone-independent name used in exported files
        (e.g. ``visual.transformer.resblocks.0.attn.q``).
    param: parameter path inside the backbone module (``...attn.in_proj_weight``).
    rows: [start, stop) row slice of ``param``'s first dimension this update covers.
    in_features / out_features: shape of the dense update (out x in).
    peft_module: module path of the same layer in the PEFT/HF naming, if one exists.
    """

    name: str
    param: str
    rows: tuple[int, int]
    in_features: int
    out_features: int
    peft_module: str | None = None

    def __post_init__(self) -> None:
        if self.rows[1] - self.rows[0] != self.out_features:
            raise ValueError(f"target {self.name}: rows {self.rows} do not span out_features={self.out_features}")
        if self.in_features <= 0 or self.out_features <= 0:
            raise ValueError(f"target {self.name}: in_features and out_features must be positive")


@dataclass(frozen=True)
class LoraSpec:
    """Shape of every LoRA of one artefact set: targets, rank and scaling."""

    targets: tuple[LoraTarget, ...]
    rank: int = 2
    alpha: float = 2.0
    # "standard": scale = alpha / r (PEFT default); "rslora": alpha / sqrt(r).
    scaling: str = "standard"

    def __post_init__(self) -> None:
        # Plain values (a list of targets, numpy numbers) as plain types: the spec is hashed, and written as JSON.
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
            raise TypeError(f"rank must be an integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
            raise TypeError(f"alpha must be a number, got {self.alpha!r}")
        if isinstance(self.targets, str | bytes) or not all(isinstance(t, LoraTarget) for t in self.targets):
            raise TypeError("targets must be a sequence of LoraTarget")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if not self.targets:
            raise ValueError("a LoRA spec needs at least one target")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("LoRA target names must be unique")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.scaling == "standard" else self.alpha / math.sqrt(self.rank)

    @property
    def num_params(self) -> int:
        return sum(self.rank * (t.in_features + t.out_features) for t in self.targets)

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "num_params": self.num_params,
            "targets": [asdict(t) for t in self.targets],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LoraSpec:
        targets = tuple(
            LoraTarget(
                name=t["name"],
                param=t["param"],
                rows=(int(t["rows"][0]), int(t["rows"][1])),
                in_features=int(t["in_features"]),
                out_features=int(t["out_features"]),
                peft_module=t.get("peft_module"),
            )
            for t in d["targets"]
        )
        spec = cls(targets=targets, rank=int(d["rank"]), alpha=float(d["alpha"]), scaling=d["scaling"])
        if "num_params" in d and int(d["num_params"]) != spec.num_params:
            raise ValueError(f"LoRA spec says num_params={d['num_params']} but its targets give {spec.num_params}")
        return spec

    def fingerprint(self) -> str:
        """Short hash of everything that fixes the flat layout and its meaning (computed once: every
        generated file's metadata names it)."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            fp = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
            object.__setattr__(self, "_fingerprint", fp)  # a cache on a frozen instance, not a field
        return fp

    # ---- flat <-> per-target ---------------------------------------------------------------
    def unflatten(self, vec: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(P,) -> {target name: (B (out, r), A (r, in))}; views of ``vec``, no copy."""
        if vec.dim() != 1 or vec.numel() != self.num_params:
            raise ValueError(f"LoRA vector must have shape ({self.num_params},), got {tuple(vec.shape)}")
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        r, i = self.rank, 0
        for t in self.targets:
            nb, na = t.out_features * r, r * t.in_features
            b = vec[i : i + nb].view(t.out_features, r)
            a = vec[i + nb : i + nb + na].view(r, t.in_features)
            out[t.name] = (b, a)
            i += nb + na
        return out

    def flatten(self, parts: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Inverse of :meth:`unflatten`; checks names and shapes."""
        missing = [t.name for t in self.targets if t.name not in parts]
        if missing:
            raise ValueError(f"LoRA is missing targets: {missing[:3]}{'...' if len(missing) > 3 else ''}")
        extra = sorted(set(parts) - {t.name for t in self.targets})
        if extra:
            raise ValueError(f"LoRA has unknown targets: {extra[:3]}")
        chunks = []
        for t in self.targets:
            b, a = parts[t.name]
            if tuple(b.shape) != (t.out_features, self.rank) or tuple(a.shape) != (self.rank, t.in_features):
                raise ValueError(
                    f"target {t.name}: expected B {(t.out_features, self.rank)} and A {(self.rank, t.in_features)}, "
                    f"got {tuple(b.shape)} and {tuple(a.shape)}"
                )
            chunks += [b.reshape(-1), a.reshape(-1)]
        return torch.cat(chunks)

    def b_mask(self) -> torch.Tensor:
        """(P,) float mask: 1 on the B entries of the flat layout, 0 on the A entries."""
        parts = []
        for t in self.targets:
            parts += [torch.ones(t.out_features * self.rank), torch.zeros(self.rank * t.in_features)]
        return torch.cat(parts)

    def init_vector(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard LoRA init: A ~ Kaiming-uniform(a=sqrt(5)) as in PEFT, B = 0, so the update starts at zero."""
        parts = {}
        for t in self.targets:
            bound = 1.0 / math.sqrt(t.in_features)  # kaiming_uniform_(a=sqrt(5)) on a (r, in) matrix
            a = (torch.rand(self.rank, t.in_features, generator=generator) * 2 - 1) * bound
            parts[t.name] = (torch.zeros(t.out_features, self.rank), a)
        return self.flatten(parts)

    # ---- application -------------------------------------------------------------------------
    def deltas(self, vec: torch.Tensor, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense updated parameters {param path: W + scale * B @ A} for every adapted parameter.

        ``base`` maps parameter paths to the frozen weights; differentiable in ``vec``.
        """
        parts = self.unflatten(vec)
        by_param: dict[str, list[tuple[LoraTarget, torch.Tensor]]] = {}
        for t in self.targets:
            b, a = parts[t.name]
            by_param.setdefault(t.param, []).append((t, (b @ a) * self.scale))  # (out, in)
        updated = {}
        for param, items in by_param.items():
            w = base[param]
            rows = []
            cursor = 0
            w2 = w.reshape(w.shape[0], -1)  # conv 1x1 (out, in, 1, 1) -> (out, in)
            for t, d in sorted(items, key=lambda it: it[0].rows[0]):
                start, stop = t.rows
                if start > cursor:
                    rows.append(w2[cursor:start])
                if d.shape[1] != w2.shape[1]:
                    raise ValueError(f"target {t.name}: in_features {d.shape[1]} != weight's {w2.shape[1]}")
                acc = torch.promote_types(w2.dtype, d.dtype)  # W + dW rounded once to a low-precision weight's dtype
                rows.append((w2[start:stop].to(acc) + d.to(acc)).to(w2.dtype))
                cursor = stop
            if cursor < w2.shape[0]:
                rows.append(w2[cursor:])
            updated[param] = torch.cat(rows).reshape(w.shape)
        return updated


def concat_merge(spec: LoraSpec, vecs: torch.Tensor, weights: torch.Tensor) -> tuple[LoraSpec, torch.Tensor]:
    """The exact weighted sum of K LoRAs' updates, sum_k w_k * scale * B_k A_k, as one LoRA of rank K*r (PEFT's
    ``combination_type="cat"``): per target the B blocks, each times w_k * scale, side by side and the A
    blocks stacked. Its spec has the scale folded in (alpha = rank, standard scaling: scale 1).
    ``vecs`` (K, P) flat LoRAs of ``spec``, ``weights`` (K,)."""
    if vecs.dim() != 2 or vecs.shape[0] != weights.numel() or vecs.shape[0] < 1:
        raise ValueError(f"need K >= 1 LoRA rows and K weights, got {tuple(vecs.shape)} and {tuple(weights.shape)}")
    k = vecs.shape[0]
    merged = replace(spec, rank=k * spec.rank, alpha=float(k * spec.rank), scaling="standard")
    parts = [spec.unflatten(v) for v in vecs]
    scaled = [float(w) * spec.scale for w in weights]
    return merged, merged.flatten(
        {
            t.name: (torch.cat([w * p[t.name][0] for w, p in zip(scaled, parts)], 1), torch.cat([p[t.name][1] for p in parts]))
            for t in spec.targets
        }
    )


def check_finite(vec: torch.Tensor, what: str = "LoRA") -> None:
    if not torch.isfinite(vec).all():
        bad = int((~torch.isfinite(vec)).sum())
        raise ValueError(f"{what} contains {bad} NaN/Inf values")


class LoraApplier:
    """Runs a frozen module's forward with a flat LoRA applied, without copying or mutating it."""

    def __init__(self, module: nn.Module, spec: LoraSpec):
        self.module = module
        self.spec = spec
        params = dict(module.named_parameters())
        missing = sorted({t.param for t in spec.targets} - set(params))
        if missing:
            raise ValueError(f"LoRA targets name parameters the backbone lacks: {missing[:3]}")
        self._base = {t.param: params[t.param] for t in spec.targets}

    def __call__(self, vec: torch.Tensor | None, *args, **kwargs):
        if vec is None:
            return self.module(*args, **kwargs)
        vec = vec.to(next(iter(self._base.values())).device)
        overrides = self.spec.deltas(vec, self._base)
        return torch.func.functional_call(self.module, overrides, args, kwargs, strict=False)


@torch.no_grad()
def merge_into(module: nn.Module, spec: LoraSpec, vec: torch.Tensor) -> None:
    """Adds the LoRA into the module's weights in place (reference path for tests and export)."""
    params = dict(module.named_parameters())
    for name, w in spec.deltas(vec, {t.param: params[t.param] for t in spec.targets}).items():
        params[name].copy_(w)

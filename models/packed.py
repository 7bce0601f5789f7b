"""Frozen linear layers on oneDNN with their weights reordered once: torch's own path for frozen linear
layers on the CPU (what ``torch.compile`` uses after freezing).

``F.linear`` hands the matrix-product library the plain weight, which it reorders into the blocked
layout its kernel reads on every call: for float32 MKL repacks it, for bfloat16 oneDNN reorders it.
For a layer whose product is a few rows (the generator's P x H blocks, a description's tokens through
MiniLM) that copy costs as much as the product (docs/benchmarks.md, releases 0.6.0 and 0.9.1).
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """An inference-only copy of an ``nn.Linear`` (CPU) whose weight oneDNN reorders once, here, in
    ``dtype`` (float32 or bfloat16; a bfloat16 product accumulates in float32). An input of another
    dtype is cast to ``dtype`` and the output back to the input's dtype; inputs of any rank
    (..., in_features). Not trainable; not in any state dict."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 4, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype, copy=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}"
        )


def pack_linears(module: nn.Module, dtype: torch.dtype, rows_hint: int = 32) -> int:
    """Replaces every ``nn.Linear`` inside ``module`` (called as a module, not through its ``.weight``) by a
    :class:`PackedLinear` in ``dtype``; all or none: a layer oneDNN cannot pack raises RuntimeError
    before any is replaced. Returns how many were replaced (0 where torch has no oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    swaps = [
        (parent, name, PackedLinear(child, rows_hint, dtype))
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)

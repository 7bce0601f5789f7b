"""Frozen linear layers on oneDNN with their weights reordered once: torch's own path for frozen linear
layers on the CPU (what ``torch.compile`` uses after freezing).

``F.linear`` hands the matrix-product library the plain weight, which it reorders into the blocked
layout its kernel reads on every call: for float32 MKL repacks it, for bfloat16 oneDNN reorders it.
For a layer whose product is a few rows (the generator's P x H blocks, a description's tokens through
MiniLM) that copy costs as much as the product (docs/benchmarks.md, releases 0.6.0 and 0.9.1).

oneDNN chooses how to block a product by its shape. On CPUs with AMX (Intel Sapphire Rapids and later)
its bfloat16 kernel splits a long reduction (MiniLM's 1536-wide feed-forward output) differently for
different numbers of rows, so a row's result, in its last bits, depended on how many rows came with it:
a description's embedding alone and inside a batch differed, and the service turned micro-batching off.
``fixed_rows`` runs such a layer in blocks of exactly that many rows (the last padded), so every row's
product has one shape whatever it is batched with. It costs time (the padding, more calls: on one AMX
core a lone description 8.7 -> 9.4 ms, a batch of 32 1.41 -> 1.70 ms a description), so the service
turns it on only where its start-up check finds batching changes embeddings without it
(:func:`set_fixed_rows`; docs/benchmarks.md, release 0.9.5).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import List, Optional, Union  # noqa: UP035 (TorchScript reads these annotations)

import torch
import torch.nn.functional as F
from torch import nn

# torch.jit is deprecated: a torch without it still runs these layers (eagerly; nothing can trace them then).
_is_tracing: Callable[[], bool] = getattr(getattr(torch, "jit", None), "is_tracing", lambda: False)


class PackedLinear(nn.Module):
    """An inference-only copy of an ``nn.Linear`` (CPU) whose weight oneDNN reorders once, here, in
    ``dtype`` (float32 or bfloat16; a bfloat16 product accumulates in float32). An input of another
    dtype is cast to ``dtype`` and the output back to the input's dtype; inputs of any rank
    (..., in_features). Not trainable; not in any state dict (non-persistent buffers, which a
    ``torch.jit.trace`` of a model holding the layer reads as attributes). ``copy.deepcopy`` reorders the
    weight again; ``Module.to`` and casts carry it along (:meth:`_apply`); :func:`unpack_linears` gives plain
    layers back."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 4, dtype: torch.dtype = torch.float32, fixed_rows: int | None = None):
        super().__init__()
        if fixed_rows is not None and fixed_rows < 1:
            raise ValueError(f"fixed_rows must be >= 1, got {fixed_rows}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = dtype
        self.rows_hint = rows_hint
        self.fixed_rows = fixed_rows  # None: one product of all the rows
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows_hint)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype, copy=True), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype)
        # Traced, the same function scripted: the tracer cannot record the oneDNN op's list argument, and
        # would unroll the loop over a batch's blocks at the traced batch size.
        products = _scripted_products() if _is_tracing() else _products
        y = products(rows, self.weight, self.bias, self.fixed_rows or 0)
        return y.reshape(x.shape[:-1] + (self.out_features,)).to(x.dtype)

    def unpacked(self) -> nn.Linear:
        """A plain, frozen ``nn.Linear`` in ``dtype`` with this layer's weights (oneDNN's reorder undone: the
        same values), where this layer is."""
        weight = self._plain_weight()
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, weight.device, self.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False).train(self.training)

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        # oneDNN's reordered weight has no storage to copy: the copy reorders the plain weight again.
        copied = PackedLinear.__new__(PackedLinear)
        nn.Module.__init__(copied)
        copied.in_features, copied.out_features = self.in_features, self.out_features
        copied.dtype, copied.rows_hint, copied.fixed_rows = self.dtype, self.rows_hint, self.fixed_rows
        weight = self._plain_weight().clone()
        copied.register_buffer("weight", self._reordered(weight) if self.weight.is_mkldnn else weight, persistent=False)
        copied.register_buffer("bias", None if self.bias is None else self.bias.clone(), persistent=False)
        memo[id(self)] = copied
        return copied.train(self.training)

    def _apply(self, fn, recurse: bool = True) -> PackedLinear:
        # Module.to / .cuda / .float reach here (the weights are neither parameters nor buffers, which
        # torch would move itself). The reordered weight is a CPU oneDNN tensor: a move or a cast takes the
        # plain weight and reorders it again where oneDNN can (a CPU, float32 or bfloat16); elsewhere the
        # layer keeps the plain weight and runs F.linear.
        probe = fn(torch.zeros(1, dtype=self.dtype, device=self.weight.device))
        if probe.device == self.weight.device and probe.dtype == self.dtype:
            return self  # nothing changes (e.g. .to("cpu") on the CPU): no reorder
        weight = fn(self._plain_weight())
        self.bias = None if self.bias is None else fn(self.bias)
        self.dtype = weight.dtype
        self.weight = self._reordered(weight)
        return self

    def _plain_weight(self) -> torch.Tensor:
        return self.weight.to_dense() if self.weight.is_mkldnn else self.weight

    def _reordered(self, weight: torch.Tensor) -> torch.Tensor:
        on_onednn = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
        if not on_onednn or not torch.backends.mkldnn.is_available():
            return weight
        return torch.ops.mkldnn._reorder_linear_weight(weight, self.rows_hint)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}"
            + ("" if self.fixed_rows is None else f", fixed_rows={self.fixed_rows}")
        )


def _product(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    if not weight.is_mkldnn:  # moved off the CPU or to a dtype oneDNN lacks (PackedLinear._apply)
        return F.linear(rows, weight, bias)
    scalars: List[Optional[Union[int, float, complex]]] = []  # noqa: UP006, UP007, UP045
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", scalars, "")


def _products(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], block: int) -> torch.Tensor:  # noqa: UP045
    """:meth:`PackedLinear.forward`'s products, eager or scripted (TorchScript reads this code): one
    product of all the rows (``block`` 0), else blocks of ``block`` rows, the last padded with zeros."""
    n = rows.shape[0]
    if block <= 0 or n == 0:
        return _product(rows, weight, bias)
    padded = F.pad(rows, [0, 0, 0, (block - n % block) % block])
    return torch.cat([_product(padded[i : i + block], weight, bias) for i in range(0, padded.shape[0], block)])[:n]


@functools.cache
def _scripted_products() -> Callable[..., torch.Tensor]:
    """:func:`_products` compiled by TorchScript once, on the first trace that needs it (not at import:
    torch.jit warns that it is deprecated, which every importer would see)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(_products)


# Layers whose weights take at least this many bytes run their product in column blocks on two threads
# (SplitLinear): on open_clip ViT-B-16's shape the CVAE's two P x H layers hold 57 MB each in bfloat16.
SPLIT_MIN_BYTES = 16 << 20


def _one_thread() -> None:
    # OpenMP keeps a thread count per thread, and oneDNN's products never ask torch for it: without this the
    # helper ran float32 products on every core (a 256 -> 110,592 layer split: 11.8 ms against 6.3 whole).
    torch.set_num_threads(1)


@functools.cache
def _helpers() -> ThreadPoolExecutor:
    """The thread that runs a :class:`SplitLinear`'s second block, shared by every layer and caller; torch
    ops on it run on one thread, as split layers' callers do (:func:`split_large`)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglora-split", initializer=_one_thread)


def _always() -> bool:
    return True


_split_gate: Callable[[], bool] = _always


def set_split_gate(gate: Callable[[], bool] | None) -> None:
    """Whether a :class:`SplitLinear` called now may hand its second block to the helper thread (else its
    caller runs both, the same bits): a service passes "no other work is running or waiting", so that
    under load, when every core has a model thread's work, the blocks do not compete with it for them
    (measured: 32 clients made 2-7 % fewer answers a second with every pass split). One gate per process;
    None: always."""
    global _split_gate
    _split_gate = gate or _always


def clear_split_gate(gate: Callable[[], bool]) -> None:
    """:func:`set_split_gate` (None), where the gate is still ``gate`` (a service that stops leaves another's alone)."""
    if _split_gate == gate:
        set_split_gate(None)


def _block(part: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # a helper thread is in no grad mode of its own
        return part(x)


class SplitLinear(nn.Module):
    """A :class:`PackedLinear` as two layers of half its outputs each, run at once: the first on the
    caller's thread, the second on a helper thread (or on the caller's thread after the first, where the
    helper is busy with another caller's block, or where :func:`set_split_gate`'s gate says other work
    has the cores). A product of a few rows by a large weight is bound by
    reading the weight; two cores read it in close to half the time (one row through a 256 -> 110,592
    bfloat16 layer: 2.62 -> 1.65 ms on a two-core EPYC). Each output is the dot product it is in the whole
    layer; :func:`split_large` keeps a split only where its bits are the whole layer's."""

    def __init__(self, layer: PackedLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        weight, half = layer._plain_weight(), layer.out_features // 2
        self.parts = nn.ModuleList(
            _packed_rows(weight[a:b], None if layer.bias is None else layer.bias[a:b], layer)
            for a, b in ((0, half), (half, layer.out_features))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_tracing() or not _split_gate():  # a tracer would not see the helper's block, only its result
            return self.inline(x)
        try:
            second = _helpers().submit(_block, self.parts[1], x)
        except RuntimeError:  # the interpreter is shutting down
            return self.inline(x)
        try:
            first = self.parts[0](x)
        except BaseException:
            if not second.cancel():
                wait([second])  # its memory freed before the caller retries, say after running out of it
            raise
        return torch.cat([first, self.parts[1](x) if second.cancel() else second.result()], dim=-1)

    def _two_threads(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the helper, whatever the gate says (:func:`split_large`'s probe)."""
        second = _helpers().submit(_block, self.parts[1], x)
        return torch.cat([self.parts[0](x), second.result()], dim=-1)

    def inline(self, x: torch.Tensor) -> torch.Tensor:
        """Both blocks on the caller's thread, one after the other: the same bits as :meth:`forward`."""
        return torch.cat([part(x) for part in self.parts], dim=-1)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, two blocks of outputs"


def _packed_rows(weight: torch.Tensor, bias: torch.Tensor | None, like: PackedLinear) -> PackedLinear:
    return PackedLinear(_linear_of(weight, bias), like.rows_hint, like.dtype, like.fixed_rows)


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding these tensors (not copies) for :class:`PackedLinear` to pack, which copies them."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    linear.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return linear


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_large(module: nn.Module, min_bytes: int | None = None, probe_rows: Sequence[int] = range(1, 17)) -> int:
    """Replaces every oneDNN :class:`PackedLinear` inside ``module`` whose weight takes at least ``min_bytes``
    (default :data:`SPLIT_MIN_BYTES`) by a :class:`SplitLinear`, where the process may use two cores or more,
    runs torch ops on one thread each (the service's model threads; with more, a lone product already
    spreads over cores) and the split layer gives the whole layer's bits for random inputs of each of
    ``probe_rows`` rows (a CVAE pass has 1 to 16), its blocks on two threads and on one; returns how many
    were replaced."""
    min_bytes = SPLIT_MIN_BYTES if min_bytes is None else min_bytes
    if usable_cores() < 2 or torch.get_num_threads() > 1:
        return 0
    swaps = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if not isinstance(child, PackedLinear) or not child.weight.is_mkldnn or child.fixed_rows is not None:
                continue
            if child.in_features * child.out_features * child.weight.element_size() < min_bytes or child.out_features < 2:
                continue
            split = SplitLinear(child)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                probes = [torch.randn(n, child.in_features, generator=g) for n in probe_rows]
                if all(torch.equal(split._two_threads(x), w := child(x)) and torch.equal(split.inline(x), w) for x in probes):
                    swaps.append((parent, name, split))
    for parent, name, split in swaps:
        setattr(parent, name, split)
    return len(swaps)


# Reductions at least this long are the ones whose blocking followed the row count (see the module docstring).
LONG_REDUCTION = 1024
FIXED_ROWS = 64


def set_fixed_rows(module: nn.Module, rows: int | None, min_in_features: int = LONG_REDUCTION) -> int:
    """Runs every bfloat16 :class:`PackedLinear` inside ``module`` with at least ``min_in_features`` inputs
    in blocks of ``rows`` rows (None: one product of all the rows again); returns how many layers."""
    layers = [m for m in module.modules() if isinstance(m, PackedLinear) and m.dtype == torch.bfloat16]
    layers = [m for m in layers if m.in_features >= min_in_features]
    for m in layers:
        m.fixed_rows = rows
    return len(layers)


# The attributes pack_attention gives an attention: packed copies of projections it still holds itself.
PACKED_ATTENTION = ("packed_in_proj", "packed_out_proj")


def pack_attention(module: nn.Module, dtype: torch.dtype, rows_hint: int = 32) -> int:
    """Gives every ``nn.MultiheadAttention`` inside ``module`` whose input projection is one (3E, E) matrix
    packed copies of its input and output projections, ``packed_in_proj`` and ``packed_out_proj``
    (:class:`PackedLinear` in ``dtype``), for forwards that compute the attention themselves
    (models/open_clip_backbone.py); nn.MultiheadAttention's own forward does not use them. As children of
    the attention they are found by :func:`set_fixed_rows`. Returns how many attentions (0 without oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    attentions = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim]
    packed = []
    for mha in attentions:
        in_proj = _linear_of(mha.in_proj_weight, mha.in_proj_bias)
        packed.append((PackedLinear(in_proj, rows_hint, dtype), PackedLinear(mha.out_proj, rows_hint, dtype)))
    for mha, (in_proj, out_proj) in zip(attentions, packed, strict=True):
        setattr(mha, PACKED_ATTENTION[0], in_proj)
        setattr(mha, PACKED_ATTENTION[1], out_proj)
    return len(attentions)


def pack_linears(module: nn.Module, dtype: torch.dtype, rows_hint: int = 32) -> int:
    """Replaces every ``nn.Linear`` inside ``module`` (called as a module, not through its ``.weight``) by a
    :class:`PackedLinear` in ``dtype``, one product per call (:func:`set_fixed_rows` changes that). All or
    none: a layer oneDNN cannot pack raises RuntimeError before any is replaced. Returns how many were
    replaced (0 where torch has no oneDNN)."""
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


def unpack_linears(module: nn.Module) -> int:
    """Undoes :func:`pack_linears` and :func:`pack_attention` inside ``module``: every :class:`PackedLinear`
    becomes a plain ``nn.Linear`` with the same weights (:meth:`PackedLinear.unpacked`), the attentions'
    packed copies are dropped (the attention holds its own projections). Then the module can move to
    another device or dtype. Returns how many packed layers were removed."""
    found = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, PackedLinear)
    ]
    for parent, name, child in found:
        if isinstance(parent, nn.MultiheadAttention) and name in PACKED_ATTENTION:
            delattr(parent, name)
        else:
            setattr(parent, name, child.unpacked())
    return len(found)


def has_packed(module: nn.Module) -> bool:
    """Whether ``module`` holds a :class:`PackedLinear`."""
    return any(isinstance(m, PackedLinear) for m in module.modules())

"""models/packed.py: frozen linear layers on oneDNN with their weights reordered once."""

import copy

import pytest
import torch
from onednn_support import needs_onednn, needs_onednn_bfloat16
from torch import nn

from models.packed import PackedLinear, has_packed, pack_attention, pack_linears, set_fixed_rows, unpack_linears

pytestmark = needs_onednn
needs_bfloat16 = needs_onednn_bfloat16
BF16 = pytest.param(torch.bfloat16, marks=needs_bfloat16)


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False), nn.MultiheadAttention(8, 2))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_packed_layers_compute_what_the_plain_ones_do_at_any_rank(dtype):
    plain = _block()[:3].to(dtype)
    packed = _block()[:3].to(dtype)
    assert pack_linears(packed, dtype) == 2
    assert [type(m).__name__ for m in packed] == ["PackedLinear", "GELU", "PackedLinear"]
    x = torch.randn(3, 5, 16).to(dtype)  # (batch, tokens, features)
    with torch.inference_mode():
        got, want = packed(x), plain(x)
    assert got.dtype == dtype and got.shape == (3, 5, 8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs_bfloat16
def test_a_bfloat16_layer_keeps_float32_at_its_edges_and_subclasses_stay():
    block = _block()
    out_proj = block[3].out_proj  # a Linear subclass that MultiheadAttention reads through .weight
    assert pack_linears(block, torch.bfloat16) == 2 and block[3].out_proj is out_proj
    layer = block[0]
    assert isinstance(layer, PackedLinear) and layer.weight.dtype == torch.bfloat16 and "dtype=bfloat16" in repr(layer)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _block()[0](x), rtol=2e-2, atol=2e-2)


@needs_bfloat16
def test_fixed_row_blocks_give_each_row_the_bits_it_has_alone():
    # oneDNN's AMX kernel splits a long reduction by the number of rows: the same row alone and inside a
    # batch differed in its last bits. In fixed blocks every row's product has one shape.
    import copy

    from models.packed import FIXED_ROWS, LONG_REDUCTION, set_fixed_rows

    torch.manual_seed(0)
    wide = LONG_REDUCTION + 512
    block = nn.Sequential(nn.Linear(384, wide), nn.GELU(), nn.Linear(wide, 384))
    plain, in_float32 = copy.deepcopy(block), copy.deepcopy(block)
    assert pack_linears(block, torch.bfloat16) == 2 and pack_linears(in_float32, torch.float32) == 2
    assert block[2].fixed_rows is None  # one product per call unless asked
    assert set_fixed_rows(block, FIXED_ROWS) == 1 and set_fixed_rows(in_float32, FIXED_ROWS) == 0
    long = block[2]
    assert block[0].fixed_rows is None and long.fixed_rows == FIXED_ROWS and f"fixed_rows={FIXED_ROWS}" in repr(long)
    x = torch.randn(3 * FIXED_ROWS + 5, wide)
    with torch.inference_mode():
        batch = long(x)
        for n in (1, 7, FIXED_ROWS, FIXED_ROWS + 1, 2 * FIXED_ROWS + 3):
            assert torch.equal(long(x[:n]), batch[:n]), n
        assert torch.equal(long(x[-9:]), batch[-9:])  # rows from another block of the batch: the same bits too
        assert long(x[:0]).shape == (0, 384)
        want = plain[2](x)
    torch.testing.assert_close(batch, want, rtol=2e-2, atol=2e-2)
    assert set_fixed_rows(block, None) == 1 and long.fixed_rows is None
    with pytest.raises(ValueError, match="fixed_rows must be >= 1"):
        PackedLinear(nn.Linear(4, 4), fixed_rows=0)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_attention_gets_packed_copies_of_its_projections(dtype):
    """pack_attention leaves nn.MultiheadAttention as it is (its own forward reads .weight) and adds packed
    copies of the input and output projections, which compute what they do, hold no state and are found
    by set_fixed_rows; attention with separate q/k/v weights is left alone."""
    block = _block()
    attn = block[3]
    state = {k: v.clone() for k, v in block.state_dict().items()}
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    assert pack_attention(nn.Sequential(block, separate), dtype) == 1 and not hasattr(separate, "packed_in_proj")
    assert {k: v.dtype for k, v in block.state_dict().items()} == {k: v.dtype for k, v in state.items()}
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())
    x = torch.randn(3, 5, 8)
    with torch.inference_mode():
        qkv, out = attn.packed_in_proj(x), attn.packed_out_proj(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    want_qkv = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    torch.testing.assert_close(qkv, want_qkv, rtol=tol, atol=tol)
    torch.testing.assert_close(out, attn.out_proj(x), rtol=tol, atol=tol)
    assert set_fixed_rows(attn, 4, min_in_features=1) == (2 if dtype == torch.bfloat16 else 0)


def test_float32_packed_layers_deep_copy_move_and_unpack_with_their_weights():
    """What the bfloat16 test below checks, in float32 (which every oneDNN CPU packs); and float32 layers
    have no reductions to block."""
    block = _block()
    plain = copy.deepcopy(block)
    assert pack_linears(block, torch.float32) == 2 and pack_attention(block, torch.float32) == 1
    assert set_fixed_rows(block, 4, min_in_features=1) == 0  # fixed-row blocks are for bfloat16 layers only
    x = torch.randn(6, 16)
    with torch.inference_mode():
        want = block[:3](x)
        torch.testing.assert_close(want, plain[:3](x), rtol=1e-5, atol=1e-5)
        twin = copy.deepcopy(block)
        assert twin[0].weight.is_mkldnn and twin[0] is not block[0] and torch.equal(twin[:3](x), want)
        linear = twin[2].unpacked()
        assert type(linear) is nn.Linear and torch.equal(linear.weight, plain[2].weight) and linear.bias is None
        assert unpack_linears(twin) == 4 and not has_packed(twin) and not hasattr(twin[3], "packed_in_proj")
        assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), plain.state_dict().values(), strict=True))
        # A cast to a dtype oneDNN does not pack keeps the plain weights (F.linear); a move off the CPU too.
        wide = copy.deepcopy(block[:3]).double()
        assert wide[0].dtype == torch.float64 and not wide[0].weight.is_mkldnn
        torch.testing.assert_close(wide(x.double()), plain[:3].double()(x.double()))
        moved = copy.deepcopy(block[:3]).to("meta")
        assert moved[0].weight.device.type == "meta" and not moved[0].weight.is_mkldnn
        assert block.to("cpu") is block and block[0].weight.is_mkldnn
        assert torch.equal(block[:3](x), want)


@needs_bfloat16
def test_packed_layers_deep_copy_cast_move_and_unpack_with_their_weights():
    """oneDNN's reordered weight has no storage: copy.deepcopy raised NotImplementedError, and Module.to
    left the weight behind (neither a parameter nor a buffer), to fail at the next forward."""
    block = _block().to(torch.bfloat16)
    plain = copy.deepcopy(block)
    assert pack_linears(block, torch.bfloat16) == 2 and pack_attention(block, torch.bfloat16) == 1
    set_fixed_rows(block, 4, min_in_features=1)
    x = torch.randn(6, 16)
    with torch.inference_mode():
        want = block[:3](x)
        twin = copy.deepcopy(block)
        assert twin[0].weight.is_mkldnn and twin[0].fixed_rows == 4 and twin[0] is not block[0]
        assert torch.equal(twin[:3](x), want)
        # Unpacked: nn.Linear again with the very weights, the attention's copies dropped.
        linear = twin[2].unpacked()
        assert type(linear) is nn.Linear and torch.equal(linear.weight, plain[2].weight) and linear.bias is None
        assert unpack_linears(twin) == 4 and not has_packed(twin) and not hasattr(twin[3], "packed_in_proj")
        assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), plain.state_dict().values(), strict=True))
        # A cast packs again in the new dtype; a move off the CPU keeps plain weights and runs F.linear.
        cast = copy.deepcopy(block[:3]).float()
        assert cast[0].dtype == torch.float32 and cast[0].weight.is_mkldnn
        torch.testing.assert_close(cast(x), plain[:3].float()(x), rtol=1e-5, atol=1e-5)
        moved = copy.deepcopy(block[:3]).to("meta")
        assert moved[0].weight.device.type == "meta" and not moved[0].weight.is_mkldnn
        assert moved(x.to("meta")).shape == (6, 8)
        assert block.to("cpu") is block and block[0].weight.is_mkldnn  # a move to where it is: untouched
        assert torch.equal(block[:3](x), want)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("fixed_rows", [None, 3])
def test_a_trace_of_packed_layers_gives_their_bits_at_shapes_it_was_not_traced_at(dtype, fixed_rows):
    # Backbone.trace_text traces models holding packed layers: the graph reads their reordered weights as
    # attributes and runs the same products (in fixed-row blocks as a loop, not unrolled at the traced shape).
    import warnings

    block = _block()[:3].to(dtype)
    pack_linears(block, dtype)
    set_fixed_rows(block, fixed_rows, min_in_features=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        graph = torch.jit.trace(block, torch.randn(2, 5, 16).to(dtype), check_trace=False)
    with torch.inference_mode():
        for shape in [(2, 5, 16), (1, 1, 16), (3, 7, 16), (11, 4, 16), (0, 5, 16)]:  # a trace keeps the rank
            x = torch.randn(*shape).to(dtype)
            got, want = graph(x), block(x)
            assert got.shape == want.shape and torch.equal(got, want), shape
    assert "weight" not in block[0].state_dict()  # the reordered weights are buffers, not saved


def _split_block(monkeypatch) -> tuple[nn.Module, nn.Module]:
    """A packed 64 -> 300 layer split by split_large (two cores, torch on one thread: the service's case), and
    a whole copy of it."""
    import models.packed as packed
    from models.packed import split_large

    monkeypatch.setattr(packed, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    block = nn.Sequential(nn.Linear(64, 300))
    pack_linears(block, torch.float32)
    whole = copy.deepcopy(block)
    assert split_large(block, min_bytes=1) == 1
    return block, whole


def _record_threads(monkeypatch) -> list[str]:
    """The names of the threads every PackedLinear runs on from now on, in order."""
    import threading

    seen, real = [], PackedLinear.forward

    def forward(self, x):
        seen.append(threading.current_thread().name)
        return real(self, x)

    monkeypatch.setattr(PackedLinear, "forward", forward)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_large_layers_split_in_two_blocks_on_two_threads_give_the_whole_layers_bits(dtype, monkeypatch):
    import threading

    import models.packed as packed
    from models.packed import SplitLinear, split_large

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 301), nn.GELU(), nn.Linear(301, 8)).to(dtype)
    pack_linears(block, dtype)
    whole = copy.deepcopy(block)
    monkeypatch.setattr(packed, "usable_cores", lambda: 1)
    assert split_large(block, min_bytes=1) == 0  # one core: nothing to gain
    monkeypatch.setattr(packed, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert split_large(block, min_bytes=1) == 0  # two torch threads: a product spreads over the cores already
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    big = 64 * 301 * torch.tensor([], dtype=dtype).element_size()
    assert split_large(block, min_bytes=big) == 1  # the first layer alone is that large
    assert isinstance(block[0], SplitLinear) and isinstance(block[2], PackedLinear)
    assert [p.out_features for p in block[0].parts] == [150, 151] and "weight" not in block.state_dict()
    seen = _record_threads(monkeypatch)
    with torch.inference_mode():  # rows split_large checked the bits for (1 to 16: a CVAE pass's)
        for shape in ((1, 64), (2, 64), (3, 5, 64), (16, 64)):
            x = torch.randn(shape).to(dtype)
            assert torch.equal(block(x), whole(x)), shape
    assert any(name.startswith("sglora-split") for name in seen)  # the second block ran on the helper
    # A busy helper (another caller's block) does not hold the caller up: it runs the block itself.
    gate = threading.Event()
    packed._helpers().submit(gate.wait, 10)
    try:
        seen.clear()
        with torch.inference_mode():
            x = torch.randn(4, 64).to(dtype)
            assert torch.equal(block(x), whole(x))
        assert not any(name.startswith("sglora-split") for name in seen)
    finally:
        gate.set()


def test_a_split_that_would_change_the_bits_is_not_kept(monkeypatch):
    import models.packed as packed
    from models.packed import split_large

    monkeypatch.setattr(packed, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    block = nn.Sequential(nn.Linear(64, 300))
    pack_linears(block, torch.float32)
    zeros = lambda self, x: torch.zeros(*x.shape[:-1], self.out_features)  # noqa: E731
    for path in ("_two_threads", "inline"):  # the blocks on two threads, or on the caller's alone
        with monkeypatch.context() as m:
            m.setattr(packed.SplitLinear, path, zeros)
            assert split_large(block, min_bytes=1) == 0 and isinstance(block[0], PackedLinear)
    assert split_large(block, min_bytes=1) == 1


def test_a_closed_split_gate_runs_both_blocks_on_the_callers_thread(monkeypatch):
    from models.packed import set_split_gate

    block, whole = _split_block(monkeypatch)
    seen = _record_threads(monkeypatch)
    set_split_gate(lambda: False)  # other work has the cores (a service: its worker is not alone)
    try:
        x = torch.randn(2, 64)
        with torch.inference_mode():
            assert torch.equal(block(x), whole(x))
        assert len(seen) == 3 and not any(n.startswith("sglora-split") for n in seen)  # two blocks, then the whole layer
    finally:
        set_split_gate(None)


def test_a_split_layer_traces_whole_runs_its_helper_on_one_thread_and_waits_for_it_when_its_block_fails(monkeypatch):
    import time
    import warnings

    import models.packed as packed

    block, whole = _split_block(monkeypatch)
    monkeypatch.undo()
    # OpenMP keeps a thread count per thread: the helper's products run on one, as its callers' do.
    assert packed._helpers().submit(torch.get_num_threads).result() == 1
    # A trace records both blocks (the helper's work is invisible to the tracer, which would keep its result).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        graph = torch.jit.trace(block, torch.randn(2, 3, 64), check_trace=False)
        x = torch.randn(3, 5, 64)  # 15 rows: split_large checked the bits for 1 to 16, not beyond
        assert torch.equal(graph(x), whole(x))
    # The first block fails (out of memory, say): the second is not left running on the helper.
    state = ["not started"]
    second = block[0].parts[1]

    def slow(x):
        state[0] = "running"
        time.sleep(0.2)
        state[0] = "finished"
        return torch.zeros(*x.shape[:-1], second.out_features)

    def fails(x):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(second, "forward", slow)
    monkeypatch.setattr(block[0].parts[0], "forward", fails)
    for _ in range(5):  # the helper picks the block up before the failure, or the failure cancels it
        with pytest.raises(RuntimeError, match="out of memory"), torch.inference_mode():
            block(torch.randn(1, 64))
        assert state[0] in ("not started", "finished")

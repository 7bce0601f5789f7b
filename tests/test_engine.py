"""Engine.generate_many: one batched pass gives, row for row, the bytes of Engine.generate alone."""

import copy
import dataclasses
import threading
import time

import pytest
import torch
from onednn_support import needs_onednn, needs_onednn_bfloat16

from sglora.artifacts import load_artifacts
from sglora.engine import MAX_PAD_ROWS, MAX_PASS_ROWS, MODEL_SOUP, Request


@pytest.fixture(scope="module")
def engine(tiny_artifacts_session):
    return load_artifacts(tiny_artifacts_session, "cpu").engine


def _bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def test_batch_rows_equal_single_generations(engine):
    texts = ["a photo of a circle", "a photo of a star", "a red square at the top", "a photo of a circle"]
    requests = [
        Request("sg-lora", seed=11),
        Request("sg-lora", seed=12, top_k=2, temperature=0.5),
        Request("topk-weighted", top_k=3),
        Request("adapter-soup"),
        Request("model-soup"),
        Request("zero-shot"),
        Request("sg-lora", seed=11),
    ]
    emb = engine.embed([texts[i % len(texts)] for i in range(len(requests))])
    with torch.inference_mode():
        batch = engine.generate_many(emb, requests)
        for row, (r, g) in enumerate(zip(requests, batch, strict=True)):
            alone = engine.generate(emb[row], r.method, seed=r.seed, top_k=r.top_k, temperature=r.temperature)
            assert _bytes(g.lora) == _bytes(alone.lora), (row, r)
            assert g.experts == alone.experts and g.seed == alone.seed and g.top_k == alone.top_k
    assert _bytes(batch[0].lora) != _bytes(batch[6].lora)  # same seed, another description
    assert batch[2].top_k == 3 and len(batch[2].experts) == 3
    assert len(batch[4].experts) == len(engine.repository)
    # What the soups do not use is not recorded: equal weights (no temperature), model-soup every expert.
    assert batch[3].temperature is None and batch[4].temperature is None and batch[4].top_k == len(engine.repository)
    assert batch[2].temperature == engine.temperature


@needs_onednn_bfloat16
def test_bfloat16_sampler_keeps_rows_independent_of_their_batch(tiny_artifacts_session, one_thread):
    """set_generator_dtype(bfloat16): the pass rows are checked again for the bfloat16 kernels, and a
    batch's rows still get their bytes alone; float32 again restores the float32 samples."""
    engine = load_artifacts(tiny_artifacts_session, "cpu").engine
    assert engine.generator.packed(torch.bfloat16) is not None
    n = 7
    emb = engine.embed([f"a shape of kind {i}" for i in range(n)])
    requests = [Request("sg-lora", seed=i) for i in range(n)]
    with torch.inference_mode():
        float32 = engine.generate_many(emb, requests)
        engine.set_generator_dtype(torch.bfloat16)
        assert engine._pass_rows is None and engine.generator_dtype_name == "bfloat16"
        batch = engine.generate_many(emb, requests)
        for i, (r, g) in enumerate(zip(requests, batch, strict=True)):
            assert g.generator_dtype == "bfloat16" and float32[i].generator_dtype == "float32"
            assert _bytes(g.lora) == _bytes(engine.generate(emb[i], "sg-lora", seed=r.seed).lora), i
            assert _bytes(g.lora) != _bytes(float32[i].lora)
        assert engine.generate(emb[0], "topk-weighted").generator_dtype == ""
        engine.set_generator_dtype(torch.float32)
        assert _bytes(engine.generate_many(emb, requests)[3].lora) == _bytes(float32[3].lora)


def test_a_bad_request_fails_alone(engine):
    emb = engine.embed(["a photo of a circle"] * 4)
    out = engine.generate_many(
        emb, [Request("sg-lora", seed=1), Request("sg-lora", top_k=99), Request("nope"), Request("topk-weighted", temperature=0)]
    )
    assert not isinstance(out[0], Exception) and out[0].seed == 1
    assert isinstance(out[1], ValueError) and "top_k" in str(out[1])
    assert isinstance(out[2], ValueError) and "unknown method" in str(out[2])
    assert isinstance(out[3], ValueError) and "temperature" in str(out[3])
    with pytest.raises(ValueError, match="top_k"):
        engine.generate(emb[0], "sg-lora", top_k=0)
    with pytest.raises(ValueError, match="one embedding row per request"):
        engine.generate_many(emb, [Request()])


@pytest.mark.parametrize("method", ["model-soup", "adapter-soup", "topk-weighted"])
def test_a_top_k_or_temperature_out_of_range_is_refused_where_the_method_ignores_it(engine, method):
    """model-soup mixes every expert and the soups weigh them equally; a top_k of 99 (or 0) or a temperature
    of 0 still named a bad request there (the service refuses them for every method) and was taken silently."""
    emb = engine.embed(["a photo of a circle"])[0]
    n = len(engine.repository)
    for top_k in (0, n + 1):
        with pytest.raises(ValueError, match=rf"^top_k must be between 1 and the number of experts \({n}\), got {top_k}$"):
            engine.generate(emb, method, top_k=top_k)
    with pytest.raises(ValueError, match="^temperature must be between"):
        engine.generate(emb, method, temperature=0.0)
    assert engine.generate(emb, method, top_k=n, temperature=2.0).method == method  # the bounds themselves pass


def test_request_fields_of_the_wrong_type_fail_their_row_alone(engine):
    # A float, bool or string seed (or a float top_k) reached torch.Generator.manual_seed or torch.topk after
    # the other rows were done, and its TypeError or RuntimeError lost the whole batch; numpy integers failed too.
    import numpy as np

    emb = engine.embed(["a photo of a circle"] * 7)
    bad = [Request("sg-lora", seed=1.5), Request("sg-lora", seed="7"), Request("sg-lora", seed=True)]
    bad += [Request("topk-weighted", top_k=2.0), Request("topk-weighted", temperature="0.5")]
    good = [Request("sg-lora", seed=np.int64(4), top_k=np.int64(2)), Request("topk-weighted", temperature=np.float32(0.5))]
    out = engine.generate_many(emb, bad + good)
    for r, g in zip(bad, out, strict=False):
        assert isinstance(g, ValueError), r
    assert [str(g).split(" must")[0] for g in out[:5]] == ["seed", "seed", "seed", "top_k", "temperature"]
    assert out[5].seed == 4 and type(out[5].seed) is int and out[5].top_k == 2
    assert _bytes(out[5].lora) == _bytes(engine.generate(emb[0], "sg-lora", seed=4, top_k=2).lora)
    assert out[6].temperature == 0.5
    # a numpy float32 is recorded with its own digits, not its binary ones (0.10000000149011612), and weighs
    # the experts as the Python float does: the softmax is worked out in float32
    f32 = engine.generate(emb[0], "topk-weighted", temperature=np.float32(0.1))
    assert f32.temperature == 0.1 and type(f32.temperature) is float
    with np.printoptions(legacy="1.13"):  # numpy's str() then rounds a float64 to 12 digits
        assert (
            engine.generate(emb[0], "topk-weighted", temperature=np.float64(0.123456789012345)).temperature == 0.123456789012345
        )
    assert f32.experts == engine.generate(emb[0], "topk-weighted", temperature=0.1).experts
    half = engine.generate(emb[0], "sg-lora", seed=3, temperature=np.float16(0.3))  # 0.300048828125 in binary
    assert half.temperature == 0.3  # what is recorded is what weighed the experts
    assert torch.equal(half.lora, engine.generate(emb[0], "sg-lora", seed=3, temperature=0.3).lora)


def test_embedding_misuse_is_named(engine, tiny_artifacts_session):
    with pytest.raises(TypeError, match=r"a list of descriptions, not a string: embed\(\[description\]\)\[0\]"):
        engine.embed("circle")  # was six one-letter descriptions
    with pytest.raises(TypeError, match="a description is a string, not NoneType"):
        engine.embed([None])
    long = "a photo of a circle " * 40  # past the tiny text tower's context: was cut off, silently
    with pytest.raises(ValueError, match=r"^descriptions\[1\] is \d+ tokens long, and the text tower reads at most"):
        engine.embed(["a photo of a circle", long])
    emb = engine.embed(["a photo of a circle"])
    with pytest.raises(ValueError, match=r"one description's \(D,\) tensor, got \(1, 32\)"):
        engine.generate(emb, "topk-weighted")  # embed's (1, D), not its row
    with pytest.raises(ValueError, match="the embeddings are 17-d, this engine's experts 32-d"):
        engine.generate(torch.randn(17), "sg-lora", seed=1)  # another backbone's embedding: was a torch RuntimeError
    with pytest.raises(ValueError, match="finite"):
        engine.generate(torch.full((32,), float("nan")), "topk-weighted")  # was NaN weights, silently
    # such a row fails alone, as a bad request does (it failed the whole call)
    two = torch.stack([torch.full((32,), float("nan")), emb[0]])
    out = engine.generate_many(two, [Request("topk-weighted"), Request("topk-weighted")])
    assert isinstance(out[0], ValueError) and str(out[0]) == "row 0 of the embeddings must have a finite, non-zero float32 norm"
    assert torch.equal(out[1].lora, engine.generate(emb[0], "topk-weighted").lora)
    with pytest.raises(ValueError, match="floating-point rows, got torch.int64"):
        engine.generate_many(torch.ones(1, 32, dtype=torch.long), [Request("topk-weighted")])
    row = emb[0]
    # Finite in float64, past float32 where the similarities are worked out: was a LoRA of NaNs, silently; a row
    # whose float32 norm overflows, or of norm 0, had every similarity 0 (equal weights, an arbitrary top-K)
    for bad in (row.double() * 1e300, row * 1e20, torch.zeros(32)):
        with pytest.raises(ValueError, match="finite, non-zero float32 norm"):
            engine.generate(bad, "sg-lora", seed=0)
    assert torch.equal(engine.generate(row.double(), "sg-lora", seed=0).lora, engine.generate(row, "sg-lora", seed=0).lora)
    with pytest.raises(TypeError, match=r"embeddings must be a \(B, D\) torch.Tensor \(embed's\), got ndarray"):
        engine.generate_many(emb.numpy(), [Request("sg-lora", 0)])
    with pytest.raises(TypeError, match="requests must be a list of sglora.engine.Request"):
        engine.generate_many(emb, ["sg-lora"])


def test_the_default_top_k_follows_a_repository_that_shrank(tiny_artifacts_session):
    a = load_artifacts(tiny_artifacts_session, "cpu")
    emb = a.engine.embed(["a photo of a circle"])[0]
    assert a.engine.top_k == 3 == a.engine.generate(emb, "topk-weighted").top_k
    for name in a.repository.names[:2]:
        a.repository.remove(name)
    g = a.engine.generate(emb, "sg-lora", seed=0)  # was: top_k must be between 1 and ... (2), got 3
    assert g.top_k == 2 == len(g.experts)
    with pytest.raises(ValueError, match="top_k"):
        a.engine.generate(emb, "topk-weighted", top_k=3)  # an explicit one is still checked


def test_zero_shot_records_no_experts_and_needs_none(tiny_artifacts_session):
    """zero-shot is the frozen backbone: its Generation (and file) named the default top_k and temperature it
    never used, and an empty repository refused it ("the expert repository is empty")."""
    a = load_artifacts(tiny_artifacts_session, "cpu")
    emb = a.engine.embed(["a photo of a circle"])
    g = a.engine.generate(emb[0], "zero-shot")
    assert (g.top_k, g.temperature, g.seed, g.experts) == (0, None, None, [])
    assert g.lora.shape == (a.backbone.spec.num_params,) and not g.lora.any()
    with pytest.raises(ValueError, match="top_k must be between 1"):  # a given top_k is still checked
        a.engine.generate(emb[0], "zero-shot", top_k=99)
    for name in a.repository.names:
        a.repository.remove(name)
    assert not a.engine.generate(emb[0], "zero-shot").lora.any()
    out = a.engine.generate_many(emb.expand(2, -1), [Request("zero-shot"), Request("topk-weighted")])
    assert out[0].method == "zero-shot"  # a row that needs experts fails alone
    assert isinstance(out[1], ValueError) and str(out[1]) == "the expert repository is empty"
    with pytest.raises(ValueError, match="the expert repository is empty"):  # what needs experts still says so
        a.engine.generate(emb[0], "topk-weighted")


def test_unseeded_sg_lora_draws_distinct_seeds(engine):
    emb = engine.embed(["a photo of a circle"] * 3)
    out = engine.generate_many(emb, [Request("sg-lora")] * 3)
    assert len({g.seed for g in out}) == 3


def test_text_tower_padded_to_fixed_rows_returns_each_rows_embedding(tiny_backbone, monkeypatch):
    """On a GPU the text tower runs at a multiple of GPU_TEXT_ROWS rows (Backbone.text_rows); the padding
    rows must not leak into the answer. Emulated on the CPU by padding to multiples of 8."""
    texts = ["a photo of a circle", "a star", "This is a classification task for recognizing coat, pullover and shirt"]
    plain = tiny_backbone.encode_text(texts)
    monkeypatch.setattr(tiny_backbone, "text_rows", lambda n: -(-n // 8) * 8)
    padded = tiny_backbone.encode_text(texts)
    assert padded.shape == plain.shape
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-6)
    assert tiny_backbone.text_rows(3) == 8 and type(tiny_backbone).text_rows(tiny_backbone, 3) == 3  # CPU: no padding


LONG = "This is a classification task for recognizing rings and stars and crosses"  # past 8 tokens


def test_open_clip_text_runs_at_the_description_length_only_where_the_tower_is_causal(tiny_backbone):
    """CLIP's text tower is causal and pools at the end-of-text token: a description runs at its length
    (rounded up to 8), with the values of the whole context up to rounding. A tower that pools elsewhere
    or attends both ways runs the whole context."""
    import copy

    texts = ["a cat", LONG]
    tokens = tiny_backbone.tokenizer(texts)
    with torch.inference_mode():
        whole = tiny_backbone._encode_tokens(tokens)
        torch.testing.assert_close(tiny_backbone.encode_text(texts), whole, rtol=0, atol=1e-6)
        for change in ({"text_pool_type": "last"}, {"attn_mask": None}):
            other = copy.deepcopy(tiny_backbone)
            other.__dict__.pop("_causal_text", None)
            for name, value in change.items():
                setattr(other.model, name, value)
            assert other._text_lengths(tokens) is None, change


def test_open_clip_text_of_no_descriptions_is_an_empty_tensor(tiny_backbone):
    out = tiny_backbone.encode_text([])
    assert isinstance(out, torch.Tensor) and out.shape == (0, tiny_backbone.embed_dim)


def test_open_clip_fingerprint_hashes_the_whole_context_as_artefacts_recorded_it(tiny_backbone):
    """Artefacts record the backbone's fingerprint (a rounded text embedding among it); those written before
    descriptions ran at their own length recorded the whole context's. Where the two differ in their last
    bits (here made to differ more, so that the rounding moves on any CPU) the fingerprint stays the same."""
    whole, at_length = copy.deepcopy(tiny_backbone), copy.deepcopy(tiny_backbone)
    whole.__dict__["_causal_text"] = False  # as before: every description over the whole context
    context = tiny_backbone.model.context_length
    for b in (whole, at_length):
        plain = b._encode_tokens
        b._encode_tokens = lambda tokens, plain=plain: plain(tokens) + 1e-3 * (tokens.shape[1] < context)
    assert not torch.equal(at_length.encode_text(["a photo of a cat"]), whole.encode_text(["a photo of a cat"]))
    at_length._fingerprints = whole._fingerprints = None  # not the copied ones
    assert at_length.fingerprints() == whole.fingerprints()  # the legacy one included


def test_open_clip_text_embedding_does_not_depend_on_the_batch(tiny_backbone):
    """nn.MultiheadAttention rounds a row differently at batch 1, 2-3 and 4+ on an AVX-512 CPU; the
    backbone's own attention (same values) does not. One torch thread, as the service runs."""
    texts = ["a photo of a ring", "a photo of a star", "x y z", "a cat", "This is a task about shirts", LONG]
    assert tiny_backbone._text_lengths(tiny_backbone.tokenizer(texts)).tolist() == [8, 8, 8, 8, 8, 16]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            alone = torch.cat([tiny_backbone.encode_text([t]) for t in texts])
            for n in range(2, len(texts) + 1):
                assert torch.equal(tiny_backbone.encode_text(texts[:n]), alone[:n]), n
            stock = tiny_backbone.model.encode_text(tiny_backbone.tokenizer(texts), normalize=True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(alone, stock, rtol=0, atol=1e-6)  # open_clip's values, up to rounding


@pytest.fixture
def one_thread():
    """One torch thread, as the service runs a model thread (with two, passes of 4 and 8 rows round
    differently on the AVX-512 host of the tests, and the engine falls back to one-row passes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("pass_rows", [(1, 1), (3, 3), (4, 8), (MAX_PASS_ROWS, MAX_PASS_ROWS), "this host's"])
def test_sg_lora_rows_over_several_cvae_passes(engine, monkeypatch, one_thread, pass_rows):
    """Whatever the pass policy, each row gets its bytes alone: one row per pass, fixed passes of 3 (the
    last padded), passes growing from 4 to 8 rows (17 rows: passes of 8, 8 and 1 padded to 4), fixed
    passes of MAX_PASS_ROWS (a GPU's: a lone row padded to all of them), and the policy this host's check
    chose."""
    if pass_rows == "this host's":
        monkeypatch.setattr(engine, "_pass_rows", None)
        fewest, most = engine.pass_rows
        assert (fewest, most) == (1, 1) or (1 <= fewest <= MAX_PAD_ROWS and most == MAX_PASS_ROWS)
    elif pass_rows[0] != pass_rows[1] and not engine.passes_agree(*pass_rows):
        pytest.skip(f"this host rounds rows differently in passes of {pass_rows[0]} to {pass_rows[1]} rows")
    else:
        monkeypatch.setattr(engine, "_pass_rows", pass_rows)
    most = engine.pass_rows[1]
    n = 2 * most + 1
    texts = [f"a photo of shape number {i}" for i in range(n)]
    emb = engine.embed(texts)
    with torch.inference_mode():
        batch = engine.generate_many(emb, [Request("sg-lora", seed=100 + i) for i in range(n)])
        for i in sorted({0, most - 1, most, n - 1}):
            alone = engine.generate(emb[i], "sg-lora", seed=100 + i)
            assert _bytes(batch[i].lora) == _bytes(alone.lora), i
    assert len({_bytes(g.lora) for g in batch}) == n


@pytest.mark.parametrize("odd_rows", [1, 3, 7])
def test_pass_rows_start_where_every_larger_pass_agrees(engine, monkeypatch, odd_rows):
    """The check behind pass_rows: a sampler whose passes of ``odd_rows`` rows round one value differently
    makes the engine pad every pass to more rows than that (odd_rows 1 and 3), or, when even a padded
    pass would not do (7 > MAX_PAD_ROWS), sample one row per pass."""
    monkeypatch.setattr(engine, "_pass_rows", None)
    if engine.pass_rows == (1, 1):
        pytest.skip("this host samples one row per pass already")
    sample = engine.sampler.sample

    def off_by_one_ulp(prior_mean, *args, **kwargs):
        out = sample(prior_mean, *args, **kwargs)
        if out.dim() == 2 and out.shape[0] == odd_rows:
            out[0, 0] = torch.nextafter(out[0, 0], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(engine.sampler, "sample", off_by_one_ulp)
    monkeypatch.setattr(engine, "_pass_rows", None)
    assert not engine.passes_agree(1)
    if odd_rows > MAX_PAD_ROWS:
        assert engine.pass_rows == (1, 1)
    else:
        fewest, most = engine.pass_rows
        assert fewest > odd_rows and most == MAX_PASS_ROWS


@pytest.mark.parametrize("agree", [True, False])
def test_pass_rows_off_the_cpu_are_full_passes_where_they_agree_in_another_order(engine, monkeypatch, agree):
    """With the generator on a GPU every pass has MAX_PASS_ROWS rows where passes of that size agree in
    another row order (the one check made there), else one row; the CPU's search for the fewest rows
    does not run."""
    checked = []

    def passes_agree(fewest, most=MAX_PASS_ROWS):
        checked.append((fewest, most))
        return agree

    on_gpu = dataclasses.make_dataclass("OnGpu", ["x_mean"])(torch.empty(0, device="meta"))
    monkeypatch.setattr(engine, "generator", on_gpu)
    monkeypatch.setattr(engine, "passes_agree", passes_agree)
    monkeypatch.setattr(engine, "_pass_rows", None)
    assert engine.pass_rows == ((MAX_PASS_ROWS, MAX_PASS_ROWS) if agree else (1, 1))
    assert checked == [(MAX_PASS_ROWS, MAX_PASS_ROWS)]


@needs_onednn
def test_the_cpu_sampler_is_the_generator_on_onednn(engine):
    """On the CPU the engine samples with the generator's packed copy: the same weights (its samples agree
    with the generator's to float32 rounding), none of them copied into a state dict, and the generator
    itself untouched (training and saving still use it)."""
    from models.cvae import PackedLinear

    assert engine.sampler is not engine.generator  # the packed copy was made (needs_onednn: it can be)
    assert isinstance(engine.sampler.dec_out, PackedLinear) and not isinstance(engine.generator.dec_out, PackedLinear)
    assert engine.sampler.x_mean is engine.generator.x_mean and engine.sampler.cond_mu is engine.generator.cond_mu
    assert list(engine.sampler.state_dict()) == ["x_mean", "x_std", "cond_mu.weight", "cond_mu.bias"]
    means, variances, _ = engine.repository.stacked()
    mu, var = means[:4], variances[:4] + 1e-4
    packed = engine.sampler.sample(mu, var, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    plain = engine.generator.sample(mu, var, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert not torch.equal(mu, plain)  # the generator does change the prior mean, so the comparison means something
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-5)


def test_without_a_generator_the_merges_still_work(engine):
    from sglora.engine import Engine

    bare = Engine(engine.backbone, engine.repository, None, top_k=2, temperature=0.1)
    emb = bare.embed(["a photo of a circle"] * 2)
    out = bare.generate_many(emb, [Request("topk-weighted"), Request("sg-lora", seed=1)])
    assert not isinstance(out[0], Exception) and len(out[0].experts) == 2
    assert isinstance(out[1], ValueError) and "needs a trained generator" in str(out[1])


def test_open_clip_bfloat16_text_tower(tiny_backbone):
    """CLIP's text tower in bfloat16 (every part but ``visual``): float32 embeddings close to the float32
    tower's, still batch-invariant, the same artefact fingerprint; the image tower stays float32."""
    bf16 = copy.deepcopy(tiny_backbone)
    bf16.set_text_dtype(torch.bfloat16)
    texts = ["a photo of a ring", "a photo of a star", "x y z", "a cat", "This is a task about shirts", LONG]
    assert tiny_backbone._text_lengths(tiny_backbone.tokenizer(texts)).tolist() == [8, 8, 8, 8, 8, 16]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            together = bf16.encode_text(texts)
            alone = torch.cat([bf16.encode_text([t]) for t in texts])
            ref = tiny_backbone.encode_text(texts)
    finally:
        torch.set_num_threads(threads)
    assert together.dtype == torch.float32 and torch.equal(alone, together)
    assert bf16.model.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert bf16.model.visual.conv1.weight.dtype == torch.float32
    assert (together * ref).sum(-1).min() > 0.99  # a random tiny tower: looser than MiniLM's 0.999
    assert bf16.fingerprint() == tiny_backbone.fingerprint()


def test_topk_exact_merges_the_topk_experts_updates_exactly(engine):
    """topk-exact: the experts and weights of topk-weighted, as one rank-K*r LoRA of their exact weighted
    update (its own spec); in a batch, each row the bytes it has alone."""
    from models.lora import concat_merge

    emb = engine.embed(["a photo of a circle", "a red square at the top"])
    weighted = engine.generate(emb[0], "topk-weighted", top_k=3)
    exact = engine.generate(emb[0], "topk-exact", top_k=3)
    assert exact.experts == weighted.experts and exact.seed is None and exact.spec.rank == 3 * engine.backbone.spec.rank
    means = torch.stack([engine.repository[e.name].mean for e in exact.experts])
    spec, want = concat_merge(engine.backbone.spec, means, torch.tensor([e.weight for e in exact.experts]))
    assert spec == exact.spec and torch.equal(exact.lora, want)
    batch = engine.generate_many(emb, [Request("topk-exact", top_k=3), Request("topk-exact", top_k=2)])
    assert torch.equal(batch[0].lora, exact.lora) and batch[1].spec.rank == 2 * engine.backbone.spec.rank
    assert torch.equal(batch[1].lora, engine.generate(emb[1], "topk-exact", top_k=2).lora)


def test_sg_lora_exact_is_the_samples_correction_on_the_exact_merge(engine, one_thread):
    """sg-lora-exact: update = exact top-K merge + dW(sg-lora sample) - dW(prior mean), with the sample sg-lora
    draws for the same seed; seeded rows give their bytes alone in a batch, unseeded ones draw a seed."""
    from models.lora import concat_merge

    emb = engine.embed(["a photo of a circle", "a red square at the top"])
    sg = engine.generate(emb[0], "sg-lora", seed=7, top_k=3)
    prior = engine.generate(emb[0], "topk-weighted", top_k=3)
    exact = engine.generate(emb[0], "topk-exact", top_k=3)
    g = engine.generate(emb[0], "sg-lora-exact", seed=7, top_k=3)
    assert g.seed == 7 and g.experts == sg.experts and g.spec.rank == 5 * engine.backbone.spec.rank
    spec = engine.backbone.spec
    _, correction = concat_merge(spec, torch.stack([sg.lora, prior.lora]), torch.tensor([1.0, -1.0]))
    parts, exact_parts = g.spec.unflatten(g.lora), exact.spec.unflatten(exact.lora)
    corr_spec = dataclasses.replace(spec, rank=2 * spec.rank, alpha=2.0 * spec.rank, scaling="standard")
    corr_parts = corr_spec.unflatten(correction)
    for t in spec.targets:
        b, a = parts[t.name]
        want = exact_parts[t.name][0] @ exact_parts[t.name][1] + corr_parts[t.name][0] @ corr_parts[t.name][1]
        torch.testing.assert_close(b @ a, want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(sg.lora, prior.lora)  # the correction is not zero, so the check means something
    batch = engine.generate_many(
        emb[[0, 1, 0]],
        [Request("sg-lora-exact", seed=7, top_k=3), Request("sg-lora-exact", top_k=2), Request("sg-lora", seed=7, top_k=3)],
    )
    assert torch.equal(batch[0].lora, g.lora) and batch[0].spec == g.spec and torch.equal(batch[2].lora, sg.lora)
    assert batch[1].seed is not None and batch[1].spec.rank == 4 * spec.rank


@pytest.fixture(scope="module")
def described_engine(engine):
    """The tiny engine with a generator conditioned on the description embedding as well
    (generator.condition_on_description): the shipped generator's weights plus a random W_d."""
    from models.cvae import CVAE
    from sglora.engine import Engine

    cfg = dataclasses.replace(engine.generator.config, description_dim=engine.backbone.embed_dim)
    gen = CVAE(cfg)
    missing, _ = gen.load_state_dict(engine.generator.state_dict(), strict=False)
    assert missing == ["cond_desc.weight"]
    torch.nn.init.normal_(gen.dec_out.weight, std=0.1)  # so that the condition reaches the output
    return Engine(engine.backbone, engine.repository, gen.eval(), engine.top_k, engine.temperature)


def test_description_conditioned_generator_in_the_engine(described_engine, one_thread):
    """A generator conditioned on d* gets each row's own description embedding: batch rows equal the
    row alone, and a row is the sampler's draw for that prior with that embedding (not another's)."""
    from expert_store.prior import mix, select_experts

    engine = described_engine
    texts = ["a photo of a circle", "a photo of a star", "a red square at the top"] * 3
    emb = engine.embed(texts)
    with torch.inference_mode():
        batch = engine.generate_many(emb, [Request("sg-lora", seed=5 + i) for i in range(len(texts))])
        for i in (0, 4, 8):
            assert _bytes(batch[i].lora) == _bytes(engine.generate(emb[i], "sg-lora", seed=5 + i).lora), i
        means, variances, stored = engine.repository.stacked()
        idx, alpha, _ = select_experts(emb[1], stored, engine.top_k, engine.temperature)
        mu, var = mix(means[idx], variances[idx], alpha)

        def draw(d: torch.Tensor) -> torch.Tensor:
            return engine.generator.sample(mu, var, torch.Generator().manual_seed(6), description=d)

        torch.testing.assert_close(batch[1].lora, draw(emb[1]), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(batch[1].lora, draw(emb[0]), rtol=1e-4, atol=1e-5)


def test_engine_refuses_a_generator_of_another_description_size(engine):
    from models.cvae import CVAE
    from sglora.engine import Engine

    gen = CVAE(dataclasses.replace(engine.generator.config, description_dim=engine.backbone.embed_dim + 1))
    with pytest.raises(ValueError, match="description embeddings"):
        Engine(engine.backbone, engine.repository, gen, engine.top_k, engine.temperature)


@needs_onednn_bfloat16
def test_open_clip_bfloat16_text_packs_its_layers_and_can_block_them_all():
    """On a CPU the bfloat16 text tower's MLP layers are packed for oneDNN (the same bits as F.linear on an
    AVX512-BF16 CPU), and its attention's projections get packed copies that the forward calls; where a
    CPU's kernels round a product by row count (AMX: on ViT-B-16's tower 512-wide products too), the
    service's start-up check can then run every one of them in fixed-row blocks. A text tower 256 wide
    (MLP 1024)."""
    from conftest import TINY_MODEL

    from models.backbone import BackboneConfig, create_backbone
    from models.packed import FIXED_ROWS, PackedLinear

    cfg = {**TINY_MODEL, "text_cfg": {**TINY_MODEL["text_cfg"], "width": 256, "heads": 4}}
    backbone = create_backbone(BackboneConfig(kind="open_clip", model="tiny-wide", model_config=cfg))
    texts = ["a photo of a ring", LONG, "a cat", "This is a task about shirts"]
    with torch.inference_mode():
        want = backbone.encode_text(texts)
    state = set(backbone.model.state_dict())
    backbone.set_text_dtype(torch.bfloat16)
    block = backbone.model.transformer.resblocks[0]
    mlp, attn = block.mlp, block.attn
    assert isinstance(mlp.c_proj, PackedLinear)
    assert isinstance(attn.packed_in_proj, PackedLinear) and isinstance(attn.packed_out_proj, PackedLinear)
    attention_state = {k for k in backbone.model.state_dict() if ".attn." in k}
    assert attention_state == {k for k in state if ".attn." in k}  # the packed copies hold no state
    calls = []
    attn.packed_out_proj.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        backbone.encode_text(texts[:1])
    assert calls  # the forward runs the packed copies
    assert backbone.text_fixed_rows is None
    assert backbone.set_text_fixed_rows(FIXED_ROWS) == 4  # c_fc, c_proj, the attention's in and out projections
    layers = (mlp.c_fc, mlp.c_proj, attn.packed_in_proj, attn.packed_out_proj)
    assert all(m.fixed_rows == FIXED_ROWS for m in layers) and backbone.text_fixed_rows == FIXED_ROWS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            alone = torch.cat([backbone.encode_text([t]) for t in texts])
            together = backbone.encode_text(texts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, together)
    assert (together * want).sum(-1).min() > 0.99
    assert backbone.set_text_fixed_rows(None) == 4 and backbone.text_fixed_rows is None


@needs_onednn_bfloat16
def test_a_packed_bfloat16_text_tower_deep_copies_and_leaves_the_cpu_as_plain_layers(tiny_backbone):
    """oneDNN's reordered weights have no storage: copy.deepcopy raised NotImplementedError, and
    Backbone.to(another device) left them behind on the CPU, to fail at the next forward. Now a copy packs
    the same weights again, and the layers leave the CPU unpacked and come back packed."""
    from models.packed import PackedLinear, has_packed, unpack_linears

    backbone = copy.deepcopy(tiny_backbone)
    backbone.set_text_dtype(torch.bfloat16)
    assert has_packed(backbone.model.transformer)
    texts = ["a photo of a persian", "a cat"]
    assert backbone.set_text_fixed_rows(8) > 0
    with torch.inference_mode():
        want = backbone.encode_text(texts)
    twin = copy.deepcopy(backbone)
    layers = [m for m in twin.model.transformer.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.fixed_rows == 8 for m in layers) and twin.text_fixed_rows == 8
    with torch.inference_mode():
        assert torch.equal(twin.encode_text(texts), want)
    # Back to the plain layers (what leaving the CPU does first), then packed again by a move to the CPU.
    assert unpack_linears(twin.model.transformer) == len(layers)
    assert not has_packed(twin.model.transformer) and not hasattr(twin.model.transformer.resblocks[0].attn, "packed_in_proj")
    with torch.inference_mode():
        torch.testing.assert_close(twin.encode_text(texts), want, rtol=0, atol=1e-2)
    twin.to("cpu")
    assert has_packed(twin.model.transformer)
    with torch.inference_mode():
        torch.testing.assert_close(twin.encode_text(texts), want, rtol=0, atol=1e-2)
    # Another device (meta stands in for a GPU here): plain layers there, the blocks gone with them.
    twin.to("meta")
    assert not has_packed(twin.model.transformer) and twin.text_fixed_rows is None
    assert {p.device.type for p in twin.model.parameters()} == {"meta"}
    # The module moved by itself (not through Backbone.to): the packed layers follow, with plain weights.
    assert backbone.model.transformer.to("meta") is backbone.model.transformer
    assert not any(m.weight.is_mkldnn for m in backbone.model.transformer.modules() if isinstance(m, PackedLinear))


def test_load_artifacts_takes_the_clis_device_names(tiny_artifacts_session):
    # 'auto' (the CLI's default) was a torch RuntimeError, and a missing GPU one from deep inside the load
    # after every file had been hashed.
    a = load_artifacts(tiny_artifacts_session, "auto")
    assert a.backbone.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda:0: CUDA is not available"):
            load_artifacts(tiny_artifacts_session, "cuda:0")
        with pytest.raises(ValueError, match="device=cuda: CUDA is not available"):  # a torch.device: was torch's error
            load_artifacts(tiny_artifacts_session, torch.device("cuda"))
    # Devices this project does not run on, and a bare index: named before any file is read (were torch's
    # errors from inside the load, 'meta' a NotImplementedError)
    for device in ("gpu", "CPU", "meta", torch.device("meta")):
        with pytest.raises(ValueError, match="unknown device"):
            load_artifacts(tiny_artifacts_session, device)
    with pytest.raises(TypeError, match="device must be a torch.device or a name"):
        load_artifacts(tiny_artifacts_session, 0)
    assert load_artifacts(tiny_artifacts_session, torch.device("cpu")).backbone.device.type == "cpu"


def test_an_exact_merge_applied_without_its_layout_names_it(engine):
    g = engine.generate(engine.embed(["a photo of a circle"])[0], "topk-exact")
    feats = engine.backbone.image_features(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"spec=generation\.spec"):  # was: LoRA vector must have shape (1536,)
        engine.backbone.encode_image(feats, g.lora)
    assert engine.backbone.encode_image(feats, g.lora, g.spec).shape == (2, engine.backbone.embed_dim)


def test_after_a_change_only_the_new_experts_features_are_worked_out(tiny_artifacts_session, monkeypatch, one_thread):
    """The generator features of every expert were recomputed after any change (E P x H products, in the
    first generation after it: seconds on ViT-B-16's shape with a thousand experts). Only the added rows
    are now, each alone: the features and the seeded LoRAs equal those of an engine loaded afresh."""
    a = load_artifacts(tiny_artifacts_session, "cpu")
    engine, repo, generator = a.engine, a.repository, a.generator
    assert engine.pass_rows  # its check samples priors of its own: done before counting
    rows = []
    real = type(generator).mean_features
    monkeypatch.setattr(type(generator), "mean_features", lambda self, m: rows.append(m.shape[0]) or real(self, m))
    emb = engine.embed(["a photo of a circle"])[0]
    engine.generate(emb, "sg-lora", seed=0)
    assert rows == [1] * len(repo)  # at the first use: every expert, one row at a time
    rows.clear()
    added = dataclasses.replace(repo[repo.names[0]], name="added", description="a copy")
    removed = repo.names[1]
    repo.remove(removed)
    repo.add(added)
    engine.refresh()
    assert rows == [1]  # the added expert alone
    rows.clear()
    means = repo.stacked()[0]
    assert torch.equal(engine._expert_features(means), real(generator, means).cpu())
    assert engine._features[0]() is means and rows == []  # refresh() left nothing for the next generation
    fresh = load_artifacts(tiny_artifacts_session, "cpu").engine
    fresh.repository.remove(removed)
    fresh.repository.add(added)
    for seed in range(3):
        ours, theirs = engine.generate(emb, "sg-lora", seed=seed), fresh.generate(emb, "sg-lora", seed=seed)
        assert _bytes(ours.lora) == _bytes(theirs.lora)
    soup = engine.generate(emb, "model-soup").lora
    assert torch.equal(soup, repo.stacked()[0].mean(0))
    assert torch.equal(repo.derived(MODEL_SOUP, lambda *stack: pytest.fail("not kept")), soup)  # kept
    soup.zero_()  # each generation's own copy
    assert torch.equal(engine.generate(emb, "model-soup").lora, repo.stacked()[0].mean(0))
    repo.remove("added")
    assert torch.equal(engine.generate(emb, "model-soup").lora, repo.stacked()[0].mean(0))  # and renewed on a change


def test_two_model_threads_after_a_change_work_the_new_features_out_once(tiny_artifacts_session, monkeypatch):
    a = load_artifacts(tiny_artifacts_session, "cpu")
    engine, repo, generator = a.engine, a.repository, a.generator
    engine.refresh()
    assert engine.pass_rows  # its check samples priors of its own: done before counting
    repo.add(dataclasses.replace(repo[repo.names[0]], name="added", description="a copy"))
    rows, started = [], threading.Barrier(2)
    real = type(generator).mean_features

    def slow(self, m):
        rows.append(m.shape[0])
        time.sleep(0.05)  # long enough for the other thread to arrive meanwhile
        return real(self, m)

    monkeypatch.setattr(type(generator), "mean_features", slow)
    emb = engine.embed(["a photo of a circle"])[0]

    def generate():
        started.wait()
        engine.generate(emb, "sg-lora", seed=0)

    threads = [threading.Thread(target=generate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rows == [1]

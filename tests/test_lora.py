import copy

import numpy as np
import pytest
import torch

from models.lora import LoraSpec, LoraTarget, concat_merge, merge_into


def test_flatten_unflatten_round_trip_is_exact(tiny_backbone):
    spec = tiny_backbone.spec
    vec = torch.randn(spec.num_params, generator=torch.Generator().manual_seed(0))
    parts = spec.unflatten(vec)
    assert torch.equal(spec.flatten(parts), vec)
    # Layout is [B, A] target by target (paper eq. 3).
    t0 = spec.targets[0]
    b, a = parts[t0.name]
    assert torch.equal(b.reshape(-1), vec[: t0.out_features * spec.rank])
    assert a.shape == (spec.rank, t0.in_features)


def test_paper_layout_on_vit_b16_has_110592_parameters():
    import open_clip

    from models.backbone import BackboneConfig
    from models.open_clip_backbone import lora_spec_for

    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual
    spec = lora_spec_for(visual, BackboneConfig())
    assert len(spec.targets) == 36 and spec.num_params == 110_592
    assert spec.targets[1].peft_module == "vision_model.encoder.layers.0.self_attn.k_proj"
    assert spec.targets[1].rows == (768, 1536)


def test_zero_lora_leaves_outputs_identical(tiny_backbone):
    x = torch.randn(3, 3, 32, 32)
    zero = torch.zeros(tiny_backbone.spec.num_params)
    assert torch.equal(tiny_backbone.encode_image(x, zero), tiny_backbone.encode_image(x))


def test_functional_path_matches_merged_weights(tiny_backbone):
    spec = tiny_backbone.spec
    x = torch.randn(4, 3, 32, 32)
    vec = torch.randn(spec.num_params, generator=torch.Generator().manual_seed(1)) * 0.1
    before = tiny_backbone.encode_image(x)
    out = tiny_backbone.encode_image(x, vec)
    ref_head = copy.deepcopy(tiny_backbone.image_head)
    merge_into(ref_head, spec, vec)
    ref = torch.nn.functional.normalize(ref_head(x), dim=-1)
    assert not torch.allclose(out, tiny_backbone.encode_image(x), atol=1e-4)  # the LoRA does something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The frozen backbone itself is untouched.
    assert torch.equal(tiny_backbone.encode_image(x), before)


def test_each_qkv_block_gets_its_own_update(tiny_backbone):
    spec = tiny_backbone.spec
    w = dict(tiny_backbone.image_head.named_parameters())["transformer.resblocks.0.attn.in_proj_weight"]
    parts = {t.name: (torch.zeros(t.out_features, spec.rank), torch.zeros(spec.rank, t.in_features)) for t in spec.targets}
    name = "visual.transformer.resblocks.0.attn.k"
    parts[name] = (torch.ones(64, spec.rank), torch.ones(spec.rank, 64))
    new = spec.deltas(
        spec.flatten(parts), {"transformer.resblocks.0.attn.in_proj_weight": w, "transformer.resblocks.1.attn.in_proj_weight": w}
    )
    d = new["transformer.resblocks.0.attn.in_proj_weight"] - w
    assert torch.all(d[:64] == 0) and torch.all(d[128:] == 0)
    torch.testing.assert_close(d[64:128], torch.full((64, 64), spec.rank * spec.scale))


def test_a_low_precision_weight_is_merged_with_one_rounding(tiny_backbone):
    """W + dW was computed as W + dW.to(bfloat16): two roundings, and 2-4 % of a merged bfloat16 weight's
    entries one step off the nearest value of the exact sum."""
    spec = tiny_backbone.spec
    w = dict(tiny_backbone.image_head.named_parameters())["transformer.resblocks.0.attn.in_proj_weight"].detach()
    vec = torch.randn(spec.num_params, generator=torch.Generator().manual_seed(0)) * 0.05
    base = {t.param: w for t in spec.targets}
    exact = spec.deltas(vec.double(), {k: v.double() for k, v in base.items()})  # float64: no rounding that matters
    for dtype in (torch.bfloat16, torch.float16):
        merged = spec.deltas(vec, {k: v.to(dtype) for k, v in base.items()})
        for param, m in merged.items():
            assert m.dtype == dtype
            # Each entry is the low-precision rounding of W + dW, computed in float32 from the rounded W.
            want = (base[param].to(dtype).float() + (exact[param] - base[param].double()).float()).to(dtype)
            assert (m != want).float().mean() < 1e-3, (dtype, param)


def test_spec_validation_and_round_trip():
    t = LoraTarget("a", "w", (0, 4), 3, 4)
    spec = LoraSpec((t,), rank=2, alpha=4.0, scaling="rslora")
    assert spec.scale == pytest.approx(4.0 / 2**0.5)
    assert LoraSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="rank"):
        LoraSpec((t,), rank=0)
    with pytest.raises(ValueError, match="scaling"):
        LoraSpec((t,), scaling="weird")
    with pytest.raises(ValueError, match="shape"):
        spec.unflatten(torch.zeros(spec.num_params + 1))
    with pytest.raises(ValueError, match="rows"):
        LoraTarget("b", "w", (0, 3), 3, 4)
    # Plain values as plain types (a spec is hashed and written as JSON): a list of targets and numpy numbers
    # were kept as given (an unhashable spec; a fingerprint that failed in json), a float or bool rank accepted.
    same = LoraSpec([t], rank=np.int64(2), alpha=np.float32(4.0), scaling="rslora")
    assert same == spec and hash(same) == hash(spec) and same.fingerprint() == spec.fingerprint()
    assert type(same.rank) is int and type(same.alpha) is float and isinstance(same.targets, tuple)
    for bad in (dict(rank=2.5), dict(rank=True), dict(rank="2"), dict(alpha="4"), dict(alpha=True)):
        with pytest.raises(TypeError, match="rank must be an integer|alpha must be a number"):
            LoraSpec((t,), **bad)
    with pytest.raises(TypeError, match="targets must be a sequence of LoraTarget"):
        LoraSpec(("a",))


def test_conv_1x1_target_matches_merge():
    conv = torch.nn.Conv2d(6, 5, 1, bias=False)
    spec = LoraSpec((LoraTarget("conv", "weight", (0, 5), 6, 5),), rank=2, alpha=2.0)
    from models.lora import LoraApplier

    vec = torch.randn(spec.num_params)
    x = torch.randn(2, 6, 3, 3)
    out = LoraApplier(conv, spec)(vec, x)
    ref = copy.deepcopy(conv)
    merge_into(ref, spec, vec)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_concat_merge_is_the_exact_weighted_sum_of_the_updates(tiny_backbone, scaling):
    """concat_merge: one rank-K*r LoRA whose update on every target is sum_k w_k * scale * B_k A_k, and whose
    application to the backbone equals applying that dense sum."""
    import dataclasses

    spec = dataclasses.replace(tiny_backbone.spec, alpha=3.0, scaling=scaling)
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(3, spec.num_params, generator=g) * 0.1
    weights = torch.tensor([0.5, 0.3, 0.2])
    merged_spec, merged = concat_merge(spec, vecs, weights)
    assert merged_spec.rank == 3 * spec.rank and merged_spec.scale == 1.0 and merged.numel() == merged_spec.num_params
    assert [t.name for t in merged_spec.targets] == [t.name for t in spec.targets]
    parts = [spec.unflatten(v) for v in vecs]
    for t, (b, a) in zip(spec.targets, merged_spec.unflatten(merged).values(), strict=True):
        want = sum(w * spec.scale * (p[t.name][0] @ p[t.name][1]) for w, p in zip(weights.tolist(), parts))
        torch.testing.assert_close(b @ a, want, rtol=1e-5, atol=1e-7)
    # Applied to the backbone: the same embeddings as the three updates merged densely into its weights.
    feats = tiny_backbone.image_features(torch.rand(2, 3, 32, 32, generator=g))
    dense = copy.deepcopy(tiny_backbone)
    for w, v in zip(weights.tolist(), vecs):
        merge_into(dense.image_head, dataclasses.replace(spec, alpha=spec.alpha * w), v)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_backbone.encode_image(feats, merged, merged_spec), dense.encode_image(feats), rtol=1e-4, atol=1e-5
        )
        assert not torch.allclose(tiny_backbone.encode_image(feats, merged, merged_spec), tiny_backbone.encode_image(feats))
    with pytest.raises(ValueError, match="K weights"):
        concat_merge(spec, vecs, weights[:2])

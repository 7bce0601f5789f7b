"""models.open_clip_backbone: the activation a named open_clip model is built with (QuickGELU or GELU)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import open_clip.factory
import pytest
from onednn_support import needs_onednn_bfloat16
from open_clip.transformer import QuickGELU

from models.backbone import BackboneConfig
from models.open_clip_backbone import OpenClipBackbone, resolve_quick_gelu
from sglora.artifacts import ArtifactError, _check_legacy_activation, load_backbone_from
from training.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("model", "pretrained", "quick_gelu", "expected"),
    [
        ("ViT-B-16", "openai", None, True),  # the tag's weights were trained with QuickGELU
        ("ViT-B-16-quickgelu", "openai", None, True),
        ("ViT-B-16", "openai", True, True),
        ("ViT-B-16", "laion2b_s34b_b88k", None, False),
        ("ViT-B-16", None, None, False),  # no tag: the architecture's own
        ("ViT-B-16-quickgelu", None, None, True),
        ("ViT-B-16", "/some/checkpoint.pt", True, True),  # a path is no tag: as configured
        ("ViT-B-16", None, True, True),
    ],
)
def test_the_activation_follows_the_pretrained_tag_unless_set(model, pretrained, quick_gelu, expected):
    cfg = BackboneConfig(model=model, pretrained=pretrained, quick_gelu=quick_gelu)
    assert resolve_quick_gelu(cfg) is expected


@pytest.mark.parametrize(
    ("model", "pretrained", "quick_gelu", "message"),
    [
        ("ViT-B-16", "openai", False, "trained with QuickGELU .* set backbone.quick_gelu: true"),
        ("ViT-B-16", "laion2b_s34b_b88k", True, "trained with GELU"),
    ],
)
def test_a_setting_that_contradicts_the_tag_is_refused(model, pretrained, quick_gelu, message):
    with pytest.raises(ValueError, match=message):
        OpenClipBackbone.create(BackboneConfig(model=model, pretrained=pretrained, quick_gelu=quick_gelu))


def test_quick_gelu_is_checked_against_the_kind_and_an_inline_model_config():
    with pytest.raises(ValueError, match="open_clip models only"):
        BackboneConfig(kind="offline", quick_gelu=True)
    with pytest.raises(ValueError, match="model_config.quick_gelu is False"):
        BackboneConfig(model_config={"embed_dim": 8}, quick_gelu=True)
    assert BackboneConfig(model_config={"embed_dim": 8, "quick_gelu": True}, quick_gelu=True).quick_gelu


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("paper-*.yaml")), ids=lambda p: p.name)
def test_paper_configs_build_the_openai_weights_with_quick_gelu(path):
    cfg = load_config(path).backbone
    assert cfg.pretrained == "openai" and cfg.quick_gelu is True and resolve_quick_gelu(cfg)


def test_a_plain_vit_on_openai_weights_is_built_with_quick_gelu_and_no_mismatch_warning(monkeypatch):
    # No download here: the tag's checkpoint is stubbed out, the model keeps its random init.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: "")
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *a, **k: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*QuickGELU mismatch")
        backbone = OpenClipBackbone.create(BackboneConfig(model="ViT-B-32", pretrained="openai"))
    assert isinstance(backbone.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(backbone.model.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_artefacts_from_before_the_setting_load_as_built_or_are_refused_with_the_reason(tiny_artifacts):
    path = tiny_artifacts / "backbone" / "backbone.json"
    meta = json.loads(path.read_text())
    del meta["config"]["quick_gelu"]  # as written before the key existed
    path.write_text(json.dumps(meta))
    load_backbone_from(tiny_artifacts)  # an inline model_config: its activation never depended on a tag
    _check_legacy_activation(tiny_artifacts, BackboneConfig(model="ViT-B-16-quickgelu", pretrained="openai"))
    with pytest.raises(ArtifactError, match="built with GELU.*'openai' weights were trained with QuickGELU.*rebuild"):
        _check_legacy_activation(tiny_artifacts, BackboneConfig(model="ViT-B-16", pretrained="openai"))


def test_text_overflow_counts_the_tokens_the_tokenizer_would_cut(tiny_config):
    """The tiny tower reads 32 tokens (start and end included): a text past them is (tokens, 32), and the
    count is the one the tokenizer truncates from (its last kept token is then the end token)."""
    from models.backbone import create_backbone

    bb = create_backbone(tiny_config.backbone)
    assert bb.text_overflow("a photo of a circle") is None  # 7 tokens
    fits = " ".join("abcdefghijklmnopqrstuvwxyz") + " a b c d"  # 30 words: 32 tokens exactly
    assert bb.text_overflow(fits) is None and bb.text_overflow(fits + " o") == (33, 32)
    assert int((bb.tokenizer([fits]) != 0).sum()) == 32
    with pytest.raises(ValueError, match="is 33 tokens long, and the text tower reads at most 32"):
        bb.check_text_length(fits + " o")
    # Fewer bytes than the context, more tokens: the tokenizer's cleaning lengthens U+FB2C (3 bytes, 6 tokens).
    # Two such texts alike up to the context were one embedding; no bound on the bytes lets them through.
    assert len(("\ufb2c" * 9 + " a").encode()) < 32 and bb.text_overflow("\ufb2c" * 9 + " a")[0] > 32


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
def test_ascii_without_ampersands_is_bounded_by_its_length(clean):
    """The cheap bound that spares a caption its tokenisation (~40 us each: half a minute over COCO's
    captions) must never pass a text the tokenizer would cut: seeded random ASCII texts without "&" (control
    characters, terminal escapes, CR LF, ligature letters, quotes) are never more tokens than characters,
    under each of open_clip's cleanings."""
    import random

    import open_clip

    from models.open_clip_backbone import OpenClipBackbone

    tok = open_clip.SimpleTokenizer(clean=clean)
    rng = random.Random(0)
    chars = [chr(i) for i in range(128) if chr(i) != "&"]
    pieces = ["\x1b[31m", "\r\n", ";", "#", "lt", "x27", "  ", "\t", "ff", "fi", "...", "--", "''", "``", "<", ">"]
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(chars) if rng.random() < 0.7 else rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        assert len(tok.encode(text)) <= len(text), text
        context = len(text) + 2
        fits = OpenClipBackbone._fits_untokenised(None, text, context)  # type: ignore[arg-type]  # reads no state
        assert fits and len(tok.encode(text)) + 2 <= context
        checked += 1
    assert checked == 3000
    assert not OpenClipBackbone._fits_untokenised(None, "&lt;" * 3, 100)  # type: ignore[arg-type]
    assert not OpenClipBackbone._fits_untokenised(None, "caf\u00e9", 100)  # type: ignore[arg-type]
    assert not OpenClipBackbone._fits_untokenised(None, "a" * 31, 32)  # type: ignore[arg-type]


# ---- check-config: what a config would build, without weights -------------------------------------
def test_describe_matches_what_create_builds(tiny_config):
    from models.backbone import create_backbone, describe_backbone

    line = describe_backbone(tiny_config.backbone)
    spec = create_backbone(tiny_config.backbone).spec
    assert f"LoRA: {len(spec.targets)} modules" in line and f"{spec.num_params:,} parameters" in line


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("paper-*.yaml")), ids=lambda p: p.name)
def test_describe_names_the_paper_shape_without_downloading(path):
    from models.backbone import describe_backbone

    line = describe_backbone(load_config(path).backbone)  # the architecture on the meta device: no weights
    assert "ViT-B-16 (QuickGELU), weights: open_clip tag 'openai'" in line
    assert "12 blocks of width 768, 512-d embeddings; LoRA: 36 modules (q, k, v), rank 2, 110,592 parameters" in line


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ({"model": "ViT-B-61"}, r"open_clip has no model 'ViT-B-61'; did you mean ViT-B-16"),
        ({"model": "ViT-B-16", "pretrained": "opneai"}, r"'opneai' is neither an open_clip tag of ViT-B-16 \(tags: openai, "),
        ({"model": "ViT-B-16", "pretrained": "/no/such/checkpoint.pt"}, "nor a checkpoint file"),
        ({"model": "RN50"}, "needs open_clip's ViT image tower .* RN50's image tower is a ModifiedResNet"),
        ({"model": "coca_ViT-B-32"}, "coca_ViT-B-32 is an open_clip CoCa; the open_clip backbone takes open_clip.CLIP"),
        ({"model": "ViT-B-16", "lora": {"blocks": [12]}}, "block 12 out of range for a 12-block"),
        ({"model": "ViT-B-16", "pretrained": "openai", "quick_gelu": False}, "trained with QuickGELU"),
    ],
)
def test_check_config_names_a_backbone_it_cannot_build(tmp_path, capsys, backbone, message):
    import re

    import yaml

    from sglora.cli import main

    cfg = load_config(CONFIGS / "paper-pets.yaml").to_dict()
    cfg["backbone"] = {**cfg["backbone"], "pretrained": None, "quick_gelu": None, **backbone}
    cfg["backbone"]["lora"] = {**cfg["backbone"]["lora"], **backbone.get("lora", {})}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_onednn_bfloat16)])
def test_a_traced_clip_text_tower_gives_the_eager_bits_at_any_length_and_batch(dtype):
    import copy

    import torch
    from conftest import TINY_MODEL

    from models.backbone import create_backbone

    bb = create_backbone(BackboneConfig(kind="open_clip", model="tiny-vit", model_config=TINY_MODEL))
    bb.set_text_dtype(getattr(torch, dtype))
    eager = copy.deepcopy(bb)
    texts = ["a cat", "a photo of a dog on a sofa in the sun", "sandals and sneakers and boots and more shoes"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bb.trace_text(["a photo of a bird", "trucks"]) is None and bb.text_graph == "traced"
        for batch in [[t] for t in texts] + [texts, texts[::-1]]:
            assert torch.equal(bb.encode_text(batch), eager.encode_text(batch)), batch
    finally:
        torch.set_num_threads(threads)
    assert {n for n, _ in bb._text_graph.named_children()} == {"transformer", "token_embedding", "ln_final"}  # no image tower

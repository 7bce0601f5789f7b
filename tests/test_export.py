"""safetensors_bytes writes exactly what the safetensors library writes (header keys sorted)."""

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from models.lora import LoraSpec, LoraTarget
from sglora.export import from_peft_tensors, safetensors_bytes, to_peft_tensors


def library_bytes(spec, vec, metadata) -> bytes:
    """The reference: safetensors.torch.save, then the header re-emitted with sorted keys."""
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    raw = save(to_peft_tensors(spec, vec))
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = meta
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_equal_the_librarys_and_load_back(tiny_backbone, seed):
    spec = tiny_backbone.spec
    vec = torch.randn(spec.num_params, generator=torch.Generator().manual_seed(seed))
    meta = {"description": "a cat", "experts": [{"name": "x", "weight": 0.25}], "seed": str(seed), "é": "ü"}
    data = safetensors_bytes(spec, vec, meta)
    assert data == library_bytes(spec, vec, meta)
    assert len(data[: 8 + struct.unpack("<Q", data[:8])[0]]) % 8 == 0
    back = load(data)
    for name, t in to_peft_tensors(spec, vec).items():
        assert torch.equal(back[name], t)


def vit_like_spec() -> LoraSpec:
    """open_clip ViT-B-16's layout in small: 12 blocks x q, k, v, where 'layers.10' sorts before 'layers.2'."""
    targets = []
    for i in range(12):
        for j, which in enumerate("qkv"):
            targets.append(
                LoraTarget(
                    name=f"visual.transformer.resblocks.{i}.attn.{which}",
                    param=f"visual.transformer.resblocks.{i}.attn.in_proj_weight",
                    rows=(8 * j, 8 * j + 8),
                    in_features=8,
                    out_features=8,
                    peft_module=f"vision_model.encoder.layers.{i}.self_attn.{which}_proj",
                )
            )
    return LoraSpec(targets=tuple(targets), rank=2)


def test_a_vit_layout_gives_the_librarys_bytes_and_a_wrong_length_is_refused():
    spec = vit_like_spec()
    vec = torch.randn(spec.num_params, generator=torch.Generator().manual_seed(3))
    meta = {"description": "a dog", "targets": [t.name for t in spec.targets]}
    assert safetensors_bytes(spec, vec, meta) == library_bytes(spec, vec, meta)
    for bad in (vec[:-1], vec.view(2, -1)):
        with pytest.raises(ValueError, match=rf"LoRA vector must have shape \({spec.num_params},\)"):
            safetensors_bytes(spec, bad, meta)
    with pytest.raises(TypeError, match="the LoRA must be a flat torch.Tensor, got ndarray"):
        safetensors_bytes(spec, vec.numpy(), meta)
    with pytest.raises(TypeError, match="metadata must be a mapping of names to values, got NoneType"):
        safetensors_bytes(spec, vec, None)
    tensors = {k: v.numpy() for k, v in to_peft_tensors(spec, vec).items()}
    with pytest.raises(TypeError, match="a ndarray, expected a torch.Tensor"):
        from_peft_tensors(spec, tensors)


def test_an_offline_zip_loads_in_peft_after_the_documented_conv_reshape(tmp_path):
    """docs/service.md, "PEFT names": the offline backbone's 1x1 conv target is exported 2-D; PEFT's Conv2d
    LoRA wants 4-D. Reshaped, a plain Conv2d ``_conv_head`` + ``_fc`` (small stand-ins of EfficientNet's)
    gives the library's merge."""
    import io
    import zipfile

    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from torch import nn

    from models.lora import LoraSpec, LoraTarget, merge_into
    from sglora.export import peft_zip_bytes

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_head = nn.Conv2d(8, 16, 1, bias=False)
            self._fc = nn.Linear(16, 10)

        def forward(self, x):  # (N, 8, h, w) -> (N, 10)
            return self._fc(self._conv_head(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net, x = Head().eval(), torch.randn(3, 8, 4, 4)
    spec = LoraSpec(
        targets=(
            LoraTarget("visual.conv_head", "_conv_head.weight", (0, 16), 8, 16, peft_module="_conv_head"),
            LoraTarget("visual.fc", "_fc.weight", (0, 10), 16, 10, peft_module="_fc"),
        ),
        rank=2,
        alpha=4.0,
    )
    vec = torch.randn(spec.num_params)
    zipfile.ZipFile(io.BytesIO(peft_zip_bytes(spec, vec, {"format": "sglora-lora"}))).extractall(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    t = load_file(weights)
    for k in [k for k in t if "._conv_head." in k]:
        t[k] = t[k][:, :, None, None].contiguous()
    save_file(t, weights)
    ref = Head().eval()
    ref.load_state_dict(net.state_dict())
    merge_into(ref, spec, vec)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(net, tmp_path)(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "pretrained", "model_config", "expected"),
    [
        ("ViT-B-16", "openai", None, "openai/clip-vit-base-patch16"),
        ("ViT-B-16-quickgelu", "openai", None, "openai/clip-vit-base-patch16"),
        ("ViT-B-32", "openai", None, "openai/clip-vit-base-patch32"),
        ("ViT-L-14-quickgelu", "openai", None, "openai/clip-vit-large-patch14"),
        ("ViT-B-16", "laion2b_s34b_b88k", None, None),
        ("ViT-B-16", None, None, None),
        ("tiny-vit", None, {"embed_dim": 8}, None),
    ],
)
def test_the_peft_config_names_the_hf_twin_of_openai_weights_only(tiny_backbone, model, pretrained, model_config, expected):
    from models.backbone import BackboneConfig
    from sglora.export import adapter_config, hf_base_model

    base = hf_base_model(BackboneConfig(model=model, pretrained=pretrained, model_config=model_config))
    assert base == expected
    assert adapter_config(tiny_backbone.spec, base)["base_model_name_or_path"] == expected
    assert hf_base_model(BackboneConfig(kind="offline")) is None

"""sglora.open_clip_lora: a /generate file merged into a plain open_clip model the caller loaded."""

from __future__ import annotations

import copy
import dataclasses
import json
import struct

import pytest
import torch
from safetensors.torch import load, save
from torch.nn import functional as F

from sglora.export import from_peft_tensors
from sglora.open_clip_lora import merge_lora, read_lora


@pytest.fixture(scope="module")
def reference(tiny_artifacts_session):
    """The artefacts loaded on the CPU (not conftest's service device): the tests' "user's own open_clip
    model" is a copy of this backbone's, fed CPU tensors."""
    from sglora.artifacts import load_artifacts

    return load_artifacts(tiny_artifacts_session)


@pytest.fixture(scope="module")
def generated(client):
    """(sg-lora file, topk-exact file): an ordinary rank and a higher-rank exact merge."""
    out = []
    for body in ({"description": "a red circle", "seed": 3}, {"description": "a red circle", "method": "topk-exact"}):
        r = client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        out.append(r.content)
    return out


def _embed(model, pixels):
    with torch.no_grad():
        return F.normalize(model.encode_image(pixels), dim=-1)


@pytest.mark.parametrize("which", [0, 1])
def test_merged_model_embeds_images_as_the_library_does_and_is_restored(generated, reference, which, tmp_path):
    backbone = reference.backbone
    model = copy.deepcopy(backbone.model).eval()  # "the user's own open_clip model": same weights, not the library's
    own = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = _embed(model, pixels)
    path = tmp_path / "lora.safetensors"
    path.write_bytes(generated[which])

    with merge_lora(model, path) as lora:
        after = _embed(model, pixels)
        assert lora.metadata["description"] == "a red circle" and len(lora.experts) >= 1
        # the library's own layout (not the one the helper read from the file), at the file's rank
        spec = dataclasses.replace(backbone.spec, rank=lora.spec.rank, alpha=lora.spec.alpha, scaling=lora.spec.scaling)
        assert lora.spec == spec
        vector = from_peft_tensors(spec, load(path.read_bytes()))
        expected = backbone.encode_image(backbone.image_features(pixels), vector, spec)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-4  # the LoRA did change the embeddings
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())  # restored bit for bit
    if which == 1:
        assert lora.spec.rank > backbone.spec.rank  # the exact merge's own rank, read from the metadata
    torch.testing.assert_close(_embed(model, pixels), before, rtol=0, atol=0)


def _with_metadata(data: bytes, **changes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    for key, value in changes.items():  # None: the key left out (a file written before it was)
        if value is None:
            header["__metadata__"].pop(key)
        else:
            header["__metadata__"][key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backbone_kind": "offline"}, "made for the 'offline' backbone kind, not open_clip"),
        ({"targets": json.dumps(["visual.transformer.resblocks.7.attn.q"])}, "has 2 blocks"),
        ({"targets": json.dumps(["visual.proj"])}, "not a q/k/v block"),
        ({"rank": "3"}, "expected B"),
        ({"rank": "two"}, "does not describe its LoRA layout"),
        ({"format": "sglora-expert", "part": "variance"}, "expert's 'variance', not a LoRA"),  # not a LoRA mean
        ({"format": "sglora-cvae"}, "format is 'sglora-cvae', not a LoRA"),
    ],
)
def test_a_file_that_does_not_fit_is_refused_before_any_weight_changes(generated, reference, change, message):
    model = copy.deepcopy(reference.backbone.model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        merge_lora(model, _with_metadata(generated[0], **change))
    assert _same(model, own)


def test_a_peft_resave_is_named_as_such(generated, reference):
    """PeftModel.save_pretrained writes {'format': 'pt'} alone: it was refused as "format 'pt', not a LoRA"."""
    model = copy.deepcopy(reference.backbone.model)
    resaved = save(load(generated[0]), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="as PEFT's save_pretrained writes it.*adapter_config.json"):
        merge_lora(model, resaved)


def test_a_model_that_is_not_open_clip_is_refused_with_the_peft_route_named(generated):
    with pytest.raises(ValueError, match="not an open_clip ViT visual tower.*PeftModel"):
        merge_lora(torch.nn.Linear(4, 4), generated[0])


def test_not_a_lora_file_and_non_finite_values_are_refused(generated, reference):
    with pytest.raises(ValueError, match="not a safetensors LoRA file"):
        read_lora(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a JSON object"):
        read_lora(struct.pack("<Q", 8) + b"[1,2,3] ")
    tensors, meta = read_lora(generated[0])
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        merge_lora(copy.deepcopy(reference.backbone.model), save(tensors, metadata=meta))


def _same(model, own) -> bool:
    return all(torch.equal(v, own[k]) for k, v in model.state_dict().items())


def test_an_experts_variance_download_is_refused_and_its_mean_merges(client, reference):
    model = copy.deepcopy(reference.backbone.model)
    name = client.get("/experts").json()["experts"][0]["name"]
    variance = client.get(f"/experts/{name}", params={"part": "variance"})
    assert variance.status_code == 200, variance.text
    with pytest.raises(ValueError, match="not a LoRA: only its mean"):
        merge_lora(model, variance.content)
    mean = client.get(f"/experts/{name}").content
    with merge_lora(model, mean) as lora:
        assert lora.metadata["part"] == "mean" and lora.experts == []


def test_a_file_without_sglora_metadata_says_so(generated, reference):
    tensors, _ = read_lora(generated[0])
    with pytest.raises(ValueError, match="carries no SG-LoRA metadata"):
        merge_lora(copy.deepcopy(reference.backbone.model), save(tensors))


def test_a_binary_file_object_is_read_and_a_text_one_is_refused(generated, reference, tmp_path):
    model = copy.deepcopy(reference.backbone.model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "lora.safetensors"
    path.write_bytes(generated[0])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with merge_lora(model, generated[0]):
        expected = _embed(model, pixels)
    with open(path, "rb") as f, merge_lora(model, f):
        torch.testing.assert_close(_embed(model, pixels), expected, rtol=0, atol=0)
    with open(path, encoding="latin-1") as f, pytest.raises(ValueError, match="binary mode"):
        merge_lora(model, f)
    with open(path) as f, pytest.raises(ValueError, match="binary mode"):  # UTF-8 text: was a UnicodeDecodeError
        merge_lora(model, f)
    with pytest.raises(ValueError, match="not int"):
        merge_lora(model, 3)
    assert _same(model, own)


def test_merges_are_restored_last_in_first_out(generated, reference):
    model = copy.deepcopy(reference.backbone.model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    a = merge_lora(model, generated[0])
    b = merge_lora(model.visual, generated[1])  # the same tower, reached directly
    with pytest.raises(RuntimeError, match="out of order: 1 later merge"):
        a.restore()
    assert not _same(model, own)  # nothing was written by the refused restore
    b.restore()
    a.restore()
    a.restore()  # a second restore does nothing
    assert _same(model, own)
    with merge_lora(model, generated[0]), merge_lora(model, generated[1]):  # nested blocks unwind in order
        pass
    assert _same(model, own)
    # another model's merges are its own
    other = copy.deepcopy(reference.backbone.model)
    a, c = merge_lora(model, generated[0]), merge_lora(other, generated[1])
    a.restore()
    c.restore()
    assert _same(model, own)


def test_hf_vision_model_embeds_as_open_clip_and_takes_the_peft_zip(client, reference, tmp_path):
    # An HF CLIP vision tower built from the open_clip model itself: its image_embeds are encode_image's,
    # and the /generate zip loaded into it with PEFT changes them as merge_lora does the open_clip model.
    import io
    import zipfile

    from peft import PeftModel

    from sglora.hf_clip import hf_vision_config, hf_vision_model

    model = copy.deepcopy(reference.backbone.model).eval()
    hf = hf_vision_model(model)
    assert hf_vision_config(model)["hidden_act"] == "gelu"  # open_clip's default, not HF's quick_gelu
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=pixels).image_embeds, model.encode_image(pixels), rtol=1e-5, atol=1e-5)
    body = {"description": "a blue square", "seed": 4}
    st = client.post("/generate", json=body).content
    zipped = client.post("/generate", json=body, headers={"Accept": "application/zip"}).content
    with zipfile.ZipFile(io.BytesIO(zipped)) as z:
        z.extractall(tmp_path / "adapter")
    adapted = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad(), merge_lora(model, st):
        want = model.encode_image(pixels)
        got = adapted(pixel_values=pixels).image_embeds
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert (got - model.encode_image(pixels)).abs().max() > 1e-4  # the adapter did something


def test_hf_vision_model_refuses_what_hf_clip_cannot_express(reference):
    from sglora.hf_clip import hf_vision_model

    model = copy.deepcopy(reference.backbone.model)
    model.visual.pool_type = "avg"
    model.visual.transformer.resblocks[1].ls_2 = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"pool_type 'avg'.*block 1: ls_2"):
        hf_vision_model(model)
    with pytest.raises(ValueError, match="not an open_clip VisionTransformer: Linear"):
        hf_vision_model(torch.nn.Linear(2, 2))
    wide = copy.deepcopy(reference.backbone.model)
    wide.visual.patch_size = (8, 16)
    with pytest.raises(ValueError, match="HF's CLIP takes a square patch size, this tower's is 8 x 16"):
        hf_vision_model(wide)


def test_a_peft_folder_or_its_zip_merges_as_the_file_does(client, generated, reference, tmp_path):
    """What /generate answers to Accept: application/zip, zipped or unzipped, holds the same file."""
    import io
    import os
    import stat
    import subprocess
    import zipfile

    model = copy.deepcopy(reference.backbone.model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    body = {"description": "a red circle", "seed": 3}  # generated[0]'s request
    zipped = client.post("/generate", json=body, headers={"Accept": "application/zip"}).content
    with merge_lora(model, generated[0]):
        expected = _embed(model, pixels)
    (tmp_path / "a.zip").write_bytes(zipped)
    zipfile.ZipFile(io.BytesIO(zipped)).extractall(tmp_path / "adapter")
    for source in (zipped, tmp_path / "a.zip", str(tmp_path / "adapter")):
        with merge_lora(model, source):
            torch.testing.assert_close(_embed(model, pixels), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="folder without adapter_model.safetensors"):
        merge_lora(model, tmp_path)
    with pytest.raises(ValueError, match="zip without adapter_model.safetensors"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("other.txt", b"x")
        merge_lora(model, buf.getvalue())
    assert _same(model, own)
    # The entries carry read permission for others, so that an extracted adapter is readable by a server of
    # another user (unzip and Python's zipfile apply them); and so they are where unzip is installed.
    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        for info in z.infolist():
            assert (info.external_attr >> 16) & stat.S_IROTH, info.filename
    if shutil_which("unzip"):
        subprocess.run(["unzip", "-q", str(tmp_path / "a.zip"), "-d", str(tmp_path / "u")], check=True, env={**os.environ})
        for f in (tmp_path / "u").iterdir():
            assert f.stat().st_mode & stat.S_IROTH, f


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


@pytest.mark.parametrize("alpha", ["inf", "-inf", "nan", "0", "-2"])
def test_an_alpha_that_is_not_a_finite_positive_number_is_refused(generated, reference, alpha):
    model = copy.deepcopy(reference.backbone.model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        merge_lora(model, _with_metadata(generated[0], alpha=alpha))
    assert _same(model, own)


def test_values_that_overflow_the_merged_weights_are_refused(generated, reference):
    model = copy.deepcopy(reference.backbone.model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    tensors, meta = read_lora(generated[0])
    big = {k: torch.full_like(v, 3e38) for k, v in tensors.items()}
    with pytest.raises(ValueError, match="non-finite weights"):
        merge_lora(model, save(big, metadata=meta))
    with pytest.raises(ValueError, match="non-finite weights"):  # a finite alpha beyond float32's range
        merge_lora(model, _with_metadata(generated[0], alpha="1e39"))
    assert _same(model, own)


def test_a_model_of_the_other_activation_is_refused(generated, reference):
    """The files name their backbone's MLP activation: OpenAI's weights in a GELU model run without an error,
    only worse, so a LoRA made on the QuickGELU model is refused there (and the other way round)."""
    from models.open_clip_backbone import mlp_activation

    _, meta = read_lora(generated[0])
    assert meta["activation"] == mlp_activation(reference.backbone.model.visual) == "gelu"
    model = copy.deepcopy(reference.backbone.model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="MLPs use quick_gelu, this model's use gelu"):
        merge_lora(model, _with_metadata(generated[0], activation="quick_gelu"))
    assert _same(model, own)
    with merge_lora(model, _with_metadata(generated[0], activation="gelu")):  # its own: merged
        pass


def test_a_tower_of_another_depth_or_patch_size_is_refused(generated, reference):
    """The tensors' shapes do not tell a ViT-B-32 from a B-16, nor a 2-block tower from the first 2 blocks of
    a deeper one: the files name the tower's depth and patch size, and merge_lora compares."""
    from models.open_clip_backbone import tower_geometry

    _, meta = read_lora(generated[0])
    own = tower_geometry(reference.backbone.model.visual)
    assert json.loads(meta["visual_tower"]) == own == {"layers": 2, "patch_size": [8, 8]}
    model = copy.deepcopy(reference.backbone.model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        ({**own, "layers": 3}, "image tower with 3 blocks, this model's has 2 blocks"),
        ({**own, "patch_size": [16, 16]}, r"patch size \[16, 16\], this model's has patch size \[8, 8\]"),
    ]
    for tower, message in cases:
        with pytest.raises(ValueError, match=message):
            merge_lora(model, _with_metadata(generated[0], visual_tower=json.dumps(tower)))
    for bad in ("[2]", "[" * 100_000):  # the second nested past json's depth: a RecursionError, not a ValueError
        with pytest.raises(ValueError, match="names an image tower that is not one"):
            merge_lora(model, _with_metadata(generated[0], visual_tower=bad))
    assert _same(model, saved)
    # a file written before the key was: taken as it is
    with merge_lora(model, _with_metadata(generated[0], visual_tower=None)) as lora:
        assert "visual_tower" not in lora.metadata
    assert _same(model, saved)

"""POST /generate and /generate/batch against the tiny artefacts and the shared Redis."""

from __future__ import annotations

import base64
import io
import json
import warnings
import zipfile

import pytest
import torch
from app_helpers import file_metadata
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load

from app.main import create_app
from sglora.export import PEFT_CONFIG, PEFT_WEIGHTS, from_peft_tensors, generation_metadata, peft_zip_bytes

META_KEYS = {"description", "method", "seed", "experts", "backbone", "rank", "alpha", "targets", "artifact_version"}


def test_generate_returns_the_engines_lora_as_peft_safetensors(client, reference):
    r = client.post("/generate", json={"description": "a  red   circle ", "seed": 11})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-cache"] == "miss" and r.headers["x-seed"] == "11"
    assert r.headers["etag"].startswith('"') and len(r.headers["etag"]) == 34
    meta = file_metadata(r.content)
    assert META_KEYS <= set(meta)
    assert meta["description"] == "a red circle" and meta["method"] == "sg-lora" and meta["seed"] == "11"
    assert meta["artifact_version"] == reference.version == r.headers["x-artifact-version"]
    experts = json.loads(meta["experts"])
    assert [f"{e['name']}={e['weight']:.4f}" for e in experts] == r.headers["x-experts"].split(",")
    assert r.headers["x-experts-count"] == str(len(experts))
    assert all({"name", "weight", "similarity"} <= set(e) for e in experts)

    tensors = load(r.content)
    assert all(k.startswith("base_model.model.vision_model.encoder.layers.") for k in tensors)
    vec = from_peft_tensors(reference.backbone.spec, tensors)
    # The metadata reproduces the LoRA through the library: same experts, weights and vector.
    emb = reference.engine.embed([meta["description"]])[0]
    g = reference.engine.generate(
        emb, meta["method"], seed=int(meta["seed"]), top_k=int(meta["top_k"]), temperature=float(meta["temperature"])
    )
    assert [(e.name, pytest.approx(e.weight, abs=1e-6)) for e in g.experts] == [(e["name"], e["weight"]) for e in experts]
    torch.testing.assert_close(vec, g.lora, rtol=0, atol=0)


def test_same_request_same_bytes_served_from_cache(client, make_settings):
    body = {"description": "a blue square", "seed": 5, "method": "sg-lora"}
    first = client.post("/generate", json=body)
    again = client.post("/generate", json={**body, "description": "  a blue\tsquare"})  # normalised to the same key
    defaults = client.post("/generate", json={**body, "top_k": 3, "temperature": 0.1})  # the artefacts' defaults, spelled out
    assert (first.headers["x-cache"], again.headers["x-cache"], defaults.headers["x-cache"]) == ("miss", "hit", "hit")
    assert first.content == again.content == defaults.content
    assert first.headers["etag"] == again.headers["etag"]
    other = client.post("/generate", json={**body, "seed": 6})
    assert other.headers["x-cache"] == "miss" and other.content != first.content
    # A fresh process without a cache regenerates the very same bytes.
    with TestClient(create_app(make_settings(redis_url=""))) as fresh:
        r = fresh.post("/generate", json=body)
        assert r.headers["x-cache"] == "miss" and r.content == first.content


def test_the_library_writes_the_services_bytes_with_the_same_text_dtype(make_settings, reference):
    body = {"description": "a blue square", "seed": 5, "method": "sg-lora"}
    with TestClient(create_app(make_settings(redis_url="", text_dtype="float32"))) as c:
        served = c.post("/generate", json=body).content
    assert reference.lora_file("a blue square", seed=5)[0] == served


def test_unseeded_request_draws_a_seed_that_reproduces_it(client):
    a = client.post("/generate", json={"description": "a green ring"})
    b = client.post("/generate", json={"description": "a green ring"})
    assert a.headers["x-cache"] == b.headers["x-cache"] == "miss"
    assert a.headers["x-seed"] != b.headers["x-seed"] and a.content != b.content
    again = client.post("/generate", json={"description": "a green ring", "seed": int(a.headers["x-seed"])})
    assert again.headers["x-cache"] == "hit" and again.content == a.content


@pytest.mark.parametrize("method", ["topk-weighted", "adapter-soup", "model-soup"])
def test_deterministic_methods_ignore_the_seed(client, method):
    a = client.post("/generate", json={"description": f"a cross for {method}", "method": method, "seed": 1})
    b = client.post("/generate", json={"description": f"a cross for {method}", "method": method})
    assert a.status_code == 200 and "x-seed" not in a.headers
    assert (a.headers["x-cache"], b.headers["x-cache"]) == ("miss", "hit") and a.content == b.content
    assert file_metadata(a.content)["method"] == method


@pytest.mark.parametrize(
    ("method", "unused"), [("adapter-soup", {"temperature": 3.0}), ("model-soup", {"top_k": 1, "temperature": 3.0})]
)
def test_what_a_soup_does_not_use_neither_keys_nor_shows(client, method, unused):
    """The soups weigh their experts equally and model-soup mixes every expert: a temperature (and
    model-soup's top_k) changes nothing, so it shares the entry and the metadata does not claim it."""
    a = client.post("/generate", json={"description": f"a ring for {method}", "method": method})
    b = client.post("/generate", json={"description": f"a ring for {method}", "method": method, **unused})
    assert (a.headers["x-cache"], b.headers["x-cache"]) == ("miss", "hit") and a.content == b.content
    meta = file_metadata(a.content)
    assert meta["temperature"] == ""
    n = len(client.get("/experts").json()["experts"])
    assert int(meta["top_k"]) == (n if method == "model-soup" else len(json.loads(meta["experts"])))
    info = client.post("/generate/preview", json={"description": f"a ring for {method}", "method": method}).json()
    assert info["temperature"] is None and info["top_k"] == int(meta["top_k"])
    # Still checked: a value the API refuses is refused whatever the method.
    r = client.post("/generate", json={"description": "a ring", "method": method, "temperature": 0})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "temperature"


def test_if_none_match_gives_304(client):
    body = {"description": "a star", "seed": 2}
    r = client.post("/generate", json=body)
    etag = r.headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):  # weak comparison, lists, and "*" (RFC 9110)
        again = client.post("/generate", json=body, headers={"If-None-Match": header})
        assert again.status_code == 304 and not again.content and again.headers["etag"] == etag, header
    for header in ('"other"', etag.strip('"')[:-1], f'{etag[:-1]}-zip"'):
        assert client.post("/generate", json=body, headers={"If-None-Match": header}).status_code == 200, header


@pytest.mark.parametrize(
    ("accept", "zipped"),
    [
        (None, False),
        ("application/zip", True),
        ("application/zip, */*;q=0.1", True),
        ("application/octet-stream, application/zip", True),  # a tie: the zip was named
        ("application/zip;q=0, application/octet-stream", False),  # q=0: "not acceptable"
        ("application/zip;q=0.5, application/octet-stream", False),
        ("application/zip;q=0.5, application/*;q=0.4", True),
        ("APPLICATION/ZIP; Q=1", True),
        ("application/zip;q=oops, application/octet-stream", False),  # a q that does not parse: range left out
        ("*/*", False),
        ("application/*", False),
        ("text/html", False),
    ],
)
def test_accept_takes_the_zip_only_when_its_q_ranks_it_first(client, accept, zipped):
    """Accept used to be searched for the substring "application/zip", so "application/zip;q=0" (refusing it)
    got a zip; GET /experts/{name}?part=variance then refused a request that had refused the zip."""
    from app.deps import wants_zip

    assert wants_zip(accept) is zipped
    headers = {"Accept": accept} if accept else {}
    r = client.post("/generate", json={"description": "a star", "seed": 2}, headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"] == ("application/zip" if zipped else "application/octet-stream")
    assert r.headers["etag"].endswith('-zip"') is zipped
    name = client.get("/experts").json()["experts"][0]["name"]
    v = client.get(f"/experts/{name}", params={"part": "variance"}, headers=headers)
    want = (422, "application/json") if zipped else (200, "application/octet-stream")
    assert (v.status_code, v.headers["content-type"]) == want


def tiny_hf_clip():
    """HF CLIPModel twin of the tiny open_clip config (vision width 64, 2 layers, patch 8, image 32). Its
    activation is open_clip's default GELU (the config has no quick_gelu); HF's default is quick_gelu."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "hidden_act": "gelu",
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": "gelu",
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    return CLIPModel(cfg).eval()


def test_zip_is_a_peft_folder_that_loads_into_hf_clip(client, reference, tmp_path):
    from peft import PeftModel

    body = {"description": "a yellow triangle", "seed": 9}
    st = client.post("/generate", json=body)
    r = client.post("/generate", json=body, headers={"Accept": "application/zip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["etag"] == st.headers["etag"][:-1] + '-zip"'
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS])
        assert z.read(PEFT_WEIGHTS) == st.content
        z.extractall(tmp_path / "adapter")
    spec = reference.backbone.spec
    vec = from_peft_tensors(spec, load(st.content))
    # Byte-identical to the library's own zip of the same LoRA and metadata.
    assert r.content == peft_zip_bytes(spec, vec, {k: v for k, v in file_metadata(st.content).items()})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_hf_clip(), str(tmp_path / "adapter"))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    ours = load(st.content)
    loaded = {
        f"base_model.model.{name}.{which}.weight": getattr(module, which)["default"].weight
        for name, module in model.base_model.model.named_modules()
        if hasattr(module, "lora_A")
        for which in ("lora_A", "lora_B")
    }
    assert set(loaded) == set(ours)  # exactly the 2 x 3 vision projections, nothing in the text tower
    for k, v in ours.items():
        torch.testing.assert_close(loaded[k].detach(), v, rtol=0, atol=0)
    # the twin computes what the open_clip model does: same MLP activation in both towers
    x = torch.linspace(-4, 4, 101)
    hf, oc = model.base_model.model, reference.backbone.model
    for hf_act, oc_act in (
        (hf.vision_model.encoder.layers[0].mlp.activation_fn, oc.visual.transformer.resblocks[0].mlp.gelu),
        (hf.text_model.encoder.layers[0].mlp.activation_fn, oc.transformer.resblocks[0].mlp.gelu),
    ):
        torch.testing.assert_close(hf_act(x), oc_act(x), rtol=1e-6, atol=1e-6)


def test_experts_merge_exactly_in_peft_with_the_weights_generate_reports(client, reference, tmp_path):
    """The recipe of docs/service.md ("Experts"): /generate/preview's experts and weights, each expert from
    GET /experts/{name} as a PEFT folder, and PEFT's concatenating merge give exactly sum_k alpha_k B_k A_k
    (scaled) on every adapted layer, which the [B, A] average that topk-weighted returns does not; method
    topk-exact serves that same update as one PEFT folder."""
    from peft import PeftModel

    body = {"description": "a yellow triangle", "method": "topk-weighted"}
    experts = client.post("/generate/preview", json=body).json()["experts"]
    assert len(experts) == reference.engine.top_k and abs(sum(e["weight"] for e in experts) - 1) < 1e-6
    names = [f"e{i}" for i in range(len(experts))]  # as in the recipe: an expert's name may contain '.', an adapter name may not
    for n, e in zip(names, experts, strict=True):
        r = client.get(f"/experts/{e['name']}", headers={"Accept": "application/zip"})
        assert r.status_code == 200
        zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / n)
    model = PeftModel.from_pretrained(tiny_hf_clip(), str(tmp_path / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(tmp_path / n), adapter_name=n)
    model.add_weighted_adapter(names, [e["weight"] for e in experts], adapter_name="merged", combination_type="cat")
    # The service's own exact merge (method topk-exact), as a PEFT folder of rank K*r, is that same update.
    served = client.post("/generate", json={**body, "method": "topk-exact"}, headers={"Accept": "application/zip"})
    assert served.status_code == 200 and served.headers["x-experts"] == client.post("/generate", json=body).headers["x-experts"]
    with zipfile.ZipFile(io.BytesIO(served.content)) as z:
        assert json.loads(z.read(PEFT_CONFIG))["r"] == len(experts) * reference.backbone.spec.rank
        assert file_metadata(z.read(PEFT_WEIGHTS))["rank"] == str(len(experts) * reference.backbone.spec.rank)
        z.extractall(tmp_path / "served")
    model.load_adapter(str(tmp_path / "served"), adapter_name="served")

    spec = reference.backbone.spec
    topk = from_peft_tensors(spec, load(client.post("/generate", json=body).content))
    averaged = spec.unflatten(topk)
    lora_layers = [(name, m) for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert len(lora_layers) == len(spec.targets)
    differs = False
    for name, m in lora_layers:
        merged = (m.lora_B["merged"].weight @ m.lora_A["merged"].weight) * m.scaling["merged"]
        exact = sum(
            e["weight"] * (m.lora_B[n].weight @ m.lora_A[n].weight) * m.scaling[n] for n, e in zip(names, experts, strict=True)
        )
        torch.testing.assert_close(merged, exact, rtol=1e-5, atol=1e-6)
        served_update = (m.lora_B["served"].weight @ m.lora_A["served"].weight) * m.scaling["served"]
        torch.testing.assert_close(served_update, exact, rtol=1e-5, atol=1e-6)
        target = next(t for t in spec.targets if t.peft_module and name.endswith(t.peft_module))
        b, a = averaged[target.name]
        differs |= not torch.allclose(exact, (b @ a) * spec.scale, rtol=1e-3, atol=1e-6)
    assert differs  # the exact merge is another update than the [B, A] average


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_the_peft_cat_merge_recipe_with_rslora_needs_its_scaling_set_to_one(reference, tmp_path, scaling):
    """docs/service.md ("Exact merges"): PEFT's cat merge folds each expert's scale into B, and the merged
    adapter inherits use_rslora with r = lora_alpha = K*r, so PEFT scales it by sqrt(K*r) instead of 1;
    with its scaling set to 1 it is sum_k w_k scale B_k A_k, the update topk-exact (concat_merge) serves."""
    import dataclasses

    from peft import PeftModel

    from models.lora import concat_merge

    spec = dataclasses.replace(reference.backbone.spec, scaling=scaling, alpha=3.0)
    vecs = torch.randn(3, spec.num_params, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([0.5, 0.3, 0.2])
    names = ["e0", "e1", "e2"]
    for n, v in zip(names, vecs, strict=True):
        zipfile.ZipFile(io.BytesIO(peft_zip_bytes(spec, v, {"format": "sglora-expert"}))).extractall(tmp_path / n)
    model = PeftModel.from_pretrained(tiny_hf_clip(), str(tmp_path / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(tmp_path / n), adapter_name=n)
    model.add_weighted_adapter(names, weights.tolist(), adapter_name="merged", combination_type="cat")
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "merged" in m.scaling]
    assert len(lora_layers) == len(spec.targets)
    k_r = len(names) * spec.rank
    expected_scaling = k_r**0.5 if scaling == "rslora" else 1.0  # alpha = r = K*r: sqrt(K*r) under rslora
    assert all(abs(m.scaling["merged"] - expected_scaling) < 1e-6 for m in lora_layers)
    for m in lora_layers:  # the documented fix
        m.scaling["merged"] = 1.0
    served_spec, served = concat_merge(spec, vecs, weights)
    zipfile.ZipFile(io.BytesIO(peft_zip_bytes(served_spec, served, {"format": "sglora-lora"}))).extractall(tmp_path / "s")
    model.load_adapter(str(tmp_path / "s"), adapter_name="served")
    for m in lora_layers:
        merged = (m.lora_B["merged"].weight @ m.lora_A["merged"].weight) * m.scaling["merged"]
        exact = sum(
            float(w) * (m.lora_B[n].weight @ m.lora_A[n].weight) * m.scaling[n] for n, w in zip(names, weights, strict=True)
        )
        torch.testing.assert_close(merged, exact, rtol=1e-5, atol=1e-6)
        served_update = (m.lora_B["served"].weight @ m.lora_A["served"].weight) * m.scaling["served"]
        torch.testing.assert_close(served_update, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_an_exact_merge_of_one_expert_keeps_its_own_alpha_in_the_zip_and_retrieval(reference, scaling):
    """A top-1 exact merge has the backbone's rank but alpha = rank and standard scaling (its scale folded into
    B). With artefacts of alpha != rank, or rslora, the service's spec_of compared the rank alone and gave the
    zip and /retrieve the backbone's alpha: PEFT scaled the update again (2.1x on alpha 4, rank 2)."""
    import dataclasses
    from types import SimpleNamespace

    from app.service import GeneratedLora, Service
    from models.lora import concat_merge
    from sglora.export import layout_metadata

    spec = dataclasses.replace(reference.backbone.spec, alpha=2.0 * reference.backbone.spec.rank, scaling=scaling)
    vec = torch.randn(1, spec.num_params, generator=torch.Generator().manual_seed(0))
    merged_spec, merged = concat_merge(spec, vec, torch.tensor([1.0]))
    assert merged_spec.rank == spec.rank and (merged_spec.alpha, merged_spec.scaling) != (spec.alpha, spec.scaling)
    service = SimpleNamespace(spec=spec)  # spec_of reads the backbone's spec alone
    meta = layout_metadata(reference.backbone, merged_spec, "v")
    assert Service.spec_of(service, GeneratedLora(b"", "e", "miss", meta)) == merged_spec
    assert merged_spec.scale == 1.0  # the update is concat_merge's as it stands
    own = layout_metadata(reference.backbone, spec, "v")
    assert Service.spec_of(service, GeneratedLora(b"", "e", "miss", own)) is spec


def test_sg_lora_exact_is_seeded_cached_and_a_peft_folder_of_its_rank(client, reference):
    body = {"description": "a blue star", "method": "sg-lora-exact", "seed": 21}
    first, again = client.post("/generate", json=body), client.post("/generate", json=body)
    assert first.status_code == 200 and first.headers["x-seed"] == "21" and first.headers["x-cache"] == "miss"
    assert again.headers["x-cache"] == "hit" and again.content == first.content
    meta = file_metadata(first.content)
    rank = (reference.engine.top_k + 2) * reference.backbone.spec.rank
    assert meta["method"] == "sg-lora-exact" and meta["seed"] == "21" and meta["rank"] == str(rank)
    emb = reference.engine.embed([body["description"]])[0]
    g = reference.engine.generate(emb, "sg-lora-exact", seed=21)
    assert torch.equal(from_peft_tensors(g.spec, load(first.content)), g.lora)
    z = client.post("/generate", json=body, headers={"Accept": "application/zip"})
    assert json.loads(zipfile.ZipFile(io.BytesIO(z.content)).read(PEFT_CONFIG))["r"] == rank
    drawn = client.post("/generate", json={"description": "a blue star", "method": "sg-lora-exact"})
    assert drawn.headers["x-cache"] == "miss" and int(drawn.headers["x-seed"]) >= 0


def test_batch_answers_each_item(client):
    items = [
        {"description": "a purple diamond", "seed": 4},
        {"description": "a bar", "top_k": 99},
        {"description": "a cross", "method": "model-soup"},
    ]
    r = client.post("/generate/batch", json={"items": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 422, 200]
    assert results[1]["error"]["field"] == "top_k"
    single = client.post("/generate", json=items[0])
    assert single.headers["x-cache"] == "hit"
    assert base64.b64decode(results[0]["data"]) == single.content
    assert f'"{results[0]["etag"]}"' == single.headers["etag"] and results[0]["seed"] == 4
    z = client.post("/generate/batch", json={"items": items[:1], "format": "zip"}).json()["results"][0]
    assert zipfile.ZipFile(io.BytesIO(base64.b64decode(z["data"]))).read(PEFT_WEIGHTS) == single.content


BAD_REQUESTS = [
    ({"description": ""}, "description"),
    ({"description": "   "}, "description"),
    ({"description": "x" * 3000}, "description"),
    ({}, "description"),
    ({"description": "a", "method": "lora-magic"}, "method"),
    ({"description": "a", "method": "zero-shot"}, "method"),
    ({"description": "a", "top_k": 5}, "top_k"),
    ({"description": "a", "top_k": 0}, "top_k"),
    ({"description": "a", "temperature": 0}, "temperature"),
    ({"description": "a", "temperature": -1.5}, "temperature"),
    ({"description": "a", "seed": -1}, "seed"),
    ({"description": "a", "seed": "abc"}, "seed"),
    ({"description": "a", "seed": True}, "seed"),
    ({"description": "a", "top_k": 2.5}, "top_k"),
    ({"description": "a", "topk": 2}, "topk"),
    ({"description": 12}, "description"),
]


@pytest.mark.parametrize(("body", "field"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_the_field(client, body, field):
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["field"] == field
    # In a batch: the whole batch refused naming the item's field (the schema's checks), or that item alone
    # with its neighbour made (the engine's checks, e.g. a top_k above the number of experts).
    b = client.post("/generate/batch", json={"items": [{"description": "ok"}, body]})
    if b.status_code == 200:
        ok, bad = b.json()["results"]
        assert ok["status"] == 200 and bad["status"] == 422, b.text
        assert bad["error"]["field"] == field, b.text
    else:
        assert b.status_code == 422 and b.json()["detail"]["field"] == f"items[1].{field}", b.text


def test_malformed_json_is_a_4xx(client):
    r = client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    # A body JSON's parser gives up on: the reason says why, not only that it failed.
    huge_seed = b'{"description": "a", "seed": ' + b"9" * 5000 + b"}"
    r = client.post("/generate", content=huge_seed, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "digits" in r.json()["detail"]["reason"], r.text
    assert client.post("/generate/batch", json={"items": []}).json()["detail"]["field"] == "items"


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/generate", b'{"description": "a circle", "description": "a cross"}', "description"),
        ("/generate/preview", b'{"description": "a circle", "seed": 1, "seed": 2}', "seed"),
        ("/generate/batch", b'{"items": [{"description": "a ring", "top_k": 1, "top_k": 2}]}', "top_k"),
    ],
)
def test_a_key_sent_twice_in_a_json_body_is_refused_not_the_last_one_taken(client, path, body, key):
    """json.loads keeps a repeated key's last value: a LoRA for "a cross" was the answer to a body that also
    asked for "a circle". As the forms and the configs do, the body is refused, naming the key."""
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    reason = f"the key '{key}' appears twice in one JSON object; send each field once"
    assert r.json()["detail"] == {"field": "body", "reason": reason}


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.sglora+json", "Application/JSON"])
def test_json_bodies_are_read_under_any_json_type(client, content_type):
    r = client.post("/generate", content=b'{"description": "a star", "seed": 2}', headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("content_type", "named"),
    [("application/x-www-form-urlencoded", "not application/x-www-form-urlencoded"), (None, "had none")],
)
def test_a_body_not_sent_as_json_is_refused_by_its_type(client, content_type, named):
    """curl -d sends application/x-www-form-urlencoded: FastAPI then read the JSON as bytes and answered
    422 "Input should be a valid dictionary", which hid the cause; so it did without a Content-Type."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = client.post("/generate", content=b'{"description": "a star"}', headers=headers)
    assert r.status_code == 415
    detail = r.json()["detail"]
    assert detail["field"] == "Content-Type" and "application/json" in detail["reason"] and named in detail["reason"], detail


def test_metadata_helper_matches_the_cli(client, reference):
    """The service writes the CLI's metadata (sglora generate), so files from both read the same."""
    r = client.post("/generate", json={"description": "a circle", "method": "topk-weighted"})
    emb = reference.engine.embed(["a circle"])[0]
    g = reference.engine.generate(emb, "topk-weighted")
    expected = {k: v if isinstance(v, str) else json.dumps(v) for k, v in generation_metadata(reference, "a circle", g).items()}
    got = file_metadata(r.content)
    assert got.keys() == expected.keys()
    assert {k: got[k] for k in got if k != "experts"} == {k: expected[k] for k in expected if k != "experts"}


def test_the_experts_header_lists_the_heaviest_sixteen_and_counts_them_all():
    """model-soup's header listed every expert: 5.7 kB at 144 experts (past the 4-8 kB a proxy buffers by
    default) and 200 kB at 4,000, which httpx then refused to read."""
    from app.routes.generate import MAX_HEADER_EXPERTS, lora_headers
    from app.service import GeneratedLora

    # A model-soup's list: equal weights, in the repository's order, similarities in no order.
    sims = [((7 * i) % 40) / 40 for i in range(40)]
    experts = [{"name": f"e{i}", "weight": 1 / 40, "similarity": s} for i, s in enumerate(sims)]
    lora = GeneratedLora(b"", "x" * 32, "miss", {"experts": json.dumps(experts), "method": "model-soup"})
    headers = lora_headers(lora, lora.etag)
    shown = headers["X-Experts"].split(",")
    best = sorted(range(40), key=lambda i: -sims[i])[:MAX_HEADER_EXPERTS]
    assert shown == [f"e{i}=0.0250" for i in best] and headers["X-Experts-Count"] == "40"
    # A top-K list keeps its order (heaviest, then most similar, first).
    topk = [{"name": "a", "weight": 0.5, "similarity": 0.9}, {"name": "b", "weight": 0.3, "similarity": 0.8}]
    topk.append({"name": "c", "weight": 0.2, "similarity": 0.7})
    lora = GeneratedLora(b"", "y" * 32, "hit", {"experts": json.dumps(topk), "method": "topk-weighted"})
    assert lora_headers(lora, lora.etag)["X-Experts"] == "a=0.5000,b=0.3000,c=0.2000"


def test_top_k_is_capped_by_the_setting_as_well_as_the_experts(make_settings):
    from app.settings import StartupError

    with TestClient(create_app(make_settings(redis_url="", max_top_k=3))) as c:  # 4 experts, 3 by default
        assert c.post("/generate", json={"description": "a circle", "method": "topk-weighted", "top_k": 3}).status_code == 200
        r = c.post("/generate", json={"description": "a circle", "method": "topk-weighted", "top_k": 4})
        assert r.status_code == 422 and r.json()["detail"] == {
            "field": "top_k",
            "reason": "must be between 1 and SGLORA_MAX_TOP_K (3), got 4",
        }
        form = {"description": "a circle", "top_k": "4"}
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), "red").save(buf, "PNG")
        image = ("i.png", buf.getvalue(), "image/png")
        r = c.post("/retrieve", data=form, files=[("images", image)])
        assert r.status_code == 422 and "SGLORA_MAX_TOP_K (3)" in r.text
    # A cap below the artefacts' default would let every request without a top_k pass it: refused at start-up.
    with pytest.raises(StartupError, match=r"SGLORA_MAX_TOP_K=2 is below the artefacts' default top_k \(3\)"):
        with TestClient(create_app(make_settings(redis_url="", max_top_k=2))):
            pass
    with TestClient(create_app(make_settings(redis_url=""))) as c:  # the cap (64) above the experts (4): named by them
        r = c.post("/generate", json={"description": "a circle", "method": "topk-weighted", "top_k": 5})
        assert r.json()["detail"]["reason"] == "must be between 1 and the number of experts (4), got 5"


def test_a_description_longer_than_the_text_tower_reads_is_refused(client):
    """The tiny tower reads 32 tokens: past them the tokenizer cut the text off, so two descriptions alike
    up to there gave one LoRA under two cache entries, each file claiming its whole description."""
    head = "a photo of a circle with noise and a ring and a cross and a star beside a square"
    head += " and a ring and a cross and a star beside a"  # 32 tokens with the start and end ones
    for tail in ("circle", "square"):
        r = client.post("/generate", json={"description": f"{head} {tail}", "seed": 3})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "description"
        assert "tokens long, and the text tower reads at most 32" in r.json()["detail"]["reason"]
    batch = client.post("/generate/batch", json={"items": [{"description": f"{head} circle"}, {"description": "a ring"}]}).json()
    assert [i["status"] for i in batch["results"]] == [422, 200]
    assert client.post("/generate", json={"description": "a photo of a circle with noise", "seed": 3}).status_code == 200


def test_a_batch_asking_for_more_lora_bytes_than_the_limit_is_refused_before_any_work(make_settings):
    """An exact merge's file is top_k (+2) LoRAs: 32 such items on a large layout made a response of ~1 GB
    (with its base64) from a 31 KB request. The call's total is bounded (SGLORA_MAX_BATCH_BYTES)."""
    from app.main import create_app

    with TestClient(create_app(make_settings(max_batch_bytes=100_000))) as c:
        service = c.app.state.service
        one = service.spec.num_params * 4
        assert service.lora_bytes("sg-lora-exact", 3) == 5 * one and service.lora_bytes("sg-lora", 3) == one
        assert service.lora_bytes("topk-exact", 999) == len(service.state.experts) * one  # out of range: its 422
        exact = [{"description": f"a ring {i}", "method": "sg-lora-exact", "top_k": 3, "seed": i} for i in range(4)]
        assert 4 * 5 * one > 100_000 >= 4 * one
        r = c.post("/generate/batch", json={"items": exact})
        assert r.status_code == 413 and r.json()["detail"]["field"] == "items"
        assert "SGLORA_MAX_BATCH_BYTES" in r.json()["detail"]["reason"]
        plain = [{"description": f"a ring {i}", "seed": i} for i in range(4)]
        assert [x["status"] for x in c.post("/generate/batch", json={"items": plain}).json()["results"]] == [200] * 4

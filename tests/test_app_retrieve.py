"""POST /retrieve: the scores are those of the returned LoRA applied to the backbone."""

from __future__ import annotations

import io

import pytest
import torch
from app_helpers import file_metadata
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load

from app.errors import APIError
from app.images import decode_image
from sglora.export import from_peft_tensors

CAPTIONS = ["a red circle", "a blue square", "a green cross", "a white ring"]


def png(draw, size=32, fmt="PNG") -> bytes:
    img = Image.new("RGB", (size, size), "black")
    draw(ImageDraw.Draw(img))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [
    png(lambda d: d.ellipse((6, 6, 26, 26), fill="red")),
    png(lambda d: d.rectangle((6, 6, 26, 26), fill="blue")),
    png(lambda d: (d.rectangle((14, 4, 18, 28), fill="green"), d.rectangle((4, 14, 28, 18), fill="green")), fmt="JPEG"),
    png(lambda d: d.ellipse((4, 4, 28, 28), outline="white", width=3), fmt="WEBP"),
]


def files(images):
    return [("images", (f"{i}.img", b, "application/octet-stream")) for i, b in enumerate(images)]


def stage_count(client, stage: str) -> float:
    text = client.get("/metrics").text
    return next(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "sglora_stage_duration_seconds_count" and s.labels["stage"] == stage
    )


def reference_scores(reference, images, texts, lora, spec=None):
    bb = reference.backbone
    pixels = torch.stack([bb.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.no_grad():  # as the service computes them, on the backbone's device
        feats = bb.image_features(pixels.to(bb.device))
        txt = reference.engine.embed(texts).float()
        img, img0 = bb.encode_image(feats, lora, spec).float().cpu(), bb.encode_image(feats).float().cpu()
        return img @ txt.T, img0 @ txt.T


@pytest.mark.parametrize(("method", "extra_ranks"), [("topk-exact", 0), ("sg-lora-exact", 2)])
def test_retrieval_with_an_exact_merge_applies_it_at_its_rank(client, reference, method, extra_ranks):
    """topk-exact adapters have rank K*r, sg-lora-exact ones (K+2)*r: /retrieve (by description and method,
    and by ETag) applies them at that rank, and its scores are those of the returned file."""
    import dataclasses

    gen = client.post("/generate", json={"description": "a red circle", "method": method, "seed": 5})
    assert gen.status_code == 200, gen.text
    meta = file_metadata(gen.content)
    spec = dataclasses.replace(
        reference.backbone.spec, rank=int(meta["rank"]), alpha=float(meta["alpha"]), scaling=meta["scaling"]
    )
    assert spec.rank == (reference.engine.top_k + extra_ranks) * reference.backbone.spec.rank
    assert gen.headers.get("x-seed") == ("5" if method == "sg-lora-exact" else None)
    want, _ = reference_scores(reference, IMAGES, CAPTIONS, from_peft_tensors(spec, load(gen.content)), spec)
    by_etag = client.post("/retrieve", data={"etag": gen.headers["etag"], "captions": CAPTIONS}, files=files(IMAGES))
    form = {"description": "a red circle", "method": method, "seed": "5", "captions": CAPTIONS}
    by_description = client.post("/retrieve", data=form, files=files(IMAGES))
    for r in (by_etag, by_description):
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor(r.json()["lora"]["scores"]), want, rtol=0, atol=1e-5)
    weighted = client.post(
        "/retrieve", data={"description": "a red circle", "method": "topk-weighted", "captions": CAPTIONS}, files=files(IMAGES)
    )
    assert not torch.allclose(torch.tensor(weighted.json()["lora"]["scores"]), want)


def test_retrieval_scores_are_those_of_the_returned_lora(client, reference):
    gen = client.post("/generate", json={"description": "a red circle", "seed": 3})
    etag = gen.headers["etag"]
    counts = lambda: {st: stage_count(client, st) for st in ("image_encoding", "scoring")}  # noqa: E731
    before = counts()
    r = client.post("/retrieve", data={"etag": etag, "captions": CAPTIONS, "zero_shot": "true"}, files=files(IMAGES))
    assert r.status_code == 200, r.text
    assert counts() == {st: n + 1 for st, n in before.items()}  # the retrieval's stages are timed
    body = r.json()
    assert body["adapter"]["etag"] == etag.strip('"') and body["adapter"]["seed"] == 3 and body["texts"] == CAPTIONS
    # Load the returned bytes back, apply them to the backbone: the service's scores, to float precision.
    lora = from_peft_tensors(reference.backbone.spec, load(gen.content))
    want, want_zs = reference_scores(reference, IMAGES, CAPTIONS, lora)
    got, got_zs = torch.tensor(body["lora"]["scores"]), torch.tensor(body["zero_shot"]["scores"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_zs, want_zs, rtol=0, atol=1e-5)
    assert (got - got_zs).abs().max() > 1e-4  # the LoRA changes the scores
    assert body["lora"]["image_to_text"] == want.argsort(dim=1, descending=True, stable=True).tolist()
    assert body["lora"]["text_to_image"] == want.t().argsort(dim=1, descending=True, stable=True).tolist()
    rec = body["lora"]["recall_at_1"]
    assert rec["image_to_text"] == float((want.argmax(1) == torch.arange(4)).float().mean())


def test_retrieve_by_description_uses_the_same_lora_as_generate(client):
    gen = client.post("/generate", json={"description": "a blue square", "seed": 8, "top_k": 2})
    r = client.post("/retrieve", data={"description": "a blue square", "seed": "8", "top_k": "2"}, files=files(IMAGES[:2]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert f'"{body["adapter"]["etag"]}"' == gen.headers["etag"]
    assert body["texts"] == ["a blue square"] and body["zero_shot"] is None
    assert len(body["lora"]["scores"]) == 2 and len(body["lora"]["scores"][0]) == 1
    assert body["lora"]["recall_at_1"] is None
    # One image and no caption: the one text is the description, not a caption of it; no recall (it said 1.0)
    one = client.post("/retrieve", data={"description": "a blue square", "zero_shot": "1"}, files=files(IMAGES[:1])).json()
    assert one["lora"]["recall_at_1"] is None and one["zero_shot"]["recall_at_1"] is None
    data = {"description": "a blue square", "captions": ["a square"]}
    paired = client.post("/retrieve", data=data, files=files(IMAGES[:1])).json()
    assert paired["lora"]["recall_at_1"] == {"image_to_text": 1.0, "text_to_image": 1.0}


def test_zip_etag_is_accepted_too(client):
    gen = client.post("/generate", json={"description": "a ring", "seed": 1}, headers={"Accept": "application/zip"})
    r = client.post("/retrieve", data={"etag": gen.headers["etag"]}, files=files(IMAGES[:1]))
    assert r.status_code == 200 and r.json()["texts"] == ["a ring"]


@pytest.mark.parametrize(
    ("data", "images", "status", "field"),
    [
        ({"etag": '"' + "0" * 32 + '"'}, IMAGES[:1], 404, "etag"),
        ({"etag": "not-an-etag"}, IMAGES[:1], 422, "etag"),
        ({}, IMAGES[:1], 422, "description"),
        ({"description": "a", "etag": "0" * 32}, IMAGES[:1], 422, "description"),
        ({"description": "  "}, IMAGES[:1], 422, "description"),
        ({"description": ""}, IMAGES[:1], 422, "description"),  # sent empty: blank, not missing
        ({"etag": ""}, IMAGES[:1], 422, "etag"),
        ({"description": "", "etag": "0" * 32}, IMAGES[:1], 422, "description"),  # both sent, one empty
        ({"description": "a", "top_k": "9"}, IMAGES[:1], 422, "top_k"),
        ({"description": "a", "temperature": "0"}, IMAGES[:1], 422, "temperature"),
        ({"description": "a", "method": "nope"}, IMAGES[:1], 422, "method"),
        ({"description": "a"}, [IMAGES[0], b"definitely not an image"], 422, "images[1]"),
        ({"description": "a"}, [IMAGES[0][:60]], 422, "images[0]"),  # truncated PNG
        ({"description": "a"}, [b"GIF89a" + b"\x00" * 20], 422, "images[0]"),
        ({"description": "a"}, [b""], 422, "images[0]"),
        ({"description": "a"}, [IMAGES[0]] * 65, 422, "images"),
        ({"description": "a", "captions": ["ok", " "]}, IMAGES[:1], 422, "captions[1]"),
        ({"description": "a", "captions": ["ok", "a ring " * 20]}, IMAGES[:1], 422, "captions[1]"),  # past 32 tokens
        ({"description": "a ring " * 20}, IMAGES[:1], 422, "description"),
        ({"description": "a", "captions": ["a photo of a ring " * 5] * 250}, IMAGES[:1], 422, "captions"),  # 22,500 chars
        # A field given twice: the last one was taken silently
        ({"description": ["a red circle", "a blue square"]}, IMAGES[:1], 422, "description"),
        ({"description": "a", "seed": ["1", "2"]}, IMAGES[:1], 422, "seed"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(client, data, images, status, field):
    r = client.post("/retrieve", data=data, files=files(images))
    assert r.status_code == status, r.text
    assert r.json()["detail"]["field"] == field
    if data == {"description": ""}:
        assert "blank" in r.json()["detail"]["reason"]


def test_missing_images_is_a_422(client):
    r = client.post("/retrieve", files=[("description", (None, "a"))])  # multipart, no images
    assert r.status_code == 422 and r.json()["detail"]["field"] == "images"
    r = client.post("/retrieve", data={"description": "a"}, files=[("other", ("x.txt", b"x"))])  # a file, elsewhere
    assert r.status_code == 422 and r.json()["detail"]["field"] == "other"
    assert "takes files in images" in r.json()["detail"]["reason"]


def test_a_body_that_is_not_multipart_is_a_415(client):
    """It was a 422 "images: Field required", which hides the cause."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for kwargs in ({"json": {"description": "a"}}, {"content": b"description=a", "headers": form}):
        r = client.post("/retrieve", **kwargs)
        assert r.status_code == 415 and r.json()["detail"]["field"] == "Content-Type", r.text
        assert "multipart/form-data" in r.json()["detail"]["reason"]


def test_uploads_wait_for_the_model_at_its_input_size(client):
    """decode_images hands the model its input pixels: a queued request holds those, not the decoded upload
    (four 4096 x 4096 uploads held 833 MB while they waited)."""
    service = client.app.state.service
    buf = io.BytesIO()
    Image.new("RGB", (900, 700), "red").save(buf, format="PNG")
    pixels = client.portal.call(service.decode_images, [buf.getvalue(), IMAGES[0]])
    one = service.artifacts.backbone.preprocess(Image.open(io.BytesIO(IMAGES[0])).convert("RGB"))  # (3, 32, 32)
    assert [p.shape for p in pixels] == [one.shape] * 2 and torch.equal(pixels[1], one)


def test_pillows_own_pixel_limit_follows_the_setting(monkeypatch):
    """Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS (179M pixels) by itself: a larger
    SGLORA_MAX_IMAGE_PIXELS was cut to that, with a message naming the setting's limit."""
    import struct
    import zlib

    from app.images import allow_pixels, open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # 196M pixels claimed, none sent: only the header is read
    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 14_000, 14_000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", b"")
    with pytest.raises(APIError, match="decompression bomb"):
        open_image(header, "images[0]", 300_000_000)
    allow_pixels(300_000_000)
    assert open_image(header, "images[0]", 300_000_000).size == (14_000, 14_000)
    with pytest.raises(APIError, match="more than the limit of 100000000"):
        open_image(header, "images[0]", 100_000_000)


def test_decode_refuses_oversized_and_unlisted_formats():
    with pytest.raises(APIError) as e:
        decode_image(IMAGES[0], "images[0]", max_pixels=31 * 31)
    assert e.value.field == "images[0]" and "limit" in e.value.reason
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(APIError, match="not an image in an allowed format"):
        decode_image(buf.getvalue(), "images[0]", max_pixels=10_000)
    assert decode_image(IMAGES[1], "images[0]", max_pixels=10_000).size == (32, 32)


def test_a_sliver_image_is_cut_to_its_central_region_before_open_clip_scales_it(client, reference):
    """open_clip's eval transform scales the shortest side to the input size: a 100,000 x 1 PNG of a few
    hundred bytes would become 100,000 times the input size wide before the centre crop. The backbone
    gives the transform the image's central region (sides at most 1:2) instead, which leaves what the
    model sees the same up to a pixel at the crop's edge; the request is answered as any other."""
    from models.open_clip_backbone import MAX_ASPECT, bounded_aspect

    sliver = Image.new("RGB", (100_000, 1), "red")
    assert bounded_aspect(sliver).size == (2, 1) and bounded_aspect(sliver.rotate(90, expand=True)).size == (1, 2)
    square = Image.new("RGB", (40, 30))
    assert bounded_aspect(square) is square  # up to 1:2 the transform gets the image itself, bit for bit
    # A smooth 6:1 image: the central region through the transform against the whole image through it.
    x = torch.linspace(0, 1, 600)[None, :, None]
    y = torch.linspace(0, 1, 100)[:, None, None]
    rgb = torch.cat([0.5 + 0.5 * torch.sin(12 * x + 0 * y), y.expand(100, 600, 1), (x * y).expand(100, 600, 1)], dim=2)
    wide = Image.fromarray((255 * rgb).round().to(torch.uint8).numpy())
    bb = reference.backbone
    assert max(bounded_aspect(wide).size) == MAX_ASPECT * 100
    cut, whole = bb.preprocess(wide), bb._transform(wide)
    assert cut.shape == whole.shape and (cut - whole).abs().mean() < 0.02
    buf = io.BytesIO()
    sliver.save(buf, "PNG")
    r = client.post("/retrieve", data={"description": "a red circle"}, files=[("images", ("s.png", buf.getvalue()))])
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("where", ["decoding", "preprocessing"])
def test_an_image_that_finds_no_memory_is_a_503_not_a_corrupt_image(client, monkeypatch, where):
    """Decoding a (valid) upload caught every error as "truncated or corrupt" (422), a MemoryError too; and the CPU
    allocator's failure while preprocessing was a 500. Both are the host's lack of memory at that moment: 503."""
    import app.images as images_module

    if where == "decoding":
        monkeypatch.setattr(images_module, "to_rgb", lambda img: (_ for _ in ()).throw(MemoryError()))
    else:
        service = client.app.state.service
        monkeypatch.setattr(service.artifacts.backbone, "preprocess", lambda img: torch.empty(2**58, dtype=torch.uint8))
    r = client.post("/retrieve", data={"description": "a blue square"}, files=files(IMAGES[:1]))
    assert r.status_code == 503 and r.json()["detail"]["reason"].startswith("out of memory") and r.headers["retry-after"]
    monkeypatch.undo()
    assert client.post("/retrieve", data={"description": "a blue square"}, files=files(IMAGES[:1])).status_code == 200

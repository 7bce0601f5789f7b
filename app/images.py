"""Decoding uploaded images: an explicit format allow-list and a pixel limit checked before decoding."""

from __future__ import annotations

import io

from PIL import Image

from app.errors import APIError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """bytes -> RGB PIL image; APIError(422, field) for anything else (untrusted input: any decoder error)."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on hostile input
        raise APIError(422, field, f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)}): {type(e).__name__}") from e
    w, h = img.size
    if w * h > max_pixels:  # from the header alone, before decoding a possible decompression bomb
        raise APIError(422, field, f"image is {w}x{h} pixels, more than the limit of {max_pixels}")
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise APIError(422, field, f"image data is truncated or corrupt: {type(e).__name__}: {e}") from e

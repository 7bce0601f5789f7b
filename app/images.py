"""Decoding uploaded images: an explicit format allow-list and pixel limits checked before decoding.

Two steps, so a request's images are all checked from their headers (per image and together) before
any of them is decoded: 64 small files that each claim the per-image maximum would otherwise decode to
gigabytes at once.
"""

from __future__ import annotations

import io

from PIL import Image

from app.errors import APIError
from sglora.images import to_rgb

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def allow_pixels(max_pixels: int) -> None:
    """Lets Pillow's own decompression-bomb check (an error above 2 x ``Image.MAX_IMAGE_PIXELS``, 179M pixels by
    default) pass images within ``max_pixels``: a larger SGLORA_MAX_IMAGE_PIXELS was otherwise cut to it."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """bytes -> a PIL image whose header was read (nothing decoded yet); APIError(422, field) otherwise."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except MemoryError:  # the host's, not the image's fault: a 503 (app/errors.py)
        raise
    except Image.DecompressionBombError as e:  # PIL's own header check (above 2 x Image.MAX_IMAGE_PIXELS)
        raise APIError(422, field, f"image has more pixels than the limit of {max_pixels} (decompression bomb?)") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types on hostile input
        raise APIError(422, field, f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)}): {type(e).__name__}") from e
    w, h = img.size
    if w * h > max_pixels:  # from the header alone, before decoding a possible decompression bomb
        raise APIError(422, field, f"image is {w}x{h} pixels, more than the limit of {max_pixels}")
    return img


def load_rgb(img: Image.Image, field: str) -> Image.Image:
    """Decodes an image from :func:`open_image` -> RGB; APIError(422, field) for truncated or corrupt data."""
    try:
        img.load()
        return to_rgb(img)
    except ValueError as e:  # a mode with no 8-bit reading (to_rgb)
        raise APIError(422, field, f"unsupported image: {e}") from e
    except MemoryError:  # the host's, not the image's fault: a 503 (app/errors.py)
        raise
    except Exception as e:  # noqa: BLE001 - untrusted input: any decoder error
        raise APIError(422, field, f"image data is truncated or corrupt: {type(e).__name__}: {e}") from e


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """bytes -> RGB PIL image; APIError(422, field) for anything else."""
    return load_rgb(open_image(data, field, max_pixels), field)

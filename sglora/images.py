"""A decoded image as the RGB picture a viewer shows, the same for the training data and the service's uploads.

``Image.convert("RGB")`` alone ignores a JPEG's EXIF orientation (a phone photo stays on its side) and clips
16-bit greyscale to 8 bits (a 16-bit PNG became a white square), and drops transparency, so that a transparent
pixel shows whatever colour it hides (often black); a 32-bit or floating-point image has no one reading as
8-bit pixels, so it is refused by name rather than clipped to white or black.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
WHITE = (255, 255, 255, 255)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, upright as its EXIF orientation says, transparency composited onto white (an alpha channel, or a
    palette's or a colour's transparency), 16-bit greyscale scaled to 8 bits (also a 32-bit integer image
    whose values fit 16 bits). ValueError for a 32-bit integer image with values beyond 0-65535 or a
    floating-point one."""
    im = ImageOps.exif_transpose(im)
    if im.mode == "F":
        raise ValueError("a floating-point image (mode F) has no 8-bit reading; save it as 8- or 16-bit")
    sixteen = im.mode in SIXTEEN_BIT_MODES
    if im.mode == "I":  # 32-bit integers; older Pillow releases also open 16-bit PNGs so
        lo, hi = im.getextrema()
        if lo < 0 or hi > 65535:
            raise ValueError(f"a 32-bit integer image (mode I) with values {lo} to {hi}; save it as 8- or 16-bit")
        sixteen = hi > 255
    if sixteen:
        pixels = np.asarray(im).astype(np.uint32)  # 0-65535 -> 0-255, rounded (x / 257 is never a half)
        im = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))  # mode L
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        return Image.alpha_composite(Image.new("RGBA", im.size, WHITE), im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")

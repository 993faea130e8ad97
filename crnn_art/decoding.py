"""Robust image decoding: every real-world file either becomes an RGB painting or a counted skip.

WikiArt has truncated JPEGs, CMYK and grayscale scans, palette and RGBA PNGs, 16-bit TIFFs, EXIF
rotations and originals of 9,000 x 7,000 px. None of them may crash a 20-epoch run, trigger PIL's
decompression-bomb abort, or exhaust memory: large JPEGs are decoded at reduced scale (draft
mode) when the transform needs fewer pixels, and images beyond ``MAX_PIXELS`` that cannot be
reduced while decoding are skipped.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 300_000_000
"""Decoded size above which a non-JPEG is skipped (a 9,000 x 7,000 original is 63 MP; 300 MP RGB is 0.9 GB)."""


class DecodeError(ValueError):
    """This file cannot become a painting; the loader skips and counts it."""


def open_image(value: dict[str, Any] | Image.Image | str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        return Image.open(value)
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        return Image.open(io.BytesIO(data))
    if path:
        return Image.open(path)
    raise DecodeError("the image cell has neither bytes nor a path")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency over white, 16/32-bit rescaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        scale = 255.0 / (65535.0 if image.mode.startswith("I;16") or hi > 255 else max(hi, 1.0))
        image = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode_image(value: dict[str, Any] | Image.Image | str, min_side: int | None = None) -> Image.Image:
    """Decode to RGB, reduced at decode time when only ``min_side`` pixels are needed on the short side.

    Raises ``DecodeError`` (never anything else) for a file that cannot be used.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = open_image(value)
                w, h = image.size
                if min_side and image.format == "JPEG":
                    scale = min_side / min(w, h)
                    if scale < 1:
                        image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
                        w, h = image.size
                if w * h > MAX_PIXELS:
                    raise DecodeError(f"{w}x{h} pixels is more than the {MAX_PIXELS:,} crnn-art decodes")
                image.load()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for damaged files
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc

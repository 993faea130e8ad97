"""Robust image decoding: every real-world file either becomes an RGB painting or a counted skip.

WikiArt has truncated JPEGs, CMYK and grayscale scans, palette and RGBA PNGs, 16-bit TIFFs, EXIF
rotations and originals of 9,000 x 7,000 px. None of them may crash a 20-epoch run, trigger PIL's
decompression-bomb abort, or exhaust memory. One rule, for every command (train, evaluate,
predict, explain, outliers, prepare):

1. JPEGs are decoded at reduced scale (draft mode, down to 1/8) when the short side needed
   (``min_side``) is smaller;
2. an image still over ``MAX_PIXELS`` after that is skipped before any pixel is decoded;
3. right after decoding, the image is box-reduced by a whole factor so that its short side is less
   than twice ``min_side``, before colour conversion and before any transform.

Peak memory per image is therefore bounded by what PIL holds for at most ``MAX_PIXELS`` pixels
(4 bytes per pixel in the widest modes), one EXIF-rotated copy, and a float32 copy only of an
already reduced 16-bit image: under 1 GB at the limit, a few MB for a WikiArt original.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from crnn_art.errors import DecodeError

MAX_PIXELS = 100_000_000
"""Pixels above which an image (after JPEG draft reduction) is skipped: a 9,000 x 7,000 WikiArt original is 63 MP."""

REDUCIBLE = {"L", "LA", "RGB", "RGBA", "CMYK", "I", "F", "YCbCr", "PA"}
"""Modes PIL's ``Image.reduce`` accepts; others are converted first (16-bit to 32-bit ``I``, the rest to RGB)."""


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


def to_rgb(image: Image.Image, sixteen_bit: bool = False) -> Image.Image:
    """Any PIL mode to RGB: transparency over white, 16/32-bit rescaled rather than clipped
    (``sixteen_bit``: the values come from a 16-bit image already widened to ``I``)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 1.0
        scale = 255.0 / (65535.0 if sixteen_bit or image.mode.startswith("I;16") or hi > 255 else max(hi, 1.0))
        arr *= scale
        np.clip(arr, 0, 255, out=arr)
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def reduce_to(image: Image.Image, min_side: int | None) -> Image.Image:
    """Box-reduce by the largest whole factor that keeps the short side at least ``min_side`` (so it ends
    below ``2 * min_side``): the transforms then never see more pixels than they need."""
    factor = min(image.size) // min_side if min_side else 1
    if factor < 2:
        return image
    if image.mode not in REDUCIBLE:
        image = image.convert("I") if image.mode.startswith("I;16") else to_rgb(image)
    return image.reduce(factor)


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
                image = ImageOps.exif_transpose(image)
                sixteen_bit = image.mode.startswith("I;16")
                image = reduce_to(image, min_side)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        return to_rgb(image, sixteen_bit)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for damaged files
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc

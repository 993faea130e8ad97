"""Real-world odd image files, made on the fly: what WikiArt and users' folders actually contain."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def painting(side: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (side, side + 16, 3), dtype=np.uint8))


def odd_images(huge: bool = True) -> dict[str, tuple[bytes, bool]]:
    """name -> (file bytes, decodable?)."""
    base = painting()
    files: dict[str, tuple[bytes, bool]] = {}
    files["rgb.jpg"] = (_jpeg(base), True)
    full = _jpeg(painting(200, 1))
    files["truncated.jpg"] = (full[: len(full) // 3], False)
    files["garbage.jpg"] = (b"\x00\x01not an image at all" * 50, False)
    files["empty.jpg"] = (b"", False)
    files["cmyk.jpg"] = (_jpeg(base.convert("CMYK")), True)
    files["gray.jpg"] = (_jpeg(base.convert("L")), True)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files["palette_transparent.png"] = (_png(palette, transparency=0), True)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    files["rgba.png"] = (_png(rgba), True)
    sixteen = Image.fromarray((np.linspace(0, 65535, 64 * 80).reshape(64, 80)).astype(np.uint16))
    files["gray16.png"] = (_png(sixteen), True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    files["exif_rotated.jpg"] = (_jpeg(base, exif=exif.tobytes()), True)
    if huge:
        files["huge_9000x7000.jpg"] = (_jpeg(Image.new("RGB", (9000, 7000), (120, 80, 40))), True)
    return files

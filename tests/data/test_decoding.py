"""Every odd file decodes to RGB or is a DecodeError: never another exception, a bomb abort, or OOM."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crnn_art.data import decoding
from crnn_art.data.decoding import decode_image
from crnn_art.errors import DecodeError
from tests.standins.odd_images import odd_images

FILES = odd_images()


@pytest.mark.parametrize("name", sorted(FILES))
def test_odd_files_decode_or_raise_decode_error(name):
    data, ok = FILES[name]
    if ok:
        image = decode_image({"bytes": data, "path": None}, min_side=96)
        assert image.mode == "RGB" and min(image.size) >= 64
    else:
        with pytest.raises(DecodeError):
            decode_image({"bytes": data, "path": None}, min_side=96)


def test_huge_jpeg_is_decoded_reduced():
    image = decode_image({"bytes": FILES["huge_9000x7000.jpg"][0], "path": None}, min_side=416)
    assert 416 <= min(image.size) < 7000 // 4
    assert Image.MAX_IMAGE_PIXELS is not None  # the global bomb guard is restored


def test_exif_rotation_and_transparency_and_16_bit():
    rotated = decode_image({"bytes": FILES["exif_rotated.jpg"][0], "path": None})
    assert rotated.size == (64, 80)  # 80x64 stored, shown rotated
    rgba = np.asarray(decode_image({"bytes": FILES["rgba.png"][0], "path": None}), dtype=float)
    assert rgba.mean() > 127  # composited over white, not black
    gray16 = np.asarray(decode_image({"bytes": FILES["gray16.png"][0], "path": None}))
    assert gray16.min() < 10 and gray16.max() > 245  # rescaled, not clipped to white


def test_images_beyond_the_pixel_limit_are_skipped(monkeypatch):
    monkeypatch.setattr(decoding, "MAX_PIXELS", 1000)
    with pytest.raises(DecodeError, match="pixels"):
        decode_image({"bytes": FILES["gray16.png"][0], "path": None})


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (the pixel data is a tiny stub): how a bomb looks before decoding."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


@pytest.mark.parametrize("size", [(17_000, 17_000), (12_000, 9_000), (100_000, 1_100)])
def test_a_non_jpeg_over_the_pixel_limit_is_skipped_before_decoding(size):
    with pytest.raises(DecodeError, match=f"{size[0]}x{size[1]} pixels is more than the 100,000,000"):
        decode_image({"bytes": _png_header_claiming(*size), "path": None}, min_side=36)


def test_large_images_reach_the_transforms_reduced_whatever_their_mode():
    """Short side in [min_side, 2 * min_side): PIL's own bomb check inside a crop can never fire."""
    for mode, value in (("RGB", (10, 20, 30)), ("L", 7), ("P", 3), ("I;16", 40000), ("RGBA", (1, 2, 3, 4))):
        big = Image.new(mode, (3000, 2000), value)
        image = decode_image(big, min_side=96)
        assert image.mode == "RGB" and 96 <= min(image.size) < 192, (mode, image.size)
    sixteen = decode_image(Image.new("I;16", (3000, 2000), 65535), min_side=96)
    assert np.asarray(sixteen).min() == 255  # still rescaled from 16 bits after the reduction


def test_decoding_a_16_bit_original_stays_small_in_memory(tmp_path):
    """A 9,000 x 7,000 16-bit PNG (63 MP, the size of a large WikiArt original): peak memory of the decode."""
    import subprocess
    import sys

    path = tmp_path / "big16.png"
    Image.fromarray(np.zeros((7000, 9000), dtype=np.uint16)).save(path, compress_level=1)
    code = (f"import resource; from crnn_art.data.decoding import decode_image; "
            f"base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"image = decode_image({str(path)!r}, 36); "
            f"print(min(image.size), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    side, grown_mb = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert 36 <= side < 72
    # PIL's 16-bit buffer (126 MB) and its 32-bit widening (252 MB); the float64 copies it used to make took 1.5 GB
    assert grown_mb < 600, grown_mb

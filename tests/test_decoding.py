"""Every odd file decodes to RGB or is a DecodeError: never another exception, a bomb abort, or OOM."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crnn_art import decoding
from crnn_art.decoding import DecodeError, decode_image
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

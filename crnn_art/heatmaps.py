"""Where the model looked: the row x column attention map over a painting, as a picture.

The row branch gives a softmax over the ``h`` rows of the layer4 map, the column branch one over
the ``w`` columns; their outer product is an ``h x w`` map (it sums to 1), upsampled bilinearly over
the image and drawn as a heat overlay.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from crnn_art.data.transforms import eval_resize


def attention_map(row_attention: torch.Tensor, col_attention: torch.Tensor) -> torch.Tensor:
    """``(B, h)``, ``(B, w)`` -> ``(B, h, w)``, each map summing to 1."""
    return row_attention[:, :, None] * col_attention[:, None, :]


def overlay(image: Image.Image, amap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a heat map (any shape; upsampled to the image) over ``image``."""
    from matplotlib import colormaps

    t = torch.as_tensor(amap, dtype=torch.float32)[None, None]
    up = F.interpolate(t, size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0].numpy()
    span = up.max() - up.min()
    up = (up - up.min()) / span if span > 0 else np.zeros_like(up)
    heat = (colormaps["inferno"](up)[..., :3] * 255).astype(np.uint8)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + heat * alpha).astype(np.uint8))


def eval_view(image: Image.Image, image_size: int) -> Image.Image:
    """The part of the painting the model sees at evaluation (resize + centre crop), as an image."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(eval_resize(image_size)), v2.CenterCrop(image_size)])(image)


def side_by_side(view: Image.Image, amap: np.ndarray) -> Image.Image:
    """The painting as the model sees it | the attention overlay on it."""
    pair = Image.new("RGB", (view.width * 2, view.height))
    pair.paste(view, (0, 0))
    pair.paste(overlay(view, amap), (view.width, 0))
    return pair

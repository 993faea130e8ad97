"""Train and eval image transforms (SPEC §3), built from torchvision.transforms.v2.

Randomness comes from torch's global generator; the dataset seeds it per sample from the global
draw (see ``loaders.PaintingDataset``), so an image's augmentation does not depend on which
worker or process loads it, or on whether the run was resumed.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from crnn_art.config import AugmentConfig
from crnn_art.model import IMAGENET_MEAN, IMAGENET_STD

EVAL_RESIZE_RATIO = 416 / 384


def eval_resize(image_size: int) -> int:
    """Short side before the centre crop: 416 for 384, the same ratio for other sizes."""
    return int(round(image_size * EVAL_RESIZE_RATIO))


def train_transform(image_size: int, aug: AugmentConfig) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio), antialias=True),
        v2.RandomHorizontalFlip(aug.hflip),
        v2.ColorJitter(*aug.color_jitter),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomErasing(aug.erase_prob, scale=tuple(aug.erase_scale), ratio=tuple(aug.erase_ratio), value="random"),
    ])


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose([
        v2.Resize(eval_resize(image_size), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

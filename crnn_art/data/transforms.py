"""Train and eval image transforms (docs/model-and-recipe.md), built from torchvision.transforms.v2.

Randomness comes from torch's global generator; the dataset seeds it per sample from the global
draw (see ``loaders.PaintingDataset``), so an image's augmentation does not depend on which
worker or process loads it, or on whether the run was resumed.

With ``augment.on_device`` the recipe is cut in two: DataLoader workers only decode, crop and
flip, and hand over ``uint8`` tensors (a quarter of the bytes of float32); ``DeviceAugment``
does colour jitter, scaling, normalisation and random erasing on the batch where the model runs.
On a GPU that takes the most expensive per-pixel work off the CPU workers (see ``crnn-art bench``).
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from crnn_art.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The normalisation of torchvision's ImageNet weights, which every input gets (the model records it in config.json)."""

EVAL_RESIZE_RATIO = 416 / 384


def eval_resize(image_size: int) -> int:
    """Short side before the centre crop: 416 for 384, the same ratio for other sizes."""
    return int(round(image_size * EVAL_RESIZE_RATIO))


def decode_min_side(image_size: int, min_crop_scale: float) -> int:
    """The short side a training image is decoded to: enough for the evaluation resize and for the smallest
    random crop (``min_crop_scale`` of the area) at full resolution, and no more (see ``decoding``)."""
    return max(eval_resize(image_size), math.ceil(image_size / math.sqrt(min_crop_scale)))


Stats = tuple[float, float, float]


def train_transform(image_size: int, aug: AugmentConfig, mean: Stats = IMAGENET_MEAN,
                    std: Stats = IMAGENET_STD) -> v2.Compose:
    """Training augmentation; ``mean``/``std``: the backbone's input normalisation (ImageNet's by default)."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio), antialias=True),
        v2.RandomHorizontalFlip(aug.hflip),
        v2.ColorJitter(*aug.color_jitter),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        v2.RandomErasing(aug.erase_prob, scale=tuple(aug.erase_scale), ratio=tuple(aug.erase_ratio), value="random"),
    ])


def worker_transform(image_size: int, aug: AugmentConfig) -> v2.Compose:
    """The workers' share with ``augment.on_device``: crop and flip, as a ``uint8`` CHW tensor."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio), antialias=True),
        v2.RandomHorizontalFlip(aug.hflip),
        v2.ToImage(),
    ])


class DeviceAugment:
    """The rest of the train transform, on a ``uint8`` batch on the training device.

    The same torchvision v2 transforms as ``train_transform``, applied per sample (each painting
    gets its own jitter and erasing, as in the workers) and seeded per step, so a resumed run
    augments exactly as the uninterrupted one did.
    """

    def __init__(self, aug: AugmentConfig, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> None:
        self.jitter = v2.ColorJitter(*aug.color_jitter)
        self.erase = v2.RandomErasing(aug.erase_prob, scale=tuple(aug.erase_scale), ratio=tuple(aug.erase_ratio),
                                      value="random")
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            jittered = torch.stack([self.jitter(image) for image in images])
            x = jittered.float().div_(255)
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
            return torch.stack([self.erase(image) for image in x])


def eval_transform(image_size: int, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> v2.Compose:
    """Evaluation and inference: resize the short side, centre-crop, normalise with the model's ``mean``/``std``."""
    return v2.Compose([
        v2.Resize(eval_resize(image_size), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])

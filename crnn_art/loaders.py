"""From split rows to batches: image decoding, the per-sample dataset, and the two DataLoaders.

A training batch is ``{"image": (b, 3, S, S) float, "labels": (b, heads) int64 (-1 = unknown),
"row": (b,) int64}``; ``row`` is the row id in the source, carried so that evaluation can check
that every sample was counted once and outlier reports can name the painting.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from crnn_art.sampling import GlobalDrawBatchSampler
from crnn_art.sources import DataError


def decode_image(value: dict[str, Any] | Image.Image, min_side: int | None = None) -> Image.Image:
    """Decode a ``datasets`` image cell (bytes or path) to RGB.

    Large JPEGs are decoded at reduced scale (``draft``) when the transform needs at most
    ``min_side`` pixels on the short side: WikiArt originals are often 2,000-7,000 px wide and
    full decoding dominates the loader's time.
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        data, path = value.get("bytes"), value.get("path")
        image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
    if min_side and image.format == "JPEG":
        w, h = image.size
        scale = min_side / min(w, h)
        if scale < 1:
            image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


class PaintingDataset(Dataset):
    """Rows of one split of a source, with their task labels and a transform.

    Keys are split positions (``int``), or ``(position, seed)`` pairs from
    ``GlobalDrawBatchSampler``: the seed fixes the augmentation of that draw slot.
    """

    def __init__(self, hf_dataset, rows: np.ndarray, labels: np.ndarray, transform, min_side: int | None) -> None:
        from datasets import Image as ImageFeature

        self.images = hf_dataset.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.as_tensor(labels[self.rows], dtype=torch.int64)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        position, seed = key if isinstance(key, tuple) else (key, None)
        row = int(self.rows[position])
        try:
            image = decode_image(self.images[row]["image"], self.min_side)
        except Exception as exc:  # noqa: BLE001 - any decoder failure names the row
            raise DataError(
                f"row {row}: cannot decode its image ({type(exc).__name__}: {exc}); "
                "fix or remove that file in the source"
            ) from exc
        if seed is None:
            tensor = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                tensor = self.transform(image)
        return {"image": tensor, "labels": self.labels[position], "row": row}


def train_loader(dataset: PaintingDataset, sampler: GlobalDrawBatchSampler, num_workers: int) -> DataLoader:
    """Not passed through ``accelerator.prepare``: the sampler already gives each process its share."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def eval_loader(dataset: PaintingDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Sequential, no drop: meant for ``accelerator.prepare`` + ``gather_for_metrics``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )

"""From split rows to batches: image decoding, the per-sample dataset, and the two DataLoaders.

A training batch is ``{"image": (b, 3, S, S) float, "labels": (b, heads) int64 (-1 = unknown),
"row": (b,) int64, "skipped": () int64, "failed": [(row, path, reason)]}``; ``row`` is the row id
in the source, carried so that evaluation can check that every sample was counted once and outlier
reports can name the painting; ``failed`` names the files of the batch that could not be decoded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from crnn_art.data.decoding import decode_image
from crnn_art.data.sampling import GlobalDrawBatchSampler
from crnn_art.errors import DecodeError


class PaintingDataset(Dataset):
    """Rows of one split of a source, with their task labels and a transform.

    Keys are split positions (``int``), or ``(position, seed)`` pairs from
    ``GlobalDrawBatchSampler``: the seed fixes the augmentation of that draw slot.
    """

    def __init__(self, hf_dataset, rows: np.ndarray, labels: np.ndarray, transform, min_side: int | None,
                 image_index: np.ndarray | None = None) -> None:
        from datasets import Image as ImageFeature

        self.images = hf_dataset.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
        self.rows = np.asarray(rows, dtype=np.int64)
        self.image_index = self.rows if image_index is None else np.asarray(image_index, dtype=np.int64)
        """Where each row's image is in ``hf_dataset``: the row id itself, or a position in a split copy."""
        self.labels = torch.as_tensor(labels[self.rows], dtype=torch.int64)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.rows)

    def paths(self) -> list[str]:
        """Each position's image path as the source records it ('' where it holds only bytes), read from the
        path column alone: no image is loaded."""
        names = self.images.flatten()["image.path"]
        return [names[int(i)] or "" for i in self.image_index]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """One sample; a file that cannot be decoded gives ``skipped=True`` and a blank image.

        The training collate drops skipped samples; evaluation keeps them with every label set
        to -1, so batches keep their shape across processes and no metric counts them.
        """
        position, seed = key if isinstance(key, tuple) else (key, None)
        cell = self.images[int(self.image_index[position])]["image"]
        return load_sample(cell, self.labels[position], int(self.rows[position]), self.transform, self.min_side, seed)


def blank_image(transform, side: int):
    """A black ``side`` x ``side`` image through ``transform``, without touching torch's random state: what an
    undecodable file becomes, so a batch of them still has the shape the model takes (a ViT needs its size)."""
    from PIL import Image

    with torch.random.fork_rng(devices=[]):
        return transform(Image.new("RGB", (side, side)))


def load_sample(cell: dict[str, Any], labels: torch.Tensor, row: int, transform, min_side: int | None,
                seed: int | None) -> dict[str, Any]:
    """Decode one image cell (``{"bytes", "path"}``) and transform it, with torch's generator set to
    ``seed`` if given; an undecodable file gives ``skipped=True``, a blank image and every label -1."""
    try:
        image = decode_image(cell, min_side)
    except DecodeError as exc:
        path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
        return {"image": blank_image(transform, min_side or 64), "labels": torch.full_like(labels, -1), "row": row,
                "skipped": True, "failed": (row, str(path or ""), str(exc))}
    if seed is None:
        tensor = transform(image)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tensor = transform(image)
    return {"image": tensor, "labels": labels, "row": row, "skipped": False}


def collate(samples: list[dict[str, Any]], keep_skipped: bool) -> dict[str, Any]:
    """Stack samples; ``skipped`` counts undecodable ones (dropped, or kept as unlabelled blanks) and
    ``failed`` lists them."""
    good = [s for s in samples if not s["skipped"]]
    kept = samples if keep_skipped else good
    images = [s["image"] for s in kept]
    return {
        "image": torch.stack(images) if images else torch.zeros(0, 3, 1, 1),
        "labels": torch.stack([s["labels"] for s in kept]) if kept else torch.zeros(0, 1, dtype=torch.int64),
        "row": torch.tensor([s["row"] for s in kept], dtype=torch.int64),
        "skipped": torch.tensor(len(samples) - len(good)),
        "failed": [s["failed"] for s in samples if s["skipped"]],
    }


def ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the training process, which finishes the step and checkpoints."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


WORKER_TIMEOUT = 120
"""Seconds to wait for one batch from DataLoader workers before the run fails with an error. A worker
can stay alive yet never deliver (its shared-memory segment could not be allocated): without a limit
the training process would wait forever, deaf to SIGTERM. One batch of a few dozen images takes
well under a second; a streamed batch that waits on the network a few seconds."""


def worker_options(num_workers: int) -> dict[str, Any]:
    """What every crnn-art DataLoader sets for its workers: how many, the delivery timeout (a worker that stays
    alive but never delivers fails the run instead of hanging it), stop signals left to the training process,
    and pinned memory on GPUs."""
    return {"num_workers": num_workers, "timeout": WORKER_TIMEOUT if num_workers > 0 else 0,
            "worker_init_fn": ignore_stop_signals, "pin_memory": torch.cuda.is_available()}


def train_loader(dataset: PaintingDataset, sampler: GlobalDrawBatchSampler, num_workers: int) -> DataLoader:
    """Not passed through ``accelerator.prepare``: the sampler already gives each process its share."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, keep_skipped=False),
        persistent_workers=num_workers > 0,  # the batch sampler runs in this process: set_epoch still applies
        **worker_options(num_workers),
    )


class DrawnBatches:
    """Micro-batches of one epoch of the class-balanced global draw (map-style sources)."""

    def __init__(self, dataset: PaintingDataset, sampler: GlobalDrawBatchSampler, num_workers: int) -> None:
        self.sampler = sampler
        self.loader = train_loader(dataset, sampler, num_workers)

    def steps(self, epoch: int) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0, legs: list[dict] | None = None) -> Iterator[dict[str, Any]]:
        """The rest of ``epoch``: the global draw does not depend on the processes, so ``legs`` (which a stream
        needs) play no part."""
        self.sampler.set_epoch(epoch, start_batch)
        return iter(self.loader)


def eval_loader(dataset: PaintingDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Sequential, no drop: meant for ``accelerator.prepare`` + ``gather_for_metrics``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        collate_fn=functools.partial(collate, keep_skipped=True),
        **worker_options(num_workers),
    )

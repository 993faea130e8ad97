"""Class-balanced sampling that stays correct on any number of processes.

PyTorch has no distributed weighted sampler, and the generator Accelerate gives a prepared
sampler is not checkpointed by Accelerate. So the draw is ours: one global draw per epoch from
``(seed, epoch)`` alone, identical on every process; global batch ``k`` is the slice
``[k*B, (k+1)*B)`` and process ``r`` takes its ``r``-th share of it. Every process runs the same
number of batches, the union of the shares is exactly the global draw, and a run can restart at
any batch position.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-row weight: 1/count of its class; with several heads, the mean over its known heads."""
    weights = np.zeros(len(labels), dtype=np.float64)
    known = np.zeros(len(labels), dtype=np.float64)
    for h in range(labels.shape[1]):
        col = labels[:, h]
        mask = col >= 0
        counts = np.bincount(col[mask])
        weights[mask] += 1.0 / counts[col[mask]]
        known += mask
    return np.where(known > 0, weights / np.maximum(known, 1), 0.0)


def local_batch_size(global_batch: int, world_size: int, accum: int) -> int:
    """Each process's share of a global batch; it must split into ``accum`` equal micro-batches."""
    micro = global_batch // (world_size * accum)
    if global_batch % (world_size * accum) or micro < 2 or micro % 2:
        raise ValueError(
            f"train.batch_size={global_batch} does not split into even micro-batches of at least 2 images over "
            f"{world_size} process(es) x {accum} accumulation step(s) (MixUp/CutMix pair images; BatchNorm needs 2); "
            f"use a multiple of {2 * world_size * accum}"
        )
    return global_batch // world_size


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a few integers (seed, epoch, position...), stable across platforms."""
    x = 0x243F6A8885A308D3
    for p in parts:
        x = ((x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


class GlobalDrawBatchSampler:
    """Yields this process's share of each global batch as ``(position, augmentation_seed)`` pairs,
    in ``accum`` consecutive micro-batches when gradients are accumulated.

    ``position`` indexes the training split; the augmentation seed is a function of
    ``(seed, epoch, slot in the global draw)``, so a sample is augmented the same way whichever
    process or worker loads it.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        weights: np.ndarray | None = None,
        accum: int = 1,
    ) -> None:
        local_batch_size(global_batch, world_size, accum)
        if num_samples < global_batch:
            raise ValueError(
                f"the training split has {num_samples} samples, fewer than one global batch of {global_batch}; "
                "lower train.batch_size or use more data"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.accum = accum
        self.micro_batch = self.local_batch // accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 1
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        """Micro-batches this process will yield for the rest of the epoch."""
        return (self.batches_per_epoch - self.start_batch) * self.accum

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def global_draw(self) -> torch.Tensor:
        """The epoch's whole draw (positions), the same on every process."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        n = self.batches_per_epoch * self.global_batch
        if self.weights is None:
            return torch.randperm(self.num_samples, generator=gen)[:n]
        return torch.multinomial(self.weights, n, replacement=True, generator=gen)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        draw = self.global_draw().tolist()
        for k in range(self.start_batch, self.batches_per_epoch):
            share = k * self.global_batch + self.rank * self.local_batch
            for m in range(self.accum):
                lo = share + m * self.micro_batch
                slots = range(lo, lo + self.micro_batch)
                yield [(draw[slot], mix_seed(self.seed, self.epoch, slot)) for slot in slots]

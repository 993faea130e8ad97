"""Who reads which rows of a streamed epoch: an exact partition over processes and DataLoader workers that
survives a restart on another number of processes. Pure numpy, no I/O.

An epoch's **order** is a function of ``(seed, epoch)`` alone: the row groups (shards) in a seeded
permutation, their wanted rows concatenated. Nothing in it depends on the number of processes.

A **leg** is a stretch of the epoch run on one set of processes. At its start the rows not yet trained
(in epoch order) are cut into ``world`` contiguous ranges of equal size (±1 row), and each process's range
into one contiguous sub-range per DataLoader worker: every process and worker reads its own consecutive row
groups, with at most a partial row group at each end. Each worker then shuffles its sub-range within
consecutive **blocks** of ``data.shuffle_buffer`` rows (MosaicML ``streaming``'s "py1b" shuffle, applied after
the cut so that it never scatters a worker's reads), seeded by ``(seed, epoch, leg, rank, worker)``. Step
``k`` takes ``B / world`` rows from each range (``B`` the global batch), so all ``T // B`` full steps of an
epoch are equal on every process whatever the world size (``floor(floor(T / W) / b) = floor(T / B)``), and
the ``T mod B`` rows left (fewer than one global batch) make one last, smaller step: every wanted row is
trained exactly once per epoch.

A run resumed on the same processes and workers continues its leg; one resumed on another number starts a
new leg over exactly the rows the earlier legs did not consume (which a checkpoint's ``(world, workers,
start)`` per leg determine), so no row is trained twice and none is skipped, and the epoch keeps its number
of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from crnn_art.data.sampling import mix_seed


def epoch_order(piece_rows: list[np.ndarray], seed: int, epoch: int) -> np.ndarray:
    """The epoch's wanted row ids in shard order: the shards in a seeded permutation, each in file order.

    ``piece_rows[i]`` holds the wanted row ids of shard ``i`` in file order.
    """
    rng = np.random.default_rng(mix_seed(seed, 0x0DE7, epoch))
    perm = rng.permutation(len(piece_rows))
    rows = np.concatenate([piece_rows[i] for i in perm]) if len(piece_rows) else np.zeros(0, dtype=np.int64)
    return rows.astype(np.int64)


def shuffle_blocks(positions: np.ndarray, block: int, seed: int) -> np.ndarray:
    """``positions`` shuffled within consecutive blocks of ``block``: block ``j`` of the result holds exactly the
    positions ``[j * block, (j + 1) * block)`` of the input, so a reader holds one block's shards at a time."""
    rng = np.random.default_rng(seed)
    keys = np.arange(len(positions)) // block + rng.random(len(positions))
    return positions[np.argsort(keys, kind="stable")]


def steps_per_epoch(total: int, global_batch: int) -> int:
    """``T // B`` full steps plus one smaller step for the ``T mod B`` rows left, whatever the world size."""
    return math.ceil(total / global_batch)


@dataclass(frozen=True)
class Leg:
    """A stretch of an epoch on one set of processes, as recorded in the checkpoint (``TrainState.stream_legs``)."""

    world: int
    workers: tuple[int, ...]
    """DataLoader workers of each process (1 when it loads in the main process)."""
    start: int
    """The epoch's batch at which the leg began."""

    @classmethod
    def from_dict(cls, d: dict) -> Leg:
        return cls(int(d["world"]), tuple(int(w) for w in d["workers"]), int(d["start"]))

    def to_dict(self) -> dict:
        return {"world": self.world, "workers": list(self.workers), "start": self.start}


def _worker_used(consumed: int, workers: int) -> list[int]:
    """Items each worker's sub-range has given after ``consumed`` items of the round-robin interleave that a
    ``DataLoader`` makes of its workers (``in_order``): worker ``w`` gives items ``w, w + W, ...``."""
    return [consumed // workers + (w < consumed % workers) for w in range(workers)]


def leg_ranges(positions: np.ndarray, leg: Leg) -> list[list[np.ndarray]]:
    """``positions`` (epoch-order positions not yet consumed, ascending) cut into each process's range and each
    range into its workers' contiguous sub-ranges: ``[rank][worker] -> positions``."""
    return [np.array_split(part, leg.workers[r]) for r, part in enumerate(np.array_split(positions, leg.world))]


def worker_sequences(positions: np.ndarray, leg: Leg, index: int, epoch: int, seed: int,
                     block: int) -> list[list[np.ndarray]]:
    """What each worker of leg number ``index`` reads, in reading order: its sub-range shuffled within blocks."""
    return [[shuffle_blocks(sub, block, mix_seed(seed, epoch, index, rank, w)) for w, sub in enumerate(subs)]
            for rank, subs in enumerate(leg_ranges(positions, leg))]


def remaining(total: int, legs: list[Leg], upto: int, global_batch: int, epoch: int, seed: int,
              block: int) -> np.ndarray:
    """Epoch-order positions not consumed after the legs ran up to batch ``upto`` (full steps only), ascending."""
    rest = np.arange(total)
    for i, leg in enumerate(legs):
        end = legs[i + 1].start if i + 1 < len(legs) else upto
        consumed = (end - leg.start) * (global_batch // leg.world)
        kept = [seq[used:] for seqs in worker_sequences(rest, leg, i, epoch, seed, block)
                for seq, used in zip(seqs, _worker_used(consumed, len(seqs)), strict=True)]
        rest = np.sort(np.concatenate(kept)) if kept else rest[:0]
    return rest


@dataclass
class ProcessShare:
    """One process's part of the rest of an epoch: what each of its workers reads, and the micro-batch sizes."""

    worker_positions: list[np.ndarray]
    """Per logical worker: the epoch-order positions it still reads, in reading order (one block of its
    sub-range at a time)."""
    worker_blocks: list[np.ndarray]
    """Per logical worker: the shuffle block of each of those positions (what a reader holds at once)."""
    rotation: int
    """DataLoader worker ``i`` serves logical worker ``(i + rotation) % W``: a resumed leg continues the interleave
    where it stopped."""
    micro_batches: list[int]
    """Samples of each micro-batch this process takes in the rest of the epoch (the last step's may be smaller,
    even 0)."""


def process_share(total: int, legs: list[Leg], start_batch: int, global_batch: int, accum: int, rank: int,
                  epoch: int, seed: int, block: int) -> ProcessShare:
    """What ``rank`` reads from batch ``start_batch`` of the epoch to its end, in the last leg of ``legs``."""
    return epoch_shares(total, legs, start_batch, global_batch, accum, epoch, seed, block)[rank]


def epoch_shares(total: int, legs: list[Leg], start_batch: int, global_batch: int, accum: int, epoch: int,
                 seed: int, block: int) -> list[ProcessShare]:
    """Every process's ``ProcessShare`` of the rest of the epoch (one cut of the remaining rows for all of them)."""
    leg = legs[-1]
    local = global_batch // leg.world
    consumed = (start_batch - leg.start) * local
    full = total // global_batch
    rest = remaining(total, legs[:-1], leg.start, global_batch, epoch, seed, block)
    shares = []
    for seqs in worker_sequences(rest, leg, len(legs) - 1, epoch, seed, block):
        sizes = [local // accum] * (accum * (full - start_batch))
        leftover = sum(len(s) for s in seqs) - (full - leg.start) * local
        if total % global_batch:
            sizes += [len(part) for part in np.array_split(np.arange(leftover), accum)]
        used = _worker_used(consumed, len(seqs))
        shares.append(ProcessShare([seq[u:] for seq, u in zip(seqs, used, strict=True)],
                                   [(np.arange(len(seq)) // block)[u:] for seq, u in zip(seqs, used, strict=True)],
                                   consumed % len(seqs), sizes))
    return shares


def hub_like_layout(rows: int = 81_444, files: int = 72, row_group: int = 100, train_share: float = 0.7,
                    seed: int = 0) -> list[np.ndarray]:
    """The wanted rows per shard of a layout shaped like ``huggan/wikiart``: ``rows`` in ``files`` equal parquet files,
    row groups of ``row_group`` rows (what ``datasets`` writes for images), a random ``train_share`` wanted."""
    wanted = np.random.default_rng(seed).random(rows) < train_share
    shards = []
    for file_rows in np.array_split(np.arange(rows), files):
        for start in range(0, len(file_rows), row_group):
            group = file_rows[start:start + row_group]
            shards.append(group[wanted[group]])
    return shards


def planning_figures(piece_rows: list[np.ndarray], world: int, local_batch: int, epochs: int,
                     block: int, seed: int = 0) -> dict[str, float]:
    """Plan every epoch of every process (the orders and each process's share, no I/O) and check the partition:
    rows trained per epoch (share of the wanted rows), rows trained twice, steps, and the seconds it took."""
    import time

    wanted = sum(len(p) for p in piece_rows)
    t0 = time.perf_counter()
    trained = twice = 0
    for epoch in range(1, epochs + 1):
        order = epoch_order(piece_rows, seed, epoch)
        shares = epoch_shares(wanted, [Leg(world, (1,) * world, 0)], 0, world * local_batch, 1, epoch, seed, block)
        seen = np.concatenate([order[s.worker_positions[0]] for s in shares])
        trained += sum(sum(s.micro_batches) for s in shares)
        twice += len(seen) - len(np.unique(seen))
    seconds = time.perf_counter() - t0
    return {"rows": wanted, "used": trained / (epochs * wanted), "twice": twice, "seconds": seconds,
            "steps": steps_per_epoch(wanted, world * local_batch)}

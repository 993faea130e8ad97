"""The data a run trains and evaluates on, built from its source: labels, split, validation set and this
process's training batches, map-style or streamed alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crnn_art.config import RunConfig, config_text
from crnn_art.data.loaders import DrawnBatches, PaintingDataset
from crnn_art.data.sampling import GlobalDrawBatchSampler, balanced_weights, local_batch_size
from crnn_art.data.sources import (
    TaskLabels,
    check_overrides_unchanged,
    make_splits,
    open_source,
    read_splits,
    split_keys,
    task_labels,
    write_splits,
)
from crnn_art.data.streaming import balanced_class_weights, materialize_split, streamed_batches
from crnn_art.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceAugment,
    Stats,
    decode_min_side,
    eval_resize,
    eval_transform,
    train_transform,
    worker_transform,
)
from crnn_art.errors import DataError
from crnn_art.runs import atomic_write_text

STREAMED = "streamed"
"""The folder of a streamed run where the splits it evaluates are kept after one read of the stream."""



def split_dataset(opened, rows: np.ndarray, labels: np.ndarray, transform, min_side: int | None,
                  cache_dir: str | Path, name: str, console=None) -> PaintingDataset:
    """The rows of one split of an opened source, for evaluation (or map-style training).

    A streamed source has no random access: the split's images are streamed once into
    ``cache_dir`` (see ``streaming.materialize_split``) and read from there.
    """
    if opened.stream is None:
        return PaintingDataset(opened.dataset, rows, labels, transform, min_side)
    images = materialize_split(opened.stream, rows, cache_dir, name, console)
    return PaintingDataset(images, rows, labels, transform, min_side, image_index=np.searchsorted(np.sort(rows), rows))


@dataclass
class TrainData:
    """Everything a run trains and validates on, built once before the model (``build_train_data``)."""

    labels: TaskLabels
    splits: dict[str, np.ndarray]
    val_set: PaintingDataset
    train_batches: Any
    """``loaders.DrawnBatches`` or ``streaming.StreamedBatches``: ``steps(epoch)`` and ``epoch(epoch, start_batch)``."""
    device_augment: DeviceAugment | None
    class_weights: dict[str, torch.Tensor] | None
    local_batch: int
    total_steps: int
    notes: list[str]
    """What the start-up lines say about the data (source notes, streaming plan)."""


def build_train_data(cfg: RunConfig, accelerator, out: Path, write_run_files: bool, workers: int,
                     console=None, normalization: tuple[Stats, Stats] = (IMAGENET_MEAN, IMAGENET_STD)) -> TrainData:
    """Source -> task labels -> split (written to ``config.yaml``/``split.json`` unless ``write_run_files`` is
    false: a resume writes nothing before its checkpoint loads) -> transforms -> validation set -> this
    process's training batches. ``normalization``: the backbone's input mean and std. Raises ``DataError`` for data
    the run cannot use."""
    t, size = cfg.train, cfg.data.image_size
    resuming = not write_run_files and (out / "split.json").is_file()
    if resuming:  # a resume reads the labels it was trained on
        check_overrides_unchanged(out, cfg.data)
    with accelerator.local_main_process_first():  # one process per machine generates/downloads first
        opened = open_source(cfg.data)
    labels = task_labels(opened.dataset, cfg.heads, cfg.data)
    splits = make_splits(len(opened.dataset), cfg.data, labels.known_rows(), opened.splits,
                         split_keys(opened.dataset, cfg.data))
    if resuming:
        _same_splits_as_saved(splits, out)
    if accelerator.is_main_process and write_run_files:
        atomic_write_text(out / "config.yaml", config_text(cfg), "the run's config")
        write_splits(splits, out / "split.json", cfg.data)
    on_device = cfg.augment.on_device if cfg.augment.on_device is not None else accelerator.device.type == "cuda"
    augment = worker_transform(size, cfg.augment) if on_device else train_transform(size, cfg.augment, *normalization)
    with accelerator.local_main_process_first():  # streamed: validation is read from the stream once
        val_set = split_dataset(opened, splits["validation"], labels.labels, eval_transform(size, *normalization),
                                eval_resize(size), out / STREAMED, "validation", console)
    notes = [opened.note] if opened.note else []
    batches, weights, local_batch = _train_batches(cfg, accelerator, opened, splits, labels, augment, workers, notes)
    total_steps = sum(batches.steps(e) for e in range(1, t.epochs + 1))
    device_augment = DeviceAugment(cfg.augment, *normalization) if on_device else None
    return TrainData(labels, splits, val_set, batches, device_augment, weights, local_batch, total_steps, notes)


def _same_splits_as_saved(splits: dict[str, np.ndarray], out: Path) -> None:
    """A resume trains on the rows the run was started with: splits computed again from changed data (a
    ``data.duplicates`` or source written again) raise ``DataError`` (one line) instead of moving rows between
    train and test mid-run."""
    saved = read_splits(out / "split.json")
    moved = [name for name in saved if not np.array_equal(np.sort(saved[name]), np.sort(splits[name]))]
    if moved:
        raise DataError(f"the data now gives other {', '.join(moved)} rows than {out / 'split.json'} records (was "
                        "data.duplicates or the source written again?); restore it, or start a new run")


def _train_batches(cfg: RunConfig, accelerator, opened, splits, labels: TaskLabels, augment, workers: int,
                   notes: list[str]):
    """This process's training batches: the class-balanced global draw (map-style sources) or its share of the
    stream, with class weights in the loss instead when a stream cannot be drawn by weight."""
    t, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    train_side = decode_min_side(cfg.data.image_size, cfg.augment.crop_scale[0])
    try:
        local_batch = local_batch_size(t.batch_size, world, t.grad_accum_steps)
        if opened.stream is None:
            weights = balanced_weights(labels.labels[splits["train"]]) if t.balanced_sampling else None
            sampler = GlobalDrawBatchSampler(len(splits["train"]), t.batch_size, rank, world, t.seed, weights,
                                             accum=t.grad_accum_steps)
            train_set = PaintingDataset(opened.dataset, splits["train"], labels.labels, augment, train_side)
            return DrawnBatches(train_set, sampler, workers), None, local_batch
        batches = streamed_batches(opened.stream, splits["train"], labels.labels, augment, train_side, cfg,
                                   accelerator, workers)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    class_weights = None
    if t.balanced_sampling:  # a stream cannot be drawn by weight: balance the loss instead
        class_weights = {h: w.to(accelerator.device) for h, w in
                         balanced_class_weights(labels.labels[splits["train"]], labels.num_classes).items()}
    full, left = divmod(len(splits["train"]), t.batch_size)
    notes.append(f"streaming {len(opened.stream.pieces)} shards in shuffle blocks of {cfg.data.shuffle_buffer} rows; "
                 f"every training row once per epoch: {full} steps of {t.batch_size}"
                 + (f" and one of the {left} rows left" if left else "") + " on every process"
                 + ("; classes balanced by loss weights" if class_weights else ""))
    return batches, class_weights, local_batch

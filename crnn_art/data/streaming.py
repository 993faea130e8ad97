"""Streaming a parquet source (``huggan/wikiart`` on the Hub, or local parquet files) without caching it.

Everything but the image bytes is settled before the first image is read. The label columns of
every file are read alone (a few MB for WikiArt, no image bytes), which gives each row its id:
its position in the concatenation of the files, exactly the row id of the cached dataset. So
``make_splits`` hashes the same ids streamed or cached and puts every row in the same split, and
the class names, class counts and epoch length are known up front.

Shards are the files' parquet row groups (about 100 rows each in files written by ``datasets``), not whole
files: ``datasets``' ``split_dataset_by_node`` deals whole shards to processes, which left 14-21 % of the
rows unread per epoch at 64 processes on WikiArt's layout; MosaicML ``streaming`` partitions exactly but
needs its own shard format (a converted copy of the dataset). So the partition is ours (``partition``):
every training row exactly once per epoch, on any number of processes, each reading its own consecutive
row groups, resumable on another number of processes.

A stream cannot be drawn by weight, so class balance comes from the loss instead: each class is
weighted ``N / (K * count)`` over the training split (scikit-learn's "balanced" weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from crnn_art.config import DataConfig, RunConfig
from crnn_art.data.partition import Leg, ProcessShare, epoch_order, process_share, steps_per_epoch
from crnn_art.data.sampling import mix_seed
from crnn_art.data.schema import check_schema
from crnn_art.errors import CheckpointError, DataError

LABEL_COLUMNS = ("artist", "genre", "style")


@dataclass(frozen=True)
class Piece:
    """One shard of the stream: a row group of one parquet file."""

    file: str
    row_group: int
    first_row: int
    """Row id of its first row (its position in the concatenation of all files)."""
    num_rows: int


@dataclass
class StreamSource:
    """A parquet source opened for streaming: its shards, and every row's labels (no images)."""

    pieces: list[Piece]
    labels: Any
    """A ``datasets.Dataset`` of the label columns alone, one row per row id: what ``task_labels`` reads."""

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def mask(self, rows: np.ndarray) -> np.ndarray:
        """A boolean per row id: True for ``rows`` (what the stream should yield)."""
        wanted = np.zeros(self.num_rows, dtype=bool)
        wanted[rows] = True
        return wanted


def parquet_files(cfg: DataConfig) -> list[str]:
    """The source's data files in the order ``load_dataset`` reads them (so row ids match the cache).

    Resolved by ``datasets`` itself: a Hub id at ``data.revision`` (``hf://`` paths), a folder in
    the Hub's layout, or parquet file(s).
    """
    import datasets

    source = cfg.source
    try:
        if source.endswith(".parquet"):
            if not os.path.isfile(source):
                raise DataError(f"data.source {source!r} does not exist")
            builder = datasets.load_dataset_builder("parquet", data_files=source)
        else:
            builder = datasets.load_dataset_builder(source, revision=cfg.revision)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot open data.source {source!r} for streaming ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); check the dataset id, data.revision and "
            "network, or set data.streaming=false"
        ) from exc
    files = [str(f) for f in (builder.config.data_files or {}).get("train", [])]
    if not files or not all(f.endswith(".parquet") for f in files):
        raise DataError(
            f"data.source {source!r} has no parquet train files to stream (found {files[:3]}); "
            "streaming reads parquet (the Hub's layout): set data.streaming=false for other sources"
        )
    return files


def _open(path: str):
    """A file object for a local path or an ``hf://`` URL (fsspec; huggingface_hub registers ``hf``)."""
    import fsspec

    if path.startswith("hf://"):
        import huggingface_hub  # noqa: F401  (registers the hf:// filesystem)
    return fsspec.open(path, "rb").open()


def open_stream_source(cfg: DataConfig) -> StreamSource:
    """Read every file's footer and label columns: the shards, row ids and labels of the stream."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetInfo, Features

    files = parquet_files(cfg)
    pieces: list[Piece] = []
    tables = []
    features = None
    offset = 0
    for path in files:
        with _open(path) as fh:
            pf = pq.ParquetFile(fh)
            if features is None:
                features = Features.from_arrow_schema(pf.schema_arrow)
                check_schema(SimpleNamespace(column_names=list(features), features=features), cfg.source)
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if n:
                    pieces.append(Piece(path, g, offset, n))
                offset += n
            tables.append(pf.read(columns=list(LABEL_COLUMNS)))
    label_features = Features({c: features[c] for c in LABEL_COLUMNS})
    table = pa.concat_tables(tables).cast(label_features.arrow_schema)
    return StreamSource(pieces, Dataset(table, info=DatasetInfo(features=label_features)))


def balanced_class_weights(labels: np.ndarray, num_classes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per head, ``N / (K * count)`` for each class over ``labels`` (classes absent from it weigh 1)."""
    weights = {}
    for h, (head, k) in enumerate(num_classes.items()):
        col = labels[:, h]
        counts = np.bincount(col[col >= 0], minlength=k).astype(np.float64)
        n = counts.sum()
        weights[head] = torch.as_tensor(np.where(counts > 0, n / (k * np.maximum(counts, 1)), 1.0),
                                        dtype=torch.float32)
    return weights


def read_rows(pieces: list[Piece], rows: np.ndarray, blocks: np.ndarray) -> Iterator[dict[str, Any]]:
    """``rows`` in the given order, read one shuffle block at a time: each shard the block needs is read once
    (kept for the next block when it spans both) and only the block's image bytes are held."""
    import pyarrow.parquet as pq

    starts = np.array([p.first_row for p in pieces], dtype=np.int64)
    cache: dict[int, Any] = {}
    for chunk in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(blocks)) + 1):
        chunk_rows = rows[chunk]
        owners = np.searchsorted(starts, chunk_rows, side="right") - 1
        needed = set(owners.tolist())
        cache = {i: column for i, column in cache.items() if i in needed}
        for i in sorted(needed - cache.keys()):
            with _open(pieces[i].file) as fh:
                cache[i] = pq.ParquetFile(fh).read_row_group(pieces[i].row_group, columns=["image"]).column("image")
        for row, i in zip(chunk_rows.tolist(), owners.tolist(), strict=True):
            image = cache[i][row - pieces[i].first_row].as_py()
            yield {"row": row, "bytes": image.get("bytes"), "path": image.get("path")}


class StreamingPaintings(torch.utils.data.IterableDataset):
    """Decoded, augmented samples of this process's share of an epoch, in the shape ``PaintingDataset`` gives.

    Each DataLoader worker reads its own contiguous sub-range (``partition.ProcessShare``); the DataLoader
    interleaves them in turn. The augmentation seed of a sample is a function of ``(seed, epoch, row)``, so a
    row is augmented the same way whichever process, worker or leg reads it.
    """

    def __init__(self, pieces: list[Piece], labels: np.ndarray, transform, min_side: int | None, seed: int) -> None:
        super().__init__()
        self.pieces = pieces
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform
        self.min_side = min_side
        self.seed = seed
        self.epoch = 1
        self.order = np.zeros(0, dtype=np.int64)
        self.share = ProcessShare([np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)], 0, [])

    def begin(self, epoch: int, order: np.ndarray, share: ProcessShare) -> None:
        """What the next DataLoader over this dataset reads (set before it starts its workers)."""
        self.epoch, self.order, self.share = epoch, order, share

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from crnn_art.data.loaders import load_sample

        info = torch.utils.data.get_worker_info()
        workers = len(self.share.worker_positions)
        logical = ((info.id if info is not None else 0) + self.share.rotation) % workers
        positions = self.share.worker_positions[logical]
        for record in read_rows(self.pieces, self.order[positions], self.share.worker_blocks[logical]):
            row = record["row"]
            yield load_sample({"bytes": record["bytes"], "path": record["path"]}, self.labels[row], row,
                              self.transform, self.min_side, mix_seed(self.seed, self.epoch, row))


def _identity(sample: Any) -> Any:
    return sample


def padding_sample(transform, image_size: int, heads: int) -> dict[str, Any]:
    """What fills a micro-batch of the epoch's last, smaller step that has no decoded image at all: a black image
    with every label unknown and row -1 (no loss, no count; the step keeps BatchNorm's statistics from it)."""
    from crnn_art.data.loaders import blank_image

    return {"image": blank_image(transform, image_size), "labels": torch.full((heads,), -1, dtype=torch.int64),
            "row": -1, "skipped": False}


class StreamedBatches:
    """Micro-batches of one epoch of the stream: ``T // B`` full steps, then one step of the ``T mod B`` rows
    left (see ``partition``), on any number of processes, resumable at any step on any number of processes.

    Samples come one by one from the DataLoader (its workers decode and augment) and are grouped here.
    """

    def __init__(self, dataset: StreamingPaintings, piece_rows: list[np.ndarray], cfg: RunConfig, rank: int,
                 world: int, workers: int, all_workers: list[int], pad: dict[str, Any]) -> None:
        self.dataset, self.piece_rows, self.pad = dataset, piece_rows, pad
        self.total = sum(len(p) for p in piece_rows)
        self.global_batch, self.accum = cfg.train.batch_size, cfg.train.grad_accum_steps
        self.block, self.seed = cfg.data.shuffle_buffer, cfg.train.seed
        self.rank, self.world, self.workers = rank, world, workers
        self.all_workers = tuple(max(1, w) for w in all_workers)

    def steps(self, epoch: int) -> int:
        return steps_per_epoch(self.total, self.global_batch)

    def epoch(self, epoch: int, start_batch: int = 0, legs: list[dict] | None = None) -> Iterator[dict[str, Any]]:
        """The rest of ``epoch`` from ``start_batch``. ``legs`` (the checkpoint's, updated here) says which
        processes ran the epoch so far: the same ones continue their leg, others start a new one over the rows
        not yet trained. Set up now, not lazily: the step's seeded RNG must not see the DataLoader's set-up."""
        from torch.utils.data import DataLoader

        from crnn_art.data.loaders import worker_options

        legs = [] if legs is None else legs
        if not legs and start_batch > 0:
            raise CheckpointError(f"the checkpoint stopped in epoch {epoch} of a stream without saying which rows "
                                  "were read (an older crnn-art): resume from a checkpoint at an epoch's end, or "
                                  "start again")
        here = Leg(self.world, self.all_workers, start_batch)
        if not legs or (Leg.from_dict(legs[-1]).world, Leg.from_dict(legs[-1]).workers) != (here.world, here.workers):
            legs.append(here.to_dict())
        share = process_share(self.total, [Leg.from_dict(leg) for leg in legs], start_batch, self.global_batch,
                              self.accum, self.rank, epoch, self.seed, self.block)
        self.dataset.begin(epoch, epoch_order(self.piece_rows, self.seed, epoch), share)
        loader = DataLoader(self.dataset, batch_size=None, collate_fn=_identity, **worker_options(self.workers),
                            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
        return self._batches(iter(loader), share.micro_batches)

    def _batches(self, samples: Iterator[dict[str, Any]], sizes: list[int]) -> Iterator[dict[str, Any]]:
        """Group the samples; the micro-batches of the epoch's last, smaller step are filled up to 2 decoded images
        (BatchNorm and MixUp need two) with unlabelled copies of one of theirs (row -1: no loss, no count), or with
        ``self.pad`` where none decoded."""
        from crnn_art.data.loaders import collate

        last_step = len(sizes) - (self.accum if self.total % self.global_batch else 0)
        for i, size in enumerate(sizes):
            taken = [next(samples) for _ in range(size)]
            if i >= last_step:
                decoded = [s for s in taken if not s["skipped"]]
                like = decoded[-1] if decoded else self.pad
                filler = {**like, "labels": torch.full_like(like["labels"], -1), "row": -1}
                taken += [filler] * max(0, 2 - len(decoded))
            yield collate(taken, keep_skipped=False)


def streamed_batches(src: StreamSource, train_rows: np.ndarray, labels: np.ndarray, transform, min_side: int,
                     cfg: RunConfig, accelerator, workers: int) -> StreamedBatches:
    """This process's training batches from the stream (collective: every process gathers the others' worker
    counts, which decide who reads what)."""
    from accelerate.utils import gather_object

    wanted = src.mask(train_rows)
    piece_rows = [p.first_row + np.flatnonzero(wanted[p.first_row:p.first_row + p.num_rows]) for p in src.pieces]
    if len(train_rows) < cfg.train.batch_size:
        raise ValueError(f"the training split has {len(train_rows)} rows, fewer than one global batch of "
                         f"{cfg.train.batch_size}; lower train.batch_size or use more data")
    all_workers = gather_object([max(1, workers)]) if accelerator.num_processes > 1 else [max(1, workers)]
    dataset = StreamingPaintings(src.pieces, labels, transform, min_side, cfg.train.seed)
    pad = padding_sample(transform, cfg.data.image_size, labels.shape[1])
    return StreamedBatches(dataset, piece_rows, cfg, accelerator.process_index, accelerator.num_processes, workers,
                           all_workers, pad)


def _rows_digest(rows: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:12]


def materialize_split(src: StreamSource, rows: np.ndarray, cache_dir: str | os.PathLike, name: str,
                      console=None):
    """The images of ``rows`` as a local memory-mapped dataset, read from the stream once.

    Validation is read every epoch and evaluation reads it again: streaming it each time would
    download it each time. Written under a temporary name and renamed, so a crash leaves nothing
    half-written and concurrent writers (one per machine on a shared disk) do not clash.
    """
    import shutil
    import socket
    from pathlib import Path

    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature
    from datasets.arrow_writer import ArrowWriter

    folder = Path(cache_dir) / f"{name}-{_rows_digest(rows)}"
    if not (folder / "data.arrow").is_file():
        tmp = folder.with_name(f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if console is not None:
            console.print(f"streaming the {len(rows)} images of the {name} split once into {folder}")
        features = Features({"row": Value("int64"), "image": ImageFeature(decode=False)})
        with ArrowWriter(features=features, path=str(tmp / "data.arrow")) as writer:
            ordered = np.sort(rows)  # in file order, one shard at a time
            shard = np.searchsorted([p.first_row for p in src.pieces], ordered, side="right") - 1
            for record in read_rows(src.pieces, ordered, shard):
                writer.write({"row": record["row"], "image": {"bytes": record["bytes"], "path": record["path"]}})
            writer.finalize()
        try:
            tmp.rename(folder)
        except OSError:  # another machine finished it first
            shutil.rmtree(tmp, ignore_errors=True)
    ds = Dataset.from_file(str(folder / "data.arrow"))
    if not np.array_equal(np.asarray(ds["row"]), np.sort(rows)):
        raise DataError(f"{folder} does not hold the rows of the {name} split; delete it and run again")
    return ds

"""Streaming a parquet source (``huggan/wikiart`` on the Hub, or local parquet files) without caching it.

Everything but the image bytes is settled before the first image is read. The label columns of
every file are read alone (a few MB for WikiArt, no image bytes), which gives each row its id:
its position in the concatenation of the files, exactly the row id of the cached dataset. So
``make_splits`` hashes the same ids streamed or cached and puts every row in the same split, and
the class names, class counts and epoch length are known up front.

Shards are the files' parquet row groups (about 100 rows each in files written by ``datasets``),
not whole files, so ``split_dataset_by_node`` can give every process nearly the same share even
when the files are uneven. ``datasets`` reshuffles the shard order from (seed, epoch) before
splitting, so a process's share changes from epoch to epoch; ``plan_epochs`` runs that same split
over a stream of shard numbers (no I/O) to learn every process's share of every epoch, and each
epoch runs ``min over processes of (share // batch)`` steps on all of them: no process runs out
while another waits in DDP, no row is read twice in an epoch, and the LR schedule knows its length.

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
from crnn_art.errors import DataError
from crnn_art.data.sampling import mix_seed
from crnn_art.data.schema import check_schema

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


def _read_pieces(pieces: list[Piece], wanted: np.ndarray) -> Iterator[dict[str, Any]]:
    """The generator behind the stream: the wanted rows of each shard, with their row ids."""
    import pyarrow.parquet as pq

    for piece in pieces:
        rows = np.arange(piece.first_row, piece.first_row + piece.num_rows)
        keep = np.flatnonzero(wanted[rows])
        if len(keep) == 0:
            continue
        with _open(piece.file) as fh:
            images = pq.ParquetFile(fh).read_row_group(piece.row_group, columns=["image"]).column("image")
        for k in keep:
            image = images[int(k)].as_py()
            yield {"row": int(rows[k]), "bytes": image.get("bytes"), "path": image.get("path")}


def _piece_numbers(pieces: list[int]) -> Iterator[dict[str, int]]:
    for index in pieces:
        yield {"piece": index}


def _stream(gen, pieces: list, extra: dict, features, seed: int, buffer_size: int, rank: int, world: int):
    """The common recipe of the real stream and its probe: shuffled shards and buffer, split by node."""
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    ds = IterableDataset.from_generator(gen, features=features, gen_kwargs={"pieces": pieces, **extra})
    ds = ds.shuffle(seed=seed, buffer_size=buffer_size)
    strategy = "shards" if len(pieces) >= world else "examples"
    return split_dataset_by_node(ds, rank=rank, world_size=world, strategy=strategy)


def node_stream(src: StreamSource, wanted: np.ndarray, seed: int, buffer_size: int, rank: int, world: int):
    """This process's part of the stream of the ``wanted`` rows: ``{"row", "bytes", "path"}`` records."""
    from datasets import Features, Value

    features = Features({"row": Value("int64"), "bytes": Value("binary"), "path": Value("string")})
    return _stream(_read_pieces, src.pieces, {"wanted": wanted}, features, seed, buffer_size, rank, world)


def plan_epochs(src: StreamSource, wanted: np.ndarray, seed: int, buffer_size: int, world: int,
                local_batch: int, epochs: int) -> list[dict[str, Any]]:
    """For each epoch: every process's number of wanted rows, and the steps all of them run."""
    from datasets import Features, Value

    per_piece = np.array([int(wanted[p.first_row:p.first_row + p.num_rows].sum()) for p in src.pieces])
    total = int(per_piece.sum())
    by_shards = len(src.pieces) >= world
    probes = [_stream(_piece_numbers, list(range(len(src.pieces))), {}, Features({"piece": Value("int64")}),
                      seed, 1, rank, world) for rank in range(world)] if by_shards else []
    plans = []
    for epoch in range(1, epochs + 1):
        if by_shards:
            shares = []
            for probe in probes:
                probe.set_epoch(epoch)
                shares.append(int(sum(per_piece[r["piece"]] for r in probe)))
        else:
            shares = [len(range(rank, total, world)) for rank in range(world)]
        plans.append({"epoch": epoch, "rows_per_process": shares, "steps": min(shares) // local_batch})
    return plans


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


class StreamingPaintings(torch.utils.data.IterableDataset):
    """Decoded, augmented samples of this process's stream, in the shape ``PaintingDataset`` gives.

    The augmentation seed of a sample is a function of ``(seed, epoch, row)``, so a resumed run
    (which re-reads the epoch up to its position) augments exactly as the uninterrupted one did.
    ``datasets`` gives each DataLoader worker its own shards of this process's share.
    """

    def __init__(self, stream, labels: np.ndarray, transform, min_side: int | None, seed: int) -> None:
        super().__init__()
        self.stream = stream
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform
        self.min_side = min_side
        self.seed = seed
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from crnn_art.data.loaders import load_sample

        for record in self.stream:
            row = record["row"]
            yield load_sample({"bytes": record["bytes"], "path": record["path"]}, self.labels[row], row,
                              self.transform, self.min_side, mix_seed(self.seed, self.epoch, row))


def _identity(sample: Any) -> Any:
    return sample


class StreamedBatches:
    """Micro-batches of one epoch of the stream, exactly ``plan['steps'] * accum`` of them.

    Samples come one by one from the DataLoader (its workers decode and augment) and are grouped
    here, so the count does not depend on how many workers there are. A run resumed mid-epoch
    re-reads the epoch up to its position: the shuffle buffer cannot be restored from a state
    dict, but the stream is a function of (seed, epoch), so skipping reproduces it.
    """

    def __init__(self, dataset: StreamingPaintings, plans: list[dict[str, Any]], micro_batch: int, accum: int,
                 num_workers: int) -> None:
        self.dataset = dataset
        self.plans = plans
        self.micro_batch = micro_batch
        self.accum = accum
        self.num_workers = num_workers

    def steps(self, epoch: int) -> int:
        return self.plans[epoch - 1]["steps"]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """Set up (and skip to ``start_batch``) now, not lazily at the first batch: the step's seeded
        RNG must not be touched by the DataLoader's set-up, or a resumed run would drop out differently."""
        from torch.utils.data import DataLoader

        from crnn_art.data.loaders import worker_options

        self.dataset.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=None, collate_fn=_identity, **worker_options(self.num_workers),
                            generator=torch.Generator().manual_seed(mix_seed(self.dataset.seed, epoch)))
        samples = iter(loader)
        for _ in range(start_batch * self.accum * self.micro_batch):
            next(samples)
        return self._batches(samples, (self.steps(epoch) - start_batch) * self.accum)

    def _batches(self, samples: Iterator[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
        from crnn_art.data.loaders import collate

        for _ in range(count):
            yield collate([next(samples) for _ in range(self.micro_batch)], keep_skipped=False)


def streamed_batches(src: StreamSource, train_rows: np.ndarray, labels: np.ndarray, transform, min_side: int,
                     cfg: RunConfig, rank: int, world: int, local_batch: int, workers: int) -> StreamedBatches:
    """This process's training batches from the stream, every epoch planned before the first one."""
    t = cfg.train
    wanted = src.mask(train_rows)
    plans = plan_epochs(src, wanted, t.seed, cfg.data.shuffle_buffer, world, local_batch, t.epochs)
    if min(p["steps"] for p in plans) == 0:
        raise ValueError(
            f"a process gets fewer than {local_batch} training rows in some epoch "
            f"({plans[0]['rows_per_process']}); lower train.batch_size or use more data"
        )
    stream = node_stream(src, wanted, t.seed, cfg.data.shuffle_buffer, rank, world)
    dataset = StreamingPaintings(stream, labels, transform, min_side, t.seed)
    return StreamedBatches(dataset, plans, local_batch // t.grad_accum_steps, t.grad_accum_steps,
                           workers)


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
            for record in _read_pieces(src.pieces, src.mask(rows)):
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

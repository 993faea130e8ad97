"""Where paintings come from, which labels a task learns, and how rows are split.

Every source ends as a ``datasets.Dataset`` with the columns of ``huggan/wikiart``: ``image``,
``artist``, ``genre``, ``style`` (the last three ``ClassLabel``). A task picks one or three of
the label columns (its heads); "Unknown Artist" / "Unknown Genre" and classes below the minimum
count become -1 for that head, so the combined task still trains style on a painting whose artist
is unknown.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crnn_art.config import DataConfig

UNKNOWN_NAMES = frozenset({"Unknown Artist", "Unknown Genre"})
SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """A problem with the data a run was pointed at; the message says what to change."""


def open_source(cfg: DataConfig):
    """Open ``cfg.source`` as one map-style ``datasets.Dataset`` (the demo is generated on first use)."""
    import datasets

    source = cfg.source
    if source == "demo":
        from crnn_art.demo_data import DemoParams, generate_demo

        params = DemoParams(cfg.demo_size, cfg.demo_image_side, cfg.demo_styles, cfg.demo_noise, cfg.demo_seed)
        ds = datasets.load_from_disk(str(generate_demo(cfg.demo_dir, params)))
    elif os.path.isdir(source):
        try:
            ds = datasets.load_from_disk(source)
        except FileNotFoundError as exc:
            raise DataError(
                f"data.source {source!r} is a folder but not a dataset written by save_to_disk; "
                "point at such a folder, a Hub dataset id, or 'demo'"
            ) from exc
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{source!r} has splits {list(ds)} but no 'train' split")
            ds = ds["train"]
    else:
        try:
            ds = datasets.load_dataset(source, split="train", revision=cfg.revision)
        except (ConnectionError, OSError, FileNotFoundError) as exc:
            raise DataError(
                f"cannot load data.source {source!r} from the Hugging Face Hub ({type(exc).__name__}); "
                "check the dataset id and network, or use a local save_to_disk folder or data.source=demo"
            ) from exc
    check_schema(ds, source)
    return ds


def check_schema(ds, source: str) -> None:
    from datasets import ClassLabel

    needed = ("image", "artist", "genre", "style")
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"data.source {source!r} lacks column(s) {missing} (has {ds.column_names}); "
            "crnn-art expects the huggan/wikiart schema: image, artist, genre, style"
        )
    for column in needed[1:]:
        if not isinstance(ds.features[column], ClassLabel):
            raise DataError(
                f"column {column!r} of {source!r} is {ds.features[column]}, not a ClassLabel; "
                "cast it with dataset.cast_column(column, ClassLabel(names=[...]))"
            )


@dataclass
class TaskLabels:
    """The heads of a task: kept class names per head, and each row's label per head (-1 = none)."""

    heads: tuple[str, ...]
    class_names: dict[str, list[str]]
    labels: np.ndarray  # (rows, heads) int64, -1 where the head has no known label

    @property
    def num_classes(self) -> dict[str, int]:
        return {h: len(self.class_names[h]) for h in self.heads}

    def known_rows(self) -> np.ndarray:
        """Rows with at least one known label; the others teach nothing for this task."""
        return np.flatnonzero((self.labels >= 0).any(axis=1))


def task_labels(ds, heads: tuple[str, ...], cfg: DataConfig) -> TaskLabels:
    """Map source ClassLabel ids to contiguous head ids, dropping unknown and too-rare classes.

    Classes are counted over the whole source (not one split) so every process and every split
    agrees on them; a class with no rows at all is dropped (the demo uses a subset of styles).
    """
    names: dict[str, list[str]] = {}
    columns = []
    for head in heads:
        source_names = ds.features[head].names
        raw = np.asarray(ds.data.column(head).to_numpy(zero_copy_only=False), dtype=np.int64)
        counts = np.bincount(raw[raw >= 0], minlength=len(source_names))
        minimum = cfg.min_artist_count if head == "artist" else 1
        keep = [i for i, n in enumerate(source_names) if n not in UNKNOWN_NAMES and counts[i] >= minimum]
        if len(keep) < 2:
            raise DataError(
                f"head {head!r} has {len(keep)} usable class(es) in {cfg.source!r}; "
                "it needs at least 2 (lower data.min_artist_count or pick another task)"
            )
        remap = np.full(len(source_names), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        names[head] = [source_names[i] for i in keep]
        columns.append(np.where(raw >= 0, remap[np.clip(raw, 0, None)], -1))
    return TaskLabels(heads=heads, class_names=names, labels=np.stack(columns, axis=1))


def _uniform_hash(rows: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per row id, from (seed, row) alone (splitmix64)."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def make_splits(num_rows: int, cfg: DataConfig, usable: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Train/validation/test row ids, decided per row by a hash of (split_seed, row id).

    A row's split depends on nothing but its id and the seed: not on the order rows are read in,
    the number of processes, or whether the data is streamed, and it is the same for every task.
    The Hub dataset is ordered by artist, so taking contiguous ranges would put whole artists in
    one split; hashing spreads them.
    """
    rows = np.arange(num_rows)
    u = _uniform_hash(rows, cfg.split_seed)
    test_cut = cfg.test_fraction
    val_cut = test_cut + cfg.val_fraction
    split_of = np.where(u < test_cut, 2, np.where(u < val_cut, 1, 0))
    mask = np.ones(num_rows, dtype=bool)
    if usable is not None:
        mask[:] = False
        mask[usable] = True
    out = {name: rows[(split_of == i) & mask] for i, name in enumerate(SPLITS)}
    for name in ("train", "validation"):
        if len(out[name]) == 0:
            raise DataError(
                f"the {name} split is empty ({num_rows} rows, fractions val={cfg.val_fraction}, "
                f"test={cfg.test_fraction}); use more data or other fractions"
            )
    return out


def write_splits(splits: dict[str, np.ndarray], path: str | Path, cfg: DataConfig) -> None:
    payload = {
        "source": cfg.source, "revision": cfg.revision, "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
        **{name: splits[name].tolist() for name in SPLITS},
    }
    Path(path).write_text(json.dumps(payload))


def read_splits(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing; it is written by `crnn-art train` next to the run")
    payload = json.loads(path.read_text())
    return {name: np.asarray(payload[name], dtype=np.int64) for name in SPLITS}

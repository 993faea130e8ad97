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
from crnn_art.data.duplicates import read_groups
from crnn_art.data.schema import IMAGE_EXTENSIONS, SPLITS, UNKNOWN_NAMES, Source, check_schema
from crnn_art.errors import DataError
from crnn_art.runs import atomic_write_text


def open_source(cfg: DataConfig) -> Source:
    """Open ``cfg.source``: 'demo', 'artgan', a local folder (save_to_disk, prepared shards, parquet
    files, or an image folder), a parquet file, or a Hub dataset id (``load_dataset``)."""
    import datasets

    source = cfg.source
    if cfg.streaming:
        if source in ("demo", "artgan") or (os.path.isdir(source) and not _has_parquet(Path(source))):
            raise DataError(
                f"data.streaming reads parquet files (a Hub id, the Hub's file layout, .parquet files), "
                f"not {source!r}, which is read from local disk anyway: set data.streaming=false"
            )
        from crnn_art.data.streaming import open_stream_source

        stream = open_stream_source(cfg)
        return Source(stream.labels, stream=stream)
    if source == "demo":
        from crnn_art.data.demo import DemoParams, generate_demo

        params = DemoParams(cfg.demo_size, cfg.demo_image_side, cfg.demo_styles, cfg.demo_noise, cfg.demo_seed)
        opened = Source(datasets.load_from_disk(str(generate_demo(cfg.demo_dir, params))))
    elif source == "artgan":
        opened = _artgan(cfg)
    elif os.path.isdir(source):
        opened = _local_folder(source, cfg)
    elif source.endswith(".parquet"):
        if not os.path.isfile(source):
            raise DataError(f"data.source {source!r} does not exist")
        opened = Source(datasets.load_dataset("parquet", data_files=source, split="train"))
    else:
        if os.sep in source and not source.count("/") == 1:
            raise DataError(f"data.source {source!r} is neither an existing folder nor a Hub id like owner/name")
        try:
            opened = Source(datasets.load_dataset(source, split="train", revision=cfg.revision))
        except (ConnectionError, OSError, FileNotFoundError, ValueError) as exc:
            raise DataError(
                f"cannot load data.source {source!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                "check the dataset id, data.revision and network, or use a local folder or data.source=demo"
            ) from exc
    check_schema(opened.dataset, source)
    return opened


def _local_folder(source: str, cfg: DataConfig) -> Source:
    import datasets

    root = Path(source)
    if (root / MARKER).is_file():
        return open_prepared(root)
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            return _concatenate_splits(ds, source)
        return Source(ds)
    if _has_parquet(root):
        # the Hub's file layout (data/train-0000x-of-0000n.parquet): the same load_dataset path as the Hub
        return Source(datasets.load_dataset(source, split="train"))
    return _image_folder(root, cfg)


def _has_parquet(root: Path) -> bool:
    """Parquet files at the top or in ``data/`` (the Hub's layout)."""
    return any(root.glob("*.parquet")) or any(root.glob("data/*.parquet"))


def _concatenate_splits(dsd, source: str) -> Source:
    """A DatasetDict with its own splits: rows of train, then validation, then test, in one dataset."""
    import datasets

    names = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
             "test": "test"}
    parts, splits, offset = [], {}, 0
    for key in dsd:
        if key not in names:
            raise DataError(f"{source!r} has a split {key!r}; crnn-art knows train, validation (or val), test")
        parts.append(dsd[key])
        splits[names[key]] = np.arange(offset, offset + len(dsd[key]))
        offset += len(dsd[key])
    if "train" not in splits:
        raise DataError(f"{source!r} has splits {list(dsd)} but no 'train' split")
    return Source(datasets.concatenate_datasets(parts), splits)


def artist_from_filename(name: str) -> str | None:
    """``vincent-van-gogh_starry-night-1889.jpg`` -> ``vincent-van-gogh`` (WikiArt's file naming)."""
    stem = Path(name).stem
    return stem.split("_", 1)[0] if "_" in stem else None


def _dataset_from_files(paths: list[str], folder_labels: list[str], label_column: str, cfg: DataConfig,
                        label_names: list[str] | None = None):
    """Build the WikiArt schema over image files: the folder names label ``label_column``; the other
    columns are unknown (or the artist from the file name with ``data.artist_from_filename``)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    unknown = {"artist": "Unknown Artist", "genre": "Unknown Genre", "style": "Unknown Style"}
    columns: dict[str, list] = {"image": paths}
    features = {"image": ImageFeature()}
    for column in ("artist", "genre", "style"):
        if column == label_column:
            names = label_names or sorted(set(folder_labels))
            features[column] = ClassLabel(names=names)
            columns[column] = [names.index(v) for v in folder_labels]
        elif column == "artist" and cfg.artist_from_filename:
            found = [artist_from_filename(p) for p in paths]
            names = [unknown["artist"], *sorted({a for a in found if a})]
            features[column] = ClassLabel(names=names)
            columns[column] = [names.index(a) if a else 0 for a in found]
        else:
            features[column] = ClassLabel(names=[unknown[column]])
            columns[column] = [0] * len(paths)
    return Dataset.from_dict(columns, features=Features(features))


def _image_folder(root: Path, cfg: DataConfig) -> Source:
    """``root/<label>/<file>`` or ``root/train|validation|test/<label>/<file>``; the folder is the label
    of ``data.folder_label`` (default: the task, or style for the combined task)."""
    label_column = cfg.folder_label or ("style" if cfg.task == "combined" else cfg.task)
    split_dirs = [d for d in ("train", "validation", "val", "test") if (root / d).is_dir()]
    bases = [(root / d, {"val": "validation"}.get(d, d)) for d in split_dirs] or [(root, None)]
    paths, labels, split_of, unreadable = [], [], [], []
    for base, split in bases:
        for label_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for file in sorted(label_dir.rglob("*")):
                if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file():
                    if not _utf8(str(file)):  # Arrow keeps text as UTF-8: such a name cannot be stored
                        unreadable.append(file)
                        continue
                    paths.append(str(file))
                    labels.append(label_dir.name)
                    split_of.append(split)
    note = (f"{len(unreadable)} image file(s) skipped: their names are not valid UTF-8 (rename them to use them), "
            f"e.g. {str(unreadable[0]).encode('utf-8', 'backslashreplace').decode()}" if unreadable else "")
    if not paths:
        raise DataError(
            f"data.source {str(root)!r} holds no images in <label>/<file> folders (nor a dataset); "
            "lay it out as root/<label>/<image> or root/train/<label>/<image>"
        )
    ds = _dataset_from_files(paths, labels, label_column, cfg)
    if not split_dirs:
        return Source(ds, None, note)
    split_arr = np.array(split_of)
    return Source(ds, {name: np.flatnonzero(split_arr == name) for name in SPLITS}, note)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_file(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _read_artgan_list(path: Path, classes: int) -> list[tuple[str, int]]:
    """``relative/path.jpg,label`` rows; a header line (``path,label``) is skipped. Any other row that is not a path
    and a label in ``0 .. classes-1`` is a ``DataError`` naming the file, the line and what is wrong."""
    import csv

    rows = []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for number, row in enumerate(csv.reader(fh), 1):
            if not row or not "".join(row).strip():
                continue
            if number == 1 and len(row) >= 2 and not row[1].strip().lstrip("-").isdigit():
                continue  # a header
            problem = None
            if len(row) < 2 or not row[1].strip():
                problem = "has no label (expected relative/path.jpg,label)"
            elif not row[1].strip().lstrip("-").isdigit():
                problem = f"has the label {row[1].strip()!r}, not an integer"
            elif not 0 <= int(row[1]) < classes:
                problem = f"has the label {int(row[1])}, outside 0..{classes - 1} (the class file lists {classes})"
            if problem:
                raise DataError(f"{path}, line {number} {problem}; fix or remove that line")
            rows.append((row[0].strip(), int(row[1])))
    return rows


def _artgan(cfg: DataConfig) -> Source:
    """The ArtGAN protocol: ``<task>_train_clean.csv`` / ``<task>_val_clean.csv`` (``relative/path,label``; the
    published ``<task>_train.csv`` / ``<task>_val.csv`` are read when no cleaned copy is there) and
    ``<task>_class.txt`` in ``data.lists_dir``, images under ``data.image_root``."""
    if cfg.task == "combined":
        raise DataError("the ArtGAN protocol has separate lists per task; use data.task style, genre or artist")
    if not cfg.lists_dir or not cfg.image_root:
        raise DataError("data.source=artgan needs data.lists_dir (the CSV lists) and data.image_root (the images)")
    lists, root = Path(cfg.lists_dir), Path(cfg.image_root)
    class_file = _first_file(lists, [f"{cfg.task}_class.txt", f"{cfg.task}_class"])
    if class_file is None:
        raise DataError(f"{lists / f'{cfg.task}_class.txt'} is missing; data.lists_dir must hold the ArtGAN lists "
                        f"of the {cfg.task} task")
    names = [line.split(maxsplit=1)[1].strip() for line in class_file.read_text().splitlines() if line.strip()]
    paths, labels, splits, offset = [], [], {}, 0
    for split, suffix in (("train", "train"), ("validation", "val")):
        stem = f"{cfg.task}_{suffix}"
        list_file = _first_file(lists, [f"{stem}_clean.csv", f"{stem}.csv", stem])
        if list_file is None:
            raise DataError(f"{lists / f'{stem}_clean.csv'} (or the published {stem}.csv) is missing from "
                            "data.lists_dir")
        rows = _read_artgan_list(list_file, len(names))
        paths += [str(root / rel) for rel, _ in rows]
        labels += [names[label] for _, label in rows]
        splits[split] = np.arange(offset, offset + len(rows))
        offset += len(rows)
    splits["test"] = np.arange(0)
    present = sum(os.path.isfile(p) for p in paths)
    if present == 0:
        raise DataError(f"none of the {len(paths)} listed images exist under data.image_root={str(root)!r}")
    ds = _dataset_from_files(paths, labels, cfg.task, cfg, label_names=names)
    missing = len(paths) - present
    note = f"{missing} of {len(paths)} listed images are missing under {root} (skipped)" if missing else ""
    return Source(ds, splits, note)


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
        allowed = _allowed_names(head, cfg)
        keep = [i for i, n in enumerate(source_names)
                if n not in UNKNOWN_NAMES and counts[i] >= minimum and (allowed is None or _norm(n) in allowed)]
        if len(keep) < 2:
            raise DataError(
                f"head {head!r} has {len(keep)} usable class(es) in {cfg.source!r}; "
                "it needs at least 2 (lower data.min_artist_count or pick another task)"
            )
        remap = np.full(len(source_names), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        names[head] = [source_names[i] for i in keep]
        columns.append(np.where(raw >= 0, remap[np.clip(raw, 0, None)], -1))
    labels = np.stack(columns, axis=1)
    if cfg.label_overrides:
        apply_label_overrides(labels, names, heads, cfg.label_overrides)
    return TaskLabels(heads=heads, class_names=names, labels=labels)


DECISIONS = ("keep", "relabel", "drop")


def read_decisions(path: str | Path) -> list[dict[str, str]]:
    """A review's ``decisions.csv``: one dict per line with ``row``, ``head``, ``decision``, ``new_label`` (``path``
    optional); a file without those columns is one ``DataError``."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a file saved by a spreadsheet starts with a BOM
        reader = csv.DictReader(fh)
        missing = {"row", "head", "decision", "new_label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"data.label_overrides {str(path)!r} lacks the column(s) {', '.join(sorted(missing))}; "
                            "a decisions file has row, path, head, decision, new_label")
        return list(reader)


def apply_label_overrides(labels: np.ndarray, names: dict[str, list[str]], heads: tuple[str, ...],
                          path: str | Path) -> tuple[int, int]:
    """Apply a review in place: ``relabel`` sets the head's label to ``new_label``, ``drop`` removes the head's
    label (a row left without any label leaves the task). Returns ``(labels changed, labels dropped)``. Anything
    that does not fit (an unknown row, head, label or decision) is one ``DataError`` naming the line."""
    changed, dropped = 0, 0
    for line, d in enumerate(read_decisions(path), start=2):
        where = f"data.label_overrides {str(path)!r} line {line}"
        decision = (d["decision"] or "").strip()
        if decision not in DECISIONS:
            raise DataError(f"{where}: decision {decision!r} is not one of {', '.join(DECISIONS)}")
        try:
            row = int(d["row"])
        except ValueError:
            raise DataError(f"{where}: row {d['row']!r} is not a row id (an integer)") from None
        if not 0 <= row < len(labels):
            raise DataError(f"{where}: row {row} does not exist (the source has {len(labels)} rows): the decisions "
                            "were made on another source")
        head = (d["head"] or "").strip()
        if head not in heads:
            raise DataError(f"{where}: head {head!r} is not a head of this task ({', '.join(heads)})")
        if decision == "drop":
            dropped += int(labels[row, heads.index(head)] >= 0)
            labels[row, heads.index(head)] = -1
        elif decision == "relabel":
            new = (d["new_label"] or "").strip()
            if new not in names[head]:
                raise DataError(f"{where}: {new!r} is not a class of head {head} (e.g. {', '.join(names[head][:3])})")
            changed += int(labels[row, heads.index(head)] != names[head].index(new))
            labels[row, heads.index(head)] = names[head].index(new)
    return changed, dropped


def _norm(name: str) -> str:
    """ArtGAN writes ``Albrecht_Durer``, the Hub ``albrecht-durer``: compare them as the same."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def _allowed_names(head: str, cfg: DataConfig) -> set[str] | None:
    if head == "artist" and cfg.artist_list == "artgan":
        from crnn_art.data.demo import ARTIST_NAMES

        return {_norm(n) for n in ARTIST_NAMES[1:]}  # the 23 artists of the ArtGAN protocol
    return None


def _uniform_hash(rows: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per row id, from (seed, row) alone (splitmix64)."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_keys(dataset, cfg: DataConfig) -> np.ndarray | None:
    """What each row's split is hashed from (``data.split_by``): None for the row itself; else the row's artist, or
    its group of copies (the group's first row), and the row itself where it has none, so that those rows keep
    the split they would have by row."""
    if cfg.split_by == "row":
        return None
    keys = np.arange(len(dataset), dtype=np.int64)
    if cfg.split_by == "artist":
        names = dataset.features["artist"].names if hasattr(dataset.features["artist"], "names") else None
        values = dataset["artist"]
        artists = [names[v] if names is not None and isinstance(v, int) else v for v in values]
        import hashlib

        ids: dict[str, int] = {}
        for row, artist in enumerate(artists):
            if artist is not None and artist not in UNKNOWN_NAMES:
                name = str(artist)
                if name not in ids:  # from the name alone: not from the order rows are read in
                    ids[name] = int.from_bytes(hashlib.sha256(name.encode()).digest()[:5], "big")
                keys[row] = (1 << 41) + ids[name]
        return keys
    try:
        groups = read_groups(Path(cfg.duplicates), len(keys))
    except DataError as exc:
        raise DataError(f"data.duplicates: {exc}") from exc
    for rows in groups:
        keys[rows] = min(rows)
    return keys


def make_splits(num_rows: int, cfg: DataConfig, usable: np.ndarray | None = None,
                predefined: dict[str, np.ndarray] | None = None,
                keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Train/validation/test row ids: the source's own splits if it has them, else a hash of
    (split_seed, row id) per row (or of ``keys``, see ``split_keys``: rows with one key share a split).

    A hashed row's split depends on nothing but its id and the seed: not on the order rows are
    read in, the number of processes, or the task. The Hub dataset is ordered by artist, so taking
    contiguous ranges would put whole artists in one split; hashing spreads them.
    """
    mask = np.ones(num_rows, dtype=bool)
    if usable is not None:
        mask[:] = False
        mask[usable] = True
    if predefined is not None and cfg.split_by != "row":
        raise DataError(f"data.split_by={cfg.split_by} hashes rows into splits, but {cfg.source} has splits of its "
                        "own; use data.split_by=row with it")
    if predefined is not None:
        out = {name: np.asarray(predefined.get(name, []), dtype=np.int64) for name in SPLITS}
        out = {name: rows[mask[rows]] for name, rows in out.items()}
        how = "the source's own splits"
    else:
        rows = np.arange(num_rows)
        u = _uniform_hash(rows if keys is None else keys, cfg.split_seed)
        test_cut = cfg.test_fraction
        val_cut = test_cut + cfg.val_fraction
        split_of = np.where(u < test_cut, 2, np.where(u < val_cut, 1, 0))
        out = {name: rows[(split_of == i) & mask] for i, name in enumerate(SPLITS)}
        how = f"fractions val={cfg.val_fraction}, test={cfg.test_fraction}"
    for name in ("train", "validation"):
        if len(out[name]) == 0:
            raise DataError(
                f"the {name} split is empty ({num_rows} rows, {how}); use more data or other fractions, "
                "or give the source a validation/ folder"
            )
    return out


def write_splits(splits: dict[str, np.ndarray], path: str | Path, cfg: DataConfig) -> None:
    """``split.json``: the row ids of each split and what they were drawn from (replaced whole, never half-written)."""
    payload = {
        "source": cfg.source, "revision": cfg.revision, "split_seed": cfg.split_seed, "split_by": cfg.split_by,
        "duplicates": cfg.duplicates, "label_overrides_sha256": file_sha256(cfg.label_overrides),
        # judged where the run was started (a relative local path exists only there), for the model card
        "hub_dataset": cfg.source not in ("demo", "artgan") and not Path(cfg.source).expanduser().exists(),
        "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
        **{name: splits[name].tolist() for name in SPLITS},
    }
    atomic_write_text(Path(path), json.dumps(payload), "the split")


def file_sha256(path: str | Path | None) -> str | None:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def check_overrides_unchanged(run_dir: str | Path, cfg: DataConfig) -> None:
    """Raise ``DataError`` (one line) when the run's ``data.label_overrides`` file is not the one it was trained
    with: its labels would no longer be the ones the model learnt from and is measured against. Runs from before
    the hash was recorded are not checked."""
    split = Path(run_dir) / "split.json"
    recorded = json.loads(split.read_text()).get("label_overrides_sha256") if split.is_file() else None
    if cfg.label_overrides and recorded and file_sha256(cfg.label_overrides) != recorded:
        raise DataError(f"data.label_overrides {cfg.label_overrides!r} changed since {run_dir} was trained with it, so "
                        "its labels are not the run's; put the original back, or train a new run with the edited file")


def read_splits(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing; it is written by `crnn-art train` next to the run")
    payload = json.loads(path.read_text())
    return {name: np.asarray(payload[name], dtype=np.int64) for name in SPLITS}


# -- folders written by ``crnn-art prepare`` (the writer is prepare.py) --------------------------------------------

MARKER = "prepared.json"
"""Written last by ``crnn-art prepare``: a folder with it is finished."""


def load_shards(folder: Path, expected: int):
    import datasets

    shards = [s for s in sorted((folder / "shards").glob("shard_[0-9]*")) if not s.name.endswith(".partial")]
    if len(shards) != expected:
        raise DataError(f"{folder} should hold {expected} shards but has {len(shards)}; run prepare again")
    return datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards])


def open_prepared(folder: str | Path):
    """A prepared folder as one dataset (shards concatenated, memory-mapped) with the source's splits."""
    folder = Path(folder)
    info = json.loads((folder / MARKER).read_text()) if (folder / MARKER).is_file() else None
    if info is None:
        raise DataError(f"{folder} is not a finished `crnn-art prepare` output (no {MARKER}); run prepare again")
    ds = load_shards(folder, info["shards"])
    splits = {k: np.asarray(v, dtype=np.int64) for k, v in info["splits"].items()} if info.get("splits") else None
    return Source(ds, splits)

"""Local stand-ins with the file layouts users point crnn-art at (the Hub cannot be reached here)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from crnn_art.data.demo import DemoParams, generate_demo
from tests.standins.odd_images import odd_images, painting

# An excerpt of the real ArtGAN lists, kept in the repository (see artgan/README.md for source and licence).
ARTGAN_LISTS = Path(__file__).resolve().parent / "artgan"


def hub_parquet_repo(folder: Path, rows: int = 160, shards: int = 2, file_rows: list[int] | None = None,
                     row_group: int | None = None) -> Path:
    """The Hub's layout of huggan/wikiart: data/train-0000i-of-0000n.parquet, schema in the parquet
    metadata, rows ordered by artist with "Unknown Artist" / "Unknown Genre" rows.

    ``file_rows`` makes the files uneven (as real shards are); ``row_group`` sets the rows per
    parquet row group (``datasets`` writes ~100 for image columns), the unit streaming shards by.
    """
    from datasets import load_from_disk

    total = sum(file_rows) if file_rows else rows
    ds = load_from_disk(str(generate_demo(folder / "_gen", DemoParams(size=total, image_side=48, styles=4))))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    sizes = file_rows or [len(ds.shard(shards, i, contiguous=True)) for i in range(shards)]
    start = 0
    for i, n in enumerate(sizes):
        part = ds.select(range(start, start + n))
        start += n
        path = folder / "data" / f"train-{i:05d}-of-{len(sizes):05d}.parquet"
        part.to_parquet(str(path), **({"batch_size": row_group} if row_group else {}))
    shutil.rmtree(folder / "_gen")
    return folder


def artgan_layout(folder: Path, task: str = "style", train_rows: int = 48, val_rows: int = 20) -> tuple[Path, Path]:
    """A small subset of the real ArtGAN lists, with generated images at exactly those relative paths."""
    lists, images = folder / "lists", folder / "wikiart"
    lists.mkdir(parents=True)
    shutil.copy(ARTGAN_LISTS / f"{task}_class.txt", lists / f"{task}_class.txt")
    for suffix, n in (("train", train_rows), ("val", val_rows)):
        with open(ARTGAN_LISTS / f"{task}_{suffix}_clean.csv", newline="") as fh:
            rows = [r for _, r in zip(range(n), csv.reader(fh), strict=False)]
        with open(lists / f"{task}_{suffix}_clean.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        for k, (rel, label) in enumerate(rows):
            path = images / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            painting(48, seed=int(label) * 1000 + k).save(path, format="JPEG")
    return lists, images


def image_folder(folder: Path, split_dirs: bool, with_odd_files: bool = False) -> Path:
    """root/[train|validation/]<style>/<artist-name_title>.jpg, optionally with broken and odd files."""
    labels = ["Impressionism", "Cubism", "Baroque"]
    artists = ["claude-monet", "pablo-picasso", "rembrandt"]
    parts = ["train", "validation"] if split_dirs else [None]
    for part in parts:
        for i, (label, artist) in enumerate(zip(labels, artists, strict=True)):
            base = folder / part / label if part else folder / label
            base.mkdir(parents=True, exist_ok=True)
            for k in range(12 if part != "validation" else 5):
                painting(48, seed=100 * i + k).save(base / f"{artist}_work-{k}.jpg", format="JPEG")
    if with_odd_files:
        target = folder / ("train" if split_dirs else "") / "Cubism"
        for name, (data, _) in odd_images(huge=False).items():
            (target / f"odd_{name}").write_bytes(data)
    return folder

"""``crnn-art duplicates``: the paintings filed twice in a dataset, the copies that cross splits (leakage) and the
copies filed under different labels (conflicts), as CSV, JSON and an HTML page with the copies side by side.

Each process hashes its own share of the rows (every ``world``-th) in DataLoader workers, with a progress bar;
the main process gathers the hashes (a few bytes per image), groups the copies (``data.duplicates``) and writes
the reports, so one and two processes give the same groups. With ``--cosine T`` (a run's model needed), each
process also embeds its share with the run's best model, the main process gathers the embeddings and joins the
pairs whose cosine reaches ``T`` as near copies (``data.duplicates.cosine_pairs``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crnn_art.data.duplicates import NEAR_BITS, cosine_pairs, describe, find_groups, image_key
from crnn_art.errors import DataError
from crnn_art.evaluation.review_page import SCRIPT, STYLE, review_bar, review_body, review_controls

THUMB_SIDE = 160
"""Pixels of the longer side of each copy on the HTML page."""


class _Keys(torch.utils.data.Dataset):
    """Decode and hash one row (in a DataLoader worker): ``(position, phash, ahash, thumbnail, ok)``."""

    def __init__(self, images, positions: list[int]) -> None:
        self.images, self.positions = images, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[int, int, int, np.ndarray, bool]:
        from crnn_art.data.decoding import decode_image
        from crnn_art.errors import DecodeError

        position = self.positions[i]
        try:
            image = decode_image(self.images[position]["image"], 64)
        except DecodeError:
            return position, 0, 0, np.zeros((8, 8, 3), dtype=np.uint8), False
        phash, ahash, thumb = image_key(image)
        return position, phash, ahash, thumb, True


def _as_is(key: tuple) -> tuple:
    return key


def _hash_share(images, positions: list[int], workers: int, progress) -> list[tuple]:
    from torch.utils.data import DataLoader

    from crnn_art.data.loaders import worker_options

    loader = DataLoader(_Keys(images, positions), batch_size=None, collate_fn=_as_is, **worker_options(workers))
    task = progress.add_task(f"hash {len(positions)} images", total=len(positions), status="")
    keys = []
    for key in loader:
        keys.append((key[0], key[1], key[2], np.asarray(key[3]), key[4]))
        progress.advance(task)
    return keys


def open_for_duplicates(checkpoint: str | None, source: str | None, overrides: list[str]):
    """The run's (``--checkpoint``) or a source's data: config, opened source, labels and every row's split."""
    from crnn_art.config import load_run_config, resolve_config
    from crnn_art.data.sources import (
        check_overrides_unchanged,
        make_splits,
        open_source,
        read_splits,
        split_keys,
        task_labels,
    )

    if (checkpoint is None) == (source is None):
        raise DataError("give --checkpoint RUN (its data and splits) or --source SOURCE, not both or neither")
    if checkpoint is not None:
        run = Path(checkpoint)
        run = run.parent if (run.parent / "config.yaml").is_file() and not (run / "config.yaml").is_file() else run
        if not (run / "config.yaml").is_file():
            raise DataError(f"{checkpoint} is not a run folder (no config.yaml); pass the run or use --source")
        cfg = load_run_config(run / "config.yaml")
        check_overrides_unchanged(run, cfg.data)
    else:
        run, cfg = None, resolve_config(None, None, [f"data.source={source}", *overrides])
    if cfg.data.streaming:
        raise DataError("duplicates reads every image of a cached source: set data.streaming=false")
    opened = open_source(cfg.data)
    labels = task_labels(opened.dataset, cfg.heads, cfg.data)
    splits = read_splits(run / "split.json") if run is not None else make_splits(
        len(opened.dataset), cfg.data, labels.known_rows(), opened.splits, split_keys(opened.dataset, cfg.data))
    return cfg, run, opened, labels, splits


@torch.no_grad()
def _embed_share(checkpoint: str, run: Path, cfg, opened, labels, rows: list[int], acc, progress):
    """This process's ``rows``, embedded (L2-normalised) by the run's model: ``(embeddings float16, rows)``."""
    from crnn_art.checkpoints import load_model_folder, resolve_model_folder
    from crnn_art.data.build import split_dataset
    from crnn_art.data.loaders import eval_loader
    from crnn_art.data.transforms import eval_resize, eval_transform
    from crnn_art.evaluation.outliers import embed_shard
    from crnn_art.runtime import fit_to_cores

    model = load_model_folder(resolve_model_folder(checkpoint).path).to(acc.device).eval()
    dataset = split_dataset(opened, np.array(rows, dtype=np.int64), labels.labels,
                            eval_transform(model.image_size, model.mean, model.std), eval_resize(model.image_size),
                            run, "duplicates")
    loader = eval_loader(dataset, cfg.train.eval_batch_size, fit_to_cores(cfg.data.num_workers).workers)
    z, _, _, ids = embed_shard(model, loader, acc.device, acc.autocast, tuple(model.class_names), progress)
    return z.half().cpu().numpy(), ids.cpu().numpy()


def find_duplicates(checkpoint: str | None = None, source: str | None = None, overrides: list[str] | None = None,
                    output_dir: str | None = None, near_bits: int = NEAR_BITS,
                    cosine: float | None = None) -> dict[str, Any]:
    """The ``crnn-art duplicates`` command; returns the summary written to ``duplicates.json``.

    ``cosine``: also join images whose embeddings (the run's model) reach this cosine; needs ``checkpoint``.
    Raises ``DataError`` (one line) for bad arguments, a foreign checkpoint or a streamed source.
    """
    from accelerate.utils import gather_object

    from crnn_art.console import make_console, make_progress
    from crnn_art.data.schema import SPLITS
    from crnn_art.runtime import fit_to_cores, make_accelerator

    if not 0 <= near_bits <= 32:
        raise DataError(f"--near-bits {near_bits} is not allowed; use 0 to 32 of the 64 bits (default {NEAR_BITS})")
    if cosine is not None and not 0.0 < cosine <= 1.0:
        raise DataError(f"--cosine {cosine} is not allowed; give a cosine in (0, 1], e.g. 0.95")
    if cosine is not None and checkpoint is None:
        raise DataError("--cosine compares a trained model's embeddings: give --checkpoint RUN (not --source)")
    cfg, run, opened, labels, splits = open_for_duplicates(checkpoint, source, overrides or [])
    acc = make_accelerator("no")
    console = make_console(acc.is_main_process)
    rows = np.sort(np.concatenate([splits[s] for s in SPLITS]))
    split_of = {int(r): s for s in SPLITS for r in splits[s].tolist()}
    images = opened.dataset.select_columns(["image"]).cast_column("image", _undecoded())
    share = list(range(acc.process_index, len(rows), acc.num_processes))
    with make_progress(console, acc.is_main_process) as progress:
        keys = _hash_share(images, [int(rows[i]) for i in share], fit_to_cores(cfg.data.num_workers).workers,
                           progress)
        embedded = [_embed_share(checkpoint, run, cfg, opened, labels, [int(rows[i]) for i in share], acc,
                                 progress)] if cosine is not None else []
    keys = sorted(gather_object(keys))
    embedded = gather_object(embedded)
    result: dict[str, Any] = {}
    if acc.is_main_process:
        out = Path(output_dir) if output_dir else (run / "duplicates" if run is not None else Path("duplicates"))
        similar = _similar(keys, embedded, cosine, acc.device) if cosine is not None else None
        result = _report(keys, opened, labels, split_of, near_bits, out, console, similar, cosine)
    acc.wait_for_everyone()
    return result


def _undecoded():
    from datasets import Image

    return Image(decode=False)


def _similar(keys, embedded, cosine: float, device) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (positions among the decodable images, as ``_report`` numbers them) whose embeddings reach
    ``cosine``, and their cosines."""
    good = np.array([k[0] for k in keys if k[4]], dtype=np.int64)
    z = np.concatenate([e[0] for e in embedded]) if embedded else np.zeros((0, 1), dtype=np.float16)
    ids = np.concatenate([e[1] for e in embedded]) if embedded else np.zeros(0, dtype=np.int64)
    by_row = dict(zip(ids.tolist(), range(len(ids)), strict=True))
    return cosine_pairs(z[[by_row[int(r)] for r in good]], cosine, device=str(device))


def _report(keys, opened, labels, split_of, near_bits: int, out: Path, console, similar=None,
            cosine: float | None = None) -> dict[str, Any]:
    from crnn_art.console import duplicates_table

    good = [k for k in keys if k[4]]
    rows = np.array([k[0] for k in good], dtype=np.int64)
    groups = find_groups(np.array([k[1] for k in good], dtype=np.uint64), np.array([k[2] for k in good],
                         dtype=np.uint64), np.stack([k[3] for k in good]) if good else np.zeros((0, 8, 8, 3)),
                         near_bits=near_bits, similar=similar)
    paths = _paths(opened.dataset, rows)
    names = {head: [labels.class_names[head][v] if v >= 0 else None for v in labels.labels[rows, h].tolist()]
             for h, head in enumerate(labels.class_names)}
    described = [describe(g, rows, [split_of[int(r)] for r in rows], names, paths) for g in groups]
    summary = {"images": len(keys), "undecodable": len(keys) - len(good), "groups": len(described),
               "exact_groups": sum(g["kind"] == "exact" for g in described),
               "rows_in_groups": sum(len(g["rows"]) for g in described),
               "leaking_groups": sum(g["leakage"] for g in described),
               "conflicting_groups": sum(bool(g["conflicts"]) for g in described),
               "test_rows_with_a_copy_in_train": sum(
                   sum(s == "test" for s in g["splits"]) for g in described if "train" in g["splits"]),
               "near_bits": near_bits, "cosine": cosine}
    out.mkdir(parents=True, exist_ok=True)
    (out / "duplicates.json").write_text(json.dumps({"summary": summary, "groups": described}, indent=2))
    _write_csv(out / "duplicates.csv", described, list(names))
    _write_html(out / "duplicates.html", described, opened.dataset, labels.class_names)
    console.print(duplicates_table(summary))
    console.print(f"written {out}/: duplicates.csv, duplicates.json, duplicates.html")
    return summary


def _paths(dataset, rows: np.ndarray) -> list[str]:
    names = dataset.select_columns(["image"]).cast_column("image", _undecoded()).flatten()["image.path"]
    return [names[int(r)] or "" for r in rows]


def _write_csv(path: Path, groups: list[dict[str, Any]], heads: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["group", "kind", "leakage", "conflicts", "row", "split", "path", *heads])
        for n, g in enumerate(groups):
            for i, row in enumerate(g["rows"]):
                writer.writerow([n, g["kind"], g["leakage"], " ".join(g["conflicts"]), row, g["splits"][i],
                                 g["paths"][i], *[g["labels"][h][i] or "" for h in heads]])


def _controls(g: dict[str, Any], i: int, class_names: dict[str, list[str]]) -> str:
    """keep / relabel / drop for one copy, per head with a known label; the suggested new label is another
    copy's (a conflict) or its own."""
    parts = []
    for head, values in g["labels"].items():
        if values[i] is None:
            continue
        others = [v for v in values if v is not None and v != values[i]]
        parts.append(f"{html.escape(head)}: " + review_controls(g["rows"][i], head, g["paths"][i], class_names[head],
                                                                 values[i], others[0] if others else values[i]))
    return "".join(parts)


def _write_html(path: Path, groups: list[dict[str, Any]], dataset, class_names: dict[str, list[str]]) -> None:
    from crnn_art.data.decoding import decode_image

    def picture(row: int) -> str:
        try:
            image = decode_image(dataset.cast_column("image", _undecoded())[row]["image"], THUMB_SIDE)
        except Exception:  # noqa: BLE001 - a copy that cannot be shown is named, not drawn
            return "<div>(cannot be shown)</div>"
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=85)
        return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'

    cards = []
    for n, g in enumerate(groups):
        flags = (" leakage" if g["leakage"] else "") + (" conflict" if g["conflicts"] else "")
        copies = "".join(
            f'<figure>{picture(row)}<figcaption>row {row} · {html.escape(g["splits"][i])}<br>'
            + "<br>".join(f"{html.escape(h)}: {html.escape(str(v[i]))}" for h, v in g["labels"].items())
            + f'<br><small>{html.escape(g["paths"][i])}</small>{_controls(g, i, class_names)}</figcaption></figure>'
            for i, row in enumerate(g["rows"]))
        cards.append(f'<section class="{g["kind"]}{flags}"><h2>group {n}: {g["kind"]} copies{flags}'
                     f'{" (" + ", ".join(g["conflicts"]) + ")" if g["conflicts"] else ""}</h2>{copies}</section>')
    path.write_text(
        "<!doctype html><meta charset=utf-8><title>crnn-art duplicates</title><style>"
        "body{font-family:sans-serif} section{border:1px solid #ccc;margin:8px;padding:8px}"
        ".leakage{border-color:#d80} .conflict{background:#fee} figure{display:inline-block;margin:4px;"
        "max-width:260px;vertical-align:top;word-break:break-all}" + STYLE + "</style>"
        + review_body(path, "".join(cards)) + review_bar()
        + f"<h1>{len(groups)} groups of copies</h1>" + "".join(cards) + SCRIPT)

"""``crnn-art embed``: the model's embedding of every painting of a split, as parquet tables for retrieval,
clustering and outlier work.

Each process embeds its own positions of the split (every ``world``-th, no padding, so each row once) and
writes its own shard, ``<split>-<rank>-of-<world>.parquet``, sorted by row: nothing large travels between
processes. ``datasets.load_dataset("parquet", data_dir=FOLDER)`` gives one ``Dataset`` per split (the file
names say which); ``data_files="FOLDER/*.parquet"`` gives them all as one. Columns: ``row`` (the row id in
the run's source), ``split``,
``path`` (as the source records it, '' where it holds only bytes), ``decoded`` (False where the image could not be
decoded: its row holds a blank image's embedding and no labels), per head ``<head>_label`` (the given label's
name, null where unknown), ``<head>_predicted`` and ``<head>_confidence`` (softmax probability of the prediction),
and ``embedding`` (float32, the model's pooled embedding before dropout: 3,072 for ResNet-50, the backbone's
channels + 4 x gru_hidden in general).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from crnn_art.data.schema import SPLITS
from crnn_art.errors import DataError


def embedding_folder(run_dir: Path, model_folder: Path) -> Path:
    """Where ``embed`` writes by default: ``RUN/embeddings_<model>`` (``embeddings_best``, ``embeddings_last``)."""
    return run_dir / f"embeddings_{model_folder.name}"


def embed_splits(checkpoint: str, split: str = "all", output_dir: str | None = None,
                 batch_size: int | None = None) -> Path:
    """Embed ``split`` (or every split, ``all``) of a run's data with its model; returns the folder written.

    Raises ``DataError`` for an unknown split and ``ModelLoadError`` for a checkpoint that is not a run's model.
    """
    from crnn_art.console import make_console, make_progress
    from crnn_art.evaluation.evaluate import open_run_split

    if split != "all" and split not in SPLITS:
        raise DataError(f"--split {split!r} is not a split; choose one of {', '.join(SPLITS)} or all")
    out = None
    for name in SPLITS if split == "all" else (split,):
        try:
            run = open_run_split(checkpoint, name)
        except DataError:
            if split != "all":
                raise
            continue  # an empty split (test_fraction=0, a folder without test/): nothing to embed
        acc = run.accelerator
        out = Path(output_dir) if output_dir else embedding_folder(run.run_dir, run.folder)
        console = make_console(acc.is_main_process)
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        with make_progress(console, acc.is_main_process) as progress:
            table = _embed_shard(run, name, batch_size or run.cfg.train.eval_batch_size, progress)
        path = out / f"{name}-{acc.process_index:05d}-of-{acc.num_processes:05d}.parquet"
        table.to_parquet(str(path))
        acc.wait_for_everyone()
        console.print(f"embedded the {len(run.rows)} paintings of the {name} split with {run.folder} into {out}/")
    return out


@torch.no_grad()
def _embed_shard(run, split: str, batch_size: int, progress) -> Any:
    """This process's rows of the split: embeddings, predictions and labels, as a ``datasets.Dataset``."""
    from datasets import Dataset
    from torch.utils.data import Subset

    from crnn_art.data.loaders import eval_loader
    from crnn_art.evaluation.outliers import embed_shard
    from crnn_art.runtime import fit_to_cores

    acc, model, dataset = run.accelerator, run.model.to(run.accelerator.device).eval(), run.dataset
    positions = list(range(acc.process_index, len(dataset), acc.num_processes))
    loader = eval_loader(Subset(dataset, positions), batch_size, fit_to_cores(run.cfg.data.num_workers).workers)
    heads = tuple(model.class_names)
    failed: list[int] = []
    z, logits, labels, rows = embed_shard(model, loader, acc.device, acc.autocast, heads, progress, normalize=False,
                                          failed=failed)
    paths = dataset.paths()
    columns: dict[str, Any] = {"row": rows.cpu().numpy(), "split": [split] * len(positions),
                               "path": [paths[p] for p in positions],
                               "decoded": ~np.isin(rows.cpu().numpy(), np.array(failed, dtype=np.int64))}
    label_ids = labels.cpu().numpy()
    for i, (head, names) in enumerate(model.class_names.items()):
        p = logits[head].softmax(dim=1).cpu()
        columns[f"{head}_label"] = [names[k] if k >= 0 else None for k in label_ids[:, i].tolist()]
        columns[f"{head}_predicted"] = [names[k] for k in p.argmax(dim=1).tolist()]
        columns[f"{head}_confidence"] = p.max(dim=1).values.numpy() if len(p) else np.zeros(0, dtype=np.float32)
    columns["embedding"] = list(z.cpu().numpy())
    return Dataset.from_dict(columns, features=_features(model)).sort("row")


def _features(model):
    """Fixed column types, so that every shard (an empty one, one whose labels are all unknown) reads as one table."""
    from datasets import Features, Sequence, Value

    columns = {"row": Value("int64"), "split": Value("string"), "path": Value("string"), "decoded": Value("bool")}
    for head in model.class_names:
        columns.update({f"{head}_label": Value("string"), f"{head}_predicted": Value("string"),
                        f"{head}_confidence": Value("float32")})
    return Features({**columns, "embedding": Sequence(Value("float32"), length=model.embedding_dim)})

"""``crnn-art evaluate``: a run's model on one split of the run's own data, across all launched processes, with
the outputs named after the evaluated weights (``RUN/eval_<split>_<model>/``, with their SHA-256)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crnn_art.data.duplicates import copies_file, read_groups, rows_with_a_copy_in
from crnn_art.evaluation.metrics import METRIC_KEYS, Predictions, compute_metrics, gather_predictions


def _name_in_run(folder: Path, run_dir: Path) -> str:
    try:
        return folder.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(folder)


def evaluation_folder(run_dir: Path, folder: Path, split: str) -> Path:
    """``RUN/eval_<split>_<model>``: one folder per evaluated model (``eval_test_best``, ``eval_test_last_ema``)."""
    return run_dir / f"eval_{split}_{_name_in_run(folder, run_dir).replace('/', '-')}"


def find_evaluation(run_dir: Path, model_dir: Path, split: str = "test") -> tuple[dict[str, Any], Path] | None:
    """The newest evaluation in ``run_dir`` of exactly these weights (by SHA-256) on ``split``, with its folder."""
    from crnn_art.checkpoints import weights_sha256

    sha = weights_sha256(model_dir)
    found = []
    for path in Path(run_dir).glob("eval_*/metrics.json"):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if metrics.get("split") == split and (metrics.get("model") or {}).get("sha256") == sha:
            found.append((path.stat().st_mtime, metrics, path.parent))
    if not found:
        return None
    _, metrics, folder = max(found, key=lambda item: item[0])
    return metrics, folder


@dataclass
class RunSplit:
    """A trained run opened on one split of its own data, ready to evaluate or score."""

    cfg: Any
    run_dir: Path
    folder: Path
    accelerator: Any
    model: Any
    dataset: Any  # loaders.PaintingDataset with the eval transform
    rows: np.ndarray
    note: str = ""  # which model folder was chosen, when the user gave a run without best/
    labels: Any = None  # data.sources.TaskLabels of every row (review overrides applied)


def open_run_split(checkpoint: str, split: str) -> RunSplit:
    """Resolve a run folder (or its best/, last/), build the Accelerator, load the model strictly,
    and open the split's rows of the run's own source with the run's own task labels."""
    from crnn_art.checkpoints import load_model_folder, resolve_model_folder
    from crnn_art.config import load_run_config
    from crnn_art.data.build import STREAMED, split_dataset
    from crnn_art.data.schema import SPLITS
    from crnn_art.data.sources import check_overrides_unchanged, open_source, read_splits, task_labels
    from crnn_art.data.transforms import eval_resize, eval_transform
    from crnn_art.errors import DataError, ModelLoadError
    from crnn_art.runtime import make_accelerator

    if split not in SPLITS:
        raise DataError(f"--split {split!r} is not a split; choose one of {', '.join(SPLITS)}")
    found = resolve_model_folder(checkpoint)
    folder, run_dir = found.path, found.run_dir
    if run_dir is None:
        raise ModelLoadError(f"{checkpoint} is a model folder outside a run: this command needs the run it came from "
                             "(its config.yaml and split.json); pass the run folder")
    cfg = load_run_config(run_dir / "config.yaml")
    rows = read_splits(run_dir / "split.json")[split]
    check_overrides_unchanged(run_dir, cfg.data)
    if len(rows) == 0:
        raise DataError(f"the run's {split} split is empty; pick another split")
    model = load_model_folder(folder)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    with accelerator.local_main_process_first():
        opened = open_source(cfg.data)
    labels = task_labels(opened.dataset, cfg.heads, cfg.data)
    if labels.class_names != model.class_names:
        raise ModelLoadError(
            f"{folder}'s class names differ from those of its data ({cfg.data.source}); "
            "was the source changed since training?"
        )
    size = model.image_size
    with accelerator.local_main_process_first():
        dataset = split_dataset(opened, rows, labels.labels, eval_transform(size, model.mean, model.std),
                                eval_resize(size), run_dir / STREAMED, split)
    return RunSplit(cfg, run_dir, folder, accelerator, model, dataset, rows, found.note, labels)


def copied_rows(run: RunSplit, split: str) -> tuple[Path, np.ndarray] | None:
    """The duplicates file and the rows of ``split`` that have a copy in the run's train split; None when the run
    has no duplicates file or ``split`` is train. Read before any prediction: a damaged file or one written for
    another source raises ``DataError`` (one line) before the work, not after it."""
    from crnn_art.data.sources import read_splits

    path = copies_file(run.cfg.data.duplicates, run.run_dir)
    if path is None or split == "train":
        return None
    train = read_splits(run.run_dir / "split.json")["train"]
    return path, rows_with_a_copy_in(run.rows, train, read_groups(path, len(run.labels.labels)))


def copies_in_train(run: RunSplit, found: tuple[Path, np.ndarray] | None, pred: Predictions) -> dict[str, Any] | None:
    """How many of the split's rows have a copy in the run's train split (``found``: from ``copied_rows``), and
    the metrics without them.

    With ``data.split_by=row`` a painting filed twice can land in train and in test, and the test figure then
    rewards memory. The groups of copies come from the run's own ``duplicates/duplicates.json``
    (``crnn-art duplicates --checkpoint RUN``) or ``data.duplicates``.
    """
    if found is None:
        return None
    path, copied = found
    keep = ~torch.isin(pred["rows"], torch.from_numpy(copied))
    without = Predictions(logits={h: v[keep] for h, v in pred["logits"].items()}, labels=pred["labels"][keep],
                          rows=pred["rows"][keep])
    return {"rows": len(copied), "of": len(run.rows), "duplicates": str(path),
            "metrics_without_them": compute_metrics(without, run.cfg.heads) if bool(keep.any()) else None}


def _copies_line(copies: dict[str, Any] | None, split: str, run_dir: Path) -> str:
    if copies is None:
        return (f"copies of {split} paintings in train: not checked (run `crnn-art duplicates --checkpoint {run_dir}`,"
                " then evaluate again)")
    verb = "has" if copies["rows"] == 1 else "have"
    line = f"{copies['rows']} of {copies['of']} {split} rows {verb} a copy in train ({copies['duplicates']})"
    rest = copies["metrics_without_them"]
    if copies["rows"] and rest is not None and rest.get("top1") is not None:
        line += f"; without them: top-1 {rest['top1']:.2f}, macro-F1 {rest['macro_f1']:.2f}"
    elif copies["rows"]:
        line += "; no labelled row is left without them to measure"
    return line


def evaluate_checkpoint(checkpoint: str, split: str = "test", output_dir: str | None = None,
                        batch_size: int | None = None) -> dict[str, Any]:
    """Evaluate a run's model on one split of the run's own data, across all launched processes.

    ``checkpoint`` is a run folder (its ``best/`` is used) or a ``best/``/``last/`` folder inside
    one; the run's ``config.yaml`` and ``split.json`` say which data and rows to use.
    """
    from crnn_art.checkpoints import weights_sha256
    from crnn_art.console import make_console, make_progress, metrics_table, per_class_table
    from crnn_art.data.loaders import eval_loader
    from crnn_art.evaluation.reports import add_reports
    from crnn_art.runtime import fit_to_cores

    run = open_run_split(checkpoint, split)
    cfg, run_dir, folder, accelerator, model, dataset = (run.cfg, run.run_dir, run.folder, run.accelerator,
                                                         run.model, run.dataset)
    found = copied_rows(run, split)
    console = make_console(accelerator.is_main_process)
    console.print(f"evaluating {folder} on the {split} split" + (f" (note: {run.note})" if run.note else ""))
    workers = fit_to_cores(cfg.data.num_workers).workers
    loader = accelerator.prepare(eval_loader(dataset, batch_size or cfg.train.eval_batch_size, workers))
    model_names = model.class_names
    model = accelerator.prepare(model)
    with make_progress(console, accelerator.is_main_process) as progress:
        pred = gather_predictions(model, loader, accelerator, cfg.heads, progress)
    metrics = compute_metrics(pred, cfg.heads)
    metrics["split"] = split
    metrics["model"] = {"folder": _name_in_run(folder, run_dir), "sha256": weights_sha256(folder)}
    copies = copies_in_train(run, found, pred)
    if copies is not None:
        metrics["copies_in_train"] = copies
    if accelerator.is_main_process:
        out = Path(output_dir) if output_dir else evaluation_folder(run_dir, folder, split)
        out.mkdir(parents=True, exist_ok=True)
        add_reports(metrics, pred, cfg.heads, model_names, out, f"{split} split, {_name_in_run(folder, run_dir)}")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        table = metrics_table(metrics, cfg.heads, METRIC_KEYS,
                              f"{split} metrics of {folder} (%; loss is cross-entropy)")
        console.print(table)
        for head in cfg.heads:
            per_class = metrics["per_class"] if len(cfg.heads) == 1 else metrics["heads"].get(head, {}).get("per_class")
            if per_class:
                console.print(per_class_table(head, per_class))
        if split != "train":
            console.print(_copies_line(copies, split, run_dir))
        console.print(f"written {out}/: metrics.json, classification_report*.txt, confusion_matrix*.csv/.png")
    accelerator.end_training()
    return metrics

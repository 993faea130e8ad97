"""Evaluation over a whole split, across all processes, each sample counted once (SPEC §4).

Per-sample logits, labels and row ids are gathered with ``gather_for_metrics`` (which drops the
padding Accelerate adds to the last batch so that every process has as many batches), never
per-process means; metrics are then computed on the full arrays, identically on every process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

METRIC_KEYS = ("loss", "top1", "top5", "macro_f1", "weighted_f1")


class Predictions(dict):
    """``logits`` (task -> (N, C) float), ``labels`` (N, heads) int64, ``rows`` (N,) int64, on CPU."""


@torch.no_grad()
def predict(model, loader, accelerator, heads: tuple[str, ...], progress=None) -> Predictions:
    model.eval()
    logits: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    labels, rows = [], []
    task = progress.add_task("evaluate", total=len(loader), status="") if progress is not None else None
    for batch in loader:
        with accelerator.autocast():
            out = model(batch["image"])
        gathered = accelerator.gather_for_metrics(
            ({h: out.logits[h].float() for h in heads}, batch["labels"], batch["row"])
        )
        for h in heads:
            logits[h].append(gathered[0][h].cpu())
        labels.append(gathered[1].cpu())
        rows.append(gathered[2].cpu())
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    all_rows = torch.cat(rows)
    if len(torch.unique(all_rows)) != len(all_rows):
        raise RuntimeError(
            f"evaluation gathered {len(all_rows)} predictions for {len(torch.unique(all_rows))} distinct rows: "
            "a sample was counted twice (is the loader an IterableDataset without a length?)"
        )
    return Predictions(
        logits={h: torch.cat(v) for h, v in logits.items()},
        labels=torch.cat(labels),
        rows=all_rows,
    )


TOP5_MIN_CLASSES = 6
"""Top-5 is reported only for heads with more than 5 classes (with 5 or fewer it is always 100): else None."""


def head_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None] | None:
    """Loss, top-1/top-5 (%), macro/weighted F1 (%) over samples with a known label; None if none.

    One class set for every averaged metric, in every file: the classes **present in the split's labels**
    (support > 0). A prediction of an absent class still counts against the true class's recall, but an
    absent class's own F1 (undefined: no sample to find) is not averaged in. ``top5`` is None for heads
    of 5 or fewer classes.
    """
    mask = labels >= 0
    if not bool(mask.any()):
        return None
    logits, labels = logits[mask].float(), labels[mask]
    pred = logits.argmax(dim=1)
    y, p = labels.numpy(), pred.numpy()
    present = np.unique(y)
    top5 = None
    if logits.shape[1] >= TOP5_MIN_CLASSES:
        top5 = 100.0 * float((logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).float().mean())
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "top1": 100.0 * float((pred == labels).float().mean()),
        "top5": top5,
        "macro_f1": 100.0 * float(f1_score(y, p, labels=present, average="macro", zero_division=0)),
        "weighted_f1": 100.0 * float(f1_score(y, p, labels=present, average="weighted", zero_division=0)),
        "num_samples": int(mask.sum()),
        "classes_evaluated": len(present),
    }


def compute_metrics(pred: Predictions, heads: tuple[str, ...]) -> dict[str, Any]:
    """One head: its metrics at the top level. Several: the mean of heads at the top level, each head
    under ``heads``, and ``joint_exact_match`` (% of samples with all labels known and all right)."""
    per_head = {}
    for i, h in enumerate(heads):
        m = head_metrics(pred["logits"][h], pred["labels"][:, i])
        if m is not None:
            per_head[h] = m
    decoded = (pred["labels"] >= 0).any(dim=1)  # undecodable files come back with every label -1
    counts = {"num_samples": int(decoded.sum()), "skipped": int((~decoded).sum())}
    result: dict[str, Any] = dict(counts)
    if len(heads) == 1:
        result.update(per_head.get(heads[0], {}))
        result.update(counts)
        return result
    for key in METRIC_KEYS:  # the mean over heads where the metric applies
        values = [m[key] for m in per_head.values() if m.get(key) is not None]
        result[key] = float(np.mean(values)) if values else None
    result["heads"] = per_head
    all_known = (pred["labels"] >= 0).all(dim=1)
    correct = torch.stack(
        [pred["logits"][h].argmax(dim=1) == pred["labels"][:, i] for i, h in enumerate(heads)], dim=1
    ).all(dim=1)
    n_joint = int(all_known.sum())
    result["joint_exact_match"] = 100.0 * float(correct[all_known].float().mean()) if n_joint else 0.0
    result["joint_samples"] = n_joint
    return result


def fmt(value: float | None, digits: int) -> str:
    """A metric as printed: ``n/a`` where it does not apply (top-5 on a head of 5 or fewer classes)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def selection_score(metrics: dict[str, Any], heads: tuple[str, ...]) -> float:
    """Model selection (SPEC §3): top-1, or joint exact match for the combined task."""
    return float(metrics["joint_exact_match"] if len(heads) > 1 else metrics["top1"])


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


def open_run_split(checkpoint: str, split: str) -> RunSplit:
    """Resolve a run folder (or its best/, last/), build the Accelerator, load the model strictly,
    and open the split's rows of the run's own source with the run's own task labels."""
    from crnn_art.checkpoints import load_model_folder, resolve_model_folder
    from crnn_art.config import load_run_config
    from crnn_art.loaders import STREAMED, split_dataset
    from crnn_art.model import ModelLoadError
    from crnn_art.runtime import make_accelerator
    from crnn_art.sources import SPLITS, DataError, open_source, read_splits, task_labels
    from crnn_art.transforms import eval_resize, eval_transform

    if split not in SPLITS:
        raise DataError(f"--split {split!r} is not a split; choose one of {', '.join(SPLITS)}")
    found = resolve_model_folder(checkpoint)
    folder, run_dir = found.path, found.run_dir
    if run_dir is None:
        raise ModelLoadError(f"{checkpoint} is a model folder outside a run: this command needs the run it came from "
                             "(its config.yaml and split.json); pass the run folder")
    cfg = load_run_config(run_dir / "config.yaml")
    rows = read_splits(run_dir / "split.json")[split]
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
        dataset = split_dataset(opened, rows, labels.labels, eval_transform(size), eval_resize(size),
                                run_dir / STREAMED, split)
    return RunSplit(cfg, run_dir, folder, accelerator, model, dataset, rows, found.note)


def evaluate_checkpoint(checkpoint: str, split: str = "test", output_dir: str | None = None,
                        batch_size: int | None = None) -> dict[str, Any]:
    """Evaluate a run's model on one split of the run's own data, across all launched processes.

    ``checkpoint`` is a run folder (its ``best/`` is used) or a ``best/``/``last/`` folder inside
    one; the run's ``config.yaml`` and ``split.json`` say which data and rows to use.
    """
    from rich.console import Console

    from crnn_art.checkpoints import weights_sha256
    from crnn_art.loaders import eval_loader
    from crnn_art.reports import add_reports
    from crnn_art.training import make_progress, metrics_table, per_class_table

    run = open_run_split(checkpoint, split)
    cfg, run_dir, folder, accelerator, model, dataset = (run.cfg, run.run_dir, run.folder, run.accelerator,
                                                         run.model, run.dataset)
    console = Console(quiet=not accelerator.is_main_process, highlight=False)
    console.print(f"evaluating {folder} on the {split} split" + (f" (note: {run.note})" if run.note else ""))
    loader = accelerator.prepare(eval_loader(dataset, batch_size or cfg.train.eval_batch_size, cfg.data.num_workers))
    model_names = model.class_names
    model = accelerator.prepare(model)
    with make_progress(console, accelerator.is_main_process) as progress:
        pred = predict(model, loader, accelerator, cfg.heads, progress)
    metrics = compute_metrics(pred, cfg.heads)
    metrics["split"] = split
    metrics["model"] = {"folder": _name_in_run(folder, run_dir), "sha256": weights_sha256(folder)}
    if accelerator.is_main_process:
        out = Path(output_dir) if output_dir else evaluation_folder(run_dir, folder, split)
        out.mkdir(parents=True, exist_ok=True)
        add_reports(metrics, pred, cfg.heads, model_names, out, f"{split} split, {_name_in_run(folder, run_dir)}")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        table = metrics_table(metrics, cfg.heads)
        table.title = f"{split} metrics of {folder} (%; loss is cross-entropy)"
        console.print(table)
        for head in cfg.heads:
            per_class = metrics["per_class"] if len(cfg.heads) == 1 else metrics["heads"].get(head, {}).get("per_class")
            if per_class:
                console.print(per_class_table(head, per_class))
        console.print(f"written {out}/: metrics.json, classification_report*.txt, confusion_matrix*.csv/.png")
    accelerator.end_training()
    return metrics

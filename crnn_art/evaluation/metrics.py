"""Evaluation over a whole split, across all processes, each sample counted once (docs/evaluation.md).

Per-sample logits, labels and row ids are gathered with ``gather_for_metrics`` (which drops the
padding Accelerate adds to the last batch so that every process has as many batches), never
per-process means; metrics are then computed on the full arrays, identically on every process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

METRIC_KEYS = ("loss", "top1", "top5", "macro_f1", "weighted_f1")


class Predictions(dict):
    """``logits`` (task -> (N, C) float), ``labels`` (N, heads) int64, ``rows`` (N,) int64, on CPU."""


@torch.no_grad()
def gather_predictions(model, loader, accelerator, heads: tuple[str, ...], progress=None) -> Predictions:
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
    from sklearn.metrics import f1_score  # imported when first needed: a second of every start-up otherwise

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


def selection_score(metrics: dict[str, Any], heads: tuple[str, ...]) -> float:
    """Model selection (docs/model-and-recipe.md): top-1, or joint exact match for the combined task."""
    return float(metrics["joint_exact_match"] if len(heads) > 1 else metrics["top1"])

"""Report files of an evaluation: per-class metrics, classification report, confusion matrix (CSV, PNG).

Computed from the gathered per-sample predictions of ``evaluation.predict``; scikit-learn does the
counting so the numbers are the ones researchers already trust.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support


def per_class_metrics(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 (%) and support per class name, over every class of the head."""
    labels = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        name: {"precision": 100 * float(p[i]), "recall": 100 * float(r[i]), "f1": 100 * float(f[i]),
               "support": int(s[i])}
        for i, name in enumerate(names)
    }


def write_head_reports(y: np.ndarray, pred: np.ndarray, names: list[str], out: Path, suffix: str = "",
                       title: str = "") -> None:
    """``classification_report{suffix}.txt``, ``confusion_matrix{suffix}.csv`` and ``.png`` in ``out``.

    The report's averages are over the classes present in the split, as in ``metrics.json``; classes of
    the head that are absent are named below it with how often they were predicted."""
    labels = list(range(len(names)))
    present = sorted(set(np.unique(y).tolist()))
    report = classification_report(y, pred, labels=present, target_names=[names[i] for i in present], digits=4,
                                   zero_division=0)
    absent = [i for i in labels if i not in present]
    if absent:
        report += (f"\nAverages are over the {len(present)} classes present in this split. "
                   "Absent (no sample; predicted n times):\n"
                   + "".join(f"  {names[i]}: predicted {int((pred == i).sum())} times\n" for i in absent))
    (out / f"classification_report{suffix}.txt").write_text(report)
    cm = confusion_matrix(y, pred, labels=labels)
    with open(out / f"confusion_matrix{suffix}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, cm, strict=True):
            writer.writerow([name, *row.tolist()])
    plot_confusion_matrix(cm, names, out / f"confusion_matrix{suffix}.png", title)


def plot_confusion_matrix(cm: np.ndarray, names: list[str], path: Path, title: str = "") -> None:
    """Row-normalised colours (each true class sums to 1: recall on the diagonal), each cell annotated with
    its rate and its count; titled with what was evaluated (``title``: split and model). Sized so 27+ class
    names stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    side = max(6.0, 0.45 * n + 3)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=names, rotation=60, ha="right", fontsize=8 if n > 15 else 10)
    ax.set_yticks(range(n), labels=names, fontsize=8 if n > 15 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix{' - ' + title if title else ''}\n(colour: share of the true class; "
                 f"cells: share and count; {int(cm.sum())} paintings)", fontsize=10)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}\n({int(cm[i, j])})", ha="center", va="center",
                            fontsize=5 if n > 15 else 7, color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_reports(metrics: dict[str, Any], pred, heads: tuple[str, ...], class_names: dict[str, list[str]],
                out: Path | None, title: str = "") -> None:
    """Add ``per_class`` to ``metrics`` (per head for several heads) and write the files when ``out``."""
    for i, head in enumerate(heads):
        y_all = pred["labels"][:, i].numpy()
        mask = y_all >= 0
        y = y_all[mask]
        p = pred["logits"][head].argmax(dim=1).numpy()[mask]
        per_class = per_class_metrics(y, p, class_names[head])
        target = metrics if len(heads) == 1 else metrics["heads"].setdefault(head, {})
        target["per_class"] = per_class
        if out is not None and len(y):
            write_head_reports(y, p, class_names[head], out, "" if len(heads) == 1 else f"_{head}",
                               f"{head}: {title}" if len(heads) > 1 and title else title)

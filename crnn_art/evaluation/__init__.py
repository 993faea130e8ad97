"""Evaluation: metrics over a whole split gathered across processes, report files, ``crnn-art evaluate``, and
the paintings whose label does not fit (``crnn-art outliers``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "evaluate_checkpoint": "crnn_art.evaluation.evaluate",
    "find_evaluation": "crnn_art.evaluation.evaluate",
    "open_run_split": "crnn_art.evaluation.evaluate",
    "METRIC_KEYS": "crnn_art.evaluation.metrics",
    "compute_metrics": "crnn_art.evaluation.metrics",
    "gather_predictions": "crnn_art.evaluation.metrics",
    "find_outliers": "crnn_art.evaluation.outliers",
}
"""Public name -> the module that holds it; imported on first use, so that importing one module of the package
does not import the others."""

__all__ = [
    "METRIC_KEYS", "compute_metrics", "evaluate_checkpoint", "find_evaluation", "find_outliers",
    "gather_predictions", "open_run_split"
]

if TYPE_CHECKING:
    from crnn_art.evaluation.evaluate import evaluate_checkpoint, find_evaluation, open_run_split
    from crnn_art.evaluation.metrics import METRIC_KEYS, compute_metrics, gather_predictions
    from crnn_art.evaluation.outliers import find_outliers


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Evaluation: metrics over a whole split gathered across processes, report files, ``crnn-art evaluate``, and
the paintings whose label does not fit (``crnn-art outliers``)."""

from crnn_art.evaluation.evaluate import evaluate_checkpoint, find_evaluation, open_run_split
from crnn_art.evaluation.metrics import METRIC_KEYS, compute_metrics, gather_predictions
from crnn_art.evaluation.outliers import find_outliers

__all__ = ["METRIC_KEYS", "compute_metrics", "evaluate_checkpoint", "find_evaluation", "find_outliers",
           "gather_predictions", "open_run_split"]

"""crnn-art's outlier ranking against cleanlab's, on the same model's probabilities.

For each demo run (after ``crnn-art outliers --checkpoint RUN --split train``), reads the run's known wrong labels
(the demo's ``wrong_labels.csv``), crnn-art's scores (``all_scores.csv``) and the model's probabilities
(``pred_probs_style.npz``), and prints average precision and precision@k (k = the number of wrong labels) of:
crnn-art's score, lowest confidence, ``cleanlab.rank.get_label_quality_scores`` (self-confidence, normalised
margin, confidence-weighted entropy), and ``cleanlab.filter.find_label_issues`` (its own set: size, precision,
recall). cleanlab is AGPL-licensed, so it is a measurement tool here, not a dependency of crnn-art.

Usage: python launch/compare_cleanlab.py RUN [RUN ...]      (launch/outlier_quality makes such runs)
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml


def _precision_at_k(scores: np.ndarray, truth: np.ndarray) -> float:
    k = int(truth.sum())
    top = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return 100.0 * truth[top].sum() / k if k else 0.0


def compare(outliers_dir: Path, wrong_rows: set[int], head: str = "style") -> dict[str, dict[str, float]]:
    """Average precision and precision@k of every scorer on one split's known wrong labels (higher = better)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.metrics import average_precision_score

    saved = np.load(outliers_dir / f"pred_probs_{head}.npz")
    rows, labels, probs = saved["rows"], saved["labels"], saved["pred_probs"]
    truth = np.isin(rows, sorted(wrong_rows))
    with open(outliers_dir / "all_scores.csv", newline="") as fh:
        ours = {int(r["row"]): (float(r["score"]), float(r["p_given"]))
                for r in csv.DictReader(fh) if r["head"] == head}
    scorers = {"crnn-art": np.array([ours[r][0] for r in rows]),
               "low-confidence": 1 - np.array([ours[r][1] for r in rows])}
    for method in ("self_confidence", "normalized_margin", "confidence_weighted_entropy"):
        scorers[f"cleanlab {method}"] = 1 - get_label_quality_scores(labels, probs, method=method)
    result = {name: {"average_precision": 100.0 * float(average_precision_score(truth, s)),
                     "precision_at_k": _precision_at_k(s, truth)} for name, s in scorers.items()}
    issues = find_label_issues(labels, probs)
    result["cleanlab find_label_issues (its set)"] = {
        "set_size": int(issues.sum()), "precision": 100.0 * truth[issues].sum() / max(int(issues.sum()), 1),
        "recall": 100.0 * truth[issues].sum() / max(int(truth.sum()), 1)}
    return result


def wrong_rows_of(run: Path) -> set[int]:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    with open(Path(cfg["data"]["demo_dir"]) / "wrong_labels.csv", newline="") as fh:
        return {int(r["row"]) for r in csv.DictReader(fh)}


def main(runs: list[str]) -> None:
    table = {}
    for run in map(Path, runs):  # keyed by the whole path: runs of several seeds share their last folder name
        table[str(run)] = compare(run / "outliers_train", wrong_rows_of(run))
        print(run, json.dumps(table[str(run)], indent=1))
    names = [n for n in next(iter(table.values())) if "its set" not in n]
    print(f"\n{'scorer':40s} {'mean AP':>8s} {'mean p@k':>9s}")
    for name in names:
        ap = np.mean([t[name]["average_precision"] for t in table.values()])
        pk = np.mean([t[name]["precision_at_k"] for t in table.values()])
        print(f"{name:40s} {ap:8.1f} {pk:9.1f}")
    sets = [t["cleanlab find_label_issues (its set)"] for t in table.values()]
    print(f"cleanlab find_label_issues: {np.mean([s['set_size'] for s in sets]):.0f} rows flagged on average, "
          f"precision {np.mean([s['precision'] for s in sets]):.1f}, recall {np.mean([s['recall'] for s in sets]):.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])

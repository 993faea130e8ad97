"""launch/compare_cleanlab.py: crnn-art's ranking and cleanlab's on the same probabilities, scored the same way."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np

from tests.conftest import ROOT


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_cleanlab", ROOT / "launch" / "compare_cleanlab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_comparison_scores_every_ranker_on_the_known_wrong_labels(tmp_path):
    rng = np.random.default_rng(0)
    n, classes = 300, 4
    labels = rng.integers(0, classes, n)
    truth_class = labels.copy()
    wrong = rng.choice(n, 30, replace=False)
    labels[wrong] = (labels[wrong] + 1) % classes  # the given label is wrong for 30 rows
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), truth_class] += 3  # a model that has learnt the true classes
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rows = np.arange(1000, 1000 + n)
    np.savez_compressed(tmp_path / "pred_probs_style.npz", rows=rows, labels=labels, pred_probs=probs)
    p_given = probs[np.arange(n), labels]
    with open(tmp_path / "all_scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["row", "head", "score", "p_given"])
        writer.writeheader()
        for r, pg, s in zip(rows, p_given, rng.random(n), strict=True):  # crnn-art's score: random here
            writer.writerow({"row": r, "head": "style", "score": s, "p_given": pg})
    result = _compare_module().compare(tmp_path, set((rows[wrong]).tolist()))
    assert result["cleanlab self_confidence"]["average_precision"] > 80  # the probabilities say it all
    assert result["low-confidence"]["average_precision"] == result["cleanlab self_confidence"]["average_precision"]
    assert result["crnn-art"]["average_precision"] < 30  # a random score finds about the base rate (10 %)
    found = result["cleanlab find_label_issues (its set)"]
    assert found["set_size"] > 0 and found["precision"] > 70

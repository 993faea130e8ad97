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


def _scored_split(folder, seed: int = 0) -> set[int]:
    """pred_probs_style.npz and all_scores.csv of a split with 30 known wrong labels (returned), as outliers
    writes them; crnn-art's score is random here."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n, classes = 300, 4
    labels = rng.integers(0, classes, n)
    truth_class = labels.copy()
    wrong = rng.choice(n, 30, replace=False)
    labels[wrong] = (labels[wrong] + 1) % classes  # the given label is wrong for 30 rows
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), truth_class] += 3  # a model that has learnt the true classes
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rows = np.arange(1000, 1000 + n)
    np.savez_compressed(folder / "pred_probs_style.npz", rows=rows, labels=labels, pred_probs=probs)
    p_given = probs[np.arange(n), labels]
    with open(folder / "all_scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["row", "head", "score", "p_given"])
        writer.writeheader()
        for r, pg, s in zip(rows, p_given, rng.random(n), strict=True):
            writer.writerow({"row": r, "head": "style", "score": s, "p_given": pg})
    return set(rows[wrong].tolist())


def test_the_comparison_scores_every_ranker_on_the_known_wrong_labels(tmp_path):
    wrong = _scored_split(tmp_path)
    result = _compare_module().compare(tmp_path, wrong)
    assert result["cleanlab self_confidence"]["average_precision"] > 80  # the probabilities say it all
    assert result["low-confidence"]["average_precision"] == result["cleanlab self_confidence"]["average_precision"]
    assert result["crnn-art"]["average_precision"] < 30  # a random score finds about the base rate (10 %)
    found = result["cleanlab find_label_issues (its set)"]
    assert found["set_size"] > 0 and found["precision"] > 70


def test_the_means_are_over_every_run_even_when_their_folders_share_a_name(tmp_path, capsys):
    """launch/review_loop leaves s0/before, s1/before, ...: each run counts once in the means."""
    module = _compare_module()
    runs, results = [], []
    for seed in (0, 1):
        run = tmp_path / f"s{seed}" / "before"
        wrong = _scored_split(run / "outliers_train", seed)
        (tmp_path / f"data{seed}").mkdir()
        with open(tmp_path / f"data{seed}" / "wrong_labels.csv", "w") as fh:
            fh.write("row\n" + "\n".join(map(str, sorted(wrong))) + "\n")
        (run / "config.yaml").write_text(f"data:\n  demo_dir: {tmp_path / f'data{seed}'}\n")
        runs.append(str(run))
        results.append(module.compare(run / "outliers_train", wrong))
    module.main(runs)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("low-confidence"))
    mean_ap = np.mean([r["low-confidence"]["average_precision"] for r in results])
    assert results[0]["low-confidence"] != results[1]["low-confidence"]
    assert line.split()[1] == f"{mean_ap:.1f}"

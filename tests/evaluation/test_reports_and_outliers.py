"""Evaluation metrics equal scikit-learn's; outlier scoring finds flipped labels; the reduction is exact."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, top_k_accuracy_score

from crnn_art.evaluation.metrics import Predictions, compute_metrics, head_metrics
from crnn_art.evaluation.outliers import (
    apply_rules,
    centroids_from_sums,
    class_sums,
    gather_references,
    knn_agreement,
    project,
    quality,
    rank,
    reference_mask,
    score_head,
)
from crnn_art.evaluation.reports import add_reports
from tests.conftest import run_cli, scratch, tiny_overrides


def test_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(size=(300, 7)), dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, 7, 300))
    logits[torch.arange(150), labels[:150]] += 2.0  # better than chance, not perfect
    m = head_metrics(logits, labels)
    y, p = labels.numpy(), logits.argmax(1).numpy()
    assert m["top1"] == pytest.approx(100 * accuracy_score(y, p))
    assert m["top5"] == pytest.approx(100 * top_k_accuracy_score(y, logits.numpy(), k=5, labels=range(7)))
    assert m["macro_f1"] == pytest.approx(100 * f1_score(y, p, average="macro"))
    assert m["weighted_f1"] == pytest.approx(100 * f1_score(y, p, average="weighted"))
    assert m["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)

    pred = Predictions(logits={"style": logits}, labels=labels[:, None], rows=torch.arange(300))
    metrics = compute_metrics(pred, ("style",))
    add_reports(metrics, pred, ("style",), {"style": [f"c{i}" for i in range(7)]}, None)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=range(7), zero_division=0)
    for i in range(7):
        got = metrics["per_class"][f"c{i}"]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (100 * prec[i], 100 * rec[i], 100 * f1[i], sup[i]))


def test_one_class_set_for_every_averaged_metric_in_every_file(tmp_path):
    """5 classes: 0-2 in the split, 3 absent but predicted once, 4 absent and never predicted. metrics.json and the
    classification report average over the 3 present classes (sklearn's default would average over 4, a report
    over all 5 over 5)."""
    from crnn_art.evaluation.reports import write_head_reports

    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 1, 1, 2, 3])
    logits = F.one_hot(torch.as_tensor(p), 5).float() * 4
    m = head_metrics(logits, torch.as_tensor(y))
    expected = 100 * (1 + 1 + 2 / 3) / 3  # class 2: precision 1, recall 1/2
    assert m["macro_f1"] == pytest.approx(expected) and m["classes_evaluated"] == 3
    assert m["weighted_f1"] == pytest.approx(expected)  # equal supports
    names = ["a", "b", "c", "d", "e"]
    write_head_reports(y, p, names, tmp_path)
    report = (tmp_path / "classification_report.txt").read_text()
    macro = next(line for line in report.splitlines() if line.strip().startswith("macro avg")).split()
    assert float(macro[4]) == pytest.approx(expected / 100, abs=1e-4)
    assert "d: predicted 1 times" in report and "e: predicted 0 times" in report


@pytest.mark.parametrize(("classes", "applies"), [(2, False), (5, False), (6, True), (27, True)])
def test_top5_is_not_applicable_to_heads_of_5_or_fewer_classes(classes, applies):
    logits = torch.randn(20, classes, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % classes
    m = head_metrics(logits, labels)
    assert (m["top5"] is not None) == applies
    if applies:
        assert m["top5"] == pytest.approx(100 * top_k_accuracy_score(labels.numpy(), logits.numpy(), k=5,
                                                                     labels=range(classes)))


def test_combined_metrics_skip_unknown_labels_and_report_joint_match():
    logits = {"style": torch.tensor([[3.0, 0], [0, 3.0], [3.0, 0]]),
              "artist": torch.tensor([[3.0, 0], [3.0, 0], [0, 3.0]])}
    labels = torch.tensor([[0, 0], [1, -1], [1, 1]])
    m = compute_metrics(Predictions(logits=logits, labels=labels, rows=torch.arange(3)), ("style", "artist"))
    assert m["heads"]["style"]["top1"] == pytest.approx(200 / 3)
    assert m["heads"]["artist"]["num_samples"] == 2 and m["heads"]["artist"]["top1"] == 100
    assert m["joint_samples"] == 2 and m["joint_exact_match"] == 50
    assert m["top1"] == pytest.approx((200 / 3 + 100) / 2)


def _clusters(n_per_class=40, classes=4, dim=32, flips=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    true = np.repeat(np.arange(classes), n_per_class)
    z = centres[true] + rng.normal(size=(len(true), dim))
    given = true.copy()
    flipped = rng.choice(len(true), flips, replace=False)
    given[flipped] = (true[flipped] + 1) % classes
    logits = torch.as_tensor(-((z[:, None, :] - centres[None]) ** 2).sum(-1) / 10, dtype=torch.float32)
    z = F.normalize(torch.as_tensor(z, dtype=torch.float32), dim=1)
    return z, logits, torch.as_tensor(given), set(flipped.tolist())


def test_flipped_labels_rank_at_the_top():
    z, logits, given, flipped = _clusters()
    rows = torch.arange(len(given))
    sums, counts = class_sums(z, given, 4)
    zp = project(z)
    agreement = knn_agreement(zp, given, rows, *gather_references(zp, given, rows, counts))
    scored = score_head("style", z, logits, given, rows, centroids_from_sums(sums, counts), agreement)
    apply_rules(scored)
    ranked = rank(scored)
    assert {s.row for s in ranked[: len(flipped)]} == flipped
    assert all("confident_mismatch" in s.flags or "small_margin" in s.flags for s in ranked[: len(flipped)])
    assert all("neighbours_disagree" in s.flags for s in ranked[: len(flipped)])
    q = quality(ranked, flipped)
    assert q["crnn-art"]["precision_at_k"] == 100.0


def test_centroid_reduction_equals_single_process():
    z, _, given, _ = _clusters(seed=1)
    whole_sums, whole_counts = class_sums(z, given, 4)
    parts = [class_sums(z[i::3], given[i::3], 4) for i in range(3)]  # three "processes" with strided shards
    sums = sum(p[0] for p in parts)
    counts = sum(p[1] for p in parts)
    torch.testing.assert_close(sums, whole_sums)
    torch.testing.assert_close(counts, whole_counts)
    torch.testing.assert_close(centroids_from_sums(sums, counts), centroids_from_sums(whole_sums, whole_counts))


def test_neighbour_agreement_equals_brute_force_nearest_neighbours():
    """knn_agreement against scikit-learn's exact cosine neighbours, each sample's own row left out."""
    from sklearn.neighbors import NearestNeighbors

    z, _, given, _ = _clusters(seed=2)
    rows = torch.arange(len(given)) * 3 + 7  # row ids need not be positions
    agreement = knn_agreement(z, given, rows, z, given, rows, k=5)
    nn = NearestNeighbors(n_neighbors=6, metric="cosine", algorithm="brute").fit(z.numpy())
    _, idx = nn.kneighbors(z.numpy())
    expected = [(given[[j for j in row if j != i][:5]] == given[i]).float().mean() for i, row in enumerate(idx)]
    torch.testing.assert_close(agreement, torch.stack(expected))


def test_references_do_not_depend_on_the_number_of_processes():
    """Each class keeps about max_references / classes references (all of a small class), by row id only."""
    rng = np.random.default_rng(0)
    labels = torch.as_tensor(np.concatenate([np.zeros(5000), np.ones(3000), np.full(40, 2)]).astype(np.int64))
    rows = torch.as_tensor(rng.permutation(len(labels)) + 1000)
    counts = torch.bincount(labels)
    whole = reference_mask(rows, labels, counts, max_references=600)
    strided = [reference_mask(rows[i::3], labels[i::3], counts, max_references=600) for i in range(3)]
    assert sorted(rows[whole].tolist()) == sorted(r for i in range(3) for r in rows[i::3][strided[i]].tolist())
    kept = torch.bincount(labels[whole], minlength=3)
    assert 150 <= kept[0] <= 250 and 150 <= kept[1] <= 250 and kept[2] == 40


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, demo_dir):
    with scratch(tmp_path_factory) as folder:
        run = folder / "short"
        run_cli(["train", "--output-dir", str(run), *tiny_overrides(demo_dir, train__epochs=1, train__max_steps=6)])
        yield run


def test_evaluate_writes_reports_that_name_the_classes(short_run, tmp_path):
    run_cli(["evaluate", "--checkpoint", str(short_run), "--split", "test", "--output-dir", str(tmp_path)])
    names = ["Color_Field_Painting", "Impressionism", "Minimalism", "Pointillism"]
    report = (tmp_path / "classification_report.txt").read_text()
    assert all(n in report for n in names)
    with open(tmp_path / "confusion_matrix.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0][1:] == names and [r[0] for r in table[1:]] == names
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] > 300


def test_outliers_and_explain_write_their_files(short_run, tmp_path, demo_dir):
    run_cli(["outliers", "--checkpoint", str(short_run), "--split", "train", "--top", "5",
             "--output-dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "outliers.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert float(rows[0]["score"]) >= float(rows[-1]["score"])
    assert all(r["path"] == "" for r in rows)  # the demo holds image bytes only: the row id names the painting
    page = (tmp_path / "out" / "outliers.html").read_text()
    assert page.count("data:image/png;base64,") == 5  # the attention overlay per card
    assert page.count("data:image/jpeg;base64,") == 10  # the whole painting, small and larger
    assert "overflow-wrap:anywhere" in page  # long flag text wraps inside its card
    image = tmp_path / "painting.png"
    Image.new("RGB", (70, 50), (200, 30, 30)).save(image)
    result = run_cli(["explain", "--checkpoint", str(short_run), str(image), "--output-dir", str(tmp_path / "att")])
    assert "painting.png" in result.stdout
    assert Image.open(tmp_path / "att" / "painting_attention.png").size == (64, 32)


def test_outliers_of_an_image_folder_name_the_file_to_fix(tmp_path):
    import json

    from tests.standins.layouts import image_folder

    root = image_folder(tmp_path / "paintings", split_dirs=False)
    run = tmp_path / "run"
    run_cli(["train", "--output-dir", str(run), f"--set=data.source={root}", "--set=data.image_size=32",
             "--set=data.num_workers=0", "--set=model.backbone_weights=null", "--set=augment.mixup_prob=0",
             "--set=augment.cutmix_prob=0", "--set=train.batch_size=8", "--set=train.epochs=1",
             "--set=train.max_steps=2"])
    run_cli(["outliers", "--checkpoint", str(run), "--split", "train", "--top", "4", "--output-dir",
             str(tmp_path / "out")])
    files = {str(p) for p in root.rglob("*.jpg")}
    with open(tmp_path / "out" / "outliers.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(r["path"] in files for r in rows)
    with open(tmp_path / "out" / "all_scores.csv", newline="") as fh:
        assert all(r["path"] in files for r in csv.DictReader(fh))
    listed = json.loads((tmp_path / "out" / "outliers.json").read_text())["outliers"]
    assert [o["path"] for o in listed] == [r["path"] for r in rows]
    page = (tmp_path / "out" / "outliers.html").read_text()
    assert all(f"href='file://{r['path']}'" in page for r in rows)

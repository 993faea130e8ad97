"""Two CPU processes (gloo) through `accelerate launch` with the shipped config, as users run it."""

from __future__ import annotations

import json

import pytest

from crnn_art.data.sources import read_splits
from tests.conftest import read_history, read_json, run_cli, scratch, tiny_overrides


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, demo_dir):
    with scratch(tmp_path_factory) as folder:
        run = folder / "two"
        overrides = tiny_overrides(demo_dir, train__max_steps=3, train__ema_decay=0.5)
        run_cli(["train", "--output-dir", str(run), *overrides], processes=2)
        yield run


def test_two_processes_train_and_count_every_validation_sample_once(two_process_run):
    n_val = len(read_splits(two_process_run / "split.json")["validation"])
    per_step = 2 * 16  # processes x eval batch
    assert n_val % per_step != 0, "the check needs a validation set with a ragged last batch"
    history = read_history(two_process_run)
    assert history[-1]["processes"] == 2 and history[-1]["step"] == 3
    metrics = read_json(two_process_run / "metrics.json")
    assert metrics["num_samples"] == n_val


def test_one_and_two_processes_give_the_same_metrics(two_process_run, tmp_path):
    run_cli(["evaluate", "--checkpoint", str(two_process_run / "last"), "--split", "validation",
             "--output-dir", str(tmp_path / "one")])
    run_cli(["evaluate", "--checkpoint", str(two_process_run / "last"), "--split", "validation",
             "--output-dir", str(tmp_path / "two")], processes=2)
    one, two = read_json(tmp_path / "one" / "metrics.json"), read_json(tmp_path / "two" / "metrics.json")
    final = read_json(two_process_run / "metrics.json")
    assert one["num_samples"] == two["num_samples"] == final["num_samples"]
    assert one["top5"] is two["top5"] is final["top5"] is None  # 4 classes: top-5 does not apply
    for key in ("loss", "top1", "macro_f1", "weighted_f1"):
        assert one[key] == pytest.approx(two[key], abs=1e-4), key
        assert one[key] == pytest.approx(final[key], abs=1e-4), key


def test_the_ema_evaluated_on_two_processes_is_the_saved_one(two_process_run, tmp_path):
    """Each process averages its own BatchNorm statistics into its EMA: all must evaluate the main process's, the
    one saved in last_ema/, so that val_ema is that model's figure."""
    run_cli(["evaluate", "--checkpoint", str(two_process_run / "last_ema"), "--split", "validation",
             "--output-dir", str(tmp_path / "ema")])
    one = read_json(tmp_path / "ema" / "metrics.json")
    during = read_history(two_process_run)[-1]["val_ema"]
    assert one["num_samples"] == during["num_samples"]
    assert one["loss"] == pytest.approx(during["loss"], rel=1e-6, abs=0)


def test_one_and_two_processes_rank_the_same_outliers(two_process_run, tmp_path):
    for name, processes in (("one", 1), ("two", 2)):
        run_cli(["outliers", "--checkpoint", str(two_process_run / "last"), "--split", "train", "--top", "10",
                 "--output-dir", str(tmp_path / name)], processes=processes)
    one = (tmp_path / "one" / "all_scores.csv").read_text().splitlines()
    two = (tmp_path / "two" / "all_scores.csv").read_text().splitlines()
    n_train = len(read_splits(two_process_run / "split.json")["train"])
    assert len(one) == len(two) == n_train + 1
    rows_one = [line.split(",")[1] for line in one]
    rows_two = [line.split(",")[1] for line in two]
    assert rows_one == rows_two


def test_embeddings_of_every_split_are_the_same_table_on_one_and_two_processes(two_process_run, tmp_path):
    """`crnn-art embed`: each row once, with its path, labels, prediction and the model's embedding; the union of
    the two processes' shards equals the one-process table."""
    import numpy as np
    from datasets import load_dataset

    from crnn_art.data.sources import read_splits

    splits = read_splits(two_process_run / "split.json")
    run_cli(["embed", "--checkpoint", str(two_process_run), "--output-dir", str(tmp_path / "one")])
    run_cli(["embed", "--checkpoint", str(two_process_run), "--split", "test", "--output-dir", str(tmp_path / "two")],
            processes=2)
    by_split = load_dataset("parquet", data_dir=str(tmp_path / "one"))  # the file names say the split
    assert {name: len(ds) for name, ds in by_split.items()} == {s: len(splits[s]) for s in splits}
    one = load_dataset("parquet", data_files=str(tmp_path / "one" / "*.parquet"), split="train").sort("row")
    assert sorted(one["row"]) == sorted(np.concatenate([splits[s] for s in ("train", "validation", "test")]).tolist())
    dim = json.loads((two_process_run / "last" / "config.json").read_text())["embedding_dim"]
    assert len(set(one["row"])) == len(one) and len(one[0]["embedding"]) == dim
    assert set(one.column_names) == {"row", "split", "path", "decoded", "style_label", "style_predicted",
                                     "style_confidence", "embedding"}
    assert all(one["decoded"])
    assert sorted(r for r, s in zip(one["row"], one["split"], strict=True) if s == "test") == sorted(splits["test"])
    assert len(list((tmp_path / "two").glob("test-*-of-00002.parquet"))) == 2
    two = load_dataset("parquet", data_dir=str(tmp_path / "two"), split="test").sort("row")
    test_one = one.filter(lambda r: r["split"] == "test")
    assert two["row"] == test_one["row"] and two["path"] == test_one["path"]
    assert two["style_label"] == test_one["style_label"] and two["style_predicted"] == test_one["style_predicted"]
    np.testing.assert_allclose(np.array(two["embedding"]), np.array(test_one["embedding"]), rtol=1e-5, atol=1e-5)

"""Every source trains from the CLI with only data.* keys changed; labels, splits and skips are right."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from datasets import Image

from crnn_art.config import resolve_config
from crnn_art.data.sources import make_splits, open_source, read_splits, task_labels
from tests.conftest import ROOT, read_history, read_json, run_cli
from tests.standins.layouts import artgan_layout, hub_parquet_repo, image_folder

FAST = ["--set=data.image_size=32", "--set=data.num_workers=0", "--set=model.backbone_weights=null",
        "--set=augment.mixup_prob=0.0", "--set=augment.cutmix_prob=0.0", "--set=train.batch_size=8",
        "--set=train.eval_batch_size=16", "--set=train.epochs=1", "--set=train.max_steps=3"]


def train(run, *data_sets: str) -> dict:
    run_cli(["train", "--output-dir", str(run), *FAST, *[f"--set=data.{s}" for s in data_sets]])
    return read_json(run / "metrics.json")


def test_hub_layout_parquet_trains_and_excludes_unknown_labels(tmp_path):
    repo = hub_parquet_repo(tmp_path / "wikiart")
    cfg = resolve_config(None, None, [f"data.source={repo}", "data.task=combined"])
    ds = open_source(cfg.data).dataset
    assert ds.features["artist"].names[0] == "Unknown Artist" and ds.features["genre"].names[-1] == "Unknown Genre"
    labels = task_labels(ds, cfg.heads, cfg.data)
    assert "Unknown Artist" not in labels.class_names["artist"]
    assert "Unknown Genre" not in labels.class_names["genre"]
    raw_artist = np.array(ds["artist"])
    assert (labels.labels[raw_artist == 0, 2] == -1).all()  # unknown artist: no artist label ...
    assert (labels.labels[raw_artist == 0, 0] >= 0).all()   # ... but still a style label
    metrics = train(tmp_path / "run", f"source={repo}", "task=combined")
    assert set(metrics["heads"]) == {"style", "genre", "artist"} and "joint_exact_match" in metrics


def test_artgan_protocol_uses_its_lists_and_class_order(tmp_path):
    lists, images = artgan_layout(tmp_path)
    run = tmp_path / "run"
    train(run, "source=artgan", f"lists_dir={lists}", f"image_root={images}", "task=style")
    splits = read_splits(run / "split.json")
    assert len(splits["train"]) == 48 and len(splits["validation"]) == 20 and len(splits["test"]) == 0
    with open(lists / "style_class.txt") as fh:
        protocol = [line.split()[1] for line in fh if line.strip()]
    from crnn_art import CRNNArtClassifier

    names = CRNNArtClassifier.from_pretrained(str(run / "last")).class_names["style"]
    assert names == [n for n in protocol if n in names]  # the protocol's order, only classes present


def test_artgan_published_list_names_read_like_the_cleaned_ones(tmp_path):
    lists, images = artgan_layout(tmp_path, task="genre", train_rows=12, val_rows=6)
    for suffix in ("train", "val"):
        (lists / f"genre_{suffix}_clean.csv").rename(lists / f"genre_{suffix}.csv")
    cfg = resolve_config(None, None, ["data.source=artgan", f"data.lists_dir={lists}",
                                      f"data.image_root={images}", "data.task=genre"])
    opened = open_source(cfg.data)
    assert len(opened.splits["train"]) == 12 and len(opened.splits["validation"]) == 6


@pytest.mark.parametrize(("line", "problem"), [
    ("Impressionism/a.jpg,-1", "has the label -1, outside 0..9"),
    ("Impressionism/a.jpg,10", "has the label 10, outside 0..9"),
    ("Impressionism/a.jpg,three", "has the label 'three', not an integer"),
    ("Impressionism/a.jpg", "has no label"),
    ("Impressionism/a.jpg,", "has no label"),
])
def test_artgan_list_errors_name_the_file_and_line(tmp_path, line, problem):
    from crnn_art.errors import DataError

    lists, images = artgan_layout(tmp_path, task="genre", train_rows=4, val_rows=2)
    train_list = lists / "genre_train_clean.csv"
    train_list.write_text("path,label\n" + train_list.read_text() + line + "\n")  # a header is allowed
    cfg = resolve_config(None, None, ["data.source=artgan", f"data.lists_dir={lists}",
                                      f"data.image_root={images}", "data.task=genre"])
    with pytest.raises(DataError) as info:
        open_source(cfg.data)
    message = str(info.value)
    assert message.startswith(f"{train_list}, line 6 {problem}") and message.endswith("; fix or remove that line")


def test_artgan_list_with_a_header_line_reads(tmp_path):
    lists, images = artgan_layout(tmp_path, task="genre", train_rows=4, val_rows=2)
    val_list = lists / "genre_val_clean.csv"
    val_list.write_text("path,label\n" + val_list.read_text())
    cfg = resolve_config(None, None, ["data.source=artgan", f"data.lists_dir={lists}",
                                      f"data.image_root={images}", "data.task=genre"])
    assert len(open_source(cfg.data).splits["validation"]) == 2


def test_artgan_23_artist_list_and_missing_root(tmp_path):
    cfg = resolve_config("artist", None, ["data.artist_list=artgan"])
    assert cfg.data.artist_list == "artgan"
    result = run_cli(["train", "--output-dir", str(tmp_path / "r"), "--set=data.source=artgan",
                      f"--set=data.lists_dir={tmp_path}", f"--set=data.image_root={tmp_path}"], check=False)
    assert result.returncode == 2 and "style_class.txt" in result.stderr


def test_image_folder_with_split_folders_and_artist_from_filename(tmp_path):
    root = image_folder(tmp_path / "folder", split_dirs=True)
    cfg = resolve_config(None, None, [f"data.source={root}", "data.artist_from_filename=true"])
    opened = open_source(cfg.data)
    assert opened.splits is not None and len(opened.splits["validation"]) == 15
    assert set(opened.dataset.features["artist"].names) == {"Unknown Artist", "claude-monet", "pablo-picasso",
                                                             "rembrandt"}
    run = tmp_path / "run"
    train(run, f"source={root}")
    assert len(read_splits(run / "split.json")["validation"]) == 15


def test_broken_and_odd_files_are_skipped_and_counted_never_relabelled(tmp_path):
    root = image_folder(tmp_path / "folder", split_dirs=False, with_odd_files=True)
    run = tmp_path / "run"
    run_cli(["train", "--output-dir", str(run), *FAST, f"--set=data.source={root}", "--set=train.max_steps=null",
             "--set=data.val_fraction=0.3", "--set=train.balanced_sampling=false"])
    history = read_history(run)
    opened = open_source(resolve_config(None, None, [f"data.source={root}"]).data)
    paths = opened.dataset.cast_column("image", Image(decode=False))["image"]
    broken = {i for i, cell in enumerate(paths)
              if os.path.basename(cell["path"]) in ("odd_truncated.jpg", "odd_garbage.jpg", "odd_empty.jpg")}
    splits = read_splits(run / "split.json")
    val = history[0]["val"]
    assert val["skipped"] == len(broken & set(splits["validation"].tolist()))
    assert val["num_samples"] + val["skipped"] == len(splits["validation"])
    assert history[0]["skipped_train"] <= len(broken & set(splits["train"].tolist()))
    assert len(broken) == 3 and val["skipped"] + history[0]["skipped_train"] >= 1


def test_prepare_resumes_after_kill_and_keeps_rows_and_splits(tmp_path):
    src = hub_parquet_repo(tmp_path / "wikiart", rows=120)
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "crnn_art", "prepare", "--source", str(src), "--output-dir", str(out),
           "--shard-size", "20", "--num-proc", "1", "--short-side", "40"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "shards").glob("shard_0000[1-9]/shard.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.parent.name for p in (out / "shards").glob("*/shard.json"))
    assert 1 <= len(finished) < 6 and not (out / "prepared.json").exists()
    stamps = {name: (out / "shards" / name / "shard.json").stat().st_mtime_ns for name in finished}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "MB ->" in result.stdout and "images/s" in result.stdout
    for name, stamp in stamps.items():
        assert (out / "shards" / name / "shard.json").stat().st_mtime_ns == stamp  # not redone
    info = json.loads((out / "prepared.json").read_text())
    assert info["rows"] == 120 and info["shards"] == 6
    original = open_source(resolve_config(None, None, [f"data.source={src}"]).data).dataset
    prepared = open_source(resolve_config(None, None, [f"data.source={out}"]).data).dataset
    assert prepared["style"] == original["style"] and prepared["source_row"] == list(range(120))
    assert max(prepared[0]["image"].size) <= max(original[0]["image"].size)
    cfg = resolve_config(None, None, [f"data.source={out}"]).data
    a, b = make_splits(len(original), cfg), make_splits(len(prepared), cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", ["data.source=no/such/dataset/here", "data.source=/nonexistent/folder"])
def test_unknown_sources_fail_in_one_line(tmp_path, bad):
    result = run_cli(["train", "--output-dir", str(tmp_path / "r"), f"--set={bad}"], check=False,
                     env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_label_overrides_relabel_and_drop_by_row_and_refuse_what_does_not_fit(tmp_path, demo_dir):
    """A reviewer's decisions.csv: relabels and drops by row id, before the split; an unknown row, head, label or
    decision is one line naming the file and the line."""
    from crnn_art.config import resolve_config
    from crnn_art.data.sources import open_source, task_labels
    from crnn_art.errors import ConfigError, DataError

    base = ["data.source=demo", f"data.demo_dir={demo_dir}", "data.demo_size=200", "data.demo_image_side=48",
            "data.demo_styles=4"]
    cfg = resolve_config(None, None, base)
    opened = open_source(cfg.data)
    before = task_labels(opened.dataset, cfg.heads, cfg.data)
    names = before.class_names["style"]
    other = names[(before.labels[3, 0] + 1) % len(names)]
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("row,path,head,decision,new_label\n"
                         f"3,,style,relabel,{other}\n7,,style,drop,\n9,,style,keep,\n")
    reviewed = resolve_config(None, None, [*base, f"data.label_overrides={decisions}"]).data
    after = task_labels(opened.dataset, cfg.heads, reviewed)
    assert names[after.labels[3, 0]] == other and after.labels[7, 0] == -1
    assert 7 not in after.known_rows().tolist()
    changed = np.flatnonzero(after.labels[:, 0] != before.labels[:, 0]).tolist()
    assert changed == [3, 7]
    for line, problem in (("999999,,style,drop,", "row 999999 does not exist"),
                          ("3,,genre,drop,", "head 'genre' is not a head of this task"),
                          ("3,,style,relabel,Dadaism-ish", "'Dadaism-ish' is not a class of head style"),
                          ("3,,style,delete,", "decision 'delete' is not one of keep, relabel, drop")):
        decisions.write_text("row,path,head,decision,new_label\n" + line + "\n")
        with pytest.raises(DataError, match=f"line 2: {problem}") as info:
            task_labels(opened.dataset, cfg.heads, reviewed)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="data.label_overrides"):
        resolve_config(None, None, [*base, f"data.label_overrides={tmp_path / 'missing.csv'}"])


def test_a_run_trained_with_label_overrides_says_so_and_refuses_an_edited_file(tmp_path, demo_dir):
    """The card counts what the review changed; a decisions file edited after training would silently give
    evaluate, outliers and a resume other labels than the run's, so each refuses it in one line (nothing lost); a
    resume whose data now gives other splits (a copies file written again) refuses too."""
    from tests.conftest import run_cli, tiny_overrides

    decisions = tmp_path / "decisions.csv"
    original = "row,path,head,decision,new_label\n3,,style,drop,\n7,,style,drop,\n"
    decisions.write_text(original)
    copies = tmp_path / "duplicates.json"
    copies.write_text(json.dumps({"groups": [{"rows": [10, 11]}]}))
    run = tmp_path / "run"
    args = ["train", "--output-dir", str(run), *tiny_overrides(demo_dir, train__max_steps=2),
            f"--set=data.label_overrides={decisions}", "--set=data.split_by=duplicate_group",
            f"--set=data.duplicates={copies}"]
    run_cli(args)
    assert "0 labels relabelled and 2 labels dropped by review" in " ".join(
        (run / "last" / "README.md").read_text().split())
    decisions.write_text("row,path,head,decision,new_label\n3,,style,drop,\n")
    for command in (["evaluate", "--checkpoint", str(run), "--split", "test"],
                    ["outliers", "--checkpoint", str(run), "--split", "train"],
                    [*args, "--set=train.max_steps=4", "--resume", "latest"]):
        result = run_cli(command, check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "changed since" in result.stderr and "put the original back" in result.stderr
    # the labels restored, but the copies file written again so that rows move between splits: a resume refuses
    decisions.write_text(original)
    copies.write_text(json.dumps({"groups": [{"rows": list(range(0, 200, 2))}]}))
    moved = run_cli([*args, "--set=train.max_steps=4", "--resume", "latest"], check=False)
    assert moved.returncode == 2 and len(moved.stderr.strip().splitlines()) == 1, moved.stderr
    assert "rows than" in moved.stderr and "split.json" in moved.stderr
    assert (run / "last" / "model.safetensors").is_file() and len(read_history(run)) == 1

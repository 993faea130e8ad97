"""Streaming: the same rows and splits as the cache, equal steps on every process, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Image

from crnn_art.config import resolve_config
from crnn_art.data.sources import make_splits, open_source, read_splits, task_labels
from crnn_art.data.streaming import balanced_class_weights, node_stream, plan_epochs
from crnn_art.errors import DataError
from crnn_art.training.loss import one_hot_targets, soft_target_loss
from tests.conftest import read_history, read_json, run_cli, scratch
from tests.standins.layouts import hub_parquet_repo

# uneven files, 16-row row groups: 15 shards of unequal size, as real Hub shards are
FILE_ROWS = [70, 150, 40]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    with scratch(tmp_path_factory, "stream") as folder:
        yield hub_parquet_repo(folder / "wikiart", file_rows=FILE_ROWS, row_group=16)


def opened_both(repo, task: str = "combined"):
    cached_cfg = resolve_config(None, None, [f"data.source={repo}", f"data.task={task}"])
    streamed_cfg = resolve_config(None, None, [f"data.source={repo}", f"data.task={task}", "data.streaming=true"])
    return (open_source(cached_cfg.data), cached_cfg), (open_source(streamed_cfg.data), streamed_cfg)


def test_streamed_and_cached_give_the_same_rows_labels_and_splits(repo):
    (cached, ccfg), (streamed, scfg) = opened_both(repo)
    assert streamed.stream is not None and len(streamed.stream.pieces) == 5 + 10 + 3
    c_labels, s_labels = task_labels(cached.dataset, ccfg.heads, ccfg.data), task_labels(streamed.dataset,
                                                                                          scfg.heads, scfg.data)
    assert c_labels.class_names == s_labels.class_names
    np.testing.assert_array_equal(c_labels.labels, s_labels.labels)
    c_splits = make_splits(len(cached.dataset), ccfg.data, c_labels.known_rows())
    s_splits = make_splits(len(streamed.dataset), scfg.data, s_labels.known_rows())
    for name in c_splits:
        np.testing.assert_array_equal(c_splits[name], s_splits[name])
    # every streamed record carries the image bytes of the cached row with the same id
    images = cached.dataset.cast_column("image", Image(decode=False))
    everything = np.ones(len(cached.dataset), dtype=bool)
    records = list(node_stream(streamed.stream, everything, seed=3, buffer_size=20, rank=0, world=1))
    assert sorted(r["row"] for r in records) == list(range(sum(FILE_ROWS)))
    for r in records:
        assert images[r["row"]]["image"]["bytes"] == r["bytes"]


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_reads_what_the_plan_says_and_no_row_twice(repo, world):
    (_, _), (streamed, cfg) = opened_both(repo, "style")
    labels = task_labels(streamed.dataset, cfg.heads, cfg.data)
    train = make_splits(len(streamed.dataset), cfg.data, labels.known_rows())["train"]
    wanted = np.zeros(len(streamed.dataset), dtype=bool)
    wanted[train] = True
    plans = plan_epochs(streamed.stream, wanted, seed=0, buffer_size=20, world=world, local_batch=4, epochs=3)
    orders = []
    for plan in plans:
        shares = []
        for rank in range(world):
            stream = node_stream(streamed.stream, wanted, seed=0, buffer_size=20, rank=rank, world=world)
            stream.set_epoch(plan["epoch"])
            shares.append([r["row"] for r in stream])
        assert [len(s) for s in shares] == plan["rows_per_process"]
        seen = np.concatenate(shares)
        assert len(seen) == len(set(seen.tolist())) == len(train)  # each training row once per epoch
        assert plan["steps"] == min(len(s) for s in shares) // 4
        orders.append(shares[0])
    assert orders[0] != orders[1]  # reshuffled each epoch


@pytest.mark.parametrize("smoothing", [0.0, 0.03, 0.1])
def test_loss_weights_balance_classes_like_cross_entropy_weights(smoothing):
    """Equal to PyTorch's definition: the smoothing term weighs each class by its own weight, and the mean
    is over the weights of the true labels (an unknown label contributes nothing)."""
    labels = np.array([[0], [0], [0], [1], [-1]])
    weights = balanced_class_weights(labels, {"style": 3})["style"]
    torch.testing.assert_close(weights, torch.tensor([4 / 9, 4 / 3, 1.0]))  # N/(K*count); absent class 1
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    targets = one_hot_targets(torch.tensor([[0], [0], [0], [1], [-1]]), [3])
    ours, _ = soft_target_loss({"style": logits}, targets, {"style": 3}, smoothing, {"style": weights})
    expected = F.cross_entropy(logits[:4], torch.tensor([0, 0, 0, 1]), weight=weights, label_smoothing=smoothing)
    torch.testing.assert_close(ours, expected)


def test_streaming_a_local_non_parquet_source_is_a_one_line_error(demo_dir):
    cfg = resolve_config(None, None, ["data.source=demo", f"data.demo_dir={demo_dir}", "data.demo_size=200",
                                      "data.demo_image_side=48", "data.demo_styles=4", "data.streaming=true"])
    with pytest.raises(DataError, match="data.streaming reads parquet.*set data.streaming=false") as info:
        open_source(cfg.data)
    assert "\n" not in str(info.value)


STREAM = ["--set=data.streaming=true", "--set=data.shuffle_buffer=20", "--set=data.image_size=32",
          "--set=data.num_workers=0", "--set=model.backbone_weights=null", "--set=augment.mixup_prob=0.0",
          "--set=augment.cutmix_prob=0.0", "--set=train.batch_size=8", "--set=train.eval_batch_size=16",
          "--set=train.log_every=1", "--set=data.log_rows=true"]


def test_two_processes_stream_uneven_shards_with_equal_steps_and_no_row_twice(repo, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", "--output-dir", str(run), f"--set=data.source={repo}", "--set=train.epochs=2", *STREAM],
            processes=2)
    train = set(read_splits(run / "split.json")["train"].tolist())
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2] and all(h["processes"] == 2 for h in history)
    for epoch in (1, 2):
        shares = [np.load(p) for p in sorted((run / "rows").glob(f"epoch{epoch:03d}-*-rank*.npy"))]
        assert len(shares) == 2 and len(shares[0]) == len(shares[1]) > 0  # the same steps on both processes
        seen = np.concatenate(shares).tolist()
        assert len(seen) == len(set(seen)) and set(seen) <= train
        assert len(seen) >= 0.6 * len(train)  # uneven shares cost a little, not most of the epoch
    metrics = read_json(run / "metrics.json")
    assert metrics["num_samples"] == len(read_splits(run / "split.json")["validation"])
    # evaluation of a streamed run reads the test split once from the stream, on both processes
    run_cli(["evaluate", "--checkpoint", str(run), "--split", "test"], processes=2)
    evaluated = read_json(run / "eval_test_best" / "metrics.json")
    assert evaluated["num_samples"] == len(read_splits(run / "split.json")["test"])
    assert len(list((run / "streamed").glob("test-*"))) == 1
    run_cli(["outliers", "--checkpoint", str(run), "--split", "validation", "--top", "3"])
    assert (run / "outliers_validation" / "outliers.html").stat().st_size > 1000


def test_a_streamed_run_stopped_mid_epoch_resumes_to_the_same_weights(repo, tmp_path):
    """Also with colour jitter and erasing done on the (CPU) device: seeded per step, resumed exactly."""
    from safetensors.torch import load_file

    common = ["--set=data.source=" + str(repo), "--set=train.epochs=2", "--set=augment.mixup_prob=0.3",
              "--set=augment.on_device=true", *STREAM]
    run_cli(["train", "--output-dir", str(tmp_path / "whole"), *common])
    run_cli(["train", "--output-dir", str(tmp_path / "cut"), *common, "--set=train.max_steps=7"])
    run_cli(["train", "--output-dir", str(tmp_path / "cut"), *common, "--resume", "latest"])
    a = load_file(tmp_path / "whole" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    wall_clock = ("epoch_seconds", "images_per_s")
    histories = [[{k: v for k, v in r.items() if k not in wall_clock} for r in read_history(tmp_path / name)]
                 for name in ("whole", "cut")]
    assert histories[0] == histories[1]

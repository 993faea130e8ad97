"""Streaming: the same rows and splits as the cache, equal steps on every process, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Image

from crnn_art.config import resolve_config
from crnn_art.data.partition import (
    Leg,
    ProcessShare,
    epoch_order,
    epoch_shares,
    hub_like_layout,
    planning_figures,
    shuffle_blocks,
    steps_per_epoch,
)
from crnn_art.data.sources import make_splits, open_source, read_splits, task_labels
from crnn_art.data.streaming import balanced_class_weights, read_rows, streamed_batches
from crnn_art.data.transforms import eval_transform
from crnn_art.errors import DataError
from crnn_art.training.loss import one_hot_targets, soft_target_loss
from tests.conftest import TEST_BACKBONE, read_history, read_json, run_cli, scratch
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


def _whole_epoch(stream, wanted: np.ndarray, epoch: int = 1, block: int = 20) -> list[dict]:
    piece_rows = [p.first_row + np.flatnonzero(wanted[p.first_row:p.first_row + p.num_rows]) for p in stream.pieces]
    order = epoch_order(piece_rows, seed=3, epoch=epoch)
    positions = np.arange(len(order))
    return list(read_rows(stream.pieces, order[positions], positions // block))


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
    records = _whole_epoch(streamed.stream, np.ones(len(cached.dataset), dtype=bool))
    assert sorted(r["row"] for r in records) == list(range(sum(FILE_ROWS)))
    for r in records:
        assert images[r["row"]]["image"]["bytes"] == r["bytes"]


def _interleave(share: ProcessShare) -> list[int]:
    """The positions a DataLoader yields from ``share``: its workers in turn (worker i serves logical worker
    (i + rotation) % W), a worker that has run out left out."""
    w = len(share.worker_positions)
    queues = [list(share.worker_positions[(i + share.rotation) % w]) for i in range(w)]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _run_legs(total: int, global_batch: int, accum: int, plan: list[tuple[int, tuple[int, ...], int]]):
    """Simulate an epoch run in legs ``(world, workers, steps)`` (the last leg to the epoch's end): which positions
    each step trained, per process, as the batches would group them."""
    legs: list[Leg] = []
    batch, steps_done = 0, []
    for i, (world, workers, steps) in enumerate(plan):
        legs.append(Leg(world, workers, batch))
        shares = epoch_shares(total, legs, batch, global_batch, accum, epoch=1, seed=0, block=7)
        end = steps_per_epoch(total, global_batch) if i == len(plan) - 1 else batch + steps
        streams = [_interleave(s) for s in shares]
        for step in range(batch, end):
            taken = []
            for rank, share in enumerate(shares):
                sizes = share.micro_batches[(step - batch) * accum:(step - batch + 1) * accum]
                n = sum(sizes)
                taken.append(streams[rank][:n])
                streams[rank] = streams[rank][n:]
            steps_done.append(taken)
        if i == len(plan) - 1:
            assert not any(streams), "every process reads exactly what its steps take"
        batch = end
    return steps_done


@pytest.mark.parametrize(("total", "global_batch", "accum", "plan"), [
    (1000, 8, 1, [(1, (1,), 0)]),
    (1000, 8, 2, [(2, (2, 1), 0)]),
    (997, 12, 1, [(3, (1, 1, 3), 0)]),
    (997, 512, 1, [(256, (1,) * 256, 0)]),  # fewer rows left than processes: some take none in the last step
    (1001, 8, 1, [(2, (1, 1), 40), (1, (1,), 0)]),  # 2 -> 1 mid-epoch
    (1001, 8, 2, [(1, (2,), 33), (2, (1, 3), 0)]),  # 1 -> 2
    (1003, 24, 1, [(2, (1, 1), 10), (4, (2, 2, 1, 1), 7), (3, (1, 1, 1), 0)]),  # 2 -> 4 -> 3
    (1003, 24, 1, [(2, (2, 2), 10), (2, (1, 2), 7), (2, (2, 2), 0)]),  # another worker count on one process
])
def test_every_row_once_per_epoch_on_any_world_and_across_restarts(total, global_batch, accum, plan):
    steps = _run_legs(total, global_batch, accum, plan)
    assert len(steps) == steps_per_epoch(total, global_batch) == -(-total // global_batch)
    seen = [p for step in steps for taken in step for p in taken]
    assert sorted(seen) == list(range(total))  # every row exactly once
    for step in steps[:-1] if total % global_batch else steps:  # full steps: B rows, B / world on each process
        assert all(len(taken) == global_batch // len(step) for taken in step)
    assert sum(len(taken) for taken in steps[-1]) == (total % global_batch or global_batch)


def test_a_process_reads_consecutive_shards_and_each_worker_its_own():
    """I/O stays local: in epoch (shard) order each worker's part is one run of positions, next to its neighbour's,
    and it reads that run one shuffle block after another, each block a run of its own (so a shard is read by
    at most two consecutive blocks, which the reader keeps in hand), also after a resume on another world."""
    legs = [Leg(8, (3,) * 8, 0), Leg(5, (2, 1, 4, 1, 1), 40)]
    for upto, start in ((legs[:1], 0), (legs, 40)):
        shares = epoch_shares(10_000, upto, start, 64, 1, epoch=2, seed=0, block=50)
        ends = []
        for share in shares:
            for part, blocks in zip(share.worker_positions, share.worker_blocks, strict=True):
                if start == 0:
                    assert np.array_equal(np.sort(part), np.arange(part.min(), part.max() + 1))
                    ends.append((int(part.min()), int(part.max())))
                runs = [np.sort(part[blocks == b]) for b in np.unique(blocks)]
                assert all(np.all(np.diff(r) >= 1) for r in runs)
                assert all(a[-1] < b[0] for a, b in zip(runs[:-1], runs[1:], strict=True))  # block after block
                assert max(len(r) for r in runs) <= 50
        if start == 0:
            assert [e[0] for e in ends[1:]] == [e[1] + 1 for e in ends[:-1]]


def test_the_epoch_order_is_a_function_of_seed_and_epoch_and_keeps_shards_together():
    shards = [np.arange(i * 10, i * 10 + 10) for i in range(30)]
    a, b = epoch_order(shards, 0, 1), epoch_order(shards, 0, 2)
    assert sorted(a.tolist()) == list(range(300)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(shards, 0, 1))
    for start in range(0, 300, 10):  # each shard's rows together, in file order
        assert np.array_equal(a[start:start + 10], np.arange(a[start], a[start] + 10))
    mixed = shuffle_blocks(np.arange(100), 20, seed=1)
    assert all(sorted(mixed[i:i + 20].tolist()) == list(range(i, i + 20)) for i in range(0, 100, 20))
    assert not np.array_equal(mixed, np.arange(100))


def test_planning_uses_every_row_at_cluster_scale_in_well_under_two_seconds():
    layout = hub_like_layout()
    assert len(layout) == 864  # 72 files of 1,131-1,132 rows in row groups of 100
    for world, local in ((64, 2), (256, 16)):
        figures = planning_figures(layout, world, local, epochs=20, block=1000)
        assert figures["used"] == 1.0 and figures["twice"] == 0
        assert figures["steps"] == -(-figures["rows"] // (world * local))


def test_the_batches_of_a_stream_follow_the_plan_through_dataloader_workers(repo):
    """Two DataLoader workers, a resume in the middle (the interleave continues where it stopped): the rows come
    in the order the plan says."""
    (_, _), (streamed, cfg) = opened_both(repo, "style")
    labels = task_labels(streamed.dataset, cfg.heads, cfg.data)
    train = make_splits(len(streamed.dataset), cfg.data, labels.known_rows())["train"]
    cfg = resolve_config(None, None, [f"data.source={repo}", "data.streaming=true", "train.batch_size=6",
                                      "data.shuffle_buffer=20", "data.image_size=32"])
    transform = eval_transform(32)

    class One:  # a single process, as accelerate would say
        num_processes, process_index = 1, 0

    def rows_of(start: int, legs: list[dict]) -> list[int]:
        batches = streamed_batches(streamed.stream, train, labels.labels, transform, 32, cfg, One(), workers=2)
        it = batches.epoch(2, start, legs)
        return [int(r) for b in it for r in b["row"] if r >= 0]

    legs: list[dict] = []
    whole = rows_of(0, legs)
    assert sorted(whole) == sorted(train.tolist()) and legs == [{"world": 1, "workers": [2], "start": 0}]
    for start in (1, 5):
        assert rows_of(start, [{"world": 1, "workers": [2], "start": 0}]) == whole[start * 6:]


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


STREAM = [f"--set=model.backbone={TEST_BACKBONE}", "--set=data.streaming=true", "--set=data.shuffle_buffer=20",
          "--set=data.image_size=32",
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
        assert len(shares) == 2 and abs(len(shares[0]) - len(shares[1])) <= 4  # equal steps; the last one smaller
        seen = np.concatenate(shares).tolist()
        assert sorted(seen) == sorted(train)  # every training row exactly once per epoch
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

"""A checkpoint taken on N processes resumes on M != N (SLURM/Kubernetes requeue a job on whatever nodes are
free): the rest of the epoch's rows exactly, the schedule at the same step, the loss curve close."""

from __future__ import annotations

import numpy as np
import pytest

from crnn_art.data.sources import read_splits
from tests.conftest import read_history, run_cli, scratch, tiny_overrides
from tests.standins.layouts import hub_parquet_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    with scratch(tmp_path_factory, "elastic") as folder:
        yield hub_parquet_repo(folder / "wikiart", file_rows=[70, 150, 40], row_group=16)


def _cached(demo_dir, repo) -> list[str]:
    return tiny_overrides(demo_dir, data__log_rows="true")


def _streamed(demo_dir, repo) -> list[str]:
    return tiny_overrides(demo_dir, data__source=repo, data__streaming="true", data__shuffle_buffer=20,
                          data__log_rows="true")


def _rows(run, epoch: int) -> np.ndarray:
    files = sorted((run / "rows").glob(f"epoch{epoch:03d}-*.npy"))
    return np.sort(np.concatenate([np.load(f) for f in files]))


@pytest.mark.parametrize("data", [_cached, _streamed], ids=["cached", "streamed"])
def test_resume_on_another_number_of_processes_trains_the_rest_of_the_epoch(tmp_path, demo_dir, repo, data):
    """2 processes -> 1 in the middle of epoch 1, then 1 -> 2 in the middle of epoch 2, against one uninterrupted
    run: the same rows in every epoch (streamed: every training row exactly once), the same learning rate at every
    epoch's end, a close loss; and the global batch cannot change on resume."""
    common = data(demo_dir, repo)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_cli(["train", "--output-dir", str(whole), *common])
    steps = read_history(whole)[0]["step"]  # per epoch, on any number of processes
    run_cli(["train", "--output-dir", str(cut), *common, "--set=train.max_steps=5"], processes=2)
    two_to_one = run_cli(["train", "--output-dir", str(cut), *common, f"--set=train.max_steps={steps + 5}",
                          "--resume", "latest"])
    assert "resumed from 2 process(es) on 1" in two_to_one.stdout
    changed = run_cli(["train", "--output-dir", str(cut), *common, "--set=train.batch_size=16", "--resume", "latest"],
                      processes=1, check=False)
    assert changed.returncode != 0 and "train.batch_size 8 -> 16); it is the global batch" in changed.stderr
    one_to_two = run_cli(["train", "--output-dir", str(cut), *common, "--resume", "latest"], processes=2)
    assert "resumed from 1 process(es) on 2" in one_to_two.stdout

    a, b = read_history(whole), read_history(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [steps, 2 * steps]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]  # the schedule continued at the same step
    for epoch in (1, 2):
        np.testing.assert_array_equal(_rows(whole, epoch), _rows(cut, epoch))  # the rest of the draw / epoch
        if data is _streamed:
            np.testing.assert_array_equal(_rows(cut, epoch), np.sort(read_splits(cut / "split.json")["train"]))
    # not bit-identical (reduction order, BatchNorm over 4 images instead of 8, another order of the epoch's rest
    # when streamed): at this size uninterrupted runs on 1 and 2 processes already differ by up to 30 % in an
    # epoch's mean loss (streamed: 2.77 vs 2.13), so the curve is held to that scale, not to digits
    for x, y in zip(a, b, strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=0.5)

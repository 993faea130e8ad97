"""Several machines as users run them, on one host: one launcher per "machine" (``--machine_rank`` 0 and 1, one CPU
process each, meeting at 127.0.0.1), all writing one shared run folder. Train, evaluate, stop and resume, and an
elastic torchrun launch; docs/scaling-out.md gives the same commands for real machines."""

from __future__ import annotations

from pathlib import Path

import pytest

from crnn_art.checkpoints import complete_checkpoints
from crnn_art.data.sources import read_splits
from tests.conftest import read_history, read_json, run_cli, run_cli_on_machines, scratch, tiny_overrides

METRICS = ("loss", "top1", "macro_f1", "weighted_f1")


def train_args(run: Path, demo_dir: Path, **extra) -> list[str]:
    return ["train", "--output-dir", str(run), *tiny_overrides(demo_dir, **extra)]


def checkpoint_steps(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in complete_checkpoints(run / "checkpoints")]


@pytest.fixture(scope="module")
def two_machine_run(tmp_path_factory, demo_dir):
    """The tiny recipe trained to its end by two machines of one process each."""
    with scratch(tmp_path_factory) as folder:
        run = folder / "two_machines"
        run_cli_on_machines(train_args(run, demo_dir))
        yield run


def test_two_machines_train_one_run_into_the_shared_folder(two_machine_run):
    history = read_history(two_machine_run)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["processes"] == 2 for h in history)
    assert history[-1]["step"] == 2 * history[0]["step"]
    for model in ("best", "last"):
        assert (two_machine_run / model / "model.safetensors").is_file(), model
    final = read_json(two_machine_run / "metrics.json")
    assert (final["epoch"], final["step"]) == (2, history[-1]["step"])
    # the last checkpoint is complete: each machine's process wrote its own random state into the shared folder
    assert checkpoint_steps(two_machine_run)[-1] == history[-1]["step"]
    last = complete_checkpoints(two_machine_run / "checkpoints")[-1]
    assert (last / "random_states_0.pkl").is_file() and (last / "random_states_1.pkl").is_file()


def test_evaluating_on_two_machines_gives_the_one_process_metrics(two_machine_run, tmp_path):
    evaluate = ["evaluate", "--checkpoint", str(two_machine_run / "best"), "--split", "test", "--output-dir"]
    run_cli_on_machines([*evaluate, str(tmp_path / "two")])
    run_cli([*evaluate, str(tmp_path / "one")])
    one, two = read_json(tmp_path / "one" / "metrics.json"), read_json(tmp_path / "two" / "metrics.json")
    assert one["num_samples"] == two["num_samples"] == len(read_splits(two_machine_run / "split.json")["test"])
    assert one["model"] == two["model"]  # the same weights (SHA-256)
    assert one["top5"] is two["top5"] is None  # 4 classes: top-5 does not apply
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    for name, figures in one["per_class"].items():  # every painting counted once, by the class it belongs to
        assert two["per_class"][name]["support"] == figures["support"], name
        assert two["per_class"][name]["f1"] == pytest.approx(figures["f1"], abs=1e-6), name


def test_a_run_stopped_on_two_machines_resumes_there_to_the_end(two_machine_run, tmp_path, demo_dir):
    """Each machine runs its own crnn-art-launch, as the SLURM script does; train.max_steps stops the run in epoch 2,
    `--resume latest` on both machines finishes it, exactly as the uninterrupted two-machine run."""
    whole = read_history(two_machine_run)
    per_epoch, stop = whole[0]["step"], whole[0]["step"] + 3
    run = tmp_path / "run"
    run_cli_on_machines(train_args(run, demo_dir, train__max_steps=stop), launcher="crnn-art-launch")
    assert checkpoint_steps(run)[-1] == stop
    assert [(h["epoch"], h["step"], h["partial"]) for h in read_history(run)] == [(1, per_epoch, False),
                                                                                   (2, stop, True)]
    run_cli_on_machines(train_args(run, demo_dir) + ["--resume", "latest"], launcher="crnn-art-launch")
    history = read_history(run)
    assert [(h["epoch"], h["step"], h["processes"], h["partial"]) for h in history] == [
        (h["epoch"], h["step"], 2, False) for h in whole]  # the partial epoch's line was replaced by the whole one
    assert checkpoint_steps(run)[-1] == whole[-1]["step"]
    resumed, uninterrupted = read_json(run / "metrics.json"), read_json(two_machine_run / "metrics.json")
    assert resumed["step"] == uninterrupted["step"] == whole[-1]["step"]
    for key in METRICS:
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key


def test_an_elastic_torchrun_launch_trains_with_every_node_that_joined(tmp_path, demo_dir):
    """The elastic command of docs/scaling-out.md (torchrun --nnodes=1:2 over c10d, which `accelerate launch` cannot
    express: its --num_machines is one number): both nodes join one world and train one run."""
    run = tmp_path / "elastic"
    run_cli_on_machines(train_args(run, demo_dir, train__max_steps=3) + ["--resume", "auto"], launcher="torchrun",
                        env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # what a later join needs (the doc says why)
    history = read_history(run)
    assert history[-1]["processes"] == 2 and history[-1]["step"] == 3
    assert checkpoint_steps(run)[-1] == 3

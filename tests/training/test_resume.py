"""Never lose a run: exact resume, atomic checkpoints, rotation, preemption, non-finite losses, tracking."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crnn_art.checkpoints import complete_checkpoints, verify_checkpoint
from tests.conftest import (
    CPU_2PROC,
    ROOT,
    TEST_BACKBONE,
    _free_port,
    read_history,
    read_json,
    run_cli,
    scratch,
    tiny_overrides,
)

# mixing and dropout on: a resumed run must redraw exactly what the uninterrupted one drew
RECIPE = {"augment__mixup_prob": 0.3, "augment__cutmix_prob": 0.3}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def train_args(run: Path, demo_dir: Path, **extra) -> list[str]:
    return ["train", "--output-dir", str(run), *tiny_overrides(demo_dir, **{**RECIPE, **extra})]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_dir):
    with scratch(tmp_path_factory) as folder:
        runs = {}
        for accum in (1, 2):
            runs[accum] = folder / f"whole_accum{accum}"
            run_cli(train_args(runs[accum], demo_dir, train__grad_accum_steps=accum, model__backbone=BACKBONE[accum]))
        yield runs


BACKBONE = {1: TEST_BACKBONE, 2: "resnet50"}
"""The default ResNet-50 resumes bit-identically too (its BatchNorm statistics and channels-last trunk), here with
gradient accumulation; the other tests compare with the run of accumulation 1."""


@pytest.mark.parametrize("accum", [1, 2])
def test_stopped_mid_epoch_then_resumed_is_bit_identical(uninterrupted, tmp_path, demo_dir, accum):
    run = tmp_path / "stopped"
    run_cli(train_args(run, demo_dir, train__grad_accum_steps=accum, train__max_steps=21,
                       model__backbone=BACKBONE[accum]))
    steps = [int(p.name.split("_")[1]) for p in complete_checkpoints(run / "checkpoints")]
    assert 21 in steps and 21 % (read_history(run)[0]["step"]) != 0  # stopped mid-epoch 2
    run_cli(train_args(run, demo_dir, train__grad_accum_steps=accum, model__backbone=BACKBONE[accum])
            + ["--resume", "latest"])
    assert_same_weights(run, uninterrupted[accum])
    assert read_json(run / "metrics.json")["top1"] == read_json(uninterrupted[accum] / "metrics.json")["top1"]
    assert [h["epoch"] for h in read_history(run)] == [1, 2]
    # the epoch's running sums (loss, applied steps, skipped images) are in the checkpoint: the resumed
    # epoch's history line is the uninterrupted one's, wall-clock fields aside
    assert without_wall_clock(read_history(run)) == without_wall_clock(read_history(uninterrupted[accum]))


WALL_CLOCK = ("epoch_seconds", "images_per_s")


def without_wall_clock(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK} for record in history]


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(uninterrupted, tmp_path, demo_dir):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "crnn_art", *train_args(run, demo_dir, train__checkpoint_every_steps=1)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        done = complete_checkpoints(run / "checkpoints")
        if len(done) >= 2 and list((run / "checkpoints").glob(".tmp-*/*")):
            break  # a save is being written right now
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((run / "checkpoints").glob(".tmp-*")), "the kill should land inside a save"
    for path in complete_checkpoints(run / "checkpoints"):
        verify_checkpoint(path)
    run_cli(train_args(run, demo_dir) + ["--resume", "latest"])
    assert_same_weights(run, uninterrupted[1])


def test_damaged_checkpoint_is_a_clear_error_and_nothing_is_lost(tmp_path, demo_dir):
    run = tmp_path / "run"
    run_cli(train_args(run, demo_dir, train__max_steps=5))
    latest = complete_checkpoints(run / "checkpoints")[-1]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = run_cli(train_args(run, demo_dir) + ["--resume", "latest"], check=False)
    assert result.returncode == 2 and "damaged" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    fresh = run_cli(train_args(run, demo_dir), check=False)  # a fresh start would overwrite the run
    assert fresh.returncode == 2 and "--resume latest" in fresh.stderr


def test_rotation_keeps_the_last_and_the_best(tmp_path, demo_dir):
    run = tmp_path / "run"
    run_cli(train_args(run, demo_dir, train__checkpoint_every_steps=4, train__keep_last=1, train__epochs=3))
    kept = [int(p.name.split("_")[1]) for p in complete_checkpoints(run / "checkpoints")]
    history = read_history(run)
    best_epoch = max(history, key=lambda h: h["val"]["top1"])  # first maximum = the one kept as best
    assert max(kept) == history[-1]["step"]
    assert set(kept) == {history[-1]["step"], best_epoch["step"]}
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_sigterm_on_two_processes_then_resume_matches(tmp_path, demo_dir):
    def launch(run: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
               "--main_process_port", str(_free_port()), "-m", "crnn_art", *train_args(run, demo_dir), *extra]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    whole = launch(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    stopped = launch(tmp_path / "stopped")
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "stopped" / "history.jsonl").is_file() or \
            not (tmp_path / "stopped" / "history.jsonl").read_text():
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    stopped.wait(timeout=300)
    message = stopped.stderr.read()
    assert "stopped by SIGTERM" in message and "--resume latest" in message
    steps = [int(p.name.split("_")[1]) for p in complete_checkpoints(tmp_path / "stopped" / "checkpoints")]
    per_epoch = read_history(tmp_path / "stopped")[0]["step"]
    assert max(steps) % per_epoch != 0  # stopped mid-epoch
    resumed = launch(tmp_path / "stopped", "--resume", "latest")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert_same_weights(tmp_path / "stopped", tmp_path / "whole")
    stopped_metrics, whole_metrics = (read_json(tmp_path / name / "metrics.json") for name in ("stopped", "whole"))
    assert stopped_metrics["loss"] == whole_metrics["loss"]
    histories = [without_wall_clock(read_history(tmp_path / name)) for name in ("stopped", "whole")]
    assert histories[0] == histories[1]


def test_non_finite_losses_stop_the_run_and_keep_good_checkpoints(tmp_path, demo_dir):
    run = tmp_path / "run"
    result = run_cli(train_args(run, demo_dir, train__lr=1e12, train__backbone_lr=1e12, train__min_lr=0.0,
                                train__checkpoint_every_steps=1, train__max_bad_steps=3), check=False)
    assert result.returncode == 3 and "3 consecutive steps had a non-finite loss" in result.stderr
    done = complete_checkpoints(run / "checkpoints")
    assert done
    for path in done:
        verify_checkpoint(path)


def test_tensorboard_logs_continue_across_a_resume(tmp_path, demo_dir):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra; ./launch/test installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_cli(train_args(run, demo_dir, train__log_with="tensorboard", train__max_steps=10))
    run_cli(train_args(run, demo_dir, train__log_with="tensorboard") + ["--resume", "latest"])
    steps = []
    for events in sorted(run.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars("train/loss")]
        if "val/top1" in acc.Tags()["scalars"]:
            assert acc.Scalars("val/top1")
    assert steps and max(steps) == read_history(run)[-1]["step"]
    assert len(steps) == len(set(steps)) and min(steps) <= 10 < max(steps)


def test_ema_weights_are_evaluated_saved_and_resumed_exactly(tmp_path, demo_dir):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run_cli(train_args(whole, demo_dir, train__ema_decay=0.9))
    run_cli(train_args(stopped, demo_dir, train__ema_decay=0.9, train__max_steps=21))
    run_cli(train_args(stopped, demo_dir, train__ema_decay=0.9) + ["--resume", "latest"])
    history = read_history(whole)
    assert all("val_ema" in h and 0 <= h["val_ema"]["top1"] <= 100 for h in history)
    ema_whole = load_file(whole / "last_ema" / "model.safetensors")
    raw = load_file(whole / "last" / "model.safetensors")
    assert not torch.equal(ema_whole["heads.style.weight"], raw["heads.style.weight"])
    ema_resumed = load_file(stopped / "last_ema" / "model.safetensors")
    assert all(torch.equal(ema_whole[k], ema_resumed[k]) for k in ema_whole)


def test_disk_full_during_a_save_is_one_clear_line_and_keeps_earlier_checkpoints(tmp_path):
    """ENOSPC mid-save (as safetensors reports it) names the free space and the fix, leaves no half-written folder."""
    import errno

    from crnn_art.checkpoints import TrainState, save_checkpoint
    from crnn_art.errors import RunFolderError

    class Accelerator:
        is_main_process = True
        num_processes = 1
        full = False

        def wait_for_everyone(self) -> None:
            pass

        def save_state(self, output_dir: str) -> None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
                (Path(output_dir) / name).write_bytes(b"x" * 64)
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")

    acc, state = Accelerator(), TrainState()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1)], lr=0.1), T_max=5)
    state.step = 5
    first = save_checkpoint(acc, tmp_path, state, 1, scheduler)
    acc.full, state.step = True, 10
    with pytest.raises(RunFolderError, match=r"could not write checkpoint .*No space left.*GiB free there.*"
                                             r"keep_last.*--resume latest") as info:
        save_checkpoint(acc, tmp_path, state, 1, scheduler)
    assert "\n" not in str(info.value)
    assert complete_checkpoints(tmp_path / "checkpoints") == [first]
    verify_checkpoint(first)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]

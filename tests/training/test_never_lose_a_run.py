"""Never lose a run, never hang: every exit path ends every process in seconds, a run folder is never damaged
by a command that fails or has nothing to do, checkpoints hold finite weights, resume executes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crnn_art.checkpoints import MANIFEST, complete_checkpoints, verify_checkpoint
from crnn_art.cli import main as cli_main
from crnn_art.runs import RunLock
from tests.conftest import CPU_2PROC, ROOT, _free_port, read_history, read_json, run_cli, scratch, tiny_overrides

FAULTS = ROOT / "tests" / "faults"
# a run has to be alive for this long at most after the fault: the hangs this guards against lasted forever
EXIT_WITHIN = 240


def args(run: Path, demo_dir: Path, **extra) -> list[str]:
    return ["train", "--output-dir", str(run), *tiny_overrides(demo_dir, **extra)]


def fault_env(fault: str, rank: str | None = None) -> dict[str, str]:
    env = {"CRNN_ART_TEST_FAULT": fault, "PYTHONPATH": f"{FAULTS}{os.pathsep}{ROOT}"}
    return env | ({"CRNN_ART_TEST_FAULT_RANK": rank} if rank is not None else {})


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of a folder with its SHA-256: a folder a command must leave alone compares equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def in_process(argv: list[str], capsys) -> tuple[int, str]:
    """``crnn-art ARGV`` in this process (no interpreter start-up: for errors raised before or at resume)."""
    capsys.readouterr()
    code = cli_main(argv)
    return code, capsys.readouterr().err


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr[-3000:]}"
    return lines[0]


# ---- 1. no exit path hangs ----------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_an_error_in_a_dataloader_worker_ends_every_process(tmp_path, demo_dir, processes):
    run = tmp_path / "run"
    start = time.time()
    result = run_cli(args(run, demo_dir, data__num_workers=2), processes=processes, check=False,
                     env=fault_env("worker", rank="1" if processes == 2 else None), timeout=EXIT_WITHIN,
                     launcher="crnn-art-launch")
    assert result.returncode == 1 and time.time() - start < EXIT_WITHIN
    assert "unexpected MemoryError" in result.stderr and "injected: a worker ran out of memory" in result.stderr
    assert "traceback in" in result.stderr
    logs = [Path(part.split(";")[0]).read_text() for part in result.stderr.split("traceback in ")[1:]]
    assert any("Traceback" in log and "injected" in log for log in logs)  # the failing process's own log
    if processes == 1:
        assert one_line(result.stderr).startswith("crnn-art: error: unexpected MemoryError")


def test_a_worker_that_never_delivers_fails_the_run_instead_of_hanging(tmp_path, demo_dir):
    start = time.time()
    result = run_cli(args(tmp_path / "run", demo_dir, data__num_workers=2), check=False, env=fault_env("stall"),
                     timeout=EXIT_WITHIN)
    assert result.returncode == 1 and time.time() - start < EXIT_WITHIN
    assert "DataLoader timed out after 5 seconds" in one_line(result.stderr)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_save_that_fails_in_torchs_own_words_is_one_line_and_keeps_the_first_checkpoint(tmp_path, demo_dir,
                                                                                          processes):
    run = tmp_path / "run"
    result = run_cli(args(run, demo_dir, data__num_workers=2, train__checkpoint_every_steps=3), processes=processes,
                     check=False, env=fault_env("save"), timeout=EXIT_WITHIN, launcher="crnn-art-launch")
    assert result.returncode == 2
    assert "could not write checkpoint" in result.stderr and "unexpected pos" in result.stderr
    assert "GiB free there" in result.stderr and "Traceback" not in result.stderr
    if processes == 1:
        assert one_line(result.stderr)
    else:  # both processes failed alike: crnn-art-launch prints the line once
        assert result.stderr.count("could not write checkpoint") == 1
    done = complete_checkpoints(run / "checkpoints")
    assert [p.name for p in done] == ["step_00000003"]
    verify_checkpoint(done[0])
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_a_push_with_the_hub_unreachable_ends_the_run_with_one_line_and_keeps_it(tmp_path, demo_dir):
    run = tmp_path / "run"
    result = run_cli(args(run, demo_dir, data__num_workers=2, train__epochs=1, hub__push_to_hub="someone/model"),
                     check=False, env={"HF_HUB_OFFLINE": "1"}, timeout=EXIT_WITHIN)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "could not push to the Hub repository someone/model" in line and "crnn-art push --checkpoint" in line
    assert read_json(run / "metrics.json")["loss"] > 0 and (run / "best" / "model.safetensors").is_file()


def test_ranks_stop_and_checkpoint_when_the_launcher_is_killed(tmp_path, demo_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(_free_port()), "-m", "crnn_art",
           *args(run, demo_dir, train__epochs=20, data__demo_size=200)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not complete_checkpoints(run / "checkpoints"):
        time.sleep(0.2)
    assert complete_checkpoints(run / "checkpoints"), "the run should have finished an epoch"
    before = {p.name for p in complete_checkpoints(run / "checkpoints")}
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                            text=True).stdout.split()]
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.time() + EXIT_WITHIN
    while time.time() < deadline and any(_alive(pid) for pid in ranks):
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in ranks), "ranks kept training after their launcher died"
    history = read_history(run)
    assert history and history[-1]["epoch"] < 20  # stopped early, not trained to the end
    newest = complete_checkpoints(run / "checkpoints")[-1]
    assert newest.name not in before  # written by the stop, not left from the last epoch
    verify_checkpoint(newest)
    assert not (run / ".crnn-art.lock").exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ---- 2. a full disk is one line, on a real small filesystem -------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the size asked for (CI runs as root); unmounted afterwards."""
    mounts = []

    def make(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small filesystem needs root (CI runs as root)")
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_disk_mid_checkpoint_is_one_line_and_keeps_the_earlier_checkpoint(small_disk, demo_dir):
    run = small_disk("420m") / "run"  # one ~340 MB checkpoint fits, the second does not
    result = run_cli(args(run, demo_dir, train__checkpoint_every_steps=3), check=False, timeout=EXIT_WITHIN)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "could not write" in line and "GiB free there" in line and "--resume latest" in line
    done = complete_checkpoints(run / "checkpoints")
    assert len(done) == 1
    verify_checkpoint(done[0])
    assert not list(run.rglob(".tmp-*")) and not list(run.glob("*.tmp"))
    assert not (run / ".crnn-art.lock").exists()


def test_a_disk_too_small_for_the_run_files_is_one_line(small_disk, demo_dir):
    run = small_disk("4k") / "run"
    result = run_cli(args(run, demo_dir), check=False, timeout=EXIT_WITHIN)
    assert result.returncode == 2
    assert "GiB free there" in one_line(result.stderr)


# ---- 3. a run folder is never damaged by a command that fails or has nothing to do --------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_dir):
    with scratch(tmp_path_factory, "finished") as folder:
        run = folder / "run"
        run_cli(args(run, demo_dir))
        yield run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, demo_dir):
    """A run stopped mid-epoch by train.max_steps: its checkpoint is one a resume really loads."""
    with scratch(tmp_path_factory, "stopped") as folder:
        run = folder / "run"
        run_cli(args(run, demo_dir, train__max_steps=3))
        yield run


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("resume", [["--resume", "latest"], ["--resume", "auto"]])
def test_resuming_a_finished_run_changes_nothing(finished, demo_dir, resume):
    before = snapshot(finished)
    for extra in ([], args(finished, demo_dir)[3:]):  # the run's own config, and the same config said again
        result = run_cli(["train", "--output-dir", str(finished), *extra, *resume])
        assert "finished run" in result.stdout and "nothing to do" in result.stdout
        assert snapshot(finished) == before


def test_a_run_killed_before_metrics_json_is_finished_without_training(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    expected = read_json(run / "metrics.json")
    (run / "metrics.json").unlink()
    checkpoints = snapshot(run / "checkpoints")
    run_cli(["train", "--output-dir", str(run), "--resume", "latest"])
    assert read_json(run / "metrics.json") == expected
    assert snapshot(run / "checkpoints") == checkpoints and len(read_history(run)) == 2


@pytest.mark.parametrize("change", [
    ["--set=data.demo_styles=5"],        # other classes
    ["--set=data.task=genre"],           # another task
    ["--set=train.batch_size=16"],       # another batch: the position in the epoch would mean other rows
    ["--set=data.image_size=64"],        # another input size
    ["--set=train.epochs=3"],            # another schedule
])
def test_resuming_with_a_config_that_changes_the_run_is_one_line_and_writes_nothing(finished, demo_dir, change,
                                                                                    capsys):
    before = snapshot(finished)
    code, stderr = in_process(args(finished, demo_dir) + change + ["--resume", "latest"], capsys)
    assert code == 2
    line = one_line(stderr)
    key = change[0].split("=")[1]
    assert "--resume would change what the run" in line and key in line
    assert snapshot(finished) == before


def test_safe_changes_are_allowed_on_resume(finished, demo_dir, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    result = run_cli(args(run, demo_dir, data__num_workers=1, train__log_every=5, train__keep_last=2)
                     + ["--resume", "latest"])
    assert "finished run" in result.stdout


def test_a_second_training_in_a_held_run_folder_is_refused(stopped, demo_dir, tmp_path):
    run = copy_run(stopped, tmp_path / "run")
    lock = RunLock(run)
    lock.acquire()
    try:
        before = snapshot(run)
        result = run_cli(args(run, demo_dir, train__max_steps=4) + ["--resume", "auto"], check=False)
        after = snapshot(run)
    finally:
        lock.release()
    assert result.returncode == 2
    assert f"in use by another training (pid {os.getpid()}" in one_line(result.stderr)
    assert after == before


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, demo_dir, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    code, stderr = in_process(args(target, demo_dir), capsys)
    assert code == 2 and "is a file, not a folder" in one_line(stderr)
    assert target.read_text() == "mine"


# ---- 4. the non-finite guard keeps a good checkpoint ---------------------------------------------


@pytest.mark.parametrize("lr", [1e6, 1e12])
def test_an_exploding_learning_rate_never_checkpoints_non_finite_weights(tmp_path, demo_dir, lr):
    run = tmp_path / "run"
    result = run_cli(args(run, demo_dir, train__lr=lr, train__backbone_lr=lr, train__min_lr=0.0,
                          train__checkpoint_every_steps=2, train__max_bad_steps=40, train__keep_last=1),
                     check=False)
    assert result.returncode in (0, 3), result.stderr[-2000:]
    done = complete_checkpoints(run / "checkpoints")  # none when the weights overflowed before the first one
    for path in done:
        verify_checkpoint(path)
        weights = load_file(path / "model.safetensors")
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f"{path.name}: {len(bad)} non-finite tensors"
    for record in read_history(run):
        assert record["train_loss"] is None or record["train_loss"] == record["train_loss"]  # null, never NaN/0
    if result.returncode == 3:  # the advice is honest: it names the newest (finite) checkpoint, or says there is none
        expected = f"the last good checkpoint, {done[-1].name}, is intact" if done else "no checkpoint was written"
        line = one_line(result.stderr)
        assert expected in line
        assert ("start a new run" if done else "start again with a lower train.lr") in line


def test_an_epoch_with_no_applied_step_records_no_loss(tmp_path, demo_dir):
    run = tmp_path / "run"
    run_cli(args(run, demo_dir, train__lr=1e30, train__backbone_lr=1e30, train__min_lr=0.0, train__epochs=2,
                 train__max_bad_steps=1000))
    history = read_history(run)
    assert history[-1]["train_loss"] is None and history[-1]["nonfinite_steps"] > 0


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_learning_rate_is_refused(tmp_path, value, capsys):
    code, stderr = in_process(["train", "--output-dir", str(tmp_path / "r"), f"--set=train.lr={value}"], capsys)
    assert code == 2 and "train.lr" in one_line(stderr) and not (tmp_path / "r").exists()


# ---- 6. resume never executes code from a checkpoint ---------------------------------------------

class Payload:
    """Unpickling this runs a command that leaves a marker file: what an attacker would put in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_manifest(checkpoint: Path) -> None:
    """What anyone who can write the folder can do: recompute every hash."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {str(p.relative_to(checkpoint)): hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                                    "train_state.json"])
def test_a_pickle_payload_in_a_checkpoint_never_executes(stopped, demo_dir, tmp_path, target, capsys):
    run = copy_run(stopped, tmp_path / "run")
    checkpoint = complete_checkpoints(run / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    (checkpoint / target).write_bytes(pickle.dumps(Payload(marker)))
    rewrite_manifest(checkpoint)
    before = snapshot(run)
    code, stderr = in_process(args(run, demo_dir, train__max_steps=4) + ["--resume", "latest"], capsys)
    assert not marker.exists(), "a checkpoint file executed code"
    assert code == 2
    assert f"checkpoint {checkpoint}" in one_line(stderr)
    assert snapshot(run) == before  # config.yaml included: nothing is written until the checkpoint has loaded


@pytest.mark.parametrize("damage", ["empty-manifest", "not-safetensors", "missing-rng", "extra-rng", "extra-ema",
                                    "run-folder"])
def test_a_manifest_recomputed_over_a_broken_checkpoint_is_one_line(stopped, demo_dir, tmp_path, damage, capsys):
    run = copy_run(stopped, tmp_path / "run")
    checkpoint = complete_checkpoints(run / "checkpoints")[-1]
    if damage == "empty-manifest":
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        (checkpoint / MANIFEST).write_text(json.dumps({**manifest, "files": {}}))
    elif damage == "not-safetensors":
        (checkpoint / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
        rewrite_manifest(checkpoint)
    elif damage == "missing-rng":
        (checkpoint / "random_states_0.pkl").unlink()
        rewrite_manifest(checkpoint)
    elif damage in ("extra-rng", "extra-ema"):  # files crnn-art writes, but not for this run
        name = "random_states_1.pkl" if damage == "extra-rng" else "ema.safetensors"
        shutil.copy(checkpoint / ("random_states_0.pkl" if damage == "extra-rng" else "model.safetensors"),
                    checkpoint / name)
        rewrite_manifest(checkpoint)
    before = snapshot(run)
    resume = str(run) if damage == "run-folder" else "latest"
    code, stderr = in_process(args(run, demo_dir, train__max_steps=4) + ["--resume", resume], capsys)
    assert code == 2
    assert str(run if damage == "run-folder" else checkpoint) in one_line(stderr)
    assert snapshot(run) == before


def test_an_untouched_checkpoint_still_resumes(stopped, demo_dir, tmp_path):
    """The checks above refuse altered checkpoints, not good ones."""
    run = copy_run(stopped, tmp_path / "run")
    run_cli(args(run, demo_dir, train__max_steps=4) + ["--resume", "latest"])
    assert [p.name for p in complete_checkpoints(run / "checkpoints")][-1] == "step_00000004"

"""`crnn-art-launch`: exit statuses a scheduler can act on, signals forwarded once, the SLURM script's requeue."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from crnn_art import launcher
from crnn_art.launcher import exit_status, find_launcher_report, format_messages, report_is_explained
from tests.conftest import CPU_2PROC, ROOT, _free_port, read_history, tiny_overrides

LAUNCH = Path(sys.executable).with_name("crnn-art-launch")

# what `accelerate launch` printed (torch 2.x) when both ranks of a run with a bad batch size exited 2
REPORT = """\
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "accelerate/commands/launch.py", line 1029, in multi_gpu_launcher
    distrib_run.run(args)
  File "torch/distributed/launcher/api.py", line 386, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
crnn_art FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-29_14:09:37
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 4037)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 4037
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_14:09:37
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 2 (pid: 4038)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def _record(code: int, message: str = "m") -> dict:
    return {"code": code, "message": message}


def test_the_wrapper_imports_no_torch_and_agrees_with_runtime_on_the_exit_folder():
    """Loaded on its own (not through the package, whose __init__ imports the model), the module pulls in no torch."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("alone", {str(Path(launcher.__file__))!r})
        module = sys.modules["alone"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(module.EXIT_DIR_ENV, "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["CRNN_ART_EXIT_DIR", "False"]
    assert importlib.util.find_spec("crnn_art.runtime") is not None
    from crnn_art.exits import EXIT_DIR_ENV

    assert launcher.EXIT_DIR_ENV == EXIT_DIR_ENV
    assert LAUNCH.is_file(), "pip install -e . creates the crnn-art-launch script"


@pytest.mark.parametrize(("launcher_code", "recorded", "unrecorded", "received", "expected"), [
    (0, {}, {}, [], 0),                                    # a finished run
    (0, {0: 143}, {}, [signal.SIGTERM], 0),                # the launcher's word wins when it succeeded
    (1, {0: 2, 1: 2}, {}, [], 2),                          # a user error on every rank
    (1, {0: 1, 1: 2}, {}, [], 2),                          # the peer's unexpected error is the echo
    (1, {0: 3, 1: 1}, {}, [], 3),
    (1, {0: 1, 1: 143}, {}, [], 1),                        # an error beats the stop torch sent the others
    (1, {0: 2}, {1: 137}, [signal.SIGTERM], 2),            # errors first, even after a signal
    (1, {0: 143, 1: 143}, {}, [signal.SIGTERM], 143),      # SIGTERM to the wrapper (Kubernetes)
    (1, {0: 130, 1: 130}, {}, [signal.SIGINT], 130),       # Ctrl-C
    (1, {}, {}, [signal.SIGTERM], 143),                    # nothing recorded, but we know why
    (1, {0: 143}, {1: 137}, [], 137),                      # a rank killed without a word (OOM?) beats a stop
    (1, {0: 143, 1: 143}, {}, [], 143),                    # SIGTERM to every rank (SLURM)
    (1, {1: 143}, {0: 143}, [], 143),                      # one rank stopped before it could record
    (1, {}, {}, [], 1),                                    # the launcher's own failure
    (-9, {}, {}, [], 137),                                 # the launcher killed
])
def test_exit_status_rules(launcher_code, recorded, unrecorded, received, expected):
    assert exit_status(launcher_code, recorded, unrecorded, received) == expected


def test_launcher_report_is_found_after_process_output_and_dropped_only_when_explained():
    lines = ["crnn-art: some line a process wrote\n", "Traceback (most recent call last):\n",
             '  File "x.py", line 1\n', "ValueError: a process's own traceback\n",
             *REPORT.splitlines(keepends=True)]
    report = find_launcher_report(lines)
    assert report is not None and report.kind == "ChildFailedError"
    assert lines[report.start:] == REPORT.splitlines(keepends=True)  # the process's traceback is kept
    assert report.failures == {0: -15, 1: 2}
    assert report_is_explained(report, {1: _record(2)})  # rank 0 only got torch's own SIGTERM
    assert not report_is_explained(report, {})
    killed = find_launcher_report(REPORT.replace("exitcode  : -15", "exitcode  : -9").splitlines(keepends=True))
    assert not report_is_explained(killed, {1: _record(2)})  # rank 0 was SIGKILLed without a word
    assert launcher.unrecorded_failures(killed, {1: _record(2)}) == {0: 137}
    assert find_launcher_report(lines[:4]) is None  # a traceback that is not the launcher's report


def test_chained_report_starts_at_its_first_traceback():
    lines = ["Traceback (most recent call last):\n", '  File "a"\n', "KeyError: 1\n", "\n",
             "During handling of the above exception, another exception occurred:\n", "\n",
             "Traceback (most recent call last):\n", '  File "b"\n',
             "torch.distributed.elastic.multiprocessing.api.SignalException: Process 7 got signal: 15\n"]
    report = find_launcher_report(lines)
    assert report is not None and report.start == 0 and report.kind == "SignalException"


def test_messages_print_once_and_name_ranks_only_when_they_differ():
    assert format_messages({0: _record(2, "bad"), 1: _record(2, "bad")}) == ["bad"]
    assert format_messages({0: _record(1, "x"), 1: _record(2, "y"), 2: _record(2, "y")}) == \
        ["[rank 0] x", "[ranks 1,2] y"]


def test_rank_files_are_read_and_broken_ones_skipped(tmp_path):
    (tmp_path / "rank0.json").write_text(json.dumps(_record(143, "stopped")))
    (tmp_path / "rank1.json").write_text('{"code": 14')  # killed while writing
    assert launcher.read_rank_files(tmp_path) == {0: _record(143, "stopped")}


def _launch(run: Path, demo_dir: Path, *extra: str) -> list[str]:
    return [str(LAUNCH), "--config_file", str(CPU_2PROC), "--main_process_port", str(_free_port()),
            "-m", "crnn_art", "train", "--output-dir", str(run), *tiny_overrides(demo_dir), *extra]


def _env() -> dict:
    inherited = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**inherited, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_user_error_on_every_rank_prints_once_and_exits_2(tmp_path, demo_dir):
    cmd = _launch(tmp_path / "run", demo_dir, "--set=train.batch_size=9")
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("crnn-art: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "batch_size" in errors[0], result.stderr[-3000:]
    assert "ChildFailedError" not in result.stderr and "Traceback" not in result.stderr


def test_sigterm_to_the_wrapper_only_stops_every_rank_with_a_checkpoint_and_exits_143(tmp_path, demo_dir):
    run = tmp_path / "run"
    proc = subprocess.Popen(_launch(run, demo_dir, "--set=train.epochs=3"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        history = run / "history.jsonl"
        while time.time() < deadline and proc.poll() is None and not (history.is_file() and history.read_text()):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)  # the wrapper only, as Kubernetes does to a container's first process
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.count("stopped by SIGTERM") == 1 and "--resume latest" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    steps = sorted(int(p.parent.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*/manifest.json"))
    assert steps and steps[-1] % read_history(run)[0]["step"] != 0  # the stop's own checkpoint, mid-epoch


FAKE_SRUN = """\
#!{python}
# srun stand-in: runs the task in its own process group and forwards SIGTERM to all of it, as srun does
import os, signal, subprocess, sys
task = [a for a in sys.argv[1:] if not a.startswith("--")]
child = subprocess.Popen(task, start_new_session=True)
signal.signal(signal.SIGTERM, lambda signum, frame: os.killpg(child.pid, signum))
code = child.wait()
sys.exit(128 - code if code < 0 else code)
"""
FAKE_SCONTROL = """\
#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scontrol_calls"
if [[ "$1" == show && "$2" == hostnames ]]; then echo node1; echo node2; fi
"""
FAKE_LAUNCH = """\
#!/usr/bin/env bash
# crnn-art-launch stand-in: trains (sleeps) until SIGTERM, then exits 143 as a checkpointed stop does
printf '%s\\n' "$@" > "$FAKE_DIR/launch_args"
trap 'touch "$FAKE_DIR/got_term"; exit 143' TERM
touch "$FAKE_DIR/started"
if [[ -n "${FAKE_EXIT:-}" ]]; then exit "$FAKE_EXIT"; fi
for _ in $(seq 600); do sleep 0.1; done
exit 99
"""


def _fake_slurm(tmp_path: Path) -> dict:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL),
                       ("crnn-art-launch", FAKE_LAUNCH)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    return {**_env(), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
            "RUN": str(tmp_path / "run")}


@pytest.mark.parametrize(("sig", "requeued"), [(signal.SIGUSR1, True), (signal.SIGTERM, False)],
                         ids=["time-limit-requeues", "scancel-does-not"])
def test_slurm_script_stops_the_step_and_requeues_only_for_the_time_limit(tmp_path, sig, requeued):
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm_multinode.sbatch")], cwd=tmp_path,
                            env=_fake_slurm(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (tmp_path / "started").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)  # what --signal=B:USR1@120 does (to the batch shell only), or scancel's SIGTERM
    _, stderr = proc.communicate(timeout=30)
    assert (tmp_path / "got_term").exists(), stderr
    assert proc.returncode == 143, stderr
    calls = (tmp_path / "scontrol_calls").read_text().splitlines()
    assert ("requeue 4242" in calls) == requeued, calls
    args = (tmp_path / "launch_args").read_text().split("\n")
    for flag, value in (("--num_machines", "2"), ("--machine_rank", "0"), ("--main_process_ip", "node1"),
                        ("--num_processes", "16"), ("--resume", "auto"), ("--output-dir", str(tmp_path / "run"))):
        assert args[args.index(flag) + 1] == value, args


@pytest.mark.parametrize("status", [0, 2])
def test_slurm_script_leaves_a_run_that_ended_alone(tmp_path, status):
    env = {**_fake_slurm(tmp_path), "FAKE_EXIT": str(status)}
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm_multinode.sbatch")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == status, result.stderr
    assert not any(c.startswith("requeue") for c in (tmp_path / "scontrol_calls").read_text().splitlines())

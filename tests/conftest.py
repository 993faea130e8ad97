"""Shared fixtures: a tiny demo dataset and a way to run the real CLI (optionally under accelerate launch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "accelerate_configs" / "cpu_2proc.yaml"


TEST_BACKBONE = "timm:resnet18"
"""The backbone of the tests' tiny runs: the training loop, resume, faults and processes do not depend on the trunk,
and ResNet-18 trains a tiny run in 60 % of ResNet-50's time with 45 % of its checkpoint bytes. The default ResNet-50
is trained end to end by the demo-preset run (tests/training/test_training.py), the stem-freezing test and the
bit-identical resume on one process, and checked in tests/test_model.py and tests/test_backbones.py."""


def tiny_overrides(demo_dir: Path, **extra: object) -> list[str]:
    """A run small enough for a test: 32 px crops of 48 px paintings, no mixing, batch 8, one checkpoint kept,
    ``TEST_BACKBONE`` with random weights."""
    values = {
        "model.backbone": TEST_BACKBONE,
        "data.source": "demo", "data.demo_dir": str(demo_dir), "data.demo_size": 200,
        "data.demo_image_side": 48, "data.demo_styles": 4, "data.image_size": 32, "data.num_workers": 0,
        "model.backbone_weights": "null", "augment.mixup_prob": 0.0, "augment.cutmix_prob": 0.0,
        "train.epochs": 2, "train.batch_size": 8, "train.eval_batch_size": 16, "train.log_every": 1,
        "train.keep_last": 1,  # each checkpoint is ~330 MB (weights + AdamW moments): keep test runs light on disk
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--set={k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """Generate the tiny demo once per session (the CLI reuses it when parameters match)."""
    from crnn_art.data.demo import DemoParams, generate_demo

    folder = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo(folder, DemoParams(size=200, image_side=48, styles=4, noise=0.03, seed=0))
    return folder


@contextmanager
def scratch(tmp_path_factory, name: str = "runs") -> Iterator[Path]:
    """A folder for a module-scoped fixture's runs, deleted when the module is done (runs are hundreds of MB)."""
    folder = tmp_path_factory.mktemp(name)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_cli(args: list[str], *, processes: int = 1, env: dict | None = None, timeout: int = 600,
            check: bool = True, cwd: Path | None = None, launcher: str = "accelerate") -> subprocess.CompletedProcess:
    """Run ``crnn-art ARGS`` as a user would: plain, or with two processes under ``accelerate launch`` (or
    ``launcher="crnn-art-launch"``, the wrapper that passes exit statuses on) with the CPU config."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    if processes == 1:
        cmd = [sys.executable, "-m", "crnn_art", *args]
    else:
        assert processes == 2, "the shipped CPU config starts two processes"
        module = "accelerate.commands.launch" if launcher == "accelerate" else "crnn_art.launcher"
        cmd = [sys.executable, "-m", module, "--config_file", str(CPU_2PROC),
               "--main_process_port", str(_free_port()), "-m", "crnn_art", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def _machine_launch(launcher: str, rank: int, machines: int, port: str) -> list[str]:
    """The launcher module and its flags for machine ``rank`` of ``machines`` (one process each) on 127.0.0.1."""
    if launcher == "torchrun":  # elastic: between 1 and `machines` nodes meet at a c10d rendezvous; no node ranks
        return ["torch.distributed.run", f"--nnodes=1:{machines}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=crnn-art-{port}"]
    module = {"accelerate": "accelerate.commands.launch", "crnn-art-launch": "crnn_art.launcher"}[launcher]
    return [module, "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_machines", str(machines), "--num_processes", str(machines), "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--rdzv_backend", "static", "--same_network"]


def run_cli_on_machines(args: list[str], *, machines: int = 2, env: dict | None = None, timeout: int = 600,
                        cwd: Path | None = None, launcher: str = "accelerate") -> list[str]:
    """Run ``crnn-art ARGS`` as on ``machines`` machines with one CPU process each, all started at once: one
    ``accelerate launch`` (or ``launcher="crnn-art-launch"``) per machine with ``--machine_rank`` 0, 1, ..., meeting
    at 127.0.0.1 over a static rendezvous, with the flags of a multi-node launch (``launcher="torchrun"``: an elastic
    launch, ``--nnodes=1:MACHINES`` over c10d). ``--multi_gpu``, not ``--cpu``: the CPU launcher starts one process
    and sets no RANK/WORLD_SIZE, so every machine would train the whole run alone; without a GPU the processes form
    one gloo world. Returns each machine's output (stdout and stderr together); fails when one exits non-zero, after
    stopping the others (a machine left alone waits for its peers until the rendezvous times out)."""
    import signal
    import time
    from contextlib import ExitStack, suppress

    inherited = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    port = str(_free_port())
    procs: list[subprocess.Popen] = []
    with ExitStack() as stack:
        # files, not pipes: a machine whose pipe nobody reads stalls once it is full
        logs = [stack.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in range(machines)]
        try:
            for rank in range(machines):
                cmd = [sys.executable, "-m", *_machine_launch(launcher, rank, machines, port), "-m", "crnn_art", *args]
                procs.append(subprocess.Popen(cmd, stdout=logs[rank], stderr=subprocess.STDOUT, text=True,
                                              env=full_env, cwd=cwd or ROOT, start_new_session=True))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs):
                    deadline = min(deadline, time.monotonic() + 30)  # one failed: its peers get 30 s to notice
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with suppress(ProcessLookupError):  # the launcher stops its processes (in their own sessions)
                        os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
    codes = [p.returncode for p in procs]
    if any(codes):
        report = "\n".join(f"--- machine {rank} exited {code}:\n{out[-4000:]}"
                           for rank, (code, out) in enumerate(zip(codes, outputs, strict=True)))
        raise AssertionError(f"crnn-art {' '.join(args[:1])} on {machines} machines failed:\n{report}")
    return outputs


@pytest.fixture
def hub_down(tmp_path, monkeypatch):
    """The Hub endpoint is a closed local port; huggingface_hub's retry back-off fails the test if it ever runs."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def no_retries(seconds):
        raise AssertionError(f"huggingface_hub retried a request (back-off {seconds} s)")

    monkeypatch.setattr(_http.time, "sleep", no_retries)
    return tmp_path / "hub-cache"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]


E2E_SIGNS = ("run_cli(", "run_cli_on_machines(", "subprocess.", "Popen(", "cli_main([\"train\"",
             "main([\"train\"", "train(run")
"""What makes a test end to end: it starts processes or trains a model (in its body or in a fixture it uses)."""


def _uses(item, needles: tuple[str, ...]) -> bool:
    import inspect

    functions = [item.function]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        functions += [d.func for d in defs]
    for function in functions:
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            continue
        if any(needle in source for needle in needles):
            return True
    return False


def pytest_collection_modifyitems(config, items) -> None:
    """Mark ``e2e`` (trains or starts processes) and ``distributed`` (two processes) from what each test and its
    fixtures do, so that no test can be forgotten: ``./launch/test -m "not e2e"`` is the fast layer."""
    for item in items:
        if _uses(item, E2E_SIGNS):
            item.add_marker(pytest.mark.e2e)
        if _uses(item, ("processes=2", "processes=processes", "CPU_2PROC", "--num_processes", "run_cli_on_machines(")):
            item.add_marker(pytest.mark.distributed)

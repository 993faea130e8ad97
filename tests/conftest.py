"""Shared fixtures: a tiny demo dataset and a way to run the real CLI (optionally under accelerate launch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "accelerate_configs" / "cpu_2proc.yaml"


def tiny_overrides(demo_dir: Path, **extra: object) -> list[str]:
    """A run small enough for a test: 32 px crops of 48 px paintings, no mixing, batch 8, one checkpoint kept."""
    values = {
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]


E2E_SIGNS = ("run_cli(", "subprocess.", "Popen(", "cli_main([\"train\"", "main([\"train\"", "train(run")
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
        if _uses(item, ("processes=2", "processes=processes", "CPU_2PROC", "--num_processes")):
            item.add_marker(pytest.mark.distributed)

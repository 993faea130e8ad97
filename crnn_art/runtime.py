"""The Accelerator a run uses, and the checks that keep several processes honest.

One code path serves a laptop CPU, one GPU, many GPUs and many machines: whatever
``accelerate launch`` (or torchrun, or SLURM) set up in the environment decides the world.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration


class LaunchError(RuntimeError):
    """The processes were not started the way the run needs; the message says how to launch."""


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def resolve_precision(requested: str, cpu: bool) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 (with loss scaling) on older GPUs, fp32 on CPU."""
    if requested != "auto":
        return requested
    if cpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_world(accelerator: Accelerator) -> None:
    """Stop when the environment says several processes but Accelerate sees one.

    Each process would then train the whole dataset on its own and write the same files: the
    run "works", twice, with nothing synchronised (LESSONS.md).
    """
    world = _env_world_size()
    if world > 1 and accelerator.num_processes != world:
        raise LaunchError(
            f"WORLD_SIZE={world} but Accelerate sees {accelerator.num_processes} process(es): every process "
            "would train alone. On a machine without GPUs launch with "
            "`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m crnn_art train ...` "
            "(crnn-art then uses gloo on the CPU), or unset WORLD_SIZE for a single process"
        )


def make_accelerator(mixed_precision: str = "auto", cpu: bool | None = None, **kwargs) -> Accelerator:
    """Build the run's Accelerator. ``cpu=None`` means: the CPU (gloo) when no GPU is visible.

    ``cpu=True`` matters: without it, processes started by a multi-GPU launcher on a machine with
    no GPU are each a world of one (LESSONS.md).
    """
    world = _env_world_size()
    if world > 1 and "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        raise LaunchError(
            f"WORLD_SIZE={world} is set but this process was not started by a launcher (no RANK); "
            "unset WORLD_SIZE, or start the run with `accelerate launch` / torchrun"
        )
    if cpu is None:
        cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(mixed_precision, cpu),
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    check_world(accelerator)
    return accelerator


EXIT_DIR_ENV = "CRNN_ART_EXIT_DIR"
"""Set by ``crnn-art-launch``: each process records its exit status and message there instead of
printing, so the launcher prints every distinct message once and exits with the status that
says what happened (143 preempted, 2 a user error), not the launcher's own 1."""


def report_exit(code: int, message: str, every_rank: bool = True) -> int:
    """Say why this process ends (one line on stderr) and return ``code``.

    Under ``crnn-art-launch`` the line is recorded for the launcher instead. ``every_rank=False``
    prints it on the main process only (a stop that every process reports alike).
    """
    folder = os.environ.get(EXIT_DIR_ENV)
    rank = os.environ.get("RANK", "0")
    if folder:
        try:
            Path(folder, f"rank{rank}.json").write_text(json.dumps({"code": code, "message": message}))
            return code
        except OSError:
            pass  # the launcher's folder is gone: say it here instead
    if every_rank or rank == "0":
        print(message, file=sys.stderr, flush=True)
    return code


def stop_worker_processes(timeout: float = 5.0) -> int:
    """Kill this process's daemonic children (DataLoader workers) and wait for them; returns how many.

    Workers ignore SIGTERM (see ``loaders``), and a worker left alive by an error would make the
    interpreter's exit, which terminates them with SIGTERM and joins them, wait forever. SIGCHLD
    goes back to its default first: PyTorch's handler would report the killed workers as a crash.
    """
    import multiprocessing
    import signal

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout)
    return len(children)

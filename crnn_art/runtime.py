"""The Accelerator a run uses, and the checks that keep several processes honest.

One code path serves a laptop CPU, one GPU, many GPUs and many machines: whatever
``accelerate launch`` (or torchrun, or SLURM) set up in the environment decides the world.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator, DataLoaderConfiguration

from crnn_art.errors import LaunchError


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
    run "works", twice, with nothing synchronised.
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
    no GPU are each a world of one.
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


@dataclass
class CpuPlan:
    """How a process uses the CPU cores it has: DataLoader workers and PyTorch's intra-op threads."""

    cores: int
    """Cores this process may use: the machine's (its CPU affinity) shared by the processes on it."""
    workers: int
    threads: int

    def describe(self) -> str:
        return f"{self.workers} DataLoader worker(s) and {self.threads} thread(s) per process ({self.cores} core(s))"


def cores_per_process() -> int:
    """The cores this process may use (``os.sched_getaffinity``: what a container or SLURM gives it) divided by the
    processes on this machine (``LOCAL_WORLD_SIZE``, set by accelerate launch and torchrun)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local))


def workers_for(requested: int | None) -> int:
    """``data.num_workers``, or with null half of this process's cores (at most 4): workers decode while the
    training process computes; more than the cores only makes them wait for each other."""
    return requested if requested is not None else min(4, cores_per_process() // 2)


def fit_to_cores(requested_workers: int | None) -> CpuPlan:
    """Choose the workers and the training process's threads from the cores it has, and set the threads.

    Threads: this process's share of the cores (torch's default is every core of the machine for each process,
    so several processes, or a machine already busy, oversubscribe it; measured in docs/speed.md). A user's
    ``OMP_NUM_THREADS`` is kept as it is."""
    cores = cores_per_process()
    workers = workers_for(requested_workers)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores)
    return CpuPlan(cores, workers, torch.get_num_threads())

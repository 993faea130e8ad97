"""The Accelerator a run uses, and the checks that keep several processes honest.

One code path serves a laptop CPU, one GPU, many GPUs and many machines: whatever
``accelerate launch`` (or torchrun, or SLURM) set up in the environment decides the world.
"""

from __future__ import annotations

import os

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

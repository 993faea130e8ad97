"""Workers and threads follow the cores a process has (its CPU affinity shared by the processes on the machine)."""

from __future__ import annotations

import os

import pytest
import torch

from crnn_art.runtime import cores_per_process, fit_to_cores, workers_for


@pytest.fixture
def machine(monkeypatch):
    def set_up(cores: int, local_processes: int | None = None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
        if local_processes is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    threads = torch.get_num_threads()
    yield set_up
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("cores", "local", "per_process", "workers", "threads"), [
    (2, None, 2, 1, 2),     # the 2-core laptop: one worker decodes, the training process computes on both cores
    (1, None, 1, 0, 1),     # one core: load in the training process
    (16, 8, 2, 1, 2),       # 8 GPUs on 16 cores: 2 cores each
    (64, 8, 8, 4, 8),       # 8 GPUs on 64 cores: at most 4 workers
    (2, 2, 1, 0, 1),        # two CPU processes on 2 cores (the tests' distributed runs): one thread each
])
def test_workers_and_threads_follow_this_process_share_of_the_cores(machine, cores, local, per_process, workers,
                                                                    threads):
    machine(cores, local)
    assert cores_per_process() == per_process
    plan = fit_to_cores(None)
    assert (plan.workers, plan.threads) == (workers, threads)
    assert torch.get_num_threads() == threads
    assert f"{workers} DataLoader worker(s) and {threads} thread(s)" in plan.describe()


def test_a_chosen_worker_count_and_omp_threads_are_kept(machine, monkeypatch):
    machine(8)
    assert workers_for(3) == 3
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert fit_to_cores(0).threads == 2  # the user's OMP_NUM_THREADS wins

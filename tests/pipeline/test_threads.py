"""pipeline/threads.py: --threads, else SLURM_CPUS_PER_TASK, else OMP_NUM_THREADS, else torch's default;
the number chosen is the one torch then uses."""

import pytest
import torch

from pipeline.errors import DistillError
from pipeline.threads import choose_threads, set_threads

VARIABLES = ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")


@pytest.fixture
def env(monkeypatch):
    """The process environment without the three variables; the test sets those it needs. torch's
    thread count comes back afterwards."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


@pytest.mark.parametrize("requested,variables,want", [
    (3, {"SLURM_CPUS_PER_TASK": "5", "OMP_NUM_THREADS": "7"}, (3, "--threads")),
    (0, {"SLURM_CPUS_PER_TASK": "5", "OMP_NUM_THREADS": "7"}, (5, "SLURM_CPUS_PER_TASK")),
    (0, {"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "4"}, (2, "SLURM_CPUS_PER_TASK / LOCAL_WORLD_SIZE 4")),
    (0, {"SLURM_CPUS_PER_TASK": "2", "LOCAL_WORLD_SIZE": "4"}, (1, "SLURM_CPUS_PER_TASK / LOCAL_WORLD_SIZE 4")),
    (0, {"OMP_NUM_THREADS": "7"}, (7, "OMP_NUM_THREADS")),
    (0, {"OMP_NUM_THREADS": "6,2", "SLURM_CPUS_PER_TASK": ""}, (6, "OMP_NUM_THREADS")),
    (0, {}, (None, "torch default")),
], ids=["flag", "slurm", "slurm-torchrun", "slurm-torchrun-floor", "omp", "omp-nested", "default"])
def test_precedence(env, requested, variables, want):
    for name, value in variables.items():
        env.setenv(name, value)
    assert choose_threads(requested) == want


def test_the_chosen_number_reaches_torch(env):
    env.setenv("OMP_NUM_THREADS", "2")
    env.setenv("SLURM_CPUS_PER_TASK", "3")
    assert set_threads(0) == {"threads": 3, "threads_from": "SLURM_CPUS_PER_TASK"}
    assert torch.get_num_threads() == 3
    assert set_threads(1) == {"threads": 1, "threads_from": "--threads"}
    assert torch.get_num_threads() == 1
    env.delenv("SLURM_CPUS_PER_TASK")
    assert set_threads(0)["threads"] == torch.get_num_threads() == 2


def test_without_any_number_torch_keeps_its_own(env):
    torch.set_num_threads(2)
    assert set_threads(0) == {"threads": 2, "threads_from": "torch default"}


@pytest.mark.parametrize("name,value", [("SLURM_CPUS_PER_TASK", "0"), ("OMP_NUM_THREADS", "four")])
def test_a_bad_variable_is_one_line(env, name, value):
    env.setenv(name, value)
    with pytest.raises(DistillError, match=rf"^{name}='{value}' is not a positive whole number; fix or unset it, "
                                           r"or pass --threads N$"):
        choose_threads(0)

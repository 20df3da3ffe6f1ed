"""How many CPU threads torch's intra-op work uses: one decision, made the same way in every stage.

torch starts as many intra-op threads as the node has cores, whatever the job was given; on a shared
node they oversubscribe the cores and every operation waits on the slowest thread (one stage-one
decoding step on 2 cores under load: 457 ms with torch's 2 threads, 44 ms with 1). So each stage
that runs torch sets the number at its start, from the first of

1. ``--threads N`` (N ≥ 1),
2. ``SLURM_CPUS_PER_TASK`` (what the job was given; under torchrun, shared by the
   ``LOCAL_WORLD_SIZE`` processes it started in the task),
3. ``OMP_NUM_THREADS`` (its first number),
4. torch's own default,

and records the number and where it came from in the run's resolved config or metrics.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from pipeline.errors import DistillError


def _whole(environ: Mapping[str, str], name: str) -> int | None:
    """A positive whole number from the variable ``name``, None if unset or empty; a one-line error if not one."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    first = raw.split(",")[0].strip()  # OMP_NUM_THREADS may list one number per nesting level
    if not first.isdigit() or int(first) < 1:
        raise DistillError(f"{name}={raw!r} is not a positive whole number; fix or unset it, or pass --threads N")
    return int(first)


def choose_threads(requested: int = 0, environ: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """(threads, where the number came from) by the order above; (None, 'torch default') when
    nothing asks for a number. ``requested`` is ``--threads`` (0 = not given)."""
    environ = os.environ if environ is None else environ
    if requested > 0:
        return requested, "--threads"
    if (cpus := _whole(environ, "SLURM_CPUS_PER_TASK")) is not None:
        local = _whole(environ, "LOCAL_WORLD_SIZE") or 1  # torchrun's processes in this task share its CPUs
        return max(1, cpus // local), "SLURM_CPUS_PER_TASK" + (f" / LOCAL_WORLD_SIZE {local}" if local > 1 else "")
    if (omp := _whole(environ, "OMP_NUM_THREADS")) is not None:
        return omp, "OMP_NUM_THREADS"
    return None, "torch default"


def set_threads(requested: int = 0, environ: Mapping[str, str] | None = None) -> dict[str, int | str]:
    """Set torch's intra-op threads as :func:`choose_threads` decides; returns what to record:
    ``{"threads": the number torch now uses, "threads_from": where it came from}``."""
    threads, source = choose_threads(requested, environ)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "threads_from": source}


THREADS_HELP = ("CPU threads for torch (0 = SLURM_CPUS_PER_TASK, shared by torchrun's processes, else OMP_NUM_THREADS, "
                "else torch's default).")


def threads_problems(threads: int) -> list[str]:
    """The config check of a stage's ``threads`` field."""
    return [] if threads >= 0 else [f"threads must not be negative (0 = from the environment), got {threads}"]

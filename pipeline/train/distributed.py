"""How the student is spread over processes (``torchrun``): the process group, DDP or FSDP, the
global batch and the order of its rows, and checkpoints that resume on another number of processes.

**Processes** (:func:`process_group`): one per GPU under ``torchrun``; gloo carries the step's small
CPU all-reduces (loss sums, target counts, pre-emption flags), NCCL the gradients beside it on CUDA.

**Wrapping** (:func:`wrap`): one process trains the step module itself. Several replicate it under
DDP or, with ``--fsdp``, shard it with FSDP2 (``fully_shard``: each decoder layer, then the rest).
Under bf16 a ``MixedPrecisionPolicy`` gathers the parameters in bf16 and computes in bf16, while
the sharded parameters, the gradients and the optimizer state stay float32 and gradients are
reduced in float32 (a bf16 sum over many ranks loses the small ones). ``--fsdp-offload`` keeps the
sharded parameters, gradients and optimizer state on the CPU (``CPUOffloadPolicy``; the optimizer
steps there): the GPU holds only the layers being gathered and the activations.

**Global batch and data order** (:class:`GlobalBatch`): an optimizer step reads a global batch of
G rows (``--global-batch-rows``, ``--global-batch-tokens``, or micro-batch × processes ×
``--grad-accum``), and the accumulation follows: G / (micro-batch rows b × processes W). The
loader (``pipeline/train/loader.py``) orders a seed's rows as one sequence across epochs; global
step s reads rows s·G … (s+1)·G − 1 of it whatever W is, the ranks splitting them among themselves
(micro-batch m of rank r: rows s·G + (m·W + r)·b …, b of them). The step's loss is its targets' sum
over their global count, so which rank reads which row changes only the order of float sums: a run
resumes on another number of processes on the same global batches, and the loader's position
(epoch, next row) in a checkpoint is global.

**Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`): a replicated run (one process,
DDP) saves its full states from rank 0 in ``state.pt``, as before. A ``--fsdp`` run (at any number of
processes) writes its model and optimizer with ``torch.distributed.checkpoint`` (DCP): each rank
its own shards, so no rank gathers the model, named by parameter (``get_state_dict``), beside a
small ``state.pt``; every rank writes into one temp directory, rank 0 seals it (manifest, rename:
``pipeline/train/checkpoint.py``). DCP reshards on load, so a sharded checkpoint loads at any number
of processes, sharded or not; a full one loads into a sharded model too (old checkpoints resume).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import DistillError
from pipeline.io import file_sha256, removed_if_failed
from pipeline.train import checkpoint


def process_group() -> tuple[int, int, int]:
    """(rank, world size, local rank), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        # gloo beside NCCL: the step's loss sums are all-reduced as small CPU tensors
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


# ---------------------------------------------------------------------- the global batch


@dataclass(frozen=True)
class GlobalBatch:
    """Rows per optimizer step (all processes), per forward pass of one process, and processes."""

    rows: int
    micro_rows: int
    world: int

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step, per process."""
        return self.rows // (self.micro_rows * self.world)


def global_batch(rows: int, tokens: int, micro_rows: int, grad_accum: int, world: int, seq_len: int) -> GlobalBatch:
    """The global batch ``--global-batch-rows`` (``rows``) or ``--global-batch-tokens`` (``tokens``, rows
    of ``seq_len`` tokens) asks for, or (neither set) ``micro_rows × world × grad_accum`` rows; one
    line if it is no whole number of micro-batches on every process."""
    if tokens:
        if tokens % seq_len:
            raise DistillError(f"--global-batch-tokens {tokens} is not a whole number of rows of {seq_len} tokens "
                               f"(the train store's sequence length); pass a multiple of {seq_len}, such as "
                               f"{max(1, round(tokens / seq_len)) * seq_len}")
        rows, asked = tokens // seq_len, f"--global-batch-tokens {tokens} ({tokens // seq_len} rows)"
    elif rows:
        asked = f"--global-batch-rows {rows}"
    else:
        return GlobalBatch(micro_rows * world * grad_accum, micro_rows, world)
    per_pass = micro_rows * world
    if rows % per_pass:
        processes = f"{world} processes" if world > 1 else "1 process"
        raise DistillError(f"{asked} does not divide into micro-batches of {micro_rows} rows on {processes} "
                           f"({per_pass} rows a pass); pass a global batch that is a multiple of {per_pass}, "
                           "or another --micro-batch-size")
    return GlobalBatch(rows, micro_rows, world)


def saved_global_rows(saved: dict[str, Any]) -> int:
    """The global batch (rows) of the run that wrote a checkpoint, from its ``config.json``; one written
    before it was recorded: its micro-batch × processes × accumulation."""
    if "global_batch_rows" in saved:
        return int(saved["global_batch_rows"])
    config = saved["config"]
    return int(config["micro_batch_size"]) * int(saved.get("world_size", 1)) * int(config.get("grad_accum", 1))


# ---------------------------------------------------------------------- wrapping


def wrap(step_module: torch.nn.Module, world: int, device: torch.device, *, fsdp: bool, offload: bool = False,
         bf16: bool = False) -> torch.nn.Module:
    """The step module as the processes share it: itself (one process), under DDP, or (``fsdp``)
    sharded with FSDP2, in bf16 with float32 reductions where ``bf16``, on the CPU where ``offload``.
    The optimizer is built after this, on the parameters as they are now (FSDP's are DTensors)."""
    if world == 1:
        return step_module
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    precision = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {}
    placement = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for layer in step_module.model.get_decoder().layers:
        fully_shard(layer, mp_policy=MixedPrecisionPolicy(**precision), offload_policy=placement)
    # the step's inputs include the teacher's stored log-probs: they stay in the store's precision
    fully_shard(step_module, mp_policy=MixedPrecisionPolicy(**precision, cast_forward_inputs=False),
                offload_policy=placement)
    return step_module


def accumulating(wrapped: torch.nn.Module, last: bool):
    """The context a micro-batch's backward runs in: DDP all-reduces gradients on the ``last``
    micro-batch of a step only; FSDP reduce-scatters each one (an unsharded gradient kept across
    micro-batches would cost the memory sharding saves)."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not last:
        return wrapped.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------------- states and checkpoints


def gather_state(model, optimizer, sharded: bool):
    """Full (unsharded) model and optimizer state dicts, on CPU under FSDP (rank 0's; the others get
    empty ones). A collective under FSDP: every rank calls it."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_state, optim_state


def save_checkpoint(root: Path, step: int, model, optimizer, state: dict[str, Any], config: dict[str, Any],
                    keep: int, *, rank: int, world: int, fsdp: bool) -> None:
    """The checkpoint of ``step`` under ``root``: model and optimizer, plus ``state`` (scheduler, step,
    data position, RNG: rank 0's are kept) and ``config``. Every rank calls it. Replicated (not
    ``fsdp``): rank 0 writes the full states in ``state.pt``. ``fsdp``: DCP shards from every rank
    beside ``state.pt``; the checkpoint is under its name on return."""
    if not fsdp:
        if rank == 0:  # every rank holds the whole model: nothing to gather
            checkpoint.save(root, step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state},
                            config, keep)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # this rank's shards, keyed by parameter name
    tmp = checkpoint.temp_dir(root, step, os.getpid()) if rank == 0 else None
    with removed_if_failed(tmp) if rank == 0 else contextlib.nullcontext():
        if world > 1:  # every rank writes into rank 0's temp directory (a file system they share)
            shared = [tmp]
            dist.broadcast_object_list(shared, src=0)
            tmp = shared[0]
        with _alone(world):
            dcp.save({"model": model_state, "optimizer": optim_state},
                     storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=world == 1)
        # each rank hashes the shards it wrote (DCP names them __RANK_N.distcp), rank 0 the rest
        mine = {p.name: _entry(p) for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}
        hashed = [None] * world
        if world > 1:
            dist.all_gather_object(hashed, mine)
        else:
            hashed = [mine]
        if rank == 0:
            shards = {name: entry for part in hashed for name, entry in part.items()}
            shards |= {p.name: _entry(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in shards}
            checkpoint.seal(root, tmp, step, state, config, keep, shards=shards)
    if world > 1:
        dist.barrier()  # the checkpoint is under its name before any rank goes on (or leaves, pre-empted)


@contextlib.contextmanager
def _alone(world: int):
    """One process reads and writes DCP without a process group, as meant: DCP's warning that it
    assumes so is not for the user."""
    with warnings.catch_warnings():
        if world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def load_checkpoint(path: Path, state: dict[str, Any], model, optimizer, *, world: int, sharded: bool) -> None:
    """Model and optimizer from the checkpoint at ``path`` (``state``: its ``state.pt``), into the model
    as this run holds it (``sharded``: FSDP over ``world`` processes). Every rank calls it.

    A DCP checkpoint is read into this run's own layout (DCP reshards: a checkpoint of 2 sharded
    processes loads into 1 plain one and back); a full one (one process, DDP, or written before
    checkpoints were sharded) loads as it is, or, into a sharded model, by parameter name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)

    if checkpoint.sharded(path):
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(model, optimizer)  # what to fill, and where each part lives
        shards = {"model": model_state, "optimizer": optim_state}
        with _alone(world):
            dcp.load(shards, storage_reader=dcp.FileSystemReader(path), no_dist=world == 1)
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
        return
    optim_state = state["optimizer"]
    by_id = all(isinstance(k, int) for k in optim_state["state"]) and all(
        isinstance(p, int) for group in optim_state["param_groups"] for p in group["params"])
    if not sharded and by_id:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(optim_state)
        return
    if by_id:  # a replicated run's optimizer, numbered in parameter order: named for the sharded one
        optim_state = named_optimizer_state(model, optimizer, optim_state)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def named_optimizer_state(model, optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()``'s form (parameters numbered in ``optimizer``'s order) in
    ``get_optimizer_state_dict``'s (parameters by name). ``optimizer`` must be built as the one that
    wrote it was, over ``model``'s parameters."""
    names = {param: name for name, param in model.named_parameters()}
    order = [names[param] for group in optimizer.param_groups for param in group["params"]]
    if len(order) != sum(len(group["params"]) for group in state["param_groups"]):
        raise DistillError(f"the checkpoint's optimizer holds {sum(len(g['params']) for g in state['param_groups'])} "
                           f"parameters, this model {len(order)}; resume with the model it was written for")
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [group | {"params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}

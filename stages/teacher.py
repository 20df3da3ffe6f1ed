"""Stage one: run the teacher once over a ``tokens`` store and store its predictions.

Four kinds of store (``docs/FORMAT.md``): ``sampled`` (the default: N draws per position from the
teacher at the cache temperature, as distinct ids with counts, :mod:`pipeline.teacher.sampling`),
``topk`` (the k largest predictions and the exact tail mass), the hybrid, ``topk`` with
``--tail-samples M`` (the top-k plus M draws from the rest), and ``target`` (only the teacher's
log-prob of each next token at the cache temperature: what a policy-gradient objective on sequences
the student sampled needs, about 4 bytes per token). A store that draws may also hold every drawn
id's log-prob (``--sample-logprobs``), so stage two can reweight draws to another grid temperature.
Every kind copies the tokens store's ``loss_mask`` and ``behaviour_logprob`` where it has them.

setup → loop → finish. The teacher's body runs on a batch of rows; its output head then runs on
chunks of ``position_chunk`` positions, and each chunk is reduced on the device to top-k ids and
log-probs (top-1 for a sampled store), log-sum-exp at every grid temperature, the exact tail mass
and the true token's log-prob (:func:`pipeline.teacher.topk.sparse_teacher`), and drawn from
(:func:`pipeline.teacher.sampling.sample_teacher`): by the fused C kernel on a CPU, the fused Triton
kernels on CUDA (:mod:`pipeline.teacher.fused_gpu`), or torch. A ``[B, L, V]`` float32 logit tensor
never exists, so a 150k vocabulary and long rows fit. A writer thread compresses and renames each
finished shard while the next one is computed; on CUDA each batch's outputs are also copied to
pinned host memory on a second stream and waited for only once the next batch is queued.

Parallel and idempotent: the store's shards are fixed row ranges; job ``i`` of ``n`` writes shards
``i, i+n, i+2n, …`` and records each finished one in its own partial index
(``index.part-IIIII-of-NNNNN.json``). A rerun skips shards recorded there and redoes any other
(a shard renamed into place but not yet recorded, after a kill). When the partial indexes cover
every shard, ``index.json`` is written (here, or by ``distill merge``). A job that owns no shard
(``--num-shards`` above the store's shard count) says so in one line and exits 0 before the teacher
is hashed or loaded, writing nothing: not an error, since `distill slurm --rounds` sizes one stage-one
array for stores only known once generated (a round's, and its smaller held-out one), and the jobs
that own the shards fill the store all the same. Where the count is known when the scripts are
written, ``distill slurm`` refuses the surplus instead.

Pre-emption (``pipeline/preempt.py``): on SIGUSR1 or SIGTERM the job finishes the shard it is
computing (``--on-preempt abandon``: drops it at the next batch), lets the writer record it, releases
its lock and exits with status 75; the same command continues.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from pipeline import preempt
from pipeline.checks import check_output_rows, check_store_fits
from pipeline.config import check, option, required, save_resolved
from pipeline.errors import DistillError
from pipeline.io import file_sha256
from pipeline.models import (ATTN_HELP, AUTO_DTYPE_HELP, DEVICE_MAP_PRESETS, TF32_HELP, WEIGHT_FILES, OutputHead,
                             attn_implementation_problems, check_device_map, check_devices, check_document_attention,
                             device_map_problems, device_problems, dtype_problems, execution_device, has_weights,
                             hf_config, load_model, matmul_precision, max_positions, parse_max_memory, placement,
                             read_device_map, resolve_device, resolve_dtype, set_tf32)
from pipeline.outdir import STORE, clear
from pipeline.store import contract as store_lib
from pipeline.text.packing import RowRule
from pipeline.teacher.sampling import (fused_gpu_problem, position_keys, sample_teacher, sample_teacher_deferred,
                                      sampled_logprobs)
from pipeline.teacher.topk import KERNELS, resolve_kernel, sparse_teacher, sparse_teacher_deferred
from pipeline.text.tokenizer import load_tokenizer, tokenizer_hash, vocab_size
from pipeline.threads import THREADS_HELP, set_threads, threads_problems
from pipeline.train.tracking import (REPORT_TO_HELP, Tracker, check_installed, peak_memory, report_to_problems,
                                    stage_one_tracker)

ON_PREEMPT = ("finish", "abandon")

# Arrays of the tokens store copied into the teacher's store row for row. The loss mask is copied whole,
# prompt positions included: the teacher runs over them anyway (a response's predictions need its
# prompt in context), and a store of every position stays usable without the mask. The behaviour
# log-prob (prepare --format ids of sequences a policy sampled) travels the same way.
COPIED = ("input_ids", *store_lib.COPIED_ARRAYS)
KINDS = ("topk", "sampled", "target")
DEFAULT_GRID = (1.0, 2.0)

@dataclass(frozen=True)
class TeacherConfig:
    tokens_store: str = option("", "The 'tokens' store to run the teacher over.")
    out: str = option("", "Directory of the store to write (or to continue).")
    teacher: str = option("data/models/teacher", "Local Hugging Face causal LM directory (with weights).")
    tokenizer: str = option("", "Tokenizer directory (default: the one recorded in the tokens store).")
    kind: str = option("sampled", "What is stored per position: 'sampled' (N draws from the teacher, stored as "
                       "unique ids with counts: an unbiased target, docs/BENCHMARKS.md), 'topk' (the k largest "
                       "predictions and the exact tail mass; what eval's agreement task reads) or 'target' (only "
                       "the teacher's log-prob of the next token at T, ~4 bytes per token: for a policy-gradient "
                       "objective on sequences the student sampled, prepare --format ids).")
    top_k: int = option(64, "Teacher predictions kept per position (--kind topk).")
    samples: int = option(32, "Draws per position from the teacher at T (--kind sampled).")
    tail_samples: int = option(0, "Hybrid (--kind topk): also M draws per position from the teacher restricted to "
                               "its tail (the non-kept ids, renormalised), so the tail mass is spread over real ids.")
    sample_logprobs: bool = option(False, "Also store the teacher's log-prob of each drawn id (≈2 bytes per id), so "
                                   "stage two can train at another grid temperature (importance weights).")
    seed: int = option(0, "Seed of the draws: each (seed, row, position) draws the same ids in any job or rerun.")
    temperature: float = option(1.0, "Cache temperature T: of the stored log-probs, and the one draws are made at.")
    temperature_grid: tuple[float, ...] = option((), "Temperatures stage two may train at: kept log-probs "
                                                 "and tail mass stay exactly recoverable there, and draws can be "
                                                 "reweighted (--sample-logprobs) (T is always added; default 1 and "
                                                 "2; a target store holds T alone).")
    backend: str = option("zarr", "Store backend: 'zarr' (v3, sharded, zstd) or 'arrow' (IPC, zstd).")
    batch_size: int = option(8, "Rows per teacher forward pass.")
    position_chunk: int = option(1024, "Positions per output-head/top-k chunk (bounds memory at chunk × vocab).")
    rows_per_shard: int = option(256, "Rows per store shard (the unit of parallel work and of resume).")
    chunk_rows: int = option(16, "Rows per compressed chunk inside a shard.")
    max_rows: int = option(0, "Use only the first N rows of the tokens store (0 = all).")
    shard_index: int = option(0, "This job's index among --num-shards jobs (a SLURM array task id).")
    num_shards: int = option(1, "Number of independent jobs filling the store.")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int = option(0, THREADS_HELP)
    device_map: str | dict = option("", "Spread a teacher larger than one GPU over several (accelerate): 'auto' "
                                    "fills the visible GPUs in order (also balanced, balanced_low_0, sequential), or "
                                    "a JSON/YAML file or inline JSON mapping module name → GPU index, cpu or disk. "
                                    "The store is the same as on one device.")
    max_memory: tuple[str, ...] = option((), "With a --device-map preset: memory each device may hold, e.g. "
                                         "0=70GiB,1=70GiB,cpu=200GiB.")
    dtype: str = option("auto", "Teacher compute dtype: auto, float32, bfloat16 or float16 (the reductions, top-k, "
                        "log-sum-exp and draws, are float32 whatever it is). " + AUTO_DTYPE_HELP + " The resolved "
                        "dtype is one of the store's params.")
    tf32: bool = option(True, TF32_HELP)
    kernel: str = option("auto", "Top-k/log-sum-exp reductions and draws: 'native' (the fused kernel of the device: "
                         "C on a CPU, built with the system C compiler on first use; Triton on CUDA), 'torch' (any "
                         "device), or 'auto' (native where it builds and agrees with torch, else torch). All write "
                         "the same store to float32 rounding, and the same draws.")
    overlap: bool = option(True, "On CUDA: copy each batch's outputs to pinned host memory on a second stream, and "
                           "wait for them only once the next batch is queued (off: wait at once; the store is the "
                           "same).")
    logprob_dtype: str = option("float16", "dtype of the stored log-probs (top-k, and drawn ids' with "
                                "--sample-logprobs): float16 (compact) or float32 (exact, for checking losses "
                                "against an online teacher).")
    attn_implementation: str = option("auto", ATTN_HELP)
    trust_remote_code: bool = option(False, "Allow the teacher directory's own model code to run.")
    overwrite: bool = option(False, "Delete an existing store built with different parameters (single job only).")
    report_to: tuple[str, ...] = option(("jsonl",), REPORT_TO_HELP + " Stage one logs per shard written; an "
                                        "array job to files of its own (metrics.part-JJJJJ.jsonl, ...).")
    on_preempt: str = option("finish", "On SIGUSR1/SIGTERM (a batch system's warning): 'finish' the shard being "
                             "computed, or 'abandon' it at the next batch (a shard takes longer than the warning "
                             "gives); either way the job then exits with status 75 and a rerun continues.")

    def __post_init__(self):
        problems = required(self, "tokens_store", "out") + format_problems(self)
        if self.max_rows < 0:
            problems.append("max_rows must not be negative")
        for name in ("batch_size", "position_chunk", "num_shards"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0 <= self.shard_index < max(self.num_shards, 1):
            problems.append(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.kernel not in KERNELS:
            problems.append(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        problems += dtype_problems(self.dtype) + device_problems(self.device) + threads_problems(self.threads)
        problems += attn_implementation_problems(self.attn_implementation, self.device, self.dtype)
        problems += placement_problems(self) + report_to_problems(self.report_to)
        if self.on_preempt not in ON_PREEMPT:
            problems.append(f"on_preempt must be one of {', '.join(ON_PREEMPT)}, got {self.on_preempt!r}")
        if self.overwrite and self.num_shards > 1:
            problems.append("--overwrite with --num-shards > 1 would let jobs delete each other's work; "
                            "delete the store once before launching the array")
        check(problems, "teacher")

    @property
    def grid(self) -> tuple[float, ...]:
        return resolve_grid(self.kind, self.temperature, self.temperature_grid)


def resolve_grid(kind: str, temperature: float, temperature_grid: tuple[float, ...]) -> tuple[float, ...]:
    """The store's temperature grid: the one asked for (default :data:`DEFAULT_GRID`) with the cache
    temperature added; a target store's is the cache temperature alone."""
    if kind == "target":
        return (temperature,)
    return tuple(sorted(set(temperature_grid or DEFAULT_GRID) | {temperature}))


def format_problems(config, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """What is wrong with the options that decide a store's layout (kind, k, draws, temperatures,
    backend, shard and chunk rows): shared by ``distill teacher`` and ``distill plan`` (which sizes
    the ``kinds`` it knows)."""
    problems = []
    if config.kind not in kinds:
        problems.append(f"kind must be {', '.join(kinds[:-1])} or {kinds[-1]}, got {config.kind!r}")
    if config.top_k < 1:
        problems.append(f"top_k must be at least 1, got {config.top_k}")
    if not 1 <= config.samples <= 65535:
        problems.append(f"samples must be in [1, 65535], got {config.samples}")
    if not 0 <= config.tail_samples <= 65535:
        problems.append(f"tail_samples must be in [0, 65535], got {config.tail_samples}")
    if config.kind == "sampled" and config.tail_samples:
        problems.append("--tail-samples is for --kind topk (the hybrid); a sampled store draws --samples")
    if config.kind == "target" and config.tail_samples:
        problems.append("--tail-samples is for --kind topk (the hybrid); a target store draws nothing")
    if config.sample_logprobs and config.kind != "sampled" and not config.tail_samples:
        problems.append("--sample-logprobs needs draws: --kind sampled, or --tail-samples M with --kind topk")
    if not config.temperature > 0:
        problems.append(f"temperature must be > 0, got {config.temperature}")
    if any(not t > 0 for t in config.temperature_grid):
        problems.append(f"temperature_grid must be temperatures > 0, got {list(config.temperature_grid)}")
    elif config.kind == "target" and set(config.temperature_grid) - {config.temperature}:
        problems.append(f"a target store holds the teacher's log-probs at the cache temperature alone "
                        f"(--temperature {config.temperature:g}); drop --temperature-grid")
    if config.backend not in store_lib.BACKENDS:
        problems.append(f"backend must be one of {', '.join(store_lib.BACKENDS)}, got {config.backend!r}")
    for name in ("rows_per_shard", "chunk_rows"):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be at least 1")
    if config.logprob_dtype not in ("float16", "float32"):
        problems.append(f"logprob_dtype must be float16 or float32, got {config.logprob_dtype!r}")
    return problems


def placement_problems(config: TeacherConfig) -> list[str]:
    """--device-map and --max-memory: readable, on devices this machine has, not fighting --device."""
    if not config.device_map:
        return ["--max-memory applies to --device-map (auto, balanced, …)"] if config.max_memory else []
    if not isinstance(config.device_map, (str, dict)):
        return [f"device_map must be a preset, a file or a mapping of module → device, got {config.device_map!r}"]
    problems = device_map_problems(config.device_map)
    if config.device != "auto":
        problems.append(f"--device {config.device} and --device-map both place the teacher; pass one of them")
    if config.max_memory:
        if not (isinstance(config.device_map, str) and config.device_map in DEVICE_MAP_PRESETS):
            problems.append("--max-memory applies to a --device-map preset (auto, balanced, …); an explicit map "
                            "already places every module")
        try:
            parse_max_memory(config.max_memory)
        except DistillError as e:
            problems.append(str(e))
    return problems


@dataclass(frozen=True)
class TeacherRun:
    out: Path
    tokens: int  # tokens computed by this call (0 when everything was already there)
    seconds: float  # wall time of the compute-and-write loop, setup excluded


def weights_sha256(path: Path) -> str:
    """sha256 over the teacher's weight files (names and bytes): which weights made a store."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.name in WEIGHT_FILES or p.suffix in (".safetensors", ".bin"))
    for file in files:
        digest.update(file.name.encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()


@dataclass
class TeacherJob:
    """What setup gives the loop: this job's part of the store and the teacher that computes it."""

    config: TeacherConfig
    out: Path
    tokens: store_lib.Store
    params: dict  # what decides the store's content (index.json's params)
    arrays: dict  # each stored array's dtype and per-row shape
    vocab: int
    n_rows: int
    todo: list[int]  # shard numbers this job still has to write
    done: dict[str, dict]  # index entries of the shards this job has finished, by name
    head: OutputHead
    device: torch.device
    kernel: str
    lock: store_lib.JobLock  # held until the job's last shard is recorded
    rule: RowRule = RowRule()  # how the tokens store's rows attend (its params; docs/FORMAT.md)
    tracker: Tracker | None = None  # metrics.jsonl and the --report-to sinks: a record per shard written

    def record(self, entry: dict) -> None:
        """Called by the writer thread alone, after the shard is renamed into place."""
        self.done[entry["name"]] = entry
        path = store_lib.partial_index_path(self.out, self.config.shard_index, self.config.num_shards)
        store_lib.write_partial_index(path, self.params, self.config.backend, self.arrays, list(self.done.values()))
        if self.tracker is not None:
            self.tracker.log(step=len(self.done), shards_done=len(self.done), rows=entry["rows"],
                             tokens_per_s=self.tracker.throughput(entry["rows"] * self.params["seq_len"]),
                             shard_bytes=entry["bytes"], **peak_memory(self.device))


@preempt.takes_signals
def run_teacher(config: TeacherConfig) -> TeacherRun:
    check_installed(config.report_to)  # a missing tensorboard or wandb: one line, before the teacher loads
    with preempt.Preemption() as preemption:  # SIGUSR1 / SIGTERM: stop after (or instead of) the current shard
        job = setup(config)
        if job is None:
            return TeacherRun(Path(config.out), 0, 0.0)
        stopped = None
        try:
            job.tracker = stage_one_tracker(config, job.out, job.params, len(job.done))
            total_tokens, loop_seconds, stopped = write_shards(job, preemption)
        finally:
            job.lock.release()
            if job.tracker is not None:
                job.tracker.close(preempted=stopped is not None)
    # ------------------------------------------------------------------ finish
    out = job.out
    if stopped is not None:
        signal_name, abandoned = stopped
        owned = len(job.done) + sum(store_lib.shard_name(j, config.backend) not in job.done for j in job.todo)
        upto = f" (up to {max(job.done)})" if job.done else ""
        preempt.leave(f"distill: preempted by {signal_name}; job {config.shard_index}/{config.num_shards} has "
                      f"{len(job.done)} of its {owned} shards written and recorded{upto}"
                      f"{f', {abandoned} abandoned' if abandoned else ''}; rerun the same command to continue")
    rate = f", {total_tokens / loop_seconds:.0f} tokens/s" if job.todo else ""
    print(f"{out}: job {config.shard_index}/{config.num_shards} holds {len(job.done)} shards "
          f"({len(job.todo)} written now{rate})")
    try:
        store_lib.merge_partial_indexes(out, config.kind)
    except DistillError as e:
        if config.num_shards == 1:
            raise
        print(f"{out}: not merged yet ({e})")
    return TeacherRun(out, total_tokens, loop_seconds)


def setup(config: TeacherConfig) -> TeacherJob | None:
    """Check the inputs, settle what lies in OUT already, load the teacher; None when nothing is left to do."""
    threads = set_threads(config.threads)  # before anything runs torch: see pipeline/threads.py
    tokens = store_lib.open_store(config.tokens_store, kind="tokens")
    tokenizer = load_tokenizer(config.tokenizer or tokens.params["tokenizer"], config.trust_remote_code)
    tok_hash, vocab = tokenizer_hash(tokenizer), vocab_size(tokenizer)
    check_store_fits(tokens, "tokens store", tokenizer_hash=tok_hash)
    if config.kind == "topk" and config.top_k > vocab:
        raise DistillError(f"--top-k {config.top_k} is larger than the vocabulary ({vocab} ids); lower it")
    teacher_dir = Path(config.teacher)
    if not has_weights(teacher_dir):
        raise DistillError(f"teacher {teacher_dir} is not a local Hugging Face model directory with weights; pass "
                           "--teacher a directory written by save_pretrained (config.json and model.safetensors)")
    teacher_config = hf_config(teacher_dir, config.trust_remote_code)
    check_output_rows("teacher", teacher_dir, teacher_config.vocab_size, vocab, "they do not belong together",
                      max_padding=max(1024, vocab // 10))
    check_store_fits(tokens, "tokens store", positions=max_positions(teacher_config), model="teacher")
    device_map = read_device_map(config.device_map) if config.device_map else None
    if device_map is not None:
        check_devices(device_map)
    if isinstance(device_map, dict):
        check_device_map(device_map, teacher_config, "--device-map", config.trust_remote_code)
    # --dtype auto resolves where the teacher computes, before the params that record it are compared
    requested = config.dtype
    computes_on = compute_device(config, device_map)
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, computes_on))
    tf32 = set_tf32(computes_on, config.tf32)

    n_rows = min(tokens.rows, config.max_rows) if config.max_rows else tokens.rows
    n_total = math.ceil(n_rows / config.rows_per_shard)
    if config.shard_index >= n_total:  # before the weights are hashed or loaded: an idle job costs seconds
        print(f"{config.out}: job {config.shard_index} of {config.num_shards} owns no shard: the store has {n_total} "
              f"shards ({n_rows} rows, {config.rows_per_shard} a shard), so {config.num_shards - n_total} of the "
              f"{config.num_shards} jobs have nothing to do; nothing to do here (set --num-shards to at most "
              f"{n_total}; distill slurm: jobs.teacher.array × nodes × procs_per_node)")
        return None
    params = store_params(config, tokens, teacher_config.vocab_size, tok_hash, vocab, n_rows, computes_on)
    out = Path(config.out)
    decision = store_lib.existing_store(out, config.kind, config.backend, params, config.overwrite)
    if decision == "done":
        print(f"{out}: complete store with the same parameters already exists; nothing to do")
        return None
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = store_lib.JobLock(out, config.shard_index, config.num_shards)  # one process per job at a time
    try:
        if device_map is None:
            device = resolve_device(config.device)
            kernel = resolve_kernel(config.kernel, device)  # a one-line error before the model loads
            model = load_model(teacher_dir, config.dtype, config.trust_remote_code,
                               attn_implementation=config.attn_implementation).to(device).eval()
        else:  # accelerate places the layers; the head's reductions run where the logits land
            model = load_model(teacher_dir, config.dtype, config.trust_remote_code, device_map=device_map,
                               attn_implementation=config.attn_implementation,
                               max_memory=parse_max_memory(config.max_memory) or None).eval()
            head = model.get_output_embeddings()
            device = execution_device(head if head is not None else model)
            kernel = resolve_kernel(config.kernel, device)
    except BaseException:  # unreadable weights, no compiler, ...: leave OUT as it was
        lock.release()
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    rule = RowRule.of(tokens.params)
    try:
        if rule.attention == "document":  # before anything in OUT is replaced
            check_document_attention(model, rule.eos_token_id, f"teacher {teacher_dir}")
    except BaseException:
        lock.release()
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if decision == "replace":  # only now that the teacher has loaded; only what a store holds (checked again)
        try:
            clear(out, STORE, keep=(lock.path,))
        except BaseException:
            lock.release()
            raise

    part_path = store_lib.partial_index_path(out, config.shard_index, config.num_shards)
    done = {e["name"]: e for e in store_lib.read_partial_index(part_path).get("shards", [])
            if (out / e["name"]).exists()}
    owned = [store_lib.shard_name(j, config.backend) for j in range(config.shard_index, n_total, config.num_shards)]
    todo = [j for j in range(config.shard_index, n_total, config.num_shards)
            if store_lib.shard_name(j, config.backend) not in done]
    lock.remove_stale_temps([*owned, part_path.name, f"config.part-{config.shard_index:05d}.json"])
    arrays = stored_arrays(config, params["seq_len"], tokens.index["arrays"], vocab)
    facts = {"params": params, "shards_planned": n_total, "dtype_requested": requested, "tf32": tf32, **threads}
    if device_map is not None:  # where each module went: a fact of this run, not a param (the store is the same)
        facts["placement"] = where = placement(model)
        counts = {d: list(where.values()).count(d) for d in dict.fromkeys(where.values())}
        print("teacher placed by --device-map: " + ", ".join(f"{n} module(s) on {d}" for d, n in counts.items())
              + f"; logits reduced on {device}")
    save_resolved(config, out / f"config.part-{config.shard_index:05d}.json", facts)
    probe = torch.from_numpy(tokens.read_rows(0, 1)["input_ids"].astype(np.int64)).to(device)
    return TeacherJob(config, out, tokens, params, arrays, vocab, n_rows, todo, done, OutputHead(model, probe),
                      device, kernel, lock, rule)


def stored_arrays(config: TeacherConfig, seq_len: int, tokens_arrays: dict[str, dict], vocab: int) -> dict[str, dict]:
    """Each stored array's dtype and per-row shape (index.json's ``arrays``; docs/FORMAT.md), starting
    with the tokens store's arrays, which are copied."""
    n_grid, id_dtype = len(config.grid), store_lib.token_dtype(vocab).name
    arrays = {name: tokens_arrays[name] for name in COPIED if name in tokens_arrays}
    if config.kind == "topk":
        k = config.top_k
        arrays["topk_ids"] = {"dtype": id_dtype, "shape": [seq_len, k]}
        arrays["topk_logprobs"] = {"dtype": config.logprob_dtype, "shape": [seq_len, k]}
    draws = config.samples if config.kind == "sampled" else config.tail_samples
    if draws:
        prefix = "sample" if config.kind == "sampled" else "tail_sample"
        arrays[f"{prefix}_ids"] = {"dtype": id_dtype, "shape": [seq_len, draws]}
        arrays[f"{prefix}_counts"] = {"dtype": "uint8" if draws < 256 else "uint16", "shape": [seq_len, draws]}
        if config.sample_logprobs:
            arrays[f"{prefix}_logprobs"] = {"dtype": config.logprob_dtype, "shape": [seq_len, draws]}
    if config.kind != "target":  # a target store: the log-prob at T alone, nothing to re-temper
        arrays["logsumexp"] = {"dtype": "float32", "shape": [seq_len, n_grid]}
    if config.kind == "topk":
        arrays["tail_logmass"] = {"dtype": "float32", "shape": [seq_len, n_grid]}
    arrays["target_logprob"] = {"dtype": "float32", "shape": [seq_len]}
    return arrays


def compute_device(config: TeacherConfig, device_map: str | dict | None) -> torch.device:
    """Where the teacher computes, known before it loads (what ``--dtype auto`` resolves against):
    ``--device``; with ``--device-map``, the first GPU it uses (a preset: GPU 0), or the CPU for a map
    of CPU and disk alone."""
    if device_map is None:
        return resolve_device(config.device)
    if isinstance(device_map, str):
        return torch.device("cuda", 0)
    gpus = sorted(d for d in device_map.values() if isinstance(d, int))
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def store_params(config: TeacherConfig, tokens: store_lib.Store, teacher_rows: int, tok_hash: str, vocab: int,
                 n_rows: int, device: torch.device | str = "cpu") -> dict:
    """What decides a store's content: a rerun with other params is refused, the same ones resume.
    ``config.dtype`` is the resolved one (never 'auto'); ``matmul_precision`` appears only where TF32
    reaches the teacher's float32 matrix multiplies on ``device`` (so stores of bfloat16 or CPU runs keep
    their params). (The keys of draws appear only in stores that draw, so older top-k stores keep their params.)"""
    draws = {}
    if config.kind == "sampled":
        draws = {"samples": config.samples}
    elif config.tail_samples:
        draws = {"tail_samples": config.tail_samples}
    if draws:
        draws |= {"seed": config.seed, "sample_logprobs": config.sample_logprobs}
    return draws | {
        "teacher": str(Path(config.teacher)),
        "teacher_weights_sha256": weights_sha256(Path(config.teacher)),
        "teacher_vocab_size": teacher_rows,
        "tokenizer": tokens.params["tokenizer"],
        "tokenizer_hash": tok_hash,
        "vocab_size": vocab,
        "seq_len": tokens.params["seq_len"],
        **({"top_k": config.top_k} if config.kind == "topk" else {}),
        "temperature": config.temperature,
        "temperature_grid": list(config.grid),
        "dtype": config.dtype,
        **({"matmul_precision": "tf32"} if matmul_precision(device, config.dtype, config.tf32) == "tf32" else {}),
        "logprob_dtype": config.logprob_dtype,
        "tokens_store_sha256": hashlib.sha256("".join(s["sha256"] for s in tokens.shards).encode()).hexdigest(),
        "corpus_fingerprint": tokens.params["corpus_fingerprint"],
        **({"format": tokens.params["format"]} if "format" in tokens.params else {}),
        # the samplers of --format ids records: --objective policy-gradient reads them from this store
        **({"samplers": tokens.params["samplers"]} if "samplers" in tokens.params else {}),
        # how the rows start and attend (none in a default store): stage two and eval read them as stage one did
        **RowRule.of(tokens.params).params(),
        "rows": n_rows,
        "rows_per_shard": config.rows_per_shard,
        "chunk_rows": config.chunk_rows,
    }


def write_shards(job: TeacherJob, preemption: preempt.Preemption | None = None
                 ) -> tuple[int, float, tuple[str, str | None] | None]:
    """The loop: compute each shard this job owns and hand it to a writer thread, which compresses
    and renames shard j while the teacher computes shard j+1. The queue holds at most one finished
    shard, so memory stays at two shards of outputs (three on CUDA with ``--overlap``, where shard j
    is held until shard j+1's first batch is queued, and only then is its last batch waited for and
    the shard handed over). Returns (tokens computed, seconds, stopped): stopped is None, or
    (signal, the shard abandoned or None) when a pre-emption signal ended the loop before every
    shard was written; the shards handed over by then are written and recorded."""
    config, out = job.config, job.out
    seq_len = job.params["seq_len"]
    jobs: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def writer() -> None:
        while (item := jobs.get()) is not None:
            if failure:  # after a failed write (a full disk) write nothing more: the main thread stops
                continue
            name, arrays = item
            try:
                job.record(store_lib.write_shard(out, name, arrays, config.backend, config.chunk_rows))
            except BaseException as e:  # surfaced by the main thread
                failure.append(e)

    held: list[tuple[str, dict[str, np.ndarray], Callable[[], None]]] = []  # a shard whose last batch is on the device

    def hand_over() -> None:
        """Wait for the held shard's last batch, then give the shard to the writer."""
        while held:
            name, arrays, finish = held.pop()
            finish()
            jobs.put((name, arrays))

    signalled = (preemption or preempt.Preemption()).agreed  # one never entered is never signalled
    abandon = signalled if config.on_preempt == "abandon" else None
    stopped = None
    thread = threading.Thread(target=writer, name="shard-writer", daemon=True)
    thread.start()
    loop_started = time.perf_counter()
    total_tokens = sum(min(config.rows_per_shard, job.n_rows - j * config.rows_per_shard) for j in job.todo) * seq_len
    try:
        with tqdm(total=total_tokens, desc=f"teacher {config.shard_index}/{config.num_shards}", unit="tok",
                  unit_scale=True, dynamic_ncols=True) as progress:
            for j in job.todo:
                if (signal_name := signalled()) is not None:  # before a shard: the last one is whole
                    stopped = (signal_name, None)
                    break
                lo, hi = j * config.rows_per_shard, min((j + 1) * config.rows_per_shard, job.n_rows)
                rows = job.tokens.read_rows(lo, hi)
                computed = teacher_shard(job.head, rows["input_ids"], lo, config, job.arrays, job.vocab, job.device,
                                         job.kernel, progress, abandon, after_first_batch=hand_over, rule=job.rule)
                if failure:
                    raise failure[0]
                if computed is None:
                    stopped = (signalled(), store_lib.shard_name(j, config.backend))
                    break
                arrays, finish = computed
                arrays |= {name: rows[name] for name in COPIED if name in job.arrays}
                if finish is None:
                    jobs.put((store_lib.shard_name(j, config.backend), arrays))
                else:
                    held.append((store_lib.shard_name(j, config.backend), arrays, finish))
            hand_over()
    except BaseException:
        try:  # the shard before the one that failed is whole: still write it
            hand_over()
        except BaseException:
            pass
        raise
    finally:
        jobs.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return total_tokens, time.perf_counter() - loop_started, stopped  # forward, reductions and the last write


@torch.no_grad()
def teacher_shard(head: OutputHead, input_ids: np.ndarray, first_row: int, config: TeacherConfig,
                  arrays: dict[str, dict], vocab: int, device: torch.device, kernel: str,
                  progress, abandon: Callable[[], Any] | None = None,
                  after_first_batch: Callable[[], None] | None = None, rule: RowRule = RowRule()
                  ) -> tuple[dict[str, np.ndarray], Callable[[], None] | None] | None:
    """All stored arrays (``arrays``: dtype and per-row shape of each) for one shard of rows
    ``input_ids [R, L]``, the first of which is row ``first_row`` of the store (it keys the draws),
    and None or a function to call before they are complete; None if ``abandon()``, asked before
    each batch, said to drop the shard. ``after_first_batch()`` is called once the first batch is
    queued (the previous shard's hand-over, :func:`write_shards`). ``rule``: the tokens store's
    :class:`RowRule`; with ``attention == "document"`` each token sees only its own document.

    On CUDA with ``--overlap`` (the default) a batch's outputs go to pinned host memory on a copy
    stream, and the host waits for them (and converts them to the store's dtypes) only after the
    next batch's forward is queued, so the copy and the host's work overlap the GPU's; the last
    batch's wait is the returned function, which the caller runs once the next shard is queued.
    With the fused kernels (``kernel == "triton"``) nothing waits per chunk either: each chunk's
    status (bad or undecided rows) travels with its outputs and is read then; a chunk with such rows
    is recomputed from the kept hidden states by the checked path, which raises or redoes them."""
    rows, seq_len = input_ids.shape
    out = {name: np.empty((rows, *spec["shape"]), dtype=np.dtype(spec["dtype"]))
           for name, spec in arrays.items() if name not in COPIED}
    out["input_ids"] = input_ids
    copy_stream = _copy_stream(config, device)
    draws = config.samples if config.kind == "sampled" else config.tail_samples
    # the fused kernels without a wait per chunk, where both their reductions and their draws run here
    deferred = kernel == "triton" and not (draws and fused_gpu_problem(device))
    buffer, pending = None, None
    for start in range(0, rows, config.batch_size):
        if abandon is not None and abandon():
            return None
        batch = torch.from_numpy(input_ids[start:start + config.batch_size].astype(np.int64))
        # from pinned memory without waiting on CUDA: a plain copy would wait for the batch still computing
        batch = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch.to(device)
        b = batch.shape[0]
        hidden = head.hidden(batch, **rule.hidden_kwargs(batch)).reshape(b * seq_len, -1)
        if buffer is None:
            buffer = head.logits_buffer(min(config.position_chunk, b * seq_len), hidden)
        # Position t's target is token t+1; the last position has none in its row (it is the next
        # row's first token), so its target log-prob is stored as NaN.
        targets = torch.cat([batch[:, 1:], batch[:, :1]], dim=1).reshape(-1)
        keys = position_keys(config.seed, torch.arange(first_row + start, first_row + start + b, device=device),
                             seq_len).reshape(-1)
        results: dict[str, list[torch.Tensor]] = {name: [] for name in out if name != "input_ids"}
        statuses = []
        for p0 in range(0, b * seq_len, config.position_chunk):
            chunk = slice(p0, p0 + config.position_chunk)
            summary, status = _reduce_chunk(head, hidden[chunk], buffer, targets[chunk], keys[chunk], config, vocab,
                                            kernel, deferred)
            statuses.append(status)
            for name in results:
                results[name].append(summary[name])
        done = _Batch(slice(start, start + b), {name: torch.cat(parts) for name, parts in results.items()},
                      torch.cat(statuses) if deferred else None, hidden, buffer, targets, keys)
        if copy_stream is None:
            _finish_batch(done, out, arrays, config, vocab, kernel, head)
        else:  # finish the previous batch while this one computes
            done.to_host(copy_stream)
            if pending is not None:
                _finish_batch(pending, out, arrays, config, vocab, kernel, head)
            pending = done
        if start == 0 and after_first_batch is not None:
            after_first_batch()
        progress.update(b * seq_len)
    if pending is None:
        return out, None
    return out, functools.partial(_finish_batch, pending, out, arrays, config, vocab, kernel, head)


def _copy_stream(config: TeacherConfig, device: torch.device) -> Any:
    """The stream a batch's outputs are copied to the host on, or None: copy at once (the CPU, --no-overlap)."""
    return torch.cuda.Stream(device) if config.overlap and device.type == "cuda" else None


def _reduce_chunk(head: OutputHead, hidden: torch.Tensor, buffer: torch.Tensor | None, targets: torch.Tensor,
                  keys: torch.Tensor, config: TeacherConfig, vocab: int, kernel: str, deferred: bool
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One chunk of positions: its logits and what the store keeps of them, on the device. ``deferred``
    (the fused GPU kernels): also the chunk's status ``[P]`` int32, read later (nonzero: recompute the
    chunk with ``deferred=False``); otherwise the status is None, already checked."""
    logits = head.logits(hidden, buffer)
    if logits.shape[-1] > vocab:  # padded output rows: drop them, but never silently
        if (logits.argmax(dim=-1) >= vocab).any():
            raise DistillError(f"the teacher's argmax fell on a padded output row (id >= {vocab}); "
                               "its output rows do not match the tokenizer")
        logits = logits[:, :vocab]
    draws = config.samples if config.kind == "sampled" else config.tail_samples
    prefix = "sample" if config.kind == "sampled" else "tail_sample"
    # top-k of 1 for a sampled or target store: only its log-sum-exp and target log-prob are kept
    k = config.top_k if config.kind == "topk" else 1
    status = None
    if deferred:
        summary, status = sparse_teacher_deferred(logits, k, config.temperature, config.grid, targets)
    else:
        summary = sparse_teacher(logits, k, config.temperature, config.grid, targets, kernel)
    if draws:
        exclude = summary["topk_ids"] if config.kind == "topk" else None
        if deferred:
            drawn, draw_status = sample_teacher_deferred(logits, draws, config.temperature, keys, exclude)
            status |= draw_status
        else:
            drawn = sample_teacher(logits, draws, config.temperature, keys, exclude, kernel)
        summary[f"{prefix}_ids"], summary[f"{prefix}_counts"] = drawn["sample_ids"], drawn["sample_counts"]
        if config.sample_logprobs:
            summary[f"{prefix}_logprobs"] = sampled_logprobs(logits, drawn["sample_ids"], drawn["sample_counts"],
                                                               config.temperature)
    return summary, status


@dataclass
class _Batch:
    """One batch's outputs on the device (``values``, by array name, positions flattened), on their way
    to the shard's rows ``rows``; what a chunk needs to be recomputed is kept until then."""

    rows: slice
    values: dict[str, torch.Tensor]
    status: torch.Tensor | None  # [positions] int32 (deferred kernels), nonzero where a chunk must be redone
    hidden: torch.Tensor
    buffer: torch.Tensor | None
    targets: torch.Tensor
    keys: torch.Tensor
    ready: Any = None  # the copy stream's event, once :meth:`to_host` has queued the copies

    def to_host(self, stream: torch.cuda.Stream) -> None:
        """Queue the copies to pinned host memory on ``stream``, after what the compute stream has queued."""
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            for name, value in [*self.values.items(), *([("status", self.status)] if self.status is not None else [])]:
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                host.copy_(value, non_blocking=True)
                value.record_stream(stream)  # the allocator must not reuse it before the copy
                if name == "status":
                    self.status = host
                else:
                    self.values[name] = host
            self.ready = torch.cuda.Event()
            self.ready.record(stream)


def _finish_batch(done: _Batch, out: dict[str, np.ndarray], arrays: dict[str, dict], config: TeacherConfig,
                  vocab: int, kernel: str, head: OutputHead) -> None:
    """Wait for a batch's outputs, redo its flagged chunks, and write it into the shard's arrays."""
    if done.ready is not None:
        done.ready.synchronize()
    values = {name: value.cpu() for name, value in done.values.items()}
    if done.status is not None and bool(done.status.cpu().any()):
        flagged = done.status.cpu().nonzero().squeeze(-1)
        for p0 in sorted({int(p) // config.position_chunk * config.position_chunk for p in flagged}):
            chunk = slice(p0, p0 + config.position_chunk)
            summary, _ = _reduce_chunk(head, done.hidden[chunk], done.buffer, done.targets[chunk], done.keys[chunk],
                                       config, vocab, kernel, deferred=False)
            for name in values:
                values[name][chunk] = summary[name].cpu()
    b = done.rows.stop - done.rows.start
    for name, value in values.items():
        value = value.numpy().reshape(b, *arrays[name]["shape"])
        if name == "target_logprob":
            value[:, -1] = np.nan
        out[name][done.rows] = value.astype(out[name].dtype)

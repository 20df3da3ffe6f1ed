"""``distill plan``: size a cluster run before submitting it.

From the corpus size (``--tokens`` or a ``tokens`` store), the store's format (the same options as
``distill teacher``), the teacher's size and a stated throughput, print what the run will take:

- **the store's size on disk**: per stored array its raw bytes per position (the arithmetic of
  :func:`stages.teacher.stored_arrays`) times its compressed bytes per element, *measured* — by
  default on the shipped teacher's stores (``bench/results/store_bytes_cpu.json``, written by
  ``bench/store_bytes.py``), or on a small pilot store of your own teacher (``--pilot``) — plus
  the fixed bytes of each shard and chunk, measured here by writing a shard of that layout;
- **stage one**: GPUs per task (the teacher's weights against ``--gpu-memory``; above one, run it
  with ``--device-map auto``), GPU-hours and wall time on ``--gpus``, and the array size (number
  of stage-one tasks): the fewest tasks that each fit ``--time-limit`` with ``--margin`` to spare,
  rounded up to whole waves of the tasks that run at once; with advice on ``--rows-per-shard``;
- **stage two**: GPU-hours and wall time of training a student on the store for ``--epochs``, and
  the peak memory of each training process (weights, gradients, AdamW states, activations with or
  without ``--gradient-checkpointing``, the loss chunk of the output head: :func:`student_memory`,
  docs/DESIGN.md "Memory of a student process"), with the micro-batch and accumulation that fit
  ``--gpu-memory`` and keep the global batch.

Throughputs are stated (``--teacher-tokens-per-gpu-s``, ``--student-tokens-per-gpu-s``), or
estimated from FLOPs (2·params per token for a forward, 6·params to train) at ``--gpu-tflops`` ×
``--mfu``, with every assumption printed next to the number it makes.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import check, option, to_dict
from pipeline.errors import DistillError
from pipeline.models import DTYPES, count_parameters, dtype_problems, hf_config, skeleton
from pipeline.store import contract as store_lib
from stages.teacher import TeacherConfig, format_problems, resolve_grid, stored_arrays

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "bench" / "results" / "store_bytes_cpu.json"
REALISTIC_STAGE_ONE = ROOT / "bench" / "results" / "stage_one_h200_realistic.json"
REALISTIC_STAGE_TWO = ROOT / "bench" / "results" / "stage_two_h200_realistic.json"
HEADROOM = 0.2  # GPU memory beyond the weights: activations of a batch and the logits buffer
# --dtype auto on the GPUs a plan sizes: bfloat16 (compute capability 8.0 and up: A100, H100, H200, …)
PLANNED_AUTO = "bfloat16"
FORMAT_FIELDS = ("kind", "top_k", "samples", "tail_samples", "sample_logprobs", "logprob_dtype", "temperature",
                 "temperature_grid")


def like_teacher(name: str) -> Any:
    """A field of ``distill teacher`` (default and help), so that a plan takes the same options."""
    field = TeacherConfig.__dataclass_fields__[name]
    return option(field.default, field.metadata["help"])


@dataclass(frozen=True)
class PlanConfig:
    # ---- how much
    tokens: str = option("", "Tokens of the corpus as distill prepare counts them, e.g. 2e9, 2B, 500M.")
    tokens_store: str = option("", "A 'tokens' store: its rows, sequence length and vocabulary (instead of --tokens).")
    seq_len: int = option(0, "Tokens per row (with --tokens).")
    vocab_size: int = option(0, "Tokenizer vocabulary (default: the tokens store's, the pilot's or the teacher's).")
    # ---- the store's format: distill teacher's options, with its defaults
    kind: str = like_teacher("kind")
    top_k: int = like_teacher("top_k")
    samples: int = like_teacher("samples")
    tail_samples: int = like_teacher("tail_samples")
    sample_logprobs: bool = like_teacher("sample_logprobs")
    logprob_dtype: str = like_teacher("logprob_dtype")
    temperature: float = like_teacher("temperature")
    temperature_grid: tuple[float, ...] = like_teacher("temperature_grid")
    backend: str = like_teacher("backend")
    rows_per_shard: int = like_teacher("rows_per_shard")
    chunk_rows: int = like_teacher("chunk_rows")
    pilot: str = option("", "A small store your teacher wrote with these options over a sample of your corpus: its "
                        "measured bytes replace the shipped teacher's (compression follows the teacher's entropy).")
    # ---- the teacher and stage one
    teacher: str = option("", "Teacher directory or config: its parameters are counted from the config, no weights load.")
    teacher_params: str = option("", "Teacher parameters, e.g. 8B or 8.03e9 (instead of --teacher).")
    dtype: str = like_teacher("dtype")
    gpus: int = option(1, "GPUs available to the run at once.")
    gpu_memory: float = option(80.0, "GiB of memory per GPU.")
    teacher_tokens_per_gpu_s: float = option(0.0, "Measured stage-one throughput, tokens/s per GPU.")
    gpu_tflops: float = option(0.0, "Peak dense TFLOP/s of one GPU at the compute dtype, for a throughput estimate "
                               "from FLOPs where none is stated (e.g. 989 for an H100 in bfloat16).")
    mfu: float = option(0.4, "Assumed model FLOPs utilisation of that estimate.")
    time_limit: str = option("", "Wall-clock limit of one job, HH:MM:SS or D-HH:MM:SS (as sbatch --time).")
    margin: float = option(0.2, "Share of the time limit left unused by each task's estimate.")
    startup_minutes: float = option(5.0, "Minutes a task spends before its first token (loading the teacher).")
    shard_minutes: float = option(5.0, "Longest compute per shard the rows_per_shard advice aims at (work a "
                                  "pre-empted task loses).")
    # ---- stage two
    student: str = option("", "Student config or directory: its parameters are counted.")
    student_params: str = option("", "Student parameters, e.g. 1B (instead of --student).")
    student_tokens_per_gpu_s: float = option(0.0, "Measured stage-two throughput, tokens/s per GPU.")
    student_gpus: int = option(0, "GPUs of the stage-two job (default: --gpus).")
    epochs: float = option(1.0, "Passes of stage two over the store.")
    student_dtype: str = option("auto", "Stage two's autocast dtype (distill student --dtype) for its memory: auto "
                                f"({PLANNED_AUTO} on the GPUs a plan sizes), float32 or bfloat16.")
    micro_batch_size: int = option(16, "Rows per forward/backward pass of each stage-two process (distill student "
                                   "--micro-batch-size): the peak memory shown is this one's.")
    grad_accum: int = option(1, "Micro-batches per optimizer step (distill student --grad-accum): with "
                             "--micro-batch-size, the GPUs and the row length, the global batch a suggestion keeps.")
    global_batch_tokens: str = option("", "Tokens per optimizer step over all stage-two GPUs that the suggested "
                                      "micro-batch and accumulation keep, e.g. 1M (default: --micro-batch-size × "
                                      "--grad-accum × GPUs × tokens per row).")
    gradient_checkpointing: bool = option(False, "Stage two recomputes each decoder layer's activations in backward "
                                          "(distill student --gradient-checkpointing): the memory shown is then that "
                                          "of a checkpointed run.")
    loss_chunk: int = option(0, "Positions per output-head/loss chunk of stage two (distill student --loss-chunk; "
                             "0 = as it picks: chunk × vocabulary ≤ 64M).")
    json: bool = option(False, "Print the plan as JSON.")

    def __post_init__(self):
        problems = format_problems(self, kinds=("topk", "sampled"))  # a target store is not calibrated yet
        if bool(self.tokens) == bool(self.tokens_store):
            problems.append("give the corpus size: --tokens N or --tokens-store DIR (one of them)")
        for name in ("tokens", "teacher_params", "student_params", "global_batch_tokens"):
            if getattr(self, name):
                try:
                    parse_count(getattr(self, name))
                except DistillError as e:
                    problems.append(str(e))
        if self.tokens and self.seq_len < 2:
            problems.append("--tokens needs --seq-len (tokens per row, at least 2)")
        if self.teacher and self.teacher_params:
            problems.append("give the teacher's size once: --teacher DIR or --teacher-params N")
        if self.student and self.student_params:
            problems.append("give the student's size once: --student DIR or --student-params N")
        problems += dtype_problems(self.dtype) + [p.replace("dtype", "student_dtype", 1) for p in
                                                  dtype_problems(self.student_dtype, ("float32", "bfloat16"))]
        for name in ("micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.loss_chunk < 0:
            problems.append("loss_chunk must not be negative")
        if self.vocab_size < 0:
            problems.append("vocab_size must not be negative")
        if self.gpus < 1 or self.student_gpus < 0:
            problems.append("gpus must be at least 1 (student_gpus 0 means --gpus)")
        for name in ("gpu_memory", "teacher_tokens_per_gpu_s", "gpu_tflops", "student_tokens_per_gpu_s",
                     "startup_minutes", "shard_minutes", "epochs"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.gpu_memory > 0 or not self.shard_minutes > 0 or not self.epochs > 0:
            problems.append("gpu_memory, shard_minutes and epochs must be above 0")
        if not 0 < self.mfu <= 1:
            problems.append(f"mfu must be in (0, 1], got {self.mfu}")
        if not 0 <= self.margin < 1:
            problems.append(f"margin must be in [0, 1), got {self.margin}")
        if self.time_limit:
            try:
                parse_time_limit(self.time_limit)
            except DistillError as e:
                problems.append(str(e))
        check(problems, "plan")

    @property
    def grid(self) -> tuple[float, ...]:
        return resolve_grid(self.kind, self.temperature, self.temperature_grid)

    @property
    def teacher_dtype(self) -> str:
        """Stage one's dtype on the GPUs planned for: ``--dtype``, 'auto' as it resolves there."""
        return PLANNED_AUTO if self.dtype == "auto" else self.dtype

    @property
    def training_dtype(self) -> str:
        """Stage two's autocast dtype on the GPUs planned for."""
        return PLANNED_AUTO if self.student_dtype == "auto" else self.student_dtype


# --------------------------------------------------------------------------- parsing

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str | int | float) -> int:
    """``2e9``, ``2B``, ``500M``, ``1.5T``, ``8k``, ``10_000`` → an integer count."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if match is None or float(match.group(1).replace("_", "")) <= 0:
        raise DistillError(f"{text!r} is not a count: write e.g. 2e9, 2B, 500M or 1.5T")
    return round(float(match.group(1).replace("_", "")) * _SUFFIX[match.group(2).upper()])


def parse_time_limit(text: str) -> int:
    """SLURM's ``HH:MM:SS`` or ``D-HH:MM:SS`` → seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)", text.strip())
    if match is None or not (seconds := ((int(match.group(1) or 0) * 24 + int(match.group(2))) * 60
                                         + int(match.group(3))) * 60 + int(match.group(4))):
        raise DistillError(f"time_limit must be HH:MM:SS or D-HH:MM:SS (as sbatch --time), above zero, got {text!r}")
    return seconds


def count_model_parameters(spec: str) -> int:
    """Parameters of a model config or directory, counted on the meta device (no weights load)."""
    return count_parameters(skeleton(hf_config(spec)))


# --------------------------------------------------------------------------- bytes


def elements(arrays: dict[str, dict]) -> dict[str, int]:
    """Elements per position of each array (``arrays`` as :func:`stored_arrays` and ``index.json``
    give them: per-row shapes ``[seq_len, …]``)."""
    return {name: math.prod(spec["shape"][1:]) for name, spec in arrays.items()}


def compressed_bytes(store: store_lib.Store, max_rows: int = 1024) -> dict[str, Any]:
    """What a store's data takes compressed, per array and element: every chunk of its first shards
    (up to ``max_rows`` rows) compressed as the writers do (zstd level 3, one frame per chunk and
    array), without the shards' fixed bytes. Also the mean number of distinct drawn ids."""
    import pyarrow as pa

    codec = pa.Codec("zstd", compression_level=store_lib.ZSTD_LEVEL)
    per_elem = elements(store.index["arrays"])
    total = dict.fromkeys(per_elem, 0)
    positions, distinct, rows = 0, {}, 0
    for i, entry in enumerate(store.shards):
        if rows >= max_rows:
            break
        arrays, chunk = store.read_shard(i), entry["chunk_rows"]
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            total[name] += sum(len(codec.compress(array[lo:lo + chunk], asbytes=True))
                               for lo in range(0, len(array), chunk))
            if name.endswith("_counts"):
                distinct.setdefault(name.replace("_counts", "_ids"), []).append((array > 0).sum(-1).reshape(-1))
        positions += math.prod(arrays["input_ids"].shape)
        rows += entry["rows"]
    return {"positions": positions,
            "bytes_per_element": {name: total[name] / (positions * per_elem[name]) for name in total},
            "distinct_ids": {name: float(np.concatenate(d).mean()) for name, d in distinct.items()}}


def layout_overhead(arrays: dict[str, dict], backend: str, chunk_rows: int) -> tuple[float, float]:
    """Fixed bytes of one shard and of each chunk in it (metadata, the zarr shard index, Arrow's
    record-batch headers), for this layout with the installed zarr / pyarrow: measured by writing
    shards of one and of two chunks of ones, less what the ones themselves compress to."""
    import pyarrow as pa

    codec = pa.Codec("zstd", compression_level=store_lib.ZSTD_LEVEL)
    with tempfile.TemporaryDirectory(prefix="distill-plan-") as tmp:
        sizes = []
        for chunks in (1, 2):
            data = {name: np.ones((chunks * chunk_rows, *spec["shape"]), dtype=spec["dtype"])
                    for name, spec in arrays.items()}
            sizes.append(store_lib.write_shard(Path(tmp), f"s{chunks}-{store_lib.shard_name(0, backend)}", data,
                                               backend, chunk_rows)["bytes"])
        ones = sum(len(codec.compress(np.ones((chunk_rows, *spec["shape"]), dtype=spec["dtype"]), asbytes=True))
                   for spec in arrays.values())
    per_chunk = sizes[1] - sizes[0] - ones
    return sizes[0] - ones - per_chunk, per_chunk


def shard_rows(rows: int, rows_per_shard: int) -> list[int]:
    full, last = divmod(rows, rows_per_shard)
    return [rows_per_shard] * full + ([last] if last else [])


def store_bytes(rows: int, seq_len: int, bytes_per_position: float, rows_per_shard: int, chunk_rows: int,
                overhead: tuple[float, float]) -> float:
    """Bytes on disk of a store of ``rows`` rows: the data, plus each shard's and chunk's fixed bytes."""
    per_shard, per_chunk = overhead
    return sum(r * seq_len * bytes_per_position + per_shard + per_chunk * math.ceil(r / chunk_rows)
               for r in shard_rows(rows, rows_per_shard))


# --------------------------------------------------------------------------- calibration


def _same_format(plan: PlanConfig, params: dict) -> list[str]:
    """Where a pilot store's format differs from the plan's: ``name: pilot vs plan``."""
    pilot = {"kind": "sampled" if "samples" in params else "topk", "top_k": params.get("top_k"),
             "samples": params.get("samples"), "tail_samples": params.get("tail_samples", 0),
             "sample_logprobs": params.get("sample_logprobs", False), "logprob_dtype": params["logprob_dtype"],
             "temperature": params["temperature"], "temperature_grid": list(params["temperature_grid"])}
    mine = {"kind": plan.kind, "top_k": plan.top_k if plan.kind == "topk" else None,
            "samples": plan.samples if plan.kind == "sampled" else None, "tail_samples": plan.tail_samples,
            "sample_logprobs": plan.sample_logprobs, "logprob_dtype": plan.logprob_dtype,
            "temperature": plan.temperature, "temperature_grid": list(plan.grid)}
    return [f"{k}: {pilot[k]} vs {mine[k]}" for k in pilot if pilot[k] != mine[k]]


def _size_parameter(entry: dict) -> tuple[float, ...]:
    if entry["kind"] == "sampled":
        return (entry["samples"],)
    return (entry["top_k"], entry["tail_samples"]) if entry.get("tail_samples") else (entry["top_k"],)


def calibrated_bytes(plan: PlanConfig, calibration: dict) -> tuple[dict[str, float], str]:
    """Compressed bytes per element of each array for the plan's format, from the measured stores
    in ``calibration`` (``bench/store_bytes.py``'s output): the stores of the same kind at the
    nearest temperature (and log-prob dtype); for top-k and sampled stores interpolated in log k or
    log N between the two measured neighbours (the nearest one outside the measured range), for a
    hybrid the nearest (k, M)."""
    hybrid = plan.kind == "topk" and plan.tail_samples > 0
    entries = [e for e in calibration["stores"] if e["kind"] == plan.kind and bool(e.get("tail_samples")) == hybrid]
    temperature = min({e["temperature"] for e in entries}, key=lambda t: abs(math.log(t / plan.temperature)))
    entries = [e for e in entries if e["temperature"] == temperature]
    entries = [e for e in entries if e["logprob_dtype"] == plan.logprob_dtype] or entries
    want = (plan.samples,) if plan.kind == "sampled" else (plan.top_k, plan.tail_samples) if hybrid else (plan.top_k,)

    def distance(entry):
        return sum(abs(math.log(a / b)) for a, b in zip(_size_parameter(entry), want))

    entries.sort(key=lambda e: _size_parameter(e))
    below = [e for e in entries if _size_parameter(e)[0] <= want[0]]
    above = [e for e in entries if _size_parameter(e)[0] >= want[0]]
    if hybrid or not below or not above:
        nearest = min(entries, key=distance)
        values, used = nearest["bytes_per_element"], _describe(nearest)
    else:
        lo, hi = below[-1], above[0]
        span = math.log(_size_parameter(hi)[0] / _size_parameter(lo)[0])
        w = math.log(want[0] / _size_parameter(lo)[0]) / span if span else 0.0
        values = {name: (1 - w) * lo["bytes_per_element"][name] + w * hi["bytes_per_element"][name]
                  for name in lo["bytes_per_element"]}
        used = _describe(lo) if lo is hi else f"{_describe(lo)} and {_describe(hi)}, interpolated in log size"
    if temperature != plan.temperature:
        used += f" (measured at T = {temperature:g}, the nearest to T = {plan.temperature:g})"
    return values, used


def _describe(entry: dict) -> str:
    if entry["kind"] == "sampled":
        return f"sampled N = {entry['samples']} at T = {entry['temperature']:g}"
    tail = f" + {entry['tail_samples']} tail draws" if entry.get("tail_samples") else ""
    return f"top-{entry['top_k']}{tail} at T = {entry['temperature']:g}"


# --------------------------------------------------------------------------- the plan


def plan(config: PlanConfig) -> dict[str, Any]:
    """Work out the plan, print it (text or ``--json``) and return it."""
    result = make_plan(config)
    print(json.dumps(result, indent=2) if config.json else render(result))
    return result


def make_plan(config: PlanConfig) -> dict[str, Any]:
    pilot = store_lib.open_store(config.pilot) if config.pilot else None
    if pilot is not None:
        if pilot.kind not in ("topk", "sampled"):
            raise DistillError(f"--pilot {config.pilot} is a '{pilot.kind}' store; pass a store distill teacher wrote")
        if differences := _same_format(config, pilot.params):
            raise DistillError(f"--pilot {config.pilot} has another format than the plan ({'; '.join(differences)}); "
                               "give the plan the pilot's options, or write a pilot with yours")
    teacher_config = hf_config(config.teacher) if config.teacher else None

    # ---- the corpus: rows of seq_len tokens overlapping by one (distill prepare)
    if config.tokens_store:
        tokens_store = store_lib.open_store(config.tokens_store, kind="tokens")
        rows, seq_len = tokens_store.rows, tokens_store.params["seq_len"]
        vocab, vocab_source = tokens_store.params["vocab_size"], "the tokens store"
        corpus_tokens, tokens_arrays = tokens_store.index.get("tokens"), tokens_store.index["arrays"]
    else:
        corpus_tokens, seq_len = parse_count(config.tokens), config.seq_len
        rows = (corpus_tokens - 1) // (seq_len - 1)
        vocab, vocab_source = 0, ""
        if rows < 1:
            raise DistillError(f"--tokens {config.tokens} makes no row of --seq-len {seq_len}; check both")
    if config.vocab_size:
        vocab, vocab_source = config.vocab_size, "--vocab-size"
    elif not vocab and pilot is not None:
        vocab, vocab_source = pilot.params["vocab_size"], "the pilot store"
    elif not vocab and teacher_config is not None:
        vocab, vocab_source = teacher_config.vocab_size, "the teacher's config (its output rows)"
    if not vocab:
        raise DistillError("the vocabulary size is unknown: pass --vocab-size, --tokens-store, --pilot or --teacher")
    if not config.tokens_store:
        tokens_arrays = {"input_ids": {"dtype": store_lib.token_dtype(vocab).name, "shape": [seq_len]}}
    if config.kind == "topk" and config.top_k > vocab:
        raise DistillError(f"--top-k {config.top_k} is larger than the vocabulary ({vocab} ids); lower it")
    positions = rows * seq_len
    store = size_store(config, rows, seq_len, vocab, tokens_arrays, pilot)

    inputs = {"corpus_tokens": corpus_tokens, "rows": rows, "seq_len": seq_len, "positions": positions,
              "gpu_memory": config.gpu_memory,
              "vocab_size": vocab, "vocab_source": vocab_source, "backend": config.backend,
              "format": {k: to_dict(config)[k] for k in FORMAT_FIELDS}}
    return {"inputs": inputs, "store": store,
            "stage_one": stage_one(config, teacher_config, positions, seq_len, store["shards"], vocab),
            "stage_two": stage_two(config, positions, seq_len)}


def size_store(config: PlanConfig, rows: int, seq_len: int, vocab: int, tokens_arrays: dict[str, dict],
               pilot: store_lib.Store | None) -> dict[str, Any]:
    """Bytes on disk of the store (``tokens_arrays``: those of the tokens store, which stage one
    copies): raw bytes per position from the format, each array's compressed
    bytes per element measured (on the pilot, else on the shipped teacher), the fixed bytes of each
    shard and chunk measured by writing one."""
    arrays = stored_arrays(config, seq_len, tokens_arrays, vocab)
    per_position = elements(arrays)
    itemsize = {name: np.dtype(spec["dtype"]).itemsize for name, spec in arrays.items()}
    raw = {name: per_position[name] * itemsize[name] for name in arrays}
    notes, distinct = [], {}
    if pilot is not None:
        measured = compressed_bytes(pilot)
        per_element, distinct = measured["bytes_per_element"], measured["distinct_ids"]
        source = (f"--pilot {config.pilot}: {measured['positions']:,} positions of your teacher "
                  f"(vocabulary {pilot.params['vocab_size']:,})")
        reference_vocab = pilot.params["vocab_size"]
    else:
        if not CALIBRATION.is_file():
            raise DistillError(f"{CALIBRATION} is missing (the measured bytes of the shipped teacher's stores); run "
                               "make bench-bytes, or pass --pilot STORE")
        calibration = json.loads(CALIBRATION.read_text())
        per_element, used = calibrated_bytes(config, calibration)
        source = (f"{CALIBRATION.relative_to(ROOT)}: {used}; the shipped {calibration['teacher_parameters'] / 1e6:.1f}M "
                  f"teacher over {calibration['positions']:,} positions of {calibration['corpus']} "
                  f"(vocabulary {calibration['vocab_size']:,})")
        reference_vocab = calibration["vocab_size"]
        notes.append("compression follows the teacher's entropy (distinct ids per position): against these numbers "
                     "the tests' peaked tiny teacher measured -13% (top-64) to +22% (sampled N = 32 at T = 1); "
                     "--pilot STORE measures yours")
    if unmeasured := [name for name in arrays if name not in per_element]:  # e.g. a loss mask copied from the tokens
        per_element |= {name: itemsize[name] for name in unmeasured}
        notes.append(f"{', '.join(unmeasured)} not measured: counted at raw size (an upper bound)")
    id_scale = math.log2(vocab) / math.log2(reference_vocab)
    if vocab != reference_vocab:
        notes.append(f"ids scaled by log2 {vocab:,} / log2 {reference_vocab:,} = {id_scale:.2f} (not measured)")
    stored = {name: per_position[name] * per_element[name] * (id_scale if name.endswith("_ids") else 1.0)
              for name in arrays}
    per_token = sum(stored.values())
    chunk_rows = min(config.chunk_rows, config.rows_per_shard)
    overhead = layout_overhead(arrays, config.backend, chunk_rows)
    store = {"bytes": round(store_bytes(rows, seq_len, per_token, config.rows_per_shard, chunk_rows, overhead)),
             "bytes_per_token": per_token, "raw_bytes_per_token": sum(raw.values()),
             "arrays": {name: {"raw": raw[name], "stored": stored[name]} for name in arrays},
             "shards": math.ceil(rows / config.rows_per_shard), "rows_per_shard": config.rows_per_shard,
             "shard_bytes": store_bytes(min(rows, config.rows_per_shard), seq_len, per_token, config.rows_per_shard,
                                        chunk_rows, overhead),
             "fixed_bytes_per_shard": overhead[0], "fixed_bytes_per_chunk": overhead[1],
             "calibration": source, "notes": notes}
    if distinct:
        store["distinct_ids_per_position"] = distinct
    return store


def _realistic(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_one(config: PlanConfig, teacher_config, positions: int, seq_len: int, n_shards: int,
              vocab: int) -> dict[str, Any]:
    """GPUs per task, throughput, GPU-hours, wall time and the array size of stage one."""
    out: dict[str, Any] = {}
    params = parse_count(config.teacher_params) if config.teacher_params else (
        count_parameters(skeleton(teacher_config)) if teacher_config is not None else 0)
    gpus_per_task = 1
    if params:
        weights = params * DTYPES[config.teacher_dtype].itemsize
        gpus_per_task = max(1, math.ceil(weights * (1 + HEADROOM) / (config.gpu_memory * 2**30)))
        auto = " (--dtype auto on GPUs with bfloat16)" if config.dtype == "auto" else ""
        out |= {"teacher_params": params, "weights_bytes": weights, "gpus_per_task": gpus_per_task,
                "dtype": config.teacher_dtype,
                "memory": f"{weights / 1e9:.1f} GB of {config.teacher_dtype}{auto} weights + {HEADROOM:.0%} "
                          f"(activations, logits buffer) on {config.gpu_memory:g} GiB GPUs"}
        if gpus_per_task > config.gpus:
            raise DistillError(f"the teacher needs {gpus_per_task} GPUs per task ({out['memory']}) and --gpus is "
                               f"{config.gpus}; give more GPUs, larger --gpu-memory or a smaller --dtype")
    # ---- throughput of one task: a device-mapped teacher runs its layers one GPU after another
    if config.teacher_tokens_per_gpu_s:
        task_rate = config.teacher_tokens_per_gpu_s * gpus_per_task
        out["throughput_source"] = "stated (--teacher-tokens-per-gpu-s)"
    elif config.gpu_tflops and params:
        forward = 2 * params / (config.gpu_tflops * 1e12 * config.mfu)
        bench = _realistic(REALISTIC_STAGE_ONE)
        kind = "torch/sampled50" if config.kind == "sampled" else "torch/hybrid-k8-m48" if config.tail_samples else "torch"
        reductions = 0.0
        if bench:
            reductions = (bench["stage_one_us_per_token_median"][kind] - bench["bare_forward_us_per_token_median"]) \
                * 1e-6 * vocab / bench["vocab_size"]
        task_rate = 1 / (forward + reductions)
        out["throughput_source"] = (
            f"estimated: 2 × {params:.3g} FLOPs per token at {config.gpu_tflops:g} TFLOP/s × MFU {config.mfu:g} "
            f"(assumed) = {forward * 1e6:.3g} µs/token, + {reductions * 1e6:.3g} µs/token for the store's reductions "
            f"(measured on an H200 at a {bench.get('vocab_size', 0):,} vocabulary, "
            f"{REALISTIC_STAGE_ONE.relative_to(ROOT)}, scaled by vocabulary: assumed)"
            + (f"; one GPU of a task's {gpus_per_task} computes at a time (--device-map is not tensor parallel)"
               if gpus_per_task > 1 else ""))
    else:
        out["not_timed"] = "give --teacher-tokens-per-gpu-s (measured) or --gpu-tflops with the teacher's size"
        return out
    concurrent = config.gpus // gpus_per_task
    compute_s = positions / task_rate  # one task's worth of compute over the whole store
    startup_s = config.startup_minutes * 60
    shard_s = config.rows_per_shard * seq_len / task_rate
    out |= {"tokens_per_gpu_s": task_rate / gpus_per_task, "task_tokens_per_s": task_rate,
            "concurrent_tasks": concurrent, "shard_minutes": shard_s / 60}
    if config.time_limit:
        limit = parse_time_limit(config.time_limit)
        usable = limit * (1 - config.margin) - startup_s
        if usable <= 0:
            raise DistillError(f"--time-limit {config.time_limit} less the margin ({config.margin:.0%}) leaves no time "
                               f"after the {config.startup_minutes:g} min start-up; give a longer limit")
        per_task = math.floor(usable / shard_s)
        if per_task < 1:
            raise DistillError(f"one shard of {config.rows_per_shard} rows takes {shard_s / 3600:.2f} h on a task, "
                               f"longer than the {usable / 3600:.2f} h a task may compute within --time-limit "
                               f"{config.time_limit}; lower --rows-per-shard to "
                               f"{max(1, int(config.rows_per_shard * usable / shard_s))} or below")
        needed = math.ceil(n_shards / per_task)  # the fewest tasks that each fit the limit
        # at least one task per GPU slot, and whole waves: a multiple of the tasks that run at once
        array = min(n_shards, concurrent * math.ceil(needed / concurrent))
    else:
        limit, array = 0, min(n_shards, concurrent)
    shards_per_task = math.ceil(n_shards / array)
    task_s = startup_s + shards_per_task * shard_s
    waves = math.ceil(array / concurrent)
    out |= {"array_size": array, "sbatch_array": f"0-{array - 1}", "shards_per_task": shards_per_task,
            "task_hours": task_s / 3600, "waves": waves, "wall_hours": waves * task_s / 3600,
            "gpu_hours": (compute_s + array * startup_s) * gpus_per_task / 3600,
            "gpu_hours_compute": compute_s * gpus_per_task / 3600}
    if limit:
        out |= {"time_limit_s": limit, "margin": config.margin}
    out["rows_per_shard_advice"] = _advice(config, shard_s, task_s, startup_s, limit)
    return out


def _advice(config: PlanConfig, shard_s: float, task_s: float, startup_s: float, limit: float) -> dict[str, Any]:
    """Rows per shard: a shard is the work a pre-empted or failed task loses and the unit that
    balances tasks (a task gets ⌈shards / tasks⌉ of them), so aim at a shard of at most
    ``--shard-minutes`` and at least 4 shards per task; the largest power of two that does both."""
    per_row = shard_s / config.rows_per_shard
    cap = config.shard_minutes * 60
    if limit:
        cap = min(cap, (limit * (1 - config.margin) - startup_s) / 4)
    rows = 2 ** max(0, math.floor(math.log2(max(cap / per_row, 1))))
    rows = max(min(rows, 4096), 1)
    why = (f"a shard of {config.rows_per_shard} rows is {shard_s / 60:.3g} min of compute; "
           f"{rows} rows keep a shard within {cap / 60:.3g} min")
    return {"current": config.rows_per_shard, "suggested": rows, "why": why}


# --------------------------------------------------------------------------- stage two's memory

# Saved activations of one decoder layer, c in c·B·L·d bytes (B rows of L tokens, width d), for
# Llama-style layers (RMSNorm, rotary q/k, sdpa or flash attention, which keep no L×L scores, a SwiGLU
# MLP, no dropout) in training: measured with saved-tensor hooks on transformers' LlamaDecoderLayer
# over query widths q·d, key-value widths r·d and MLP widths m·d (tests/stages/test_plan.py checks them
# against the shipped student):
#   float32               c = 4·(6 + 2q + 2r + 4m)   every saved tensor 4 bytes
#   bfloat16 (autocast)   c = 2·(13 + 2q + 2r + 4m)  projections and MLP 2 bytes; the residual stream and
#                                                    RMSNorm stay float32, so the d-wide ones count double
# Under autocast each layer's weights are also kept as bfloat16 copies for backward: 2 bytes a parameter.
# (Eager attention keeps its B·heads·L² probabilities besides: not counted; use sdpa or flash attention.)
ACTIVATION_TERMS = {"float32": (4, 6), "bfloat16": (2, 13)}  # (bytes, d-wide tensors)
# With --gradient-checkpointing a layer keeps only its float32 input (4·B·L·d), and backward recomputes
# one layer at a time: c·B·L·d once more (and that layer's bfloat16 weight copies).
CHECKPOINTED_LAYER = 4
# Outside the layers: the final norm's saved float32 tensors (8) and the hidden states without the last
# position that the loss reads (4), bytes per token and unit of width.
OUTSIDE_LAYERS = 12
# The loss chunk of the output head, bytes per element of its [chunk, vocabulary] logits (stages/student.py's
# DistillStep): float32 logits and their log-softmax, then in backward the gradients of both (16); under
# autocast also the bfloat16 logits and their gradient (20). A distillation temperature other than 1 adds
# a tempered log-softmax and its gradient (8 more), not counted.
HEAD_BYTES = {"float32": 16, "bfloat16": 20}
LOSS_CHUNK_ELEMENTS = 1 << 26  # distill student's default --loss-chunk: chunk × vocabulary ≤ 64M
# What the caching allocator can hand out of a GPU's memory: the CUDA context, cuBLAS workspaces and NCCL
# buffers lie outside it (about 1 GiB), and fragmentation leaves about a tenth of the rest unusable.
CUDA_RESERVED_GIB = 1.0
ALLOCATOR_SHARE = 0.9


@dataclass(frozen=True)
class StudentShape:
    """What a student's training memory follows from: its parameters and the widths of its layers."""

    parameters: int
    layers: int
    width: int  # d, the hidden size
    query: int  # attention heads × head width
    key_value: int  # key-value heads × head width (grouped-query attention: below the query width)
    mlp: int  # the MLP's inner width
    vocab: int  # rows of the output head
    tied: bool = True  # the output head is the input embedding

    @property
    def layer_parameters(self) -> int:
        """One decoder layer's parameters: those besides the embedding (and an untied head), per layer."""
        embeddings = self.vocab * self.width * (1 if self.tied else 2)
        return max(0, self.parameters - embeddings) // self.layers


def student_shape(config, parameters: int | None = None) -> StudentShape:
    """The :class:`StudentShape` of a transformers config (``parameters`` counted on the meta device
    unless given)."""
    width, heads = config.hidden_size, config.num_attention_heads
    head = getattr(config, "head_dim", None) or width // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
    if parameters is None:
        parameters = count_parameters(skeleton(config))
    return StudentShape(parameters, config.num_hidden_layers, width, heads * head, kv_heads * head, mlp,
                        config.vocab_size, bool(getattr(config, "tie_word_embeddings", True)))


def activation_constant(shape: StudentShape, dtype: str) -> float:
    """c of one decoder layer's saved activations, c·B·L·d bytes (:data:`ACTIVATION_TERMS`)."""
    size, wide = ACTIVATION_TERMS[dtype]
    d = shape.width
    return size * (wide + 2 * shape.query / d + 2 * shape.key_value / d + 4 * shape.mlp / d)


def student_memory(shape: StudentShape, rows: int, seq_len: int, dtype: str, checkpointing: bool,
                   loss_chunk: int = 0) -> dict[str, Any]:
    """Peak bytes of one stage-two process training ``shape`` on micro-batches of ``rows`` rows of
    ``seq_len`` tokens, autocast in ``dtype`` (DDP or one GPU: every process holds everything):

    - weights 4·P, gradients 4·P and AdamW's two moments 8·P (float32 whatever ``dtype``: autocast
      computes in bfloat16 from float32 weights);
    - under bfloat16 autocast, the layers' weights cast to bfloat16 and kept for backward, 2 bytes a
      parameter (one layer's with checkpointing), and the output head's;
    - activations: per layer c·B·L·d (:func:`activation_constant`), or with ``checkpointing``
      4·B·L·d per layer plus one layer's c·B·L·d recomputed in backward; plus 12·B·L·d outside the
      layers (:data:`OUTSIDE_LAYERS`);
    - the loss chunk: min(chunk, B·(L−1)) positions × vocabulary × 16 or 20 bytes (:data:`HEAD_BYTES`).

    A sum: the gradients of a step's micro-batches live while the next one's activations are built
    (``--grad-accum`` above 1), and from the second step on AdamW's moments live throughout. With one
    micro-batch per step it overstates the peak by at most the gradients' 4·P."""
    p, d, tokens = shape.parameters, shape.width, rows * seq_len
    c = activation_constant(shape, dtype)
    copies = 2 * shape.layer_parameters if dtype == "bfloat16" else 0  # one layer's bfloat16 weight copies
    if checkpointing:
        activations = (shape.layers * CHECKPOINTED_LAYER + c + OUTSIDE_LAYERS) * tokens * d
        weight_copies = copies
    else:
        activations = (shape.layers * c + OUTSIDE_LAYERS) * tokens * d
        weight_copies = shape.layers * copies
    if dtype == "bfloat16":
        weight_copies += 2 * shape.vocab * d  # the output head's, in each loss chunk
    chunk = min(loss_chunk or max(1, LOSS_CHUNK_ELEMENTS // shape.vocab), rows * (seq_len - 1))
    parts = {"weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p, "weight_copies": weight_copies,
             "activations": round(activations), "loss_chunk": chunk * shape.vocab * HEAD_BYTES[dtype]}
    return {"bytes": parts, "peak_bytes": sum(parts.values()), "activation_constant": c, "loss_chunk_positions": chunk,
            "micro_batch_size": rows, "gradient_checkpointing": checkpointing, "dtype": dtype}


def usable_bytes(gpu_memory_gib: float) -> float:
    """What one GPU of ``gpu_memory_gib`` GiB can give a process's tensors (:data:`ALLOCATOR_SHARE`)."""
    return max(0.0, gpu_memory_gib - CUDA_RESERVED_GIB) * ALLOCATOR_SHARE * 2**30


def suggest_batch(shape: StudentShape, seq_len: int, dtype: str, gpus: int, global_tokens: int, usable: float,
                  loss_chunk: int = 0, largest: int = 1024) -> dict[str, Any]:
    """The micro-batch and accumulation that fit ``usable`` bytes and keep ``global_tokens`` per
    optimizer step over ``gpus`` processes: the largest power-of-two micro-batch (at most the rows
    a process needs per step) whose :func:`student_memory` fits without gradient checkpointing, else
    with it (a third more compute per step); the accumulation is then the micro-batches that make up
    the step's rows (rounded up: the batch may grow to a whole number of micro-batches). ``fits`` is
    False where even one row does not fit with checkpointing."""
    rows_per_gpu = max(1, math.ceil(global_tokens / (seq_len * gpus)))
    ceiling = 2 ** math.floor(math.log2(min(rows_per_gpu, largest)))
    for checkpointing in (False, True):
        rows = ceiling
        while rows >= 1:
            memory = student_memory(shape, rows, seq_len, dtype, checkpointing, loss_chunk)
            if memory["peak_bytes"] <= usable:
                accum = math.ceil(rows_per_gpu / rows)
                return {"fits": True, "micro_batch_size": rows, "grad_accum": accum,
                        "gradient_checkpointing": checkpointing, "peak_bytes": memory["peak_bytes"],
                        "global_batch_tokens": rows * accum * gpus * seq_len}
            rows //= 2
    states = 16 * shape.parameters
    return {"fits": False, "states_bytes": states,
            "why": f"one row of {seq_len} tokens does not fit even with --gradient-checkpointing: the weights, "
                   f"gradients and AdamW states alone take {states / 2**30:.1f} GiB; shard them over the GPUs "
                   "(distill student --fsdp) or train a smaller student"}


def stage_two(config: PlanConfig, positions: int, seq_len: int = 0) -> dict[str, Any]:
    """GPU-hours and wall time of training a student on every stored position for ``--epochs``, and
    the memory of each of its processes where the student's architecture is known (``--student``)."""
    student_config = hf_config(config.student) if config.student else None
    params = parse_count(config.student_params) if config.student_params else (
        count_parameters(skeleton(student_config)) if student_config is not None else 0)
    gpus = config.student_gpus or config.gpus
    tokens = positions * config.epochs
    out: dict[str, Any] = {"tokens": tokens, "gpus": gpus}
    if params:
        out["student_params"] = params
    if student_config is not None and seq_len:
        out["memory"] = stage_two_memory(config, student_shape(student_config, params), seq_len, gpus)
    elif params:
        out["memory_not_estimated"] = ("give --student CONFIG (its layers, widths and vocabulary decide the "
                                       "activations) for the memory of each process")
    if config.student_tokens_per_gpu_s:
        rate = config.student_tokens_per_gpu_s
        out["throughput_source"] = "stated (--student-tokens-per-gpu-s)"
    elif config.gpu_tflops and params:
        bench = _realistic(REALISTIC_STAGE_TWO)
        mode = {"sampled": "offline-sampled", "topk": "offline-hybrid" if config.tail_samples else "offline-tail"}
        factor = (bench["modes"][mode[config.kind]]["step_s_median"] / bench["modes"]["ce"]["step_s_median"]
                  if bench else 1.0)
        rate = config.gpu_tflops * 1e12 * config.mfu / (6 * params * factor)
        out["throughput_source"] = (
            f"estimated: 6 × {params:.3g} FLOPs per token at {config.gpu_tflops:g} TFLOP/s × MFU {config.mfu:g} "
            f"(assumed), × {factor:.2f} for reading and scoring the store (offline KD's step over CE's, measured "
            f"on an H200, {REALISTIC_STAGE_TWO.relative_to(ROOT)})")
    else:
        out["not_timed"] = "give --student-tokens-per-gpu-s (measured) or --gpu-tflops with --student-params"
        return out
    wall = tokens / (rate * gpus)  # data parallel: assumed to scale linearly over the job's GPUs
    out |= {"tokens_per_gpu_s": rate, "gpu_hours": tokens / rate / 3600, "wall_hours": wall / 3600}
    if config.time_limit:
        usable = parse_time_limit(config.time_limit) * (1 - config.margin)
        out["jobs"] = math.ceil(wall / usable)  # each resumes the last (--resume auto)
    return out


# --------------------------------------------------------------------------- printing


def stage_two_memory(config: PlanConfig, shape: StudentShape, seq_len: int, gpus: int) -> dict[str, Any]:
    """Each stage-two process's peak memory at ``--micro-batch-size`` (and ``--gradient-checkpointing``),
    whether it fits ``--gpu-memory``, and the micro-batch and accumulation suggested for it."""
    dtype = config.training_dtype
    memory = student_memory(shape, config.micro_batch_size, seq_len, dtype, config.gradient_checkpointing,
                            config.loss_chunk)
    usable = usable_bytes(config.gpu_memory)
    if config.global_batch_tokens:
        global_tokens, source = parse_count(config.global_batch_tokens), "--global-batch-tokens"
    else:
        global_tokens = config.micro_batch_size * config.grad_accum * gpus * seq_len
        source = (f"--micro-batch-size {config.micro_batch_size} × --grad-accum {config.grad_accum} × "
                  f"{gpus} GPU(s) × {seq_len} tokens")
    memory |= {"usable_bytes": usable, "fits": memory["peak_bytes"] <= usable, "global_batch_tokens": global_tokens,
               "global_batch_source": source, "layers": shape.layers, "width": shape.width,
               "suggested": suggest_batch(shape, seq_len, dtype, gpus, global_tokens, usable, config.loss_chunk)}
    return memory


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g}"


def _memory_lines(memory: dict[str, Any], gpu_memory: float) -> list[str]:
    b = memory["bytes"]
    autocast = "bfloat16 autocast" if memory["dtype"] == "bfloat16" else "float32"
    checkpointed = ", checkpointed" if memory["gradient_checkpointing"] else ""
    copies = f" + bf16 weight copies {_gib(b['weight_copies'])}" if b["weight_copies"] else ""
    lines = [f"  memory        {_gib(memory['peak_bytes'])} GiB per GPU at micro-batch {memory['micro_batch_size']} "
             f"({autocast}{checkpointed}) = weights {_gib(b['weights'])} + gradients {_gib(b['gradients'])} + "
             f"AdamW {_gib(b['optimizer'])}{copies} + activations {_gib(b['activations'])} (c = "
             f"{memory['activation_constant']:.3g} bytes × B·L·d per layer, {memory['layers']} layers of d = "
             f"{memory['width']}) + loss chunk {_gib(b['loss_chunk'])} ({memory['loss_chunk_positions']:,} "
             "positions) GiB",
             f"  fits          {'yes' if memory['fits'] else 'NO'}: {_gib(memory['usable_bytes'])} GiB usable of "
             f"{gpu_memory:g} GiB ({CUDA_RESERVED_GIB:g} GiB CUDA context, {ALLOCATOR_SHARE:.0%} of the rest)"]
    s = memory["suggested"]
    if s["fits"]:
        lines.append(f"  suggested     --micro-batch-size {s['micro_batch_size']} --grad-accum {s['grad_accum']}"
                     + (" --gradient-checkpointing" if s["gradient_checkpointing"] else "")
                     + f" ({_gib(s['peak_bytes'])} GiB; {s['global_batch_tokens']:,} tokens per step, for "
                       f"{memory['global_batch_tokens']:,} from {memory['global_batch_source']})")
    else:
        lines.append(f"  suggested     nothing fits: {s['why']}")
    return lines


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _hours(h: float) -> str:
    return f"{h * 60:.3g} min" if h < 1 else f"{h:.3g} h"


def render(result: dict[str, Any]) -> str:
    """The plan as text: what each number is, and where it came from."""
    i, s, one, two = result["inputs"], result["store"], result["stage_one"], result["stage_two"]
    f = i["format"]
    what = (f"sampled, N = {f['samples']}" if f["kind"] == "sampled" else
            f"top-{f['top_k']}" + (f" + {f['tail_samples']} tail draws" if f["tail_samples"] else ""))
    what += (", per-id log-probs" if f["sample_logprobs"] else "") + f", T = {f['temperature']:g}, {i['backend']}"
    corpus = f"{i['corpus_tokens']:,} tokens → " if i["corpus_tokens"] else ""
    lines = [f"store ({what})",
             f"  corpus        {corpus}{i['rows']:,} rows of {i['seq_len']:,} = {i['positions']:,} positions; "
             f"vocabulary {i['vocab_size']:,} ({i['vocab_source']})",
             f"  per token     {s['bytes_per_token']:.1f} bytes on disk (raw {s['raw_bytes_per_token']:.1f}: "
             + ", ".join(f"{n} {a['stored']:.1f}/{a['raw']:g}" for n, a in s["arrays"].items()) + ")",
             f"  size          {_bytes(s['bytes'])} in {s['shards']:,} shards of {s['rows_per_shard']} rows "
             f"({_bytes(s['shard_bytes'])} each)",
             f"  measured on   {s['calibration']}"]
    lines += [f"  note          {note}" for note in s["notes"]]
    if "distinct_ids_per_position" in s:
        lines.append("  distinct ids  " + ", ".join(f"{n} {v:.1f} per position"
                                                   for n, v in s["distinct_ids_per_position"].items()))
    lines.append("stage one (teacher)")
    if "teacher_params" in one:
        lines.append(f"  teacher       {one['teacher_params']:,} parameters: {one['memory']} → {one['gpus_per_task']} "
                     f"GPU(s) per task" + (" (distill teacher --device-map auto)" if one["gpus_per_task"] > 1 else ""))
    if "not_timed" in one:
        lines.append(f"  not timed     {one['not_timed']}")
    else:
        lines += [f"  throughput    {one['tokens_per_gpu_s']:,.0f} tokens/s per GPU, {one['throughput_source']}",
                  f"  GPU-hours     {one['gpu_hours']:,.1f} ({one['gpu_hours_compute']:,.1f} computing, the rest "
                  "loading the teacher in each task)",
                  f"  array         --array={one['sbatch_array']} ({one['array_size']} tasks, {one['concurrent_tasks']} "
                  f"at a time): {one['shards_per_task']} shard(s) per task, {_hours(one['task_hours'])} each"
                  + (f" (≤ {1 - one['margin']:.0%} of the {one['time_limit_s'] / 3600:g} h limit)"
                     if "time_limit_s" in one else ""),
                  f"  wall          {_hours(one['wall_hours'])} in {one['waves']} wave(s) of tasks",
                  f"  rows/shard    {one['rows_per_shard_advice']['suggested']} suggested: "
                  f"{one['rows_per_shard_advice']['why']}"]
    lines.append("stage two (student)")
    if "memory" in two:
        lines += _memory_lines(two["memory"], i.get("gpu_memory", 0.0))
    elif "memory_not_estimated" in two:
        lines.append(f"  memory        not estimated: {two['memory_not_estimated']}")
    if "not_timed" in two:
        lines.append(f"  not timed     {two['not_timed']}")
    else:
        lines += [f"  throughput    {two['tokens_per_gpu_s']:,.0f} tokens/s per GPU, {two['throughput_source']}",
                  f"  GPU-hours     {two['gpu_hours']:,.1f} for {two['tokens']:,.0f} tokens",
                  f"  wall          {_hours(two['wall_hours'])} on {two['gpus']} GPU(s)"
                  + (f", {two['jobs']} job(s) of the time limit, each resuming the last (--resume auto)"
                     if "jobs" in two else "")]
    return "\n".join(lines)

"""Stage-one benchmark: time per token against a bare teacher forward, and bytes on disk per token.

Side by side in one process, alternating, medians over repeats (the machine is shared and noisy):

- ``bare``: ``model(input_ids).logits`` over the same rows and batch size, nothing else;
- ``stage one``: ``distill teacher`` end to end (chunked head, top-k, log-sum-exp at each grid
  temperature, exact tail, writer thread, compression, renames), loop time without model loading,
  once per reduction kernel (``--kernels``: the fused kernel of the device, ``native`` — C on a CPU,
  Triton on CUDA — and torch operations; ``KERNEL+overlap`` times it with ``--overlap``, the copy
  stream of CUDA, which plain names leave off so that older results stay comparable) and per
  store (``--stores``: top-64, sampled N = 32 (the default store), N = 50, the hybrid top-4 + 24 tail
  draws, …).

Each repeat runs bare, every kernel, then bare again; a ratio divides by the mean of that repeat's
two bare runs, so drift in the machine's speed between repeats cancels. Shards hold
``--rows-per-shard`` rows (64 rows = 16k tokens: writes overlap the next shard's compute, as in a
real run; tiny shards would mostly measure zarr's per-array overhead). Bytes per token are
measured at k = 8, 32, 64, for sampled stores (N = 24, 32, 50, with and without per-id log-probs;
padded as stored, and what a ragged layout would take) and hybrid ones, for both backends on the first
``--size-rows`` rows.

    python bench/stage_one.py --teacher data/models/teacher --rows 256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.errors import DistillError
from pipeline.models import load_model, resolve_device
from pipeline.store.contract import open_store
from stages.prepare import PrepareConfig, prepare
from stages.teacher import TeacherConfig, run_teacher


STORES = {
    "topk8": {"kind": "topk", "top_k": 8}, "topk32": {"kind": "topk", "top_k": 32},
    "topk64": {"kind": "topk", "top_k": 64},
    "sampled24": {"kind": "sampled", "samples": 24}, "sampled32": {"kind": "sampled", "samples": 32},
    "sampled50": {"kind": "sampled", "samples": 50},
    "sampled50-logprobs": {"kind": "sampled", "samples": 50, "sample_logprobs": True},
    "hybrid-k8-m48": {"kind": "topk", "top_k": 8, "tail_samples": 48},
    "hybrid-k16-m32": {"kind": "topk", "top_k": 16, "tail_samples": 32},
    "hybrid-k4-m24": {"kind": "topk", "top_k": 4, "tail_samples": 24},
}


def ragged_bytes(store) -> int:
    """Bytes a ragged layout of a sampled store's draws would take, zstd-3 compressed like the store:
    per position its number of distinct ids (uint8), then only the real ids and counts; the other
    arrays as stored."""
    import pyarrow as pa

    codec, total = pa.Codec("zstd", 3), 0
    for i in range(len(store.shards)):
        arrays = store.read_shard(i)
        counts, ids = arrays["sample_counts"], arrays["sample_ids"]
        real = counts > 0
        parts = [real.sum(-1).astype(np.uint8), ids[real], counts[real]]
        parts += [v for k, v in arrays.items() if not k.startswith("sample_")]
        total += sum(codec.compress(np.ascontiguousarray(p).tobytes(), asbytes=True).__len__() for p in parts)
    return total


def bare_forward(model, rows: np.ndarray, batch_size: int, device) -> float:
    """Seconds per token of the teacher's plain forward pass (full logits)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = torch.from_numpy(rows[start:start + batch_size].astype(np.int64)).to(device)
            model(input_ids=batch).logits
    sync()
    return (time.perf_counter() - started) / rows.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="data/models/teacher")
    parser.add_argument("--corpus", default="data/corpus/heldout.jsonl.gz")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--stores", default="topk64,sampled32", help="stores to time, comma-separated, of "
                        + ", ".join(STORES))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--size-rows", type=int, default=64)
    parser.add_argument("--kernels", default="", help="stage one's --kernel values to time, comma-separated, each "
                        "optionally +overlap (default: native,torch on a CPU, torch on a GPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--position-chunk", type=int, default=0, help="stage one's --position-chunk (0 = its default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="bench/results/stage_one.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    prepare(load_config(PrepareConfig, inputs=(args.corpus,), out=str(work / "tokens-all"), seq_len=256,
                        tokenizer=args.tokenizer))
    tokens = open_store(work / "tokens-all")
    rows = tokens.read_rows(0, min(args.rows, tokens.rows))["input_ids"]  # stage one reads the same rows (--max-rows)

    model = load_model(args.teacher, args.dtype).to(device).eval()

    def stage_one(store_kind: str, backend: str, name: str, kernel: str, n_rows: int,
                  ragged: bool = False) -> tuple[float, float]:
        kernel, _, overlap = kernel.partition("+")
        config = load_config(TeacherConfig, tokens_store=str(work / "tokens-all"), max_rows=n_rows, teacher=args.teacher,
                             out=str(work / name), backend=backend, batch_size=args.batch_size,
                             device=str(device), dtype=args.dtype, rows_per_shard=min(args.rows_per_shard, n_rows),
                             overwrite=True, kernel=kernel, overlap=overlap == "overlap", **STORES[store_kind],
                             **({"position_chunk": args.position_chunk} if args.position_chunk else {}))
        run = run_teacher(config)
        store = open_store(work / name)
        tokens = store.rows * store.params["seq_len"]
        size = (ragged_bytes(store) if ragged else store.index["bytes"]) / tokens
        shutil.rmtree(work / name)
        return run.seconds / run.tokens, size

    kernels = [name for name in (args.kernels or ("native,torch" if device.type == "cpu" else "torch")).split(",") if name]
    # "topk64" under each kernel keeps its old name (the kernel's), the other stores are "<kernel>/<store>"
    timed = [(kernel, store) for store in args.stores.split(",") for kernel in kernels]
    label = {(kernel, store): kernel if store == "topk64" else f"{kernel}/{store}" for kernel, store in timed}
    bare_forward(model, rows[: args.batch_size], args.batch_size, device)  # warm-up: allocator, threads
    unavailable = {}
    for kernel, store in list(timed):  # warm-up: kernel build, zarr imports
        try:
            stage_one(store, "zarr", "warm-up", kernel, args.batch_size)
        except DistillError as error:  # a kernel that cannot run here (--kernel native without it): time the rest
            print(f"{label[(kernel, store)]}: not timed: {error}", flush=True)
            unavailable[label[(kernel, store)]] = str(error)
            timed.remove((kernel, store))
    bare, stage, ratio = [], {label[t]: [] for t in timed}, {label[t]: [] for t in timed}
    for repeat in range(args.repeats):
        before = bare_forward(model, rows, args.batch_size, device)
        seconds = {label[(kernel, store)]: stage_one(store, "zarr", f"timing-{repeat}", kernel, len(rows))[0]
                   for kernel, store in timed}
        after = bare_forward(model, rows, args.batch_size, device)
        base = (before + after) / 2
        bare.append(base)
        for name, value in seconds.items():
            stage[name].append(value)
            ratio[name].append(value / base)
        print(f"repeat {repeat}: bare {base * 1e6:.1f} us/token, " + ", ".join(
            f"{name} {value * 1e6:.1f} ({value / base:.3f})" for name, value in seconds.items()), flush=True)
    sizes = {}
    for backend in ("zarr", "arrow") if args.size_rows > 0 else ():  # --size-rows 0: timing only
        for store in ("topk8", "topk32", "topk64", "sampled24", "sampled32", "sampled50", "sampled50-logprobs",
                      "hybrid-k4-m24", "hybrid-k8-m48", "hybrid-k16-m32"):
            name = f"{backend}_k{store[4:]}" if store.startswith("topk") else f"{backend}_{store}"
            sizes[name] = stage_one(store, backend, f"size-{backend}-{store}", kernels[0], args.size_rows)[1]
    for store in ("sampled32", "sampled50") if args.size_rows > 0 else ():
        sizes[f"ragged_{store}"] = stage_one(store, "zarr", "size-ragged", kernels[0], args.size_rows, True)[1]

    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "teacher": args.teacher,
        "tokens_per_run": int(rows.size),
        "rows_per_shard": args.rows_per_shard,
        "batch_size": args.batch_size,
        "position_chunk": args.position_chunk or TeacherConfig.__dataclass_fields__["position_chunk"].default,
        "repeats": args.repeats,
        "bare_forward_us_per_token_median": statistics.median(bare) * 1e6,
        "stage_one_us_per_token_median": {name: statistics.median(v) * 1e6 for name, v in stage.items()},
        "stage_one_over_bare_median": {name: statistics.median(v) for name, v in ratio.items()},
        "stage_one_tokens_per_s_median": {name: 1.0 / statistics.median(v) for name, v in stage.items()},
        "dtype": args.dtype,
        "stage_one_over_bare_each": ratio,
        "bytes_per_token": sizes,
        "not_timed": unavailable,
        "naive_int32_fp16_bytes_per_token_k64": 64 * 6,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()

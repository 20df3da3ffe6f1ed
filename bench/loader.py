"""Loader benchmark: how many tokens per second stage two's loader delivers on its own, with 0, 1
and 2 worker processes, against how many a training step consumes.

For each store (a top-64 store and a sampled one, reading the arrays their teacher signal needs),
the loader runs alone over ``--epochs`` whole epochs of 16-row batches (so every store chunk is
decoded ``--epochs`` times inside the timed window), seeded as a training run is; tokens/s is the median of ``--repeats``. The ratio divides it by what a step
of the mode that reads that store consumes (``tokens per step ÷ median step time``, taken from a
``bench/stage_two.py`` result of the same machine), so ≥ 10 means the loader is never what a step
waits on. For a GPU, ``--gpu-json`` (a stage-two result from a lent GPU) gives the consumption rate
a GPU run needs, and so the workers (each as fast as one here) it would take to keep up.

The cost of checked reads (every chunk's CRC-32s, dtypes and shapes checked against the index as it
is decoded) is measured side by side: the loader with and without the checks, in the main process,
alternating, ``--repeats`` times each, in tokens per CPU second of that process (robust to other
load on a shared machine); the cost is ``1 − median(checked) / median(unchecked)``. Since zarr's
own threads make even CPU time noisy, the share of a checked run's wall time spent inside the
checks is measured too (``ShardReader.check_seconds``).

    python bench/loader.py --step-json bench/results/stage_two_cpu.json --out bench/results/loader_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.store.contract import ShardReader, open_store
from pipeline.train.loader import Loader
from pipeline.train.teacher_signal import stored_teacher
from stages.prepare import PrepareConfig, prepare
from stages.teacher import TeacherConfig, run_teacher

STORES = {"topk64": ({"kind": "topk", "top_k": 64}, "offline-tail"),
          "sampled32": ({"kind": "sampled", "samples": 32}, "offline-sampled")}


def loader_rate(store, fields: tuple[str, ...], workers: int, epochs: int, check: bool = True,
                clock=time.perf_counter) -> float:
    """Tokens per second of the loader alone over ``epochs`` whole epochs, after one batch that
    starts the workers (a run pays that once); ``clock=time.process_time`` counts this process's
    CPU time instead of wall time (with no workers, all of the loader's work)."""
    batches = epochs * (store.rows // 16)
    loader = Loader(store, 16, seed=0, workers=workers, fields=fields, check=check)
    try:
        next(loader)
        started = clock()
        for _ in range(batches):
            batch = next(loader)
        seconds = clock() - started
    finally:
        loader.close()
    return batches * batch["input_ids"].numel() / seconds


def consumption(result_json: str | None, mode: str) -> float | None:
    """Tokens per second a training step of ``mode`` consumes in a stage-two result file."""
    if not result_json or not Path(result_json).exists():
        return None
    data = json.loads(Path(result_json).read_text())
    step = data["modes"].get(mode) or data["modes"].get("offline-tail")
    return data["micro_batch_size"] * data["seq_len"] / step["step_s_median"] if step else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="data/models/teacher")
    parser.add_argument("--corpus", default="data/corpus/heldout.jsonl.gz")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--step-json", default="bench/results/stage_two_cpu.json")
    parser.add_argument("--gpu-json", default="bench/results/stage_two_h200_realistic.json")
    parser.add_argument("--out", default="bench/results/loader_cpu.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="distill-bench-loader-"))
    prepare(load_config(PrepareConfig, inputs=(args.corpus,), out=str(work / "tokens"), seq_len=256))
    results = {}
    for name, (extra, mode) in STORES.items():
        run_teacher(load_config(TeacherConfig, tokens_store=str(work / "tokens"), max_rows=args.rows,
                                teacher=args.teacher, out=str(work / name), **extra))
        store = open_store(work / name)
        signal = stored_teacher(store.kind, store.params, 1.0)
        fields = ("input_ids", *signal.fields)
        rates = {}
        for workers in (int(w) for w in args.workers.split(",")):
            rates[workers] = statistics.median(loader_rate(store, fields, workers, args.epochs)
                                               for _ in range(args.repeats))
            print(f"{name}: {workers} workers, {rates[workers]:.0f} tokens/s", flush=True)
        # CPU time of the main process (no workers: all of the loader's work), so that other load on
        # a shared machine does not masquerade as the checks' cost
        paired = {True: [], False: []}
        for _ in range(args.repeats):
            for check in (False, True):
                paired[check].append(loader_rate(store, fields, 0, args.epochs, check, time.process_time))
        checked, unchecked = statistics.median(paired[True]), statistics.median(paired[False])
        # and directly: the share of a checked run's wall time spent inside the checks
        ShardReader.check_seconds = 0.0
        started = time.perf_counter()
        loader_rate(store, fields, 0, args.epochs, True)
        share = ShardReader.check_seconds / (time.perf_counter() - started)
        print(f"{name}: the checks take {share:.1%} of a checked run's time", flush=True)
        print(f"{name}: checked reads {checked:.0f} tokens per CPU second, unchecked {unchecked:.0f}: "
              f"cost {1 - checked / unchecked:.1%}", flush=True)
        cpu_need, gpu_need = consumption(args.step_json, mode), consumption(args.gpu_json, mode)
        one_worker = rates.get(1) or max(rates.values())
        results[name] = {
            "fields": list(fields),
            "loader_tokens_per_s": {str(w): r for w, r in rates.items()},
            "checked_reads": {"checked_tokens_per_cpu_s": checked, "unchecked_tokens_per_cpu_s": unchecked,
                              "cost": 1 - checked / unchecked, "share_of_time_in_checks": share},
            "cpu_step_tokens_per_s": cpu_need,
            "loader_over_cpu_step": {str(w): r / cpu_need for w, r in rates.items()} if cpu_need else None,
            "gpu_step_tokens_per_s": gpu_need,
            "gpu_workers_to_keep_up": math.ceil(gpu_need / one_worker) if gpu_need else None,
        }
    shutil.rmtree(work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": args.rows, "batch": [16, 256], "stores": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

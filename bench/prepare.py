"""Tokenization at scale (issue #31): `distill prepare` tokens/s and peak RSS.

For each tokenizer (the shipped 8k one and a 49k one), input kind (Parquet, .jsonl.zst) and number of
``--workers`` (1, 2), one ``distill prepare`` runs in a fresh process on the same documents (the
shipped training corpus, cut to ``--docs``); the parent polls the resident memory of that process and
of every process under it (the fork server and the workers) every 50 ms. Also measured:

- the fast tokenizer's own batch parallelism (``--workers 1`` with ``TOKENIZERS_PARALLELISM=true``,
  its Rayon pool using every core) against worker processes, each single-threaded: one worker, two
  workers and Rayon in turn, ``--repeats`` times, so that the three see the same load (medians);
- peak RSS at ``--scale`` times the input (the documents repeated): it should not grow with the file;
- the array path: ``--num-shards 2`` tasks one after the other, then ``distill merge``: what merge
  costs beside tokenizing (it re-tokenizes nothing), and that its store equals the one-process store
  (units of 2 MiB here, so that this small corpus has several).

The machine's load average is recorded beside every run: on a shared 2-core machine a second worker
only helps as far as a second core is free.

    python bench/prepare.py --tokenizers data/tokenizer,data/models/smollm2-135m --out bench/results/prepare_cpu.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One prepare (or merge) in this process; prints its seconds and the store's tokens as JSON."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config
    from stages.prepare import PrepareConfig, prepare
    from stages.merge import MergeConfig, merge

    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    if args.unit_bytes:  # the array runs: small units, so that the bench corpus has several
        from pipeline.text import units

        units.UNIT_BYTES = args.unit_bytes
    start, cpu_start = time.perf_counter(), cpu()
    if args.merge:
        merge(MergeConfig(store=args.out))
    else:
        prepare(load_config(PrepareConfig, None, inputs=(args.input,), out=args.out, tokenizer=args.tokenizer,
                            seq_len=256, workers=args.workers, shard_index=args.shard_index,
                            num_shards=args.num_shards))
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    index = Path(args.out) / "index.json"
    tokens = json.loads(index.read_text())["tokens"] if index.exists() else None
    print("RESULT " + json.dumps({"seconds": seconds, "tokens": tokens, "cpu_seconds_main_in_prepare": cpu_seconds}))


def sample_tree(pid: int, cpu: dict[int, float]) -> tuple[int, int]:
    """(RSS of ``pid``, RSS of ``pid`` and every descendant), bytes; each process's CPU seconds so far
    (user + system) recorded in ``cpu`` by pid."""
    import psutil

    try:
        main = psutil.Process(pid)
        procs = [main, *main.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total, own = 0, 0
    for p in procs:
        try:
            with p.oneshot():
                rss = p.memory_info().rss
                times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        cpu[p.pid] = max(cpu.get(p.pid, 0.0), times.user + times.system)
        total += rss
        own = rss if p.pid == pid else own
    return own, total


def run(extra: list[str], env: dict[str, str]) -> dict:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak_main = peak_tree = 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        own, total = sample_tree(proc.pid, cpu)
        peak_main, peak_tree = max(peak_main, own), max(peak_tree, total)
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({' '.join(extra)}):\n{err[-3000:]}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    workers_cpu = sum(cpu.values()) - cpu.get(proc.pid, 0.0)  # the fork server and workers (started by prepare)
    return {**result, "wall_seconds": time.perf_counter() - started,
            "cpu_seconds_main_in_prepare": round(result["cpu_seconds_main_in_prepare"], 2),
            "cpu_seconds_workers": round(workers_cpu, 2), "peak_rss_mib": round(peak_main / 2**20, 1),
            "peak_rss_tree_mib": round(peak_tree / 2**20, 1), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def write_inputs(work: Path, docs: list[str], scale: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = docs * scale
    paths = {"parquet": work / f"corpus-x{scale}.parquet", "jsonl.zst": work / f"corpus-x{scale}.jsonl.zst"}
    pq.write_table(pa.table({"text": texts}), paths["parquet"], row_group_size=500)
    with pa.output_stream(str(paths["jsonl.zst"]), compression="zstd") as f:
        for start in range(0, len(texts), 1000):
            f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[start:start + 1000]).encode())
    return paths


def store_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "config.json"):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--merge", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--shard-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--num-shards", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default="data/tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--unit-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of 1 worker / 2 workers / Rayon in turn")
    parser.add_argument("--tokenizers", default="data/tokenizer", help="comma-separated tokenizer directories")
    parser.add_argument("--corpus", default="data/corpus/train.jsonl.gz")
    parser.add_argument("--docs", type=int, default=4000, help="documents of the corpus to tokenize")
    parser.add_argument("--scale", type=int, default=4, help="the larger input: the documents this many times")
    parser.add_argument("--work", default="runs/bench-prepare")
    parser.add_argument("--out", default="bench/results/prepare_cpu.json")
    args = parser.parse_args()
    if args.child:
        return child(args)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(args.docs), f)]
    inputs = {1: write_inputs(work, docs, 1), args.scale: write_inputs(work, docs, args.scale)}
    tiny = work / "tiny"
    tiny.mkdir()
    inputs[0] = write_inputs(tiny, docs[:8], 1)  # what prepare costs before and after its loop
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    runs = []

    def measure(tokenizer: str, kind: str, workers: int, scale: int = 1, rayon: bool = False) -> dict:
        out = work / "store"
        shutil.rmtree(out, ignore_errors=True)
        path = inputs[scale][kind]
        result = run(["--input", str(path), "--out", str(out), "--tokenizer", tokenizer, "--workers", str(workers)],
                     {**env, "TOKENIZERS_PARALLELISM": "true" if rayon else "false"})
        entry = {"tokenizer": tokenizer, "input": kind, "workers": workers, "tokenizer_threads": rayon,
                 "scale": scale, "input_mib": round(path.stat().st_size / 2**20, 2), **result,
                 "tokens_per_s": round(result["tokens"] / result["seconds"])}
        if scale == 0:
            fixed[(tokenizer, workers, rayon)] = entry
            return entry
        # the loop alone: the same command's cost on 8 documents (tokenizer load, transformers import,
        # fingerprint, pool start, index) taken off
        base = fixed[(tokenizer, workers, rayon)]
        entry["fixed_seconds"] = round(base["seconds"], 2)
        entry["tokens_per_s_loop"] = round(result["tokens"] / max(result["seconds"] - base["seconds"], 1e-3))
        entry["cpu_seconds_main_loop"] = round(result["cpu_seconds_main_in_prepare"]
                                               - base["cpu_seconds_main_in_prepare"], 2)
        entry["cpu_seconds_workers_loop"] = round(result["cpu_seconds_workers"] - base["cpu_seconds_workers"], 2)
        runs.append(entry)
        print(f"{Path(tokenizer).name:>14} {kind:>9} x{scale} workers={workers}{' +rayon' if rayon else '':7} "
              f"{entry['tokens_per_s']:>9,} tok/s (loop {entry.get('tokens_per_s_loop', '-'):>9,}) peak RSS {entry['peak_rss_mib']:>6} MiB (tree "
              f"{entry['peak_rss_tree_mib']} MiB)  CPU s: main {entry['cpu_seconds_main_in_prepare']}, workers "
              f"{entry['cpu_seconds_workers']}  load {entry['load_before']}", flush=True)
        return entry

    tokenizers = args.tokenizers.split(",")
    fixed: dict[tuple, dict] = {}
    for tokenizer in tokenizers:
        for workers in (1, 2):
            measure(tokenizer, "parquet", workers, scale=0)
    measure(tokenizers[0], "parquet", 1, scale=0, rayon=True)
    for tokenizer in tokenizers:
        for kind in ("parquet", "jsonl.zst"):
            for workers in (1, 2):
                measure(tokenizer, kind, workers)
    for kind in ("parquet", "jsonl.zst"):
        measure(tokenizers[0], kind, 2, scale=args.scale)
    alternating = []
    for repeat in range(args.repeats):
        for workers, rayon in ((1, False), (2, False), (1, True)):
            alternating.append({**measure(tokenizers[0], "parquet", workers, rayon=rayon), "repeat": repeat})
            runs.pop()  # (kept apart from the table above)

    # the array path: 2 tasks, one after the other, then merge; the store must equal one process's
    one = work / "store"
    shutil.rmtree(one, ignore_errors=True)
    single = run(["--input", str(inputs[1]["parquet"]), "--out", str(one), "--tokenizer", tokenizers[0]], env)
    tasks, store = [], work / "tasks"
    for i in range(2):
        tasks.append(run(["--input", str(inputs[1]["parquet"]), "--out", str(store), "--tokenizer", tokenizers[0],
                          "--shard-index", str(i), "--num-shards", "2", "--unit-bytes", str(2 << 20)], env))
    merged = run(["--merge", "--out", str(store)], env)
    array = {"single_seconds": round(single["seconds"], 2), "task_seconds": [round(t["seconds"], 2) for t in tasks],
             "merge_seconds": round(merged["seconds"], 2), "merge_peak_rss_mib": merged["peak_rss_mib"],
             "merge_tokens_per_s": round(merged["tokens"] / merged["seconds"]),
             "identical_to_one_process": store_digest(store) == store_digest(one)}
    print(f"array: tasks {array['task_seconds']} s, merge {array['merge_seconds']} s "
          f"({array['merge_tokens_per_s']:,} tok/s), identical: {array['identical_to_one_process']}")

    def ratio(tokenizer: str, kind: str, key: str = "tokens_per_s") -> float:
        rate = {r["workers"]: r[key] for r in runs
                if r["tokenizer"] == tokenizer and r["input"] == kind and r["scale"] == 1 and not r["tokenizer_threads"]}
        return round(rate[2] / rate[1], 2)

    def bound(tokenizer: str, kind: str) -> float:
        """The speedup 2 workers would reach on 2 idle cores at the CPU seconds measured inside prepare():
        one worker's over max(the main process's, half of main's and the workers' together) with two,
        since main and both workers share the 2 cores. A bound from CPU time, not a timing."""
        by = {r["workers"]: r for r in runs
              if r["tokenizer"] == tokenizer and r["input"] == kind and r["scale"] == 1 and not r["tokenizer_threads"]}
        main, total = by[2]["cpu_seconds_main_loop"], by[2]["cpu_seconds_main_loop"] + by[2]["cpu_seconds_workers_loop"]
        return round(by[1]["cpu_seconds_main_loop"] / max(main, total / 2), 2)

    summary = {"speedup_2_workers": {f"{Path(t).name} {k}": ratio(t, k) for t in tokenizers
                                     for k in ("parquet", "jsonl.zst")},
               "speedup_2_workers_loop": {f"{Path(t).name} {k}": ratio(t, k, "tokens_per_s_loop") for t in tokenizers
                                          for k in ("parquet", "jsonl.zst")},
               "idle_2_core_bound_2_workers": {f"{Path(t).name} {k}": bound(t, k) for t in tokenizers
                                               for k in ("parquet", "jsonl.zst")}}
    def median(values: list[float]) -> float:
        values = sorted(values)
        return values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2

    modes = {"1 worker": (1, False), "2 workers": (2, False), "1 worker + Rayon": (1, True)}
    summary["alternating_median_tokens_per_s_loop"] = {
        name: round(median([r["tokens_per_s_loop"] for r in alternating if (r["workers"], r["tokenizer_threads"]) == m]))
        for name, m in modes.items()}
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "note": "shared 2-core machine: other engineers' tests and a long benchmark ran beside it; "
                            "load_before/load_after are 1-minute load averages"},
        "documents": len(docs), "scale": args.scale, "runs": runs, "alternating": alternating, "array": array,
        **summary,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()

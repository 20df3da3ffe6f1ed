"""Bytes per element of every stored array, measured: what ``distill plan`` sizes a store from.

Runs the shipped teacher (stage one, end to end) over ``--rows`` rows of ``--documents`` documents
drawn at random (seed 0) from the train split (every source of it, none of the held-out text the
tests size stores of), for top-k, sampled and hybrid stores across k, N and the temperature T, and records per array the
compressed bytes per element (zstd level 3 per chunk, as the writers store it, without the fixed
bytes of shards and chunks that ``distill plan`` measures for itself) and, for drawn stores, the
distinct ids per position. Drawn stores are written with per-id log-probs, so that array is
measured too (arrays are compressed one by one, so the others do not change without it).

    python bench/store_bytes.py --teacher data/models/teacher --rows 128 --out bench/results/store_bytes_cpu.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow
import torch
import zarr

from pipeline.config import load_config
from pipeline.models import count_parameters, load_model
from pipeline.store.contract import open_store
from stages.plan import compressed_bytes
from stages.prepare import PrepareConfig, prepare
from stages.teacher import TeacherConfig, run_teacher

STORES = ([{"kind": "topk", "top_k": k} for k in (1, 4, 8, 16, 32, 64, 128)]
          + [{"kind": "topk", "top_k": 64, "logprob_dtype": "float32"}]
          + [{"kind": "sampled", "samples": n, "sample_logprobs": True} for n in (8, 16, 24, 32, 50, 64, 100)]
          + [{"kind": "sampled", "samples": 32, "sample_logprobs": True, "logprob_dtype": "float32"}]
          + [{"kind": "topk", "top_k": k, "tail_samples": m, "sample_logprobs": True}
             for k, m in ((4, 24), (8, 48), (16, 32))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="data/models/teacher")
    parser.add_argument("--corpus", default="data/corpus/train.jsonl.gz")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--temperatures", default="1,2")
    parser.add_argument("--out", default="bench/results/store_bytes_cpu.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distill-bytes-"))
    try:
        with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
            documents = f.readlines()
        (work / "corpus.jsonl").write_text("".join(random.Random(0).sample(documents, args.documents)))
        prepare(load_config(PrepareConfig, inputs=(str(work / "corpus.jsonl"),), tokenizer=args.tokenizer,
                            seq_len=args.seq_len, out=str(work / "tokens")))
        tokens = open_store(work / "tokens")
        stores = []
        for temperature in map(float, args.temperatures.split(",")):
            for spec in STORES:
                out = work / "store"
                run_teacher(load_config(TeacherConfig, tokens_store=str(work / "tokens"), teacher=args.teacher,
                                        out=str(out), temperature=temperature, temperature_grid=(1.0, 2.0),
                                        max_rows=args.rows, rows_per_shard=args.rows, overwrite=True, **spec))
                store = open_store(out)
                measured = compressed_bytes(store)
                entry = {"kind": spec["kind"], "top_k": spec.get("top_k"), "samples": spec.get("samples"),
                         "tail_samples": spec.get("tail_samples", 0), "temperature": temperature,
                         "logprob_dtype": spec.get("logprob_dtype", "float16"),
                         "bytes_per_element": measured["bytes_per_element"],
                         "distinct_ids": measured["distinct_ids"],
                         "bytes_per_token_on_disk": store.index["bytes"] / measured["positions"]}
                stores.append(entry)
                print(json.dumps({k: v for k, v in entry.items() if k != "bytes_per_element"}), flush=True)
                shutil.rmtree(out)
        result = {"teacher": args.teacher,
                  "teacher_parameters": count_parameters(load_model(args.teacher)),
                  "corpus": f"{args.documents} documents of {args.corpus} drawn with seed 0", "rows": args.rows, "seq_len": args.seq_len,
                  "positions": args.rows * args.seq_len, "vocab_size": tokens.params["vocab_size"],
                  "temperature_grid": [1.0, 2.0], "codec": tokens.index["codec"],
                  "versions": {"torch": torch.__version__, "zarr": zarr.__version__, "pyarrow": pyarrow.__version__,
                               "numpy": np.__version__, "python": platform.python_version()},
                  "stores": stores}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

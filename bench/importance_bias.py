"""Bias of importance-weighted draws at another grid temperature, on the shipped teacher's real
distributions (``OMP_NUM_THREADS=1 PYTHONPATH=. python bench/importance_bias.py``).

A sampled store holds N draws per position at the cache temperature T₀; stage two at a grid
temperature T ≠ T₀ weights them by ``p_T/p_T₀`` (:class:`pipeline.train.teacher_signal.StoredSampled`,
exactly as it reads a store, log-probs stored as float16). Here the shipped teacher runs over
held-out rows, each position is drawn ``--repeats`` times with independent seeds (the store's own
sampler and keys), and the weight of each position's most likely id is averaged and compared with
the dense float64 ``p_T`` of that id: the bias of one weight, ``E[w] − p_T``, pooled over all
positions, with its z (the bias over its standard error, from the spread of the weights over
positions and draws). ``unbiased`` weights are the control (``E[w] = p_T`` exactly, so their z is
chance); ``self-normalised`` weights (divided by their sum per position) are biased.

Prints one line per (N, importance) and writes ``bench/results/importance_bias_cpu.json``.
"""

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

from pipeline.models import load_model
from pipeline.teacher.sampling import position_keys, sample_teacher
from pipeline.teacher.topk import sparse_teacher
from pipeline.text.tokenizer import load_tokenizer
from pipeline.train.teacher_signal import StoredSampled

ROOT = Path(__file__).resolve().parents[1]


def teacher_logits(rows: int, length: int) -> torch.Tensor:
    """float32 ``[rows, length, V]``: the shipped teacher on consecutive held-out text."""
    with gzip.open(ROOT / "data" / "corpus" / "heldout.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(80), f)]
    ids = load_tokenizer(ROOT / "data" / "tokenizer").encode(" ".join(docs))[:rows * length]
    teacher = load_model(ROOT / "data" / "models" / "teacher").eval()
    with torch.no_grad():
        return teacher(input_ids=torch.tensor(ids).reshape(rows, length)).logits.float()


def measure(logits: torch.Tensor, samples: int, repeats: int, cache_temperature: float, temperature: float) -> dict:
    rows, length, vocab = logits.shape
    grid = tuple(sorted({cache_temperature, temperature}))
    z = logits.reshape(-1, vocab)
    summary = sparse_teacher(z, 1, cache_temperature, grid)
    # what sampled_logprobs stores at each drawn id (float64 log-sum-exp), computed once for all ids
    logprobs_at_cache = (z.double() / cache_temperature - torch.logsumexp(z.double() / cache_temperature, -1,
                                                                          keepdim=True)).float()
    params = {"temperature": cache_temperature, "temperature_grid": list(grid), "samples": samples,
              "sample_logprobs": True}
    signals = {name: StoredSampled("sampled", params, temperature, importance=name)
               for name in StoredSampled.IMPORTANCE}
    positions = rows * (length - 1)  # the last position of a row has no next token: positions() drops it
    p = torch.softmax(logits[:, :-1].reshape(-1, vocab).double() / temperature, -1)
    top = p.argmax(-1, keepdim=True)  # each position's most likely id at T
    top_weights = {name: torch.zeros(repeats, positions, dtype=torch.float64) for name in signals}
    for seed in range(repeats):
        keys = position_keys(seed, torch.arange(rows), length).reshape(-1)
        drawn = sample_teacher(z, samples, cache_temperature, keys)
        batch = {"sample_ids": drawn["sample_ids"], "sample_counts": drawn["sample_counts"],
                 "sample_logprobs": logprobs_at_cache.gather(-1, drawn["sample_ids"]).masked_fill_(
                     drawn["sample_counts"] == 0, 0.0).half(),  # as sampled_logprobs writes them, float16
                 "logsumexp": summary["logsumexp"]}
        batch = {k: v.reshape(rows, length, *v.shape[1:]) for k, v in batch.items()}
        for name, signal in signals.items():
            ids, weights = signal.positions(None, batch)
            top_weights[name][seed] = torch.where(ids == top, weights.double(), 0.0).sum(-1)
    out = {}
    for name, w in top_weights.items():
        bias = w.mean(0) - p.gather(-1, top)[:, 0]  # [positions]
        # the pooled mean's error: positions independent, draws independent within each
        error = (w.var(0) / repeats).sum().sqrt() / positions
        out[name] = {"top_id_mean_bias": float(bias.mean()), "top_id_z": float(bias.mean() / error),
                     "top_id_mean_p": float(p.gather(-1, top).mean()),
                     "top_id_max_abs_bias_one_position": float(bias.abs().max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="8,32,128", help="draws per position N, comma-separated")
    parser.add_argument("--repeats", type=int, default=1000, help="independent draws of every position")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--cache-temperature", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "importance_bias_cpu.json"))
    args = parser.parse_args()
    started = time.time()
    logits = teacher_logits(args.rows, args.length)
    results = []
    for n in (int(s) for s in args.samples.split(",")):
        measured = measure(logits, n, args.repeats, args.cache_temperature, args.temperature)
        for name, m in measured.items():
            results.append({"samples": n, "importance": name, **m})
            print(f"N={n:4d} {name:16s} most likely id (mean p_T {m['top_id_mean_p']:.3f}): E[w] - p_T "
                  f"{m['top_id_mean_bias']:+.2e} (z {m['top_id_z']:+.1f}; N x bias {n * m['top_id_mean_bias']:+.3f}; "
                  f"largest at one position {m['top_id_max_abs_bias_one_position']:.2e})", flush=True)
    setup = {"teacher": "data/models/teacher", "positions": args.rows * (args.length - 1), "repeats": args.repeats,
             "cache_temperature": args.cache_temperature, "temperature": args.temperature,
             "logprob_dtype": "float16", "seconds": round(time.time() - started)}
    Path(args.out).write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    print(f"{args.out} ({setup['seconds']} s)")


if __name__ == "__main__":
    main()

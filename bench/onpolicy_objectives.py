"""One on-policy round on tiny random models, each objective of stage two against the exact reverse KL
(``OMP_NUM_THREADS=1 PYTHONPATH=. python bench/onpolicy_objectives.py``, about a minute on CPU).

A sanity measurement, not the issue's benchmark (``make bench-onpolicy``, #25 part 3): a random Llama
with a mildly peaked head (the student) writes 8 prompts × 16 completions of 24 tokens (``distill
generate`` at T = 1, recording its log-prob of each token), ``prepare --format ids`` stores them, a
second random model (the teacher) scores them into a ``target`` store and a top-64 store, and stage
two trains a copy of the student with each objective (α = 0, lr 3e-3, 16 rows a step) for one pass
over the samples (8 steps) and for five (40). The measure is the exact full-vocabulary KL(student ‖
teacher) per token, float64, averaged over the round's scored positions (the prefixes the sampler
wrote), before and after; beside it the policy gradient's last metrics line.

Prints one line per (steps, objective) and writes ``bench/results/onpolicy_objectives_cpu.json``.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from pipeline.store.contract import open_store
from stages.cli import app

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer"

PROMPTS = ["The Lord said unto Moses", "In the beginning", "Once upon a time", "It is a truth", "He said",
           "A hacker is", "The city", "We"]
OBJECTIVES = {"policy-gradient clip": ("target", ("--objective", "policy-gradient", "--ratio", "clip")),
              "policy-gradient gate": ("target", ("--objective", "policy-gradient", "--ratio", "gate")),
              "reverse-kl": ("topk", ("--objective", "reverse-kl")),
              "forward-kl": ("topk", ("--objective", "forward-kl"))}


def ok(*args) -> None:
    """``distill ARGS`` in this process; its output where it fails."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise SystemExit(result.output)


def random_llama(path: Path, scale: float) -> Path:
    """A random 2-layer Llama at the project's vocabulary whose output head is scaled by ``scale``
    (peaked distributions, as a trained model's), saved with its weights (as tests/conftest.py's
    make_teacher, seeded alike)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(str(path))
    return path


def round_data(root: Path) -> None:
    """The student, the teacher, the student's completions and the teacher's two stores of them."""
    random_llama(root / "student", scale=4.0)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_pretrained(str(random_llama(root / "teacher", scale=8.0)))
    with torch.no_grad():  # another model than the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.save_pretrained(str(root / "teacher"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    ok("generate", "--model", root / "student", "--tokenizer", TOKENIZER, "--prompts", root / "prompts.txt", "--out",
       root / "gen", "--samples-per-prompt", "16", "--max-new-tokens", "24", "--temperature", "1.0")
    rows = ("--rows-per-shard", "64", "--chunk-rows", "8")
    ok("prepare", "--input", root / "gen" / "generated.jsonl", "--format", "ids", "--tokenizer", TOKENIZER,
       "--seq-len", "40", "--out", root / "tokens", *rows)
    for kind, flags in (("target", ()), ("topk", ("--top-k", "64"))):
        ok("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out", root / kind,
           "--kind", kind, *rows, *flags)


def reverse_kl(root: Path, model_dir: Path) -> float:
    """Mean exact KL(student ‖ teacher) per scored position of the round, nats."""
    data = open_store(root / "target").read_rows(0, open_store(root / "target").rows)
    ids = torch.from_numpy(data["input_ids"].astype(np.int64))
    scored = torch.from_numpy(data["loss_mask"][:, :-1] > 0)
    student = AutoModelForCausalLM.from_pretrained(str(model_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher"))
    with torch.no_grad():
        q = torch.log_softmax(student(input_ids=ids).logits[:, :-1].double(), -1)
        p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].double(), -1)
    return float((q.exp() * (q - p)).sum(-1)[scored].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/onpolicy_objectives_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        round_data(root)
        before = reverse_kl(root, root / "student")
        print(f"before: reverse KL {before:.4f} nats/token")
        results = []
        for steps in (8, 40):
            for name, (store, flags) in OBJECTIVES.items():
                out = root / f"{name.replace(' ', '-')}-{steps}"
                ok("student", "--train-store", root / store, "--model", root / "student", "--out", out,
                   "--max-steps", str(steps), "--micro-batch-size", "16", "--device", "cpu", "--log-every",
                   str(steps), "--warmup-steps", "0", "--lr", "3e-3", "--alpha", "0", *flags)
                last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
                pg = {k: v for k, v in last.items() if k.startswith("pg_")}
                after = reverse_kl(root, out / "model")
                results.append({"steps": steps, "objective": name, "reverse_kl": after, **pg})
                print(f"{steps} steps, {name}: reverse KL {after:.4f}", " ".join(f"{k} {v:.3f}" for k, v in pg.items()))
    Path(args.out).write_text(json.dumps({"reverse_kl_before": before, "runs": results,
                                          "seconds": round(time.time() - started, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    main()

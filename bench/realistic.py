"""Stage one and stage two at a realistic size, for a lent GPU: a teacher of ~135M parameters and a
student of ~23M at a 32k vocabulary, built from configs (random weights: speed, not quality).

The shipped 6.8M teacher costs almost nothing on a GPU, so its benchmarks there measure host
overhead; this one gives the ratios a user would see. It trains a 32k BPE tokenizer on the
training corpus, writes the models, then runs ``bench/stage_one.py`` (stage one ÷ bare forward,
bytes per token) and ``bench/stage_two.py`` (offline ÷ CE, offline ÷ online) with them.

    python bench/realistic.py --device cuda --out-dir bench/results
    python bench/realistic.py --tiny --device cpu      # every step, at toy sizes (a dry run)
    # stage one alone, torch against the fused kernels (bench/gpu_session.sh):
    python bench/realistic.py --device cuda --stage-one-only --kernels torch,native,native+overlap \
        --stores topk64,sampled32 --dtype bfloat16 --suffix h200_fused
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], env=env, cwd=ROOT, check=True, timeout=timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to check every step on a CPU")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--stage-one-rows", type=int, default=512)
    parser.add_argument("--stage-two-steps", type=int, default=40)
    parser.add_argument("--work", default="")
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--suffix", default="gpu_realistic")
    parser.add_argument("--stage-one-only", action="store_true", help="skip stage two")
    parser.add_argument("--kernels", default="", help="bench/stage_one.py --kernels (default: its own)")
    parser.add_argument("--stores", default="topk64,sampled50,hybrid-k8-m48")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="the teacher's dtype in stage one")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-realistic-"))
    work.mkdir(parents=True, exist_ok=True)
    vocab = 2048 if args.tiny else args.vocab
    tokenizer = work / f"tokenizer-{vocab}"
    if not (tokenizer / "tokenizer.json").exists():
        run("-m", "stages.cli", "tokenizer", "--input", "data/corpus/train.jsonl.gz", "--vocab-size", str(vocab),
            "--out", str(tokenizer), timeout=600)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer)))  # what BPE reached: the models match it exactly
    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if args.tiny
            else dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12))
    teacher_config = AutoConfig.for_model("llama", vocab_size=vocab, max_position_embeddings=512,
                                          num_key_value_heads=size["num_attention_heads"],
                                          tie_word_embeddings=False, **size)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(teacher_config)
    with torch.no_grad():  # a trained LM's spread of logits, not a random model's near-uniform one
        teacher.lm_head.weight.mul_(8.0)
    teacher_dir = work / "teacher"
    teacher.save_pretrained(str(teacher_dir))
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(teacher_dir))
    n_teacher = sum(p.numel() for p in teacher.parameters())
    student = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2) if args.tiny
               else dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6))
    student_json = work / "student.json"
    student_json.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab, "max_position_embeddings": 512,
                                        "num_key_value_heads": student["num_attention_heads"],
                                        "tie_word_embeddings": True, **student}))
    n_student = sum(p.numel() for p in AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**json.loads(student_json.read_text()))).parameters())
    print(f"teacher {n_teacher / 1e6:.1f}M parameters, student {n_student / 1e6:.1f}M, vocabulary {vocab}", flush=True)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = 32 if args.tiny else args.stage_one_rows
    run("bench/stage_one.py", "--teacher", str(teacher_dir), "--tokenizer", str(tokenizer), "--device", args.device,
        "--rows", str(rows), "--rows-per-shard", str(min(rows, 128)), "--size-rows", "16" if args.tiny else "0",
        "--batch-size", "8" if args.tiny else "32", "--repeats", str(args.repeats), "--stores", args.stores,
        "--dtype", args.dtype, *(["--kernels", args.kernels] if args.kernels else []),
        "--out", str(out / f"stage_one_{args.suffix}.json"), timeout=900)
    if args.stage_one_only:
        _annotate(out, ["stage_one"], args.suffix, n_teacher, n_student, vocab)
        return
    steps = 3 if args.tiny else args.stage_two_steps
    run("bench/stage_two.py", "--teacher", str(teacher_dir), "--student", str(student_json), "--tokenizer",
        str(tokenizer), "--device", args.device, "--steps", str(steps), "--micro-batch-size", "4" if args.tiny else "16",
        "--modes", "ce,offline-tail,offline-sampled,offline-hybrid,online", "--work", str(work / "b2"),
        "--train-corpus", "data/corpus/heldout.jsonl.gz",  # speed only: the smaller corpus prepares faster
        "--out", str(out / f"stage_two_{args.suffix}.json"), timeout=900)
    _annotate(out, ["stage_one", "stage_two"], args.suffix, n_teacher, n_student, vocab)


def _annotate(out: Path, names: list[str], suffix: str, n_teacher: int, n_student: int, vocab: int) -> None:
    for name in names:
        data = json.loads((out / f"{name}_{suffix}.json").read_text())
        data |= {"teacher_parameters": n_teacher, "student_parameters": n_student, "vocab_size": vocab}
        (out / f"{name}_{suffix}.json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The temperature study (the paper's §5, Figures 4–5): students at every T and every α from ONE teacher pass.

    python scripts/sweep.py --run runs/sweep --temperatures 1 1.5 2 3 4 --alphas 0.1 0.5 0.9 \
        --seeds 0 --ce-seeds 0 1 2 --steps 60 --rows 512            # or: make sweep

Stage one runs once, as a ``topk`` store whose temperature grid holds every T of the sweep: its
kept log-probabilities re-temper exactly and its tail mass is stored per grid T, so every student
sees the teacher's true distribution at its T. (A ``sampled`` store would reweight draws made at
one T, whose importance weights grow without bound as T moves away from it: tokens that matter at
T = 4 are rarely drawn at T = 1.) Then: a distilled student at every T (α fixed), one at every α
(T fixed), the CE-only student, each over the seeds given; every model and the teacher evaluated;
``distill report`` over all of them draws metric-vs-T and metric-vs-α.

Resumable: stores that exist are kept (stage 0/one say "nothing to do"), students resume with
``--resume auto`` (a finished one is skipped), an eval JSON newer than its model is not redone.
Rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


DRY_RUN = False


def run(args: list[str]) -> None:
    print("+ " + " ".join(args), flush=True)
    if not DRY_RUN:
        subprocess.run(args, check=True)


def fmt(x: float) -> str:
    return f"{x:g}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/sweep", help="Output directory of everything.")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1, 1.5, 2, 3, 4], help="The T curve (α fixed).")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="The α curve (T fixed).")
    p.add_argument("--fixed-alpha", type=float, default=0.5, help="α of the T curve.")
    p.add_argument("--fixed-temperature", type=float, default=2.0, help="T of the α curve (one of --temperatures).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds of the distilled students.")
    p.add_argument("--ce-seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the CE-only student.")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rows", type=int, default=512, help="Training rows (stage one's --max-rows).")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--corpus", default="data/corpus/train.jsonl.gz")
    p.add_argument("--heldout", default="data/corpus/heldout.jsonl.gz")
    p.add_argument("--tokenizer", default="data/tokenizer")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--teacher", default="data/models/teacher")
    p.add_argument("--student-model", default="data/models/student.json")
    p.add_argument("--tasks", default="heldout,lambada,hellaswag,storycloze,agreement")
    p.add_argument("--eval-limit", type=int, default=100)
    p.add_argument("--train-args", default="--warmup-steps 6", help="Extra `distill student` flags (one string).")
    p.add_argument("--eval-args", default="", help="Extra `distill eval` flags (one string).")
    p.add_argument("--report-args", default="", help="Extra `distill report` flags (one string).")
    p.add_argument("--dry-run", action="store_true", help="Print the commands, run none.")
    a = p.parse_args()
    global DRY_RUN
    DRY_RUN = a.dry_run
    if a.fixed_temperature not in a.temperatures:
        p.error(f"--fixed-temperature {a.fixed_temperature:g} must be one of --temperatures (the store's grid)")

    distill = str(BIN / "distill")
    out = Path(a.run)
    started = time.time()
    tokens, heldout_tokens = out / "tokens/train", out / "tokens/heldout"
    store, agreement = out / "store-topk", out / "topk-heldout"
    common = ["--tokenizer", a.tokenizer, "--seq-len", str(a.seq_len)]
    run([distill, "prepare", "--input", a.corpus, "--out", str(tokens), *common])
    run([distill, "prepare", "--input", a.heldout, "--out", str(heldout_tokens), *common])
    grid = [x for t in sorted(set(a.temperatures)) for x in ("--temperature-grid", fmt(t))]
    run([distill, "teacher", "--tokens-store", str(tokens), "--teacher", a.teacher, "--out", str(store),
         "--kind", "topk", "--top-k", str(a.top_k), "--temperature", "1", *grid, "--max-rows", str(a.rows)])
    if "agreement" in a.tasks.split(","):
        run([distill, "teacher", "--tokens-store", str(heldout_tokens), "--teacher", a.teacher, "--out", str(agreement),
             "--kind", "topk", "--top-k", str(a.top_k), "--max-rows", "128"])

    # (name, alpha, T, seed), most wanted first so that a sweep cut short still says something: the CE-only
    # reference, a coarse T curve (its ends and middle), a second CE seed (a spread), the rest of the T curve,
    # the other CE seeds, the α curve, then further seeds
    ts = sorted(set(a.temperatures))
    coarse = list(dict.fromkeys([ts[0], ts[-1], ts[len(ts) // 2]]))
    t_order = coarse + [t for t in ts if t not in coarse]

    def t_curve(s: int, temps: list[float]) -> list[tuple[str, float, float, int]]:
        return [(f"kd-T{fmt(t)}-a{fmt(a.fixed_alpha)}-s{s}", a.fixed_alpha, t, s) for t in temps]

    def alpha_curve(s: int) -> list[tuple[str, float, float, int]]:
        return [(f"kd-T{fmt(a.fixed_temperature)}-a{fmt(al)}-s{s}", al, a.fixed_temperature, s)
                for al in a.alphas if al != a.fixed_alpha]

    ce = [(f"ce-s{s}", 1.0, 1.0, s) for s in a.ce_seeds]
    first = a.seeds[0]
    students = (ce[:1] + t_curve(first, coarse) + ce[1:2] + t_curve(first, t_order[len(coarse):]) + ce[2:]
                + alpha_curve(first))
    students += [x for s in a.seeds[1:] for x in t_curve(s, t_order) + alpha_curve(s)]

    eval_common = ["--tasks", a.tasks, "--limit", str(a.eval_limit), *a.eval_args.split()]
    if "agreement" in a.tasks.split(","):
        eval_common += ["--agreement", str(agreement)]

    def evaluate(model: Path, name: str) -> None:
        result = out / "eval" / f"{name}.json"
        if result.is_file() and result.stat().st_mtime >= (model / "config.json").stat().st_mtime:
            print(f"{result}: already evaluated; skipped", flush=True)
            return
        run([distill, "eval", "--model", str(model), "--name", name, "--out", str(result), *eval_common])

    evaluate(Path(a.teacher), "teacher")
    for name, alpha, t, seed in students:
        student_out = out / "students" / name
        run([distill, "student", "--train-store", str(store), "--eval-store", str(heldout_tokens),
             "--model", a.student_model, "--alpha", fmt(alpha), "--temperature", fmt(t), "--tail", "tail",
             "--seed", str(seed), "--out", str(student_out), "--max-steps", str(a.steps), "--resume", "auto",
             "--eval-every", str(a.steps), "--checkpoint-every", str(max(1, a.steps // 2)), *a.train_args.split()])
        evaluate(student_out / "model", name)
        print(f"sweep: {name} done at {time.time() - started:.0f} s", flush=True)
    run([distill, "report", str(out / "eval"), "--out", str(out / "report"), *a.report_args.split()])
    print(f"sweep: {len(students)} students in {time.time() - started:.0f} s; report in {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""On-policy against off-policy distillation at equal teacher tokens (issue #25, `make bench-onpolicy`).

Every arm starts from the same student (pretrained with CE on the corpus) and runs R rounds of
`distill rounds` with the same prompts per round, completion budget, steps and learning rate; arms
differ only in who writes the text and what the student learns from it:

- ``ce``: the teacher writes (λ = 0), the student learns its completions by cross-entropy;
- ``offpolicy-fkl``: the teacher writes (λ = 0), forward KL from a sampled store of the teacher's
  predictions on that text (the paper's FD step, here with α = 0: KD alone, as in every arm but ce);
- ``onpolicy-fkl`` / ``onpolicy-rkl`` / ``onpolicy-pg``: the student writes (λ = 1), forward KL,
  reverse KL (top-k + tail store) or the policy gradient (the teacher's log-prob of each sampled
  token only);
- ``mix-rkl``: λ = 0.5, reverse KL (GKD's mixture).

After every round the student writes completions for the same held-out prompts with the same keys, the
teacher scores them, and the per-token reverse KL to the teacher is estimated from them; held-out
perplexity comes from `distill eval --tasks heldout`. The summary gives, per arm and round, the mean
and sample standard deviation over seeds of both, and the teacher tokens spent so far: scored by stage
one (what the issue's "equal teacher-scored tokens" counts) and scored + written.

    python bench/onpolicy.py --student runs/onpolicy/student-start/model --out bench/results/onpolicy_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {
    "ce": {"objective": "ce", "student_fraction": 0.0},
    "offpolicy-fkl": {"objective": "forward-kl", "student_fraction": 0.0},
    "onpolicy-fkl": {"objective": "forward-kl", "student_fraction": 1.0},
    "onpolicy-rkl": {"objective": "reverse-kl", "student_fraction": 1.0},
    "onpolicy-pg": {"objective": "policy-gradient", "student_fraction": 1.0},
    "mix-rkl": {"objective": "reverse-kl", "student_fraction": 0.5},
}


def run_arm(arm: str, seed: int, args, work: Path) -> list[dict]:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pipeline.config import load_config
    from stages.rounds import RoundsConfig, run_rounds

    config = load_config(RoundsConfig, args.config, student=args.student, teacher=args.teacher,
                         out=str(work / f"{arm}-s{seed}"), seed=seed, rounds=args.rounds,
                         prompts_per_round=args.prompts_per_round, steps_per_round=args.steps_per_round,
                         lr=args.lr, warmup_steps=args.warmup_steps, eval_limit=args.eval_limit, device=args.device,
                         threads=1 if args.jobs > 1 else 0, **ARMS[arm])
    return run_rounds(config)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: dict[str, dict[int, list[dict]]]) -> dict:
    summary = {}
    for arm, by_seed in runs.items():
        rounds = min(len(r) for r in by_seed.values())
        per_round = []
        for r in range(rounds):
            rows = [by_seed[s][r] for s in sorted(by_seed)]
            entry = {"round": r, "reverse_kl": spread([x["reverse_kl_per_token"] for x in rows]),
                     "teacher_scored_total": spread([x["teacher_scored_total"] for x in rows]),
                     "teacher_tokens_total": spread([x["teacher_tokens_total"] for x in rows])}
            ppl = [x.get("tasks", {}).get("heldout", {}).get("ppl") for x in rows]
            if all(p is not None for p in ppl):
                entry["heldout_perplexity"] = spread(ppl)
            per_round.append(entry)
        summary[arm] = per_round
    return summary


def x_of(arm: str) -> str:
    """The teacher tokens an arm is compared at: those stage one scored, or, for ce (which has stage
    one score nothing), those the teacher wrote."""
    return "teacher_tokens_total" if arm == "ce" else "teacher_scored_total"


def interpolate(rows: list[dict], arm: str, x: float) -> float:
    """A seed's held-out reverse KL at ``x`` teacher tokens, linear between its rounds."""
    xs = [r[x_of(arm)] for r in rows]
    ys = [r["reverse_kl_per_token"] for r in rows]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f"{x} outside {xs[0]}..{xs[-1]}")


def verdict(runs: dict[str, dict[int, list[dict]]]) -> list[str]:
    """Each arm against off-policy KD at equal teacher tokens: every seed's curve interpolated at the
    largest token count both arms reached in every seed; the difference of seed means, and whether it
    is beyond the spread (mean ± sd ranges that do not overlap)."""
    lines = []
    ref = runs.get("offpolicy-fkl")
    if not ref:
        return lines
    for arm, by_seed in runs.items():
        if arm == "offpolicy-fkl":
            continue
        x = min(min(rows[-1][x_of(arm)] for rows in by_seed.values()),
                min(rows[-1]["teacher_scored_total"] for rows in ref.values()))
        if x <= 0:
            continue
        mine = spread([interpolate(rows, arm, x) for rows in by_seed.values()])
        base = spread([interpolate(rows, "offpolicy-fkl", x) for rows in ref.values()])
        if mine["mean"] + mine["std"] < base["mean"] - base["std"]:
            word = "lower, beyond the seed spread"
        elif mine["mean"] - mine["std"] > base["mean"] + base["std"]:
            word = "higher, beyond the seed spread"
        else:
            word = "within the seed spread"
        lines.append(f"{arm}: reverse KL {mine['mean']:.4f} ± {mine['std']:.4f} vs off-policy "
                     f"{base['mean']:.4f} ± {base['std']:.4f} at {x:,.0f} teacher tokens ({word})")
    return lines


def figure(summary: dict, path: Path) -> None:
    from stages.report import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for arm, per_round in summary.items():
        x = [e[x_of(arm)]["mean"] / 1e3 for e in per_round]
        for ax, key in zip(axes, ("reverse_kl", "heldout_perplexity")):
            if all(key in e for e in per_round):
                y = [e[key]["mean"] for e in per_round]
                err = [e[key]["std"] for e in per_round]
                style = "--" if arm in ("ce", "offpolicy-fkl") else "-"
                ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, linestyle=style, label=arm)
    axes[0].set_ylabel("held-out reverse KL to the teacher (nats/token)")
    axes[1].set_ylabel("held-out perplexity")
    for ax in axes:
        ax.set_xlabel("teacher tokens (thousands)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("on-policy vs off-policy distillation (mean ± sd over seeds); teacher tokens: scored by stage "
                 "one (ce: written by the teacher)", fontsize=8)
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "data" / "configs" / "rounds.yaml"))
    parser.add_argument("--student", required=True, help="the starting student (HF directory with weights)")
    parser.add_argument("--teacher", default="data/models/teacher")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts-per-round", type=int, default=256)
    parser.add_argument("--steps-per-round", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=32, help="held-out documents for perplexity")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (2 on a 2-core machine)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default="runs/bench-onpolicy")
    parser.add_argument("--out", default="bench/results/onpolicy_cpu.json")
    parser.add_argument("--figure", default="docs/img/onpolicy_cpu.png")
    args = parser.parse_args()
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {', '.join(unknown)}; known: {', '.join(ARMS)}")
    work = Path(args.work)
    started = time.time()
    runs: dict[str, dict[int, list[dict]]] = {}
    tasks = [(arm, seed) for seed in seeds for arm in arms]  # seed-major: a partial run has every arm at seed 0
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            results = pool.starmap(run_arm, [(arm, seed, args, work) for arm, seed in tasks], chunksize=1)
    else:
        results = [run_arm(arm, seed, args, work) for arm, seed in tasks]
    for (arm, seed), result in zip(tasks, results):
        runs.setdefault(arm, {})[seed] = result
    summary = summarise(runs)
    result = {"settings": {k: v for k, v in vars(args).items()}, "arms": {a: ARMS[a] for a in arms},
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "seconds": round(time.time() - started), "summary": summary, "verdict": verdict(runs),
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    figure(summary, Path(args.figure))
    print("\n".join(result["verdict"]))


if __name__ == "__main__":
    main()

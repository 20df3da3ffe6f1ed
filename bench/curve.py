"""Learning curves on the real teacher (issue #34): what distillation buys over longer training, and how
many training tokens it saves.

One teacher (SmolLM2-135M, ``make real-teacher``), one sampled store (``--samples`` draws per position,
T = 1, re-tempering grid 1 and 2) over ``--rows`` rows of the shipped corpus, and two students trained
from it for ``--steps`` steps, each as CE only (α = 1) and distilled (α = ``--alpha``, T = 1), over
``--seeds``:

- ``same-ce`` / ``same-kd``: ``data/models/student-smollm2.json``, the teacher's tokenizer;
- ``cross-ce`` / ``cross-kd``: ``data/models/student.json`` with the project's tokenizer
  (``data/tokenizer``, 8192 ids), the store's rows retokenized, ``--cross-tokenizer both`` with the
  defaults after issue #30 (``--unmapped first --cross-positions starts``); its CE twin goes through
  ``--cross-tokenizer exact`` with α = 1 only to be given the same rows;
- at seed 0 only, beside them: ``same-kd-t2`` (T = 2, re-tempered from the store's grid) and
  ``same-kd-a0`` (α = 0: the teacher signal alone), the paper's temperature question on a real teacher.

Every run of a seed reads the same store rows in the same order (the order is the seed's), and every
run is scored on the same held-out text — the first ``--heldout-docs`` documents of the corpus's
held-out split, packed by each student's own tokenizer — in **bits per byte** (next-token loss over the
UTF-8 bytes its targets spell), from an evaluation store inside the run every ``--eval-every`` steps
(``distill student --eval-store``), not by a separate process. The teacher's bits per byte on the same
held-out rows is the line the students approach.

The summary gives, per arm and evaluated step, the seed mean and standard deviation; per pair
(distilled against its CE twin) the difference at each step with its seed spread (the runs of one seed
share initialisation and batch order, so differences are paired); and **tokens-to-target**: the
training tokens at which the distilled arm's mean curve first reaches the CE arm's final mean bits per
byte (linear between evaluations), as a share of the CE arm's tokens, and its inverse, the speed-up,
with a percentile interval from resampling seeds (``--bootstrap`` draws, each arm resampled with
replacement). Training tokens are the store rows read times their length: the teacher tokenizer's count of
the text read, the same text for both students.

The learning rate warms up for 10% of the steps and decays (cosine) to ``--min-lr-ratio`` at the last
step, so a point in the middle of a curve is a model still at a high learning rate: tokens-to-target
read off one curve is conservative against a run scheduled to stop there.

    python bench/curve.py --out bench/results/curve_cpu.json --figure docs/img/curve_cpu.png   # make bench-curve
    python bench/curve.py --report bench/results/curve_cpu.json --figure docs/img/curve_cpu.png
    python bench/curve.py --scale gpu ...    # a 30-60M student, ~20M tokens, bf16 (bench/gpu_session.sh)
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"same-kd": "same-ce", "cross-kd": "cross-ce"}
SEEDED = ("same-ce", "same-kd", "cross-ce", "cross-kd")  # the arms every seed runs
EXTRA = ("same-kd-t2", "same-kd-a0")  # seed 0 only
# --scale gpu: a 50M-parameter Llama at the teacher's vocabulary (25M of it the tied embedding)
GPU_STUDENT = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 512, "intermediate_size": 1376,
               "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
               "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


# what a --resume'd result must share with this run for its curves to stand beside the new ones
RESUME_SAME = ("scale", "teacher", "student", "cross_student", "cross_tokenizer", "corpus", "heldout", "heldout_docs",
               "store_rows", "seq_len", "steps", "micro_batch_size", "eval_every", "lr", "min_lr_ratio", "alpha",
               "samples", "dtype", "cross_uncovered")


def settings(args) -> dict:
    return {"scale": args.scale, "teacher": args.teacher,
            "student": "GPU_STUDENT" if args.scale == "gpu" else args.student, "cross_student": args.cross_student,
            "cross_tokenizer": args.cross_tokenizer, "corpus": args.corpus, "heldout": args.heldout,
            "heldout_docs": args.heldout_docs, "store_rows": args.rows, "seq_len": args.seq_len, "steps": args.steps,
            "micro_batch_size": args.micro_batch_size, "eval_every": args.eval_every, "lr": args.lr,
            "min_lr_ratio": args.min_lr_ratio, "alpha": args.alpha, "samples": args.samples, "dtype": args.dtype,
            "cross_uncovered": args.cross_uncovered}


def resumed(args, out_file: Path) -> tuple[dict, dict, float]:
    """The finished runs, their train seconds and the wall time of an earlier result at ``out_file``, checked
    (before any work) to have been run with this run's settings; nothing if there is no such file."""
    if not out_file.exists():
        return {}, {}, 0.0
    before = json.loads(out_file.read_text())
    differs = [k for k in RESUME_SAME if before.get(k) != settings(args)[k]]
    if differs:
        raise SystemExit(f"--resume: {args.out} was run with other settings ({', '.join(differs)}); "
                         "use another --out or drop --resume")
    return before["runs"], before["train_s"], before["wall_s"]


def distill_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *map(str, args)]


def env(threads: int | None) -> dict:
    extra = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        extra["OMP_NUM_THREADS"] = str(threads)
    return {**os.environ, **extra}


def run_one(args: list, log: Path, threads: int | None = None) -> None:
    with open(log, "w") as f:
        done = subprocess.run(distill_cmd(*args), cwd=ROOT, env=env(threads), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"distill {args[0]} failed; see {log}:\n" + log.read_text()[-2000:])


def arm_flags(arm: str, work: Path, alpha: float, uncovered: str = "teacher") -> list:
    cross = arm.startswith("cross")
    flags = ["--train-store", work / "store", "--model", work / ("student-cross.json" if cross else "student-same.json"),
             "--eval-store", work / ("heldout-cross" if cross else "heldout-same")]
    if cross:
        flags += ["--tokenizer", work / "cross-tokenizer", "--cross-tokenizer", "exact" if arm == "cross-ce" else "both",
                  "--cross-uncovered", uncovered]
    a = 1.0 if arm.endswith("-ce") else 0.0 if arm == "same-kd-a0" else alpha
    return flags + ["--alpha", a, "--temperature", 2 if arm == "same-kd-t2" else 1]


def curve_of(metrics: Path, tokens_per_step: int) -> list[dict]:
    """The held-out evaluations a run logged: step, training tokens, bits per byte, loss per token."""
    points = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "heldout_bits_per_byte" in r:
            points.append({"step": r["step"], "tokens": r["step"] * tokens_per_step,
                           "bits_per_byte": r["heldout_bits_per_byte"], "loss": r["heldout_loss"]})
    return points


def teacher_bits_per_byte(teacher: Path, heldout: Path, device: str, batch_rows: int = 8) -> dict:
    """The teacher's next-token bits per byte over the same held-out rows the same-tokenizer students are
    scored on (every position after the first of a row; its targets' bytes), as ``distill student`` scores."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.models import load_model, resolve_device
    from pipeline.store.contract import open_store
    from pipeline.train.loader import sequential
    from pipeline.train.metrics import bits_per_byte, target_bytes, token_byte_lengths

    dev = resolve_device(device)
    model = load_model(teacher).to(dev).eval()
    lengths = token_byte_lengths(AutoTokenizer.from_pretrained(teacher))
    nats, nbytes, tokens = 0.0, 0, 0
    for batch in sequential(open_store(heldout), batch_rows):
        ids = batch["input_ids"].long()
        with torch.no_grad():
            logits = model(ids.to(dev)).logits[:, :-1].float()
        nats += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        ids[:, 1:].reshape(-1).to(dev), reduction="sum"))
        nbytes += target_bytes(ids, None, lengths)
        tokens += ids[:, 1:].numel()
    return {"bits_per_byte": bits_per_byte(nats, nbytes), "loss": nats / tokens, "tokens": tokens, "bytes": nbytes}


def crossing(points: list[tuple[int, float]], target: float) -> float | None:
    """The first training-token count at which a curve (tokens, bits/byte), read linearly between its
    points, is at or below ``target``; None if it never is. Reached at the first point: that point
    (nothing is known before it, so this bounds the crossing from above)."""
    previous = None
    for tokens, value in points:
        if value <= target:
            if previous is None:
                return float(tokens)
            (t0, v0) = previous
            return t0 + (tokens - t0) * (v0 - target) / (v0 - value)
        previous = (tokens, value)
    return None


def mean_curve(runs: list[list[dict]]) -> list[tuple[int, float]]:
    steps = sorted(set.intersection(*(set(p["tokens"] for p in r) for r in runs)))
    by = [{p["tokens"]: p["bits_per_byte"] for p in r} for r in runs]
    return [(t, statistics.fmean(b[t] for b in by)) for t in steps]


def tokens_to_target(ce: list[list[dict]], kd: list[list[dict]]) -> dict:
    """Training tokens the distilled arm's mean curve needs to reach the CE arm's final mean, over the CE
    arm's final tokens (``share``; ``speedup`` = 1 / share); None where it is not reached."""
    final = [r[-1] for r in ce]
    target = statistics.fmean(p["bits_per_byte"] for p in final)
    ce_tokens = final[0]["tokens"]
    at = crossing(mean_curve(kd), target)
    first = mean_curve(kd)[0][0]
    return {"target_bits_per_byte": target, "ce_tokens": ce_tokens, "kd_tokens": at,
            "share": None if at is None else at / ce_tokens,
            "speedup": None if at is None else ce_tokens / at,
            "at_first_evaluation": at is not None and at <= first}


def bootstrap(ce: list[list[dict]], kd: list[list[dict]], draws: int, seed: int = 0) -> dict:
    """Percentile interval (5%, 95%) of the speed-up with each arm's seeds resampled with replacement; a draw
    whose distilled curve never reaches its target counts as speed-up 0 (below any interval bound)."""
    rng = random.Random(seed)
    values = []
    for _ in range(draws):
        t = tokens_to_target([rng.choice(ce) for _ in ce], [rng.choice(kd) for _ in kd])
        values.append(t["speedup"] or 0.0)
    values.sort()
    q = lambda f: values[min(len(values) - 1, int(f * len(values)))]  # noqa: E731
    return {"draws": draws, "speedup_p05": q(0.05), "speedup_p50": q(0.5), "speedup_p95": q(0.95),
            "not_reached_share": sum(v == 0.0 for v in values) / draws}


def summarise(runs: dict, draws: int) -> dict:
    summary: dict = {"arms": {}, "pairs": {}}
    for arm, by_seed in runs.items():
        curves = list(by_seed.values())
        steps = sorted(set.intersection(*(set(p["step"] for p in c) for c in curves)))
        rows = []
        for s in steps:
            values = [next(p["bits_per_byte"] for p in c if p["step"] == s) for c in curves]
            rows.append({"step": s, "tokens": next(p["tokens"] for p in curves[0] if p["step"] == s),
                         "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "min": min(values), "max": max(values)})
        summary["arms"][arm] = {"seeds": sorted(by_seed, key=int), "curve": rows}
    for kd, ce in PAIRS.items():
        if kd not in runs or ce not in runs:
            continue
        seeds = sorted(set(runs[kd]) & set(runs[ce]), key=int)
        rows = []
        for point in summary["arms"][kd]["curve"]:
            diffs = [next(p["bits_per_byte"] for p in runs[kd][s] if p["step"] == point["step"])
                     - next(p["bits_per_byte"] for p in runs[ce][s] if p["step"] == point["step"]) for s in seeds]
            rows.append({"step": point["step"], "tokens": point["tokens"], "diff_mean": statistics.fmean(diffs),
                         "diff_min": min(diffs), "diff_max": max(diffs),
                         "diff_sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0})
        ce_curves = [runs[ce][s] for s in seeds]
        kd_curves = [runs[kd][s] for s in seeds]
        summary["pairs"][kd] = {"against": ce, "seeds": seeds, "by_step": rows,
                                "tokens_to_target": tokens_to_target(ce_curves, kd_curves),
                                "bootstrap": bootstrap(ce_curves, kd_curves, draws)}
    return summary


def report(result: dict, figure: str | None) -> None:
    s = result["summary"]
    teacher = result.get("teacher_heldout", {}).get("bits_per_byte")
    for kd, pair in s["pairs"].items():
        ce = pair["against"]
        print(f"\n{kd} against {ce} (bits/byte on held-out; distilled - CE, seed mean [min, max]):")
        print("| step | tokens | CE | distilled | distilled - CE |")
        print("|---:|---:|---:|---:|---:|")
        ce_rows = {r["step"]: r for r in s["arms"][ce]["curve"]}
        kd_rows = {r["step"]: r for r in s["arms"][kd]["curve"]}
        for r in pair["by_step"]:
            c, k = ce_rows[r["step"]], kd_rows[r["step"]]
            print(f"| {r['step']} | {r['tokens']:,} | {c['mean']:.4f} ± {c['sd']:.4f} | {k['mean']:.4f} ± {k['sd']:.4f} "
                  f"| {r['diff_mean']:+.4f} [{r['diff_min']:+.4f}, {r['diff_max']:+.4f}] |")
        t, b = pair["tokens_to_target"], pair["bootstrap"]
        if t["speedup"] is None:
            print(f"tokens-to-target: the distilled mean never reaches CE's final {t['target_bits_per_byte']:.4f}")
        else:
            bound = " (reached at the first evaluation: an upper bound on the tokens)" if t["at_first_evaluation"] else ""
            print(f"tokens-to-target: {t['kd_tokens']:,.0f} of CE's {t['ce_tokens']:,} tokens = {t['share']:.2f}, "
                  f"a {t['speedup']:.2f}x speed-up{bound}; bootstrap over seeds 5-95%: "
                  f"{b['speedup_p05']:.2f}x-{b['speedup_p95']:.2f}x ({b['not_reached_share']:.0%} of draws not reached)")
    for arm in EXTRA:
        if arm in s["arms"]:
            last = s["arms"][arm]["curve"][-1]
            base = {r["step"]: r for r in s["arms"]["same-kd"]["curve"]}.get(last["step"]) if "same-kd" in s["arms"] \
                else None
            seed0 = result["runs"]["same-kd"].get("0", [{}])[-1].get("bits_per_byte") if "same-kd" in result["runs"] \
                else None
            print(f"{arm} (seed 0): final {last['mean']:.4f} bits/byte"
                  + (f"; same-kd seed 0 {seed0:.4f}, mean {base['mean']:.4f}" if base and seed0 is not None else ""))
    if teacher is not None:
        print(f"teacher: {teacher:.4f} bits/byte on the same held-out rows")
    if figure:
        draw(result, figure)


def draw(result: dict, figure: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    panels = [p for p in (("same", "student of the teacher's tokenizer"), ("cross", "student of another tokenizer"))
              if any(arm.startswith(p[0] + "-") for arm in s["arms"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    colors = {"ce": "tab:red", "kd": "tab:blue", "kd-t2": "tab:purple", "kd-a0": "tab:green"}
    for ax, (prefix, title) in zip(axes[0], panels):
        for arm, row in s["arms"].items():
            if not arm.startswith(prefix + "-"):
                continue
            kind = arm.removeprefix(prefix + "-")
            x = [r["tokens"] / 1e6 for r in row["curve"]]
            mean = [r["mean"] for r in row["curve"]]
            label = {"ce": "CE only", "kd": f"distilled (α = {result['alpha']}, T = 1)", "kd-t2": "distilled, T = 2",
                     "kd-a0": "distilled, α = 0"}[kind] + f" ({len(row['seeds'])} seed{'s' if len(row['seeds']) > 1 else ''})"
            ax.plot(x, mean, color=colors[kind], label=label, linestyle="-" if kind in ("ce", "kd") else ":")
            if len(row["seeds"]) > 1:
                ax.fill_between(x, [m - r["sd"] for m, r in zip(mean, row["curve"])],
                                [m + r["sd"] for m, r in zip(mean, row["curve"])], color=colors[kind], alpha=0.2)
        teacher = result.get("teacher_heldout", {}).get("bits_per_byte")
        if teacher is not None:
            ax.axhline(teacher, color="black", linestyle="--", label=f"teacher ({teacher:.3f})")
        pair = s["pairs"].get(f"{prefix}-kd")
        if pair and pair["tokens_to_target"]["kd_tokens"] is not None:
            t = pair["tokens_to_target"]
            ax.axhline(t["target_bits_per_byte"], color="grey", linewidth=0.6)
            ax.axvline(t["kd_tokens"] / 1e6, color="grey", linewidth=0.6)
            title += f"\ntokens-to-target {t['share']:.2f} ({t['speedup']:.2f}x fewer tokens)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens (millions; the teacher tokenizer's count of the text read)")
        ax.set_ylabel("held-out bits per byte")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Learning curves from a real teacher's sampled store ({result['teacher']}): mean ± sd over seeds",
                 fontsize=10)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", default="", help="only print the tables of this result file and draw --figure")
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: a 50M student (GPU_STUDENT), 512-token rows, batch 32, bf16, --device cuda")
    parser.add_argument("--teacher", default="data/models/smollm2-135m")
    parser.add_argument("--student", default="data/models/student-smollm2.json")
    parser.add_argument("--cross-student", default="data/models/student.json")
    parser.add_argument("--cross-tokenizer", default="data/tokenizer")
    parser.add_argument("--corpus", default="data/corpus/train.jsonl.gz")
    parser.add_argument("--heldout", default="data/corpus/heldout.jsonl.gz")
    parser.add_argument("--heldout-docs", type=int, default=40)
    parser.add_argument("--rows", type=int, default=1200, help="store rows (stage one); the students read "
                        "steps x micro-batch rows of it, cycling")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--cross-uncovered", default="teacher", help="the cross-tokenizer student's --cross-uncovered "
                        "(bench/results/curve_cpu.json ran 'none', the behaviour before the option)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(SEEDED + EXTRA))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", type=int, default=2, help="student runs at once (each OMP_NUM_THREADS="
                        "--threads): two one-thread runs use 2 cores better than one two-thread run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of --out (same settings) "
                        "and run only the rest, e.g. after a failed arm; use with the same --work")
    parser.add_argument("--work", default="", help="keep the stores, runs and logs here (default: a temporary dir)")
    parser.add_argument("--out", default="bench/results/curve_cpu.json")
    parser.add_argument("--figure", default="docs/img/curve_cpu.png")
    args = parser.parse_args()
    if args.report:
        return report(json.loads(Path(args.report).read_text()), args.figure)
    if args.scale == "gpu":  # a 50M student over ~20M tokens (the corpus's ~6M tokens, three times)
        args.device, args.dtype, args.seq_len, args.micro_batch_size = "cuda", "bfloat16", 512, 32
        if args.rows == parser.get_default("rows"):
            args.rows, args.steps, args.eval_every, args.parallel, args.threads = 12800, 1200, 100, 4, None
    out_file = ROOT / args.out
    runs, timings, wall_before = resumed(args, out_file) if args.resume else ({}, {}, 0.0)
    started = time.time()
    load_at_start = os.getloadavg()
    seeds = [str(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-curve-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        os.environ["DISTILL_CACHE"] = str(work / "cache")
        (work / "cross-tokenizer").unlink(missing_ok=True)
        (work / "cross-tokenizer").symlink_to((ROOT / args.cross_tokenizer).resolve())
        with gzip.open(ROOT / args.corpus, "rt", encoding="utf-8") as f:  # enough documents for the store's rows
            docs, size = [], 0
            for line in f:
                docs.append(line)
                size += len(line)
                if size > 8 * args.rows * args.seq_len:  # ~4 bytes a token, twice over
                    break
        (work / "corpus.jsonl").write_text("".join(docs))
        with gzip.open(ROOT / args.heldout, "rt", encoding="utf-8") as f:
            (work / "heldout.jsonl").write_text("".join(line for _, line in zip(range(args.heldout_docs), f)))
        teacher = ROOT / args.teacher
        t0 = time.time()
        for name, source, tokenizer in (("tokens", "corpus", teacher), ("heldout-same", "heldout", teacher),
                                        ("heldout-cross", "heldout", work / "cross-tokenizer")):
            if not (work / name / "index.json").exists():
                run_one(["prepare", "--input", work / f"{source}.jsonl", "--out", work / name, "--tokenizer", tokenizer,
                         "--seq-len", args.seq_len], work / f"prepare-{name}.log")
        prepare_s = time.time() - t0
        t0 = time.time()
        if not (work / "store" / "index.json").exists():
            run_one(["teacher", "--tokens-store", work / "tokens", "--teacher", teacher, "--out", work / "store",
                     "--kind", "sampled", "--samples", args.samples, "--temperature", 1, "--temperature-grid", 1,
                     "--temperature-grid", 2, "--sample-logprobs", "--max-rows", args.rows, "--device", args.device,
                     "--dtype", args.dtype],
                    work / "teacher.log")
            (work / "stage_one_s.json").write_text(json.dumps(time.time() - t0))
        # a --work kept from an earlier run of the same settings reuses its store and reports its stage-one time
        stage_one_s = json.loads((work / "stage_one_s.json").read_text()) if (work / "stage_one_s.json").exists() \
            else time.time() - t0
        store_index = json.loads((work / "store" / "index.json").read_text())
        if store_index.get("rows") != args.rows:
            raise SystemExit(f"--work {work} holds a store of {store_index.get('rows')} rows, not --rows {args.rows}: "
                             "use another --work or delete its store")
        if not store_index.get("params", {}).get("sample_logprobs"):
            raise SystemExit(f"--work {work} holds a store without per-id log-probs, which the T = 2 arm needs to "
                             "re-temper it: use another --work or delete its store")
        teacher_heldout = teacher_bits_per_byte(teacher, work / "heldout-same", args.device)
        print(f"stage one {stage_one_s:.0f} s; teacher {teacher_heldout['bits_per_byte']:.4f} bits/byte held-out",
              flush=True)
        same = GPU_STUDENT if args.scale == "gpu" else json.loads((ROOT / args.student).read_text())
        (work / "student-same.json").write_text(json.dumps(same))
        cross = json.loads((ROOT / args.cross_student).read_text())
        if args.scale == "gpu":
            cross = GPU_STUDENT | {k: cross[k] for k in ("vocab_size", "bos_token_id", "eos_token_id")}
        (work / "student-cross.json").write_text(json.dumps(cross))
        jobs = [(arm, seed) for seed in seeds for arm in arms if arm in SEEDED] + \
               [(arm, seeds[0]) for arm in arms if arm in EXTRA]
        tokens_per_step = args.micro_batch_size * args.seq_len
        if runs:
            print(f"resumed {sum(map(len, runs.values()))} finished runs from {args.out}", flush=True)
        pending = [(arm, seed) for arm, seed in jobs if seed not in runs.get(arm, {})]
        active: list = []

        def start(arm: str, seed: str):
            out = work / f"{arm}-s{seed}"
            cmd = ["student", *arm_flags(arm, work, args.alpha, args.cross_uncovered), "--out", out, "--seed", seed, "--max-steps",
                   args.steps, "--micro-batch-size", args.micro_batch_size, "--lr", args.lr, "--min-lr-ratio",
                   args.min_lr_ratio, "--warmup-steps", max(1, args.steps // 10), "--eval-every", args.eval_every,
                   "--eval-rows", 0, "--checkpoint-every", 0, "--log-every", 25, "--device", args.device,
                   "--dtype", args.dtype, "--overwrite"]
            log = open(work / f"{arm}-s{seed}.log", "w")
            proc = subprocess.Popen(distill_cmd(*cmd), cwd=ROOT, env=env(args.threads), stdout=log,
                                    stderr=subprocess.STDOUT)
            return (arm, seed, out, proc, log, time.time())

        def result() -> dict:
            return {"device": f"{args.device} ({platform.machine()}, {os.cpu_count()} cores)",
                    "load_average_at_start": load_at_start, "load_average_now": os.getloadavg(),
                    **settings(args), "tokens_per_step": tokens_per_step,
                    "epochs_over_store": args.steps * args.micro_batch_size / args.rows,
                    "warmup_steps": max(1, args.steps // 10), "seeds": [int(s) for s in seeds], "parallel": args.parallel,
                    "threads_per_run": args.threads, "prepare_s": prepare_s, "stage_one_s": stage_one_s,
                    "teacher_heldout": teacher_heldout, "train_s": timings,
                    "wall_s": wall_before + time.time() - started,
                    "runs": runs, "summary": summarise(runs, args.bootstrap) if runs else {}}

        while pending or active:
            while pending and len(active) < args.parallel:
                active.append(start(*pending.pop(0)))
            time.sleep(2)
            for job in list(active):
                arm, seed, out, proc, log, t_start = job
                if proc.poll() is None:
                    continue
                active.remove(job)
                log.close()
                if proc.returncode:
                    for other in active:
                        other[3].kill()
                    raise SystemExit(f"{arm} seed {seed} failed; see {log.name}:\n" + Path(log.name).read_text()[-2000:])
                runs.setdefault(arm, {})[seed] = curve_of(out / "metrics.jsonl", tokens_per_step)
                timings.setdefault(arm, {})[seed] = time.time() - t_start
                print(f"{arm} seed {seed}: {runs[arm][seed][-1]['bits_per_byte']:.4f} bits/byte after {args.steps} "
                      f"steps ({timings[arm][seed]:.0f} s)", flush=True)
                out_file.parent.mkdir(parents=True, exist_ok=True)
                out_file.write_text(json.dumps(result(), indent=2, sort_keys=True) + "\n")  # partial results survive
        final = result()
        out_file.write_text(json.dumps(final, indent=2, sort_keys=True) + "\n")
    print(f"wall {final['wall_s'] / 60:.1f} min (stage one {stage_one_s / 60:.1f}), results {args.out}")
    report(final, args.figure)


if __name__ == "__main__":
    main()

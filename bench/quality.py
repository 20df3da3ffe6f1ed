"""Quality benchmark: how much of online distillation's gain over CE each offline store recovers.

Every mode trains the same student config from the same rows, for the same steps, with the same
learning rate, over several seeds; only the teacher signal differs:

- ``ce``: α = 1, no teacher (the same-size-from-scratch baseline);
- ``online``: the teacher in memory, full vocabulary (what offline modes are measured against);
- ``topk-<tail>``: a top-k store with each tail treatment (``renorm``, ``tail``, ``residual-label``);
- ``sampled`` (N = ``--samples``) or ``sampled-n<N>``: N draws per position from the teacher, stored
  as unique ids with counts (RS-KD);
- ``hybrid-k<K>-m<M>``: the exact top-K plus M draws from the renormalised tail.

``@t2`` after a mode trains at T = 2 (stores hold the grid {1, 2}; sampled stores draw at T = 1 and
keep per-id log-probs when a T = 2 mode reads them). For each run: held-out loss (all held-out
rows), KL(teacher ‖ student) over the full vocabulary on held-out rows, median step time. The
summary gives each mode's mean ± spread over seeds and the share of the CE → online gain it
recovers, ``(CE − mode) / (CE − online)`` on seed means. Results are rewritten after every run, so
a long run commits partial results.

    python bench/quality.py --steps 300 --seeds 0,1,2 --out bench/results/quality_cpu.json
    python bench/quality.py --report bench/results/quality_h200.json --figure docs/img/quality.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODES = ("ce,online,topk-renorm,topk-tail,topk-residual-label,sampled,hybrid-k8-m48,hybrid-k16-m32,"
                 "online@t2,sampled@t2")


def store_for(mode: str, top_k: int, samples: int, modes: list[str] = ()) -> tuple[str, list[str]] | None:
    """(store name, stage-one flags) that a mode trains from; None for modes that need none. Per-id
    log-probs are stored only where a mode of ``modes`` trains from the store at T = 2."""
    base = mode.split("@")[0]
    logprobs = ["--sample-logprobs"] if any(m.startswith(base + "@") for m in modes) else []
    if base in ("ce", "online"):
        return None
    if base.startswith("topk-"):
        return f"topk{top_k}", ["--kind", "topk", "--top-k", str(top_k)]
    if base == "sampled" or base.startswith("sampled-n"):
        n = base.removeprefix("sampled-n") if base != "sampled" else str(samples)
        return f"sampled{n}", ["--kind", "sampled", "--samples", n, *logprobs]
    if base.startswith("hybrid-"):
        k, m = base.removeprefix("hybrid-k").split("-m")
        return f"hybrid-k{k}-m{m}", ["--kind", "topk", "--top-k", k, "--tail-samples", m, *logprobs]
    raise SystemExit(f"unknown mode {mode!r}")


def student_flags(mode: str, stores: Path, teacher: str) -> list[str]:
    base, _, temp = mode.partition("@")
    flags = ["--temperature", "2" if temp == "t2" else "1"]
    same_rows = ["--train-store", str(stores / f"topk{ARGS.top_k}")]  # CE and online read the stores' rows
    if base == "ce":
        return same_rows + ["--alpha", "1"]
    if base == "online":
        return same_rows + ["--alpha", "0.5", "--teacher", teacher, *flags]
    name, _ = store_for(mode, ARGS.top_k, ARGS.samples, ARGS.modes.split(","))
    tail = ["--tail", base.removeprefix("topk-")] if base.startswith("topk-") else []
    return ["--train-store", str(stores / name), "--alpha", "0.5", *tail, *flags]


def distill(*args: str, log: Path, threads: int = 0) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "w") as f:
        status = subprocess.run([sys.executable, "-m", "stages.cli", *args], env=env, cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"distill {args[0]} failed ({log}):\n{log.read_text()[-3000:]}")


@torch.no_grad()
def teacher_kl(teacher, student_dir: Path, heldout, device) -> float:
    """Mean KL(teacher ‖ student) per position, full vocabulary, T = 1, nats."""
    from pipeline.models import load_model

    student = load_model(student_dir).to(device).eval()
    total, count = 0.0, 0
    for start in range(0, heldout.shape[0], 8):
        ids = heldout[start:start + 8].to(device)
        p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
        q = torch.log_softmax(student(input_ids=ids).logits[:, :-1].float(), -1)
        total += (p.exp() * (p - q)).sum().item()
        count += p.shape[0] * p.shape[1]
    return total / count


def summarise(runs: dict) -> dict:
    modes = {}
    for mode, by_seed in runs.items():
        losses = [r["heldout_loss"] for r in by_seed.values()]
        kls = [r["teacher_kl"] for r in by_seed.values()]
        modes[mode] = {"seeds": len(losses), "heldout_loss_mean": statistics.fmean(losses),
                       "heldout_loss_spread": max(losses) - min(losses),
                       "heldout_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                       "teacher_kl_mean": statistics.fmean(kls),
                       "step_s_median": statistics.median(r["step_s_median"] for r in by_seed.values())}
    if "ce" in modes and "online" in modes:
        ce, online = modes["ce"]["heldout_loss_mean"], modes["online"]["heldout_loss_mean"]
        gain = ce - online
        for m in modes.values():
            m["recovered_share"] = (ce - m["heldout_loss_mean"]) / gain if gain > 0 else None
            m["step_time_over_ce"] = m["step_s_median"] / modes["ce"]["step_s_median"]
        spread = max(m["heldout_loss_spread"] for name, m in modes.items() if name in ("ce", "online"))
        modes["_setup"] = {"online_gain": gain, "seed_spread": spread,
                           "gain_over_spread": gain / spread if spread > 0 else None}
    return modes


def report(paths: list[str], figure: str) -> None:
    """A Markdown table of one or more result files (runs of a mode pooled across files) and a
    figure: held-out loss per mode, seeds as dots, CE and online as lines."""
    runs: dict[str, dict] = {}
    stores: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        stores |= data["stores"]
        for mode, by_seed in data["runs"].items():
            runs.setdefault(mode, {}).update(by_seed)
    summary = summarise(runs)
    # Step times are left out: the runs shared one GPU in parallel (bench/stage_two.py times modes alone).
    print("| mode | bytes/token | held-out loss, mean (min–max) | KL(teacher‖student) | share of online's gain |")
    print("| --- | --- | --- | --- | --- |")
    for mode, m in summary.items():
        if mode.startswith("_"):
            continue
        spec = store_for(mode, 64, 50, list(summary))
        size = f"{stores[spec[0]]['bytes_per_token']:.0f}" if spec and spec[0] in stores else "–"
        losses = [r["heldout_loss"] for r in runs[mode].values()]
        print(f"| {mode} | {size} | {m['heldout_loss_mean']:.3f} ({min(losses):.3f}–{max(losses):.3f}) | "
              f"{m['teacher_kl_mean']:.3f} | {100 * m['recovered_share']:.0f}% |")
    print(f"\nonline's gain over CE {summary['_setup']['online_gain']:.3f} nats, "
          f"{summary['_setup']['gain_over_spread']:.1f}× the larger seed spread of the two")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in summary if not m.startswith("_") and m not in ("ce", "online")]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, mode in enumerate(modes):
        losses = [r["heldout_loss"] for r in runs[mode].values()]
        ax.scatter([i] * len(losses), losses, color="tab:blue", s=18)
        ax.scatter([i], [summary[mode]["heldout_loss_mean"]], color="black", marker="_", s=300)
    for name, color in (("ce", "tab:red"), ("online", "tab:green")):
        ax.axhline(summary[name]["heldout_loss_mean"], color=color, linestyle="--", label=f"{name} (mean)")
    ax.set_xticks(range(len(modes)), modes, rotation=30, ha="right")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title("Student held-out loss by teacher signal (dots: seeds; bar: mean)")
    ax.legend()
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", nargs="+", default=None, help="Only print the table of these result files "
                        "and draw --figure.")
    parser.add_argument("--figure", default="docs/img/quality.png")
    parser.add_argument("--teacher", default="data/models/teacher")
    parser.add_argument("--student", default="data/models/student.json")
    parser.add_argument("--train-corpus", default="data/corpus/train.jsonl.gz")
    parser.add_argument("--heldout-corpus", default="data/corpus/heldout.jsonl.gz")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--lr", default="2e-3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--modes", default=DEFAULT_MODES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", type=int, default=1, help="Student runs at once (a GPU holds many).")
    parser.add_argument("--kl-rows", type=int, default=64, help="Held-out rows for KL(teacher ‖ student).")
    parser.add_argument("--work", default="")
    parser.add_argument("--out", default="bench/results/quality_cpu.json")
    ARGS = args = parser.parse_args()
    if args.report:
        return report(args.report, args.figure)

    from pipeline.models import load_model, resolve_device
    from pipeline.store.contract import open_store

    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="distill-quality-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    for split, corpus in (("train", args.train_corpus), ("heldout", args.heldout_corpus)):
        if not (work / f"tokens-{split}" / "index.json").exists():
            distill("prepare", "--input", corpus, "--out", str(work / f"tokens-{split}"), "--seq-len", "256",
                    log=work / "logs" / f"prepare-{split}.log")
    modes = args.modes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = args.steps * args.micro_batch_size  # every run reads each of these rows once
    stores = {}
    for mode in ["topk-tail", *modes]:  # the top-k store always: CE and online train on its rows
        spec = store_for(mode, args.top_k, args.samples, modes)
        if spec and spec[0] not in stores:
            name, flags = spec
            t0 = time.time()
            distill("teacher", "--tokens-store", str(work / "tokens-train"), "--teacher", args.teacher,
                    "--out", str(work / name), "--max-rows", str(rows), "--device", args.device,
                    "--temperature-grid", "1", "--temperature-grid", "2", "--overwrite", *flags,
                    log=work / "logs" / f"{name}.log")
            store = open_store(work / name)
            stores[name] = {"flags": flags, "bytes_per_token": store.index["bytes"] / (store.rows * store.params["seq_len"]),
                            "stage_one_s": time.time() - t0}
            print(f"store {name}: {stores[name]['bytes_per_token']:.1f} bytes/token", flush=True)

    device = resolve_device(args.device)
    teacher = load_model(args.teacher).to(device).eval()
    heldout = open_store(work / "tokens-heldout")
    heldout_ids = torch.from_numpy(heldout.read_rows(0, min(args.kl_rows, heldout.rows))["input_ids"].astype("int64"))
    runs: dict[str, dict[str, dict]] = {mode: {} for mode in modes}
    out = Path(args.out)

    def write() -> None:
        summary = {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda"
            else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__, "teacher": args.teacher, "student": args.student, "steps": args.steps,
            "micro_batch_size": args.micro_batch_size, "seq_len": 256, "lr": float(args.lr), "seeds": seeds,
            "top_k": args.top_k, "samples": args.samples, "tokens_per_run": rows * 255, "stores": stores,
            "wall_s": time.time() - started, "runs": runs, "summary": summarise({m: r for m, r in runs.items() if r}),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")

    common = ["--eval-store", str(work / "tokens-heldout"), "--model", args.student, "--max-steps", str(args.steps),
              "--micro-batch-size", str(args.micro_batch_size), "--warmup-steps", str(max(1, args.steps // 10)),
              "--lr", args.lr, "--eval-every", "0", "--checkpoint-every", "0", "--log-every", "1",
              "--eval-rows", "0", "--device", args.device, "--overwrite"]

    def one(job: tuple[str, int]) -> tuple[str, int, dict]:
        mode, seed = job
        run_dir = work / "runs" / f"{mode.replace('@', '-')}-s{seed}"
        distill("student", *student_flags(mode, work, args.teacher), *common, "--seed", str(seed),
                "--out", str(run_dir), log=work / "logs" / f"{run_dir.name}.log",
                threads=max(1, (os.cpu_count() or 1) // args.parallel) if args.parallel > 1 else 0)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step_s"] for r in records if "step_s" in r]
        final = json.loads((run_dir / "metrics.json").read_text())
        return mode, seed, {"heldout_loss": final["heldout_loss"],
                            "step_s_median": statistics.median(steps[3:] if len(steps) > 6 else steps),
                            "run_dir": str(run_dir)}

    jobs = [(mode, seed) for seed in seeds for mode in modes]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        for mode, seed, result in pool.map(one, jobs):
            result["teacher_kl"] = teacher_kl(teacher, Path(result.pop("run_dir")) / "model", heldout_ids, device)
            runs[mode][str(seed)] = result
            print(f"{mode} seed {seed}: held-out {result['heldout_loss']:.4f}, KL {result['teacher_kl']:.4f}, "
                  f"step {result['step_s_median']:.3f} s", flush=True)
            write()
    write()
    print(json.dumps(json.loads(out.read_text())["summary"], indent=2))


if __name__ == "__main__":
    main()

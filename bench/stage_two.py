"""Stage-two benchmark: step time, peak memory and held-out loss of the training modes, side by side.

Each mode trains the same student from the same rows with the same seed, for the same steps, in a
subprocess of its own (so peak RSS is that run's alone):

- ``ce``: α = 1, cross-entropy only (the same-size-from-scratch baseline);
- ``offline-<tail>``: α = 0.5 from the topk store, for each tail mode;
- ``offline-sampled``, ``offline-hybrid``: α = 0.5 from a sampled store (N = 32, the default) and from
  a hybrid one (top-4 + 24 tail draws);
- ``online``: α = 0.5 with the teacher in memory, full vocabulary.

Step time is the median over steps after the first few (warm-up); ratios are taken between modes
of the same run.

    python bench/stage_two.py --teacher data/models/teacher --steps 40
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
from pathlib import Path

import torch

from pipeline.config import load_config
from stages.prepare import PrepareConfig, prepare
from stages.teacher import TeacherConfig, run_teacher

ROOT = Path(__file__).resolve().parents[1]


def run_mode(name: str, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "student", *args, "--out", str(out / name)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"mode {name} failed:\n{output[-3000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in records if "step_s" in r]
    final = json.loads((out / name / "metrics.json").read_text())
    return {
        "step_s_median": statistics.median(steps[3:] if len(steps) > 6 else steps),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "heldout_loss": final.get("heldout_loss"),
        **({"peak_gpu_memory_gib": final["peak_gpu_memory_gib"]} if "peak_gpu_memory_gib" in final else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="data/models/teacher")
    parser.add_argument("--student", default="data/models/student.json")
    parser.add_argument("--train-corpus", default="data/corpus/train.jsonl.gz")
    parser.add_argument("--heldout-corpus", default="data/corpus/heldout.jsonl.gz")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--lr", default="2e-3")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default="")
    parser.add_argument("--modes", default="ce,offline-tail,online,offline-renorm,offline-residual-label")
    parser.add_argument("--out", default="bench/results/stage_two.json")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-bench2-"))
    work.mkdir(parents=True, exist_ok=True)
    for split, corpus in (("train", args.train_corpus), ("heldout", args.heldout_corpus)):
        prepare(load_config(PrepareConfig, inputs=(corpus,), out=str(work / f"tokens-{split}"), seq_len=256,
                            tokenizer=args.tokenizer))
    # Stage one over just the rows the runs will read, for each store the modes need.
    rows = args.steps * args.micro_batch_size
    modes_wanted = args.modes.split(",")
    stores = {"topk": {"kind": "topk", "top_k": args.top_k}, "sampled": {"kind": "sampled", "samples": 32},
              "hybrid": {"kind": "topk", "top_k": 4, "tail_samples": 24}}
    for name, extra in stores.items():  # the topk store always: CE and online read the same rows from it
        if name == "topk" or any(m.startswith("offline-") and (m.removeprefix("offline-") == name or name == "topk"
                                            and m.removeprefix("offline-") in ("tail", "renorm", "residual-label"))
               for m in modes_wanted):
            run_teacher(load_config(TeacherConfig, tokens_store=str(work / "tokens-train"), max_rows=rows,
                                    teacher=args.teacher, out=str(work / name), device=args.device, batch_size=16,
                                    **extra))

    common = ["--eval-store", str(work / "tokens-heldout"),
              "--model", args.student, "--max-steps", str(args.steps), "--micro-batch-size", str(args.micro_batch_size),
              "--warmup-steps", str(max(1, args.steps // 10)), "--lr", args.lr, "--eval-every", "0",
              "--checkpoint-every", "0", "--log-every", "1", "--device", args.device, "--overwrite"]
    topk = tokens = ["--train-store", str(work / "topk")]
    modes = {
        "ce": tokens + ["--alpha", "1"],
        "offline-tail": topk + ["--alpha", "0.5", "--tail", "tail"],
        "offline-renorm": topk + ["--alpha", "0.5", "--tail", "renorm"],
        "offline-residual-label": topk + ["--alpha", "0.5", "--tail", "residual-label"],
        "offline-sampled": ["--train-store", str(work / "sampled"), "--alpha", "0.5"],
        "offline-hybrid": ["--train-store", str(work / "hybrid"), "--alpha", "0.5"],
        "online": tokens + ["--alpha", "0.5", "--teacher", args.teacher],
    }
    results = {}
    for name in modes_wanted:
        results[name] = run_mode(name, common + modes[name], work / "runs")
        print(name, json.dumps(results[name]), flush=True)

    ratios = {}
    if "ce" in results and "offline-tail" in results:
        ratios["offline_kd_over_ce_step_time"] = results["offline-tail"]["step_s_median"] / results["ce"]["step_s_median"]
        ratios["offline_kd_over_ce_peak_rss"] = results["offline-tail"]["peak_rss_mib"] / results["ce"]["peak_rss_mib"]
    if "online" in results and "offline-tail" in results:
        ratios["offline_kd_over_online_kd_step_time"] = (results["offline-tail"]["step_s_median"]
                                                         / results["online"]["step_s_median"])
    for mode in ("offline-sampled", "offline-hybrid"):
        if mode in results and "ce" in results:
            ratios[f"{mode}_over_ce_step_time"] = results[mode]["step_s_median"] / results["ce"]["step_s_median"]
        if mode in results and "online" in results:
            ratios[f"{mode}_over_online_step_time"] = (results[mode]["step_s_median"]
                                                      / results["online"]["step_s_median"])
    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device.startswith("cuda") else "cpu"
    summary = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "teacher": args.teacher, "student": args.student, "steps": args.steps,
        "micro_batch_size": args.micro_batch_size, "seq_len": 256, "top_k": args.top_k,
        "tokens_per_run": rows * 255,
        "modes": results, "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

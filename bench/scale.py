"""What --gradient-checkpointing and --compile cost and save (issue #32): step time and peak memory of
the same student run plain, checkpointed, compiled and both, side by side in one run.

Each variant is `distill student` (CE on a tokens store, the real setup and loop) in a subprocess of
its own, the same rows, seed and steps. Per step it records the step time (the loop's own ``step_s``)
and the memory peak of that step alone: on a CPU the process's resident-set high-water mark
(``VmHWM``, reset after every optimizer step through ``/proc/self/clear_refs``), on a GPU
``torch.cuda.max_memory_allocated`` (reset likewise). The medians are over the steps after
``--warmup`` (the first step of a compiled run is mostly compiling: its compile seconds are reported
apart). Ratios are to ``plain`` of the same run; the machine's load average is recorded beside them
(a shared machine's numbers move with it).

On a GPU it also reports tokens/s and MFU: model FLOPs 6·N per token plus attention's
12·layers·hidden·seq_len (the recompute of checkpointing is not counted as useful work), over the
card's dense bf16 peak.

    python bench/scale.py --device cpu --out bench/results/scale_cpu.json            # make bench-scale
    python bench/scale.py --device cuda --hidden-size 1152 --layers 24 ... (bench/gpu_session.sh SESSION=scale)
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"plain": [], "checkpointing": ["--gradient-checkpointing"], "compile": ["--compile"],
            "checkpointing+compile": ["--gradient-checkpointing", "--compile"]}
# dense bf16 peak FLOP/s by card (NVIDIA's datasheets, SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def child(args) -> None:
    """One variant, in this process: the student run with the per-step memory peak recorded."""
    import torch

    import stages.student as student
    from pipeline.config import load_config

    peaks: list[float] = []
    baseline: list[float] = []  # memory once the model is built, before the first step
    cuda = args.device.startswith("cuda")

    def step_peak() -> None:  # the peak since the last optimizer step, then a fresh mark
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
            return
        status = Path("/proc/self/status").read_text()
        peaks.append(int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) / 1024)
        Path("/proc/self/clear_refs").write_text("5")

    make_optimizer = student._optimizer

    def optimizer_with_peaks(*a, **k):
        optimizer, scheduler = make_optimizer(*a, **k)
        if cuda:  # the model is built: what the steps add is measured above this
            baseline.append(torch.cuda.memory_allocated() / 2**20)
        else:
            status = Path("/proc/self/status").read_text()
            baseline.append(int(next(l for l in status.splitlines() if l.startswith("VmRSS:")).split()[1]) / 1024)
        optimizer.register_step_post_hook(lambda *_: step_peak())
        return optimizer, scheduler

    student._optimizer = optimizer_with_peaks
    config = load_config(student.TrainConfig, train_store=args.store, model=args.model, out=args.run_out,
                         max_steps=args.warmup + args.steps, micro_batch_size=args.micro_batch_size, lr=1e-3,
                         warmup_steps=1, eval_every=0, checkpoint_every=0, log_every=1, device=args.device,
                         dtype=args.dtype, threads=args.threads, overwrite=True,
                         gradient_checkpointing="--gradient-checkpointing" in args.flags,
                         compile="--compile" in args.flags)
    student.train(config)
    Path(args.run_out, "peaks.json").write_text(json.dumps({"baseline": baseline[0], "steps": peaks}))


def run_variant(name: str, args, work: Path) -> dict:
    out = work / name
    cmd = [sys.executable, __file__, "--child", "--store", str(work / "tokens"), "--model", str(work / "model.json"),
           "--run-out", str(out), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro-batch-size", str(args.micro_batch_size),
           f"--flags={' '.join(VARIANTS[name])}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
           "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()
    started = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{proc.stdout[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_s" in r]
    timed = steps[args.warmup:]
    memory = json.loads((out / "peaks.json").read_text())
    peaks, baseline = memory["steps"], memory["baseline"]
    result = {
        "step_s_median": statistics.median(r["step_s"] for r in timed),
        "step_s": [round(r["step_s"], 4) for r in steps],
        "first_step_s": steps[0]["step_s"], "compile_s": steps[0].get("compile_s"),
        "peak_mib_median": statistics.median(peaks[args.warmup:]), "peak_mib_first_step": peaks[0],
        "before_steps_mib": baseline, "step_peak_above_before_mib": statistics.median(peaks[args.warmup:]) - baseline,
        "loss_last": steps[-1]["loss"], "wall_s": round(time.time() - started, 1),
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    if args.device.startswith("cuda"):
        result["tokens_per_s"] = args.tokens_per_step / result["step_s_median"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the student's --dtype (bfloat16: autocast, CUDA)")
    parser.add_argument("--student", default="data/models/student.json", help="model config; --layers etc. override")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=0)
    parser.add_argument("--intermediate-size", type=int, default=0)
    parser.add_argument("--heads", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (medians over these)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones (compiles, allocator)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--corpus", default="data/corpus/heldout.jsonl.gz")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", default="")
    parser.add_argument("--out", default="bench/results/scale_cpu.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run-out", help=argparse.SUPPRESS)
    parser.add_argument("--flags", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from pipeline.config import load_config
    from pipeline.models import count_parameters, load_model
    from stages.prepare import PrepareConfig, prepare

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = json.loads(Path(args.student).read_text())
    for key, value in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden_size),
                       ("intermediate_size", args.intermediate_size), ("num_attention_heads", args.heads),
                       ("num_key_value_heads", args.heads)):
        if value:
            model[key] = value
    model["max_position_embeddings"] = max(model.get("max_position_embeddings", 0), args.seq_len)
    (work / "model.json").write_text(json.dumps(model))
    if not (work / "tokens" / "index.json").is_file():
        prepare(load_config(PrepareConfig, inputs=(args.corpus,), out=str(work / "tokens"), seq_len=args.seq_len,
                            tokenizer=args.tokenizer))
    parameters = count_parameters(load_model(work / "model.json"))
    args.tokens_per_step = args.micro_batch_size * (args.seq_len - 1)
    cuda = args.device.startswith("cuda")
    gpu = torch.cuda.get_device_name(0) if cuda else None
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(name, args, work)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "step_s"}), flush=True)
    if cuda:
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
        per_token = 6 * parameters + 12 * model["num_hidden_layers"] * model["hidden_size"] * args.seq_len
        for result in results.values():
            result["model_tflops_per_s"] = per_token * result["tokens_per_s"] / 1e12
            result["mfu"] = per_token * result["tokens_per_s"] / peak if peak else None
    base = results.get("plain")
    ratios = {}
    if base:
        for name, result in results.items():
            if name != "plain":
                ratios[name] = {"step_time": result["step_s_median"] / base["step_s_median"],
                                "peak_memory": result["peak_mib_median"] / base["peak_mib_median"],
                                "step_memory": (result["step_peak_above_before_mib"]
                                                / base["step_peak_above_before_mib"])}
    summary = {
        "device": gpu or f"cpu ({platform.machine()}, {os.cpu_count()} cores visible)",
        "torch": torch.__version__, "parameters": parameters, "model": model, "seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch_size, "tokens_per_step": args.tokens_per_step, "dtype": args.dtype,
        "threads": args.threads, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "memory": ("peak bytes allocated by torch per step (MiB); step MiB: that peak less what was allocated once "
                   "the model was built" if cuda else "peak resident set per step, whole process (VmHWM reset after "
                   "each step, MiB); step MiB: that peak less the resident set once the model was built"),
        "load_average_1m_5m_15m_at_end": [round(x, 2) for x in os.getloadavg()],
        "variants": results, "ratios_to_plain": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'variant':24} {'step s':>8} {'x plain':>8} {'peak MiB':>9} {'x plain':>8} {'step MiB':>9} {'x plain':>8} "
          f"{'compile s':>9}" + (f" {'tok/s':>8} {'MFU':>6}" if cuda else ""))
    for name, result in results.items():
        ratio = ratios.get(name, {"step_time": 1.0, "peak_memory": 1.0, "step_memory": 1.0})
        compile_s = f"{result['compile_s']:.1f}" if result.get("compile_s") else "-"
        gpu_part = f" {result['tokens_per_s']:8.0f} {result['mfu'] or 0:6.1%}" if cuda else ""
        print(f"{name:24} {result['step_s_median']:8.3f} {ratio['step_time']:8.2f} {result['peak_mib_median']:9.0f} "
              f"{ratio['peak_memory']:8.2f} {result['step_peak_above_before_mib']:9.0f} {ratio['step_memory']:8.2f} "
              f"{compile_s:>9}{gpu_part}")
    print(f"load average (1, 5, 15 min) at the end: {summary['load_average_1m_5m_15m_at_end']}; written {args.out}")


if __name__ == "__main__":
    main()

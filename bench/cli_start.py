"""How long a `distill` command takes to start: each command's `--help` in a fresh interpreter, as
the console script runs it (stages/entry.py), median of R launches; beside it the same launch with
every stage module imported first, as the CLI did before it imported a command's module only when
that command runs (stages/cli.py, `STAGES`). Side by side in one run, alternating, so that the
machine's load falls on both alike. Also records whether torch was imported.

    python bench/cli_start.py --repeats 7 --out bench/results/cli_start_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("merge", "status", "inspect", "report", "slurm", "prepare", "tokenizer", "teacher", "student", "eval")

LAUNCH = """if True:
    import sys
    from pipeline.preempt import catch_early
    catch_early()
    if {eager}:
        import importlib
        for name in {stages!r}:
            importlib.import_module(name)
    sys.argv = ["distill", {command!r}, "--help"]
    from stages.cli import main
    try:
        main()
    except SystemExit:
        pass
    sys.stderr.write("torch=%d\\n" % ("torch" in sys.modules))
"""


def launch(command: str, eager: bool, every_stage: tuple[str, ...]) -> tuple[float, bool]:
    code = LAUNCH.format(eager=eager, stages=every_stage, command=command)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=120)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "torch=" not in done.stderr:
        raise SystemExit(f"error: distill {command} --help failed: {done.stderr.strip()[-500:]}")
    return seconds, "torch=1" in done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from stages.cli import STAGES  # light: it imports no stage

    every_stage = tuple(dict.fromkeys(stage.module for stage in STAGES.values()))
    rows = {}
    for command in COMMANDS:
        times: dict[str, list[float]] = {"lazy": [], "eager": []}
        torch_loaded = {}
        for _ in range(args.repeats):
            for mode in ("lazy", "eager"):
                seconds, loaded = launch(command, mode == "eager", every_stage)
                times[mode].append(seconds)
                torch_loaded[mode] = loaded
        lazy, eager = statistics.median(times["lazy"]), statistics.median(times["eager"])
        rows[command] = {"lazy_s": round(lazy, 3), "eager_s": round(eager, 3), "eager_over_lazy": round(eager / lazy, 2),
                         "lazy_imports_torch": torch_loaded["lazy"],
                         "lazy_all_s": [round(t, 3) for t in times["lazy"]],
                         "eager_all_s": [round(t, 3) for t in times["eager"]]}
        print(f"distill {command:9s} --help: {lazy:5.2f} s (every stage imported first: {eager:5.2f} s, "
              f"{eager / lazy:4.1f}x){'' if torch_loaded['lazy'] else '  no torch'}", flush=True)
    result = {"what": "median seconds to run `distill COMMAND --help` in a fresh interpreter", "repeats": args.repeats,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_1min_at_start": os.getloadavg()[0]},
              "commands": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()

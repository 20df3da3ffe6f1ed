"""``distill slurm``: the whole pipeline as SLURM batch jobs, from one YAML file.

One file says what each stage runs (its ``distill`` options, checked here exactly as the stage
would check them) and what each kind of job asks the cluster for. ``distill slurm`` writes, under
``--out``, a readable script per job and the resolved config of each stage:

    1-teacher.sbatch   stage one as a job array: task i of n writes shards i, i+n, … (--shard-index)
    2-merge.sbatch     after every task succeeded: distill merge, then distill inspect --verify
    3-student.sbatch   after the merge: stage two under torchrun (one node, or srun + c10d rendezvous
                       on the first host of the allocation)
    4-eval.sbatch      after the student: distill eval of each model, then distill report

``--submit`` submits them in that order with ``sbatch --parsable``, each depending (``afterok``) on
the one before, and writes the job ids to ``OUT/jobs.json``. ``--resubmit OUT`` looks at what is
done — which shards the store lacks, whether the student finished — and submits only what is left:
the stage-one tasks that own missing shards (stage one is idempotent) and the jobs after them.

Pre-emption: the teacher and student jobs ask for ``--signal=USR1@SECONDS`` and ``--requeue``. The
signal reaches every process of the job step; stage one finishes its shard, stage two its step and a
checkpoint, and both exit with status 75 (stage two also writes ``OUT/preempted.json``, since
torchrun does not pass its workers' status on). The script then requeues the job, which resumes.
torchrun itself is started with USR1 ignored (inherited over ``exec``), so only the workers act on it.

CPUs: each job asks for ``--cpus-per-task`` (``cpus``), and its ``srun`` lines ask for it again (since
SLURM 22.05 a step no longer inherits it from the allocation and would get one CPU per task). Each
stage sets torch's threads from ``SLURM_CPUS_PER_TASK`` (``pipeline/threads.py``; stage two's
torchrun processes share the task's CPUs), unless the stage's config sets ``threads``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import check, load_config, option, to_dict
from pipeline.errors import DistillError
from pipeline.io import atomic_write_text
from pipeline.preempt import EXIT_PREEMPTED as PREEMPTED  # a stage stopped by the pre-emption signal

IGNORE_USR1 = 'trap "" USR1; exec '  # torchrun then ignores USR1; its workers install their own handler
RESOURCES = ("partition", "account", "qos", "time", "cpus", "mem", "gpus", "constraint", "signal", "extra")
JOB_RESOURCES = {"teacher": RESOURCES + ("array",), "merge": RESOURCES,
                 "student": RESOURCES + ("nodes", "procs_per_node"), "eval": RESOURCES}
SCRIPTS = {"teacher": "1-teacher.sbatch", "merge": "2-merge.sbatch", "student": "3-student.sbatch",
           "eval": "4-eval.sbatch"}


def file_option(help: str) -> Any:
    """A field only a config file can hold (a mapping or a list of them): no command-line flag."""
    return dataclasses.field(default=None, metadata={"help": help, "file_only": True})


@dataclass(frozen=True)
class SlurmConfig:
    out: str = option("", "Directory for the sbatch scripts, their logs, each stage's resolved config and jobs.json.")
    submit: bool = option(False, "Also submit the jobs with sbatch, chained by afterok dependencies; ids go to "
                          "OUT/jobs.json.")
    resubmit: str = option("", "A directory `distill slurm --submit` wrote: submit again only what is not done (the "
                           "stage-one tasks whose shards are missing, and the jobs after them).")
    workdir: str = option("", "Directory every job runs in (default: where distill slurm runs).")
    setup: str = option("", "Shell lines every job runs first, e.g. 'source .venv/bin/activate'.")
    port: int = option(29500, "Port of stage two's c10d rendezvous on the first node (several nodes).")
    defaults: dict = file_option("sbatch resources of every job: partition, account, qos, time (quote it: "
                                 "'04:00:00'), cpus (per task), mem, gpus (per node), constraint, signal "
                                 "(USR1@120), extra (more #SBATCH lines).")
    jobs: dict = file_option("Resources per job kind (teacher, merge, student, eval) over the defaults; "
                             "teacher: array (tasks); student: nodes, procs_per_node.")
    env: dict = file_option("Environment variables every job exports.")
    teacher: dict = file_option("distill teacher options (as in its --config file), without the shard index/count.")
    student: dict = file_option("distill student options; train_store defaults to the teacher's out.")
    eval: list = file_option("A list of distill eval option sets; model defaults to the student's model.")
    report: dict = file_option("distill report options; runs default to the evals' outs.")

    def __post_init__(self):
        problems = []
        if not self.out and not self.resubmit:
            problems.append("no --out given")
        if self.out and self.resubmit:
            problems.append("--resubmit DIR reads what DIR holds: pass it without --out")
        for name in ("defaults", "jobs", "env", "teacher", "student", "report"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                problems.append(f"{name} must be a mapping, got {type(value).__name__}")
        if self.eval is not None and not (isinstance(self.eval, list) and all(isinstance(e, dict) for e in self.eval)):
            problems.append("eval must be a list of mappings (one per model)")
        if not self.resubmit and self.teacher is None:
            problems.append("no teacher section: what stage one runs")
        check(problems, "slurm")


@dataclass
class Plan:
    """Everything the scripts are made of: each stage's checked config and each job's resources."""

    teacher: Any
    student: Any
    evals: list
    report: Any
    resources: dict[str, dict]
    env: dict[str, str]
    setup: str
    workdir: Path
    port: int


def resolve(config: SlurmConfig) -> Plan:
    """Check every section as its stage would, fill in what follows from the stages before it."""
    from stages.eval import EvalConfig
    from stages.report import ReportConfig
    from stages.student import TrainConfig
    from stages.teacher import TeacherConfig

    teacher_section = dict(config.teacher or {})
    for key in ("shard_index", "num_shards"):
        if key in teacher_section:
            raise DistillError(f"slurm config: teacher.{key} is set by the job array (jobs.teacher.array); remove it")
    resources = job_resources(config)
    teacher = section(TeacherConfig, "teacher", teacher_section | {"num_shards": resources["teacher"]["array"]})
    student = section(TrainConfig, "student", {"train_store": teacher.out, "resume": "auto"} | (config.student or {}))
    if student.resume != "auto":
        raise DistillError("slurm config: student.resume must be 'auto' (a requeued job continues its checkpoint)")
    evals = [section(EvalConfig, f"eval[{i}]", {"model": str(Path(student.out) / "model")} | e)
             for i, e in enumerate(config.eval or [{"out": str(Path(student.out) / "eval.json")}])]
    report = section(ReportConfig, "report", {"runs": [e.out for e in evals]} | (config.report or {}))
    env = {str(k): str(v) for k, v in (config.env or {}).items()}
    workdir = Path(config.workdir or os.getcwd()).resolve()
    return Plan(teacher, student, evals, report, resources, env, config.setup, workdir, config.port)


def section(cls: type, name: str, values: dict) -> Any:
    """A stage's config from its section, with the section named in any error."""
    try:
        return load_config(cls, None, **values)
    except DistillError as e:
        raise DistillError(f"slurm config, {name}: {e}") from None
    except TypeError as e:
        raise DistillError(f"slurm config, {name}: {e}") from None


def job_resources(config: SlurmConfig) -> dict[str, dict]:
    defaults = dict(config.defaults or {})
    _known(defaults, RESOURCES, "defaults")
    jobs = dict(config.jobs or {})
    _known(jobs, tuple(JOB_RESOURCES), "jobs")
    out = {}
    for kind, allowed in JOB_RESOURCES.items():
        own = dict(jobs.get(kind) or {})
        _known(own, allowed, f"jobs.{kind}")
        merged = {"time": "01:00:00", "cpus": 1, "gpus": 0, "extra": []} | defaults | own
        merged["time"] = _time(merged["time"], f"jobs.{kind}.time")
        if kind == "teacher":
            merged["array"] = _positive(merged.get("array", 1), "jobs.teacher.array")
        if kind == "student":
            merged["nodes"] = _positive(merged.get("nodes", 1), "jobs.student.nodes")
            merged["procs_per_node"] = _positive(merged.get("procs_per_node", max(int(merged["gpus"]), 1)),
                                                 "jobs.student.procs_per_node")
        if kind in ("teacher", "student"):
            merged.setdefault("signal", "USR1@120")
        out[kind] = merged
    return out


def _known(values: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(allowed)}"
            raise DistillError(f"slurm config: unknown key '{key}' in {where} ({hint})")


def _positive(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DistillError(f"slurm config: {where} must be a whole number ≥ 1, got {value!r}")
    return value


def _time(value: Any, where: str) -> str:
    """SLURM's [D-]HH:MM:SS. YAML reads an unquoted 04:00:00 as 14400 (base 60): take it as seconds."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        h, rest = divmod(value, 3600)
        return f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"
    if isinstance(value, str) and re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){0,2}", value):
        return value
    raise DistillError(f"slurm config: {where} must be a SLURM time such as '04:00:00' or '1-00:00:00', got {value!r}")


# ------------------------------------------------------------------------------------------------
# the scripts


def header(name: str, what: str, res: dict, log: Path, array: str | None = None, nodes: int = 1,
           tasks_per_node: int = 1) -> list[str]:
    lines = ["#!/bin/bash", f"# {what}", "# Written by `distill slurm`; change the YAML and run it again rather than edit this.",
             f"#SBATCH --job-name=distill-{name}"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    for key, flag in (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("constraint", "constraint")):
        if res.get(key):
            lines.append(f"#SBATCH --{flag}={res[key]}")
    lines += [f"#SBATCH --time={res['time']}", f"#SBATCH --nodes={nodes}", f"#SBATCH --ntasks-per-node={tasks_per_node}",
              f"#SBATCH --cpus-per-task={res['cpus']}"]
    if res.get("mem"):
        lines.append(f"#SBATCH --mem={res['mem']}")
    if int(res.get("gpus") or 0):
        lines.append(f"#SBATCH --gres=gpu:{int(res['gpus'])}")
    if res.get("signal"):
        lines += [f"#SBATCH --signal={res['signal']}   # the pre-emption warning: stop cleanly, exit {PREEMPTED}",
                  "#SBATCH --requeue", "#SBATCH --open-mode=append   # a requeued run adds to the log"]
    lines.append(f"#SBATCH --output={log}")
    lines += [f"#SBATCH {line}" for line in res.get("extra") or []]
    return lines


def prologue(plan: Plan) -> list[str]:
    lines = ["", "set -euo pipefail", f"cd {shlex.quote(str(plan.workdir))}"]
    lines += [line for line in plan.setup.splitlines() if line.strip()]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(plan.env.items())]
    return lines + ['echo "$(date -Is) ${SLURM_JOB_NAME} job ${SLURM_JOB_ID} on $(hostname)"']


def requeue_on(condition: str, job: str) -> list[str]:
    return [f"if {condition}; then  # pre-empted: what is done is kept; the requeued job continues",
            '    echo "$(date -Is) pre-empted; requeueing"',
            f"    scontrol requeue {job}",
            "    exit 0",
            "fi"]


def scripts(plan: Plan, out: Path) -> dict[str, str]:
    conf, logs = out / "config", out / "logs"
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    res = plan.resources
    n = res["teacher"]["array"]
    teacher = header("teacher", f"Stage one: {n} array task(s); task i runs the teacher over shards i, i+{n}, … "
                     f"of {plan.teacher.out}.", res["teacher"], logs / "teacher-%A_%a.out", array=f"0-{n - 1}")
    teacher += prologue(plan) + [
        "status=0",
        f'srun --ntasks=1 --cpus-per-task={res["teacher"]["cpus"]} distill teacher --config {q(conf / "teacher.yaml")} '
        f'--shard-index "$SLURM_ARRAY_TASK_ID" --num-shards {n} || status=$?',
        *requeue_on(f'[ "$status" -eq {PREEMPTED} ]', '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'),
        'exit "$status"']
    merge = header("merge", "Once every stage-one task succeeded: write index.json, then check every shard.",
                   res["merge"], logs / "merge-%j.out")
    merge += prologue(plan) + [f"distill merge {q(plan.teacher.out)}", f"distill inspect {q(plan.teacher.out)} --verify"]

    s = res["student"]
    nodes, procs = s["nodes"], s["procs_per_node"]
    run = (f"-m stages.cli student --config {q(conf / 'student.yaml')}")
    if nodes == 1:
        launch = f"python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node={procs} {run}"
    else:
        launch = (f"python -m torch.distributed.run --nnodes={nodes} --nproc_per_node={procs} --rdzv_backend=c10d "
                  f'--rdzv_endpoint="$head:{plan.port}" --rdzv_id="$SLURM_JOB_ID" {run}')
    preempted = Path(plan.student.out) / "preempted.json"
    student = header("student", f"Stage two: {nodes} node(s) × {procs} process(es) under torchrun, from "
                     f"{plan.student.train_store} to {plan.student.out}.", s, logs / "student-%j.out", nodes=nodes)
    student += prologue(plan) + [
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the rendezvous host',
        "export head",
        f"rm -f {q(preempted)}  # written again only if this run is pre-empted",
        "status=0",
        "# torchrun ignores USR1 (set before exec, inherited), so the signal reaches only the trainers",
        f"srun --ntasks-per-node=1 --cpus-per-task={s['cpus']} bash -c {shlex.quote(IGNORE_USR1 + launch)} || status=$?",
        *requeue_on(f"[ -f {q(preempted)} ]", '"$SLURM_JOB_ID"'),
        'exit "$status"']
    evals = header("eval", "Evaluate every model, then compare them in a report.", res["eval"], logs / "eval-%j.out")
    evals += prologue(plan)
    evals += [f"distill eval --config {q(conf / f'eval-{i}.yaml')}" for i in range(len(plan.evals))]
    evals += [f"distill report --config {q(conf / 'report.yaml')}"]
    return {SCRIPTS[k]: "\n".join(v) + "\n" for k, v in
            (("teacher", teacher), ("merge", merge), ("student", student), ("eval", evals))}


def write(plan: Plan, out: Path, raw: dict) -> None:
    """The scripts, the stage configs they read and the slurm config itself, each written atomically."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    configs = {"teacher.yaml": plan.teacher, "student.yaml": plan.student, "report.yaml": plan.report}
    configs |= {f"eval-{i}.yaml": e for i, e in enumerate(plan.evals)}
    for name, stage in configs.items():
        body = {k: v for k, v in to_dict(stage).items() if not (name == "teacher.yaml" and k in ("shard_index", "num_shards"))}
        atomic_write_text(out / "config" / name, yaml.safe_dump(body, sort_keys=True))
    for name, text in scripts(plan, out).items():
        atomic_write_text(out / name, text)
        os.chmod(out / name, 0o755)
    atomic_write_text(out / "slurm.json", json.dumps(raw, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------
# submitting


def sbatch(script: Path, dependency: str | None = None, array: str | None = None) -> str:
    args = ["sbatch", "--parsable"]
    if dependency:
        args.append(f"--dependency=afterok:{dependency}")
    if array:
        args.append(f"--array={array}")
    try:
        done = subprocess.run(args + [str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise DistillError("sbatch is not on PATH: run distill slurm --submit on a SLURM login node "
                           "(or submit the scripts in OUT yourself)") from None
    if done.returncode != 0:
        why = " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"
        raise DistillError(f"sbatch {script.name} failed: {why}")
    return done.stdout.strip().split(";")[0]


def submit(out: Path, kinds: list[str], array: str | None = None) -> dict[str, str]:
    """Submit ``kinds`` in pipeline order, each after the one before; record the ids in jobs.json."""
    ids, previous = {}, None
    for kind in kinds:
        previous = ids[kind] = sbatch(out / SCRIPTS[kind], previous, array if kind == "teacher" else None)
    history = json.loads((out / "jobs.json").read_text()).get("history", []) if (out / "jobs.json").exists() else []
    record = {"jobs": ids, "array": array, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(out / "jobs.json", json.dumps({**record, "history": history + [record]}, indent=2) + "\n")
    for kind, job in ids.items():
        print(f"{kind:>8}  job {job}" + (f"  (tasks {array})" if kind == "teacher" and array else ""))
    return ids


def missing_tasks(plan: Plan) -> list[int]:
    """Stage-one tasks whose shards are not all recorded in their partial index (all of them when
    the store has none yet)."""
    from pipeline.store import contract as store_lib

    root, n = Path(plan.teacher.out), plan.resources["teacher"]["array"]
    if not root.is_absolute():
        root = plan.workdir / root
    if (root / store_lib.INDEX).exists():
        return []
    tasks = []
    for job in range(n):
        part = store_lib.read_partial_index(store_lib.partial_index_path(root, job, n))
        if not part:
            tasks.append(job)
            continue
        p = part["params"]
        total = math.ceil(p["rows"] / p["rows_per_shard"])
        owned = {store_lib.shard_name(j, part["backend"]) for j in range(job, total, n)}
        if owned - {e["name"] for e in part["shards"] if (root / e["name"]).exists()}:
            tasks.append(job)
    return tasks


def resubmit(out: Path) -> dict[str, str]:
    if not (out / "slurm.json").is_file():
        raise DistillError(f"{out} holds no slurm.json: pass the --out of an earlier `distill slurm` run")
    raw = json.loads((out / "slurm.json").read_text())
    plan = resolve(load_config(SlurmConfig, None, **{**raw, "out": str(out)}))
    tasks = missing_tasks(plan)
    student_out = Path(plan.student.out) if Path(plan.student.out).is_absolute() else plan.workdir / plan.student.out
    student_done = (student_out / "metrics.json").is_file() and (student_out / "model").is_dir()
    if tasks:
        kinds, array = ["teacher", "merge", "student", "eval"], ",".join(map(str, tasks))
    elif not (_abs(plan, plan.teacher.out) / "index.json").exists():
        kinds, array = ["merge", "student", "eval"], None
    elif not student_done:
        kinds, array = ["student", "eval"], None
    else:
        kinds, array = ["eval"], None
    print(f"{out}: resubmitting {', '.join(kinds)}" + (f" (stage-one tasks {array})" if array else ""))
    return submit(out, kinds, array)


def _abs(plan: Plan, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else plan.workdir / path


def slurm(config: SlurmConfig) -> dict[str, str] | None:
    if config.resubmit:
        return resubmit(Path(config.resubmit))
    plan = resolve(config)
    out = Path(config.out).resolve()
    raw = {k: v for k, v in to_dict(config).items() if k not in ("out", "submit", "resubmit")}
    raw["workdir"] = str(plan.workdir)
    write(plan, out, raw)
    print(f"{out}: wrote {', '.join(SCRIPTS.values())} (stage one: {plan.resources['teacher']['array']} tasks)")
    if not config.submit:
        print("run it again with --submit to submit them in order (or sbatch each, chained with "
              "--dependency=afterok:ID)")
        return None
    return submit(out, list(SCRIPTS))

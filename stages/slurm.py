"""``distill slurm``: the whole pipeline as SLURM batch jobs, from one YAML file.

One file says what each stage runs (its ``distill`` options, checked here exactly as the stage
would check them) and what each kind of job asks the cluster for. ``distill slurm`` writes, under
``--out``, a readable script per job and the resolved config of each stage:

    0a-prepare.sbatch  (with a prepare section) stage 0 as a job array: task i of n tokenizes its share of
                       the raw files (distill prepare --shard-index i --num-shards n)
    0b-merge-tokens.sbatch  after every prepare task succeeded: distill merge cuts the tokens store's rows
    1-teacher.sbatch   stage one as a job array: task i of n writes shards i, i+n, … (--shard-index);
                       with jobs.teacher.procs_per_node / nodes, each task runs nodes × procs_per_node
                       processes, one per GPU, each owning the shards of its global index
    2-merge.sbatch     after every task succeeded: distill merge, then distill inspect --verify
    3-student.sbatch   after the merge: stage two under torchrun (one node, or srun + c10d rendezvous
                       on the first host of the allocation)
    4-eval.sbatch      after the student: distill eval of each model, then distill report

``--submit`` submits them in that order with ``sbatch --parsable``, each depending (``afterok``) on
the one before, and writes the job ids to ``OUT/jobs.json``: with a prepare section, a whole run from
raw files to the report is one ``--submit``. ``--resubmit OUT`` looks at what is done — which units
the prepare tasks have not tokenized, which shards the store lacks, whether the student finished —
and submits only what is left: the prepare or stage-one tasks that still owe work (both are
idempotent) and the jobs after them.

The prepare array asks for no GPU unless ``jobs.prepare.gpus`` says so (``defaults.gpus`` is for the
model stages) and takes no pre-emption signal: a killed task keeps the units it recorded, and its
rerun continues from them.

Stage one on whole nodes (issue #33): with ``jobs.teacher.procs_per_node`` N (and ``nodes`` M) an
array task is one ``srun`` of M × N processes; process p (``SLURM_PROCID``) of task t runs ``distill
teacher --shard-index t·M·N + p --num-shards array·M·N``, so each has its own lock and partial index
and resumes on its own, as an array task does (a requeued or resubmitted task reruns all its
processes; those done find nothing left). On GPUs the job asks for ``--gres=gpu:N`` a node and each
process takes the ``SLURM_LOCALID``-th GPU SLURM gave its node's step (``PIN_GPU`` says why not
``--gpus-per-task``). Arrays may be throttled: ``array: "N%M"``. More owners than the store's shards:
refused by ``check_shard_owners`` where the count is known now, else each idle process says so and
exits 0 (``stages/teacher.py``).

Pre-emption: the teacher and student jobs ask for ``--signal=USR1@SECONDS`` and ``--requeue``. The
signal reaches every process of the job step; stage one finishes its shard, stage two its step and a
checkpoint, and both exit with status 75 (stage two also writes ``OUT/preempted.json``, since
torchrun does not pass its workers' status on). The script then requeues the job, which resumes.
torchrun itself is started with USR1 ignored (inherited over ``exec``), so only the workers act on it.

On-policy rounds (``--rounds ROUNDS.yaml``, issue #25): the YAML then holds only resources, and every
step of every round of that ``distill rounds`` config becomes one job (``OUT/round-RRR/NN-STEP.sbatch``),
each ``afterok`` the one before: ``rounds --step prompts``, a generate array (``jobs.generate.array``),
prepare, a stage-one array and its merge, the student under torchrun, the held-out generate array,
prepare, stage-one array and merge, eval, ``rounds --step finish``. Each stage reads the config that
``stages.rounds.steps`` gives, saved where ``distill rounds`` saves it, and the rounds config is pinned
in its OUT first (``_claim``), so ``distill rounds`` there afterwards runs (or skips) the same steps.
``--resubmit`` skips finished rounds and done steps (``Step.done``) and narrows the first unfinished
array to the tasks that still owe shards or parts.

CPUs: each job asks for ``--cpus-per-task`` (``cpus``), and its ``srun`` lines ask for it again (since
SLURM 22.05 a step no longer inherits it from the allocation and would get one CPU per task). Each
stage sets torch's threads from ``SLURM_CPUS_PER_TASK`` (``pipeline/threads.py``; stage two's
torchrun processes share the task's CPUs), unless the stage's config sets ``threads``.

Hostile values: a shared YAML file must not run commands through the scripts. Every resource is checked
by type before anything is written (``SlurmConfig``: counts are whole numbers; time, memory, signal,
partition/account/qos names and constraints by SLURM's grammar; env keys are shell names; extra lines
are '--' options), no value that lands in a script (those, env values, paths in commands and comments)
may hold a control character, and each is quoted where it is interpolated: ``shlex.quote`` in shell
lines and in #SBATCH lines (sbatch reads those with the same quoting). ``setup`` alone is shell by design.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import subprocess
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.config import check, load_config, option, to_dict
from pipeline.errors import DistillError
from pipeline.io import atomic_write_text
from pipeline.preempt import EXIT_PREEMPTED as PREEMPTED  # a stage stopped by the pre-emption signal

IGNORE_USR1 = 'trap "" USR1; exec '  # torchrun then ignores USR1; its workers install their own handler
RESOURCES = ("partition", "account", "qos", "time", "cpus", "mem", "gpus", "constraint", "signal", "extra")
JOB_RESOURCES = {"prepare": tuple(r for r in RESOURCES if r != "signal") + ("array",),
                 "teacher": RESOURCES + ("array", "nodes", "procs_per_node"), "merge": RESOURCES,
                 "student": RESOURCES + ("nodes", "procs_per_node"), "eval": RESOURCES,
                 "generate": RESOURCES + ("array",)}  # generate: the --rounds' generate arrays only
SCRIPTS = {"teacher": "1-teacher.sbatch", "merge": "2-merge.sbatch", "student": "3-student.sbatch",
           "eval": "4-eval.sbatch"}
PREPARE_SCRIPTS = {"prepare": "0a-prepare.sbatch", "merge-tokens": "0b-merge-tokens.sbatch"}  # before SCRIPTS


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
    rounds: str = option("", "A `distill rounds` config file: write its rounds 0 … R as chained jobs (generate "
                         "array, prepare, stage-one array, merge, student, held-out estimate, finish), instead of "
                         "the teacher, student, eval and report sections.")
    workdir: str = option("", "Directory every job runs in (default: where distill slurm runs).")
    setup: str = option("", "Shell lines every job runs first, e.g. 'source .venv/bin/activate'.")
    port: int = option(29500, "Port of stage two's c10d rendezvous on the first node (several nodes).")
    defaults: dict = file_option("sbatch resources of every job: partition, account, qos, time (quote it: "
                                 "'04:00:00'), cpus (per task), mem, gpus (per node), constraint, signal "
                                 "(USR1@120), extra (more sbatch options, one '--…' per line).")
    jobs: dict = file_option("Resources per job kind (prepare, teacher, merge, student, eval; with --rounds also "
                             "generate) over the defaults; prepare, teacher and generate: array (tasks, or 'N%M': "
                             "N tasks, at most M at once); teacher and student: nodes, procs_per_node (a stage-one "
                             "process per GPU).")
    env: dict = file_option("Environment variables every job exports.")
    prepare: dict = file_option("distill prepare options, without the shard index/count: the chain then starts "
                                "from raw files with a prepare array (jobs.prepare.array) and its merge; "
                                "teacher.tokens_store defaults to its out.")
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
        for name in ("defaults", "jobs", "env", "prepare", "teacher", "student", "report"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                problems.append(f"{name} must be a mapping, got {type(value).__name__}")
        if self.eval is not None and not (isinstance(self.eval, list) and all(isinstance(e, dict) for e in self.eval)):
            problems.append("eval must be a list of mappings (one per model)")
        stage_sections = [name for name in ("prepare", "teacher", "student", "eval", "report")
                          if getattr(self, name) is not None]
        if self.rounds and stage_sections:
            problems.append(f"--rounds takes every stage's options from the rounds config: remove the "
                            f"{', '.join(stage_sections)} section{'s' if len(stage_sections) > 1 else ''}")
        if not self.resubmit and not self.rounds and self.teacher is None:
            problems.append("no teacher section: what stage one runs (or --rounds ROUNDS.yaml)")
        for name in ("out", "resubmit", "rounds", "workdir"):
            problems += _text_problems(getattr(self, name), "--" + name if name != "workdir" else name)
        if any(_control(c) for c in self.setup.replace("\n", "").replace("\t", "")):
            problems.append(f"setup must not hold control characters other than newlines and tabs, got {self.setup!r}")
        if not 1 <= self.port <= 65535:
            problems.append(f"port must be a TCP port, 1 … 65535, got {self.port}")
        if isinstance(self.defaults, dict | None) and isinstance(self.jobs, dict | None):
            problems += resource_problems(self.defaults or {}, self.jobs or {}, bool(self.rounds))
            if "prepare" in (self.jobs or {}) and self.prepare is None:
                problems.append("jobs.prepare is for a prepare section (distill prepare's options); add one or "
                                "remove jobs.prepare")
        if isinstance(self.env, dict):
            problems += env_problems(self.env)
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
    prepare: Any = None  # PrepareConfig (its num_shards the array's size), or None: the tokens store exists

    def kinds(self) -> list[str]:
        """The jobs, in the order they run."""
        return [*(PREPARE_SCRIPTS if self.prepare is not None else ()), *SCRIPTS]


def resolve(config: SlurmConfig, resubmitting: bool = False) -> Plan:
    """Check every section as its stage would, fill in what follows from the stages before it. The
    shard owners are checked against the store's shards when the scripts are written, not when they
    are resubmitted: by then the scripts and the partial indexes have their number."""
    from stages.eval import EvalConfig
    from stages.prepare import PrepareConfig
    from stages.report import ReportConfig
    from stages.student import TrainConfig
    from stages.teacher import TeacherConfig

    teacher_section = dict(config.teacher or {})
    for name, values in (("prepare", config.prepare or {}), ("teacher", teacher_section)):
        for key in ("shard_index", "num_shards"):
            if key in values:
                raise DistillError(f"slurm config: {name}.{key} is set by the job array (jobs.{name}.array); "
                                   "remove it")
    resources = job_resources(config)
    prepare = None
    if config.prepare is not None:
        prepare = section(PrepareConfig, "prepare", dict(config.prepare) | {"num_shards": resources["prepare"]["array"]})
        if "-" in prepare.inputs:
            raise DistillError("slurm config, prepare: --input - (standard input) has no meaning in a batch job; "
                               "name the files")
        if prepare.workers > resources["prepare"]["cpus"]:
            raise DistillError(f"slurm config: prepare.workers {prepare.workers} is more than the "
                               f"{resources['prepare']['cpus']} CPUs a prepare task asks for (jobs.prepare.cpus); "
                               "raise cpus or lower workers")
        _check_paths({"prepare.out": prepare.out, **{f"prepare.inputs[{i}]": p for i, p in enumerate(prepare.inputs)}},
                     "slurm config")
        tokens_store = teacher_section.setdefault("tokens_store", prepare.out)
        if Path(tokens_store) != Path(prepare.out):
            raise DistillError(f"slurm config: teacher.tokens_store {tokens_store!r} is not prepare.out "
                               f"{prepare.out!r}: stage one would not read what prepare writes; drop "
                               "teacher.tokens_store (it defaults to prepare.out)")
    teacher = section(TeacherConfig, "teacher", teacher_section | {"num_shards": shard_owners(resources["teacher"])[1]})
    workdir = Path(config.workdir or os.getcwd()).resolve()
    if not resubmitting:
        check_shard_owners(teacher, resources["teacher"], workdir)
    student = section(TrainConfig, "student", {"train_store": teacher.out, "resume": "auto"} | (config.student or {}))
    if student.resume != "auto":
        raise DistillError("slurm config: student.resume must be 'auto' (a requeued job continues its checkpoint)")
    _check_paths({"teacher.out": teacher.out, "student.out": student.out, "student.train_store": student.train_store},
                 "slurm config")  # in the scripts' commands and comments
    evals = [section(EvalConfig, f"eval[{i}]", {"model": str(Path(student.out) / "model")} | e)
             for i, e in enumerate(config.eval or [{"out": str(Path(student.out) / "eval.json")}])]
    report = section(ReportConfig, "report", {"runs": [e.out for e in evals]} | (config.report or {}))
    env = {str(k): str(v) for k, v in (config.env or {}).items()}
    return Plan(teacher, student, evals, report, resources, env, config.setup, workdir, config.port, prepare)


def check_shard_owners(teacher: Any, res: dict, workdir: Path) -> None:
    """More shard owners (array × nodes × procs_per_node) than the store will have shards: refused in one
    line where the number of shards is known now, from the tokens store's rows (where it exists) or
    bounded by teacher.max_rows. Where it is not (prepare writes the tokens later), a process that owns
    no shard says so and exits 0 before its teacher loads (stages/teacher.py)."""
    from pipeline.store import contract as store_lib

    owners = shard_owners(res)[1]
    tokens = Path(teacher.tokens_store) if Path(teacher.tokens_store).is_absolute() else workdir / teacher.tokens_store
    rows = None
    if (tokens / store_lib.INDEX).is_file():
        with contextlib.suppress(DistillError):  # a damaged store: stage one says what is wrong with it
            rows = store_lib.open_store(tokens, check=False).rows
    rps = teacher.rows_per_shard
    layout = (f"{owners} shard owners (jobs.teacher.array {res['array']} × nodes {res['nodes']} × procs_per_node "
              f"{res['procs_per_node']})")
    if rows is not None:
        rows = min(rows, teacher.max_rows) if teacher.max_rows else rows
        shards = math.ceil(rows / rps)
        if owners <= shards:
            return
        fits = math.ceil(rows / (owners - 1)) - 1  # the largest rows_per_shard r with ceil(rows / r) ≥ owners
        smaller = f", or teacher.rows_per_shard at most {fits}" if fits >= 1 else ""
        raise DistillError(f"slurm config: stage one has {layout} but the store will have {shards} shards ({rows} "
                           f"rows of {teacher.tokens_store}, {rps} a shard): {owners - shards} would have nothing to "
                           f"do; make array × nodes × procs_per_node at most {shards}{smaller}")
    if teacher.max_rows and owners > (bound := math.ceil(teacher.max_rows / rps)):
        raise DistillError(f"slurm config: stage one has {layout} but the store will have at most {bound} shards "
                           f"(teacher.max_rows {teacher.max_rows}, rows_per_shard {rps}): at least {owners - bound} "
                           f"would have nothing to do; make array × nodes × procs_per_node at most {bound}")


def section(cls: type, name: str, values: dict) -> Any:
    """A stage's config from its section, with the section named in any error."""
    try:
        return load_config(cls, None, **values)
    except DistillError as e:
        raise DistillError(f"slurm config, {name}: {e}") from None
    except TypeError as e:
        raise DistillError(f"slurm config, {name}: {e}") from None


def job_resources(config: SlurmConfig) -> dict[str, dict]:
    """Each job kind's resources: its own over the defaults over distill's (checked by ``SlurmConfig``)."""
    defaults, jobs = dict(config.defaults or {}), dict(config.jobs or {})
    out = {}
    for kind in JOB_RESOURCES:
        merged = {"time": "01:00:00", "cpus": 1, "gpus": 0, "extra": []} | defaults | dict(jobs.get(kind) or {})
        if kind == "prepare":  # a CPU stage: no GPU unless it asks, no pre-emption signal it would not handle
            merged["gpus"] = (jobs.get(kind) or {}).get("gpus", 0)
            merged.pop("signal", None)
        merged["time"] = _time(merged["time"])
        if not isinstance(merged["extra"], list):  # one line, or none
            merged["extra"] = [merged["extra"]] if merged["extra"] else []
        if kind in ("prepare", "teacher", "generate"):
            merged["array"], merged["throttle"] = array_size(merged.get("array", 1))
        if kind in ("teacher", "student"):
            merged.setdefault("nodes", 1)
        if kind == "student":
            merged.setdefault("procs_per_node", max(merged["gpus"], 1))
        if kind == "teacher":
            merged.setdefault("procs_per_node", 1)
            if merged["procs_per_node"] > 1 and "gpus" not in (jobs.get(kind) or {}):
                # one GPU per process: a job on GPUs asks for procs_per_node of them a node
                merged["gpus"] = merged["procs_per_node"] if merged["gpus"] >= 1 else 0
        if kind in ("teacher", "student"):
            merged.setdefault("signal", "USR1@120")
        out[kind] = merged
    return out


# What sbatch accepts for each resource, as SLURM's manual writes it, and nothing a shell or sbatch's
# own #SBATCH parser (whitespace splits, quotes and backslashes group, # starts a comment) reads more into.
COUNTS = {"cpus": 1, "gpus": 0, "nodes": 1, "procs_per_node": 1}  # whole numbers ≥ this
# array: N tasks, or 'N%M' (at most M running at once; sbatch's --array=0-(N-1)%M), 1 ≤ M ≤ N
THROTTLED_ARRAY = re.compile(r"([0-9]+)%([0-9]+)")
ARRAY = ("a whole number ≥ 1 or 'N%M' (N tasks, at most M of them running at once, 1 ≤ M ≤ N), "
         "e.g. 64 or '64%16'")
GRAMMAR = {
    "partition": (r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*",
                  "SLURM names: letters, digits and _ . - (a comma between partitions)"),
    "account": (r"[A-Za-z0-9_.\-]+", "a SLURM name: letters, digits and _ . -"),
    "qos": (r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*", "SLURM names: letters, digits and _ . - (a comma between QOS)"),
    # --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit
    "time": (r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|(?i:unlimited|infinite)",
             "a SLURM time such as '04:00:00' or '1-00:00:00' (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, "
             "UNLIMITED) or a number of seconds"),
    "mem": (r"\d+[KMGTkmgt]?", "<number>[K|M|G|T] (megabytes without a unit), e.g. 32G"),
    # --signal=[{R|B}:]<sig_num>[@sig_time]: a number or a name (USR1, SIGUSR1), seconds before the end
    "signal": (r"([RB]{1,2}:)?(\d{1,2}|[A-Za-z][A-Za-z0-9]{0,15})(@\d{1,5})?",
               "[R:|B:]SIGNAL[@SECONDS], e.g. USR1@120 or B:TERM@60"),
    # --constraint: features (letters, digits, _ . : = + -) joined by & | , with *COUNT, [ ] and ( )
    "constraint": (r"[A-Za-z0-9_.:=+\-&|,*!\[\]()]+",
                   "node features (letters, digits, _ . : = + -) joined by & | , with *COUNT, [ ] and ( )"),
}
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def resource_problems(defaults: dict, jobs: dict, rounds: bool) -> list[str]:
    """Everything wrong with the defaults and each job kind's resources, each named where it is set."""
    problems = _unknown(defaults, RESOURCES, "defaults") + _unknown(jobs, tuple(JOB_RESOURCES), "jobs")
    if "generate" in jobs and not rounds:
        problems.append("jobs.generate is for --rounds (the rounds' generate arrays); remove it")
    sections = [("defaults", defaults)]
    for kind in JOB_RESOURCES:
        own = jobs.get(kind)
        if own is not None and not isinstance(own, dict):
            problems.append(f"jobs.{kind} must be a mapping of resources, got {own!r}")
            continue
        problems += _unknown(own or {}, JOB_RESOURCES[kind], f"jobs.{kind}")
        sections.append((f"jobs.{kind}", own or {}))
    for where, values in sections:
        for key, value in values.items():
            if key in RESOURCES + ("array", "nodes", "procs_per_node"):
                problems += _resource_problems(key, value, f"{where}.{key}")
    teacher = jobs.get("teacher") if isinstance(jobs.get("teacher"), dict) else {}
    procs, gpus = teacher.get("procs_per_node"), teacher.get("gpus")
    if _whole(procs) and procs > 1 and _whole(gpus) and gpus not in (0, procs):
        problems.append(f"jobs.teacher.gpus must be {procs}, one GPU per process of procs_per_node {procs} (or leave "
                        f"it out), or 0 to run on CPUs, got {gpus}")
    return problems


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def array_size(value: Any) -> tuple[int, int | None] | None:
    """(tasks, at most this many at once or None) of an ``array`` value; None where it is not one."""
    if _whole(value):
        return (value, None) if value >= 1 else None
    if isinstance(value, str) and (m := THROTTLED_ARRAY.fullmatch(value)):
        tasks, at_once = int(m.group(1)), int(m.group(2))
        return (tasks, at_once) if 1 <= at_once <= tasks else None
    return None


def array_spec(tasks: str, throttle: int | None) -> str:
    """sbatch's --array value: the task ids (``0-7``, ``1,3``) and the throttle, ``%M``, where one is set."""
    return tasks + (f"%{int(throttle)}" if throttle else "")


def _resource_problems(key: str, value: Any, where: str) -> list[str]:
    if key == "array":
        return [] if array_size(value) is not None else [f"{where} must be {ARRAY}, got {value!r}"]
    if key in COUNTS:
        if _whole(value) and value >= COUNTS[key]:
            return []
        return [f"{where} must be a whole number ≥ {COUNTS[key]}, got {value!r}"]
    if key == "extra":
        lines = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(lines, list):
            return [f"{where} must be a list of sbatch options (each a line such as '--exclusive'), got {value!r}"]
        problems = []
        for line in lines:
            if not isinstance(line, str) or not line.startswith("--"):
                problems.append(f"{where}: each line must be one sbatch option and start with '--' "
                                f"(e.g. '--exclusive'), got {line!r}")
            else:
                problems += _text_problems(line, where)
        return problems
    if key in ("time", "mem") and isinstance(value, int) and not isinstance(value, bool) and value >= (key == "time"):
        return []  # seconds (YAML reads an unquoted 04:00:00 as 14400), megabytes
    if key not in ("time",) and value in (None, ""):
        return []  # not asked for (signal: no pre-emption warning)
    pattern, allowed = GRAMMAR[key]
    if isinstance(value, str | int) and not isinstance(value, bool) and re.fullmatch(pattern, str(value)):
        return []
    return [f"{where} must be {allowed}, got {value!r}"]


def env_problems(env: dict) -> list[str]:
    problems = []
    for key, value in env.items():
        if not (isinstance(key, str) and ENV_KEY.fullmatch(key)):
            problems.append(f"env key {key!r} must be a shell name: letters, digits and _, not starting with a digit")
        elif not isinstance(value, str | int | float | bool):
            problems.append(f"env.{key} must be a string or a number, got {value!r}")
        else:
            problems += _text_problems(str(value), f"env.{key}")
    return problems


def _control(char: str) -> bool:
    return unicodedata.category(char) == "Cc"  # C0 (newline, return, NUL, escape, tab …), DEL and C1


def _text_problems(value: Any, where: str) -> list[str]:
    """A value the scripts quote (a path, an env value, an #SBATCH line): any text but control characters,
    which would end a comment or an #SBATCH line and start a shell line."""
    if isinstance(value, str) and any(_control(c) for c in value):
        return [f"{where} must not hold control characters (newline, carriage return, NUL, tab, escape …), "
                f"got {value!r}"]
    return []


def _check_paths(paths: dict[str, Any], where: str) -> None:
    """Refuse, in one line, every path of a stage's config that lands in a script with a control character."""
    problems = [p for name, path in paths.items() for p in _text_problems(str(path), name)]
    if problems:
        raise DistillError(f"{where}: " + "; ".join(problems))


def _unknown(values: dict, allowed: tuple[str, ...], where: str) -> list[str]:
    problems = []
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(allowed)}"
            problems.append(f"unknown key {str(key)!r} in {where} ({hint})")
    return problems


def _time(value: str | int) -> str:
    """A checked SLURM time; YAML reads an unquoted 04:00:00 as 14400 (base 60): taken as seconds."""
    if isinstance(value, int):
        h, rest = divmod(value, 3600)
        return f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return value


# ------------------------------------------------------------------------------------------------
# the scripts


def header(name: str, what: str, res: dict, log: Path, array: str | None = None, nodes: int = 1,
           tasks_per_node: int = 1) -> list[str]:
    """The #SBATCH lines. Each value was checked against what sbatch accepts and is quoted as sbatch reads
    its #SBATCH lines (as a shell would: quotes group, # starts a comment), so a path with a space is one
    option; the lines are comments to bash."""
    def sbatch(flag: str, value: Any) -> str:
        return f"#SBATCH --{flag}={shlex.quote(str(value))}"

    lines = ["#!/bin/bash", comment(what), "# Written by `distill slurm`; change the YAML and run it again rather than edit this.",
             sbatch("job-name", f"distill-{name}")]
    if array:
        lines.append(sbatch("array", array))
    for key in ("partition", "account", "qos", "constraint"):
        if res.get(key):
            lines.append(sbatch(key, res[key]))
    lines += [sbatch("time", res["time"]), sbatch("nodes", int(nodes)), sbatch("ntasks-per-node", int(tasks_per_node)),
              sbatch("cpus-per-task", int(res["cpus"]))]
    if res.get("mem"):
        lines.append(sbatch("mem", res["mem"]))
    if int(res.get("gpus") or 0):
        lines.append(sbatch("gres", f"gpu:{int(res['gpus'])}"))
    if res.get("signal"):
        lines += [f"{sbatch('signal', res['signal'])}   # the pre-emption warning: stop cleanly, exit {PREEMPTED}",
                  "#SBATCH --requeue", "#SBATCH --open-mode=append   # a requeued run adds to the log"]
    lines.append(sbatch("output", log))
    lines += [f"#SBATCH {line}" for line in res.get("extra") or []]  # sbatch options, checked: '--…', one line
    return lines


def comment(text: str) -> str:
    """A script comment line: a control character (refused in every value before this) is written escaped,
    so nothing in ``text`` can end the comment and start a shell line."""
    return "# " + "".join(c.encode("unicode_escape").decode() if _control(c) else c for c in text)


def prologue(plan: Plan | RoundsPlan) -> list[str]:
    lines = ["", "set -euo pipefail", f"cd {shlex.quote(str(plan.workdir))}"]
    lines += [line for line in plan.setup.splitlines() if line.strip()]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(plan.env.items())]  # k: a checked shell name
    return lines + ['echo "$(date -Is) ${SLURM_JOB_NAME} job ${SLURM_JOB_ID} on $(hostname)"']


def requeue_on(condition: str, job: str) -> list[str]:
    return [f"if {condition}; then  # pre-empted: what is done is kept; the requeued job continues",
            '    echo "$(date -Is) pre-empted; requeueing"',
            f"    scontrol requeue {job}",
            "    exit 0",
            "fi"]


def shard_owners(res: dict) -> tuple[int, int]:
    """(processes per array task, shard owners in all) of stage one's resources: each process of each
    task owns the shards of its global index (``distill teacher --shard-index``)."""
    per_task = int(res["nodes"]) * int(res["procs_per_node"])
    return per_task, int(res["array"]) * per_task


def describe_owners(res: dict) -> str:
    """'4 tasks', or '2 tasks × 2 nodes × 4 processes = 16 shard owners'; and the throttle."""
    per_task, owners = shard_owners(res)
    text = _plural(res["array"], "task", "tasks")
    if per_task > 1:
        text += (f" × {_plural(res['nodes'], 'node', 'nodes')} × "
                 f"{_plural(res['procs_per_node'], 'process', 'processes')} = {owners} shard owners")
    return text + (f", at most {int(res['throttle'])} at once" if res.get("throttle") else "")


def _plural(n: int, one: str, many: str) -> str:
    return f"{int(n)} {one if int(n) == 1 else many}"


# Each stage-one process of a task on GPUs takes one of its node's: the SLURM_LOCALID-th of the GPUs
# SLURM gave the step there (CUDA_VISIBLE_DEVICES; unset, every GPU of the node is visible: 0 … N-1).
# Not srun --gpus-per-task / --gpu-bind: those need the GPUs configured as GRES in slurm.conf (a step
# asking for them on a cluster without is refused), and --gpu-bind's ids are relative or global by
# the site's cgroup setting; the list SLURM writes for the step holds the ids the process must use.
PIN_GPU = ('gpus=${{CUDA_VISIBLE_DEVICES-{every}}}; IFS=, read -ra gpus <<< "$gpus"; '
           'export CUDA_VISIBLE_DEVICES="${{gpus[$SLURM_LOCALID]:?no GPU left on this node for process '
           '$SLURM_LOCALID}}"; ')


def stage_one_array(config: Path, res: dict) -> list[str]:
    """Task t of the array runs one stage-one process, or ``nodes`` × ``procs_per_node`` of them under
    one srun; process p (SLURM_PROCID) of task t owns the shards of global index
    g = t × (nodes × procs_per_node) + p, i.e. g, g + owners, … A process stopped by the pre-emption
    signal finishes its shard and exits 75; srun returns the highest status of its processes, so the
    task is requeued when one was stopped and none failed worse, and each process's rerun continues
    from its own partial index."""
    per_task, owners = shard_owners(res)
    nodes, procs, cpus = int(res["nodes"]), int(res["procs_per_node"]), int(res["cpus"])
    teacher = f"distill teacher --config {shlex.quote(str(config))}"
    if per_task == 1:
        lines = [f'srun --ntasks=1 --cpus-per-task={cpus} {teacher} --shard-index "$SLURM_ARRAY_TASK_ID" '
                 f"--num-shards {owners} || status=$?"]
    else:
        process = (f'exec {teacher} --shard-index "$((SLURM_ARRAY_TASK_ID * {per_task} + SLURM_PROCID))" '
                   f"--num-shards {owners}")
        lines = [f"# {nodes} node(s) × {procs} process(es); each owns the shards of its global index "
                 f"(task × {per_task} + SLURM_PROCID) of {owners}"]
        if procs > 1 and int(res["gpus"]):
            process = PIN_GPU.format(every=",".join(map(str, range(procs)))) + process
            lines.append("# and takes one GPU of its node: the SLURM_LOCALID-th of those SLURM gave the step there")
        lines.append("# --kill-on-bad-exit=0: a process that fails leaves the others to finish their shards; srun's "
                     f"status is the highest of theirs ({PREEMPTED} when one was pre-empted and none failed worse)")
        lines.append(f"srun --nodes={nodes} --ntasks-per-node={procs} --cpus-per-task={cpus} --kill-on-bad-exit=0 "
                     f"bash -c {shlex.quote(process)} || status=$?")
    return ["status=0", *lines,
            *requeue_on(f'[ "$status" -eq {PREEMPTED} ]', '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'),
            'exit "$status"']


def prepare_array(config: Path, tasks: int, cpus: int) -> list[str]:
    """Task i of ``tasks`` tokenizes its share of the raw files into the tokens store's pieces."""
    return [f'srun --ntasks=1 --cpus-per-task={int(cpus)} distill prepare --config {shlex.quote(str(config))} '
            f'--shard-index "$SLURM_ARRAY_TASK_ID" --num-shards {int(tasks)}']


def stage_one_what(res: dict, store: str, label: str = "Stage one:") -> str:
    """The stage-one script's first comment."""
    per_task, owners = shard_owners(res)
    if per_task == 1:
        return (f"{label} {owners} array task(s); task i runs the teacher over shards i, i+{owners}, … of "
                f"{shlex.quote(str(store))}.")
    return (f"{label} {describe_owners(res)}; owner g (array task × {per_task} + SLURM_PROCID) runs the "
            f"teacher over shards g, g+{owners}, … of {shlex.quote(str(store))}.")


def merge_store(store: str) -> list[str]:
    return [f"distill merge {shlex.quote(store)}", f"distill inspect {shlex.quote(store)} --verify"]


def torchrun(plan: Plan | RoundsPlan, res: dict, config: Path, preempted: Path) -> list[str]:
    """Stage two under torchrun on every node of the job; requeued when it was pre-empted."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    nodes, procs = int(res["nodes"]), int(res["procs_per_node"])
    run = f"-m stages.cli student --config {q(config)}"
    if nodes == 1:
        launch = f"python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node={procs} {run}"
    else:
        launch = (f"python -m torch.distributed.run --nnodes={nodes} --nproc_per_node={procs} --rdzv_backend=c10d "
                  f'--rdzv_endpoint="$head:{int(plan.port)}" --rdzv_id="$SLURM_JOB_ID" {run}')
    return [
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the rendezvous host',
        "export head",
        f"rm -f {q(preempted)}  # written again only if this run is pre-empted",
        "status=0",
        "# torchrun ignores USR1 (set before exec, inherited), so the signal reaches only the trainers",
        f"srun --ntasks-per-node=1 --cpus-per-task={int(res['cpus'])} bash -c {shlex.quote(IGNORE_USR1 + launch)} || status=$?",
        *requeue_on(f"[ -f {q(preempted)} ]", '"$SLURM_JOB_ID"'),
        'exit "$status"']


def scripts(plan: Plan, out: Path) -> dict[str, str]:
    conf, logs = out / "config", out / "logs"
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    res = plan.resources
    t = res["teacher"]
    teacher = header("teacher", stage_one_what(t, plan.teacher.out), t, logs / "teacher-%A_%a.out",
                     array=array_spec(f"0-{t['array'] - 1}", t["throttle"]), nodes=t["nodes"],
                     tasks_per_node=t["procs_per_node"])
    teacher += prologue(plan) + stage_one_array(conf / "teacher.yaml", t)
    merge = header("merge", "Once every stage-one task succeeded: write index.json, then check every shard.",
                   res["merge"], logs / "merge-%j.out")
    merge += prologue(plan) + merge_store(plan.teacher.out)

    s = res["student"]
    nodes, procs = s["nodes"], s["procs_per_node"]
    student = header("student", f"Stage two: {nodes} node(s) × {procs} process(es) under torchrun, from "
                     f"{q(plan.student.train_store)} to {q(plan.student.out)}.", s, logs / "student-%j.out",
                     nodes=nodes)
    student += prologue(plan) + torchrun(plan, s, conf / "student.yaml", Path(plan.student.out) / "preempted.json")
    evals = header("eval", "Evaluate every model, then compare them in a report.", res["eval"], logs / "eval-%j.out")
    evals += prologue(plan)
    evals += [f"distill eval --config {q(conf / f'eval-{i}.yaml')}" for i in range(len(plan.evals))]
    evals += [f"distill report --config {q(conf / 'report.yaml')}"]
    jobs = {"teacher": teacher, "merge": merge, "student": student, "eval": evals}
    if plan.prepare is not None:
        p = res["prepare"]["array"]
        prepare = header("prepare", f"Stage 0: {p} array task(s); task i tokenizes its share of the raw files into "
                         f"{q(plan.prepare.out)} (distill merge then cuts the rows).", res["prepare"],
                         logs / "prepare-%A_%a.out", array=array_spec(f"0-{p - 1}", res["prepare"]["throttle"]))
        jobs["prepare"] = prepare + prologue(plan) + prepare_array(conf / "prepare.yaml", p, res["prepare"]["cpus"])
        tokens = header("merge-tokens", "Once every prepare task succeeded: cut the tokens store's rows from their "
                        "pieces and write its index.json, then check every shard.", res["merge"],
                        logs / "merge-tokens-%j.out")
        jobs["merge-tokens"] = tokens + prologue(plan) + merge_store(plan.prepare.out)
    names = SCRIPTS | PREPARE_SCRIPTS
    return {names[k]: "\n".join(jobs[k]) + "\n" for k in plan.kinds()}


def write(plan: Plan, out: Path, raw: dict) -> None:
    """The scripts, the stage configs they read and the slurm config itself, each written atomically."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    configs = {"teacher.yaml": plan.teacher, "student.yaml": plan.student, "report.yaml": plan.report}
    configs |= {f"eval-{i}.yaml": e for i, e in enumerate(plan.evals)}
    if plan.prepare is not None:
        configs["prepare.yaml"] = plan.prepare
    for name, stage in configs.items():
        body = {k: v for k, v in to_dict(stage).items()
                if not (name in ("teacher.yaml", "prepare.yaml") and k in ("shard_index", "num_shards"))}
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


def submit(out: Path, kinds: list[str], array: str | None = None, prepare_tasks: str | None = None) -> dict[str, str]:
    """Submit ``kinds`` in pipeline order, each after the one before (the stage-one array narrowed to
    ``array``, the prepare array to ``prepare_tasks``, where given); record the ids in jobs.json."""
    ids, previous, names = {}, None, SCRIPTS | PREPARE_SCRIPTS
    narrowed = {"teacher": array, "prepare": prepare_tasks}
    for kind in kinds:
        previous = ids[kind] = sbatch(out / names[kind], previous, narrowed.get(kind))
    history = json.loads((out / "jobs.json").read_text()).get("history", []) if (out / "jobs.json").exists() else []
    record = {"jobs": ids, "array": array, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if prepare_tasks:
        record["prepare_array"] = prepare_tasks
    atomic_write_text(out / "jobs.json", json.dumps({**record, "history": history + [record]}, indent=2) + "\n")
    for kind, job in ids.items():
        print(f"{kind:>12}  job {job}" + (f"  (tasks {narrowed[kind]})" if narrowed.get(kind) else ""))
    return ids


def missing_tasks(plan: Plan) -> list[int]:
    """Stage-one array tasks with a process whose shards are not all recorded in its partial index (all
    of them when the store has none yet)."""
    t = plan.resources["teacher"]
    return missing_shard_tasks(_abs(plan, plan.teacher.out), t["array"], shard_owners(t)[0])


def missing_prepare_tasks(root: Path, n: int) -> list[int]:
    """The tasks of an n-task prepare array into the tokens store ``root`` that have not recorded every
    unit they own (none once the store has its index)."""
    from pipeline.store import contract as store_lib

    if (root / store_lib.INDEX).exists():
        return []
    tasks = []
    for job in range(n):
        pieces = store_lib.read_partial_index(store_lib.partial_index_path(root, job, n)).get("pieces")
        done = {e["unit"] for e in (pieces or {}).get("done", []) if (root / e["name"]).is_file()}
        if pieces is None or set(pieces["owned"]) - done:
            tasks.append(job)
    return tasks


def missing_shard_tasks(root: Path, tasks: int, per_task: int = 1) -> list[int]:
    """The tasks of a ``tasks``-task stage-one array into the store ``root``, each of ``per_task``
    processes (shard owners), that have a process owing shards (none once the store has its index).
    An owner with no partial index owes its shards, unless another's says how many shards there are
    and it owns none of them."""
    from pipeline.store import contract as store_lib

    if (root / store_lib.INDEX).exists():
        return []
    owners = tasks * per_task
    parts = [store_lib.read_partial_index(store_lib.partial_index_path(root, g, owners)) for g in range(owners)]
    total = next((math.ceil(p["params"]["rows"] / p["params"]["rows_per_shard"]) for p in parts if p), None)
    owing = set()
    for g, part in enumerate(parts):
        if not part:
            if total is None or g < total:
                owing.add(g // per_task)
            continue
        owned = {store_lib.shard_name(j, part["backend"]) for j in range(g, total, owners)}
        if owned - {e["name"] for e in part["shards"] if (root / e["name"]).exists()}:
            owing.add(g // per_task)
    return sorted(owing)


def resubmit(out: Path) -> dict[str, str]:
    if not (out / "slurm.json").is_file():
        raise DistillError(f"{out} holds no slurm.json: pass the --out of an earlier `distill slurm` run")
    raw = json.loads((out / "slurm.json").read_text())
    if raw.get("rounds"):
        return resubmit_rounds(out, load_config(SlurmConfig, None, **{**raw, "out": str(out)}))
    plan = resolve(load_config(SlurmConfig, None, **{**raw, "out": str(out)}), resubmitting=True)
    if plan.prepare is not None and not (_abs(plan, plan.prepare.out) / "index.json").exists():
        n = plan.resources["prepare"]["array"]
        owed = missing_prepare_tasks(_abs(plan, plan.prepare.out), n)
        kinds = ["prepare", "merge-tokens", *SCRIPTS] if owed else ["merge-tokens", *SCRIPTS]
        narrowed = array_spec(",".join(map(str, owed)), plan.resources["prepare"]["throttle"]) \
            if owed and len(owed) < n else None
        print(f"{out}: resubmitting {', '.join(kinds)}" + (f" (prepare tasks {narrowed})" if narrowed else ""))
        return submit(out, kinds, None, narrowed)
    tasks = missing_tasks(plan)
    student_out = Path(plan.student.out) if Path(plan.student.out).is_absolute() else plan.workdir / plan.student.out
    student_done = (student_out / "metrics.json").is_file() and (student_out / "model").is_dir()
    if tasks:
        kinds, array = ["teacher", "merge", "student", "eval"], array_spec(",".join(map(str, tasks)),
                                                                          plan.resources["teacher"]["throttle"])
    elif not (_abs(plan, plan.teacher.out) / "index.json").exists():
        kinds, array = ["merge", "student", "eval"], None
    elif not student_done:
        kinds, array = ["student", "eval"], None
    else:
        kinds, array = ["eval"], None
    print(f"{out}: resubmitting {', '.join(kinds)}" + (f" (stage-one tasks {array})" if array else ""))
    return submit(out, kinds, array)

# ------------------------------------------------------------------------------------------------
# on-policy rounds (--rounds): every step of every round one job, each stage's config from
# stages.rounds.steps(), saved where `distill rounds` saves it


@dataclass
class RoundsPlan:
    """What the rounds' scripts are made of: the rounds config (its paths relative to the workdir), the
    row length it pinned in its OUT, and each job kind's resources."""

    rounds: Any  # stages.rounds.RoundsConfig, round and step unset
    config_file: Path  # SLURM_OUT/config/rounds.yaml: that config, as the jobs' `distill rounds` reads it
    seq_len: int
    resources: dict[str, dict]
    env: dict[str, str]
    setup: str
    workdir: Path
    port: int


@dataclass
class RoundJob:
    """One job of the chain: what it runs after the prologue, and how to tell that it is done."""

    name: str  # round-RRR/NN-STEP: the script is SLURM_OUT/NAME.sbatch, the key in jobs.json is NAME
    round: int
    kind: str  # whose resources it asks for: generate, teacher, merge, student or eval
    what: str  # the script's first comment
    lines: list[str]
    done: Callable[[], bool]
    tasks: int = 0  # array tasks (0: not an array)
    missing: Callable[[], list[int]] | None = None  # an array's tasks that still owe work
    throttle: int | None = None  # an array's tasks at most running at once (None: no limit)


def resolve_rounds(config: SlurmConfig, out: Path) -> RoundsPlan:
    """Load the rounds config as `distill rounds` would and pin it in its OUT (``_claim``: the jobs and
    any later `distill rounds` on that OUT must use the same options)."""
    from pipeline.models import has_weights
    from stages import rounds as rounds_stage

    try:
        rounds = load_config(rounds_stage.RoundsConfig, config.rounds)
    except DistillError as e:
        raise DistillError(f"slurm --rounds {config.rounds}: {e}") from None
    if rounds.round or rounds.step:
        raise DistillError(f"slurm --rounds {config.rounds}: round and step are each job's own; remove them")
    _check_paths({"out": rounds.out, "student": rounds.student}, f"slurm --rounds {config.rounds}")  # in the scripts
    resources = job_resources(config)
    env = {str(k): str(v) for k, v in (config.env or {}).items()}
    workdir = Path(config.workdir or os.getcwd()).resolve()
    with contextlib.chdir(workdir):  # the rounds' paths, like every stage's, are relative to the workdir
        if not has_weights(Path(rounds.student)):
            raise DistillError(f"student {rounds.student} is not a local Hugging Face directory with weights; "
                               "pretrain one first (make pretrain-student, or distill train)")
        seq_len = rounds_stage._claim(rounds, Path(rounds.out))
    return RoundsPlan(rounds, out / "config" / "rounds.yaml", seq_len, resources, env, config.setup, workdir,
                      config.port)


def round_steps(plan: RoundsPlan) -> dict[int, list]:
    """The steps of rounds 0 … R (``stages.rounds.steps``). Call it inside the workdir: each step's
    ``done`` looks at paths relative to it."""
    from stages.rounds import steps

    return {r: steps(plan.rounds, Path(plan.rounds.out), r, plan.seq_len) for r in range(plan.rounds.rounds + 1)}


def round_jobs(plan: RoundsPlan, by_round: dict[int, list]) -> list[RoundJob]:
    """Every job of rounds 0 … R, in the order they run."""
    return [job for r, steps in by_round.items() for job in one_round(plan, r, steps)]


ROUND_STEPS = {"prompts": "the round's prompts, split by λ between the student and the teacher.",
               "finish": "round.json from the held-out estimate (and the eval), the teacher tokens so far; "
                         "rounds.json and rounds.md over the finished rounds."}


def one_round(plan: RoundsPlan, r: int, steps: list) -> list[RoundJob]:
    """Round ``r``'s jobs from its steps: the generate steps of the round share one array job, stage one
    is an array then a merge, stage two runs under torchrun, the rest are one command each."""
    from stages.rounds import round_dir

    q = lambda p: shlex.quote(str(p))  # noqa: E731
    res, jobs = plan.resources, []
    conf = round_dir(Path(plan.rounds.out), r) / "steps"

    def add(step: str, kind: str, what: str, lines: list[str], done, tasks=0, missing=None) -> None:
        jobs.append(RoundJob(f"round-{r:03d}/{len(jobs) + 1:02d}-{step}", r, kind, f"Round {r}: {what}", lines, done,
                             tasks, missing, res[kind].get("throttle") if tasks else None))

    groups: list[list] = []  # consecutive generate steps (the student's and the teacher's) form one job
    for step in steps:
        if step.stage == "generate" and groups and groups[-1][0].stage == "generate":
            groups[-1].append(step)
        else:
            groups.append([step])
    for group in groups:
        step = group[0]
        if step.stage == "rounds":
            add(step.name, "merge", ROUND_STEPS[step.name],
                [f"distill rounds --config {q(plan.config_file)} --round {r} --step {step.name}"], step.done)
        elif step.stage == "generate":
            n, outs = res["generate"]["array"], [Path(s.config.out) for s in group]
            if step.name == "heldout-generate":
                who = f"round {r}'s student completes the held-out prompts (T = 1)"
            else:
                who = " and ".join(f"the {s.name.removeprefix('generate-')}" for s in group) + " complete their prompts"
            add("heldout-generate" if step.name == "heldout-generate" else "generate", "generate",
                f"{who}, as {n} array task(s): task i writes records i, i+{n}, …; the last task to finish merges "
                "the parts.",
                [f"srun --ntasks=1 --cpus-per-task={int(res['generate']['cpus'])} distill generate --config "
                 f"{q(conf / f'{s.name}.json')} --shard-index \"$SLURM_ARRAY_TASK_ID\" --num-shards {int(n)}" for s in group],
                lambda group=group: all(s.done() for s in group), n,
                lambda outs=outs, n=n: sorted(set().union(*(missing_generate_tasks(o, n) for o in outs))))
        elif step.stage == "teacher":
            t, store = res["teacher"], step.config.out
            n, per_task = t["array"], shard_owners(t)[0]
            add(step.name, "teacher", stage_one_what(t, store, f"stage one ({step.config.kind}) as"),
                stage_one_array(conf / f"{step.name}.json", t), step.done, n,
                lambda store=store, n=n, per_task=per_task: missing_shard_tasks(Path(store), n, per_task))
            add(step.name.replace("teacher", "merge"), "merge", f"once every stage-one task succeeded: write "
                f"{q(Path(store) / 'index.json')}, then check every shard.", merge_store(store), step.done)
        elif step.stage == "student":
            s = res["student"]
            add(step.name, "student", f"stage two, {s['nodes']} node(s) × {s['procs_per_node']} process(es) under "
                f"torchrun, from {q(step.config.model)} on {q(step.config.train_store)} to {q(step.config.out)}.",
                torchrun(plan, s, conf / "student.json", Path(step.config.out) / "preempted.json"), step.done)
        else:  # prepare, heldout-prepare, eval
            kind = "eval" if step.stage == "eval" else "merge"
            what = {"prepare": "the generated records as a token store, one example per row, the prompt masked.",
                    "heldout-prepare": "the held-out completions as a token store.",
                    "eval": f"distill eval of round {r}'s student."}[step.name]
            add(step.name, kind, what, [f"distill {step.stage} --config {q(conf / f'{step.name}.json')}"], step.done)
    return jobs


def missing_generate_tasks(gen_out: Path, n: int) -> list[int]:
    """The tasks of an n-task generate array into ``gen_out`` whose progress index does not yet record
    all their parts. Once every part is recorded but not merged (the merging task was stopped), task 0
    alone: rerunning any task merges."""
    from stages import generate as generate_stage

    if (gen_out / generate_stage.SUMMARY).is_file():
        return []
    progress = [generate_stage.read_progress(generate_stage.index_path(gen_out, job, n)) for job in range(n)]
    params = next((p["params"] for p in progress if p), None)
    if params is None:
        return list(range(n))
    total = params["prompt_count"] * params["settings"]["samples_per_prompt"]
    owed = []
    for job in range(n):
        parts = math.ceil(len(range(job, total, n)) / params["records_per_part"])  # 0: the job owns no record
        recorded = {e["part"] for e in progress[job].get("parts", [])
                    if (gen_out / generate_stage.PARTS / e["name"]).exists()}
        if set(range(parts)) - recorded:
            owed.append(job)
    return owed or [0]


def round_scripts(plan: RoundsPlan, out: Path, jobs: list[RoundJob]) -> dict[str, str]:
    scripts = {}
    for job in jobs:
        flat = job.name.replace("/", "-")
        log = out / "logs" / (f"{flat}-%A_%a.out" if job.tasks else f"{flat}-%j.out")
        res = plan.resources[job.kind]
        lines = header(flat, job.what, res, log, array=array_spec(f"0-{job.tasks - 1}", job.throttle) if job.tasks
                       else None, nodes=res.get("nodes", 1) if job.kind in ("student", "teacher") else 1,
                       tasks_per_node=res["procs_per_node"] if job.kind == "teacher" else 1)
        scripts[f"{job.name}.sbatch"] = "\n".join(lines + prologue(plan) + job.lines) + "\n"
    return scripts


def slurm_rounds(config: SlurmConfig) -> dict[str, str] | None:
    """``distill slurm --rounds``: the scripts of every round's jobs, the step configs where `distill
    rounds` keeps them, and with ``--submit`` the jobs, each after the one before."""
    from stages.rounds import round_dir, save_steps

    out = Path(config.out).resolve()
    plan = resolve_rounds(config, out)
    body = {k: v for k, v in to_dict(plan.rounds).items() if v is not None and k not in ("round", "step")}
    with contextlib.chdir(plan.workdir):
        by_round = round_steps(plan)
        jobs = round_jobs(plan, by_round)
        for r, steps in by_round.items():  # where `distill rounds` saves them: it finds the same configs
            save_steps(Path(plan.rounds.out), r, steps)
        finished = {r for r in by_round if (round_dir(Path(plan.rounds.out), r) / "round.json").is_file()}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.config_file, yaml.safe_dump(body, sort_keys=True, allow_unicode=True))
    for name, text in round_scripts(plan, out, jobs).items():
        atomic_write_text(out / name, text)
        os.chmod(out / name, 0o755)
    raw = {k: v for k, v in to_dict(config).items() if k not in ("out", "submit", "resubmit")}
    raw |= {"workdir": str(plan.workdir), "rounds": str(plan.config_file)}
    atomic_write_text(out / "slurm.json", json.dumps(raw, indent=2, sort_keys=True) + "\n")
    print(f"{out}: wrote {len(jobs)} job scripts for rounds 0 … {plan.rounds.rounds} into {plan.rounds.out} "
          f"(round-RRR/NN-STEP.sbatch; generate: {plan.resources['generate']['array']} tasks, stage one: "
          f"{describe_owners(plan.resources['teacher'])})")
    if not config.submit:
        print("run it again with --submit to submit them in order (or sbatch each, chained with "
              "--dependency=afterok:ID)")
        return None
    if finished:  # as `distill rounds` skips them (a rerun with more rounds continues after the last)
        print(f"round(s) {', '.join(map(str, sorted(finished)))} finished already: not submitted")
    todo = [(job, None) for job in jobs if job.round not in finished]
    if not todo:
        print(f"{out}: every round is finished; nothing to submit")
        return {}
    return submit_rounds(out, todo)


def submit_rounds(out: Path, todo: list[tuple[RoundJob, str | None]]) -> dict[str, str]:
    """Submit the jobs in order, each after the one before (an array's tasks narrowed where given);
    record the ids in jobs.json."""
    ids, arrays, previous = {}, {}, None
    for job, array in todo:
        previous = ids[job.name] = sbatch(out / f"{job.name}.sbatch", previous, array)
        if array:
            arrays[job.name] = array
    history = json.loads((out / "jobs.json").read_text()).get("history", []) if (out / "jobs.json").exists() else []
    record = {"jobs": ids, "arrays": arrays, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(out / "jobs.json", json.dumps({**record, "history": history + [record]}, indent=2) + "\n")
    for name, job in ids.items():
        print(f"{name:>28}  job {job}" + (f"  (tasks {arrays[name]})" if name in arrays else ""))
    return ids


def resubmit_rounds(out: Path, config: SlurmConfig) -> dict[str, str]:
    """Skip the finished rounds and, in the first unfinished one, the jobs done; submit the rest in order,
    an array narrowed to its tasks that still owe work (one whose tasks all finished is left out: the
    job after it completes it)."""
    from stages.rounds import round_dir

    plan = resolve_rounds(config, out)
    todo: list[tuple[RoundJob, str | None]] = []
    with contextlib.chdir(plan.workdir):
        for job in round_jobs(plan, round_steps(plan)):
            if (round_dir(Path(plan.rounds.out), job.round) / "round.json").is_file() or (not todo and job.done()):
                continue
            array = None
            if job.missing is not None:
                tasks = job.missing()
                if not tasks:
                    continue
                array = array_spec(",".join(map(str, tasks)), job.throttle) if len(tasks) < job.tasks else None
            todo.append((job, array))
    if not todo:
        print(f"{out}: every round is finished; nothing to resubmit")
        return {}
    narrowed = "; ".join(f"{job.name} tasks {array}" for job, array in todo if array)
    print(f"{out}: resubmitting {len(todo)} jobs from {todo[0][0].name}" + (f" ({narrowed})" if narrowed else ""))
    return submit_rounds(out, todo)



def _abs(plan: Plan, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else plan.workdir / path


def slurm(config: SlurmConfig) -> dict[str, str] | None:
    if config.resubmit:
        return resubmit(Path(config.resubmit))
    if config.rounds:
        return slurm_rounds(config)
    plan = resolve(config)
    out = Path(config.out).resolve()
    raw = {k: v for k, v in to_dict(config).items() if k not in ("out", "submit", "resubmit")}
    raw["workdir"] = str(plan.workdir)
    write(plan, out, raw)
    names = SCRIPTS | PREPARE_SCRIPTS
    arrays = (f"prepare: {plan.resources['prepare']['array']} tasks, " if plan.prepare is not None else "")
    print(f"{out}: wrote {', '.join(names[k] for k in plan.kinds())} ({arrays}stage one: "
          f"{describe_owners(plan.resources['teacher'])})")
    if not config.submit:
        print("run it again with --submit to submit them in order (or sbatch each, chained with "
              "--dependency=afterok:ID)")
        return None
    return submit(out, plan.kinds())

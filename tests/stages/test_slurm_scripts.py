"""`distill slurm` without a cluster: the scripts it writes, and what it refuses (one line, nothing written)."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, one_line_error, run_cli

DEMO = ROOT / "data" / "configs" / "slurm-demo.yaml"


def config(tmp_path, **changes):
    body = yaml.safe_load(DEMO.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            body.setdefault(section, {})[field] = value
        else:
            body[section] = value
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_the_demo_config_writes_four_scripts_that_bash_parses(tmp_path):
    result = run_cli("slurm", "--config", DEMO, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    teacher = (out / "1-teacher.sbatch").read_text()
    assert "#SBATCH --array=0-3" in teacher and '--shard-index "$SLURM_ARRAY_TASK_ID" --num-shards 4' in teacher
    assert "#SBATCH --signal=USR1@120" in teacher and "scontrol requeue" in teacher
    merge = (out / "2-merge.sbatch").read_text()
    assert "distill merge runs/cluster/store" in merge and "distill inspect runs/cluster/store --verify" in merge
    student = (out / "3-student.sbatch").read_text()
    assert "--standalone --nnodes=1 --nproc_per_node=4" in student and "#SBATCH --gres=gpu:4" in student
    assert "trap \"\" USR1; exec python -m torch.distributed.run" in student
    # a step asks for the job's CPUs again (SLURM >= 22.05 does not pass them on); torch's threads follow them
    assert "#SBATCH --cpus-per-task=8" in teacher and "srun --ntasks=1 --cpus-per-task=8 distill teacher" in teacher
    assert "#SBATCH --cpus-per-task=8" in student and "srun --ntasks-per-node=1 --cpus-per-task=8 bash -c" in student
    evals = (out / "4-eval.sbatch").read_text()
    assert evals.count("distill eval --config") == 2 and "distill report --config" in evals
    for name in ("1-teacher.sbatch", "2-merge.sbatch", "3-student.sbatch", "4-eval.sbatch"):
        assert subprocess.run(["bash", "-n", str(out / name)]).returncode == 0, name
    # the stage configs the scripts read are the stages' own, resolved: they load as --config files
    teacher_config = yaml.safe_load((out / "config" / "teacher.yaml").read_text())
    assert teacher_config["samples"] == 32 and "shard_index" not in teacher_config
    student_config = yaml.safe_load((out / "config" / "student.yaml").read_text())
    assert student_config["train_store"] == "runs/cluster/store" and student_config["resume"] == "auto"
    assert json.loads((out / "slurm.json").read_text())["jobs"]["teacher"]["array"] == 4


def test_several_nodes_rendezvous_on_the_first_host(tmp_path):
    path = config(tmp_path, jobs={"student": {"nodes": 2, "gpus": 8}})
    assert run_cli("slurm", "--config", path, "--out", tmp_path / "out").exit_code == 0
    student = (tmp_path / "out" / "3-student.sbatch").read_text()
    assert "#SBATCH --nodes=2" in student and "--nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d" in student
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in student
    assert '--rdzv_endpoint="$head:29500"' in student and "srun --ntasks-per-node=1" in student


@pytest.mark.parametrize("changes, phrase", [
    ({"jobs": {"teacher": {"aray": 4}}}, "unknown key 'aray' in jobs.teacher (did you mean 'array'?)"),
    ({"jobs": {"teacher": {"array": 0}}}, "jobs.teacher.array must be a whole number"),
    ({"defaults": {"time": "four hours"}}, "must be a SLURM time such as '04:00:00'"),
    ({"teacher__shard_index": 2}, "teacher.shard_index is set by the job array"),
    ({"teacher__top_k": 0, "teacher__kind": "topk"}, "slurm config, teacher: invalid teacher config: top_k must be"),
    ({"student__alpha": 2.0}, "slurm config, student:"),
    ({"student__resume": "never"}, "student.resume must be 'auto'"),
    ({"student__lrr": 0.1}, "slurm config, student:"),
], ids=["typo", "array-0", "time", "shard-index", "top-k", "alpha", "resume", "unknown-student-key"])
def test_bad_slurm_configs_are_one_line_and_write_nothing(tmp_path, changes, phrase):
    path = config(tmp_path, **changes)
    line = one_line_error(run_cli("slurm", "--config", path, "--out", tmp_path / "out"))
    assert phrase in line, line
    assert not (tmp_path / "out").exists()


def test_submit_without_sbatch_says_where_to_run_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    line = one_line_error(run_cli("slurm", "--config", DEMO, "--out", tmp_path / "out", "--submit"))
    assert "sbatch is not on PATH" in line


# ------------------------------------------------------------------------------------------------
# hostile inputs: a shared YAML file must not be able to run commands through the scripts it makes

INJECT = "$(touch CANARY)"
CONTROL = {"newline": "\n", "return": "\r", "nul": "\x00", "escape": "\x1b", "tab": "\t", "del": "\x7f"}
WHOLE, FROM_ZERO = "a whole number ≥ 1", "a whole number ≥ 0"
NAMES = "letters, digits and _ . -"
NO_CONTROL = "must not hold control characters"

HOSTILE = [  # (id, changes, the field the one line names, what it says is allowed)
    ("cpus-subst", {"defaults__cpus": f"8 {INJECT}"}, "defaults.cpus", WHOLE),
    ("cpus-newline", {"jobs": {"teacher": {"cpus": "8\ntouch CANARY"}}}, "jobs.teacher.cpus", WHOLE),
    ("cpus-zero", {"defaults__cpus": 0}, "defaults.cpus", WHOLE),
    ("cpus-without-defaults", {"defaults": None, "jobs": {"eval": {"cpus": f"1 {INJECT}"}}}, "jobs.eval.cpus", WHOLE),
    ("cpus-bool", {"defaults__cpus": True}, "defaults.cpus", WHOLE),
    ("gpus-semicolon", {"defaults__gpus": "1; touch CANARY"}, "defaults.gpus", FROM_ZERO),
    ("gpus-negative", {"defaults__gpus": -1}, "defaults.gpus", FROM_ZERO),
    ("nodes-backtick", {"jobs": {"student": {"nodes": "2`touch CANARY`"}}}, "jobs.student.nodes", WHOLE),
    ("procs-and", {"jobs": {"student": {"procs_per_node": "4 && touch CANARY"}}}, "jobs.student.procs_per_node", WHOLE),
    ("array-subst", {"jobs": {"teacher": {"array": f"4{INJECT}"}}}, "jobs.teacher.array", WHOLE),
    ("time-newline", {"defaults__time": "01:00:00\ntouch CANARY"}, "defaults.time", "SLURM time"),
    ("time-semicolon", {"defaults__time": "1:00:00; touch CANARY"}, "defaults.time", "SLURM time"),
    ("time-backtick", {"jobs": {"merge": {"time": "`touch CANARY`"}}}, "jobs.merge.time", "SLURM time"),
    ("mem-newline", {"defaults__mem": "32G\ntouch CANARY"}, "defaults.mem", "<number>[K|M|G|T]"),
    ("mem-subst", {"defaults__mem": f"32G {INJECT}"}, "defaults.mem", "<number>[K|M|G|T]"),
    ("mem-words", {"defaults__mem": "32 GB"}, "defaults.mem", "<number>[K|M|G|T]"),
    ("signal-newline", {"jobs": {"teacher": {"signal": "USR1@120\ntouch CANARY"}}}, "jobs.teacher.signal",
     "[R:|B:]SIGNAL[@SECONDS]"),
    ("signal-semicolon", {"defaults__signal": "USR1@120;touch CANARY"}, "defaults.signal", "[R:|B:]SIGNAL[@SECONDS]"),
    ("signal-subst", {"defaults__signal": f"USR1@{INJECT}"}, "defaults.signal", "[R:|B:]SIGNAL[@SECONDS]"),
    ("partition-newline", {"defaults__partition": "gpu\ntouch CANARY"}, "defaults.partition", NAMES),
    ("partition-return", {"defaults__partition": "gpu\rtouch CANARY"}, "defaults.partition", NAMES),
    ("partition-space", {"defaults__partition": "gpu touch"}, "defaults.partition", NAMES),
    ("partition-quote", {"defaults__partition": "gpu'"}, "defaults.partition", NAMES),
    ("account-nul", {"defaults__account": "acct\x00"}, "defaults.account", NAMES),
    ("account-subst", {"defaults__account": f"a{INJECT}"}, "defaults.account", NAMES),
    ("qos-backtick", {"defaults__qos": "normal`touch CANARY`"}, "defaults.qos", NAMES),
    ("qos-escape", {"jobs": {"eval": {"qos": "normal\x1b[31m"}}}, "jobs.eval.qos", NAMES),
    ("constraint-newline", {"defaults__constraint": "a100\ntouch CANARY"}, "defaults.constraint", "features"),
    ("constraint-subst", {"defaults__constraint": f"a100{INJECT}"}, "defaults.constraint", "features"),
    ("constraint-semicolon", {"defaults__constraint": "a100;touch"}, "defaults.constraint", "features"),
    ("constraint-quote", {"defaults__constraint": 'a100"'}, "defaults.constraint", "features"),
    ("extra-newline", {"defaults__extra": ["--exclusive\ntouch CANARY"]}, "defaults.extra", NO_CONTROL),
    ("extra-return", {"jobs": {"merge": {"extra": ["--comment=a\rtouch CANARY"]}}}, "jobs.merge.extra", NO_CONTROL),
    ("extra-not-an-option", {"defaults__extra": ["touch CANARY"]}, "defaults.extra", "start with '--'"),
    ("extra-string-newline", {"defaults__extra": "--exclusive\ntouch CANARY"}, "defaults.extra", NO_CONTROL),
    ("extra-mapping", {"defaults__extra": [{"exclusive": True}]}, "defaults.extra", "start with '--'"),
    ("env-key-space", {"env": {"A B": "1"}}, "env key 'A B'", "a shell name"),
    ("env-key-semicolon", {"env": {"X;touch CANARY;Y": "1"}}, "env key", "a shell name"),
    ("env-key-digit", {"env": {"1X": "1"}}, "env key '1X'", "a shell name"),
    ("env-key-newline", {"env": {"A\ntouch CANARY": "1"}}, "env key", "a shell name"),
    ("env-key-subst", {"env": {INJECT: "1"}}, "env key", "a shell name"),
    ("env-value-newline", {"env": {"A": "1\ntouch CANARY"}}, "env.A", NO_CONTROL),
    ("env-value-nul", {"env": {"A": "a\x00b"}}, "env.A", NO_CONTROL),
    ("env-value-list", {"env": {"A": ["x"]}}, "env.A", "a string or a number"),
    ("workdir-newline", {"workdir": "work\ntouch CANARY"}, "workdir", NO_CONTROL),
    ("setup-nul", {"setup": "true\x00touch CANARY"}, "setup", "control characters"),
    ("setup-return", {"setup": "true\rtouch CANARY"}, "setup", "control characters"),
    ("port-subst", {"port": f"29500{INJECT}"}, "port", "int"),
    ("port-range", {"port": 70000}, "port", "1 … 65535"),
    ("teacher-out-newline", {"teacher__out": "runs/store\ntouch CANARY"}, "teacher.out", NO_CONTROL),
    ("student-out-newline", {"student__out": "runs/kd\ntouch CANARY"}, "student.out", NO_CONTROL),
    ("train-store-return", {"student__train_store": "runs/store\rtouch CANARY"}, "student.train_store", NO_CONTROL),
] + [(f"teacher-out-{name}", {"teacher__out": f"runs/store{char}x"}, "teacher.out", NO_CONTROL)
     for name, char in CONTROL.items()] \
  + [(f"partition-{name}", {"defaults__partition": f"gpu{char}x"}, "defaults.partition", NAMES)
     for name, char in CONTROL.items()]


@pytest.mark.parametrize("changes, field, allowed", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_values_are_refused_in_one_line_naming_the_field(tmp_path, changes, field, allowed):
    path = config(tmp_path, **changes)
    line = one_line_error(run_cli("slurm", "--config", path, "--out", tmp_path / "out"))
    assert field in line and allowed in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slurm.yaml"]  # no script, no config, no canary


@pytest.mark.parametrize("name, char", CONTROL.items(), ids=list(CONTROL))
def test_an_out_with_control_characters_is_refused(tmp_path, name, char):
    line = one_line_error(run_cli("slurm", "--config", DEMO, "--out", tmp_path / f"out{char}x"))
    assert "--out" in line and NO_CONTROL in line, line
    assert list(tmp_path.iterdir()) == []


def test_every_problem_is_named_at_once(tmp_path):
    path = config(tmp_path, defaults__cpus="8 x", defaults__mem="lots", env={"A B": "1"})
    line = one_line_error(run_cli("slurm", "--config", path, "--out", tmp_path / "out"))
    assert "defaults.cpus" in line and "defaults.mem" in line and "env key 'A B'" in line, line


@pytest.mark.parametrize("resources", [
    {"time": "30"}, {"time": "30:00"}, {"time": "4:00:00"}, {"time": "2-12"}, {"time": "2-12:30"},
    {"time": "2-12:30:00"}, {"time": "UNLIMITED"}, {"time": "infinite"}, {"time": 14400},
    {"mem": "500M"}, {"mem": "1t"}, {"mem": 32000}, {"mem": "0"},
    {"signal": "B:USR1@60"}, {"signal": "R:10"}, {"signal": "SIGTERM"}, {"signal": ""},
    {"partition": "gpu,gpu-long"}, {"account": "proj.x_1"}, {"qos": "high-prio"},
    {"constraint": "[rack1*2&rack2*4]"}, {"constraint": "(a100|h100)&nvlink"}, {"constraint": "intel,ib"},
    {"extra": ["--exclusive", "--mail-type=END,FAIL", '--comment="two words"']}, {"extra": "--exclusive"},
    {"extra": None},
], ids=lambda r: f"{next(iter(r))}={next(iter(r.values()))!r}")
def test_what_slurm_accepts_is_accepted(tmp_path, resources):
    path = config(tmp_path, **{f"defaults__{k}": v for k, v in resources.items()})
    result = run_cli("slurm", "--config", path, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    for name in ("1-teacher.sbatch", "3-student.sbatch"):
        assert subprocess.run(["bash", "-n", str(tmp_path / "out" / name)]).returncode == 0, name


# ------------------------------------------------------------------------------------------------
# awkward but legal values: the scripts, run with stand-ins for SLURM and distill, pass every value
# on as one argument and run nothing else

STUB = """#!/bin/bash
{{ printf '%q ' "$(basename "$0")" "$@"; echo; }} >> {log}
{body}
"""
STUB_BODIES = {
    "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"',  # run the step's command as srun would
    "sbatch": 'echo $((100 + $(wc -l < {log})))',
    "scontrol": 'if [ "$1" = show ]; then echo node-1; fi',
    "squeue": "true",
    "distill": 'printf "%s\\n" "$AWKWARD" >> {env_log}',
    "python": 'printf "%s\\n" "$AWKWARD" >> {env_log}',
}


def stubs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A bin directory of stand-ins that each append their argv (``printf %q``) to one log."""
    bin_dir, log, env_log = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "env.log"
    bin_dir.mkdir()
    for name, body in STUB_BODIES.items():
        stub = bin_dir / name
        stub.write_text(STUB.format(log=shlex.quote(str(log)),
                                    body=body.format(log=shlex.quote(str(log)), env_log=shlex.quote(str(env_log)))))
        stub.chmod(0o755)
    return bin_dir, log, env_log


def calls(log: Path) -> list[list[str]]:
    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


def sbatch_lines(script: str) -> dict[str, list[str]]:
    """Each ``#SBATCH`` line as sbatch reads it (quotes and backslashes as in a shell, ``#`` starts a
    comment: SLURM's ``_get_argument``), keyed by its option."""
    found = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            words = shlex.split(line.removeprefix("#SBATCH "), comments=True)
            found[words[0].split("=")[0]] = words
    return found


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_awkward_legal_values_reach_the_commands_as_one_argument_and_run_nothing(tmp_path, monkeypatch):
    awkward = tmp_path / "it's a $dir"
    work, out = awkward / "work $HOME", awkward / f"jobs {INJECT}"
    work.mkdir(parents=True)
    teacher_out = f"runs/store {INJECT} `touch CANARY`; touch CANARY"
    tokens_out, raw = f"runs/tokens $(touch CANARY) 'x'", f"corpus/it's {INJECT}.jsonl"
    student_out = "runs/kd 'q' \"dq\" $PATH"
    env_value = "it's \"quoted\" $HOME `touch CANARY` $(touch CANARY)"
    path = config(tmp_path, workdir=str(work), setup="", env={"AWKWARD": env_value},
                  teacher__out=teacher_out, student__out=student_out, prepare__out=tokens_out, prepare__inputs=[raw],
                  defaults__constraint="(a100|h100)&nvlink", defaults__extra=["--comment=\"two words\""])
    bin_dir, log, env_log = stubs(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    submitted = run_cli("slurm", "--config", path, "--out", out, "--submit")
    assert submitted.exit_code == 0, submitted.output
    conf, logs = out / "config", out / "logs"
    assert calls(log) == [["sbatch", "--parsable", str(out / "0a-prepare.sbatch")],
                          ["sbatch", "--parsable", "--dependency=afterok:101", str(out / "0b-merge-tokens.sbatch")],
                          ["sbatch", "--parsable", "--dependency=afterok:102", str(out / "1-teacher.sbatch")],
                          ["sbatch", "--parsable", "--dependency=afterok:103", str(out / "2-merge.sbatch")],
                          ["sbatch", "--parsable", "--dependency=afterok:104", str(out / "3-student.sbatch")],
                          ["sbatch", "--parsable", "--dependency=afterok:105", str(out / "4-eval.sbatch")]]

    texts = {name: (out / name).read_text() for name in ("0a-prepare.sbatch", "0b-merge-tokens.sbatch",
                                                          "1-teacher.sbatch", "2-merge.sbatch", "3-student.sbatch",
                                                          "4-eval.sbatch")}
    prepare = sbatch_lines(texts["0a-prepare.sbatch"])
    assert prepare["--output"] == [f"--output={logs}/prepare-%A_%a.out"] and "--signal" not in prepare
    teacher = sbatch_lines(texts["1-teacher.sbatch"])  # as sbatch splits them: one word per option
    assert teacher["--output"] == [f"--output={logs}/teacher-%A_%a.out"]
    assert teacher["--constraint"] == ["--constraint=(a100|h100)&nvlink"]
    assert teacher["--comment"] == ["--comment=two words"]
    assert teacher["--signal"] == ["--signal=USR1@120"]

    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": "/nonexistent-home", "SLURM_JOB_NAME": "distill-x",
           "SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_NODELIST": "node-1"}
    log.unlink()
    before = tree(tmp_path)
    for name, text in texts.items():
        done = subprocess.run(["bash", str(out / name)], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr)
    assert tree(tmp_path) - before == {"calls.log", "env.log"}, "the scripts made files they should not"
    assert not any(Path(p).name == "CANARY" for p in tree(tmp_path))  # the touch in the values never ran
    student = "python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=4 -m stages.cli student"
    assert calls(log) == [
        ["srun", "--ntasks=1", "--cpus-per-task=8", "distill", "prepare", "--config", str(conf / "prepare.yaml"),
         "--shard-index", "0", "--num-shards", "4"],
        ["distill", "prepare", "--config", str(conf / "prepare.yaml"), "--shard-index", "0", "--num-shards", "4"],
        ["distill", "merge", tokens_out],
        ["distill", "inspect", tokens_out, "--verify"],
        ["srun", "--ntasks=1", "--cpus-per-task=8", "distill", "teacher", "--config", str(conf / "teacher.yaml"),
         "--shard-index", "0", "--num-shards", "4"],
        ["distill", "teacher", "--config", str(conf / "teacher.yaml"), "--shard-index", "0", "--num-shards", "4"],
        ["distill", "merge", teacher_out],
        ["distill", "inspect", teacher_out, "--verify"],
        ["scontrol", "show", "hostnames", "node-1"],
        ["srun", "--ntasks-per-node=1", "--cpus-per-task=8", "bash", "-c",
         f"trap \"\" USR1; exec {student} --config {shlex.quote(str(conf / 'student.yaml'))}"],
        [*student.split(), "--config", str(conf / "student.yaml")],
        ["distill", "eval", "--config", str(conf / "eval-0.yaml")],
        ["distill", "eval", "--config", str(conf / "eval-1.yaml")],
        ["distill", "report", "--config", str(conf / "report.yaml")],
    ]
    assert env_log.read_text().splitlines() == [env_value] * 10  # every stage sees the value as written
    prepare_config = yaml.safe_load((conf / "prepare.yaml").read_text())
    assert prepare_config["inputs"] == [raw] and prepare_config["out"] == tokens_out
    assert yaml.safe_load((conf / "teacher.yaml").read_text())["tokens_store"] == tokens_out


# ------------------------------------------------------------------------------------------------
# the prepare array (issue #31): raw files → tokens store → ... → report in one --submit


def test_the_prepare_array_comes_first_and_stage_one_reads_its_store(tmp_path):
    from pipeline.config import load_config
    from stages.prepare import PrepareConfig

    result = run_cli("slurm", "--config", DEMO, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    prepare = (out / "0a-prepare.sbatch").read_text()
    assert "#SBATCH --array=0-3" in prepare and "#SBATCH --partition=cpu" in prepare
    assert ("srun --ntasks=1 --cpus-per-task=8 distill prepare --config "
            f"{shlex.quote(str(out / 'config' / 'prepare.yaml'))} --shard-index \"$SLURM_ARRAY_TASK_ID\" "
            "--num-shards 4") in prepare
    # a CPU stage: defaults.gpus (1) and the pre-emption signal are for the model stages
    assert "--gres" not in prepare and "--signal" not in prepare and "--requeue" not in prepare
    merge = (out / "0b-merge-tokens.sbatch").read_text()
    assert "distill merge runs/cluster/tokens" in merge and "distill inspect runs/cluster/tokens --verify" in merge
    for name in ("0a-prepare.sbatch", "0b-merge-tokens.sbatch"):
        assert subprocess.run(["bash", "-n", str(out / name)]).returncode == 0, name
    config = load_config(PrepareConfig, out / "config" / "prepare.yaml")  # the stage reads it as its --config
    assert config.inputs == ("data/corpus/train.jsonl.gz",) and config.workers == 8 and config.num_shards == 1
    assert "shard_index" not in yaml.safe_load((out / "config" / "prepare.yaml").read_text())
    assert yaml.safe_load((out / "config" / "teacher.yaml").read_text())["tokens_store"] == "runs/cluster/tokens"
    assert "0a-prepare.sbatch, 0b-merge-tokens.sbatch, 1-teacher.sbatch" in result.output


def test_without_a_prepare_section_the_chain_starts_at_stage_one(tmp_path):
    body = yaml.safe_load(DEMO.read_text())
    del body["prepare"], body["jobs"]["prepare"]
    body["teacher"]["tokens_store"] = "runs/demo/tokens/train"
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump(body))
    assert run_cli("slurm", "--config", tmp_path / "slurm.yaml", "--out", tmp_path / "out").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.sbatch")) == [
        "1-teacher.sbatch", "2-merge.sbatch", "3-student.sbatch", "4-eval.sbatch"]


@pytest.mark.parametrize("changes, phrase", [
    ({"prepare__shard_index": 1}, "prepare.shard_index is set by the job array (jobs.prepare.array)"),
    ({"prepare__num_shards": 2}, "prepare.num_shards is set by the job array"),
    ({"prepare__workers": 16}, "prepare.workers 16 is more than the 8 CPUs a prepare task asks for"),
    ({"teacher__tokens_store": "runs/elsewhere"}, "teacher.tokens_store 'runs/elsewhere' is not prepare.out"),
    ({"prepare__overwrite": True}, "--overwrite with --num-shards > 1"),
    ({"prepare__inputs": ["-"]}, "standard input"),
    ({"prepare__seq_len": 1}, "slurm config, prepare: invalid prepare config: seq_len must be at least 2"),
    ({"prepare__inputz": ["x"]}, "slurm config, prepare:"),
    ({"jobs__prepare": {"array": 4, "signal": "USR1@60"}}, "unknown key 'signal' in jobs.prepare"),
    ({"jobs__prepare": {"array": 0}}, "jobs.prepare.array must be a whole number ≥ 1"),
    ({"jobs__prepare": {"array": f"4{INJECT}"}}, "jobs.prepare.array must be a whole number ≥ 1"),
    ({"jobs__prepare": {"cpus": "8\ntouch CANARY"}}, "jobs.prepare.cpus must be a whole number ≥ 1"),
    ({"prepare__out": "runs/tokens\ntouch CANARY"}, "prepare.out must not hold control characters"),
    ({"prepare__inputs": ["a.jsonl", "b\rtouch CANARY"]}, "prepare.inputs[1] must not hold control characters"),
], ids=["shard-index", "num-shards", "workers", "tokens-store", "overwrite", "stdin", "seq-len", "unknown-key",
        "signal", "array-0", "array-subst", "cpus-newline", "out-newline", "input-return"])
def test_bad_prepare_sections_are_one_line_and_write_nothing(tmp_path, changes, phrase):
    body = yaml.safe_load(DEMO.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        body.setdefault(section, {})[field] = value
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump(body))
    line = one_line_error(run_cli("slurm", "--config", tmp_path / "slurm.yaml", "--out", tmp_path / "out"))
    assert phrase in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slurm.yaml"]  # no script, no config, no canary


def test_jobs_prepare_needs_a_prepare_section(tmp_path):
    body = yaml.safe_load(DEMO.read_text())
    del body["prepare"]
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump(body))
    line = one_line_error(run_cli("slurm", "--config", tmp_path / "slurm.yaml", "--out", tmp_path / "out"))
    assert "jobs.prepare is for a prepare section" in line


def test_resubmit_narrows_the_prepare_array_to_the_tasks_that_owe_units(tmp_path, monkeypatch, heldout_docs):
    from pipeline.text import units as units_lib
    from tests.conftest import TOKENIZER, write_corpus

    monkeypatch.setattr(units_lib, "UNIT_BYTES", 16 << 10)
    corpus = write_corpus(tmp_path / "corpus.jsonl", heldout_docs[:120])
    body = yaml.safe_load(DEMO.read_text())
    body["jobs"]["prepare"]["array"] = 3
    body["prepare"] = {"inputs": [str(corpus)], "tokenizer": str(TOKENIZER), "out": str(tmp_path / "tokens"),
                       "seq_len": 64, "rows_per_shard": 50}
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump(body))
    bin_dir, log, _ = stubs(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "jobs"
    assert run_cli("slurm", "--config", tmp_path / "slurm.yaml", "--out", out, "--submit").exit_code == 0
    for task in (0, 2):  # task 1 was cancelled
        done = run_cli("prepare", "--config", out / "config" / "prepare.yaml", "--shard-index", task, "--num-shards", 3)
        assert done.exit_code == 0, done.output
    log.unlink()
    again = run_cli("slurm", "--resubmit", out)
    assert again.exit_code == 0, again.output
    assert [c[-1].rsplit("/", 1)[-1] for c in calls(log)] == ["0a-prepare.sbatch", "0b-merge-tokens.sbatch",
                                                              "1-teacher.sbatch", "2-merge.sbatch", "3-student.sbatch",
                                                              "4-eval.sbatch"]
    assert calls(log)[0][:3] == ["sbatch", "--parsable", "--array=1"]
    assert json.loads((out / "jobs.json").read_text())["prepare_array"] == "1"
    # every unit tokenized: the merge job and what follows
    assert run_cli("prepare", "--config", out / "config" / "prepare.yaml", "--shard-index", 1,
                   "--num-shards", 3).exit_code == 0
    log.unlink()
    assert run_cli("slurm", "--resubmit", out).exit_code == 0
    assert calls(log)[0][-1].endswith("0b-merge-tokens.sbatch") and len(calls(log)) == 5


# ------------------------------------------------------------------------------------------------
# stage one on whole nodes (issue #33): procs_per_node processes per node × nodes per array task, each
# pinned to one GPU and owning the shards of its global index; array throttles 'N%M'

# srun as it starts a step: --nodes × --ntasks-per-node processes, each with its SLURM_PROCID (global in
# the step), SLURM_LOCALID (on its node) and SLURM_NODEID, one after another; its status is the highest
# of theirs (`man srun`, RETURN VALUE)
MULTI_SRUN = """nodes=1; per_node=1
while [[ "$1" == --* ]]; do
    case "$1" in --nodes=*) nodes=${1#*=};; --ntasks-per-node=*) per_node=${1#*=};; esac
    shift
done
highest=0
for ((node = 0; node < nodes; node++)); do
    for ((local = 0; local < per_node; local++)); do
        status=0
        SLURM_PROCID=$((node * per_node + local)) SLURM_LOCALID=$local SLURM_NODEID=$node "$@" || status=$?
        if ((status > highest)); then highest=$status; fi
    done
done
exit $highest"""
# distill as each process sees it: its GPUs go to env.log; it exits with the status STUB_EXIT names for
# its --shard-index ("9=75 10=2"), else 0
PROCESS_DISTILL = """printf '%s\\n' "${CUDA_VISIBLE_DEVICES-unset}" >> {env_log}
index=""; previous=""
for word in "$@"; do if [ "$previous" = --shard-index ]; then index=$word; fi; previous=$word; done
for pair in ${STUB_EXIT:-}; do if [ "${pair%%=*}" = "$index" ]; then exit "${pair#*=}"; fi; done"""


def node_stubs(tmp_path: Path) -> tuple[Path, Path, Path]:
    bin_dir, log, env_log = stubs(tmp_path)
    for name, body in (("srun", MULTI_SRUN), ("distill", PROCESS_DISTILL)):
        (bin_dir / name).write_text(STUB.format(log=shlex.quote(str(log)),
                                                body=body.replace("{env_log}", shlex.quote(str(env_log)))))
    return bin_dir, log, env_log


def run_script(script: Path, bin_dir: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": "/nonexistent-home", "SLURM_JOB_NAME": "distill-teacher",
           "SLURM_JOB_ID": "8", "SLURM_ARRAY_JOB_ID": "7", "SLURM_JOB_NODELIST": "node-[1-2]", **env}
    return subprocess.run(["bash", str(script)], env=env, cwd=cwd, capture_output=True, text=True)


def test_procs_per_node_runs_one_pinned_process_per_gpu_over_its_global_shards(tmp_path):
    awkward = tmp_path / "it's a $dir"
    work, out = awkward / "work $HOME", awkward / f"jobs {INJECT} 'q'"
    work.mkdir(parents=True)
    path = config(tmp_path, workdir=str(work), setup="",
                  jobs={"teacher": {"array": 2, "nodes": 2, "procs_per_node": 4}})
    result = run_cli("slurm", "--config", path, "--out", out)
    assert result.exit_code == 0, result.output
    assert "stage one: 2 tasks × 2 nodes × 4 processes = 16 shard owners" in result.output
    script = out / "1-teacher.sbatch"
    found = sbatch_lines(script.read_text())
    assert found["--array"] == ["--array=0-1"] and found["--nodes"] == ["--nodes=2"]
    assert found["--ntasks-per-node"] == ["--ntasks-per-node=4"] and found["--cpus-per-task"] == ["--cpus-per-task=8"]
    assert found["--gres"] == ["--gres=gpu:4"]  # per node: one GPU per process (defaults.gpus 1: on GPUs)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    bin_dir, log, env_log = node_stubs(tmp_path)
    before = tree(tmp_path)
    done = run_script(script, bin_dir, tmp_path, SLURM_ARRAY_TASK_ID="1", CUDA_VISIBLE_DEVICES="2,3,5,7")
    assert done.returncode == 0, done.stderr
    conf = str(out / "config" / "teacher.yaml")
    got = calls(log)
    assert got[0][:6] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=8", "--kill-on-bad-exit=0",
                          "bash"]
    # array task 1 of 2, 8 processes a task: global indexes 8 … 15 of 16 owners, the config path one argument
    assert got[1:] == [["distill", "teacher", "--config", conf, "--shard-index", str(8 + p), "--num-shards", "16"]
                       for p in range(8)]
    # each process sees one GPU: the SLURM_LOCALID-th of those SLURM gave the step on its node
    assert env_log.read_text().splitlines() == ["2", "3", "5", "7"] * 2
    assert tree(tmp_path) - before == {"calls.log", "env.log"}
    assert not any(Path(p).name == "CANARY" for p in tree(tmp_path))


def test_a_preempted_process_requeues_its_array_task_and_a_failed_one_fails_it(tmp_path):
    path = config(tmp_path, setup="", workdir=str(tmp_path), jobs={"teacher": {"array": 3, "procs_per_node": 2}})
    assert run_cli("slurm", "--config", path, "--out", tmp_path / "out").exit_code == 0
    script = tmp_path / "out" / "1-teacher.sbatch"
    bin_dir, log, _ = node_stubs(tmp_path)
    # process 5 (array task 2's second) was stopped by the signal, 4 had finished: the task is requeued
    done = run_script(script, bin_dir, tmp_path, SLURM_ARRAY_TASK_ID="2", CUDA_VISIBLE_DEVICES="0,1", STUB_EXIT="5=75")
    assert done.returncode == 0 and "pre-empted; requeueing" in done.stdout, done.stderr
    assert [c for c in calls(log) if c[0] == "scontrol"] == [["scontrol", "requeue", "7_2"]]
    assert [c[5] for c in calls(log) if c[0] == "distill"] == ["4", "5"]
    log.unlink()
    # a process that failed fails the task (and the chain after it): no requeue
    done = run_script(script, bin_dir, tmp_path, SLURM_ARRAY_TASK_ID="2", CUDA_VISIBLE_DEVICES="0,1", STUB_EXIT="4=2")
    assert done.returncode == 2 and not any(c[0] == "scontrol" for c in calls(log))


def test_processes_on_cpus_are_not_pinned_and_one_process_a_task_is_todays_line(tmp_path):
    path = config(tmp_path, jobs={"teacher": {"procs_per_node": 2, "gpus": 0}})
    assert run_cli("slurm", "--config", path, "--out", tmp_path / "cpu").exit_code == 0
    script = (tmp_path / "cpu" / "1-teacher.sbatch").read_text()
    assert "--gres" not in script and "CUDA_VISIBLE_DEVICES" not in script and "--ntasks-per-node=2" in script
    # one process per array task, one node: the line as before, every GPU of the task visible to it
    # (a teacher spread over them with --device-map)
    path = config(tmp_path, jobs={"teacher": {"array": 4, "gpus": 2}})
    assert run_cli("slurm", "--config", path, "--out", tmp_path / "one").exit_code == 0
    script = (tmp_path / "one" / "1-teacher.sbatch").read_text()
    assert "#SBATCH --gres=gpu:2" in script and "CUDA_VISIBLE_DEVICES" not in script
    assert "srun --ntasks=1 --cpus-per-task=8 distill teacher" in script
    assert '--shard-index "$SLURM_ARRAY_TASK_ID" --num-shards 4' in script


def test_an_array_throttle_limits_the_tasks_running_at_once(tmp_path):
    path = config(tmp_path, jobs={"teacher": {"array": "8%2", "procs_per_node": 2},
                                  "prepare": {"array": "4%1", "partition": "cpu", "cpus": 8}})
    result = run_cli("slurm", "--config", path, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    teacher = sbatch_lines((tmp_path / "out" / "1-teacher.sbatch").read_text())
    assert teacher["--array"] == ["--array=0-7%2"]
    assert "--num-shards 16" in (tmp_path / "out" / "1-teacher.sbatch").read_text()  # 8 tasks × 2 processes
    prepare = (tmp_path / "out" / "0a-prepare.sbatch").read_text()
    assert sbatch_lines(prepare)["--array"] == ["--array=0-3%1"] and "--num-shards 4" in prepare


THROTTLE = "a whole number ≥ 1 or 'N%M'"
NODE_HOSTILE = [  # (id, jobs, the field the one line names, what it says is allowed)
    ("teacher-procs-subst", {"teacher": {"procs_per_node": f"4{INJECT}"}}, "jobs.teacher.procs_per_node", WHOLE),
    ("teacher-procs-zero", {"teacher": {"procs_per_node": 0}}, "jobs.teacher.procs_per_node", WHOLE),
    ("teacher-procs-float", {"teacher": {"procs_per_node": 2.0}}, "jobs.teacher.procs_per_node", WHOLE),
    ("teacher-nodes-newline", {"teacher": {"nodes": "2\ntouch CANARY"}}, "jobs.teacher.nodes", WHOLE),
    ("teacher-nodes-bool", {"teacher": {"nodes": True}}, "jobs.teacher.nodes", WHOLE),
    ("throttle-subst", {"teacher": {"array": f"4%2{INJECT}"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-newline", {"teacher": {"array": "4%2\ntouch CANARY"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-semicolon", {"teacher": {"array": "4%2;touch CANARY"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-zero", {"teacher": {"array": "4%0"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-over", {"teacher": {"array": "2%3"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-no-tasks", {"teacher": {"array": "0%1"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-empty", {"teacher": {"array": "4%"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-twice", {"teacher": {"array": "4%2%1"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-space", {"teacher": {"array": "4 %2"}}, "jobs.teacher.array", THROTTLE),
    ("throttle-range", {"teacher": {"array": "0-3%2"}}, "jobs.teacher.array", THROTTLE),
    ("prepare-throttle-subst", {"prepare": {"array": f"4%1`touch CANARY`"}}, "jobs.prepare.array", THROTTLE),
    ("prepare-throttle-over", {"prepare": {"array": "4%5"}}, "jobs.prepare.array", THROTTLE),
    ("prepare-procs", {"prepare": {"procs_per_node": 2}}, "unknown key 'procs_per_node' in jobs.prepare", ""),
    ("gpus-not-one-a-process", {"teacher": {"procs_per_node": 4, "gpus": 2}}, "jobs.teacher.gpus",
     "one GPU per process"),
]


@pytest.mark.parametrize("jobs, field, allowed", [c[1:] for c in NODE_HOSTILE], ids=[c[0] for c in NODE_HOSTILE])
def test_hostile_node_and_throttle_values_are_refused_in_one_line(tmp_path, jobs, field, allowed):
    path = config(tmp_path, jobs=jobs)
    line = one_line_error(run_cli("slurm", "--config", path, "--out", tmp_path / "out"))
    assert field in line and allowed in line, line
    assert "unknown key" not in line or "unknown key" in field, line  # nodes, procs_per_node: the teacher's own keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slurm.yaml"]  # no script, no config, no canary


def test_every_problem_of_the_new_keys_is_named_at_once(tmp_path):
    path = config(tmp_path, defaults__cpus="8 x", jobs={"teacher": {"array": "4%9", "nodes": 0, "procs_per_node": "x"},
                                                         "prepare": {"array": "2%0"}})
    line = one_line_error(run_cli("slurm", "--config", path, "--out", tmp_path / "out"))
    for field in ("defaults.cpus", "jobs.teacher.array", "jobs.teacher.nodes", "jobs.teacher.procs_per_node",
                  "jobs.prepare.array"):
        assert field in line, (field, line)
    assert "unknown key" not in line and line.count(";") == 4, line


# ------------------------------------------------------------------------------------------------
# more shard owners than shards: refused when the scripts are written, where the count is known


@pytest.fixture(scope="module")
def tiny_tokens(tmp_path_factory, heldout_docs):
    """A tokens store of a few hundred 32-token rows."""
    from tests.conftest import TOKENIZER, write_corpus

    root = tmp_path_factory.mktemp("tiny-tokens")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:12])
    result = run_cli("prepare", "--input", corpus, "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--rows-per-shard", "400")
    assert result.exit_code == 0, result.output
    return root / "tokens"


def without_prepare(tmp_path: Path, teacher: dict, jobs: dict) -> Path:
    body = yaml.safe_load(DEMO.read_text())
    del body["prepare"], body["jobs"]["prepare"]
    body["teacher"] |= teacher
    body["jobs"]["teacher"] = jobs
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_more_owners_than_the_existing_stores_shards_is_one_line(tmp_path, tiny_tokens):
    path = without_prepare(tmp_path, {"tokens_store": str(tiny_tokens), "max_rows": 48, "rows_per_shard": 12},
                           {"array": 3, "procs_per_node": 2})
    line = one_line_error(run_cli("slurm", "--config", path, "--out", tmp_path / "out"))
    assert ("6 shard owners (jobs.teacher.array 3 × nodes 1 × procs_per_node 2) but the store will have 4 shards"
            in line and "2 would have nothing to do" in line), line
    assert "array × nodes × procs_per_node at most 4" in line and "teacher.rows_per_shard at most 9" in line, line
    assert not (tmp_path / "out").exists()
    # as many owners as shards: written
    path = without_prepare(tmp_path, {"tokens_store": str(tiny_tokens), "max_rows": 48, "rows_per_shard": 12},
                           {"array": 2, "procs_per_node": 2})
    assert run_cli("slurm", "--config", path, "--out", tmp_path / "out").exit_code == 0


def test_more_owners_than_max_rows_allows_is_one_line_before_the_tokens_exist(tmp_path):
    path = config(tmp_path, teacher__max_rows=300, jobs={"teacher": {"array": 2, "procs_per_node": 2}})
    line = one_line_error(run_cli("slurm", "--config", path, "--out", tmp_path / "out"))
    assert ("4 shard owners (jobs.teacher.array 2 × nodes 1 × procs_per_node 2) but the store will have at most 2 "
            "shards (teacher.max_rows 300, rows_per_shard 256): at least 2 would have nothing to do" in line), line
    assert not (tmp_path / "out").exists()


def test_resubmit_narrows_to_the_array_tasks_whose_processes_owe_shards(tmp_path, monkeypatch):
    from pipeline.store import contract as store_lib

    store = tmp_path / "store"
    path = without_prepare(tmp_path, {"tokens_store": str(tmp_path / "tokens-not-yet"), "out": str(store)},
                           {"array": "3%2", "procs_per_node": 2})
    bin_dir, log, _ = stubs(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "jobs"
    assert run_cli("slurm", "--config", path, "--out", out, "--submit").exit_code == 0
    # 6 owners over 5 shards of 12 rows: owner g writes shard g, owner 5 has none; owner 3 never ran
    store.mkdir()
    params = {"rows": 60, "rows_per_shard": 12}
    for owner in (0, 1, 2, 4):
        name = store_lib.shard_name(owner, "zarr")
        (store / name).mkdir()
        store_lib.write_partial_index(store_lib.partial_index_path(store, owner, 6), params, "zarr", {},
                                      [{"name": name, "rows": 12, "sha256": "0" * 64}])
    log.unlink()
    again = run_cli("slurm", "--resubmit", out)
    assert again.exit_code == 0, again.output
    assert "(stage-one tasks 1%2)" in again.output, again.output
    assert calls(log)[0] == ["sbatch", "--parsable", "--array=1%2", str(out / "1-teacher.sbatch")]
    assert json.loads((out / "jobs.json").read_text())["array"] == "1%2"

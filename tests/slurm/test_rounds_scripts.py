"""`distill slurm --rounds` without a cluster: the scripts of every round's jobs name the step configs that
`distill rounds` writes, in order; `--submit` chains them; `--resubmit` submits only what is not done
(with a stand-in `sbatch` that records its arguments)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from stages import rounds
from tests.conftest import ROOT, one_line_error, run_cli
from tests.stages.test_rounds import config_file, setting  # noqa: F401 (setting is a fixture)

SLURM_ROUNDS = ROOT / "data" / "configs" / "slurm-rounds.yaml"
ROUND_ONE = ["01-prompts", "02-generate", "03-prepare", "04-teacher", "05-merge", "06-student", "07-heldout-generate",
             "08-heldout-prepare", "09-heldout-teacher", "10-heldout-merge", "11-eval", "12-finish"]


def slurm_config(tmp_path: Path, **changes) -> Path:
    body = yaml.safe_load(SLURM_ROUNDS.read_text()) | changes
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def write(tmp_path, setting, *flags, slurm=None, **options):  # noqa: F811
    root, teacher, student = setting
    out = tmp_path / "out"
    path = config_file(root, teacher, student, out, **{"rounds": 2, "student_fraction": 0.5, "eval_tasks": ["heldout"],
                                                        **options})
    result = run_cli("slurm", "--config", slurm or slurm_config(tmp_path), "--rounds", path, "--out",
                     tmp_path / "jobs", *flags)
    return result, out, path


def stage_configs(script: str) -> list[str]:
    return re.findall(r"--config ([^\s']+)", script)  # the student's ends inside bash -c '…'


def test_every_round_is_a_chain_of_scripts_naming_the_rounds_step_configs(tmp_path, setting):  # noqa: F811
    result, out, path = write(tmp_path, setting)
    assert result.exit_code == 0, result.output
    jobs = tmp_path / "jobs"
    assert sorted(p.name for p in (jobs / "round-000").iterdir()) == [
        "01-heldout-generate.sbatch", "02-heldout-prepare.sbatch", "03-heldout-teacher.sbatch",
        "04-heldout-merge.sbatch", "05-eval.sbatch", "06-finish.sbatch"]
    for r in (1, 2):
        assert sorted(p.name for p in (jobs / f"round-{r:03d}").iterdir()) == [f"{n}.sbatch" for n in ROUND_ONE]
    for script in jobs.rglob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script

    config = load_config(rounds.RoundsConfig, path)
    seq_len = json.loads((out / "config.json").read_text())["seq_len"]  # pinned as `distill rounds` pins it
    for r in (0, 1, 2):
        d, steps = out / f"round-{r:03d}", {s.name: s for s in rounds.steps(config, out, r, seq_len)}
        named = {}
        for script in sorted((jobs / f"round-{r:03d}").iterdir()):
            for conf in stage_configs(script.read_text()):
                named.setdefault(script.name, []).append(conf)
        for script, confs in named.items():  # each stage reads its step's config, saved where `distill rounds` does
            for conf in confs:
                if conf.endswith("rounds.yaml"):
                    continue
                step = steps[Path(conf).stem]
                assert Path(conf).parent == d / "steps"
                assert load_config(type(step.config), conf) == step.config, (script, conf)
        if r == 0:
            continue
        generate = (jobs / f"round-{r:03d}" / "02-generate.sbatch").read_text()
        assert "#SBATCH --array=0-1" in generate and generate.count('--shard-index "$SLURM_ARRAY_TASK_ID" '
                                                                   "--num-shards 2") == 2
        assert stage_configs(generate) == [str(d / "steps" / "generate-student.json"),
                                           str(d / "steps" / "generate-teacher.json")]
        teacher = (jobs / f"round-{r:03d}" / "04-teacher.sbatch").read_text()
        assert "#SBATCH --array=0-2" in teacher and "--num-shards 3" in teacher and "#SBATCH --signal=USR1@120" in teacher
        assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in teacher
        merge = (jobs / f"round-{r:03d}" / "05-merge.sbatch").read_text()
        assert f"distill merge {d / 'store'}" in merge and f"distill inspect {d / 'store'} --verify" in merge
        student = (jobs / f"round-{r:03d}" / "06-student.sbatch").read_text()
        assert "--standalone --nnodes=1 --nproc_per_node=2 -m stages.cli student --config " \
               f"{d / 'steps' / 'student.json'}" in student
        assert f"[ -f {d / 'student' / 'preempted.json'} ]" in student and "#SBATCH --requeue" in student
        for step in ("prompts", "finish"):
            text = (jobs / f"round-{r:03d}" / f"{ROUND_ONE[0 if step == 'prompts' else -1]}.sbatch").read_text()
            assert f"distill rounds --config {jobs / 'config' / 'rounds.yaml'} --round {r} --step {step}" in text
    # round 2 starts from round 1's student, as `distill rounds` does
    assert json.loads((out / "round-002" / "steps" / "generate-student.json").read_text())["model"] == \
        str(out / "round-001" / "student" / "model")
    # the jobs' rounds config is the user's: `distill rounds` accepts it on the same OUT
    assert load_config(rounds.RoundsConfig, jobs / "config" / "rounds.yaml") == config
    assert rounds._claim(config, out) == seq_len


def test_ce_has_no_stage_one_and_no_eval_without_tasks(tmp_path, setting):  # noqa: F811
    result, out, _ = write(tmp_path, setting, objective="ce", student_fraction=1.0, eval_tasks=[], rounds=1)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "jobs" / "round-001").iterdir()) == [
        "01-prompts.sbatch", "02-generate.sbatch", "03-prepare.sbatch", "04-student.sbatch",
        "05-heldout-generate.sbatch", "06-heldout-prepare.sbatch", "07-heldout-teacher.sbatch",
        "08-heldout-merge.sbatch", "09-finish.sbatch"]
    generate = (tmp_path / "jobs" / "round-001" / "02-generate.sbatch").read_text()
    assert "generate-student.json" in generate and "generate-teacher.json" not in generate  # λ = 1
    student = json.loads((out / "round-001" / "steps" / "student.json").read_text())
    assert student["train_store"] == str(out / "round-001" / "tokens")


@pytest.mark.parametrize("changes,options,phrase", [
    ({"teacher": {"out": "x"}}, {}, "remove the teacher section"),
    ({}, {"step": "finish"}, "round and step are each job's own"),
    ({}, {"objective": "sideways"}, "objective must be one of"),
    ({"jobs": {"generate": {"aray": 2}}}, {}, "unknown key 'aray' in jobs.generate (did you mean 'array'?)"),
], ids=["stage-section", "step", "objective", "typo"])
def test_bad_rounds_configs_are_one_line_and_write_no_scripts(tmp_path, setting, changes, options, phrase):  # noqa: F811
    result, _, _ = write(tmp_path, setting, slurm=slurm_config(tmp_path, **changes), **options)
    assert phrase in one_line_error(result)
    assert not (tmp_path / "jobs").exists()


@pytest.mark.parametrize("field, char", [(f, c) for f in ("out", "student") for c in ("\n", "\r", "\x00", "\x1b")],
                         ids=lambda v: repr(v).strip("'"))
def test_rounds_paths_with_control_characters_are_refused_before_anything_is_written(tmp_path, setting, field,
                                                                                    char):  # noqa: F811
    """The rounds' out and student land in the scripts (their paths and comments): a newline there would
    start a shell line. Refused before the rounds OUT is claimed."""
    root, teacher, student = setting
    path = config_file(root, teacher, student, tmp_path / "out")
    hostile = {"out": str(tmp_path / f"rounds{char}touch CANARY"), "student": f"{student}{char}touch CANARY"}[field]
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {field: hostile}))
    result = run_cli("slurm", "--config", slurm_config(tmp_path), "--rounds", path, "--out", tmp_path / "jobs")
    line = one_line_error(result)
    assert f"--rounds {path}: {field} must not hold control characters" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yaml", "slurm.yaml"]


def test_generate_jobs_are_for_rounds_only(tmp_path):
    body = yaml.safe_load((ROOT / "data" / "configs" / "slurm-demo.yaml").read_text())
    body["jobs"]["generate"] = {"array": 2}
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump(body))
    line = one_line_error(run_cli("slurm", "--config", tmp_path / "slurm.yaml", "--out", tmp_path / "jobs"))
    assert "jobs.generate is for --rounds" in line


def test_other_options_on_the_same_rounds_out_are_refused(tmp_path, setting):  # noqa: F811
    assert write(tmp_path, setting)[0].exit_code == 0
    result, _, _ = write(tmp_path, setting, lr=0.1)
    assert "holds rounds run with other options (lr)" in one_line_error(result)


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` on PATH that records its arguments, one line per call, and answers ids 101, 102, …"""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch.calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho $((100 + $(wc -l < {calls})))\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return calls


def submitted(calls: Path) -> list[tuple[str, str | None, str | None]]:
    """(script under the slurm out, dependency, array) of each sbatch call, in order."""
    found = []
    for line in calls.read_text().splitlines():
        args = line.split()
        dependency = next((a.split(":", 1)[1] for a in args if a.startswith("--dependency=afterok:")), None)
        array = next((a.split("=", 1)[1] for a in args if a.startswith("--array=")), None)
        found.append(("/".join(Path(args[-1]).parts[-2:]), dependency, array))
    return found


def test_submit_chains_every_job_and_resubmit_submits_what_is_not_done(tmp_path, setting, fake_sbatch):  # noqa: F811
    result, out, path = write(tmp_path, setting, "--submit", rounds=1, eval_tasks=[])
    assert result.exit_code == 0, result.output
    calls = submitted(fake_sbatch)
    names = ["round-000/01-heldout-generate", "round-000/02-heldout-prepare", "round-000/03-heldout-teacher",
             "round-000/04-heldout-merge", "round-000/05-finish"] + \
            [f"round-001/{n}" for n in ROUND_ONE if n != "11-eval"]
    names = [n.replace("12-finish", "11-finish") for n in names]
    assert [c[0] for c in calls] == [f"{n}.sbatch" for n in names]
    assert [c[1] for c in calls] == [None] + [str(101 + i) for i in range(len(names) - 1)]  # each after the last
    assert all(c[2] is None for c in calls)
    jobs = json.loads((tmp_path / "jobs" / "jobs.json").read_text())
    assert list(jobs["jobs"]) == names and jobs["jobs"][names[-1]] == str(100 + len(names))

    # round 0 finished (as its jobs would: `distill rounds` is the same steps); round 1's prompts written,
    # task 0 of its 2-task generate array done (both writers)
    done = run_cli("rounds", "--config", path, "--rounds", "0")
    assert done.exit_code == 0, done.output
    assert run_cli("rounds", "--config", path, "--round", "1", "--step", "prompts").exit_code == 0
    steps = out / "round-001" / "steps"

    def generate_task(who: str, task: int) -> str:
        done = run_cli("generate", "--config", steps / f"generate-{who}.json", "--shard-index", str(task),
                       "--num-shards", "2")
        assert done.exit_code == 0, done.output
        return done.output

    def resubmit() -> tuple[str, list]:
        fake_sbatch.write_text("")
        again = run_cli("slurm", "--resubmit", tmp_path / "jobs")
        assert again.exit_code == 0, again.output
        return again.output, submitted(fake_sbatch)

    assert "not merged yet" in generate_task("student", 0) and "not merged yet" in generate_task("teacher", 0)
    output, calls = resubmit()
    assert "resubmitting 10 jobs from round-001/02-generate (round-001/02-generate tasks 1)" in output, output
    assert [c[0] for c in calls] == [f"{n}.sbatch" for n in names[6:]]
    assert calls[0] == ("round-001/02-generate.sbatch", None, "1")  # task 1 alone, and every job after it
    assert [c[1] for c in calls[1:]] == [str(101 + i) for i in range(len(calls) - 1)]

    generate_task("student", 1)  # the last task of each writer merges its records
    generate_task("teacher", 1)
    output, calls = resubmit()
    assert "resubmitting 9 jobs from round-001/03-prepare" in output, output
    assert calls[0] == ("round-001/03-prepare.sbatch", None, None)

    # every part written but the merge lost (its task stopped): one task reruns, and merges
    for name in ("generated.jsonl", "summary.json"):
        (out / "round-001" / "gen-teacher" / name).unlink()
    output, calls = resubmit()
    assert "from round-001/02-generate (round-001/02-generate tasks 0)" in output, output
    assert len(json.loads((tmp_path / "jobs" / "jobs.json").read_text())["history"]) == 4


def test_finished_rounds_are_not_submitted_again(tmp_path, setting, fake_sbatch):  # noqa: F811
    result, out, path = write(tmp_path, setting, rounds=0, eval_tasks=[])
    assert result.exit_code == 0, result.output
    done = run_cli("rounds", "--config", path)
    assert done.exit_code == 0, done.output
    again = run_cli("slurm", "--resubmit", tmp_path / "jobs")
    assert again.exit_code == 0 and "nothing to resubmit" in again.output, again.output
    assert not fake_sbatch.exists()
    # one more round (a rerun may raise `rounds`): only round 1's jobs go in, the first with no dependency
    result, _, _ = write(tmp_path, setting, "--submit", rounds=1, eval_tasks=[])
    assert result.exit_code == 0 and "round(s) 0 finished already" in result.output, result.output
    calls = submitted(fake_sbatch)
    assert [c[0] for c in calls][:2] == ["round-001/01-prompts.sbatch", "round-001/02-generate.sbatch"]
    assert len(calls) == 11 and calls[0][1] is None


def test_relative_paths_are_the_workdirs(tmp_path, setting, monkeypatch):  # noqa: F811
    """The rounds' paths, like every stage's, are relative to `workdir`, wherever `distill slurm` runs."""
    root, teacher, student = setting
    work = tmp_path / "work"
    work.mkdir()
    for name in ("prompts.jsonl", "heldout.txt"):
        (work / name).write_text((root / name).read_text())
    (work / "teacher").symlink_to(teacher)
    (work / "student").symlink_to(student)
    body = yaml.safe_load(config_file(root, teacher, student, tmp_path / "absolute").read_text())
    body |= {"prompts": "prompts.jsonl", "heldout_prompts": "heldout.txt", "teacher": "teacher", "student": "student",
             "out": "runs/rounds"}
    (tmp_path / "rounds.yaml").write_text(yaml.safe_dump(body))
    monkeypatch.chdir(tmp_path)  # not the workdir
    result = run_cli("slurm", "--config", slurm_config(tmp_path, workdir=str(work)), "--rounds", "rounds.yaml",
                     "--out", "jobs")
    assert result.exit_code == 0, result.output
    assert (work / "runs" / "rounds" / "config.json").is_file() and not (tmp_path / "runs").exists()
    assert (work / "runs" / "rounds" / "round-001" / "steps" / "student.json").is_file()
    student_job = (tmp_path / "jobs" / "round-001" / "06-student.sbatch").read_text()
    assert f"cd {work}\n" in student_job and "--config runs/rounds/round-001/steps/student.json" in student_job
    assert json.loads((work / "runs" / "rounds" / "round-001" / "steps" / "generate-student.json").read_text())[
        "model"] == "student"


def test_generate_tasks_that_own_no_record_owe_nothing(tmp_path, setting):  # noqa: F811
    from stages.slurm import missing_generate_tasks

    result, out, _ = write(tmp_path, setting, rounds=0, eval_tasks=[])
    assert result.exit_code == 0, result.output
    steps, gen = out / "round-000" / "steps" / "heldout-generate.json", out / "round-000" / "eval" / "gen"
    assert missing_generate_tasks(gen, 6) == [0, 1, 2, 3, 4, 5]  # nothing written: every task
    for task in (0, 2):
        done = run_cli("generate", "--config", steps, "--shard-index", str(task), "--num-shards", "6")
        assert done.exit_code == 0, done.output
    assert missing_generate_tasks(gen, 6) == [1, 3]  # 4 held-out prompts: tasks 4 and 5 own none
    for task in (1, 3):
        assert run_cli("generate", "--config", steps, "--shard-index", str(task), "--num-shards", "6").exit_code == 0
    assert (gen / "summary.json").is_file() and missing_generate_tasks(gen, 6) == []


def test_rounds_stage_one_runs_processes_per_node_and_arrays_take_a_throttle(tmp_path, setting):  # noqa: F811
    """jobs.teacher's procs_per_node and nodes, and 'N%M' arrays, shape the rounds' stage-one and generate
    jobs as they do `distill slurm`'s (issue #33)."""
    body = yaml.safe_load(SLURM_ROUNDS.read_text())
    body["jobs"]["teacher"] |= {"array": "3%2", "procs_per_node": 2}
    body["jobs"]["generate"] = {"array": "2%1"}
    result, out, _ = write(tmp_path, setting, slurm=slurm_config(tmp_path, jobs=body["jobs"]))
    assert result.exit_code == 0, result.output
    assert "stage one: 3 tasks × 1 node × 2 processes = 6 shard owners, at most 2 at once" in result.output
    jobs = tmp_path / "jobs" / "round-001"
    teacher = (jobs / "04-teacher.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in teacher and "#SBATCH --ntasks-per-node=2" in teacher
    assert "#SBATCH --gres=gpu:2" in teacher and "srun --nodes=1 --ntasks-per-node=2" in teacher
    assert '--shard-index "$((SLURM_ARRAY_TASK_ID * 2 + SLURM_PROCID))" --num-shards 6' in teacher
    assert subprocess.run(["bash", "-n", str(jobs / "04-teacher.sbatch")]).returncode == 0
    assert "#SBATCH --array=0-1%1" in (jobs / "02-generate.sbatch").read_text()

"""`distill slurm` without a cluster: the scripts it writes, and what it refuses (one line, nothing written)."""

import json
import subprocess

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

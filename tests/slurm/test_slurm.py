"""`distill slurm` against a real SLURM (tests/slurm/conftest.py starts one): the demo pipeline as
a 2-task stage-one array, merge, a 2-process torchrun stage two (gloo on CPU), eval and report."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import TOKENIZER, make_teacher, run_cli, write_corpus, write_tiny_model_config

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("slurm-inputs")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:40])
    write_corpus(root / "heldout.jsonl", heldout_docs[40:46])
    result = run_cli("prepare", "--input", corpus, "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "64", "--rows-per-shard", "64", "--chunk-rows", "8")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    write_tiny_model_config(root / "student.json")
    result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                     root / "reference", "--max-rows", "96", "--rows-per-shard", "16", "--samples", "8")
    assert result.exit_code == 0, result.output
    return root


def pipeline_config(inputs: Path, run: Path, steps: int = 8) -> Path:
    config = {
        "setup": f"export PATH={Path(sys.executable).parent}:$PATH",
        "workdir": str(Path(__file__).resolve().parents[2]),
        "env": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        "defaults": {"partition": "debug", "time": "00:15:00", "cpus": 1, "mem": "1G"},
        "jobs": {"teacher": {"array": 2}, "student": {"procs_per_node": 2, "cpus": 2}},
        "teacher": {"tokens_store": str(inputs / "tokens"), "teacher": str(inputs / "teacher"),
                    "out": str(run / "store"), "max_rows": 96, "rows_per_shard": 16, "samples": 8},
        "student": {"model": str(inputs / "student.json"), "out": str(run / "student"), "max_steps": steps,
                    "micro_batch_size": 4, "checkpoint_every": 2, "eval_every": 0, "warmup_steps": 1,
                    "device": "cpu", "log_every": 1},
        "eval": [{"tasks": ["heldout"], "heldout": [str(inputs / "heldout.jsonl")], "device": "cpu",
                  "out": str(run / "eval" / "student.json")}],
        "report": {"out": str(run / "report")},
    }
    path = run / "slurm.yaml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def shard_records(root: Path):
    return [(e["name"], e["sha256"]) for e in json.loads((root / "index.json").read_text())["shards"]]


def all_ids(jobs_json: Path) -> dict[str, str]:
    return json.loads(jobs_json.read_text())["jobs"]


STEPS = 48  # at ~75 ms a step on 2 CPU processes, seconds between the step-2 checkpoint and the end to signal in


@pytest.fixture(scope="module")
def uninterrupted(cluster, inputs, tmp_path_factory):
    """The whole pipeline submitted at once and left alone: (run directory, job ids, final states)."""
    run = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
        result = run_cli("slurm", "--config", pipeline_config(inputs, run, STEPS), "--out", run / "jobs", "--submit")
    assert result.exit_code == 0, result.output
    ids = all_ids(run / "jobs" / "jobs.json")
    return run, ids, cluster.wait(ids.values())


def logs(run: Path) -> dict[str, str]:
    return {p.name: p.read_text()[-1500:] for p in (run / "jobs" / "logs").iterdir()}


def test_the_pipeline_runs_as_slurm_jobs(uninterrupted, inputs):
    run, ids, states = uninterrupted
    assert list(ids) == ["teacher", "merge", "student", "eval"]
    assert states == {ids["teacher"]: ["COMPLETED", "COMPLETED"], ids["merge"]: ["COMPLETED"],
                      ids["student"]: ["COMPLETED"], ids["eval"]: ["COMPLETED"]}, logs(run)
    assert shard_records(run / "store") == shard_records(inputs / "reference")  # = one process's store
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(run / "student" / "model"))  # plain transformers
    assert json.loads((run / "student" / "config.json").read_text())["world_size"] == 2  # torchrun, 2 processes
    assert json.loads((run / "eval" / "student.json").read_text())["tasks"]["heldout"]
    assert (run / "report" / "report.md").is_file()


def test_a_cancelled_task_is_resubmitted_and_a_preempted_student_requeues(cluster, uninterrupted, inputs, tmp_path,
                                                                           monkeypatch):
    """Stage-one task 1 is cancelled: the jobs after it are cancelled too, and `--resubmit` submits
    task 1 alone and the chain after it. Then stage two gets the pre-emption signal (USR1, as
    `--signal` sends it): it checkpoints, the script requeues it, and the requeued job ends with the
    weights of the uninterrupted run."""
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    run = tmp_path / "run"
    result = run_cli("slurm", "--config", pipeline_config(inputs, run, STEPS), "--out", run / "jobs", "--submit")
    assert result.exit_code == 0, result.output
    first = all_ids(run / "jobs" / "jobs.json")
    cluster.run("scancel", f"{first['teacher']}_1")
    states = cluster.wait(first.values())
    # (a task cancelled while pending may leave no record of its own in scontrol)
    assert states[first["teacher"]].count("COMPLETED") == 1, states  # task 0; task 1 CANCELLED (or no record)
    assert all(states[first[k]] == ["CANCELLED"] for k in ("merge", "student", "eval")), states
    assert not (run / "store" / "index.json").exists()
    part = json.loads((run / "store" / "index.part-00001-of-00002.json").read_text()) \
        if (run / "store" / "index.part-00001-of-00002.json").exists() else {"shards": []}
    assert len(part["shards"]) < 3  # task 1 owes shards (it owns 3 of the 6)

    result = run_cli("slurm", "--resubmit", run / "jobs")
    assert result.exit_code == 0 and "stage-one tasks 1)" in result.output, result.output
    ids = all_ids(run / "jobs" / "jobs.json")
    assert len(cluster.job(ids["teacher"])) == 1  # task 1 only

    checkpoint = run / "student" / "checkpoints" / "step-00000002"
    cluster.wait([ids["student"]], until=checkpoint.exists)
    assert cluster.job(ids["student"])[0]["JobState"] == "RUNNING", "the student ended before it could be signalled"
    cluster.run("scancel", "--signal=USR1", ids["student"])  # every process of its steps, not the batch shell
    record = {}

    def requeued():  # the script requeued the job: let it start now rather than after SLURM's delay
        record.update(cluster.job(ids["student"])[0])
        return record.get("Restarts") == "1" and record.get("JobState") == "PENDING"

    cluster.wait([ids["student"]], timeout=120, until=requeued)
    assert record.get("Restarts") == "1", (record, logs(run))
    # SLURM holds a requeued job back for a while; start it now, but not within the second of the
    # requeue (slurmd would take the new launch for the revoked one: "Job credential revoked")
    time.sleep(3)
    cluster.run("scontrol", "update", f"JobId={ids['student']}", "StartTime=now")
    states = cluster.wait(ids.values())
    assert all(s == ["COMPLETED"] for s in states.values()), (states, logs(run))
    assert shard_records(run / "store") == shard_records(inputs / "reference")
    student_log = (run / "jobs" / "logs" / f"student-{ids['student']}.out").read_text()
    assert "preempted by SIGUSR1" in student_log and "requeueing" in student_log, student_log[-3000:]
    assert not (run / "student" / "preempted.json").exists()
    want = load_file(uninterrupted[0] / "student" / "model" / "model.safetensors")
    got = load_file(run / "student" / "model" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

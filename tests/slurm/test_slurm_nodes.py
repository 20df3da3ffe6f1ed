"""Stage one as several processes per SLURM job (issue #33, `jobs.teacher.procs_per_node`) against a real
SLURM (tests/slurm/conftest.py starts one), on CPU: two processes per array task, each owning the shards
of its global index, fill a store that merges to the one a single process writes; a throttled array
(`2%1`) runs one task at a time; and a pre-empted two-process job requeues and continues."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TOKENIZER, make_teacher, run_cli, write_corpus

pytestmark = pytest.mark.slurm

TEACHER = {"max_rows": 96, "rows_per_shard": 2, "samples": 8}  # 48 shards: moments enough to signal a job in


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("slurm-nodes")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:40])
    result = run_cli("prepare", "--input", corpus, "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "64", "--rows-per-shard", "64")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                     root / "reference", *[f"--{k.replace('_', '-')}={v}" for k, v in TEACHER.items()])
    assert result.exit_code == 0, result.output
    return root


def write_scripts(inputs: Path, run: Path, teacher_job: dict) -> Path:
    """`distill slurm` for the store (the stage-two and eval sections are there only to be checked);
    returns the directory of the scripts, of which the tests submit 1-teacher.sbatch."""
    config = {
        "setup": f"export PATH={Path(sys.executable).parent}:$PATH",
        "workdir": str(Path(__file__).resolve().parents[2]),
        "env": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        "defaults": {"partition": "debug", "time": "00:15:00", "cpus": 1, "mem": "1G"},
        "jobs": {"teacher": teacher_job},
        "teacher": {"tokens_store": str(inputs / "tokens"), "teacher": str(inputs / "teacher"),
                    "out": str(run / "store"), **TEACHER},
        "student": {"model": str(inputs / "teacher"), "out": str(run / "student")},
        "report": {"out": str(run / "report")},
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "slurm.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("slurm", "--config", run / "slurm.yaml", "--out", run / "jobs")
    assert result.exit_code == 0, result.output
    return run / "jobs"


def shard_records(root: Path):
    return [(e["name"], e["sha256"]) for e in json.loads((root / "index.json").read_text())["shards"]]


def logs(jobs: Path) -> dict[str, str]:
    return {p.name: p.read_text()[-2000:] for p in (jobs / "logs").iterdir()}


def test_two_processes_a_task_under_a_throttle_fill_the_store_one_process_writes(cluster, inputs, tmp_path):
    jobs = write_scripts(inputs, tmp_path, {"array": "2%1", "procs_per_node": 2})
    teacher = cluster.run("sbatch", "--parsable", str(jobs / "1-teacher.sbatch")).strip().split(";")[0]
    assert {r.get("ArrayTaskThrottle") for r in cluster.job(teacher)} == {"1"}  # at most one task at once
    states = cluster.wait([teacher])
    assert states == {teacher: ["COMPLETED", "COMPLETED"]}, (states, logs(jobs))
    # 2 tasks × 2 processes = 4 owners, each with its own partial index, merged (2-merge.sbatch's command;
    # the job itself is tests/slurm/test_slurm.py's) to one process's store
    store = tmp_path / "store"
    assert sorted(p.name for p in store.glob("index.part-*.json")) == [f"index.part-0000{g}-of-00004.json"
                                                                      for g in range(4)]
    assert "distill merge " + str(store) in (jobs / "2-merge.sbatch").read_text()
    assert run_cli("merge", store).exit_code == 0
    assert shard_records(store) == shard_records(inputs / "reference")


def test_a_preempted_two_process_job_requeues_and_each_process_continues(cluster, inputs, tmp_path):
    """USR1 (as `--signal` sends it) once the first shard is recorded: each process finishes its shard
    and exits 75, the script requeues the task, and the requeued processes write only what they owe."""
    jobs = write_scripts(inputs, tmp_path, {"array": 1, "procs_per_node": 2})
    store = tmp_path / "store"
    teacher = cluster.run("sbatch", "--parsable", str(jobs / "1-teacher.sbatch")).strip().split(";")[0]
    cluster.wait([teacher], until=lambda: any(store.glob("index.part-*.json")))
    assert cluster.job(teacher)[0]["JobState"] == "RUNNING", "stage one ended before it could be signalled"
    cluster.run("scancel", "--signal=USR1", teacher)  # every process of its steps, not the batch shell
    record = {}

    def requeued():
        record.update(cluster.job(teacher)[0])
        return record.get("Restarts") == "1" and record.get("JobState") == "PENDING"

    cluster.wait([teacher], timeout=120, until=requeued)
    assert record.get("Restarts") == "1", (record, logs(jobs))
    written = {g: len(json.loads((store / f"index.part-0000{g}-of-00002.json").read_text())["shards"])
               for g in range(2) if (store / f"index.part-0000{g}-of-00002.json").exists()}
    assert sum(written.values()) < 48, written  # stopped part-way
    time.sleep(3)  # not within the second of the requeue (slurmd: "Job credential revoked")
    cluster.run("scontrol", "update", f"JobId={record['JobId']}", "StartTime=now")
    states = cluster.wait([teacher])
    assert states == {teacher: ["COMPLETED"]}, (states, logs(jobs))
    log = "".join(p.read_text() for p in (jobs / "logs").iterdir())
    assert "preempted by SIGUSR1" in log and "requeueing" in log, log
    for g in range(2):  # each process's second run wrote only the shards it still owed
        assert f"job {g}/2 holds 24 shards ({24 - written.get(g, 0)} written now" in log, log
    assert run_cli("merge", store).exit_code == 0
    assert shard_records(store) == shard_records(inputs / "reference")

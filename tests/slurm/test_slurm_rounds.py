"""`distill slurm --rounds` against a real SLURM (tests/slurm/conftest.py starts one): round 0 and one
on-policy round as chained jobs (generate and stage-one arrays of 2 tasks, merges, stage two under
torchrun, the held-out estimate, finish) end with the students and the round.json that `distill rounds`
writes in one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_cli
from tests.stages.test_rounds import config_file, setting, weights  # noqa: F401 (setting is a fixture)

# about 3 minutes of chained jobs: with the slow tests (make test-slow), so that make test stays within CI's budget;
# the scripts themselves are checked in make test (tests/slurm/test_rounds_scripts.py)
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def round_numbers(out: Path, r: int) -> dict:
    """round.json without its timing, OUT written as OUT (two runs in two directories)."""
    body = json.loads((out / f"round-{r:03d}" / "round.json").read_text().replace(str(out), "OUT"))
    body.pop("seconds")
    return body


def test_one_round_as_chained_jobs_ends_as_distill_rounds(cluster, setting, tmp_path, monkeypatch):  # noqa: F811
    root, teacher, student = setting
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    # generate's ids do not depend on the batch, its float32 log-probs do in the last bits (padding changes
    # the shapes): one record per batch makes an array of n tasks decode exactly what one process does
    options = {"generate_options": {"batch_size": 1}}
    reference = tmp_path / "reference"
    done = run_cli("rounds", "--config", config_file(root, teacher, student, reference, **options))
    assert done.exit_code == 0, done.output

    out, jobs = tmp_path / "out", tmp_path / "jobs"
    rounds_config = config_file(root, teacher, student, out, **options)
    slurm_config = tmp_path / "slurm.yaml"
    slurm_config.write_text(yaml.safe_dump({
        "setup": f"export PATH={Path(sys.executable).parent}:$PATH",
        "workdir": str(Path(__file__).resolve().parents[2]),
        "env": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        "defaults": {"partition": "debug", "time": "00:15:00", "cpus": 1, "mem": "1G"},
        # one trainer: two would average two micro-batches per step, another run than the reference's
        "jobs": {"generate": {"array": 2}, "teacher": {"array": 2}, "student": {"procs_per_node": 1}}}))
    result = run_cli("slurm", "--config", slurm_config, "--rounds", rounds_config, "--out", jobs, "--submit")
    assert result.exit_code == 0, result.output
    ids = json.loads((jobs / "jobs.json").read_text())["jobs"]
    assert list(ids)[:7] == ["round-000/01-heldout-generate", "round-000/02-heldout-prepare",
                             "round-000/03-heldout-teacher", "round-000/04-heldout-merge", "round-000/05-finish",
                             "round-001/01-prompts", "round-001/02-generate"]
    assert list(ids)[-1] == "round-001/11-finish" and len(ids) == 16
    states = cluster.wait(ids.values(), timeout=1500)
    logs = {p.name: p.read_text()[-1500:] for p in (jobs / "logs").iterdir()}
    assert all(s and set(s) == {"COMPLETED"} for s in states.values()), (states, logs)
    assert len(states[ids["round-001/02-generate"]]) == 2  # two array tasks

    assert round_numbers(out, 0) == round_numbers(reference, 0)
    assert round_numbers(out, 1) == round_numbers(reference, 1)
    by_jobs, by_rounds = weights(out / "round-001" / "student" / "model"), weights(reference / "round-001" / "student" / "model")
    assert by_jobs.keys() == by_rounds.keys() and all(torch.equal(by_jobs[k], by_rounds[k]) for k in by_jobs)
    assert json.loads((out / "round-001" / "student" / "config.json").read_text())["world_size"] == 1  # torchrun's
    assert "torch.distributed.run" in (jobs / "round-001" / "06-student.sbatch").read_text()
    # `distill rounds` on the same OUT afterwards: the same pinned options, and nothing left to do
    again = run_cli("rounds", "--config", rounds_config)
    assert again.exit_code == 0, again.output
    assert "round 0: finished; skipped" in again.output and "round 1: finished; skipped" in again.output

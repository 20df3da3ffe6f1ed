"""SIGKILL `distill rounds` at random moments (issue #25): each rerun goes on from what is done, and the
chain ends with the students and numbers of an uninterrupted run, bit for bit.

A chain of runs shares one OUT. Each run is killed a random moment (seeded) after the output of one
step appears, step after step, so the kills land in every step of a round: the held-out generation
of round 0, the prompt split, generation (a part in flight), prepare, stage one (a shard in flight),
training (a checkpoint every step), the held-out steps; then a last run finishes.
"""

import json
import random
import time

import pytest

from tests.conftest import kill_when, spawn
from tests.stages.test_rounds import config_file, setting, weights  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.faults, pytest.mark.slow]
# what appears when each step starts, in the order the steps run
SENTINELS = ("round-000/eval/gen/parts/*", "round-001/prompts-*.jsonl", "round-001/gen-student/parts/*",
             "round-001/*tokens*", "round-001/store/*", "round-001/student/metrics.jsonl", "round-001/eval/gen/*",
             "round-001/eval/store/*", "round-002/gen-student/parts/*", "round-002/student/checkpoints/*")


def numbers(out, r):
    """A round's round.json without its timings, its run directory written as OUT."""
    body = json.loads((out / f"round-{r:03d}" / "round.json").read_text())
    body.pop("seconds")
    body.get("student_metrics", {}).pop("seconds", None)
    return json.loads(json.dumps(body).replace(str(out), "OUT"))


def test_rounds_killed_anywhere_end_as_an_uninterrupted_run(setting, tmp_path):  # noqa: F811
    root, teacher, student = setting
    extra = {"objective": "policy-gradient", "rounds": 2, "generate_options": {"records_per_part": 2},
             "student_options": {"checkpoint_every": 1}}
    reference = tmp_path / "reference"
    process = spawn(["rounds", "--config", config_file(root, teacher, student, reference, **extra)])
    started = time.perf_counter()
    output, _ = process.communicate(timeout=600)
    duration = time.perf_counter() - started
    assert process.returncode == 0, output

    out, rng, kills = tmp_path / "killed", random.Random(25), 0
    config = config_file(root, teacher, student, out, **extra)
    for pattern in SENTINELS:
        process = spawn(["rounds", "--config", config])
        seen: list[float] = []

        def ready():
            if not seen and any(out.glob(pattern)):
                seen.append(time.perf_counter() + rng.uniform(0.0, 0.3))
            return bool(seen) and time.perf_counter() >= seen[0]

        try:
            kill_when(process, ready)
            kills += 1
        except AssertionError:  # this run finished the chain before the moment
            break
    process = spawn(["rounds", "--config", config])
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert kills >= len(SENTINELS) - 2
    for r in (0, 1, 2):
        assert numbers(out, r) == numbers(reference, r)
    for r in (1, 2):
        a, b = weights(out / f"round-{r:03d}" / "student" / "model"), weights(reference / f"round-{r:03d}" / "student" / "model")
        assert all((a[k] == b[k]).all() for k in a)

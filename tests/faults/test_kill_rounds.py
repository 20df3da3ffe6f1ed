"""SIGKILL `distill rounds` at random moments (issue #25): each rerun goes on from what is done, and the
chain ends with the students and numbers of an uninterrupted run, bit for bit.

Moments are drawn from a seeded RNG, uniformly over the uninterrupted run's duration, so that they land
in every step of a round: the prompt split, generation (a part in flight), prepare (its temp store),
stage one (a shard in flight), training, the held-out steps and the round's own summary.
"""

import json
import random
import time

import pytest

from tests.conftest import kill_when, spawn
from tests.stages.test_rounds import config_file, setting, weights  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.faults, pytest.mark.slow]
KILLS = 5


def numbers(out, r):
    body = json.loads((out / f"round-{r:03d}" / "round.json").read_text())
    body.pop("seconds")
    body.get("student_metrics", {}).pop("seconds", None)
    return body


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
    while kills < KILLS:
        process = spawn(["rounds", "--config", config])
        moment = time.perf_counter() + rng.uniform(0.5, duration)
        try:
            kill_when(process, lambda: time.perf_counter() >= moment)
            kills += 1
        except AssertionError:  # the rest of the chain finished before the moment: start again from nothing
            break
    process = spawn(["rounds", "--config", config])
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert kills >= 3
    for r in (0, 1, 2):
        assert numbers(out, r) | {"model": ""} == numbers(reference, r) | {"model": ""}
    for r in (1, 2):
        a, b = weights(out / f"round-{r:03d}" / "student" / "model"), weights(reference / f"round-{r:03d}" / "student" / "model")
        assert all((a[k] == b[k]).all() for k in a)

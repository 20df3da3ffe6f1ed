"""The demo targets' wiring, read from `make -n` (nothing runs): every seed's students are trained on the same
store, evaluated under NAME-sSEED names that `distill report` groups by seed, and every evaluation reaches the
report."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from pipeline.text.tokenizer import load_tokenizer, vocab_size
from stages.report import ce_baseline, group_runs
from tests.conftest import ROOT


def distill_commands(*make_args: str) -> list[list[str]]:
    """The `distill` command lines `make -n ARGS` would run, split into words (``make demo``'s parts one at a
    time: under its default -j2 the two sub-makes' printed lines interleave)."""
    done = subprocess.run(["make", "-n", "--no-print-directory", *make_args, "DEMO_JOBS=1"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.strip().startswith(".venv/bin/distill ")]


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def students_and_report(make_args):
    commands = distill_commands(*make_args)
    students = {option(c, "--out"): c for c in commands if c[0] == "student"}
    evals = {option(c, "--model"): option(c, "--out") for c in commands if c[0] == "eval"}
    [report] = [c for c in commands if c[0] == "report"]
    return commands, students, evals, report


@pytest.mark.parametrize("make_args, run, kd, teacher, student_model", [
    (("demo",), "runs/demo", "student-kd-t1", "data/models/teacher", "data/models/student.json"),
    # the cross-tokenizer students are off here (REAL_CROSS_SEEDS empty) and tested on their own below
    (("demo-real", "REAL_CROSS_SEEDS="), "runs/demo-real", "student-kd", "data/models/smollm2-135m",
     "data/models/student-smollm2.json"),
])
def test_each_seed_is_trained_evaluated_and_grouped_in_the_report(make_args, run, kd, teacher, student_model):
    commands, students, evals, report = students_and_report(make_args)
    expected = {f"{run}/{name}-s{seed}": seed for name in (kd, "student-ce") for seed in (0, 1, 2)}
    assert set(students) == set(expected)
    assert len({option(c, "--train-store") for c in students.values()}) == 1  # the same rows for every student
    for out, words in students.items():
        assert option(words, "--seed") == str(expected[out]) and option(words, "--model") == student_model
        assert option(words, "--alpha") == ("1" if "student-ce" in out else "0.5")
        assert "--eval-store" not in words  # distill eval scores them after training
    assert set(evals) == {teacher} | {f"{out}/model" for out in students}
    assert set(report[1:report.index("--out")]) == set(evals.values())
    teacher_stage = [c for c in commands if c[0] == "teacher" and option(c, "--kind") == "sampled"]
    assert [option(c, "--teacher") for c in teacher_stage] == [teacher]

    # distill eval names a run after its model's run directory; report groups those names by seed
    runs = [{"name": Path(model).parent.name, "parameters": 1, "tasks": {},
             "training": {"alpha": 1.0 if "student-ce" in model else 0.5, "seed": expected[str(Path(model).parent)]}}
            for model in evals if model != teacher]
    assert sorted((g.name, g.seeds) for g in group_runs(runs)) == sorted([(kd, [0, 1, 2]), ("student-ce", [0, 1, 2])])


def test_seeds_are_a_variable_and_t2_is_opt_in():
    _, students, _, _ = students_and_report(("demo", "DEMO_SEEDS=4 5"))
    assert sorted(students) == ["runs/demo/student-ce-s4", "runs/demo/student-ce-s5",
                                "runs/demo/student-kd-t1-s4", "runs/demo/student-kd-t1-s5"]
    commands, students, _, _ = students_and_report(("demo", "DEMO_T2_SEEDS=0"))
    assert option(students["runs/demo/student-kd-t2-s0"], "--train-store") == "runs/demo/store-t2"
    assert any(c[0] == "teacher" and option(c, "--out") == "runs/demo/store-t2" for c in commands)
    # the cross seeds follow by default, with two more (REAL_CROSS_EXTRA_SEEDS), each once
    _, students, _, _ = students_and_report(("demo-real", "REAL_SEEDS=7 3"))
    assert sorted(students) == ["runs/demo-real/student-ce-s3", "runs/demo-real/student-ce-s7"] + \
        [f"runs/demo-real/student-cross-{kind}-s{seed}" for kind in ("ce", "kd") for seed in (3, 4, 7)] + \
        ["runs/demo-real/student-kd-s3", "runs/demo-real/student-kd-s7"]
    _, students, _, _ = students_and_report(("demo-real", "REAL_SEEDS=7", "REAL_CROSS_EXTRA_SEEDS="))
    assert sorted(students) == ["runs/demo-real/student-ce-s7", "runs/demo-real/student-cross-ce-s7",
                                "runs/demo-real/student-cross-kd-s7", "runs/demo-real/student-kd-s7"]


def test_demo_real_cross_tokenizer_students_learn_from_the_smollm2_store_and_reach_the_report():
    commands, students, evals, report = students_and_report(("demo-real",))
    run, smollm2 = "runs/demo-real", "data/models/smollm2-135m"
    [stage_one] = [c for c in commands if c[0] == "teacher" and option(c, "--kind") == "sampled"]
    [prepared] = [c for c in commands if c[0] == "prepare" and option(c, "--out") == option(stage_one, "--tokens-store")]
    assert option(stage_one, "--teacher") == smollm2 and option(prepared, "--tokenizer") == smollm2
    cross = {f"{run}/student-cross-{kind}-s{seed}": (kind, seed) for kind in ("kd", "ce") for seed in (0, 1, 2, 3, 4)}
    assert set(cross) < set(students)
    for out, words in students.items():
        assert option(words, "--train-store") == option(stage_one, "--out")  # every student, the same SmolLM2 rows
        if out not in cross:  # the SmolLM2-tokenizer students read the store as it is
            assert "--tokenizer" not in words and "--cross-tokenizer" not in words
            continue
        kind, seed = cross[out]
        assert option(words, "--seed") == str(seed) and option(words, "--model") == "data/models/student.json"
        assert option(words, "--tokenizer") == "data/tokenizer"
        # the distilled one through both terms; the CE twin needs a mode only to be given the retokenized rows
        assert (option(words, "--alpha"), option(words, "--cross-tokenizer")) == \
            (("0.5", "both") if kind == "kd" else ("1", "exact"))
        assert "--eval-store" not in words
    assert {f"{out}/model" for out in cross} <= set(evals)
    assert set(report[1:report.index("--out")]) == set(evals.values())

    # grouped by seed into four rows, and each distilled row's CE baseline is its own tokenizer's twin
    size = {"data/models/student-smollm2.json": 7_100_000, "data/models/student.json": 1_800_000}
    runs = []
    for model in sorted(evals):
        if model == smollm2:
            continue
        words = students[str(Path(model).parent)]
        runs.append({"name": Path(model).parent.name, "parameters": size[option(words, "--model")], "tasks": {},
                     "training": {"alpha": float(option(words, "--alpha")), "seed": int(option(words, "--seed")),
                                  "init": option(words, "--model"),
                                  **({"cross_tokenizer": option(words, "--cross-tokenizer")}
                                     if "--cross-tokenizer" in words else {})}})
    groups = {g.name: g for g in group_runs(runs)}
    assert {name: g.seeds for name, g in groups.items()} == \
        {"student-kd": [0, 1, 2], "student-ce": [0, 1, 2], "student-cross-kd": [0, 1, 2, 3, 4],
         "student-cross-ce": [0, 1, 2, 3, 4]}
    assert ce_baseline(groups["student-cross-kd"], list(groups.values()), None) is groups["student-cross-ce"]
    assert ce_baseline(groups["student-kd"], list(groups.values()), None) is groups["student-ce"]


def test_demo_real_cross_seeds_and_mode_are_variables():
    _, students, evals, report = students_and_report(("demo-real", "REAL_SEEDS=7", "REAL_CROSS_SEEDS=5",
                                                      "REAL_CROSS_MODE=exact"))
    assert sorted(students) == ["runs/demo-real/student-ce-s7", "runs/demo-real/student-cross-ce-s5",
                                "runs/demo-real/student-cross-kd-s5", "runs/demo-real/student-kd-s7"]
    assert option(students["runs/demo-real/student-cross-kd-s5"], "--cross-tokenizer") == "exact"
    assert evals["runs/demo-real/student-cross-kd-s5/model"] == "runs/demo-real/eval/4-student-cross-kd-s5.json"
    assert evals["runs/demo-real/student-cross-ce-s5/model"] == "runs/demo-real/eval/5-student-cross-ce-s5.json"
    _, students, evals, report = students_and_report(("demo-real", "REAL_CROSS_SEEDS="))
    assert not [out for out in students if "cross" in out] and not [out for out in report if "cross" in out]


def test_the_cross_student_is_the_smollm2_student_at_the_projects_vocabulary():
    cross = json.loads((ROOT / "data/models/student.json").read_text())
    same = json.loads((ROOT / "data/models/student-smollm2.json").read_text())
    special = ("vocab_size", "bos_token_id", "eos_token_id")
    assert {k: v for k, v in cross.items() if k not in special} == {k: v for k, v in same.items() if k not in special}
    tokenizer = load_tokenizer(ROOT / "data/tokenizer")
    assert cross["vocab_size"] == vocab_size(tokenizer) == 8192
    assert cross["eos_token_id"] == tokenizer.eos_token_id


def test_demo_real_prepares_with_the_teachers_tokenizer_and_fetches_it_first():
    done = subprocess.run(["make", "-n", "--no-print-directory", "demo-real"], cwd=ROOT, capture_output=True,
                          text=True)
    fetch = done.stdout.index("scripts/real_teacher.py --manifest data/manifests/smollm2-135m.json")
    assert fetch < done.stdout.index(".venv/bin/distill prepare")
    prepares = [c for c in distill_commands("demo-real") if c[0] == "prepare"]
    assert len(prepares) == 2 and {option(c, "--tokenizer") for c in prepares} == {"data/models/smollm2-135m"}


def test_onpolicy_pretrains_the_start_and_rounds_begin_from_it():
    commands = distill_commands("onpolicy")
    [start] = [c for c in commands if c[0] == "student"]
    [rounds] = [c for c in commands if c[0] == "rounds"]
    assert option(start, "--alpha") == "1" and option(start, "--train-store") == "runs/onpolicy/tokens/train"
    assert option(rounds, "--student") == option(start, "--out") + "/model"
    assert option(rounds, "--config") == "data/configs/rounds.yaml"


def test_demo_runs_its_parts_two_at_a_time_with_one_thread_each():
    """By default make demo is one `make -j2` of one-thread runs, each part waiting only for what it reads;
    DEMO_JOBS=1 runs them one after another (with torch's own threads) in an order that respects it."""
    def sub_makes(*args):
        done = subprocess.run(["make", "-n", "--no-print-directory", "demo", *args], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        return [line for line in done.stdout.splitlines() if " -j" in line and "demo-" in line]

    [parallel] = sub_makes()
    assert parallel.startswith("OMP_NUM_THREADS=1 make -j2 ")
    assert "demo-eval-1-teacher" in parallel and "demo-eval-4-student-ce-s2" in parallel
    [serial] = sub_makes("DEMO_JOBS=1")
    assert serial.startswith("make -j1 ")

    commands = distill_commands("demo")  # DEMO_JOBS=1: the order make chose
    at = {(c[0], option(c, "--out")): i for i, c in enumerate(commands)}
    first_use = lambda flag, value: min(i for i, c in enumerate(commands) if option(c, flag) == value)  # noqa: E731
    for (stage, out), i in at.items():
        if stage == "prepare":
            assert i < first_use("--tokens-store", out)
        elif stage == "teacher":
            readers = [j for j, c in enumerate(commands) if out in (option(c, "--train-store"), option(c, "--agreement"))]
            assert readers and i < min(readers)
        elif stage == "student":
            assert i < first_use("--model", f"{out}/model")

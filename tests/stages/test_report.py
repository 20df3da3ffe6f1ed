"""`distill report`'s paper tables from synthetic eval results: kept of teacher, seed groups, distilled
against CE-only, the rules table, QA formats, the temperature-study curves and bad inputs."""

import json

import pytest

from tests.conftest import one_line_error, run_cli

TEACHER = {"alpha": 1.0, "teacher_source": "none", "step": 600, "tokens": 4_896_000}


def kd(t, alpha=0.5, seed=None):
    facts = {"alpha": alpha, "temperature": t, "tail": "tail", "teacher_source": "store",
             "teacher_signal": "SparseTeacher", "step": 60, "tokens": 100}
    return facts | ({} if seed is None else {"seed": seed, "heldout_ppl": 100.0 + seed})


def ce(seed=None):
    return {"alpha": 1.0, "temperature": 1.0, "teacher_source": "none", "step": 60, "tokens": 100} | (
        {} if seed is None else {"seed": seed})


def run(name, params, training, tasks_):
    return {"name": name, "model": f"/nowhere/{name}", "parameters": params, "training": training, "tasks": tasks_}


def completion(acc, ppl, story, swag):
    return {"lambada": {"acc": acc, "ppl": ppl, "n": 100}, "storycloze": {"acc": story}, "hellaswag": {"acc": swag}}


def write(tmp_path, runs):
    paths = []
    for r in runs:
        paths.append(tmp_path / "eval" / f"{r['name']}.json")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_text(json.dumps(r))
    return paths


def report(tmp_path, runs, *flags):
    result = run_cli("report", *write(tmp_path, runs), "--out", tmp_path / "report", *flags)
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    return (out / "report.md").read_text(), json.loads((out / "report.json").read_text())


def table(md, heading):
    """The Markdown table under a heading: a list of rows, each a list of cells."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [rows[0]] + rows[2:]


STUDY = [
    run("teacher", 6_843_648, TEACHER, completion(0.5, 10.0, 0.8, 0.4)
        | {"nq": {"em_0shot": 0.2, "em_1shot": 0.25, "format": "lm-eval"}}),
    *[run(f"kd-T2-s{s}", 1_840_256, kd(2.0, seed=s), completion(acc, ppl, story, 0.3)
          | {"nq": {"em_0shot": 0.1, "em_1shot": 0.15, "format": "lm-eval"}})
      for s, acc, ppl, story in ((0, 0.39, 12.0, 0.60), (1, 0.40, 12.5, 0.62), (2, 0.41, 13.0, 0.64))],
    run("kd-T1-s0", 1_840_256, kd(1.0, seed=0), completion(0.30, 20.0, 0.5, 0.3)),
    *[run(f"ce-s{s}", 1_840_256, ce(s), completion(acc, 25.0, story, 0.3))
      for s, acc, story in ((0, 0.30, 0.57), (1, 0.34, 0.65))],
]


def test_kept_of_teacher_seed_groups_and_ce_comparison(tmp_path):
    md, numbers = report(tmp_path, STUDY)
    assert numbers["teacher"] == "teacher" and "the largest model (6.84M parameters" in numbers["teacher_rule"]
    groups = {g["name"]: g for g in numbers["groups"]}
    assert list(groups) == ["teacher", "kd-T2", "kd-T1-s0", "ce"]
    assert groups["kd-T2"]["runs"] == ["kd-T2-s0", "kd-T2-s1", "kd-T2-s2"] and groups["kd-T2"]["seeds"] == [0, 1, 2]
    assert groups["ce"]["seeds"] == [0, 1]
    acc = groups["kd-T2"]["metrics"]["lambada.acc"]
    assert acc["mean"] == pytest.approx(0.40) and acc["sd"] == pytest.approx(0.01)
    assert (acc["min"], acc["max"], acc["n"]) == (0.39, 0.41, 3)
    assert groups["ce"]["metrics"]["lambada.acc"]["sd"] == pytest.approx(0.02 * 2 ** 0.5)  # sample sd of .30, .34
    assert groups["kd-T1-s0"]["metrics"]["lambada.acc"]["sd"] is None
    # kept: student / teacher for accuracy, teacher / student for perplexity
    kept = groups["kd-T2"]["kept_of_teacher"]
    assert kept["lambada.acc"] == pytest.approx(0.40 / 0.5) and kept["lambada.ppl"] == pytest.approx(10.0 / 12.5)
    assert kept["storycloze.acc"] == pytest.approx(0.62 / 0.8) and kept["nq.em_1shot"] == pytest.approx(0.15 / 0.25)
    assert groups["ce"]["kept_of_teacher"]["lambada.ppl"] == pytest.approx(10.0 / 25.0)
    assert "kept_of_teacher" not in groups["teacher"]

    rows = table(md, "### Table 1")
    assert rows[0] == ["model", "parameters", "training", "T", "seeds", "LAMBADA acc ↑", "kept", "LAMBADA ppl ↓",
                       "kept", "StoryCloze acc ↑", "kept", "HellaSwag acc ↑", "kept"]
    assert rows[1][:7] == ["teacher", "6.84M", "cross-entropy", "–", "–", "50.0", "–"]
    assert rows[2][3:9] == ["2", "3 (0, 1, 2)", "40.0 ± 1.0", "80%", "12.50 ± 0.500", "80%"]
    assert rows[4][4:7] == ["2 (0, 1)", "32.0 ± 2.8", "64%"]

    # distilled beside the same-size CE-only group; beyond spread both ways
    cmp = {(c["distilled"], c["metric"]): c for c in numbers["comparison"]}
    lam = cmp[("kd-T2", "lambada.acc")]
    assert lam["ce"] == "ce" and lam["delta"] == pytest.approx(0.08)
    assert lam["spread"] == pytest.approx(0.01 + 0.02 * 2 ** 0.5) and lam["exceeds"] is True
    story = cmp[("kd-T2", "storycloze.acc")]
    assert story["delta"] == pytest.approx(0.01) and story["spread"] == pytest.approx(0.02 + 0.04 * 2 ** 0.5)
    assert story["exceeds"] is False
    one_seed = cmp[("kd-T1-s0", "lambada.acc")]  # one seed: borrows the CE group's sd
    assert one_seed["spread"] == pytest.approx(2 * 0.02 * 2 ** 0.5) and one_seed["exceeds"] is False
    cmp_rows = table(md, "### Distilled against the same-size CE-only student")
    assert ["kd-T2", "ce", "LAMBADA acc ↑", "40.0 ± 1.0", "32.0 ± 2.8", "+8.0", "3.8", "yes"] in cmp_rows
    assert ["kd-T2", "ce", "StoryCloze acc ↑", "62.0 ± 2.0", "61.0 ± 5.7", "+1.0", "7.7", "no"] in cmp_rows

    # QA: 0 and 1 shots, kept, and the format the numbers came from
    qa = table(md, "### Table 2")
    assert qa[0][5:] == ["QA format", "NQ 0-shot ↑", "kept", "NQ 1-shot ↑", "kept"]
    assert qa[2][5:] == ["lm-eval", "10.0 ± 0.0", "50%", "15.0 ± 0.0", "60%"]
    assert qa[3][5:] == ["–", "–", "–", "–", "–"]
    assert "QA under rules" not in md  # no rule metrics, no rules table
    assert "temperature study" in md  # kd-T1 and kd-T2 differ only in T: a two-point curve
    assert (tmp_path / "report" / "sweep_temperature.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "report" / "sweep_alpha.png").exists()


def test_no_spread_without_seeds_and_mixed_formats(tmp_path):
    runs = [run("teacher", 9_000_000, TEACHER, {"nq": {"em_0shot": 0.2, "format": "gpt3"},
                                                "webq": {"em_0shot": 0.4, "format": "lm-eval"}}),
            run("kd", 1_000_000, kd(2.0), {"nq": {"em_0shot": 0.1}, "webq": {"em_0shot": 0.3}}),
            run("ce", 1_000_000, ce(), {"nq": {"em_0shot": 0.05}, "webq": {"em_0shot": 0.2}})]
    md, numbers = report(tmp_path, runs)
    assert [c["exceeds"] for c in numbers["comparison"]] == [None, None]
    assert ["kd", "ce", "NQ 0-shot ↑", "10.0", "5.0", "+5.0", "–", "–"] in table(md, "### Distilled against")
    assert table(md, "### Table 2")[1][5] == "NQ: gpt3, WebQ: lm-eval"


def test_rules_table_only_with_rule_metrics(tmp_path):
    nq = {"em_0shot": 0.1, "rules_em_0shot": 0.2, "violating_0shot": 0.5, "rules_violating_0shot": 0.0,
          "rules_unsatisfiable_0shot": 0.05, "violating_0shot_no-digits": 0.25, "violating_0shot_max-words": 0.375}
    md, numbers = report(tmp_path, [run("m", 1_000_000, {}, {"nq": nq})], "--teacher", "none")
    rows = table(md, "### QA under rules")
    assert rows[1] == ["m", "NQ", "0", "10.0", "20.0", "50.0", "0.0", "5.0", "max-words 37.5, no-digits 25.0"]
    rule = numbers["rules"][0]
    assert rule["rules_em"]["mean"] == 0.2 and rule["per_rule"]["no-digits"]["mean"] == 0.25
    assert "| kept" not in md and numbers["teacher"] is None and "--teacher none" in numbers["teacher_rule"]


def test_sweep_curves_against_t_and_alpha(tmp_path):
    runs = [run("teacher", 6_843_648, TEACHER, completion(0.5, 10.0, 0.8, 0.4))]
    runs += [run(f"kd-T{t:g}-a0.5-s0", 1_840_256, kd(t, seed=0), completion(0.3 + t / 100, 20.0 - t, 0.6, 0.3))
             for t in (1.0, 1.5, 2.0, 3.0, 4.0)]
    runs += [run(f"kd-T2-a{a:g}-s0", 1_840_256, kd(2.0, alpha=a, seed=0), completion(a, 20.0, 0.6, 0.3))
             for a in (0.1, 0.9)]
    runs += [run(f"ce-s{s}", 1_840_256, ce(s), completion(0.3, 25.0, 0.6, 0.3)) for s in (0, 1, 2)]
    md, numbers = report(tmp_path, runs)
    sweep = numbers["sweep"]
    assert [p["x"] for p in sweep["temperature"]["points"]] == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert [p["x"] for p in sweep["alpha"]["points"]] == [0.1, 0.5, 0.9] and sweep["alpha"]["ce"] == "ce"
    for figure in ("sweep_temperature.png", "sweep_alpha.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:4] == b"\x89PNG" and f"]({figure})" in md
    rows = table(md, "## The temperature study: metric against T")
    assert rows[0][:4] == ["T", "model", "seeds", "LAMBADA acc ↑"]
    assert [r[0] for r in rows[1:]] == ["1", "1.5", "2", "3", "4", "–", "–"]
    assert rows[5][3] == "34.0" and rows[6][1:4] == ["ce", "3 (0, 1, 2)", "30.0 ± 0.0"]
    off = run_cli("report", *write(tmp_path, runs), "--out", tmp_path / "off", "--sweep", "off")
    assert off.exit_code == 0 and not (tmp_path / "off" / "sweep_temperature.png").exists()


def test_seed_from_the_student_run_config(tmp_path):
    """Eval results whose training facts lack the seed: it comes from config.json beside the model."""
    runs = []
    for seed, acc in ((3, 0.2), (4, 0.3)):
        model = tmp_path / f"ce-{seed}" / "model"
        model.mkdir(parents=True)
        (model.parent / "config.json").write_text(json.dumps({"stage": "TrainConfig", "config": {"seed": seed}}))
        runs.append(run(f"ce-s{seed}", 1_000_000, ce(), completion(acc, 20.0, 0.6, 0.3)) | {"model": str(model)})
    _, numbers = report(tmp_path, runs, "--teacher", "none")
    (group,) = numbers["groups"]
    assert group["seeds"] == [3, 4] and group["metrics"]["lambada.acc"]["mean"] == pytest.approx(0.25)


def test_bad_inputs(tmp_path):
    same_size = [run("a", 1_000_000, kd(2.0), completion(0.3, 20.0, 0.6, 0.3)),
                 run("b", 1_000_000, ce(), completion(0.2, 30.0, 0.5, 0.3))]
    md, numbers = report(tmp_path, same_size)  # auto, nobody larger: the kept columns are left out, with a note
    assert numbers["teacher"] is None and "no teacher identified" in md and "| kept" not in md
    paths = write(tmp_path, same_size)
    err = one_line_error(run_cli("report", *paths, "--out", tmp_path / "r", "--teacher", "gpt"))
    assert "--teacher gpt: no run of that name among a, b" in err
    err = one_line_error(run_cli("report", *paths, "--out", tmp_path / "r", "--sweep", "on"))
    assert "--sweep on: no distilled runs that differ only in temperature" in err
    assert "--sweep must be auto, on or off" in one_line_error(
        run_cli("report", *paths, "--out", tmp_path / "r", "--sweep", "yes"))
    md, numbers = report(tmp_path, same_size, "--teacher", "b")  # named: the kept columns are against it
    assert [g["name"] for g in numbers["groups"]] == ["b", "a"]  # the teacher's row first
    assert numbers["groups"][1]["kept_of_teacher"]["lambada.acc"] == pytest.approx(0.3 / 0.2)



def test_fine_tuned_students_stay_apart_and_name_their_origin(tmp_path):
    """Two students fine-tuned with α = 1 for the same steps, from a distilled and from a CE-only
    student, differ only in ``init``: two rows (not two seeds of one), each named "from …"."""
    tuned = {"alpha": 1.0, "temperature": 2.0, "teacher_source": "store", "step": 100, "tokens": 100, "seed": 0}
    runs = [run("teacher", 6_840_000, TEACHER, completion(0.06, 2000.0, 0.53, 0.30)),
            run("student-kd-finetuned", 1_840_000, tuned | {"init": "runs/fd/student-kd/model"},
                completion(0.01, 30000.0, 0.50, 0.27)),
            run("student-ce-finetuned", 1_840_000, tuned | {"init": "runs/fd/student-ce/model"},
                completion(0.00, 31000.0, 0.49, 0.26)),
            run("student-ce", 1_840_000, ce(0) | {"init": "data/models/student.json"}, completion(0.0, 32000.0, 0.5, 0.25))]
    md, _ = report(tmp_path, runs)
    rows = {r[0]: r for r in table(md, "### Table 1")[1:]}
    assert set(rows) == {"teacher", "student-kd-finetuned", "student-ce-finetuned", "student-ce"}
    assert rows["student-kd-finetuned"][2] == "cross-entropy, from student-kd"
    assert rows["student-ce-finetuned"][2] == "cross-entropy, from student-ce"
    assert rows["student-ce"][2] == "cross-entropy"  # started from a config: nothing to name
    assert rows["student-ce"][4] == "1 (0)" and rows["teacher"][4] == "–"  # n and the seed, not a bare seed


def test_an_option_recorded_empty_groups_with_runs_that_did_not_record_it(tmp_path):
    """A run that records ``cross_tokenizer: ""`` (not used) and one written before the option existed
    are seeds of one group; a run that used the option is not."""
    runs = [run("kd-s0", 1_000_000, kd(1.0, seed=0), completion(0.2, 20.0, 0.6, 0.3)),
            run("kd-s1", 1_000_000, kd(1.0, seed=1) | {"cross_tokenizer": ""}, completion(0.3, 20.0, 0.6, 0.3)),
            run("kd-cross-s2", 1_000_000, kd(1.0, seed=2) | {"cross_tokenizer": "both"}, completion(0.4, 20.0, 0.6, 0.3))]
    _, numbers = report(tmp_path, runs, "--teacher", "none")
    assert [g["seeds"] for g in numbers["groups"]] == [[0, 1], [2]]


def test_an_on_policy_objective_is_named_and_its_runs_stay_apart(tmp_path):
    """Runs trained with --objective (#25) say which, and the policy gradient's ratio treatment; they
    are not seeds of the plain run with the same α and T."""
    pg = {"alpha": 0.0, "temperature": 1.0, "teacher_source": "store", "step": 100, "tokens": 100, "seed": 0,
          "teacher_signal": "StoredPolicyGradient", "store_kind": "target", "tail": None,
          "objective": "policy-gradient", "ratio": "clip", "ratio_epsilon": 0.2}
    runs = [run("pg-s0", 1_000_000, pg, completion(0.2, 20.0, 0.6, 0.3)),
            run("rkl-s0", 1_000_000, kd(1.0, seed=0) | {"objective": "reverse-kl", "store_kind": "topk"},
                completion(0.3, 20.0, 0.6, 0.3)),
            run("kd-s1", 1_000_000, kd(1.0, seed=1) | {"store_kind": "topk"}, completion(0.4, 20.0, 0.6, 0.3))]
    md, numbers = report(tmp_path, runs, "--teacher", "none")
    rows = {r[0]: r for r in table(md, "### Table 1")[1:]}
    assert rows["pg-s0"][2] == "distilled (α=0, policy-gradient clip, target store)"
    assert rows["rkl-s0"][2] == "distilled (α=0.5, reverse-kl, tail, top-k store)"
    assert [g["seeds"] for g in numbers["groups"]] == [[0], [0], [1]]

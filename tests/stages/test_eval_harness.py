"""`distill eval --harness`: lm-evaluation-harness's own tasks through distill, into the eval JSON and
`distill report`'s tables.

The report, the option checks, a missing lm_eval and the slurm pass-through run in `make test`
without lm_eval. The runs of lm_eval itself are `slow` (`make test-slow` installs the [lmeval]
extra): importing lm_eval and indexing its ~15k tasks alone take 30-40 s on a CPU, and the extra
brings 44 packages (~400 MB: scipy, scikit-learn, pandas, nltk, ...) that `make test` would install."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, one_line_error, run_cli
from tests.stages.test_report import TEACHER, ce, kd, report, run, table

MODEL = ROOT / "data" / "models" / "teacher"


# ---- distill report: harness results as metrics like any other (no lm_eval needed)


def harness(version="0.4.13", **tasks):
    """A `harness` section as `distill eval --harness` writes it: TASK=(acc, perplexity or None, n_shot)."""
    out = {}
    for name, (acc, ppl, shots) in tasks.items():
        metrics = {"acc": {"value": acc, "stderr": 0.01}}
        better = {"acc": True}
        if ppl is not None:
            metrics["perplexity"] = {"value": ppl, "stderr": 1.0}
            better["perplexity"] = False
        out[name] = {"metrics": metrics, "higher_is_better": better, "n_shot": shots, "version": 1.0,
                     "config_hash": "sha256:0", "samples": {"original": 100, "effective": 100}}
    return {"lm_eval_version": version, "requested": list(tasks), "tasks": out, "options": {}}


def with_harness(r, section):
    return r | {"harness": section}


def test_report_shows_harness_tasks_with_seed_spreads_kept_and_ce_comparison(tmp_path):
    runs = [with_harness(run("teacher", 6_843_648, TEACHER, {}), harness(arc_easy=(0.60, 10.0, 5)))]
    runs += [with_harness(run(f"kd-s{s}", 1_840_256, kd(2.0, seed=s), {}), harness(arc_easy=(acc, ppl, 5)))
             for s, acc, ppl in ((0, 0.40, 20.0), (1, 0.44, 22.0))]
    runs += [with_harness(run(f"ce-s{s}", 1_840_256, ce(seed=s), {}), harness(arc_easy=(acc, 30.0, 5)))
             for s, acc in ((0, 0.30), (1, 0.32))]
    md, numbers = report(tmp_path, runs)

    rows = table(md, "### Table 3")
    assert rows[0] == ["model", "parameters", "training", "T", "seeds", "shots", "arc_easy acc ↑", "kept",
                       "arc_easy perplexity ↓", "kept"]
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["kd"][4:] == ["2 (0, 1)", "5", "42.0 ± 2.8", "70%", "21.00 ± 1.414", "48%"]
    assert by_name["ce"][6] == "31.0 ± 1.4"
    assert "lm_eval 0.4.13" in md
    groups = {g["name"]: g for g in numbers["groups"]}
    acc = groups["kd"]["metrics"]["harness/arc_easy.acc"]
    assert acc["mean"] == pytest.approx(0.42) and acc["sd"] == pytest.approx(0.04 / 2 ** 0.5) and acc["n"] == 2
    assert groups["kd"]["kept_of_teacher"]["harness/arc_easy.acc"] == pytest.approx(0.70)
    assert groups["kd"]["kept_of_teacher"]["harness/arc_easy.perplexity"] == pytest.approx(10.0 / 21.0)
    cmp = {(c["distilled"], c["metric"]): c for c in numbers["comparison"]}
    delta = cmp[("kd", "harness/arc_easy.acc")]
    assert delta["delta"] == pytest.approx(0.11) and delta["exceeds"] is True  # 0.11 > 0.028 + 0.014
    # the per-run table and the bar chart have them too
    assert "| arc_easy acc ↑ |" in md.splitlines()[2] and (tmp_path / "report" / "harness.png").is_file()
    assert numbers["runs"][1]["tasks"]["harness/arc_easy"] == {"acc": 0.40, "perplexity": 20.0}


def test_report_shows_a_group_by_its_aggregate_or_else_its_subtasks_and_keeps_filters(tmp_path):
    """mmlu (a group with an aggregate) is one column, a group without one shows its subtasks, and a
    metric under another filter than lm-eval's 'none' keeps lm-eval's name."""
    section = harness(mmlu=(0.30, None, 0), mmlu_stem=(0.25, None, 0), demo_a=(0.5, None, 0), demo_b=(0.6, None, 0))
    section["requested"] = ["mmlu", "demo", "gsm8k"]
    section["tasks"]["mmlu"]["subtasks"] = ["mmlu_stem"]
    section["tasks"]["demo"] = {"metrics": {}, "subtasks": ["demo_a", "demo_b"], "n_shot": None}
    section["tasks"]["gsm8k"] = {"metrics": {"exact_match,strict-match": {"value": 0.125, "stderr": None}},
                                 "higher_is_better": {"exact_match,strict-match": True}, "n_shot": 5}
    md, numbers = report(tmp_path, [with_harness(run("m", 1_000_000, {}, {}), section)])
    header = table(md, "### Table 3")[0]
    assert header[6:] == ["mmlu acc ↑", "demo_a acc ↑", "demo_b acc ↑", "gsm8k exact_match,strict-match ↑"]
    assert table(md, "### Table 3")[1][5:] == ["demo_a: 0, demo_b: 0, gsm8k: 5, mmlu: 0", "30.0", "50.0",
                                               "60.0", "12.5"]
    assert "harness/mmlu_stem" not in numbers["runs"][0]["tasks"]


# ---- distill eval --harness: what is refused before the model loads (no lm_eval needed)


def test_harness_options_are_checked_with_the_rest(tmp_path):
    result = run_cli("eval", "--model", MODEL, "--out", tmp_path / "x.json", "--tasks", "",
                     "--harness-fewshot", "-2")
    line = one_line_error(result)
    assert "no --tasks or --harness given" in line and "harness_fewshot must be -1" in line
    line = one_line_error(run_cli("eval", "--model", MODEL, "--out", tmp_path / "x.json", "--harness-fewshot", "5"))
    assert "--harness-include and --harness-fewshot apply to --harness tasks" in line


def test_a_missing_lm_eval_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError, installed or not
    result = run_cli("eval", "--model", MODEL, "--out", tmp_path / "x.json", "--tasks", "", "--harness", "arc_easy")
    assert "pip install 'distill[lmeval]'" in one_line_error(result)
    assert not (tmp_path / "x.json").exists()


def test_slurm_eval_passes_harness_options_through(tmp_path):
    """`distill slurm`'s eval sections are EvalConfig's keys: the harness options reach the job's config."""
    body = yaml.safe_load((ROOT / "data" / "configs" / "slurm-demo.yaml").read_text())
    body["eval"][1] |= {"harness": "mmlu,arc_easy", "harness_fewshot": 5, "harness_include": ["data/lm_eval"]}
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump(body))
    result = run_cli("slurm", "--config", tmp_path / "slurm.yaml", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    job = yaml.safe_load((tmp_path / "out" / "config" / "eval-1.yaml").read_text())
    assert job["harness"] == ["mmlu", "arc_easy"] and job["harness_fewshot"] == 5
    assert job["harness_include"] == ["data/lm_eval"]


# ---- against lm_eval itself (slow: the [lmeval] extra)

QUESTIONS = [("The sun rises in the", ["east", "west", "north", "south"], 0),
             ("Water freezes at zero degrees", ["Celsius", "Kelvin", "minutes", "meters"], 0),
             ("A week has seven", ["days", "years", "hours", "cats"], 0),
             ("The opposite of hot is", ["cold", "blue", "tall", "loud"], 0),
             ("Bees make", ["honey", "milk", "bread", "glass"], 0),
             ("The capital of France is", ["Paris", "Rome", "Oslo", "Lima"], 0),
             ("A triangle has three", ["sides", "wheels", "legs", "eyes"], 0),
             ("Ice is frozen", ["water", "sand", "iron", "wood"], 0),
             ("Birds can", ["fly", "read", "swim upstream", "sing opera"], 0),
             ("The moon orbits the", ["Earth", "Sun", "Mars", "sea"], 0),
             ("Fish live in", ["water", "trees", "deserts", "clouds"], 0),
             ("Snow is usually", ["white", "green", "purple", "hot"], 0)]


def local_task(folder: Path) -> Path:
    """An ARC-style multiple-choice lm-eval task over a JSONL file in ``folder`` (nothing downloaded);
    the answers rotate so that always picking the first choice scores 25%."""
    folder.mkdir()
    rows = []
    for i, (question, choices, _) in enumerate(QUESTIONS):
        shift = i % 4
        rows.append({"question": question, "choices": choices[shift:] + choices[:shift], "answer": (4 - shift) % 4})
    (folder / "tiny_arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_arc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_arc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "tiny_arc.jsonl")}},
        "output_type": "multiple_choice", "test_split": "test", "fewshot_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))
    return folder


@pytest.mark.slow
def test_harness_through_distill_agrees_with_lm_eval_run_directly(tmp_path, monkeypatch):
    """The same numbers as lm_eval's own CLI on the same model and local tasks: a task defined here
    (two shots) and the demo HellaSwag of data/lm_eval (zero-shot), whose accuracy also equals distill's
    own hellaswag task; then `distill report` shows them."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(ROOT)  # data/lm_eval's data_files are relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks_dir = local_task(tmp_path / "tasks")
    limit, shots = 10, 2
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    theirs = {}
    for task, fewshot, include in (("tiny_arc", shots, tasks_dir), ("distill_demo_hellaswag", 0, "data/lm_eval")):
        done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                               f"pretrained={MODEL},dtype=float32", "--tasks", task, "--num_fewshot", str(fewshot),
                               "--include_path", str(include), "--limit", str(limit), "--batch_size", "8",
                               "--device", "cpu", "--output_path", str(tmp_path / "lm" / task)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        theirs |= json.loads(next((tmp_path / "lm" / task).rglob("results_*.json")).read_text())["results"]

    base = ["eval", "--model", MODEL, "--harness-include", f"{tasks_dir},data/lm_eval", "--limit", limit,
            "--batch-size", "8", "--device", "cpu"]
    result = run_cli(*base, "--out", tmp_path / "arc.json", "--tasks", "", "--harness", "tiny_arc",
                     "--harness-fewshot", shots)
    assert result.exit_code == 0, result.output
    result = run_cli(*base, "--out", tmp_path / "swag.json", "--tasks", "hellaswag",
                     "--harness", "distill_demo_hellaswag")
    assert result.exit_code == 0, result.output
    arc, swag = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("arc", "swag"))

    for ours, task in ((arc, "tiny_arc"), (swag, "distill_demo_hellaswag")):
        entry = ours["harness"]["tasks"][task]
        for metric in ("acc", "acc_norm"):
            assert entry["metrics"][metric]["value"] == pytest.approx(theirs[task][f"{metric},none"], abs=1e-12), \
                (task, metric)
            assert entry["metrics"][metric]["stderr"] == pytest.approx(theirs[task][f"{metric}_stderr,none"],
                                                                       abs=1e-12), (task, metric)
        assert entry["samples"] == {"original": 12 if task == "tiny_arc" else 400, "effective": limit}
        assert entry["version"] == 1.0 and entry["config_hash"].startswith("sha256:")
    assert arc["harness"]["tasks"]["tiny_arc"]["n_shot"] == shots
    assert swag["harness"]["tasks"]["distill_demo_hellaswag"]["n_shot"] == 0
    # distill's own hellaswag scores the same file as lm-eval's demo task: the same accuracy
    assert swag["tasks"]["hellaswag"]["acc"] == swag["harness"]["tasks"]["distill_demo_hellaswag"]["metrics"]["acc"][
        "value"]
    from importlib.metadata import version

    assert arc["harness"]["lm_eval_version"] == version("lm_eval")
    assert arc["harness"]["options"] | {"include_path": None} == {
        "tasks": ["tiny_arc"], "include_path": None, "num_fewshot": shots, "limit": limit, "batch_size": 8,
        "device": "cpu", "dtype": "float32", "max_length": 512, "fewshot_random_seed": 1234}
    assert arc["config"]["harness"] == ["tiny_arc"] and arc["config"]["harness_fewshot"] == shots
    assert arc["tasks"] == {}

    result = run_cli("report", tmp_path / "arc.json", tmp_path / "swag.json", "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    rows = table((tmp_path / "report" / "report.md").read_text(), "### Table 3")
    assert rows[0][6:] == ["tiny_arc acc ↑", "tiny_arc acc_norm ↑", "distill_demo_hellaswag acc ↑",
                           "distill_demo_hellaswag acc_norm ↑"]
    assert rows[1][6] == f"{100 * theirs['tiny_arc']['acc,none']:.1f}"


@pytest.mark.slow
def test_an_unknown_harness_task_is_one_line_with_close_matches(tmp_path):
    pytest.importorskip("lm_eval")
    result = run_cli("eval", "--model", MODEL, "--out", tmp_path / "x.json", "--tasks", "",
                     "--harness", "arc_easy,arc_chalenge")
    line = one_line_error(result)
    assert "unknown lm-eval task(s): arc_chalenge (did you mean arc_challenge" in line
    line = one_line_error(run_cli("eval", "--model", MODEL, "--out", tmp_path / "x.json", "--tasks", "",
                                  "--harness", "arc_easy", "--harness-include", tmp_path / "nowhere"))
    assert "no such directory" in line

"""lm-evaluation-harness reads the demo sets through data/lm_eval/ and agrees with `distill eval`.

Slow and optional: needs the [lmeval] extra (`make test-slow` installs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

# (distill task, distill metric, lm-eval task, lm-eval metric, transform of distill's value)
PAIRS = [
    ("heldout", "bits_per_byte", "distill_demo_heldout", "bits_per_byte", lambda v: v),
    ("heldout", "bits_per_byte", "distill_demo_heldout", "byte_perplexity", lambda v: 2 ** v),
    ("heldout", "word_ppl", "distill_demo_heldout", "word_perplexity", lambda v: v),
    ("lambada", "acc", "distill_demo_lambada", "acc", lambda v: v),
    ("lambada", "ppl", "distill_demo_lambada", "perplexity", lambda v: v),
    ("hellaswag", "acc", "distill_demo_hellaswag", "acc", lambda v: v),
    ("hellaswag", "acc_norm", "distill_demo_hellaswag", "acc_norm", lambda v: v),
    ("storycloze", "acc", "distill_demo_storycloze", "acc", lambda v: v),
    ("storycloze", "acc_norm", "distill_demo_storycloze", "acc_norm", lambda v: v),
]


def test_lm_eval_agrees_with_distill_eval(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    model, limit = ROOT / "data" / "models" / "teacher", "25"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    subprocess.run([str(lm_eval), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                    "--include_path", "data/lm_eval", "--tasks", "distill_demo", "--limit", limit,
                    "--batch_size", "8", "--device", "cpu", "--output_path", str(tmp_path / "lm")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    theirs = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())["results"]
    result = run_cli("eval", "--model", model, "--out", tmp_path / "ours.json", "--limit", limit,
                     "--tasks", "heldout,lambada,hellaswag,storycloze")
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "ours.json").read_text())["tasks"]
    for task, metric, their_task, their_metric, transform in PAIRS:
        assert transform(ours[task][metric]) == pytest.approx(theirs[their_task][f"{their_metric},none"], rel=1e-4), \
            (task, metric)


# ---- open-domain QA: lm-eval's nq_open, triviaqa and webqs (data/lm_eval/distill_*.yaml) on the fixture files

QA = ROOT / "tests" / "fixtures" / "eval" / "qa"
QA_TASKS = {  # distill task: (lm-eval task, distill flags for the files its YAML reads)
    "nq": ("distill_nq_open", ("--nq", QA / "nq_open_validation.jsonl", "--nq-shots", QA / "nq_open_train.jsonl")),
    "triviaqa": ("distill_triviaqa", ("--triviaqa", QA / "triviaqa_validation.jsonl",
                                      "--triviaqa-shots", QA / "triviaqa_train.jsonl")),
    "webq": ("distill_webqs", ("--webq", QA / "webqs_test.jsonl", "--webq-shots", QA / "webqs_train.jsonl")),
}
QA_LIMIT = 20


def lm_eval_samples(out: Path, task: str) -> list[dict]:
    path = next(out.rglob(f"samples_{task}_*.jsonl"))
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.mark.parametrize("shots", [0, 1, 5])
def test_lm_eval_qa_agrees_with_distill_eval(tmp_path, shots):
    """Same prompts (description, shots drawn with seed 1234, delimiters), same predictions (stops,
    whitespace filter), same exact match per item and overall; webqs is zero-shot only (lm-eval 0.4.13
    cannot build its few-shot prompts)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    model = ROOT / "data" / "models" / "teacher"
    ours_tasks = [t for t in QA_TASKS if t != "webq" or shots == 0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    done = subprocess.run([str(lm_eval), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                           "--include_path", "data/lm_eval", "--tasks", ",".join(QA_TASKS[t][0] for t in ours_tasks),
                           "--num_fewshot", str(shots), "--limit", str(QA_LIMIT), "--batch_size", "4",
                           "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "lm")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())["results"]
    files = [f for t in ours_tasks for f in QA_TASKS[t][1]]
    result = run_cli("eval", "--model", model, "--out", tmp_path / "ours.json", "--tasks", ",".join(ours_tasks),
                     "--shots", shots, "--limit", QA_LIMIT, "--batch-size", "4", "--log-samples", *files)
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "ours.json").read_text())["tasks"]
    samples = [json.loads(line) for line in (tmp_path / "ours.samples.jsonl").read_text().splitlines()]
    for task in ours_tasks:
        their_task = QA_TASKS[task][0]
        mine = [s for s in samples if s["task"] == task and s["shots"] == shots]
        their = lm_eval_samples(tmp_path / "lm", their_task)
        assert len(mine) == len(their) == QA_LIMIT
        for m, t in zip(mine, their):
            requests = list(t["arguments"].values())
            assert [r["arg_0"] for r in requests] == [m["prompt"]] * len(requests), (task, t["doc_id"])
            if task == "webq":  # one log-likelihood request per answer: " " + answer after the prompt
                assert [r["arg_1"] for r in requests] == [" " + a for a in m["answers"]], (task, t["doc_id"])
                assert [g == "True" for (_, g) in t["filtered_resps"]] == m["greedy"], (task, t["doc_id"])
            else:
                assert t["filtered_resps"] == [m["prediction"]], (task, t["doc_id"])
            assert bool(t["exact_match"]) == m["em"], (task, t["doc_id"])
        if task != "triviaqa":  # the fixtures hold questions the teacher gets right: hits are compared too
            assert any(m["em"] for m in mine), task
        metric = next(v for k, v in theirs[their_task].items() if k.startswith("exact_match,"))
        assert ours[task][f"em_{shots}shot"] == pytest.approx(metric, abs=1e-12), task
        assert ours[task]["format"] == "lm-eval"

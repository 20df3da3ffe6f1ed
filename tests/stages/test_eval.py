"""`distill eval` against plain forward passes, QA generation and scoring, teacher agreement,
malformed input, and `distill report`."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.evaluate import tasks
from stages.eval import EvalConfig, eval_qa
from tests.conftest import ROOT, TOKENIZER, make_teacher, one_line_error, run_cli

FIXTURES = ROOT / "tests" / "fixtures" / "eval"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_teacher(tmp_path_factory.mktemp("eval") / "model", scale=8.0)
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(str(path))
    return path


def run_eval(model_dir, out, *args):
    result = run_cli("eval", "--model", model_dir, "--out", out, "--log-samples", *map(str, args))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    return report, samples


class Reference:
    """Unbatched float64 forward passes of the plain transformers model."""

    def __init__(self, model_dir):
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))

    def encode(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, context, continuation):
        ctx = self.encode(context)
        cont = self.encode(context + continuation)[len(ctx):]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1], -1)
        picked = logprobs[len(ctx) - 1:].gather(-1, torch.tensor(cont)[:, None])[:, 0]
        greedy = bool((logprobs[len(ctx) - 1:].argmax(-1) == torch.tensor(cont)).all())
        return float(picked.sum()), greedy, len(cont)


def test_completion_tasks_match_plain_forward_passes(model_dir, tmp_path):
    report, samples = run_eval(model_dir, tmp_path / "m.json", "--tasks", "lambada,hellaswag,storycloze",
                               "--lambada", FIXTURES / "lambada.jsonl", "--hellaswag", FIXTURES / "hellaswag.jsonl",
                               "--storycloze", FIXTURES / "storycloze.jsonl", "--batch-size", "3")
    ref = Reference(model_dir)
    lambada = [s for s in samples if s["task"] == "lambada"]
    items = tasks.lambada(FIXTURES / "lambada.jsonl")
    for item, sample in zip(items, lambada, strict=True):
        ll, greedy, n = ref.loglikelihood(item.context, item.target)
        assert sample["loglikelihood"] == pytest.approx(ll, abs=1e-4) and sample["greedy"] == greedy
        assert sample["target_tokens"] == n
    assert lambada[2]["target_tokens"] >= 3  # " Serendipitous" is several tokens: all must be greedy
    lls = [s["loglikelihood"] for s in lambada]
    assert report["tasks"]["lambada"]["ppl"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-9)
    assert report["tasks"]["lambada"]["acc"] == np.mean([s["greedy"] for s in lambada])
    for task in ("hellaswag", "storycloze"):
        items = getattr(tasks, task)(FIXTURES / f"{task}.jsonl")
        acc, acc_norm = [], []
        for item, sample in zip(items, [s for s in samples if s["task"] == task], strict=True):
            lls = [ref.loglikelihood(item.context, " " + e)[0] for e in item.endings]
            assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
            acc.append(int(np.argmax(lls)) == item.label)
            acc_norm.append(int(np.argmax(np.array(lls) / [len(e) for e in item.endings])) == item.label)
        assert report["tasks"][task]["acc"] == np.mean(acc)
        assert report["tasks"][task]["acc_norm"] == np.mean(acc_norm)


def test_heldout_perplexity_and_bits_per_byte(model_dir, tmp_path):
    docs = ["The cat sat on the mat. It was warm.", "Héllo wörld, a second document with more words in it."]
    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    report, _ = run_eval(model_dir, tmp_path / "h.json", "--tasks", "heldout", "--heldout", text)
    ref = Reference(model_dir)
    nats = tokens = 0
    for d in docs:
        ids = [0] + ref.encode(d)  # every token predicted, the first one from the EOS boundary
        with torch.no_grad():
            logprobs = torch.log_softmax(ref.model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        nats -= float(logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        tokens += len(ids) - 1
    got = report["tasks"]["heldout"]
    assert got["tokens"] == tokens and got["bytes"] == sum(len(d.encode()) for d in docs)
    assert got["loss"] == pytest.approx(nats / tokens, abs=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nats / got["bytes"] / math.log(2), abs=1e-5)
    # a window shorter than the documents scores the same tokens, each with less context
    short, _ = run_eval(model_dir, tmp_path / "w.json", "--tasks", "heldout", "--heldout", text, "--max-length", "4")
    assert short["tasks"]["heldout"]["tokens"] == tokens
    assert short["tasks"]["heldout"]["loss"] != pytest.approx(got["loss"], abs=1e-6)


@pytest.mark.parametrize("qa_format", ["lm-eval", "gpt3"])
def test_qa_batched_generation_equals_one_at_a_time(model_dir, tmp_path, qa_format):
    args = ("--tasks", "nq,triviaqa", "--nq", FIXTURES / "nq_open.jsonl", "--nq-shots", FIXTURES / "nq_open_train.jsonl",
            "--triviaqa", FIXTURES / "triviaqa.jsonl", "--triviaqa-shots", FIXTURES / "triviaqa.jsonl",
            "--shots", "0,1", "--max-new-tokens", "6", "--qa-format", qa_format)
    one, one_samples = run_eval(model_dir, tmp_path / "a.json", *args, "--batch-size", "1")
    many, many_samples = run_eval(model_dir, tmp_path / "b.json", *args, "--batch-size", "3")
    assert [s["prediction"] for s in one_samples] == [s["prediction"] for s in many_samples]
    assert one["tasks"] == many["tasks"]
    assert many["tasks"]["nq"]["format"] == qa_format
    for s in many_samples:
        definition = tasks.qa_definition(qa_format, s["task"])
        assert s["prediction"] == definition.answer(s["generated"])
        assert not any(stop in s["prediction"] for stop in definition.stops)
        assert s["em"] == definition.exact_match(s["prediction"], s["answers"])
        question = "Q: " if qa_format == "gpt3" or s["task"] == "nq" else "Question: "
        assert s["prompt"].endswith("\nA:" if question == "Q: " else "\nAnswer:")
        assert s["prompt"].count(question) == 1 + s["shots"]
    shot = next(s for s in many_samples if s["task"] == "nq" and s["shots"] == 1)
    train = tasks.qa(FIXTURES / "nq_open_train.jsonl")
    if qa_format == "gpt3":
        assert any(shot["prompt"].startswith(f"Q: {q.question}\nA: {q.answers[0]}\n\nQ: ") for q in train)
    else:
        assert any(shot["prompt"].startswith(f"Answer these questions:\n\nQ: {q.question}?\nA: {q.answers[0]}\nQ: ")
                   for q in train)


class Canned:
    """Answers fixed in advance stand in for the model (each generation as the model would give it,
    before the stop sequences cut it)."""

    def __init__(self, generations=(), greedy=()):
        self.generations, self.greedy, self.pairs = list(generations), list(greedy), []

    def generate(self, prompts, max_new_tokens, desc, stops):
        return self.generations[:len(prompts)]

    def loglikelihood(self, pairs, desc):
        self.pairs += pairs
        return [(-1.0, g, 1) for g in self.greedy[:len(pairs)]]


@pytest.mark.parametrize("qa_format, generations, hits", [
    # lm-eval cuts at ",", ignores "The "; gpt3 cuts at newlines only; lm-eval counts spaces
    ("lm-eval", ["December 1972", " Bob Russell, lyricist", "The 13."], [True, True, True]),
    ("gpt3", ["December 1972", " Bob Russell, lyricist", "The 13."], [True, False, True]),
    ("lm-eval", ["december 1972 UTC", "Bob  Russell", "thirteen"], [False, False, False]),
])
def test_exact_match_scoring_by_hand(qa_format, generations, hits):
    config = EvalConfig(model="m", out="o", tasks=("nq",), nq=str(FIXTURES / "nq_open.jsonl"), qa_format=qa_format)
    samples = []
    result = eval_qa(Canned(generations), config, "nq", samples)
    definition = tasks.qa_definition(qa_format, "nq")
    assert result == {"n": 3, "em_0shot": pytest.approx(np.mean(hits)), "format": qa_format,
                      "definition": definition.name}
    assert [s["em"] for s in samples] == hits


def test_webq_is_scored_by_the_loglikelihood_of_its_answers():
    """lm-eval's webqs: one request per answer (sorted, prefix-pruned), `" " + answer` after
    ``Question: …\nAnswer:``; a hit when any answer is the greedy continuation."""
    config = EvalConfig(model="m", out="o", tasks=("webq",), webq=str(FIXTURES / "webq.jsonl"))
    scorer, samples = Canned(greedy=[False, True, False]), []
    result = eval_qa(scorer, config, "webq", samples, rules=lambda stops, budget: pytest.fail("rules compiled"))
    bieber, portman = ("Question: what is the name of justin bieber brother?\nAnswer:",
                       "Question: what character did natalie portman play in star wars?\nAnswer:")
    assert scorer.pairs == [(bieber, " Jaxon Bieber"), (bieber, " Jazmyn Bieber"), (portman, " Padmé Amidala")]
    assert [s["em"] for s in samples] == [True, False] and result["em_0shot"] == 0.5
    assert result["rules"].startswith("not applied: webq is scored by the log-likelihood of its answers")


def test_custom_task_sends_the_prompt_as_written_and_matches_its_answers(tmp_path):
    """--tasks custom: prompt/response records; the prompt verbatim, the answer cut at a newline and
    matched after SQuAD normalisation against ``answers`` (or the response when a record has none)."""
    records = [{"prompt": "Complete: the cat sat on the ___\nWord:", "response": " mat\n", "answers": ["mat", "rug"]},
               {"prompt": "Complete: a stitch in time saves ___\nWord:", "response": " nine\n"},
               {"prompt": "Complete: all that glitters is not ___\nWord:", "response": " gold\n"}]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = EvalConfig(model="m", out="o", tasks=("custom",), custom=str(path), qa_format="gpt3")
    samples = []
    result = eval_qa(Canned([" Rug.\nWord: x", " nine times", "The gold"]), config, "custom", samples)
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in records]
    assert [s["prediction"] for s in samples] == ["Rug.", "nine times", "The gold"]
    assert [s["answers"] for s in samples] == [["mat", "rug"], ["nine"], ["gold"]]
    assert [s["em"] for s in samples] == [True, False, True]
    assert result == {"n": 3, "em_0shot": pytest.approx(2 / 3), "format": "custom", "definition": "prompt as written",
                      "file": str(path)}


def test_custom_task_under_rules(model_dir, tmp_path):
    """The demo-fd task set and rule file: every answer decoded under the rules keeps them, and the
    free answers' violations are counted by the same checker."""
    from pipeline.decode.rules import load_rules, violations

    report, samples = run_eval(model_dir, tmp_path / "c.json", "--tasks", "custom", "--custom",
                               ROOT / "data" / "tasks" / "source-test.jsonl", "--rules", ROOT / "data" / "rules" / "source.yaml",
                               "--limit", "12", "--max-new-tokens", "8")
    got = report["tasks"]["custom"]
    assert got["n"] == 12 and got["format"] == "custom"
    assert got["rules_violating_0shot"] == 0 and got["rules_unsatisfiable_0shot"] == 0
    spec = load_rules(ROOT / "data" / "rules" / "source.yaml")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    free = [bool(violations(spec, s["prediction"], len(tok(s["prediction"], add_special_tokens=False)["input_ids"])))
            for s in samples]
    assert got["violating_0shot"] == pytest.approx(np.mean(free))
    assert got["violating_0shot"] > 0  # the untrained model's free answers break the label rule


@pytest.fixture(scope="module")
def topk_store(model_dir, tmp_path_factory):
    """The test model's own top-8 store over a few short documents."""
    tmp_path = tmp_path_factory.mktemp("agreement")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                              ["A short document about the sea and the ships on it.", "Another one, about hills."] * 3))
    assert run_cli("prepare", "--input", corpus, "--out", tmp_path / "tokens", "--tokenizer", TOKENIZER,
                   "--seq-len", "16").exit_code == 0
    result = run_cli("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", model_dir, "--out", tmp_path / "topk",
                     "--kind", "topk", "--top-k", "8", "--logprob-dtype", "float32")
    assert result.exit_code == 0, result.output
    return tmp_path / "topk"


def test_teacher_agreement_with_its_own_store(model_dir, topk_store, tmp_path):
    same, _ = run_eval(model_dir, tmp_path / "same.json", "--tasks", "agreement", "--agreement", topk_store)
    assert same["tasks"]["agreement"]["top1"] == 1.0
    assert abs(same["tasks"]["agreement"]["kl"]) < 1e-5
    other = make_teacher(tmp_path / "other", scale=3.0)  # same seed, flatter head: other distributions
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(str(other))
    different, _ = run_eval(other, tmp_path / "other.json", "--tasks", "agreement", "--agreement", topk_store,
                            "--agreement-temperature", "2")
    assert different["tasks"]["agreement"]["kl"] > 1e-3


def test_agreement_with_a_store_of_another_tokenizer_of_the_same_size_is_named_across_tokenizers(
        model_dir, topk_store, tmp_path):
    """Two ids of the model's tokenizer swapped: still 8192 ids, but each id means another token, so
    comparing id by id would be meaningless. The store is compared across tokenizers instead, over the
    1:1 chunks, and the numbers are named so (``top1_1to1``), never as same-tokenizer agreement."""
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    definition = json.loads((other / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    first, second = "the", "and"
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(definition))
    assert len(AutoTokenizer.from_pretrained(str(other))) == len(AutoTokenizer.from_pretrained(str(model_dir)))
    out = tmp_path / "m.json"
    result = run_cli("eval", "--model", other, "--out", out, "--tasks", "agreement", "--agreement", topk_store,
                     "--limit", "4")
    assert result.exit_code == 0, result.output
    agreement = json.loads(out.read_text())["tasks"]["agreement"]
    assert "top1" not in agreement and 0 <= agreement["top1_1to1"] <= 1 and agreement["share_1to1"] > 0.5


@pytest.mark.parametrize("content, message", [
    ('{"text": "a b c"}\nnot json\n', "lambada.jsonl:2: not valid JSON"),
    ('{"words": "a b c"}\n', "lambada.jsonl:1: missing field 'text'"),
    ("", "lambada.jsonl: empty task file"),
])
def test_malformed_task_file_is_one_line_error(model_dir, tmp_path, content, message):
    path = tmp_path / "lambada.jsonl"
    path.write_text(content)
    msg = one_line_error(run_cli("eval", "--model", model_dir, "--out", tmp_path / "m.json", "--tasks", "lambada",
                                 "--lambada", path))
    assert message in msg
    assert not (tmp_path / "m.json").exists()


def test_bad_options_are_one_line_errors(model_dir, tmp_path):
    out = tmp_path / "m.json"
    assert "unknown task(s) squad" in one_line_error(run_cli("eval", "--model", model_dir, "--out", out, "--tasks", "squad"))
    assert "needs --nq FILE" in one_line_error(run_cli("eval", "--model", model_dir, "--out", out, "--tasks", "nq"))
    msg = one_line_error(run_cli("eval", "--model", model_dir, "--out", out, "--tasks", "nq", "--nq",
                                 FIXTURES / "nq_open.jsonl", "--shots", "1"))
    assert "needs --nq-shots FILE" in msg
    msg = one_line_error(run_cli("eval", "--model", model_dir, "--out", out, "--tasks", "nq", "--nq",
                                 FIXTURES / "nq_open.jsonl", "--qa-format", "gpt-3"))
    assert "qa_format must be one of lm-eval, gpt3, got 'gpt-3'" in msg
    msg = one_line_error(run_cli("eval", "--model", model_dir, "--out", out, "--tasks", "webq", "--webq",
                                 FIXTURES / "webq.jsonl", "--webq-shots", FIXTURES / "webq.jsonl", "--shots", "0,1"))
    assert "webq with --qa-format lm-eval is zero-shot only" in msg and "--qa-format gpt3" in msg
    assert "needs --custom FILE" in one_line_error(run_cli("eval", "--model", model_dir, "--out", out, "--tasks", "custom"))
    msg = one_line_error(run_cli("eval", "--model", model_dir, "--out", out, "--tasks", "custom", "--custom",
                                 ROOT / "data" / "tasks" / "source-test.jsonl", "--shots", "0,1"))
    assert "custom is zero-shot only (its prompts are sent as written" in msg
    assert "not a local Hugging Face directory" in one_line_error(
        run_cli("eval", "--model", tmp_path / "nothing", "--out", out))
    msg = one_line_error(run_cli("eval", "--model", model_dir, "--out", out, "--tasks", "hellaswag", "--hellaswag",
                                 tmp_path / "missing.jsonl"))
    assert "no such task file" in msg


def fake_run(name, params, training, tasks_):
    return {"name": name, "model": f"/m/{name}", "parameters": params, "training": training, "tasks": tasks_}


def test_report_says_which_store_and_tail_treatment_a_run_used(tmp_path):
    """metrics.json's store_kind and tail, as stage two records them: a sampled store's draws have no
    tail treatment, a hybrid store is named, an online teacher has no tail; a metrics.json written
    before store_kind still reads as it did."""
    store = {"alpha": 0.5, "teacher_source": "store", "temperature": 1.0}
    runs = [
        fake_run("sampled", 1_840_256, store | {"tail": None, "teacher_signal": "StoredSampled",
                                               "store_kind": "sampled"}, {"heldout": {"ppl": 141.0}}),
        fake_run("hybrid", 1_840_256, store | {"tail": "tail", "teacher_signal": "StoredSampled",
                                              "store_kind": "hybrid"}, {"heldout": {"ppl": 142.0}}),
        fake_run("hybrid-renorm", 1_840_256, store | {"temperature": 2.0, "tail": "renorm",
                                                     "teacher_signal": "StoredTopK", "store_kind": "hybrid"},
                 {"heldout": {"ppl": 143.0}}),
        fake_run("topk", 1_840_256, store | {"tail": "residual-label", "teacher_signal": "StoredTopK",
                                            "store_kind": "topk"}, {"heldout": {"ppl": 144.0}}),
        fake_run("online", 1_840_256, store | {"teacher_source": "online", "tail": None,
                                              "teacher_signal": "OnlineTeacher", "store_kind": None},
                 {"heldout": {"ppl": 145.0}}),
        fake_run("older-sampled", 1_840_256, store | {"tail": "tail", "teacher_signal": "StoredSampled"},
                 {"heldout": {"ppl": 146.0}}),
        fake_run("older-topk", 1_840_256, store | {"tail": "renorm"}, {"heldout": {"ppl": 147.0}}),
    ]
    paths = []
    for r in runs:
        paths.append(tmp_path / f"{r['name']}.json")
        paths[-1].write_text(json.dumps(r))
    result = run_cli("report", *paths, "--out", tmp_path / "report", "--teacher", "none")
    assert result.exit_code == 0, result.output
    rows = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if line.startswith("| ")]
    labels = {row.split(" | ")[0][2:]: row.split(" | ")[2:4] for row in rows[1:len(runs) + 1]}
    assert labels == {"sampled": ["distilled (α=0.5, sampled store)", "1"],
                      "hybrid": ["distilled (α=0.5, tail, hybrid store)", "1"],
                      "hybrid-renorm": ["distilled (α=0.5, renorm, hybrid store)", "2"],
                      "topk": ["distilled (α=0.5, residual-label, top-k store)", "1"],
                      "online": ["distilled (α=0.5, online)", "1"],
                      "older-sampled": ["distilled (α=0.5, sampled store)", "1"],
                      "older-topk": ["distilled (α=0.5, renorm, top-k store)", "1"]}


def test_report_table_and_figures(tmp_path):
    runs = [
        fake_run("teacher", 6_843_648, {"alpha": 1.0, "teacher_source": "none"},
                 {"heldout": {"ppl": 110.34, "bits_per_byte": 1.51}, "lambada": {"acc": 0.2345, "ppl": 351.2},
                  "hellaswag": {"acc": 0.5, "acc_norm": 0.55}, "nq": {"em_0shot": 0.0, "em_1shot": 0.125}}),
        fake_run("student-t2", 1_840_256, {"alpha": 0.5, "teacher_source": "store", "temperature": 2.0, "tail": "tail"},
                 {"heldout": {"ppl": 150.0, "bits_per_byte": 1.6}, "lambada": {"acc": 0.1, "ppl": 900.0},
                  "agreement": {"top1": 0.41, "kl": 0.9}}),
        fake_run("student-drawn", 1_840_256, {"alpha": 0.5, "teacher_source": "store", "temperature": 1.0,
                                              "tail": "tail", "teacher_signal": "StoredSampled"},
                 {"heldout": {"ppl": 140.0, "bits_per_byte": 1.58}}),
    ]
    paths = []
    for r in runs:
        paths.append(tmp_path / f"{r['name']}.json")
        paths[-1].write_text(json.dumps(r))
    result = run_cli("report", *paths, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[4:7] == ["held-out ppl ↓", "bits/byte ↓", "LAMBADA acc ↑"]
    assert rows[1].startswith("| teacher | 6.84M | cross-entropy | – | 110.34 | 1.510 | 23.4 | 351.20 |")
    assert "| student-t2 | 1.84M | distilled (α=0.5, tail, top-k store) | 2 | 150.00 |" in rows[2]
    assert "| student-drawn | 1.84M | distilled (α=0.5, sampled store) | 1 | 140.00 |" in rows[3]
    assert rows[1].endswith("| 0.0 | 12.5 |") and rows[2].endswith("| – | – |")  # NQ 0-shot, 1-shot
    for figure in ("completion.png", "perplexity.png", "qa.png", "agreement.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure})" in md
    combined = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["name"] for r in combined["runs"]] == ["teacher", "student-t2", "student-drawn"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert "not a `distill eval` result" in one_line_error(run_cli("report", bad, "--out", tmp_path / "r2"))


def test_rules_end_answers_at_every_stop_sequence():
    """``--rules`` with lm-eval's stops: a token holding "\\n", "." or "," ends the answer where the
    first of them begins, as the free answers are cut."""
    from pipeline.decode.rules import RuleSpec, Rules

    spec, tokenizer = RuleSpec(max_words=3, source="test"), AutoTokenizer.from_pretrained(str(TOKENIZER))
    rules = Rules(spec, tokenizer, 8, stop=("\n", ".", ","))
    holding = {i for i, piece in enumerate(rules.pieces) if any(s in piece for s in (b"\n", b".", b","))}
    assert holding and set(rules.stops) == holding
    for i in holding:
        piece = rules.pieces[i]
        assert rules.stops[i] == piece[:min(piece.index(s) for s in (b"\n", b".", b",") if s in piece)]
    newline_only = Rules(spec, tokenizer, 8, stop="\n")
    assert set(newline_only.stops) == {i for i, piece in enumerate(rules.pieces) if b"\n" in piece}


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny Gemma 2 (soft-capping, a sliding window of 4) with a Gemma-style tokenizer: BOS before every text."""
    from tests.conftest import bos_tokenizer, make_model

    root = tmp_path_factory.mktemp("gemma")
    tokenizer = AutoTokenizer.from_pretrained(str(bos_tokenizer(root / "tok", "gemma")))
    path = make_model(root / "model", "gemma2", len(tokenizer))
    tokenizer.save_pretrained(str(path))
    return path


def test_heldout_documents_start_from_bos_where_the_tokenizer_adds_one(gemma_dir, tmp_path):
    docs = ["The cat sat on the mat. It was warm.", "A second document with more words in it, and a few more."]
    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    report, _ = run_eval(gemma_dir, tmp_path / "h.json", "--tasks", "heldout", "--heldout", text)
    ref = Reference(gemma_dir)
    nats = tokens = 0
    for d in docs:
        ids = [ref.tok.bos_token_id] + ref.encode(d)  # the first token predicted from BOS, as the model was trained
        with torch.no_grad():
            logprobs = torch.log_softmax(ref.model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        nats -= float(logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        tokens += len(ids) - 1
    assert report["tasks"]["heldout"]["tokens"] == tokens
    assert report["tasks"]["heldout"]["loss"] == pytest.approx(nats / tokens, abs=1e-5)


def test_agreement_reads_a_document_attention_store_as_stage_one_wrote_it(gemma_dir, tmp_path, heldout_docs):
    """The model scored against its own store of packed documents (--attention document): it agrees
    everywhere, which it does only if eval attends within documents as stage one did; positions whose
    target is a BOS are not scored."""
    from pipeline.store.contract import open_store
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "c.jsonl", [" ".join(d.split()[:n]) for d, n in zip(heldout_docs, [6, 20, 9] * 4)])
    assert run_cli("prepare", "--input", corpus, "--out", tmp_path / "tokens", "--tokenizer", gemma_dir,
                   "--seq-len", "48", "--attention", "document").exit_code == 0
    result = run_cli("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", gemma_dir, "--out",
                     tmp_path / "topk", "--kind", "topk", "--top-k", "16", "--logprob-dtype", "float32")
    assert result.exit_code == 0, result.output
    report, _ = run_eval(gemma_dir, tmp_path / "a.json", "--tasks", "agreement", "--agreement", tmp_path / "topk")
    store = open_store(tmp_path / "topk")
    ids = store.read_rows(0, store.rows)["input_ids"]
    got = report["tasks"]["agreement"]
    assert got["tokens"] == store.rows * 47 - int((ids[:, 1:] == store.params["bos_token_id"]).sum())
    assert got["top1"] == 1.0 and abs(got["kl"]) < 1e-5

"""distill generate: records reproducible by seed and independent of batch, job count and kills;
output that prepare reads; one-line errors for bad input."""

import json
import multiprocessing
import random
import signal
import time

import numpy as np
import pytest
import torch

from pipeline.text.examples import sampler_of
from tests.conftest import TOKENIZER, make_teacher, one_line_error, run_cli

PROMPTS = ["The Lord said unto Moses", "A hacker is", "In the beginning", "Once upon a time there was",
           "Verse 3.", "It is a truth", "He said", "The quick brown fox"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding a tiny model is a string of small matrix products: on a shared 2-core machine a
    second thread only waits at barriers (30x slower when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "other": 1}) + "\n" for p in PROMPTS))
    return path


def generate(teacher, out, *args):
    result = run_cli("generate", "--teacher", teacher, "--tokenizer", TOKENIZER, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return result


def records(out):
    return [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]


def strip_logprobs(record):
    return {k: v for k, v in record.items() if k != "completion_logprobs"}


def eos_prone_teacher(path):
    """The test teacher with its EOS row (id 0) scaled up, so that many completions end at EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(make_teacher(path)))
    with torch.no_grad():
        model.lm_head.weight[0] *= 3
    model.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("flags", [("--temperature", "0.8", "--top-k", "50"), ("--temperature", "1.3"),
                                   ("--temperature", "0")])
def test_records_carry_ids_and_the_log_prob_each_token_was_drawn_with(tmp_path, prompts, flags):
    """prompt_ids + completion_ids are what the model saw and drew (EOS included where the record
    ended at it) and decode to the record's text; completion_logprobs equal a fresh full forward's
    log-softmax of logits/T (top-k filtered) at the drawn ids: the distribution actually sampled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = eos_prone_teacher(tmp_path / "teacher")
    samples = "1" if flags[1] == "0" else "2"
    generate(teacher, tmp_path / "out", "--prompts", prompts, "--max-new-tokens", "16", "--samples-per-prompt",
             samples, "--batch-size", "3", *flags)
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    temperature, top_k = float(flags[1]), int(flags[3]) if len(flags) > 2 else 0
    got = records(tmp_path / "out")
    # the sampler each record was drawn with, as prepare --format ids carries it into the store
    assert {json.dumps(sampler_of(r["settings"])) for r in got} == {json.dumps(
        {"temperature": temperature, "top_k": top_k, "top_p": 1.0, "greedy": temperature == 0, "rules_sha256": None})}
    assert all(r["settings"]["greedy"] == (temperature == 0) for r in got)
    finishes = [r["finish_reason"] for r in got]
    assert finishes.count("eos") >= 2 and (finishes.count("length") >= 1 or temperature == 0), finishes
    for r in got:
        prompt_ids, completion_ids = r["prompt_ids"], r["completion_ids"]
        assert prompt_ids[0] == tokenizer.eos_token_id  # BOS: this tokenizer's is its EOS
        assert prompt_ids[1:] == tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        ends_at_eos = r["finish_reason"] == "eos"
        assert len(completion_ids) == r["completion_tokens"] + ends_at_eos == len(r["completion_logprobs"])
        assert (completion_ids[-1] == tokenizer.eos_token_id) == ends_at_eos
        assert tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True,
                                clean_up_tokenization_spaces=False) == r["text"]
        if temperature == 0:
            assert r["completion_logprobs"] == [0.0] * len(completion_ids)
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + completion_ids])).logits[0].double()
        scaled = logits[len(prompt_ids) - 1:-1] / temperature  # [completion, V]: the logits each id was drawn from
        if top_k:
            kth = scaled.topk(top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        expected = torch.log_softmax(scaled, dim=-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]
        np.testing.assert_allclose(r["completion_logprobs"], expected.numpy(), rtol=0, atol=1e-4)
        assert all(lp <= 0 for lp in r["completion_logprobs"])


def test_model_is_the_writer_under_its_other_name(teacher, prompts, tmp_path):
    common = ("--tokenizer", TOKENIZER, "--prompts", prompts, "--max-new-tokens", "6")
    assert run_cli("generate", "--teacher", teacher, "--out", tmp_path / "t", *common).exit_code == 0
    assert run_cli("generate", "--model", teacher, "--out", tmp_path / "m", *common).exit_code == 0
    assert (tmp_path / "t" / "generated.jsonl").read_bytes() == (tmp_path / "m" / "generated.jsonl").read_bytes()
    line = one_line_error(run_cli("generate", "--model", teacher, "--teacher", tmp_path, "--out", tmp_path / "x",
                                  *common))
    assert "give one of them" in line


def test_records_follow_the_seed_and_are_complete(teacher, prompts, tmp_path):
    common = ("--prompts", prompts, "--samples-per-prompt", "3", "--max-new-tokens", "12", "--records-per-part", "5")
    generate(teacher, tmp_path / "a", *common, "--seed", "7")
    generate(teacher, tmp_path / "b", *common, "--seed", "7")
    generate(teacher, tmp_path / "c", *common, "--seed", "8")
    a, b, c = records(tmp_path / "a"), records(tmp_path / "b"), records(tmp_path / "c")
    assert (tmp_path / "a" / "generated.jsonl").read_bytes() == (tmp_path / "b" / "generated.jsonl").read_bytes()
    assert [r["id"] for r in a] == list(range(len(PROMPTS) * 3))
    assert [(r["prompt_index"], r["sample_index"]) for r in a] == [(p, s) for p in range(len(PROMPTS)) for s in range(3)]
    assert all(r["prompt"] == PROMPTS[r["prompt_index"]] and r["text"] == r["prompt"] + r["completion"] for r in a)
    assert all(1 <= r["completion_tokens"] <= 12 and r["finish_reason"] in ("eos", "length") for r in a)
    assert a[0]["settings"] == {"seed": 7, "temperature": 1.0, "greedy": False, "top_k": 0, "top_p": 1.0,
                                "max_new_tokens": 12,
                                "samples_per_prompt": 3, "rules": None, "rules_sha256": None, "max_attempts": None}
    # samples of one prompt differ from each other, and another seed gives other completions
    assert len({r["completion"] for r in a[:3]}) == 3
    assert sum(x["completion"] != y["completion"] for x, y in zip(a, c)) >= len(a) - 2
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["records"] == len(a) and summary["completion_tokens"] == sum(r["completion_tokens"] for r in a)
    config = json.loads((tmp_path / "a" / "config.job-00000-of-00001.json").read_text())
    assert config["config"]["seed"] == 7 and config["records_planned"] == len(a)


def test_batch_size_and_array_jobs_do_not_change_a_record(teacher, prompts, tmp_path):
    common = ("--prompts", prompts, "--samples-per-prompt", "2", "--max-new-tokens", "16", "--records-per-part", "3",
              "--top-k", "50", "--top-p", "0.9", "--temperature", "0.8")
    generate(teacher, tmp_path / "one", *common, "--batch-size", "1")
    generate(teacher, tmp_path / "four", *common, "--batch-size", "4")
    first = generate(teacher, tmp_path / "jobs", *common, "--batch-size", "3", "--num-shards", "2", "--shard-index", "0")
    assert "not merged yet" in first.output and not (tmp_path / "jobs" / "generated.jsonl").exists()
    generate(teacher, tmp_path / "jobs", *common, "--batch-size", "3", "--num-shards", "2", "--shard-index", "1")
    # every field the same, the sampled tokens' log-probs to the logits' float rounding (a batch's shape
    # blocks the matrix products' sums differently)
    one = records(tmp_path / "one")
    for other in (records(tmp_path / "four"), records(tmp_path / "jobs")):
        assert [strip_logprobs(r) for r in other] == [strip_logprobs(r) for r in one]
        for a, b in zip(one, other):
            assert np.allclose(a["completion_logprobs"], b["completion_logprobs"], rtol=0, atol=1e-5)
    parts = sorted(p.name for p in (tmp_path / "jobs" / "parts").glob("job-*"))
    assert parts == [f"job-0000{j}-of-00002.part-0000{k}" for j in range(2) for k in range(3)]


def test_an_array_of_more_jobs_than_records_merges(teacher, tmp_path):
    """Jobs 2 and 3 of 4 own no record of two prompts: they write no progress index, and the merge (by
    job 1, the last with records, and again by the empty ones) needs none from them."""
    path = tmp_path / "prompts.txt"
    path.write_text("In the beginning\nA hacker is\n")
    common = ("--prompts", path, "--max-new-tokens", "4")
    generate(teacher, tmp_path / "one", *common)
    for job in range(4):
        generate(teacher, tmp_path / "jobs", *common, "--num-shards", "4", "--shard-index", str(job))
    assert [strip_logprobs(r) for r in records(tmp_path / "jobs")] == [strip_logprobs(r) for r in records(tmp_path / "one")]


def test_greedy_equals_transformers_generate(teacher, tmp_path):
    """Temperature 0 is argmax decoding on the KV cache: the same tokens as model.generate, for
    prompts of different lengths decoded in one left-padded batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n\n")
    generate(teacher, tmp_path / "out", "--prompts", prompts, "--temperature", "0", "--max-new-tokens", "10",
             "--batch-size", "4")
    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    got = records(tmp_path / "out")
    assert len(got) == 4  # the blank line is not a prompt
    for record in got:
        ids = torch.tensor([[0] + tokenizer(record["prompt"])["input_ids"]])
        expected = model.generate(ids, do_sample=False, max_new_tokens=10, eos_token_id=0, pad_token_id=0)[0, ids.shape[1]:]
        expected = [t for t in expected.tolist()]
        expected = expected[:expected.index(0)] if 0 in expected else expected
        assert tokenizer.decode(expected) == record["completion"]


def test_unconditional_text_modes_and_prepare_reads_the_output(teacher, tmp_path):
    generate(teacher, tmp_path / "gen", "--unconditional", "6", "--max-new-tokens", "40", "--text", "completion",
             "--seed", "3")
    got = records(tmp_path / "gen")
    assert [r["prompt"] for r in got] == [""] * 6 and all(r["text"] == r["completion"] for r in got)
    assert len({r["completion"] for r in got}) == 6
    result = run_cli("prepare", "--input", tmp_path / "gen" / "generated.jsonl", "--tokenizer", TOKENIZER,
                     "--seq-len", "16", "--out", tmp_path / "tokens")
    assert result.exit_code == 0, result.output
    from pipeline.store.contract import open_store

    store = open_store(tmp_path / "tokens", kind="tokens")
    tokens = sum(r["completion_tokens"] for r in got)
    assert store.rows >= (tokens + 6) // 15 - 1 and store.rows > 0  # each record's tokens + EOS, packed in rows of 16
    # or as prompt/response pairs, trained on the completions only (#15 part 2's loss mask)
    result = run_cli("prepare", "--input", tmp_path / "gen" / "generated.jsonl", "--tokenizer", TOKENIZER,
                     "--format", "prompt-response", "--response-field", "completion", "--seq-len", "64",
                     "--out", tmp_path / "pairs")
    assert result.exit_code == 0, result.output
    mask = open_store(tmp_path / "pairs", kind="tokens").read_rows(0, 1)["loss_mask"]
    assert 0 < mask.sum() <= tokens + 6


def test_rerun_resumes_refuses_other_parameters_and_overwrites(teacher, prompts, tmp_path):
    common = ("--prompts", prompts, "--max-new-tokens", "8", "--records-per-part", "3")
    generate(teacher, tmp_path / "out", *common)
    before = (tmp_path / "out" / "generated.jsonl").read_bytes()
    assert "nothing to do" in generate(teacher, tmp_path / "out", *common, "--batch-size", "2").output
    line = one_line_error(run_cli("generate", "--teacher", teacher, "--tokenizer", TOKENIZER, "--out",
                                  tmp_path / "out", *common, "--seed", "1"))
    assert "other parameters" in line and "seed" in line and "--overwrite" in line
    assert (tmp_path / "out" / "generated.jsonl").read_bytes() == before
    generate(teacher, tmp_path / "out", *common, "--seed", "1", "--overwrite")
    assert (tmp_path / "out" / "generated.jsonl").read_bytes() != before
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["params"]["settings"]["seed"] == 1


def test_a_part_renamed_but_not_recorded_is_written_again_once(teacher, prompts, tmp_path):
    """The window between a part's rename and its progress entry, made on purpose: the rerun
    recomputes that part (to the same records), removes a killed run's temp file, and merges."""
    common = ("--prompts", prompts, "--max-new-tokens", "8", "--records-per-part", "3")
    generate(teacher, tmp_path / "out", *common)
    reference = (tmp_path / "out" / "generated.jsonl").read_bytes()
    parts = tmp_path / "out" / "parts"
    index = json.loads((parts / "index.job-00000-of-00001.json").read_text())
    index["parts"] = index["parts"][:1]  # part 1 and 2 renamed into place, not yet recorded
    (parts / "index.job-00000-of-00001.json").write_text(json.dumps(index))
    (parts / "job-00000-of-00001.part-00002").write_text("half a recor")
    (parts / ".job-00000-of-00001.part-00002.tmp-4242-abcd1234").write_text("{")
    for name in ("generated.jsonl", "summary.json"):
        (tmp_path / "out" / name).unlink()
    result = generate(teacher, tmp_path / "out", *common)
    assert "2 written now" in result.output
    assert (tmp_path / "out" / "generated.jsonl").read_bytes() == reference
    assert sorted(p.name for p in parts.iterdir() if p.name.startswith(".job")) == []
    assert len(json.loads((parts / "index.job-00000-of-00001.json").read_text())["parts"]) == 3


def _kill_and_resume(teacher, prompts, tmp_path, moments):
    """Each moment: a run of the same command killed with SIGKILL when ``moment(out)`` turns true,
    then rerun to the end; the output must equal an uninterrupted run's, byte for byte. The killed
    run is a fork of this process (a real process and a real SIGKILL, without re-importing torch)."""
    common = ["--teacher", teacher, "--tokenizer", TOKENIZER, "--prompts", prompts, "--samples-per-prompt", "3",
              "--max-new-tokens", "24", "--records-per-part", "2", "--batch-size", "2"]
    reference = tmp_path / "reference"
    assert run_cli("generate", *common, "--out", reference).exit_code == 0
    for n, moment in enumerate(moments):
        out = tmp_path / f"killed-{n}"
        process = multiprocessing.get_context("fork").Process(target=_quiet_cli, args=("generate", *common, "--out", out))
        process.start()
        ready, deadline = moment(out), time.time() + 120
        while not ready() and process.is_alive() and time.time() < deadline:
            time.sleep(0.005)
        process.kill()
        process.join()
        assert process.exitcode == -signal.SIGKILL, "the run ended before it could be killed"
        assert not (out / "generated.jsonl").exists()
        result = run_cli("generate", *common, "--out", out)
        assert result.exit_code == 0, result.output
        got = records(out)
        assert [r["id"] for r in got] == list(range(len(PROMPTS) * 3))  # nothing lost, nothing twice
        assert (out / "generated.jsonl").read_bytes() == (reference / "generated.jsonl").read_bytes()
        assert not list((out / "parts").glob(".*.tmp-*"))


def _quiet_cli(*args):
    """The run to kill, in the fork: output discarded, and tqdm given a write lock of its own. tqdm's
    default lock holds a multiprocessing semaphore that a fork shares with this process; a child
    SIGKILLed while it holds it (a progress bar refreshing as a part is written) leaves it taken for
    good, and the rerun here, in this process, waited forever on its first progress bar."""
    import os
    import sys
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    sys.stdout = sys.stderr = open(os.devnull, "w")
    run_cli(*args)


def parts_written(k, jitter=0.0):
    def moment(out):
        def ready():
            if len(list((out / "parts").glob("job-*"))) >= k:
                time.sleep(jitter)
                return True
            return False
        return ready
    moment.__name__ = f"parts-{k}"
    return moment


@pytest.mark.faults
def test_sigkill_at_any_moment_neither_duplicates_nor_drops_a_record(teacher, prompts, tmp_path):
    rng = random.Random(0)
    # just after the first part's rename (its progress entry may not be written yet), mid-way through the
    # third part, and late in the run, with a random delay after each
    _kill_and_resume(teacher, prompts, tmp_path, [parts_written(1), parts_written(3, rng.uniform(0, 0.05)),
                                                  parts_written(9, rng.uniform(0, 0.02))])


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_at_many_random_moments(teacher, prompts, tmp_path):
    rng = random.Random(1)
    _kill_and_resume(teacher, prompts, tmp_path, [parts_written(rng.randint(1, 11), rng.uniform(0, 0.1))
                                                  for _ in range(8)])


@pytest.mark.parametrize("args, expected", [
    (("--prompts", "missing.txt"), "prompts file missing.txt does not exist"),
    (("--prompts", "EMPTY"), "holds no prompts"),
    (("--prompts", "NOFIELD"), "no 'prompt' field"),
    (("--prompts", "PROMPTS", "--unconditional", "3"), "either --prompts FILE or --unconditional N"),
    ((), "either --prompts FILE or --unconditional N"),
    (("--unconditional", "2", "--temperature", "-1"), "temperature must be > 0, or 0 for greedy"),
    (("--unconditional", "2", "--temperature", "0", "--samples-per-prompt", "2"), "greedy"),
    (("--unconditional", "2", "--top-p", "0"), "top_p must be in (0, 1]"),
    (("--unconditional", "2", "--top-p", "1.5"), "top_p must be in (0, 1]"),
    (("--unconditional", "2", "--top-k", "-1"), "top_k must be 0 (off) or positive"),
    (("--unconditional", "2", "--top-k", "9000"), "larger than the vocabulary"),
    (("--unconditional", "2", "--max-new-tokens", "0"), "max_new_tokens must be at least 1"),
    (("--unconditional", "2", "--max-new-tokens", "200"), "exceeds the teacher's 128 positions"),
    (("--unconditional", "2", "--shard-index", "2", "--num-shards", "2"), "shard_index must be in [0, 2)"),
    (("--unconditional", "2", "--text", "all"), "text must be one of"),
    (("--unconditional", "2", "--rules", "missing.yaml"), "rule file missing.yaml does not exist"),
    (("--unconditional", "2", "--temprature", "1"), "did you mean --temperature"),
])
def test_bad_input_is_one_line_and_writes_nothing(teacher, tmp_path, args, expected):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "prompts.txt").write_text("a\n")
    names = {"EMPTY": tmp_path / "empty.txt", "NOFIELD": tmp_path / "nofield.jsonl", "PROMPTS": tmp_path / "prompts.txt"}
    args = [names.get(a, a) for a in args]
    line = one_line_error(run_cli("generate", "--teacher", teacher, "--tokenizer", TOKENIZER,
                                  "--out", tmp_path / "out", *args))
    assert expected in line
    assert not (tmp_path / "out").exists()

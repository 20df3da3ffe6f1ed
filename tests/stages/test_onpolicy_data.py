"""The on-policy data path (#25 part 1): a model writes completions with the log-prob of each drawn
token (distill generate), prepare --format ids stores them as they are, stage one scores them with
the teacher (--kind target, or any kind, copying behaviour_logprob), and stage two's batches carry
what a policy-gradient objective reads."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.errors import DistillError
from pipeline.store.contract import open_store
from stages.student import TrainConfig, setup
from tests.conftest import TOKENIZER, make_teacher, one_line_error, run_cli, write_tiny_model_config

PROMPTS = ["The Lord said unto Moses", "A hacker is", "In the beginning", "Once upon a time there was",
           "It is a truth", "He said"]
ROWS = ("--rows-per-shard", "5", "--chunk-rows", "2")


@pytest.fixture(scope="module")
def onpolicy(tmp_path_factory):
    """A writer (the test teacher with its EOS row scaled up, so completions end at EOS often) samples 2
    completions per prompt; its records become a tokens store of rows of 24 (--format ids); the
    teacher (another random model) scores them into a target store and a topk store."""
    root = tmp_path_factory.mktemp("onpolicy")
    torch.set_num_threads(1)
    writer = AutoModelForCausalLM.from_pretrained(str(make_teacher(root / "writer")))
    with torch.no_grad():
        writer.lm_head.weight[0] *= 3
    writer.save_pretrained(str(root / "writer"))
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_pretrained(str(make_teacher(root / "teacher", scale=20.0)))
    with torch.no_grad():  # another model than the writer
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.save_pretrained(str(root / "teacher"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    result = run_cli("generate", "--model", root / "writer", "--tokenizer", TOKENIZER, "--prompts", root / "prompts.txt",
                     "--out", root / "gen", "--samples-per-prompt", "2", "--max-new-tokens", "12", "--top-k", "50",
                     "--temperature", "1.0")
    assert result.exit_code == 0, result.output
    result = run_cli("prepare", "--input", root / "gen" / "generated.jsonl", "--format", "ids", "--tokenizer",
                     TOKENIZER, "--seq-len", "24", "--out", root / "tokens", *ROWS)
    assert result.exit_code == 0, result.output
    for kind, flags in (("target", ()), ("topk", ("--top-k", "8"))):
        result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                         root / kind, "--kind", kind, "--batch-size", "3", "--position-chunk", "29", *ROWS, *flags)
        assert result.exit_code == 0, result.output
    write_tiny_model_config(root / "tiny.json")
    return root


def records(root):
    return [json.loads(line) for line in (root / "gen" / "generated.jsonl").read_text().splitlines()]


def test_the_tokens_store_holds_the_records_ids_and_logprobs(onpolicy):
    got = records(onpolicy)
    assert {r["finish_reason"] for r in got} == {"eos", "length"}  # both kinds of ending are in the store
    store = open_store(onpolicy / "tokens")
    data = store.read_rows(0, store.rows)
    assert store.rows == len(got)
    for row, r in enumerate(got):
        ids = r["prompt_ids"] + r["completion_ids"]
        n, p = len(ids), len(r["prompt_ids"])
        np.testing.assert_array_equal(data["input_ids"][row, :n], ids)
        assert (data["input_ids"][row, n:] == 0).all()  # EOS padding, nothing appended
        assert data["loss_mask"][row].tolist() == [0] * (p - 1) + [1] * (n - p) + [0] * (24 - n + 1)
        np.testing.assert_array_equal(data["behaviour_logprob"][row, p - 1:n - 1],
                                      np.float32(r["completion_logprobs"]))


SAMPLER = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "greedy": False, "rules_sha256": None}  # the fixture's


def test_the_stores_say_which_sampler_drew_the_records(onpolicy, tmp_path):
    """prepare --format ids records the samplers the records' settings name, and stage one copies them,
    so stage two can tell what behaviour_logprob is a log-prob of. Records of several samplers give the
    set (each row's log-prob is its own sampler's), sorted, with null for records that do not say; an
    older record without 'greedy' reads it from its temperature."""
    assert open_store(onpolicy / "tokens").params["samplers"] == [SAMPLER]
    assert all(open_store(onpolicy / kind).params["samplers"] == [SAMPLER] for kind in ("target", "topk"))
    lines = []
    for i, r in enumerate(records(onpolicy)):
        if i % 4 == 1:
            r["settings"]["top_k"] = 0
        elif i % 4 == 2:
            del r["settings"]
        elif i % 4 == 3:
            del r["settings"]["greedy"]
        lines.append(json.dumps(r) + "\n")
    (tmp_path / "mixed.jsonl").write_text("".join(lines))
    args = ("prepare", "--input", tmp_path / "mixed.jsonl", "--format", "ids", "--tokenizer", TOKENIZER, "--seq-len",
            "24", "--out", tmp_path / "tokens")
    assert run_cli(*args).exit_code == 0
    assert open_store(tmp_path / "tokens").params["samplers"] == [None, dict(SAMPLER, top_k=0), SAMPLER]
    assert "nothing to do" in run_cli(*args).output  # the same records: the same params


def test_a_target_store_is_the_teachers_log_prob_of_each_next_token(onpolicy):
    """target_logprob equals a fresh forward of the teacher (log-softmax at the true next tokens, at the
    cache temperature); loss_mask and behaviour_logprob are copied exactly; nothing else is stored."""
    store, tokens = open_store(onpolicy / "target", kind="target"), open_store(onpolicy / "tokens")
    assert store.params["temperature_grid"] == [1.0] and "top_k" not in store.params
    assert set(store.index["arrays"]) == {"input_ids", "loss_mask", "behaviour_logprob", "target_logprob"}
    data, source = store.read_rows(0, store.rows), tokens.read_rows(0, tokens.rows)
    for name in ("input_ids", "loss_mask", "behaviour_logprob"):
        assert data[name].dtype == source[name].dtype
        np.testing.assert_array_equal(data[name], source[name])
    model = AutoModelForCausalLM.from_pretrained(str(onpolicy / "teacher"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data["input_ids"].astype(np.int64))).logits.double()
    expected = torch.log_softmax(logits[:, :-1], -1).gather(
        -1, torch.from_numpy(data["input_ids"][:, 1:].astype(np.int64))[..., None])[..., 0]
    np.testing.assert_allclose(data["target_logprob"][:, :-1], expected.numpy(), rtol=0, atol=1e-5)
    assert np.isnan(data["target_logprob"][:, -1]).all()
    # a topk store of the same rows carries the same target log-probs and the copied arrays
    topk = open_store(onpolicy / "topk").read_rows(0, store.rows)
    np.testing.assert_array_equal(topk["behaviour_logprob"], source["behaviour_logprob"])
    np.testing.assert_allclose(topk["target_logprob"][:, :-1], data["target_logprob"][:, :-1], rtol=0, atol=1e-5)


def test_a_target_store_at_another_temperature_holds_that_temperature_alone(onpolicy, tmp_path):
    result = run_cli("teacher", "--tokens-store", onpolicy / "tokens", "--teacher", onpolicy / "teacher", "--out",
                     tmp_path / "t2", "--kind", "target", "--temperature", "2", "--max-rows", "4", *ROWS)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "t2")
    assert store.params["temperature_grid"] == [2.0] and store.params["temperature"] == 2.0
    data = store.read_rows(0, 4)
    model = AutoModelForCausalLM.from_pretrained(str(onpolicy / "teacher"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data["input_ids"].astype(np.int64))).logits.double()
    expected = torch.log_softmax(logits[:, :-1] / 2, -1).gather(
        -1, torch.from_numpy(data["input_ids"][:, 1:].astype(np.int64))[..., None])[..., 0]
    np.testing.assert_allclose(data["target_logprob"][:, :-1], expected.numpy(), rtol=0, atol=1e-5)
    line = one_line_error(run_cli("teacher", "--tokens-store", onpolicy / "tokens", "--teacher", onpolicy / "teacher",
                                  "--out", tmp_path / "bad", "--kind", "target", "--temperature-grid", "1",
                                  "--temperature-grid", "2"))
    assert "a target store holds the teacher's log-probs at the cache temperature alone" in line
    assert not (tmp_path / "bad").exists()


def test_inspect_describes_a_target_store(onpolicy):
    result = run_cli("inspect", onpolicy / "target", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["kind"] == "target" and report["temperature"] == 1.0
    assert report["raw_bytes_per_position"] == 2 + 1 + 4 + 4  # uint16 id, mask, behaviour and target log-probs
    data = open_store(onpolicy / "target").read_rows(0, open_store(onpolicy / "target").rows)
    scored = data["loss_mask"][:, :-1] > 0
    assert report["scored_positions"] == scored.sum()
    gap = data["behaviour_logprob"][:, :-1][scored] - data["target_logprob"][:, :-1][scored].astype(np.float64)
    assert report["policy_minus_teacher_nats_mean"] == pytest.approx(gap.mean(), rel=1e-9)


def test_stage_two_refuses_a_target_store_in_one_line(onpolicy, tmp_path):
    line = one_line_error(run_cli("student", "--train-store", onpolicy / "target", "--model", onpolicy / "tiny.json",
                                  "--out", tmp_path / "s", "--max-steps", "1", "--device", "cpu"))
    assert "a target store holds only the teacher's log-prob of each token; train with --objective policy-gradient" \
        in line
    assert not (tmp_path / "s").exists()


def test_stage_two_batches_carry_the_behaviour_and_target_log_probs(onpolicy, tmp_path):
    """Under --objective policy-gradient the loader hands each batch the store's behaviour and target
    log-probs, row for row as stored; another objective's batches do not read them; a topk store of the
    same rows trains as before."""
    def first_batch(out, **objective):
        config = TrainConfig(train_store=str(onpolicy / "topk"), model=str(onpolicy / "tiny.json"), out=str(out),
                             max_steps=1, micro_batch_size=4, device="cpu", shuffle_chunks=1, **objective)
        run = setup(config)
        try:
            return next(run.loader)
        finally:
            run.loader.close()

    plain = first_batch(tmp_path / "plain")
    assert {"loss_mask", "topk_ids"} <= set(plain) and not {"behaviour_logprob", "target_logprob"} & set(plain)
    with pytest.raises(DistillError, match="top-k 50 of 8192 ids"):  # the fixture's writer truncated
        first_batch(tmp_path / "refused", objective="policy-gradient", alpha=0.0)
    batch = first_batch(tmp_path / "pg", objective="policy-gradient", alpha=0.0, allow_biased_sampler=True)
    assert {"loss_mask", "behaviour_logprob", "target_logprob"} <= set(batch)
    assert batch["behaviour_logprob"].dtype == torch.float32 and batch["target_logprob"].dtype == torch.float32
    stored = open_store(onpolicy / "topk").read_rows(0, open_store(onpolicy / "topk").rows)
    for row in range(4):  # find each batch row in the store by its ids
        match = np.nonzero((stored["input_ids"] == batch["input_ids"][row].numpy()).all(-1))[0]
        assert len(match) >= 1
        np.testing.assert_array_equal(batch["behaviour_logprob"][row].numpy(), stored["behaviour_logprob"][match[0]])
        np.testing.assert_array_equal(batch["loss_mask"][row].numpy(), stored["loss_mask"][match[0]])
    result = run_cli("student", "--train-store", onpolicy / "topk", "--model", onpolicy / "tiny.json", "--out",
                     tmp_path / "trained", "--max-steps", "2", "--micro-batch-size", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_when_the_teacher_writes_at_its_temperature_both_log_probs_agree(onpolicy, tmp_path):
    """End to end: the teacher writing at T = 1 with no filtering samples exactly the distribution a
    T = 1 target store scores, so behaviour_logprob (from decoding, on the KV cache) and target_logprob
    (from stage one's full forward) agree on every scored token, to the logits' float rounding."""
    result = run_cli("generate", "--model", onpolicy / "teacher", "--tokenizer", TOKENIZER, "--prompts",
                     onpolicy / "prompts.txt", "--out", tmp_path / "gen", "--max-new-tokens", "10", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    result = run_cli("prepare", "--input", tmp_path / "gen" / "generated.jsonl", "--format", "ids", "--tokenizer",
                     TOKENIZER, "--seq-len", "24", "--out", tmp_path / "tokens")
    assert result.exit_code == 0, result.output
    result = run_cli("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", onpolicy / "teacher", "--out",
                     tmp_path / "target", "--kind", "target")
    assert result.exit_code == 0, result.output
    data = open_store(tmp_path / "target").read_rows(0, len(PROMPTS))
    scored = data["loss_mask"][:, :-1] > 0
    assert scored.sum() >= 50
    np.testing.assert_allclose(data["behaviour_logprob"][:, :-1][scored], data["target_logprob"][:, :-1][scored],
                               rtol=0, atol=1e-4)

"""On-policy objectives in stage two (#25 part 2): stores whose responses the student wrote, with the
log-prob it drew each token with (``behaviour_logprob``), scored by a teacher in stage one; trained
with --objective forward-kl, reverse-kl and policy-gradient."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import OutputHead, load_model
from pipeline.store.contract import new_index, open_store, shard_name, write_index, write_shard
from pipeline.train.onpolicy import policy_gradient
from pipeline.train.teacher_signal import StoredPolicyGradient
from stages.student import DistillStep
from tests.conftest import TOKENIZER, make_teacher, one_line_error, reseal_index, run_cli, write_tiny_model_config
from tests.stages.test_finetune import batch_of, task_records

ROWS = ("--rows-per-shard", "16", "--chunk-rows", "4")
FULL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False, "rules_sha256": None}


def student_logprobs(model_config, input_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[N, L]`` float32: position t holds the log-prob that stage two's freshly initialised student
    (seed ``seed``) gives token t+1; 0 at the last position."""
    torch.manual_seed(seed)
    model = load_model(model_config)
    ids = torch.from_numpy(input_ids.astype(np.int64))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    out = np.zeros(input_ids.shape, dtype=np.float32)
    out[:, :-1] = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).numpy()
    return out


@pytest.fixture(scope="module")
def onpolicy(tmp_path_factory, heldout_docs):
    """A prompt-response tokens store whose responses count as the student's own: its
    ``behaviour_logprob`` is what the student stage two starts from (tiny.json, seed 0) gives each
    response token, so the first step is exactly on policy; then a tiny teacher's topk, sampled and
    target stores of it."""
    root = tmp_path_factory.mktemp("onpolicy")
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_records(heldout_docs, 40)))
    result = run_cli("prepare", "--input", root / "task.jsonl", "--out", root / "plain", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--format", "prompt-response", *ROWS)
    assert result.exit_code == 0, result.output
    write_tiny_model_config(root / "tiny.json")
    plain = open_store(root / "plain")
    data = plain.read_rows(0, plain.rows)
    own = student_logprobs(root / "tiny.json", data["input_ids"])
    data["behaviour_logprob"] = np.where(data["loss_mask"] > 0, own, 0.0).astype(np.float32)
    (root / "tokens").mkdir()
    shards, start, backend = [], 0, plain.index["backend"]
    for i, entry in enumerate(plain.shards):
        part = {k: v[start:start + entry["rows"]] for k, v in data.items()}
        shards.append(write_shard(root / "tokens", shard_name(i, backend), part, backend, chunk_rows=4))
        start += entry["rows"]
    arrays = dict(plain.index["arrays"], behaviour_logprob={"dtype": "float32", "shape": [32]})
    # the student sampling itself at T = 1 with full support, as prepare --format ids would record it
    params = dict(plain.params, samplers=[FULL])
    write_index(root / "tokens", new_index("tokens", backend, params, shards, arrays))
    make_teacher(root / "teacher")
    for name, flags in (("sampled", ("--samples", "4")), ("topk", ("--kind", "topk", "--top-k", "8")),
                        ("target", ("--kind", "target")),
                        ("topk-t2", ("--kind", "topk", "--top-k", "8", "--temperature", "2"))):
        result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                         root / name, *ROWS, *flags)
        assert result.exit_code == 0, result.output
    return root


def train(root, store, out, *flags, steps=3):
    result = run_cli("student", "--train-store", root / store, "--model", root / "tiny.json", "--out", root / out,
                     "--max-steps", str(steps), "--micro-batch-size", "4", "--device", "cpu", "--log-every", "1",
                     "--warmup-steps", "1", *flags)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (root / out / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((root / out / "metrics.json").read_text())


def test_stage_one_copies_the_behaviour_logprob(onpolicy):
    tokens = open_store(onpolicy / "tokens").read_rows(0, 8)
    for name in ("sampled", "topk", "target"):
        store = open_store(onpolicy / name)
        data = store.read_rows(0, 8)
        np.testing.assert_array_equal(data["behaviour_logprob"], tokens["behaviour_logprob"])
        assert np.isfinite(data["target_logprob"][:, :-1]).all()


@pytest.mark.parametrize("store,flags", [
    ("sampled", ("--objective", "forward-kl")),
    ("topk", ("--objective", "reverse-kl")),
    ("target", ("--objective", "policy-gradient", "--alpha", "0")),
    ("topk", ("--objective", "policy-gradient", "--alpha", "0", "--ratio", "gate")),
    ("topk-t2", ("--objective", "policy-gradient", "--alpha", "0.5", "--ratio-epsilon", "0.1")),
    ("sampled", ("--objective", "policy-gradient", "--alpha", "0")),
], ids=["forward-kl", "reverse-kl", "pg-clip-target", "pg-gate-topk", "pg-retempered", "pg-sampled"])
def test_each_objective_trains_and_says_what_it_did(onpolicy, store, flags):
    lines, final = train(onpolicy, store, f"run-{store}-{'-'.join(flags)}", *flags)
    assert len(lines) == 3 and all(np.isfinite([r["loss"], r["kd"], r["grad_norm"]]).all() for r in lines)
    assert final["objective"] == flags[1]
    assert final["direction"] == ("forward" if flags[1] == "forward-kl" else "reverse")
    if flags[1] != "policy-gradient":
        assert "pg_advantage" not in lines[0]
        return
    assert final["teacher_signal"] == "StoredPolicyGradient" and final["ratio"] in ("clip", "gate")
    share = "pg_clipped_share" if final["ratio"] == "clip" else "pg_gated_share"
    # step 1 runs the student that wrote the store: exactly on policy
    assert lines[0]["pg_ratio"] == pytest.approx(1.0, abs=1e-4) and lines[0][share] == 0
    # the surrogate at r = 1 is −A: the loss logged is minus the mean advantage, a reverse-KL estimate
    assert lines[0]["kd"] == pytest.approx(-lines[0]["pg_advantage"], abs=1e-4)
    assert lines[0]["pg_advantage"] < 0  # a random student is far from the teacher on its own tokens
    assert any(r["pg_ratio"] != pytest.approx(1.0, abs=1e-4) for r in lines[1:])  # the student moved


def test_the_first_step_advantage_is_the_teachers_minus_the_samplers_log_prob(onpolicy):
    """At step 1 (r = 1, one batch holding every row) the logged advantage is the mean over response
    positions of target_logprob − behaviour_logprob, computed here from the stores alone."""
    target = open_store(onpolicy / "target")
    data = target.read_rows(0, target.rows)
    mask = data["loss_mask"][:, :-1] > 0
    want = (data["target_logprob"][:, :-1][mask].astype(np.float64)
            - data["behaviour_logprob"][:, :-1][mask]).mean()
    lines, _ = train(onpolicy, "target", "all-rows", "--objective", "policy-gradient", "--alpha", "0",
                     "--micro-batch-size", str(target.rows), steps=1)
    assert lines[0]["pg_advantage"] == pytest.approx(want, abs=1e-4)


def test_a_resumed_policy_gradient_run_logs_and_ends_as_an_uninterrupted_one(onpolicy):
    """The pg_* statistics are of the logged step, as the loss is: resumed from a checkpoint between
    two metrics lines, the run logs the same numbers and ends with the same weights."""
    flags = ("--objective", "policy-gradient", "--alpha", "0", "--checkpoint-every", "3", "--log-every", "2")
    result = run_cli("student", "--train-store", onpolicy / "target", "--model", onpolicy / "tiny.json", "--out",
                     onpolicy / "whole", "--max-steps", "4", "--micro-batch-size", "4", "--device", "cpu", *flags)
    assert result.exit_code == 0, result.output
    out = onpolicy / "resumed"
    shutil.copytree(onpolicy / "whole", out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()
    result = run_cli("student", "--train-store", onpolicy / "target", "--model", onpolicy / "tiny.json", "--out",
                     out, "--max-steps", "4", "--micro-batch-size", "4", "--device", "cpu", "--resume", "auto", *flags)
    assert result.exit_code == 0 and "resumed from" in result.output, result.output
    keys = ("step", "loss", "kd", "pg_advantage", "pg_ratio", "pg_clipped_share")
    logs = [[{k: json.loads(line)[k] for k in keys} for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (onpolicy / "whole", out)]
    assert logs[0] == logs[1] and [r["step"] for r in logs[0]] == [2, 4]
    wa = load_file(str(onpolicy / "whole" / "model" / "model.safetensors"))
    wb = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_forward_kl_is_direction_forward_bit_for_bit(onpolicy):
    for store in ("sampled", "topk"):
        a, _ = train(onpolicy, store, f"fkl-{store}", "--objective", "forward-kl")
        b, _ = train(onpolicy, store, f"plain-{store}", "--direction", "forward")
        keys = ("loss", "ce", "kd", "grad_norm")
        assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
        wa = load_file(str(onpolicy / f"fkl-{store}" / "model" / "model.safetensors"))
        wb = load_file(str(onpolicy / f"plain-{store}" / "model" / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("ratio", ["clip", "gate"])
@pytest.mark.parametrize("loss_chunk", [0, 7])
def test_masked_positions_contribute_nothing_and_the_loss_is_the_surrogates_mean(onpolicy, ratio, loss_chunk):
    """DistillStep with the policy-gradient signal: its loss and gradients equal the pure surrogate over
    the response positions alone, computed here from the full forward; other behaviour and teacher
    log-probs at the masked positions change nothing, bit for bit; the statistics count those positions."""
    store = open_store(onpolicy / "target")
    batch = batch_of(store, 6)
    input_ids, mask = batch["input_ids"], batch["loss_mask"][:, :-1].bool()
    assert 0 < mask.sum() < mask.numel()
    torch.manual_seed(0)
    model = load_model(onpolicy / "tiny.json")
    signal = StoredPolicyGradient("target", store.params, store.index["arrays"], ratio, 0.2)
    # move the behaviour off policy so that positions fall outside the band too
    shift = torch.linspace(-0.5, 0.5, mask.numel()).reshape(mask.shape)
    batch["behaviour_logprob"] = batch["behaviour_logprob"].clone()
    batch["behaviour_logprob"][:, :-1] += torch.where(mask, shift, 0.0)

    def step_loss(batch):
        model.zero_grad()
        output = OutputHead(model, input_ids[:1])
        _, kd, count = DistillStep(model, 8192, 0.0, loss_chunk, signal, output=output)(input_ids, batch)
        (kd / count).backward()
        return kd.detach(), count, signal.take_stats(), [p.grad.clone() for p in model.parameters()]

    kd, count, stats, grads = step_loss(batch)
    assert count == mask.sum()

    model.zero_grad()
    own = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), -1).gather(
        -1, input_ids[:, 1:, None]).squeeze(-1)[mask]
    terms = policy_gradient(own, batch["behaviour_logprob"][:, :-1][mask], batch["target_logprob"][:, :-1][mask],
                            ratio, 0.2)
    (terms.loss.sum() / count).backward()
    assert kd.item() == pytest.approx(terms.loss.sum().item(), rel=1e-5, abs=1e-6)
    for got, param in zip(grads, model.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)
    outside = terms.outside.mean().item()
    assert 0 < outside < 1  # both kinds of position are in the batch
    share = "pg_clipped_share" if ratio == "clip" else "pg_gated_share"
    assert stats[share] == pytest.approx(outside) and stats["pg_ratio"] == pytest.approx(terms.ratio.mean().item())
    assert stats["pg_advantage"] == pytest.approx(terms.advantage.mean().item(), abs=1e-6)

    spoiled = dict(batch)
    for name in ("behaviour_logprob", "target_logprob"):
        spoiled[name] = torch.where(batch["loss_mask"].bool(), batch[name], torch.full_like(batch[name], -40.0))
    again = step_loss(spoiled)
    assert torch.equal(again[0], kd) and again[2] == stats
    assert all(torch.equal(a, b) for a, b in zip(again[3], grads))


@pytest.mark.parametrize("store,flags,message", [
    ("target", (), "a target store holds only the teacher's log-prob of each token; train with --objective "
                   "policy-gradient --alpha 0"),
    ("target", ("--objective", "reverse-kl"), "a target store holds only"),
    ("sampled", ("--objective", "reverse-kl"), "is a 'sampled' store; rerun stage one with --kind topk"),
    ("tokens", ("--objective", "policy-gradient", "--alpha", "0"), "the teacher has not scored it"),
    ("topk", ("--objective", "policy-gradient"), "needs --alpha set"),
    ("topk", ("--objective", "policy-gradient", "--alpha", "0", "--temperature", "2"), "drop --temperature 2"),
    ("topk", ("--objective", "forward-kl", "--direction", "reverse"), "drop --direction reverse"),
    ("topk", ("--objective", "reverse-kl", "--tail", "renorm"), "drop --tail renorm"),
    ("topk", ("--objective", "policy-gradient", "--alpha", "0", "--ratio", "trust"), "ratio must be one of clip, gate"),
    ("topk", ("--objective", "policy-gradient", "--alpha", "0", "--ratio-epsilon", "1.5"), "ratio_epsilon must be"),
    ("topk", ("--objective", "kl"), "objective must be one of forward-kl, reverse-kl, policy-gradient"),
    ("topk", ("--objective", "reverse-kl", "--allow-biased-sampler"), "--allow-biased-sampler is for --objective "
                                                                      "policy-gradient"),
])
def test_bad_combinations_are_one_line(onpolicy, tmp_path, store, flags, message):
    result = run_cli("student", "--train-store", onpolicy / store, "--model", onpolicy / "tiny.json", "--out",
                     tmp_path / "out", "--max-steps", "1", "--device", "cpu", *flags)
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_a_ratio_that_overflows_stops_clip_with_one_line_and_gate_drops_it(onpolicy):
    """A sampler that gave its tokens log-prob −200 (r = e^200: inf in float32) with negative
    advantages: PPO's clip leaves that side unbounded, so the step is non-finite and stopped before
    the weights change, with the cause named; the gate gives those positions nothing and trains."""
    target = open_store(onpolicy / "target")
    data = target.read_rows(0, target.rows)
    data["behaviour_logprob"] = np.where(data["loss_mask"] > 0, -200.0, 0.0).astype(np.float32)
    root = onpolicy / "overflow"
    root.mkdir()
    entry = write_shard(root, shard_name(0, target.index["backend"]), data, target.index["backend"], chunk_rows=4)
    write_index(root, new_index("target", target.index["backend"], dict(target.params, rows_per_shard=target.rows),
                                [entry], target.index["arrays"]))
    result = run_cli("student", "--train-store", root, "--model", onpolicy / "tiny.json", "--out",
                     onpolicy / "overflow-clip", "--max-steps", "2", "--micro-batch-size", "4", "--device", "cpu",
                     "--objective", "policy-gradient", "--alpha", "0")
    line = one_line_error(result)
    assert "step 1: non-finite" in line and "importance ratio that overflowed" in line
    lines, _ = train(onpolicy, "overflow", "overflow-gate", "--objective", "policy-gradient", "--alpha", "0",
                     "--ratio", "gate", steps=2)
    assert [r["pg_gated_share"] for r in lines] == [1.0, 1.0] and all(r["kd"] == 0 for r in lines)


def test_a_round_from_distill_generate_starts_exactly_on_policy(tmp_path):
    """The whole chain of a round's data: a student with weights writes completions (distill generate,
    T = 1, no top-k/top-p, so it samples from its own distribution and records each token's log-prob),
    prepare --format ids stores them, stage one scores them (--kind target), and stage two, starting
    from that same student (--model DIR), sees ratio 1 at step 1 and nothing clipped: the sampler's
    log-prob of token t+1 lines up with the student's at position t."""
    student = make_teacher(tmp_path / "student", scale=4.0)  # a random model with its weights, not too peaked
    make_teacher(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("The Lord said unto Moses\nIn the beginning\nOnce upon a time there was\n")
    steps = [
        ("generate", "--model", student, "--tokenizer", TOKENIZER, "--prompts", tmp_path / "prompts.txt", "--out",
         tmp_path / "gen", "--samples-per-prompt", "2", "--max-new-tokens", "12", "--temperature", "1.0"),
        ("prepare", "--input", tmp_path / "gen" / "generated.jsonl", "--format", "ids", "--tokenizer", TOKENIZER,
         "--seq-len", "24", "--out", tmp_path / "tokens", *ROWS),
        ("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", tmp_path / "teacher", "--out",
         tmp_path / "target", "--kind", "target", *ROWS),
        ("student", "--train-store", tmp_path / "target", "--model", student, "--out", tmp_path / "round",
         "--max-steps", "2", "--micro-batch-size", "6", "--device", "cpu", "--log-every", "1", "--warmup-steps", "1",
         "--objective", "policy-gradient", "--alpha", "0"),
    ]
    for args in steps:
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "round" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["pg_ratio"] == pytest.approx(1.0, abs=1e-4) and lines[0]["pg_clipped_share"] == 0
    assert np.isfinite(lines[1]["loss"]) and lines[1]["pg_ratio"] != pytest.approx(1.0, abs=1e-4)


def with_samplers(onpolicy, path, samplers):
    """A copy of the fixture's target store whose params name ``samplers`` ('absent': no such param, a
    store prepared before they were recorded)."""
    shutil.copytree(onpolicy / "target", path)

    def edit(body):
        body["params"].pop("samplers")
        if samplers != "absent":
            body["params"]["samplers"] = samplers

    reseal_index(path / "index.json", edit)
    return path


@pytest.mark.parametrize("samplers,reason", [
    ([dict(FULL, top_p=0.9)], "top-p 0.9"),
    ([FULL, dict(FULL, top_k=50)], "top-k 50 of 8192 ids"),
    ([dict(FULL, temperature=0.0, greedy=True)], "greedy"),
    ([dict(FULL, rules_sha256="ab" * 32)], "rule-constrained"),
    ([None, FULL], "unknown"),
    ("absent", "unknown"),
], ids=["top-p", "top-k", "greedy", "rules", "records-that-do-not-say", "store-before-samplers"])
def test_a_sampler_the_ratio_cannot_correct_is_refused_in_one_line(onpolicy, tmp_path, samplers, reason):
    """The ratio corrects only a sampler with full support (DESIGN.md): any other the store names, or a
    store that names none, is refused before anything is written, saying why and what to do."""
    store = with_samplers(onpolicy, tmp_path / "store", samplers)
    line = one_line_error(run_cli("student", "--train-store", store, "--model", onpolicy / "tiny.json", "--out",
                                  tmp_path / "out", "--max-steps", "1", "--device", "cpu",
                                  "--objective", "policy-gradient", "--alpha", "0"))
    assert reason in line and "--top-p 1 --top-k 0" in line and "--objective reverse-kl" in line \
        and "--allow-biased-sampler" in line, line
    assert not (tmp_path / "out").exists()


def test_a_tempered_sampler_trains_and_the_override_trains_any(onpolicy, tmp_path):
    """Temperature ≠ 1 with full support is exact (behaviour_logprob is the tempered distribution's):
    it trains. --allow-biased-sampler trains a refused store, says so, and metrics.json records it."""
    with_samplers(onpolicy, onpolicy / "tempered", [FULL, dict(FULL, temperature=0.7)])
    lines, final = train(onpolicy, "tempered", "run-tempered", "--objective", "policy-gradient", "--alpha", "0",
                         steps=1)
    assert np.isfinite(lines[0]["loss"]) and "allow_biased_sampler" not in final
    with_samplers(onpolicy, onpolicy / "top-p", [dict(FULL, top_p=0.9)])
    result = run_cli("student", "--train-store", onpolicy / "top-p", "--model", onpolicy / "tiny.json", "--out",
                     tmp_path / "out", "--max-steps", "1", "--device", "cpu", "--objective", "policy-gradient",
                     "--alpha", "0", "--allow-biased-sampler")
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "top-p 0.9" in result.output
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["allow_biased_sampler"] is True

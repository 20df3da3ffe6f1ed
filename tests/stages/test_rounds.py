"""`distill rounds` (issue #25): on-policy distillation in rounds, every step a batch job of today's stages."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages import rounds
from tests.conftest import TOKENIZER, make_teacher, one_line_error, run_cli

PROMPTS = ["The righteous is more excellent than", "Verse 3. What rare persons", "In the beginning",
           "A hacker is a person who", "Blessed is the man that", "The file system was", "He shall be like a tree",
           "Praise ye the LORD", "The Jargon File is", "When the program crashed", "O give thanks unto",
           "The kernel of the system"]
HELDOUT = ["Verse 1. The heavens declare", "The compiler said", "Let the words of my mouth", "A bug is"]


def tiny_student(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    config = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    teacher = make_teacher(root / "teacher", scale=8.0)
    student = tiny_student(root / "student")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (root / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")
    return root, teacher, student


def config_file(root: Path, teacher: Path, student: Path, out: Path, **extra) -> Path:
    body = {"prompts": str(root / "prompts.jsonl"), "heldout_prompts": str(root / "heldout.txt"),
            "teacher": str(teacher), "student": str(student), "tokenizer": str(TOKENIZER), "out": str(out),
            "rounds": 1, "prompts_per_round": 8, "max_new_tokens": 8, "steps_per_round": 3, "micro_batch_size": 4,
            "lr": 3e-3, "eval_tasks": [], "samples": 8, "top_k": 16, "device": "cpu", "threads": 1,
            "teacher_options": {"rows_per_shard": 4, "chunk_rows": 2}, **extra}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_the_split_follows_lambda_and_cycles(setting, tmp_path):
    root, teacher, student = setting
    config = rounds.RoundsConfig(prompts=str(root / "prompts.jsonl"), heldout_prompts=str(root / "heldout.txt"),
                                 student=str(student), out=str(tmp_path), prompts_per_round=8, student_fraction=0.5)
    first, second = rounds._split(config, 1), rounds._split(config, 2)
    assert len(first["student"]) == len(first["teacher"]) == 4
    assert sorted(first["student"] + first["teacher"]) == list(range(8))
    assert sorted(second["student"] + second["teacher"]) == [0, 1, 2, 3, 8, 9, 10, 11]  # 8 more, cycling
    assert rounds._split(config, 1) == first  # seeded: the same in any rerun
    other = rounds._split(rounds.RoundsConfig(**{**config.__dict__, "seed": 1}), 1)
    assert other != first
    assert rounds._split(rounds.RoundsConfig(**{**config.__dict__, "student_fraction": 0.0}), 1)["student"] == []


@pytest.mark.parametrize("objective,kind", [("policy-gradient", "target"), ("reverse-kl", "topk"),
                                            ("forward-kl", "sampled"), ("ce", None)])
def test_a_round_of_each_objective(setting, tmp_path, objective, kind):
    root, teacher, student = setting
    out = tmp_path / "out"
    result = run_cli("rounds", "--config", config_file(root, teacher, student, out, objective=objective))
    assert result.exit_code == 0, result.output
    r1 = json.loads((out / "round-001" / "round.json").read_text())
    r0 = json.loads((out / "round-000" / "round.json").read_text())
    assert math.isfinite(r1["reverse_kl_per_token"]) and r1["reverse_kl_stderr"] > 0
    assert r1["student_written_tokens"] > 0 and r1["teacher_written_tokens"] == 0
    store = out / "round-001" / "store" / "index.json"
    if kind is None:
        assert not store.exists() and r1["teacher_scored_tokens"] == 0
    else:
        assert json.loads(store.read_text())["kind"] == kind
        assert r1["teacher_scored_tokens"] > r1["student_written_tokens"]  # prompts are scored too
    assert r1["teacher_tokens_total"] == r0["teacher_tokens_total"] + r1["teacher_scored_tokens"] == \
        r1["teacher_scored_tokens"]
    before, after = weights(student), weights(out / "round-001" / "student" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "rounds.md").is_file() and len(json.loads((out / "rounds.json").read_text())) == 2
    for step in ("generate-student", "prepare", "student", "heldout-teacher"):
        assert (out / "round-001" / "steps" / f"{step}.json").is_file()


def test_the_estimate_is_the_students_log_prob_minus_the_teachers(setting, tmp_path):
    """Round 0's reverse KL, recomputed from the held-out records and a fresh forward of the teacher."""
    from transformers import AutoModelForCausalLM

    root, teacher, student = setting
    out = tmp_path / "out"
    result = run_cli("rounds", "--config", config_file(root, teacher, student, out, rounds=0))
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    diffs = []
    for line in (out / "round-000" / "eval" / "gen" / "generated.jsonl").read_text().splitlines():
        record = json.loads(line)
        ids = torch.tensor([record["prompt_ids"] + record["completion_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        n = len(record["prompt_ids"])
        target = logprobs[n - 1:].gather(-1, ids[0, n:, None]).squeeze(-1)
        diffs.append(np.asarray(record["completion_logprobs"]) - target.numpy())
    expected = np.concatenate(diffs).mean()
    got = json.loads((out / "round-000" / "round.json").read_text())
    assert got["reverse_kl_per_token"] == pytest.approx(expected, abs=1e-4)
    assert got["heldout_tokens"] == sum(len(d) for d in diffs) and got["heldout_sequences"] == len(HELDOUT)


def test_a_rerun_skips_finished_rounds_and_more_rounds_continue(setting, tmp_path):
    root, teacher, student = setting
    out = tmp_path / "out"
    config = config_file(root, teacher, student, out, objective="policy-gradient")
    assert run_cli("rounds", "--config", config).exit_code == 0
    first = (out / "round-001" / "round.json").read_text()
    again = run_cli("rounds", "--config", config, "--rounds", "2")
    assert again.exit_code == 0, again.output
    assert "round 1: finished; skipped" in again.output and "round 2: generate-student" in again.output
    assert (out / "round-001" / "round.json").read_text() == first
    second = json.loads((out / "round-002" / "round.json").read_text())
    step = json.loads((out / "round-002" / "steps" / "generate-student.json").read_text())
    assert step["model"] == str(out / "round-001" / "student" / "model")  # round 2 starts from round 1's student
    assert second["teacher_tokens_total"] == json.loads(first)["teacher_tokens_total"] + second["teacher_scored_tokens"]
    changed = run_cli("rounds", "--config", config, "--lr", "1e-2")
    assert "lr" in one_line_error(changed)
    missing = run_cli("rounds", "--config", config, "--rounds", "2", "--reference", tmp_path / "nothing")
    assert "no rounds.json" in one_line_error(missing)
    drawn = run_cli("rounds", "--config", config, "--rounds", "2", "--reference", out)
    assert drawn.exit_code == 0, drawn.output
    assert (out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lambda_zero_forward_kl_is_todays_off_policy_pipeline(setting, tmp_path):
    """λ = 0 with forward KL: the teacher writes, stage one scores, the student trains — the same student,
    bit for bit, as running today's stages by hand on the same prompts."""
    root, teacher, student = setting
    out = tmp_path / "out"
    result = run_cli("rounds", "--config", config_file(root, teacher, student, out, objective="forward-kl",
                                                         student_fraction=0.0, alpha=0.5))
    assert result.exit_code == 0, result.output
    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:8]))
    seq_len = json.loads((out / "config.json").read_text())["seq_len"]
    common = ["--device", "cpu", "--threads", "1"]
    for args in (
        ["generate", "--prompts", hand / "prompts.jsonl", "--teacher", teacher, "--tokenizer", TOKENIZER,
         "--max-new-tokens", "8", "--seed", "3", "--out", hand / "gen", *common],
        ["prepare", "--input", hand / "gen" / "generated.jsonl", "--format", "ids", "--tokenizer", TOKENIZER,
         "--seq-len", str(seq_len), "--out", hand / "tokens"],
        ["teacher", "--tokens-store", hand / "tokens", "--teacher", teacher, "--tokenizer", TOKENIZER,
         "--samples", "8", "--seed", "1", "--temperature-grid", "1", "--rows-per-shard", "4", "--chunk-rows", "2",
         "--out", hand / "store", *common],
        ["student", "--train-store", hand / "store", "--model", student, "--tokenizer", TOKENIZER, "--alpha", "0.5",
         "--objective", "forward-kl", "--seed", "1", "--micro-batch-size", "4", "--max-steps", "3", "--lr", "3e-3",
         "--warmup-steps", "0", "--min-lr-ratio", "1", "--eval-every", "0", "--out", hand / "student", *common]):
        done = run_cli(*args)
        assert done.exit_code == 0, (args[0], done.output)
    by_round, by_hand = weights(out / "round-001" / "student" / "model"), weights(hand / "student" / "model")
    assert by_round.keys() == by_hand.keys() and all(torch.equal(by_round[k], by_hand[k]) for k in by_round)


@pytest.mark.parametrize("args,words", [
    (["--objective", "sideways"], "objective must be one of"),
    (["--student-fraction", "1.5"], "student_fraction"),
    (["--step", "student"], "needs --round"),
    (["--objective", "policy-gradient", "--temperature", "2"], "T = 1"),
    (["--seed", "-1"], "seed must not be negative"),
    (["--round", "2"], "round 1 is not finished"),
])
def test_bad_options_are_one_line(setting, tmp_path, args, words):
    root, teacher, student = setting
    result = run_cli("rounds", "--config", config_file(root, teacher, student, tmp_path / "out"), *args)
    assert words in one_line_error(result)


@pytest.mark.parametrize("options,words", [
    ({"top_p": 0.9}, "top_p 0.9"), ({"top_k": 50}, "top_k 50"), ({"rules": "rules.yaml"}, "rules"),
    ({"top_p": 0.9, "top_k": 50}, "top_p 0.9, top_k 50"),
])
def test_the_policy_gradient_refuses_a_sampler_it_cannot_correct_before_a_round(setting, tmp_path, options, words):
    """generate_options that truncate or constrain the round's sampler are refused up-front in one line,
    before a round spends anything (stage two would refuse the store after generate and stage one), and
    pass with the student's --allow-biased-sampler, or under another objective."""
    root, teacher, student = setting
    out = tmp_path / "out"
    line = one_line_error(run_cli("rounds", "--config", config_file(root, teacher, student, out,
                                                                    objective="policy-gradient",
                                                                    generate_options=options)))
    assert words in line and "--objective reverse-kl" in line and "allow_biased_sampler" in line, line
    assert not out.exists()
    common = {"prompts": str(root / "prompts.jsonl"), "heldout_prompts": str(root / "heldout.txt"),
              "student": str(student), "out": str(out), "generate_options": options}
    rounds.RoundsConfig(objective="policy-gradient", student_options={"allow_biased_sampler": True}, **common)
    rounds.RoundsConfig(objective="reverse-kl", **common)


def test_a_student_without_weights_is_one_line(setting, tmp_path):
    root, teacher, _ = setting
    (tmp_path / "empty").mkdir()
    result = run_cli("rounds", "--config", config_file(root, teacher, tmp_path / "empty", tmp_path / "out"))
    assert "pretrain one first" in one_line_error(result)


def test_the_held_out_steps_keep_the_estimate_unfiltered_and_forward_kl_draws_at_its_temperature(setting, tmp_path):
    """User options reach the training steps; the held-out ones sample the student at T = 1 unfiltered and
    store only the teacher's log-probs, whatever they say. A sampled store draws at the distillation T."""
    root, teacher, student = setting
    config = rounds.RoundsConfig(prompts=str(root / "prompts.jsonl"), heldout_prompts=str(root / "heldout.txt"),
                                 student=str(student), out=str(tmp_path), objective="forward-kl", temperature=2.0,
                                 generate_options={"top_p": 0.5, "batch_size": 2},
                                 teacher_options={"tail_samples": 0, "sample_logprobs": True, "rows_per_shard": 4})
    by_name = {step.name: step.config for step in rounds.steps(config, tmp_path, 1, 64)}
    assert by_name["generate-student"].top_p == 0.5 and by_name["heldout-generate"].top_p == 1.0
    assert by_name["heldout-generate"].batch_size == 2 and by_name["heldout-generate"].temperature == 1.0
    assert by_name["teacher"].temperature == 2.0 and tuple(by_name["teacher"].temperature_grid) == (1.0, 2.0)
    assert by_name["teacher"].sample_logprobs and not by_name["heldout-teacher"].sample_logprobs
    assert by_name["heldout-teacher"].rows_per_shard == 4 and by_name["heldout-teacher"].kind == "target"
    assert by_name["student"].temperature == 2.0
    half = rounds.RoundsConfig(**{**config.__dict__, "prompts_per_round": 1, "student_fraction": 0.5})
    assert len(rounds._split(half, 1)["student"]) == 1  # halves round up, not to even


def test_the_standard_error_counts_a_prompts_completions_as_one(setting, tmp_path):
    root, teacher, student = setting
    out = tmp_path / "out"
    result = run_cli("rounds", "--config", config_file(root, teacher, student, out, rounds=0, heldout_samples=3))
    assert result.exit_code == 0, result.output
    got = json.loads((out / "round-000" / "round.json").read_text())
    assert got["heldout_sequences"] == 3 * len(HELDOUT) and got["heldout_prompts"] == len(HELDOUT)
    # the same rows as 12 independent sequences: the clustered error is not the naive one
    naive = rounds.reverse_kl_estimate(out / "round-000" / "eval" / "store", 1)
    assert naive["reverse_kl_per_token"] == pytest.approx(got["reverse_kl_per_token"])
    assert naive["reverse_kl_stderr"] != pytest.approx(got["reverse_kl_stderr"])


def test_attn_implementation_reaches_every_step_that_loads_a_model(setting, tmp_path):
    """``attn_implementation`` passes through to every generate, stage-one, student and eval step (not
    prepare, which loads no model); a rerun may change it, as --device."""
    root, teacher, student = setting
    config = rounds.RoundsConfig(prompts=str(root / "prompts.jsonl"), heldout_prompts=str(root / "heldout.txt"),
                                 student=str(student), out=str(tmp_path), attn_implementation="eager")
    chosen = {step.name: getattr(step.config, "attn_implementation", None)
              for step in rounds.steps(config, tmp_path, 1, 64) if step.config is not None}
    assert chosen == {"generate-student": "eager", "prepare": None, "teacher": "eager",
                      "student": "eager", "heldout-generate": "eager", "heldout-prepare": None,
                      "heldout-teacher": "eager", "eval": "eager"}
    assert "attn_implementation" in rounds.RERUN_FREE
    msg = one_line_error(run_cli("rounds", "--config", config_file(root, teacher, student, tmp_path / "out",
                                                                   attn_implementation="flash_attention_2")))
    assert "flash_attention_2" in msg and not (tmp_path / "out").exists()

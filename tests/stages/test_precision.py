"""Issue #32, precision: ``--dtype auto`` resolved in one place and recorded as resolved, ``--tf32``,
stage one's reductions in float32 whatever the teacher computes in, ``--save-dtype`` weights that load
as what they are, and an out-of-memory first step as one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import models
from pipeline.models import matmul_precision, resolve_dtype, set_tf32
from pipeline.store.contract import open_store
from pipeline.teacher.sampling import sample_teacher, sampled_logprobs
from pipeline.teacher.topk import sparse_teacher
from stages import rounds, student, teacher
from tests.conftest import (ROOT, TOKENIZER, make_teacher, one_line_error, run_cli, write_corpus,
                            write_tiny_model_config)

# ---------------------------------------------------------------------------------------------- resolution


@pytest.fixture
def cuda(monkeypatch):
    """A CUDA device as torch reports one (none is here): ``cuda(bf16=…)`` says whether it has bfloat16."""
    asked = {}

    def fake(bf16: bool):
        def is_bf16_supported(including_emulation: bool = True):
            asked["including_emulation"] = including_emulation
            return bf16
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        return asked
    return fake


def test_auto_is_float32_on_the_cpu_and_explicit_dtypes_stay():
    assert resolve_dtype("auto", "cpu") == resolve_dtype("auto", torch.device("cpu")) == "float32"
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(name, "cpu") == name


def test_auto_is_bfloat16_on_a_gpu_that_has_it_and_float32_on_one_that_emulates_it(cuda):
    asked = cuda(bf16=True)
    assert resolve_dtype("auto", "cuda:0") == "bfloat16" and resolve_dtype("float32", "cuda:0") == "float32"
    assert asked["including_emulation"] is False  # torch's emulated bfloat16 (pre-Ampere) is slower than float32
    cuda(bf16=False)
    assert resolve_dtype("auto", "cuda:0") == "float32"


def test_tf32_is_set_on_cuda_only_and_no_tf32_sets_full_float32():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert set_tf32("cpu", True) is False and torch.get_float32_matmul_precision() == "medium"
        assert set_tf32("cuda:0", True) is True and torch.get_float32_matmul_precision() == "high"
        assert set_tf32("cuda:0", False) is False and torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    assert matmul_precision("cuda:0", "float32", True) == "tf32"
    assert matmul_precision("cuda:0", "bfloat16", True) == "bfloat16"  # TF32 is for float32 compute alone
    assert matmul_precision("cpu", "float32", True) == "float32"


def test_every_stage_defaults_to_auto_and_has_tf32():
    from stages.eval import EvalConfig
    from stages.generate import GenerateConfig

    for cls in (teacher.TeacherConfig, student.TrainConfig, EvalConfig, GenerateConfig, rounds.RoundsConfig):
        fields = cls.__dataclass_fields__
        assert fields["dtype"].default == "auto" and fields["tf32"].default is True, cls.__name__


# ---------------------------------------------------------------------------------------------- stage one


@pytest.fixture(scope="module")
def stage(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("precision")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:12])
    result = run_cli("prepare", "--input", corpus, "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--rows-per-shard", "40")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    return root


def teacher_args(stage, out, *extra):
    return ["teacher", "--tokens-store", stage / "tokens", "--teacher", stage / "teacher", "--out", out, "--kind",
            "topk", "--top-k", "8", "--tail-samples", "4", "--sample-logprobs", "--max-rows", "12",
            "--rows-per-shard", "6", "--device", "cpu", *map(str, extra)]


def test_a_float32_store_is_done_for_auto_on_the_cpu_and_refused_for_bfloat16(stage, tmp_path):
    """Stage one's params hold the resolved dtype: a store written with --dtype float32 is the one a rerun
    with the default (auto) finds complete on a CPU; a bfloat16 teacher would write another store."""
    out = tmp_path / "store"
    result = run_cli(*teacher_args(stage, out, "--dtype", "float32"))
    assert result.exit_code == 0, result.output
    params = open_store(out).params
    assert params["dtype"] == "float32" and "matmul_precision" not in params  # TF32 never reaches a CPU
    again = run_cli(*teacher_args(stage, out))
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    resolved = json.loads((out / "config.part-00000.json").read_text())
    assert resolved["config"]["dtype"] == "float32" and resolved["tf32"] is False
    line = one_line_error(run_cli(*teacher_args(stage, out, "--dtype", "bfloat16")))
    assert "dtype" in line, line


def test_a_bfloat16_teacher_stores_float32_reductions(stage, tmp_path):
    """A bfloat16 teacher runs on the CPU when asked, its store says so, and every reduction is float32."""
    out = tmp_path / "store"
    result = run_cli(*teacher_args(stage, out, "--dtype", "bfloat16", "--kernel", "torch"))
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert store.params["dtype"] == "bfloat16"
    data = store.read_rows(0, store.rows)
    for name in ("logsumexp", "tail_logmass", "target_logprob"):
        assert data[name].dtype == np.float32 and np.isfinite(data[name][:, :-1]).all(), name


class _Head:
    """An output head whose logits are the hidden states given (what teacher._reduce_chunk reads)."""

    def logits(self, hidden, buffer=None):
        return hidden


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_stage_one_reduces_bfloat16_logits_in_float32(kernel):
    """Stage one's top-k, log-sum-exp, tail mass, target log-prob, draws and drawn ids' log-probs of bfloat16
    logits are those of the same logits widened to float32, bit for bit: every one casts the logits to
    float32 (or float64) before its log-softmax, none reduces in bfloat16."""
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(40, 600, generator=generator) * 6).bfloat16()
    wide = logits.float()
    targets, keys = torch.randint(0, 600, (40,), generator=generator), torch.arange(40) * 7
    grid = (1.0, 2.0)
    low, high = (sparse_teacher(z, 8, 1.0, grid, targets, kernel) for z in (logits, wide))
    for name in high:
        assert low[name].dtype == high[name].dtype and torch.equal(low[name], high[name]), name
    assert high["logsumexp"].dtype == torch.float32
    low_draws, high_draws = (sample_teacher(z, 16, 1.0, keys, high["topk_ids"], kernel) for z in (logits, wide))
    assert all(torch.equal(low_draws[k], high_draws[k]) for k in high_draws)
    ids, counts = high_draws["sample_ids"], high_draws["sample_counts"]
    low_lp, high_lp = (sampled_logprobs(z, ids, counts, 1.0) for z in (logits, wide))
    assert low_lp.dtype == torch.float32 and torch.equal(low_lp, high_lp)
    # and as stage one calls them on a chunk, the arrays of a hybrid store with drawn ids' log-probs
    config = teacher.TeacherConfig(tokens_store="t", out="o", kind="topk", top_k=8, tail_samples=16,
                                   sample_logprobs=True, kernel=kernel)
    low_chunk, _ = teacher._reduce_chunk(_Head(), logits, None, targets, keys, config, 600, kernel, False)
    high_chunk, _ = teacher._reduce_chunk(_Head(), wide, None, targets, keys, config, 600, kernel, False)
    assert set(low_chunk) == set(high_chunk) and all(torch.equal(low_chunk[k], high_chunk[k]) for k in high_chunk)


# ---------------------------------------------------------------------------------------------- stage two


def student_args(stage, out, *extra):
    model = write_tiny_model_config(stage / "tiny.json")
    return ["student", "--train-store", stage / "tokens", "--model", model, "--out", out, "--max-steps", "2",
            "--micro-batch-size", "4", "--warmup-steps", "1", "--checkpoint-every", "0", "--eval-every", "0",
            "--device", "cpu", *map(str, extra)]


def test_the_student_records_the_resolved_dtype_and_saves_weights_that_load_as_what_they_are(stage, tmp_path):
    """auto trains in float32 on a CPU, and says so in config.json and metrics.json; --save-dtype bfloat16
    writes a config.json whose dtype (and torch_dtype, for transformers before 4.56) is bfloat16, so
    from_pretrained(dtype="auto") loads bfloat16 weights as bfloat16."""
    result = run_cli(*student_args(stage, tmp_path / "run", "--save-dtype", "bfloat16"))
    assert result.exit_code == 0, result.output
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["config"]["dtype"] == "float32" and resolved["dtype_requested"] == "auto"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dtype"] == "float32" and metrics["save_dtype"] == "bfloat16" and metrics["tf32"] is False
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_save_model_records_the_dtype_of_the_weights_it_writes(tmp_path, dtype):
    from pipeline.text.tokenizer import load_tokenizer

    model = models.load_model(write_tiny_model_config(tmp_path / "tiny.json"))
    student.save_model(model, model.state_dict(), load_tokenizer(str(TOKENIZER)), tmp_path / "model", dtype)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == dtype
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {models.DTYPES[dtype]}
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def _out_of_memory(after: int):
    """A DistillStep.forward that runs ``after`` times, then raises what CUDA raises when memory runs out."""
    real, calls = student.DistillStep.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)
    return forward


def test_out_of_memory_in_the_first_step_is_one_line_naming_what_to_change(stage, tmp_path, monkeypatch):
    monkeypatch.setattr(student.DistillStep, "forward", _out_of_memory(after=0))
    line = one_line_error(run_cli(*student_args(stage, tmp_path / "run", "--micro-batch-size", "8",
                                                "--grad-accum", "2")))
    assert line.startswith("error: out of memory in the first training step on cpu"), line
    for words in ("--micro-batch-size 4 --grad-accum 4", "--gradient-checkpointing", "--global-batch-tokens",
                  "distill plan"):
        assert words in line, (words, line)
    assert not (tmp_path / "run" / "model").exists()


def test_out_of_memory_after_the_first_step_is_not_a_sizing_question(stage, tmp_path, monkeypatch):
    """Memory that ran out once a step has passed (fragmentation, a longer batch): raised as it is."""
    monkeypatch.setattr(student.DistillStep, "forward", _out_of_memory(after=1))
    result = run_cli(*student_args(stage, tmp_path / "run"))
    assert isinstance(result.exception, torch.OutOfMemoryError), result.output


# ---------------------------------------------------------------------------------------------- rounds


def test_rounds_hand_dtype_and_tf32_to_every_step_unresolved(tmp_path):
    """Each step resolves auto where it runs (a SLURM job's GPU, not the login node that wrote its config)."""
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("One", "Two", "Three")))
    (tmp_path / "h.txt").write_text("Four\n")
    common = dict(prompts=str(tmp_path / "p.jsonl"), heldout_prompts=str(tmp_path / "h.txt"), student="s",
                  out=str(tmp_path), eval_tasks=("heldout",))
    for dtype, tf32 in (("auto", True), ("bfloat16", False)):
        config = rounds.RoundsConfig(dtype=dtype, tf32=tf32, **common)
        computing = [s for s in rounds.steps(config, tmp_path, 1, 64) if s.stage in ("generate", "teacher", "student",
                                                                                    "eval")]
        assert {s.stage for s in computing} == {"generate", "teacher", "student", "eval"}
        assert all(s.config.dtype == dtype and s.config.tf32 is tf32 for s in computing)
    assert {"dtype", "tf32"} <= set(rounds.RERUN_FREE)
    with pytest.raises(Exception, match="dtype must be auto, float32 or bfloat16"):
        rounds.RoundsConfig(dtype="float16", **common)

"""Stage two: offline distillation from a topk store, against online distillation and dense references."""

import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import OutputHead, load_model
from pipeline.store.contract import open_store
from pipeline.teacher.topk import retemper
from pipeline.train.losses import sparse_kd
from pipeline.train.teacher_signal import OnlineTeacher, StoredTopK
from stages.student import DistillStep
from tests.conftest import (ROOT, TOKENIZER, kill_when, make_teacher, one_line_error, reseal_index, run_cli, spawn,
                            spawn_ranks)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    with gzip.open(ROOT / "data" / "corpus" / "heldout.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(30), f)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    # the held-out store every run evaluates on at its end, whole: 4 documents, 71 rows (was the
    # ~650-row tokens store), still more than the 16 a periodic evaluation reads
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:4]))
    for name, corpus, seq in (("tokens", "corpus", "32"), ("long", "corpus", "256"), ("heldout", "heldout", "32")):
        result = run_cli("prepare", "--input", root / f"{corpus}.jsonl", "--out", root / name, "--tokenizer", TOKENIZER,
                         "--seq-len", seq, "--rows-per-shard", "64", "--chunk-rows", "8")
        assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                     root / "topk", "--kind", "topk", "--top-k", "16", "--rows-per-shard", "40", "--chunk-rows", "8")
    assert result.exit_code == 0, result.output
    student = json.loads((root / "teacher" / "config.json").read_text())
    student = {k: v for k, v in student.items() if k not in ("architectures", "dtype", "transformers_version")}
    student |= {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    (root / "student.json").write_text(json.dumps(student))
    return root


def kd_args(root, out, steps, *extra):
    return ["student", "--train-store", root / "topk", "--eval-store", root / "heldout", "--model",
            root / "student.json", "--out", out, "--max-steps", str(steps), "--micro-batch-size", "4",
            "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1", "--eval-rows", "16", *map(str, extra)]


def test_k_equal_vocab_offline_equals_online(stage1, tmp_path):
    """With every id kept (k = V), float32 log-probs and the tail mode, the offline loss is the
    online full-vocabulary loss."""
    make_teacher(tmp_path / "teacher", scale=8.0)  # logits of a trained LM's spread
    result = run_cli("teacher", "--tokens-store", stage1 / "tokens", "--teacher", tmp_path / "teacher", "--out",
                     tmp_path / "full", "--kind", "topk", "--top-k", "8192", "--logprob-dtype", "float32", "--rows-per-shard", "8",
                     "--max-rows", "8", "--temperature-grid", "1", "--temperature-grid", "2")  # 4 of them are read
    assert result.exit_code == 0, result.output
    batch = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "u" else v)
             for k, v in open_store(tmp_path / "full").read_rows(0, 4).items()}
    torch.manual_seed(0)
    student = load_model(stage1 / "student.json")
    teacher_model = load_model(tmp_path / "teacher").eval()
    teacher = OutputHead(teacher_model, batch["input_ids"][:1])
    output = OutputHead(student, batch["input_ids"][:1])
    params = open_store(tmp_path / "full").params
    assert params["temperature"] == 1.0 and params["temperature_grid"] == [1.0, 2.0]
    for t in (1.0, 2.0):
        for direction in ("forward", "reverse"):
            stored = StoredTopK(params, t, "tail", direction)
            offline = DistillStep(student, 8192, 0.5, 0, stored, output=output)(batch["input_ids"], batch)
            online = DistillStep(student, 8192, 0.5, 0, OnlineTeacher(teacher, 8192, t, direction),
                                 output=output)(batch["input_ids"], batch)
            count = offline[2]
            torch.testing.assert_close(offline[0] / count, online[0] / count, rtol=0, atol=1e-6)
            torch.testing.assert_close(offline[1] / count, online[1] / count, rtol=0, atol=1e-5)
            assert (offline[1] / count).item() > 0.01  # a real divergence, not two zeros


def test_retempered_store_values_equal_fresh_teacher_at_t2(stage1):
    """Stage two at T=2 from a store cached at T=1 uses what a fresh T=2 forward gives."""
    store = open_store(stage1 / "topk")
    assert store.params["temperature"] == 1.0 and 2.0 in store.params["temperature_grid"]
    data = store.read_rows(0, 6)
    model = load_model(stage1 / "teacher").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data["input_ids"].astype(np.int64))).logits.double()
    ids = torch.from_numpy(data["topk_ids"].astype(np.int64))
    fresh = torch.log_softmax(logits / 2.0, -1).gather(-1, ids)
    used = retemper(torch.from_numpy(data["topk_logprobs"]), torch.from_numpy(data["logsumexp"]), 1.0, 0, 1, 2.0)
    torch.testing.assert_close(used.double(), fresh, rtol=2e-3, atol=4e-3)
    fresh_tail = torch.log1p(-fresh.exp().sum(-1).clamp(max=1 - 1e-12))
    torch.testing.assert_close(torch.from_numpy(data["tail_logmass"][..., 1]).double(), fresh_tail, rtol=1e-3, atol=1e-4)
    # and the loss computed from them matches the loss from the fresh teacher
    student_logits = torch.randn(ids.shape[0] * ids.shape[1], 8192, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(student_logits.shape[0], dtype=torch.long)
    student_logprobs = torch.log_softmax(student_logits / 2.0, -1)
    a = sparse_kd(student_logprobs, ids.reshape(-1, 16), used.reshape(-1, 16).float(),
                  torch.from_numpy(data["tail_logmass"][..., 1]).reshape(-1), targets)
    b = sparse_kd(student_logprobs, ids.reshape(-1, 16), fresh.reshape(-1, 16).float(),
                  fresh_tail.reshape(-1).float(), targets)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_offline_training_never_builds_the_teacher(stage1, tmp_path, monkeypatch):
    """The store remembers its teacher's path; offline training must work with that path gone."""
    shutil.copytree(stage1 / "topk", tmp_path / "topk")
    reseal_index(tmp_path / "topk" / "index.json",
                 lambda index: index["params"].update(teacher=str(tmp_path / "deleted-teacher")))
    import transformers

    built = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        built.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    args = kd_args(stage1, tmp_path / "run", 3)
    args[args.index(stage1 / "topk")] = tmp_path / "topk"
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert built == []
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert final["teacher_source"] == "store" and final["alpha"] == 0.5
    assert (final["teacher_signal"], final["store_kind"], final["tail"]) == ("StoredTopK", "topk", "tail")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("kd" in r and "ce" in r for r in records if "loss" in r)


@pytest.mark.parametrize("tail", ["renorm", "tail", "residual-label"])
def test_each_mode_trains(stage1, tmp_path, tail):
    result = run_cli(*kd_args(stage1, tmp_path / tail, 24, "--tail", tail, "--temperature", "2", "--alpha", "0.2",
                              "--lr", "1e-2"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / tail / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in records if "kd" in r]
    assert sum(kd[-6:]) < 0.97 * sum(kd[:6])  # batches differ step to step: compare the first and last six
    loss = [r for r in records if "loss" in r]
    r = loss[-1]
    assert r["loss"] == pytest.approx(0.2 * r["ce"] + 0.8 * 4 * r["kd"], rel=1e-5)


def curve(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_sigkill_resume_equals_uninterrupted(stage1, tmp_path):
    steps = 40
    ref = spawn(kd_args(stage1, tmp_path / "ref", steps, "--eval-every", "0", "--workers", "1"))
    output, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, output
    args = kd_args(stage1, tmp_path / "killed", steps, "--eval-every", "0", "--checkpoint-every", "4",
                   "--resume", "auto", "--workers", "1")
    # the trainer alone is killed: its loader worker must follow it down, or communicate() hangs
    kill_when(spawn(args), (tmp_path / "killed" / "checkpoints" / "step-00000004").exists)
    resumed = spawn(args)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert 4 <= int(output.split("at step ")[1].split()[0]) < steps
    want, got = (load_file(tmp_path / r / "model" / "model.safetensors") for r in ("ref", "killed"))
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert curve(tmp_path / "killed") == curve(tmp_path / "ref")


def test_torchrun_ddp_and_fsdp_match_one_process(stage1, tmp_path):
    steps = 6
    # the one-process run in this process: the curves are compared to 1e-4, not bit for bit
    one = run_cli(*kd_args(stage1, tmp_path / "one", steps, "--micro-batch-size", "8", "--eval-every", "0"))
    assert one.exit_code == 0, one.output
    two = spawn_ranks(kd_args(stage1, tmp_path / "two", steps, "--micro-batch-size", "4", "--eval-every", "0"))
    output, _ = two.communicate(timeout=300)
    assert two.returncode == 0, output
    fsdp = spawn_ranks(kd_args(stage1, tmp_path / "fsdp", steps, "--micro-batch-size", "4", "--eval-every", "0",
                               "--fsdp"))
    output, _ = fsdp.communicate(timeout=300)
    assert fsdp.returncode == 0, output
    a, b, c = curve(tmp_path / "one"), curve(tmp_path / "two"), curve(tmp_path / "fsdp")
    assert [s for s, _ in a] == [s for s, _ in b] == [s for s, _ in c] == list(range(1, steps + 1))
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-4)
    np.testing.assert_allclose([l for _, l in a], [l for _, l in c], rtol=1e-4)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2
    # the sharded run's saved model is whole and loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "model"))


def test_bad_input(stage1, tmp_path):
    msg = one_line_error(run_cli(*kd_args(stage1, tmp_path / "a", 2, "--alpha", "1.5")))
    assert "alpha must be in [0, 1]" in msg
    msg = one_line_error(run_cli(*kd_args(stage1, tmp_path / "a", 2, "--temperature", "0")))
    assert "temperature must be > 0" in msg
    msg = one_line_error(run_cli(*kd_args(stage1, tmp_path / "a", 2, "--temperature", "3")))
    assert "not in the store's grid (1, 2)" in msg
    # A store of another tokenizer: its recorded hash differs.
    shutil.copytree(stage1 / "topk", tmp_path / "other")
    reseal_index(tmp_path / "other" / "index.json", lambda index: index["params"].update(tokenizer_hash="0" * 64))
    args = kd_args(stage1, tmp_path / "b", 2, "--tokenizer", TOKENIZER)
    args[args.index(stage1 / "topk")] = tmp_path / "other"
    assert "another tokenizer" in one_line_error(run_cli(*args))
    # Another vocabulary size.
    reseal_index(tmp_path / "other" / "index.json", lambda index: index["params"].update(
        tokenizer_hash=json.loads((stage1 / "topk" / "index.json").read_text())["params"]["tokenizer_hash"],
        vocab_size=9000))
    assert "vocab size 9000" in one_line_error(run_cli(*args))
    # Sequence length above the student's positions (128).
    msg = one_line_error(run_cli("student", "--train-store", stage1 / "long", "--model", stage1 / "student.json",
                                 "--out", tmp_path / "c", "--alpha", "1"))
    assert "sequence length 256" in msg
    # A missing shard and a corrupt one, named.
    shutil.copytree(stage1 / "topk", tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "shard-00001.zarr")
    args = kd_args(stage1, tmp_path / "d", 30)
    args[args.index(stage1 / "topk")] = tmp_path / "broken"
    assert "shard-00001.zarr" in one_line_error(run_cli(*args))
    # A tokens store cannot distil without a teacher.
    msg = one_line_error(run_cli("student", "--train-store", stage1 / "tokens", "--model", stage1 / "student.json",
                                 "--out", tmp_path / "e", "--alpha", "0.5"))
    assert "holds no teacher predictions" in msg


def test_online_and_teacher_layer_init(stage1, tmp_path):
    result = run_cli("student", "--train-store", stage1 / "tokens", "--teacher", stage1 / "teacher", "--model",
                     stage1 / "student.json", "--out", tmp_path / "online", "--max-steps", "3",
                     "--micro-batch-size", "4", "--eval-every", "0")
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "online" / "metrics.json").read_text())
    assert final["teacher_source"] == "online"
    assert (final["teacher_signal"], final["store_kind"], final["tail"]) == ("OnlineTeacher", None, None)  # full vocabulary
    # every other layer of the 2-layer teacher: a 1-layer student with the teacher's width
    config = json.loads((stage1 / "teacher" / "config.json").read_text()) | {"num_hidden_layers": 1}
    (tmp_path / "half.json").write_text(json.dumps(config))
    result = run_cli(*kd_args(stage1, tmp_path / "init", 1, "--model", tmp_path / "half.json", "--init",
                              "teacher-layers", "--lr", "1e-9", "--warmup-steps", "0"))
    assert result.exit_code == 0, result.output
    student = load_file(tmp_path / "init" / "model" / "model.safetensors")
    teacher = load_file(stage1 / "teacher" / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(student[name], teacher[name], rtol=1e-5, atol=1e-6)
    msg = one_line_error(run_cli(*kd_args(stage1, tmp_path / "bad", 1, "--init", "teacher-layers")))
    assert "differ in" in msg and "hidden_size" in msg


def test_reverse_kd_at_small_temperature_trains_a_finite_model(stage1, tmp_path):
    """Top-4 at T = 0.1 from a peaked teacher: tails far below exp's range are stored exactly, and
    one step of reverse KD logs the loss a float64 reference gives, and saves a finite model."""
    make_teacher(tmp_path / "peaked", scale=150.0)
    result = run_cli("teacher", "--tokens-store", stage1 / "tokens", "--teacher", tmp_path / "peaked", "--out",
                     tmp_path / "top4", "--kind", "topk", "--top-k", "4", "--logprob-dtype", "float32", "--max-rows", "16",
                     "--temperature-grid", "1", "--temperature-grid", "0.25", "--temperature-grid", "0.1")
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "top4")
    arrays = store.read_rows(0, store.rows)
    assert np.isfinite(arrays["tail_logmass"]).all()
    args = kd_args(stage1, tmp_path / "run", 1, "--temperature", "0.1", "--tail", "tail", "--direction", "reverse",
                   "--micro-batch-size", "16")
    args[args.index(stage1 / "topk")] = tmp_path / "top4"
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][0]

    # float64 reference: the same rows (one batch holds all 16), the same initial student
    input_ids = torch.from_numpy(arrays["input_ids"].astype(np.int64))
    torch.manual_seed(0)
    student = load_model(stage1 / "student.json").double()
    teacher = load_model(tmp_path / "peaked").double()
    with torch.no_grad():
        z = teacher(input_ids=input_ids).logits[:, :-1].reshape(-1, 8192)
        s = student(input_ids=input_ids).logits[:, :-1].reshape(-1, 8192)
    targets = input_ids[:, 1:].reshape(-1)
    ids = torch.topk(z, 4, -1).indices
    p, q = torch.log_softmax(z / 0.1, -1), torch.log_softmax(s / 0.1, -1)
    p_buckets = torch.cat([p.gather(-1, ids), torch.logsumexp(p.scatter(-1, ids, float("-inf")), -1, keepdim=True)], -1)
    q_buckets = torch.cat([q.gather(-1, ids), torch.logsumexp(q.scatter(-1, ids, float("-inf")), -1, keepdim=True)], -1)
    assert (p_buckets[:, -1] < -87).any()  # the tails that used to underflow to −inf
    kd = (q_buckets.exp() * (q_buckets - p_buckets)).sum(-1).mean().item()
    ce = -torch.log_softmax(s, -1).gather(-1, targets[:, None]).mean().item()
    assert logged["kd"] == pytest.approx(kd, rel=1e-4)
    assert logged["loss"] == pytest.approx(0.5 * ce + 0.5 * 0.01 * kd, rel=1e-4)
    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_torchrun_gradient_checkpointing_logs_the_same_losses(stage1, tmp_path):
    """Under torchrun ×2 (gloo), DDP and FSDP alike: a run with --gradient-checkpointing (enabled before
    FSDP shards the layers) logs the losses of the same run without it, to 1e-6. Four 3-step launches:
    157 s on 2 cores under load 14 (make test-slow)."""
    steps = 3
    curves = {}
    for name, extra in (("ddp", ()), ("ddp-ckpt", ("--gradient-checkpointing",)), ("fsdp", ("--fsdp",)),
                        ("fsdp-ckpt", ("--fsdp", "--gradient-checkpointing"))):
        run = spawn(kd_args(stage1, tmp_path / name, steps, "--eval-every", "0", *extra), torchrun=True)
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
        curves[name] = curve(tmp_path / name)
        assert [s for s, _ in curves[name]] == list(range(1, steps + 1))
    for mode in ("ddp", "fsdp"):
        np.testing.assert_allclose([l for _, l in curves[f"{mode}-ckpt"]], [l for _, l in curves[mode]], rtol=1e-6)

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import TOKENIZER, kill_when, one_line_error, run_cli, spawn, write_corpus


@pytest.fixture(scope="module")
def stores(tmp_path_factory, heldout_docs):
    """Tokens stores of 60 held-out documents (``heldout``: the first 6 of them, 55 rows, which
    every run's final evaluation reads whole), made once for the module: tests only read them and write
    their runs to directories of their own names beside them."""
    root = tmp_path_factory.mktemp("student")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:60])
    few = write_corpus(root / "few.jsonl", heldout_docs[:6])
    for name, docs, seq in (("train", corpus, "64"), ("heldout", few, "64"), ("long", corpus, "256")):
        result = run_cli("prepare", "--input", docs, "--out", root / name, "--tokenizer", TOKENIZER,
                         "--seq-len", seq, "--rows-per-shard", "100")
        assert result.exit_code == 0, result.output
    return root


def train_args(stores, model, out, steps, *extra):
    return ["student", "--train-store", stores / "train", "--eval-store", stores / "heldout", "--model", model,
            "--out", out, "--max-steps", str(steps), "--micro-batch-size", "8", "--lr", "3e-3",
            "--warmup-steps", "2", "--eval-rows", "32", "--log-every", "1", *map(str, extra)]


def test_loss_goes_down_and_model_loads_with_plain_transformers(stores, tiny_model_config):
    out = stores / "run"
    result = run_cli(*train_args(stores, tiny_model_config, out, 30, "--eval-every", "10", "--grad-accum", "2"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    heldout = [r["heldout_loss"] for r in records if "heldout_loss" in r]
    assert len(train_losses) == 30 and len(heldout) == 3
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 0.5
    assert heldout[-1] < heldout[0]
    final = json.loads((out / "metrics.json").read_text())
    assert final["heldout_loss"] == pytest.approx(heldout[-1]) and final["tokens"] == 30 * 2 * 8 * 63
    assert json.loads((out / "config.json").read_text())["config"]["max_steps"] == 30

    model_dir = out / "model"
    assert (model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))  # plain transformers, no project code
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tokenizer) == 8192
    ids = torch.tensor([tokenizer.encode("In the beginning God created")])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 9.0  # below the uniform 9.01 nats: the weights are the trained ones


# The kill family's representative in make test is tests/faults/test_kill_student.py's fast case (the same
# CE run on a tokens store, killed mid-checkpoint and mid-final-save, resumed to the same weights and log):
# this one, three 60-step processes, runs in make test-faults and make test-slow.
@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_and_resume_auto_equals_uninterrupted(stores, tiny_model_config):
    steps = 60
    reference = spawn(train_args(stores, tiny_model_config, stores / "ref", steps, "--eval-every", "20"))
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output

    args = train_args(stores, tiny_model_config, stores / "killed", steps, "--eval-every", "20",
                      "--checkpoint-every", "5", "--resume", "auto")
    kill_when(spawn(args), (stores / "killed" / "checkpoints" / "step-00000005").exists)
    assert not (stores / "killed" / "model").exists()

    resumed = spawn(args)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    step = int(output.split("at step ")[1].split()[0])
    assert 5 <= step < steps

    want = load_file(stores / "ref" / "model" / "model.safetensors")
    got = load_file(stores / "killed" / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name

    def curve(run):
        lines = (stores / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss"), r.get("heldout_loss")) for r in map(json.loads, lines)]

    assert curve("killed") == curve("ref")  # the log too: no duplicated or missing steps


def test_bad_input(stores, tiny_model_config, tmp_path):
    # Sequence length above the model's maximum positions (tiny model: 128).
    msg = one_line_error(run_cli("student", "--train-store", stores / "long", "--model", tiny_model_config,
                                 "--out", tmp_path / "o1", "--max-steps", "1"))
    assert "sequence length 256" in msg and "maximum of 128" in msg
    # A store without index.
    (tmp_path / "half").mkdir()
    msg = one_line_error(run_cli("student", "--train-store", tmp_path / "half", "--out", tmp_path / "o2"))
    assert "no index.json" in msg
    # A model whose vocabulary is smaller than the tokenizer's.
    small = json.loads(tiny_model_config.read_text()) | {"vocab_size": 1000}
    (tmp_path / "small.json").write_text(json.dumps(small))
    msg = one_line_error(run_cli("student", "--train-store", stores / "train", "--model", tmp_path / "small.json",
                                 "--out", tmp_path / "o3"))
    assert "fewer than the tokenizer's 8192" in msg
    # Several config problems are reported together.
    msg = one_line_error(run_cli("student", "--train-store", stores / "train", "--out", tmp_path / "o4",
                                 "--lr", "-1", "--max-steps", "0"))
    assert "lr must be positive" in msg and "max_steps must be at least 1" in msg
    # An output directory that already holds a run.
    assert run_cli(*train_args(stores, tiny_model_config, tmp_path / "o5", 2)).exit_code == 0
    msg = one_line_error(run_cli(*train_args(stores, tiny_model_config, tmp_path / "o5", 2)))
    assert "--resume auto" in msg



def _poison_step(monkeypatch, at_call: int, where: str) -> list:
    """Make the ``at_call``-th training micro-batch non-finite: its loss (``where='loss'``) or, with
    a finite loss, its gradient (``where='grad'``). Returns a list that receives the model."""
    from stages import student

    original = student.DistillStep.forward
    calls, seen = [], []

    def forward(self, input_ids, batch, ce_only=False):
        ce_sum, kd_sum, count = original(self, input_ids, batch, ce_only)
        if not ce_only:
            calls.append(1)
            seen[:] = [self.model]
            if len(calls) == at_call and where == "loss":
                ce_sum = ce_sum * float("inf")
            elif len(calls) == at_call:
                self.model.get_output_embeddings().weight.register_hook(lambda g: g * float("nan"))
        return ce_sum, kd_sum, count

    monkeypatch.setattr(student.DistillStep, "forward", forward)
    return seen


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_step_stops_before_the_weights_change(stores, tiny_model_config, monkeypatch, tmp_path, where):
    """A non-finite loss or gradient norm at step 5: one line naming the step and the likely cause,
    exit 2; the weights are those of the step-4 checkpoint (the optimizer never ran), which equals
    an unpoisoned run's; no model and no metrics.json are written."""
    from pipeline.train import checkpoint

    reference = tmp_path / "reference"
    assert run_cli(*train_args(stores, tiny_model_config, reference, 8, "--checkpoint-every", "2",
                               "--keep-checkpoints", "4")).exit_code == 0
    out = stores / f"nan-{where}"
    model = _poison_step(monkeypatch, 5, where)
    msg = one_line_error(run_cli(*train_args(stores, tiny_model_config, out, 8, "--checkpoint-every", "2")))
    assert msg.startswith("error: step 5: non-finite loss or gradient")
    assert ("student's logits overflowed" if where == "loss" else "exploding gradient") in msg
    assert "step-00000004 is intact" in msg
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    saved, _ = checkpoint.load(out / "checkpoints" / "step-00000004")
    want, _ = checkpoint.load(reference / "checkpoints" / "step-00000004")
    live = model[0].state_dict()
    for name, value in want["model"].items():
        assert torch.equal(saved["model"][name], value), name  # the checkpoint is intact …
        assert torch.equal(live[name], value), name  # … and step 5 did not move the weights


def test_rerunning_a_finished_run_changes_nothing(stores, tiny_model_config):
    """``make student`` twice: the second run (--resume auto) finds the run finished and writes nothing."""
    from tests.conftest import tree_digest

    out = stores / "done"
    args = train_args(stores, tiny_model_config, out, 4, "--eval-every", "2", "--resume", "auto")
    assert run_cli(*args).exit_code == 0
    digest = tree_digest(out)
    result = run_cli(*args)
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert tree_digest(out) == digest
    heldout = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "heldout_loss" in r]
    assert [r["step"] for r in heldout] == [2, 4]


def test_a_crash_after_the_last_checkpoint_redoes_the_final_evaluation_once(stores, tiny_model_config):
    """The model was never saved (a crash in the finish): the rerun finishes, with one final line."""
    import shutil

    out = stores / "finish"
    args = train_args(stores, tiny_model_config, out, 4, "--eval-every", "2", "--resume", "auto")
    assert run_cli(*args).exit_code == 0
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()
    assert run_cli(*args).exit_code == 0
    heldout = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "heldout_loss" in r]
    assert [r["step"] for r in heldout] == [2, 4] and (out / "model" / "model.safetensors").is_file()


def test_a_granite_student_reports_the_loss_plain_transformers_gives(stores, tiny_model_config, tmp_path):
    """Granite divides its logits by ``logits_scaling``: the held-out loss stage two reports is the
    loss plain transformers computes for the saved model."""
    from pipeline.store.contract import open_store

    config = json.loads(tiny_model_config.read_text()) | {"model_type": "granite", "logits_scaling": 8.0}
    (tmp_path / "granite.json").write_text(json.dumps(config))
    out = tmp_path / "granite"
    assert run_cli(*train_args(stores, tmp_path / "granite.json", out, 10, "--lr", "1e-2")).exit_code == 0
    reported = json.loads((out / "metrics.json").read_text())["heldout_loss"]
    model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    assert type(model).__name__ == "GraniteForCausalLM"
    store = open_store(stores / "heldout")
    ids = torch.from_numpy(store.read_rows(0, store.rows)["input_ids"].astype("int64"))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean over every next-token target
    assert reported == pytest.approx(loss, rel=1e-4)


def test_threads_come_from_the_flag_else_slurm_and_are_recorded(stores, tiny_model_config, monkeypatch):
    """torch's intra-op threads: SLURM_CPUS_PER_TASK over OMP_NUM_THREADS, --threads over both; the
    number torch ran with, and where it came from, are in the run's resolved config."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    try:
        for out, extra, want in (("slurm", (), {"threads": 2, "threads_from": "SLURM_CPUS_PER_TASK"}),
                                 ("flag", ("--threads", "1"), {"threads": 1, "threads_from": "--threads"})):
            result = run_cli(*train_args(stores, tiny_model_config, stores / out, 1, *extra))
            assert result.exit_code == 0, result.output
            resolved = json.loads((stores / out / "config.json").read_text())
            assert {k: resolved[k] for k in want} == want
            assert torch.get_num_threads() == want["threads"]
    finally:
        torch.set_num_threads(before)


def fragments(row: torch.Tensor, eos: int) -> list[torch.Tensor]:
    """A packed row cut after each EOS: its documents (the first and last perhaps in part)."""
    ends = [int(i) + 1 for i in (row == eos).nonzero().flatten()]
    return [row[a:b] for a, b in zip([0] + ends, ends + [len(row)]) if b > a]


@pytest.fixture(scope="module")
def document_stores(tmp_path_factory, heldout_docs):
    """A Llama-style tokenizer (BOS before every document), a tiny student of its vocabulary, and
    tokens stores of short documents under --attention document (train, heldout) and causal."""
    from tests.conftest import bos_tokenizer, write_tiny_model_config

    root = tmp_path_factory.mktemp("documents")
    tokenizer_dir = bos_tokenizer(root / "tok", "llama")
    docs = [" ".join(d.split()[:n]) for d, n in zip(heldout_docs[:40], [5, 30, 12, 60, 8] * 8)]
    corpus = write_corpus(root / "c.jsonl", docs)
    for name, attention, docs_file in (("train", "document", corpus), ("causal", "causal", corpus),
                                       ("heldout", "document", write_corpus(root / "h.jsonl", docs[:12]))):
        result = run_cli("prepare", "--input", docs_file, "--out", root / name, "--tokenizer", tokenizer_dir,
                         "--seq-len", "64", "--attention", attention)
        assert result.exit_code == 0, result.output
    config = json.loads(write_tiny_model_config(root / "tiny.json").read_text())
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    (root / "tiny.json").write_text(json.dumps(config | {"vocab_size": vocab}))
    return root


def test_document_attention_loss_is_the_sum_of_per_document_losses(document_stores):
    """Stage two's step over packed rows under --attention document (CE and an online teacher's KL)
    equals the sum of the same step over each document alone; no position predicts a BOS."""
    from pipeline.models import OutputHead, load_model
    from pipeline.store.contract import open_store
    from pipeline.text.packing import RowRule
    from pipeline.train.teacher_signal import OnlineTeacher
    from stages.student import DistillStep, target_count

    store = open_store(document_stores / "train")
    rule = RowRule.of(store.params)
    assert rule.attention == "document" and rule.masks_bos
    rows = torch.from_numpy(store.read_rows(0, 3)["input_ids"].astype("int64"))
    torch.manual_seed(0)
    student = load_model(document_stores / "tiny.json").eval()
    torch.manual_seed(1)
    teacher = load_model(document_stores / "tiny.json").eval()

    def step(rows, row_rule):
        output = OutputHead(student, rows[:1])
        signal = OnlineTeacher(OutputHead(teacher, rows[:1]), student.config.vocab_size, 2.0, rule=row_rule)
        module = DistillStep(student, student.config.vocab_size, 0.5, 16, signal, output=output, rule=row_rule)
        with torch.no_grad():
            ce, kd, n = module(rows, {"input_ids": rows})
        assert n == target_count({"input_ids": rows}, row_rule)
        return torch.tensor([ce.item(), kd.item(), n], dtype=torch.float64)

    packed = step(rows, rule)
    alone = sum(step(doc[None], RowRule()) for row in rows for doc in fragments(row, rule.eos_token_id))
    assert sum(len(fragments(row, rule.eos_token_id)) for row in rows) > 6
    bos_targets = int((rows[:, 1:] == rule.bos_token_id).sum())
    assert bos_targets > 0 and packed[2] == rows.shape[0] * 63 - bos_targets == alone[2]
    # float32 sums of ~180 positions: within 1e-7 per position (CE ≈ 9 nats, KL ≈ 3e-3 a position)
    assert abs(packed[0] - alone[0]) < 2e-4 and abs(packed[1] - alone[1]) < 2e-5, (packed, alone)
    causal = step(rows, RowRule(rule.document_start, rule.row_start, "causal", rule.bos_token_id,
                                rule.eos_token_id))
    assert abs(causal[0] - alone[0]) > 0.1 and abs(causal[1] - alone[1]) > 1e-4  # across documents the sums differ: the test can fail


def test_document_attention_trains_and_scores_heldout_per_document(document_stores, tmp_path):
    """A run on a --attention document store: its held-out loss is the mean over the held-out rows'
    documents each scored alone by the saved model (plain transformers); a mismatched --attention or
    eval store is one line, before anything is written."""
    from pipeline.store.contract import open_store

    out = tmp_path / "run"
    args = ["student", "--train-store", document_stores / "train", "--model", document_stores / "tiny.json",
            "--micro-batch-size", "4", "--max-steps", "3", "--warmup-steps", "1", "--log-every", "1"]
    msg = one_line_error(run_cli(*args, "--eval-store", document_stores / "heldout", "--out", out,
                                 "--attention", "causal"))
    assert "--attention causal, but train store" in msg and "attention document" in msg
    msg = one_line_error(run_cli(*args, "--eval-store", document_stores / "causal", "--out", out))
    assert "eval store" in msg and "attention causal" in msg and "attention document" in msg
    assert not out.exists()
    result = run_cli(*args, "--eval-store", document_stores / "heldout", "--out", out)
    assert result.exit_code == 0, result.output
    reported = json.loads((out / "metrics.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    heldout = open_store(document_stores / "heldout")
    eos, bos = heldout.params["eos_token_id"], heldout.params["bos_token_id"]
    nats, count = 0.0, 0
    with torch.no_grad():
        for row in torch.from_numpy(heldout.read_rows(0, heldout.rows)["input_ids"].astype("int64")):
            for doc in fragments(row, eos):
                if len(doc) > 1:
                    logprobs = torch.log_softmax(model(input_ids=doc[None]).logits[0, :-1].double(), dim=-1)
                    nats -= float(logprobs.gather(-1, doc[1:, None]).sum())
                    count += len(doc) - 1
    assert reported["heldout_tokens"] == count == heldout.rows * 63 - int(
        (torch.from_numpy(heldout.read_rows(0, heldout.rows)["input_ids"].astype("int64"))[:, 1:] == bos).sum())
    assert reported["heldout_loss"] == pytest.approx(nats / count, rel=1e-5)


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_gradient_checkpointing_and_attn_implementation_keep_the_losses(stores, tiny_model_config):
    """``--gradient-checkpointing`` logs the losses of the run without it (1e-6) and records it;
    ``--attn-implementation eager`` those of the default sdpa (1e-5); flash-attention without its
    package or a GPU is one line before anything is written."""
    runs = {"plain": (), "checkpointed": ("--gradient-checkpointing",), "eager": ("--attn-implementation", "eager")}
    for name, extra in runs.items():
        result = run_cli(*train_args(stores, tiny_model_config, stores / f"features-{name}", 4, "--eval-every", "0",
                                     *extra))
        assert result.exit_code == 0, result.output
    plain, checkpointed, eager = (_losses(stores / f"features-{name}") for name in runs)
    assert len(plain) == 4
    np.testing.assert_allclose(checkpointed, plain, rtol=1e-6, atol=0)
    np.testing.assert_allclose(eager, plain, rtol=1e-5, atol=0)
    saved = {name: json.loads((stores / f"features-{name}" / "config.json").read_text()) for name in runs}
    assert saved["checkpointed"]["config"]["gradient_checkpointing"] is True
    assert [saved[name]["attn_implementation"] for name in runs] == ["sdpa", "sdpa", "eager"]
    msg = one_line_error(run_cli(*train_args(stores, tiny_model_config, stores / "features-flash", 2,
                                             "--attn-implementation", "flash_attention_2")))
    assert "flash_attention_2" in msg and not (stores / "features-flash").exists()


@pytest.mark.slow
def test_compile_gives_the_eager_losses_and_logs_its_time(stores, tiny_model_config):
    """``--compile`` (the student's layers through torch.compile, with gradient checkpointing on too):
    a 3-step run logs the losses of the uncompiled run (1e-5), and the first step's record splits its
    time into compile_s and the rest. Slow: inductor compiles C++ kernels for the CPU with gcc, about
    a minute on 2 loaded cores (no eval store here: evaluation would compile a no-grad graph too)."""
    for name, extra in (("eager", ()), ("compiled", ("--compile", "--gradient-checkpointing"))):
        result = run_cli("student", "--train-store", stores / "train", "--model", tiny_model_config, "--out",
                         stores / f"compile-{name}", "--max-steps", "3", "--micro-batch-size", "8", "--lr", "3e-3",
                         "--warmup-steps", "2", "--log-every", "1", *extra)
        assert result.exit_code == 0, result.output
        if name == "compiled":
            assert "step 1: " in result.output and "of which torch.compile" in result.output
    np.testing.assert_allclose(_losses(stores / "compile-compiled"), _losses(stores / "compile-eager"), rtol=1e-5)
    first = json.loads((stores / "compile-compiled" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and 0 < first["compile_s"] < first["step_s"]
    assert "compile_s" not in json.loads((stores / "compile-eager" / "metrics.jsonl").read_text().splitlines()[0])

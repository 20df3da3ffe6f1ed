"""Sampled-token and hybrid stores: stage one against a fresh teacher forward, idempotence across
array jobs, and stage two training from them."""

import json

import numpy as np
import pytest
import torch

from pipeline.models import load_model
from pipeline.store.contract import open_store
from pipeline.teacher.sampling import position_keys, sample_teacher, sampled_logprobs
from pipeline.teacher.topk import sparse_teacher
from tests.conftest import TOKENIZER, make_teacher, one_line_error, run_cli


@pytest.fixture(scope="module")
def root(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("sampled")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in heldout_docs[:30]))
    result = run_cli("prepare", "--input", root / "corpus.jsonl", "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--rows-per-shard", "64", "--chunk-rows", "8")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher", scale=8.0)  # a trained LM's spread: many distinct ids per position
    student = json.loads((root / "teacher" / "config.json").read_text())
    student = {k: v for k, v in student.items() if k not in ("architectures", "dtype", "transformers_version")}
    (root / "student.json").write_text(json.dumps(student | {"hidden_size": 16, "intermediate_size": 32,
                                                             "num_hidden_layers": 1}))
    for name, flags in (("sampled", ["--kind", "sampled", "--samples", "50", "--sample-logprobs"]),
                        ("hybrid", ["--kind", "topk", "--top-k", "8", "--tail-samples", "24"])):
        result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                         root / name, "--rows-per-shard", "16", "--chunk-rows", "8", "--max-rows", "48", *flags)
        assert result.exit_code == 0, result.output
    return root


def fresh_forward(root, rows: np.ndarray) -> torch.Tensor:
    teacher = load_model(root / "teacher").eval()
    with torch.no_grad():
        return teacher(input_ids=torch.from_numpy(rows.astype(np.int64))).logits.reshape(-1, 8192).float()


def test_sampled_store_equals_a_fresh_teacher_forward(root):
    """Ids and counts are the draws a fresh forward gives with the same (seed, row, position) keys;
    log-sum-exp, target log-prob and per-id log-probs are the teacher's."""
    store = open_store(root / "sampled")
    assert store.kind == "sampled" and store.params["samples"] == 50 and "top_k" not in store.params
    arrays = store.read_rows(16, 32)  # the second shard: keys are global row numbers
    z = fresh_forward(root, arrays["input_ids"])
    keys = position_keys(0, torch.arange(16, 32), 32).reshape(-1)
    want = sample_teacher(z, 50, 1.0, keys, kernel="torch")
    got_ids = torch.from_numpy(arrays["sample_ids"].astype(np.int64)).reshape(-1, 50)
    got_counts = torch.from_numpy(arrays["sample_counts"].astype(np.int64)).reshape(-1, 50)
    same = (got_ids == want["sample_ids"]).all(-1) & (got_counts == want["sample_counts"]).all(-1)
    assert same.float().mean() > 0.999  # draw for draw, but for a uniform within rounding of a boundary
    assert (got_counts.sum(-1) == 50).all()
    assert 5 < (got_counts > 0).sum(-1).float().mean() < 50
    lp = torch.from_numpy(arrays["sample_logprobs"].astype(np.float32)).reshape(-1, 50)
    want_lp = sampled_logprobs(z, got_ids, got_counts, 1.0)
    torch.testing.assert_close(lp[got_counts > 0], want_lp[got_counts > 0], rtol=0, atol=2e-2)  # float16
    summary = sparse_teacher(z, 1, 1.0, (1.0, 2.0), kernel="torch")
    torch.testing.assert_close(torch.from_numpy(arrays["logsumexp"]).reshape(-1, 2), summary["logsumexp"],
                               rtol=1e-5, atol=1e-4)


def test_hybrid_store_draws_only_from_the_tail(root):
    store = open_store(root / "hybrid")
    assert store.kind == "topk" and store.params["tail_samples"] == 24
    arrays = store.read_rows(0, store.rows)
    counts = arrays["tail_sample_counts"].astype(np.int64)
    drawn = counts > 0
    in_head = (arrays["tail_sample_ids"][..., :, None] == arrays["topk_ids"][..., None, :]).any(-1)
    assert not (in_head & drawn).any()
    assert (counts.sum(-1) == 24).all()  # every tail mass here is > 0


def test_array_jobs_draw_what_one_job_draws(root, tmp_path):
    """Two jobs (--num-shards 2) and a rerun write shards with the content hashes of one job."""
    flags = ["--tokens-store", root / "tokens", "--teacher", root / "teacher", "--rows-per-shard", "16",
             "--chunk-rows", "8", "--max-rows", "48", "--kind", "sampled", "--samples", "50", "--sample-logprobs"]
    for index in (1, 0):
        result = run_cli("teacher", *flags, "--out", tmp_path / "split", "--shard-index", str(index),
                         "--num-shards", "2")
        assert result.exit_code == 0, result.output
    assert run_cli("teacher", *flags, "--out", tmp_path / "split").exit_code == 0  # "nothing to do"
    hashes = lambda path: [s["sha256"] for s in open_store(path).shards]  # noqa: E731
    assert hashes(tmp_path / "split") == hashes(root / "sampled")
    assert open_store(tmp_path / "split").kind == "sampled"
    (tmp_path / "split" / "index.json").unlink()  # distill merge alone tells the kind from the arrays
    assert run_cli("merge", tmp_path / "split").exit_code == 0
    assert open_store(tmp_path / "split").kind == "sampled" and hashes(tmp_path / "split") == hashes(root / "sampled")


def train_args(root, store, out, *extra):
    return ["student", "--train-store", root / store, "--eval-store", root / "tokens", "--model", root / "student.json",
            "--out", out, "--max-steps", "24", "--micro-batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2",
            "--log-every", "1", "--eval-rows", "16", *map(str, extra)]


@pytest.mark.parametrize("store, extra", [("sampled", ()), ("sampled", ("--temperature", "2")),
                                          ("sampled", ("--temperature", "2", "--importance", "self-normalised")),
                                          ("hybrid", ()), ("hybrid", ("--temperature", "2", "--tail", "renorm"))])
def test_stage_two_trains_from_drawn_targets(root, tmp_path, store, extra):
    result = run_cli(*train_args(root, store, tmp_path / "run", "--alpha", "0.2", *extra))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in records if "kd" in r]
    assert len(kd) == 24 and all(np.isfinite(kd))
    assert sum(kd[12:]) < sum(kd[:12])  # 12 steps an epoch: the second pass over the rows fits the teacher better
    t2 = float(dict(zip(extra[::2], extra[1::2])).get("--temperature", 1)) ** 2
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert final["teacher_signal"] == ("StoredTopK" if "renorm" in extra else "StoredSampled")
    # what was used: a sampled store's draws have no tail treatment (--tail is not read); a hybrid's do
    assert final["store_kind"] == store
    assert final["tail"] == (None if store == "sampled" else "renorm" if "renorm" in extra else "tail")
    r = [r for r in records if "loss" in r][-1]
    assert r["loss"] == pytest.approx(0.2 * r["ce"] + 0.8 * t2 * r["kd"], rel=1e-5)


def test_drawn_targets_refuse_reverse_and_unweighted_temperatures(root, tmp_path):
    msg = one_line_error(run_cli(*train_args(root, "sampled", tmp_path / "a", "--direction", "reverse")))
    assert "--direction reverse needs the teacher's probability" in msg
    msg = one_line_error(run_cli(*train_args(root, "hybrid", tmp_path / "b", "--temperature", "2")))
    assert "differs from the temperature the store drew at (1)" in msg and "--sample-logprobs" in msg
    # CE only (α = 1) reads the store's tokens alone: its temperature is not a question then
    result = run_cli(*train_args(root, "hybrid", tmp_path / "ce", "--temperature", "2", "--alpha", "1"))
    assert result.exit_code == 0, result.output
    facts = json.loads((tmp_path / "ce" / "metrics.json").read_text())
    assert facts["alpha"] == 1.0 and facts["teacher_signal"] == "none"
    assert facts["store_kind"] is None and facts["tail"] is None  # CE alone reads no teacher
    msg = one_line_error(run_cli(*train_args(root, "sampled", tmp_path / "c", "--importance", "exact")))
    assert "importance must be one of unbiased, self-normalised" in msg

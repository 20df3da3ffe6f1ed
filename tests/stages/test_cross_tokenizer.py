"""distill student --cross-tokenizer: a student of another tokenizer trains from a teacher store,
logs the share of positions each term reached, resumes exactly, and bad inputs are one line."""

import json

import pytest
import torch

from pipeline.train.metrics import MACHINE_SCALARS
from tests.conftest import (ROOT, TOKENIZER, make_teacher, one_line_error, run_cli, spawn, spawn_ranks,
                            write_tiny_model_config)

SECOND = ROOT / "data" / "tokenizer-4096"


@pytest.fixture(scope="module")
def root(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("cross_stage")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in heldout_docs[:12]))
    for name, tokenizer in (("tokens", TOKENIZER), ("heldout-4096", SECOND)):
        result = run_cli("prepare", "--input", root / "corpus.jsonl", "--out", root / name, "--tokenizer", tokenizer,
                         "--seq-len", "32", "--rows-per-shard", "64", "--chunk-rows", "8")
        assert result.exit_code == 0, result.output
    make_teacher(root / "teacher", scale=8.0)
    result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                     root / "store", "--rows-per-shard", "16", "--chunk-rows", "8", "--max-rows", "32",
                     "--kind", "sampled", "--samples", "16")
    assert result.exit_code == 0, result.output
    result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                     root / "agreement", "--rows-per-shard", "16", "--chunk-rows", "8", "--max-rows", "8",
                     "--kind", "topk", "--top-k", "8")
    assert result.exit_code == 0, result.output
    config = write_tiny_model_config(root / "student-4096.json")
    config.write_text(json.dumps(json.loads(config.read_text()) | {"vocab_size": 4096}))
    return root


def student_args(root, out, *extra):
    return [str(a) for a in ("student", "--train-store", root / "store", "--eval-store", root / "heldout-4096",
                             "--tokenizer", SECOND, "--model", root / "student-4096.json", "--out", out,
                             "--micro-batch-size", "4", "--warmup-steps", "1", "--log-every", "1", "--eval-rows", "8",
                             *extra)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))


def test_a_student_of_another_tokenizer_trains_and_logs_each_terms_share(root, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*student_args(root, out, "--cross-tokenizer", "both", "--max-steps", "4"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(r["kd"] > 0 for r in steps)
    for r in steps:  # the next-token term reaches every chunk start (the default), 1:1 or not
        assert 0.3 < r["cross_exact_share"] < r["cross_start_share"] < r["cross_chunk_share"] < 1.0
        assert r["cross_dropped_chunks"] >= 4 and r["cross_unaligned_rows"] == 0  # at least each row's first
    facts = json.loads((out / "config.json").read_text())
    cross = facts["cross_tokenizer"]
    assert cross["mode"] == "both" and len(cross["vocab_map_sha256"]) == 64 and cross["teacher_vocab"] == 8192
    assert cross["unmapped"] == "first" and cross["positions"] == "starts" and cross["teacher_ids_mapped"] > 8000
    # --cross-longer group: every 4096-id student token is some 8192-id teacher token's first, so nothing folds
    assert cross["longer"] == "group" and cross["student_ids_grouped"] == 0
    assert [p.name.split("-")[-1] for p in (tmp_path / "cache").glob("vocab-map-*.npy")] == ["first.npy"]
    final = json.loads((out / "metrics.json").read_text())
    assert final["teacher_signal"] == "CrossTokenizer" and final["heldout_loss"] > 0
    assert final["store_kind"] == "sampled" and final["tail"] is None


def test_the_term_as_first_built_is_still_there_for_comparison(root, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*student_args(root, out, "--cross-tokenizer", "exact", "--max-steps", "2", "--unmapped", "bucket",
                                   "--cross-positions", "1to1", "--eval-every", "0"))
    assert result.exit_code == 0, result.output
    cross = json.loads((out / "config.json").read_text())["cross_tokenizer"]
    assert cross["unmapped"] == "bucket" and cross["positions"] == "1to1" and cross["teacher_ids_mapped"] < 8192
    (cached,) = (tmp_path / "cache").glob("vocab-map-*.npy")
    assert not cached.name.endswith(("-first.npy", "-prefix.npy"))  # the bucket map's name, as before


def test_resume_continues_to_the_same_weights(root, tmp_path):
    import shutil

    args = student_args(root, tmp_path / "run", "--cross-tokenizer", "both", "--max-steps", "4",
                        "--checkpoint-every", "2", "--keep-checkpoints", "3", "--eval-every", "0")
    assert (first := run_cli(*args)).exit_code == 0, first.output
    weights = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    # back to the step-2 checkpoint, as if the run had stopped there
    shutil.rmtree(tmp_path / "run" / "model")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")
    (tmp_path / "run" / "metrics.json").unlink()
    assert (resumed := run_cli(*args, "--resume", "auto")).exit_code == 0, resumed.output
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == weights
    again = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k not in MACHINE_SCALARS} for r in records]
    assert [{k: v for k, v in json.loads(r).items() if k not in MACHINE_SCALARS} for r in again] == strip


def test_reverse_direction_reaches_the_chunk_term(root, tmp_path):
    """--direction reverse with --cross-tokenizer chunk (a top-k store): the run trains, and what
    metrics.json records is the direction both terms used (pipeline/train/cross_signal.py)."""
    args = student_args(root, tmp_path / "run", "--cross-tokenizer", "chunk", "--direction", "reverse",
                        "--max-steps", "1", "--eval-every", "0")
    at = args.index("--train-store") + 1
    args[at] = str(root / "agreement")
    assert (result := run_cli(*args)).exit_code == 0, result.output
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (final["direction"], final["store_kind"], final["tail"]) == ("reverse", "topk", "tail")


def test_bad_inputs_are_one_line(root, tmp_path):
    from tests.pipeline.text.test_align import sentencepiece_tokenizer
    from tokenizers import normalizers

    lower = tmp_path / "lower"
    sentencepiece_tokenizer(normalizer=normalizers.Sequence([normalizers.Lowercase(),
                                                             normalizers.Replace(" ", "▁")])).save_pretrained(lower)
    args = student_args(root, tmp_path / "x", "--cross-tokenizer", "exact", "--max-steps", "1")
    at = args.index("--tokenizer") + 1
    bad = args[:at] + [str(lower)] + args[at + 1:]
    bad = [a for a in bad if a not in ("--eval-store", str(root / "heldout-4096"))]
    line = one_line_error(run_cli(*bad))
    assert "cannot be aligned by bytes" in line and "Lowercase" in line
    line = one_line_error(run_cli(*[a for a in args if a not in ("--cross-tokenizer", "exact")]))
    assert "made with another tokenizer" in line and "--cross-tokenizer" in line
    assert "exact, chunk or both" in one_line_error(run_cli(*args[:-4], "--cross-tokenizer", "bytes"))
    line = one_line_error(run_cli(*args, "--unmapped", "longest", "--cross-positions", "all",
                                  "--cross-uncovered", "all", "--chunk-scope", "multi", "--cross-longer", "split"))
    assert "unmapped must be first, bucket or prefix" in line and "cross_positions must be starts or 1to1" in line
    assert "cross_uncovered must be teacher, ce or none" in line and "chunk_scope must be all or 1to1" in line
    assert "cross_longer must be group or bucket" in line
    at = args.index("--train-store") + 1
    renorm = args[:at] + [str(root / "agreement")] + args[at + 1:] + ["--tail", "renorm"]
    assert "use --tail tail" in one_line_error(run_cli(*renorm))


def test_eval_gives_agreement_over_one_to_one_chunks_and_report_leads_with_bits_per_byte(root, tmp_path):
    out = tmp_path / "run"
    assert (trained := run_cli(*student_args(root, out, "--cross-tokenizer", "exact", "--max-steps", "2"))).exit_code == 0, \
        trained.output
    result = run_cli("eval", "--model", out / "model", "--out", tmp_path / "eval" / "cross.json", "--tasks",
                     "heldout,agreement", "--heldout", root / "corpus.jsonl", "--agreement", root / "agreement",
                     "--limit", "4")
    assert result.exit_code == 0, result.output
    cross = json.loads((tmp_path / "eval" / "cross.json").read_text())
    agreement = cross["tasks"]["agreement"]
    assert set(agreement) >= {"top1_1to1", "kl_1to1", "share_1to1", "tokens_1to1"} and "top1" not in agreement
    assert 0.3 < agreement["share_1to1"] < 1 and agreement["tokens_1to1"] > 50 and agreement["kl_1to1"] > 0
    assert cross["training"]["cross_tokenizer"] == "exact"
    # a run of the teacher's tokenizer beside it: the report leads with bits per byte and says why
    same = json.loads(json.dumps(cross))
    same.update(name="same-tokenizer", tokenizer_hash="0" * 64, training={"alpha": 1.0})
    same["tasks"]["heldout"]["bits_per_byte"] += 0.5
    (tmp_path / "eval" / "same.json").write_text(json.dumps(same))
    assert (report := run_cli("report", tmp_path / "eval", "--out", tmp_path / "report")).exit_code == 0, \
        report.output
    text = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert header.split(" | ")[4].startswith("bits/byte")
    assert "different tokenizers" in text and "across tokenizers, exact" in text
    assert "teacher top-1 agreement over 1:1 chunks" in header


def test_two_processes_train_like_one(root, tmp_path):
    """torchrun, 2 ranks of 2 rows against 1 process of 4: the same global batches (the loader's
    transform is per row), and each step's loss is the mean over the global batch's targets although
    the student's rows differ in length between the ranks (the target count is all-reduced), so the
    logged losses and the final weights agree to 1e-6."""
    from safetensors.torch import load_file

    def curve(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    common = ("--cross-tokenizer", "both", "--max-steps", "3", "--eval-every", "0", "--checkpoint-every", "0")
    one = spawn(student_args(root, tmp_path / "one", *common))  # one thread, as each rank has
    args = student_args(root, tmp_path / "two", *common)
    args[args.index("--micro-batch-size") + 1] = "2"
    two = spawn_ranks(args)
    for process in (one, two):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(a) == len(b) == 3 and a[0] != a[2]
    assert all(abs(x - y) < 1e-6 * x for x, y in zip(a, b)), (a, b)
    weights_one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for name, tensor in weights_one.items():
        # three AdamW steps from gradients all-reduced in another order than one process sums them
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=3e-6)


def test_a_teacher_tokenizer_that_loses_bytes_is_refused_in_one_line(root, tmp_path):
    """The store's own tokenizer is checked too: byte tokens registered as specials would drop the
    bytes they stand for from every teacher row."""
    from tests.pipeline.text.test_align import byte_fallback_as_specials

    tokenizer = byte_fallback_as_specials()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    make_teacher(tmp_path / "teacher", vocab=len(tokenizer))
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "Hello World " * 40}) + "\n")
    result = run_cli("prepare", "--input", tmp_path / "corpus.jsonl", "--out", tmp_path / "tokens", "--tokenizer",
                     tmp_path / "tokenizer", "--seq-len", "32", "--rows-per-shard", "64", "--chunk-rows", "8")
    assert result.exit_code == 0, result.output
    result = run_cli("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", tmp_path / "teacher", "--out",
                     tmp_path / "store", "--max-rows", "4", "--kind", "sampled", "--samples", "4")
    assert result.exit_code == 0, result.output
    args = student_args(root, tmp_path / "x", "--cross-tokenizer", "exact", "--max-steps", "1")
    args[args.index("--train-store") + 1] = str(tmp_path / "store")
    line = one_line_error(run_cli(*args))
    assert line.startswith("error: teacher tokenizer") and "special added tokens" in line

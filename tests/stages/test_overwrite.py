"""--overwrite still replaces what distill wrote: a store of other parameters, complete or unfinished,
a training run, generated records, a tokenizer. (What it refuses, someone else's files and planted
links, is in tests/test_bad_inputs.py.) And names read off disk (a generate progress index's part
names) stay inside OUT."""

import json
import os

import pytest
import torch

from pipeline.store.contract import open_store
from tests.conftest import TOKENIZER, make_teacher, one_line_error, run_cli, write_corpus, write_tiny_model_config

ROWS = ("--rows-per-shard", "8", "--chunk-rows", "4")


def ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("overwrite")
    write_corpus(root / "corpus.jsonl", heldout_docs[:12])
    ok(run_cli("prepare", "--input", root / "corpus.jsonl", "--out", root / "tokens", "--tokenizer", TOKENIZER,
               "--seq-len", "32", *ROWS))
    make_teacher(root / "teacher")
    write_tiny_model_config(root / "tiny.json")
    (root / "prompts.txt").write_text("Once upon a time\nThe quick brown fox\n")
    return root


def teacher(inputs, out, *flags):
    return run_cli("teacher", "--tokens-store", inputs / "tokens", "--teacher", inputs / "teacher", "--out", out,
                   "--max-rows", "16", *ROWS, *flags)


def names(path):
    return sorted(p.name for p in path.iterdir())


def test_teacher_overwrite_replaces_a_complete_store_of_other_parameters(inputs, tmp_path):
    out = tmp_path / "store"
    ok(teacher(inputs, out, "--samples", "4"))
    (out / ".shard-00007.zarr.tmp-4242").mkdir()  # what a killed writer leaves: ours too
    ok(teacher(inputs, out, "--samples", "8", "--overwrite"))
    store = open_store(out)
    assert store.params["samples"] == 8 and store.rows == 16
    assert names(out) == [".lock.part-00000-of-00001", "config.part-00000.json", "index.json",
                          "index.part-00000-of-00001.json", "metrics.jsonl", "shard-00000.zarr", "shard-00001.zarr"]


def test_teacher_overwrite_replaces_an_unfinished_store_of_other_parameters(inputs, tmp_path):
    out = tmp_path / "store"
    ok(teacher(inputs, out, "--samples", "4", "--num-shards", "2", "--shard-index", "0"))  # job 1 never ran
    assert not (out / "index.json").exists()
    line = one_line_error(teacher(inputs, out, "--samples", "8"))
    assert "already holds a store built differently" in line and "pass --overwrite" in line  # ours: may be replaced
    ok(teacher(inputs, out, "--samples", "8", "--overwrite"))
    assert open_store(out).params["samples"] == 8
    assert not (out / "index.part-00000-of-00002.json").exists()
    assert ".lock.part-00000-of-00002" not in names(out)  # the earlier job's lock went with its store


def test_prepare_overwrite_replaces_a_store_of_other_parameters(inputs, tmp_path):
    out = tmp_path / "tokens"
    ok(run_cli("prepare", "--input", inputs / "corpus.jsonl", "--out", out, "--tokenizer", TOKENIZER,
               "--seq-len", "32", *ROWS))
    ok(run_cli("prepare", "--input", inputs / "corpus.jsonl", "--out", out, "--tokenizer", TOKENIZER,
               "--seq-len", "16", *ROWS, "--overwrite"))
    assert open_store(out).params["seq_len"] == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left aside


def test_student_overwrite_starts_a_run_over_in_the_same_directory(inputs, tmp_path):
    out = tmp_path / "run"
    args = ("student", "--train-store", inputs / "tokens", "--model", inputs / "tiny.json", "--out", out,
            "--micro-batch-size", "2", "--device", "cpu", "--alpha", "1", "--checkpoint-every", "2")
    ok(run_cli(*args, "--max-steps", "2"))
    assert (out / "checkpoints" / "step-00000002").is_dir() and (out / "model").is_dir()
    (out / ".metrics.json.tmp-4242-abcd1234").write_text("{")  # a killed write: ours
    inode = os.stat(out).st_ino
    line = one_line_error(run_cli(*args, "--max-steps", "1"))
    assert "already holds a run" in line and "--overwrite" in line
    ok(run_cli(*args, "--max-steps", "1", "--overwrite"))
    assert os.stat(out).st_ino == inode  # OUT itself stays (it may be a mount point); what a run writes is new
    assert names(out) == ["checkpoints", "config.json", "metrics.json", "metrics.jsonl", "model"]
    assert names(out / "checkpoints") == ["step-00000001"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(inputs, out, *flags):
    return run_cli("generate", "--teacher", inputs / "teacher", "--tokenizer", TOKENIZER, "--prompts",
                   inputs / "prompts.txt", "--out", out, "--max-new-tokens", "3", "--records-per-part", "1",
                   "--device", "cpu", *flags)


def test_generate_overwrite_replaces_records_and_part_names_stay_in_out(inputs, tmp_path, one_thread):
    out = tmp_path / "gen"
    ok(generate(inputs, out, "--seed", "0"))
    ok(generate(inputs, out, "--seed", "1", "--overwrite"))
    assert json.loads((out / "summary.json").read_text())["params"]["settings"]["seed"] == 1
    assert names(out / "parts") == [".lock.part-00000-of-00001", "index.job-00000-of-00001.json",
                                    "job-00000-of-00001.part-00000", "job-00000-of-00001.part-00001"]
    # a progress index naming a part outside parts/ (damaged or hostile) is refused, never read or written
    canary = tmp_path / "canary.txt"
    canary.write_text("a user's file\n")
    index = out / "parts" / "index.job-00000-of-00001.json"
    body = json.loads(index.read_text())
    body["parts"][0]["name"] = "../../canary.txt"
    index.write_text(json.dumps(body))
    (out / "summary.json").unlink()  # so the rerun resumes and merges again
    line = one_line_error(generate(inputs, out, "--seed", "1"))
    assert "names part '../../canary.txt', which is not a plain file name" in line
    assert canary.read_text() == "a user's file\n"


def test_tokenizer_overwrite_replaces_a_tokenizer_distill_wrote(inputs, tmp_path):
    out = tmp_path / "tok"
    ok(run_cli("tokenizer", "--input", inputs / "corpus.jsonl", "--out", out, "--vocab-size", "300"))
    assert "already holds a tokenizer" in one_line_error(
        run_cli("tokenizer", "--input", inputs / "corpus.jsonl", "--out", out, "--vocab-size", "320"))
    ok(run_cli("tokenizer", "--input", inputs / "corpus.jsonl", "--out", out, "--vocab-size", "320", "--overwrite"))
    assert json.loads((out / "distill_config.json").read_text())["config"]["vocab_size"] == 320


def test_an_out_that_is_a_link_to_a_directory_is_written_where_it_points(tmp_path, small_corpus):
    """runs/tokens -> /scratch/tokens: the store is built beside the target and renamed into it; the
    link stays a link (it used to be replaced by the new directory, then a traceback)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    link = tmp_path / "tokens"
    link.symlink_to(scratch / "tokens", target_is_directory=True)
    for extra in ((), ("--seq-len", "32", "--overwrite")):  # first into the missing target, then replacing it
        result = run_cli("prepare", "--input", small_corpus, "--out", link, "--tokenizer", TOKENIZER,
                         *(extra or ("--seq-len", "64")))
        assert result.exit_code == 0, result.output
        assert link.is_symlink() and (scratch / "tokens" / "index.json").is_file()
    assert json.loads((scratch / "tokens" / "index.json").read_text())["params"]["seq_len"] == 32
    assert not [p for p in (*scratch.iterdir(), *tmp_path.iterdir()) if p.name.startswith(".")]  # no temp left

"""Stage two on another number of processes (pipeline/train/distributed.py): a global batch whose
accumulation follows the world size, data ordered by global step, and checkpoints (full under DDP,
DCP-sharded under FSDP) that resume on 1 process from 2 and on 2 from 1, on the same global batches:
every later step's loss equals the uninterrupted 2-process run's (CPU, gloo; the two ranks as
torchrun's workers, conftest.spawn_ranks)."""

import json

import pytest

from pipeline.train import checkpoint
from tests.conftest import TOKENIZER, one_line_error, run_cli, spawn_ranks, write_corpus, write_tiny_model_config

STEPS, AT = 4, 2  # resume at step 2 of 4
GLOBAL_ROWS, MICRO = 8, 2  # 2 processes: 2 micro-batches a step each; 1 process: 4


@pytest.fixture(scope="module")
def root(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("world")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:20])
    result = run_cli("prepare", "--input", corpus, "--out", root / "train", "--tokenizer", TOKENIZER, "--seq-len",
                     "32", "--rows-per-shard", "64", "--chunk-rows", "8")
    assert result.exit_code == 0, result.output
    write_tiny_model_config(root / "tiny.json")
    return root


def args(root, out, *extra):
    return ["student", "--train-store", root / "train", "--model", root / "tiny.json", "--out", out,
            "--max-steps", str(STEPS), "--micro-batch-size", str(MICRO), "--global-batch-rows", str(GLOBAL_ROWS),
            "--lr", "3e-3", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0",
            "--checkpoint-every", str(AT), "--keep-checkpoints", "3", *map(str, extra)]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def torchrun(*argv):
    """Two ranks as torchrun's workers (conftest.spawn_ranks)."""
    process = spawn_ranks(argv)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def one_process(*argv):
    result = run_cli(*argv)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_run_resumes_on_another_number_of_processes_on_the_same_global_batches(root, mode):
    flags = ("--fsdp",) if mode == "fsdp" else ()
    ckpt = f"checkpoints/step-{AT:08d}"
    ref, one = root / f"{mode}-two", root / f"{mode}-one"
    torchrun(*args(root, ref, *flags))  # the uninterrupted 2-process run
    one_process(*args(root, one, *flags))  # 1 process, 4 micro-batches a step: the same global batches
    want = losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1))
    # FSDP's checkpoints are DCP shards, one file per writing process beside the small state.pt
    names = sorted(p.name for p in (ref / ckpt).iterdir())
    if mode == "fsdp":
        assert names == sorted([".metadata", "__0_0.distcp", "__1_0.distcp", "config.json", "manifest.json",
                                "state.pt"])
        assert checkpoint.sharded(ref / ckpt) and checkpoint.problem(ref / ckpt) is None
        state, _ = checkpoint.load(ref / ckpt)
        assert "model" not in state and state["step"] == AT
        assert sorted(p.name for p in (one / ckpt).iterdir()) == sorted([".metadata", "__0_0.distcp", "config.json",
                                                                          "manifest.json", "state.pt"])
    else:
        assert names == ["config.json", "manifest.json", "state.pt"]
    config = json.loads((ref / "config.json").read_text())
    assert (config["world_size"], config["global_batch_rows"], config["grad_accum"]) == (2, GLOBAL_ROWS, 2)
    assert json.loads((one / "config.json").read_text())["grad_accum"] == 4

    # 2 → 1 and 1 → 2, from the step-2 checkpoint of the other world size
    two_to_one, one_to_two = root / f"{mode}-2to1", root / f"{mode}-1to2"
    output = one_process(*args(root, two_to_one, *flags, "--resume", ref / ckpt))
    assert f"at step {AT}" in output
    output = torchrun(*args(root, one_to_two, *flags, "--resume", one / ckpt))
    assert f"at step {AT}" in output
    for got in (losses(one), losses(two_to_one), losses(one_to_two)):
        later = [step for step in got if step > AT]
        assert later == [3, 4]
        for step in later:
            assert got[step] == pytest.approx(want[step], abs=1e-5, rel=0), (step, got, want)
    assert all(losses(one)[s] == pytest.approx(want[s], abs=1e-5, rel=0) for s in want)
    assert (two_to_one / "model" / "model.safetensors").is_file()
    assert (one_to_two / "model" / "model.safetensors").is_file()
    if mode == "fsdp":  # a flipped byte in one rank's shard: --resume auto passes over that checkpoint
        shard = ref / "checkpoints" / f"step-{STEPS:08d}" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
        said = []
        assert checkpoint.resolve(ref / "checkpoints", "auto", said.append) == ref / ckpt
        assert "__1_0.distcp does not match its sha256" in said[0]


def test_the_global_batch_must_divide_and_is_kept_on_resume(root, tmp_path):
    """One line, exit 2 and nothing written: a global batch that is no whole number of micro-batches
    (rows or tokens), both global options, and a resume whose global batch differs from the
    checkpoint's (the message says how to keep it)."""
    msg = one_line_error(run_cli(*args(root, tmp_path / "a", "--global-batch-rows", "6", "--micro-batch-size", "4")))
    assert "--global-batch-rows 6 does not divide into micro-batches of 4 rows on 1 process" in msg
    msg = one_line_error(run_cli(*args(root, tmp_path / "b", "--global-batch-rows", "0",
                                       "--global-batch-tokens", "100")))
    assert "--global-batch-tokens 100 is not a whole number of rows of 32 tokens" in msg
    msg = one_line_error(run_cli(*args(root, tmp_path / "c", "--global-batch-tokens", "256")))
    assert "not both" in msg
    msg = one_line_error(run_cli(*args(root, tmp_path / "d", "--global-batch-rows", "0", "--grad-accum", "2",
                                       "--global-batch-tokens", "256")))
    assert "drop --grad-accum" in msg
    assert "--fsdp-offload offloads FSDP's shards; add --fsdp" in one_line_error(
        run_cli(*args(root, tmp_path / "f", "--fsdp-offload")))
    assert not any((tmp_path / name).exists() for name in "abcdf")
    # 256 tokens = 8 rows of 32: the same run as --global-batch-rows 8
    out = tmp_path / "tokens"
    one_process(*args(root, out, "--global-batch-rows", "0", "--global-batch-tokens", "256", "--max-steps", "2"))
    assert json.loads((out / "config.json").read_text())["global_batch_rows"] == GLOBAL_ROWS
    # a checkpoint of 8-row steps, resumed with micro-batch × processes × accumulation = 2 × 1 × 2 = 4 rows
    msg = one_line_error(run_cli(*args(root, tmp_path / "e", "--global-batch-rows", "0", "--grad-accum", "2",
                                       "--resume", out / f"checkpoints/step-{AT:08d}")))
    assert "global batch (8 rows a step, now 4: pass --global-batch-rows 8" in msg
    assert not (tmp_path / "e").exists()

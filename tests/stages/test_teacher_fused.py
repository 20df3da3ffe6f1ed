"""Stage one's shard loop with the fused GPU kernels and the overlapped copies.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py) and the copy stream,
which needs CUDA, is replaced by a copy that records when it happens; on a GPU (bench/gpu_session.sh
runs this file there) the kernels are compiled and `test_the_copy_stream_changes_nothing` uses the
real copy stream.
What is checked: a shard written by the fused kernels (statuses read a batch late, flagged chunks
recomputed) equals the torch path's, draws bit for bit; batches are finished in order, each one
after the next one's copy was queued; a shard is handed to the writer after the next shard's first
batch was queued, and the store is the same without the overlap; bad logits are still a one-line
error.
"""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import DistillError
from pipeline.store.contract import open_store
from pipeline.teacher import fused_gpu
from stages import teacher as stage
from stages.teacher import TeacherConfig, stored_arrays, teacher_shard
from tests.conftest import ROOT, TOKENIZER, make_teacher, run_cli

VOCAB, SEQ_LEN = 200, 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LinearHead:
    """What teacher_shard needs of an OutputHead: hidden states of a batch, logits of a chunk of them."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(VOCAB, 16, generator=generator).to(DEVICE)
        self.weight = (torch.randn(VOCAB, 16, generator=generator) * 2).to(DEVICE)

    def hidden(self, batch):
        return self.embed[batch]

    def logits_buffer(self, positions, hidden):
        return None

    def logits(self, hidden, buffer):
        return hidden @ self.weight.T


class Progress:
    def update(self, n):
        pass


def shard(kernel: str, head: LinearHead | None = None, **options) -> dict[str, np.ndarray]:
    config = load_config(TeacherConfig, tokens_store="tokens", out="store", batch_size=1, position_chunk=3,
                         **options)
    arrays = stored_arrays(config, SEQ_LEN, {"input_ids": {"dtype": "uint16", "shape": [SEQ_LEN]}}, VOCAB)
    input_ids = np.random.default_rng(0).integers(0, VOCAB, (3, SEQ_LEN)).astype(np.uint16)
    out, finish = teacher_shard(head or LinearHead(), input_ids, 5, config, arrays, VOCAB, DEVICE, kernel, Progress())
    if finish is not None:  # the last batch, waited for when the next shard is queued
        finish()
    return out


def assert_same_store(fused: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert fused.keys() == reference.keys()
    for name, value in reference.items():
        if value.dtype.kind in "iu":  # ids and counts: exactly
            np.testing.assert_array_equal(fused[name], value, err_msg=name)
        else:
            np.testing.assert_allclose(fused[name], value, rtol=0, atol=1e-3 if value.dtype == np.float16 else 2e-5,
                                       err_msg=name)


@pytest.fixture
def overlapped(monkeypatch):
    """The copy stream replaced by a host copy; returns the log of copies and finishes, by first row."""
    events = []

    def to_host(self, stream):
        events.append(("copy", self.rows.start))
        self.values = {name: value.clone() for name, value in self.values.items()}
        self.status = None if self.status is None else self.status.clone()

    finish = stage._finish_batch

    def logged_finish(done, *args):
        events.append(("finish", done.rows.start))
        finish(done, *args)

    monkeypatch.setattr(stage, "_copy_stream", lambda config, device: "copy stream" if config.overlap else None)
    monkeypatch.setattr(stage._Batch, "to_host", to_host)
    monkeypatch.setattr(stage, "_finish_batch", logged_finish)
    return events


def test_overlapped_fused_shard_equals_the_torch_path(overlapped):
    options = dict(kind="topk", top_k=4, tail_samples=6, temperature_grid=(1.0, 2.0))
    fused = shard("triton", **options)
    assert overlapped == [("copy", 0), ("copy", 1), ("finish", 0), ("copy", 2), ("finish", 1), ("finish", 2)]
    reference = shard("torch", overlap=False, **options)
    assert_same_store(fused, reference)
    assert np.isnan(fused["target_logprob"][:, -1]).all()


def test_flagged_chunks_are_recomputed(overlapped, monkeypatch):
    """Every draw undecided on the device: each chunk is recomputed by the checked path, which redraws on the CPU."""
    monkeypatch.setattr(fused_gpu, "NEAR_ULPS_PER_ID", 2**52)
    redone = []
    reduce_chunk = stage._reduce_chunk

    def logged(*args, **kwargs):
        if kwargs.get("deferred") is False:  # the recomputation (teacher_shard passes it positionally)
            redone.append(args[3].shape[0])
        return reduce_chunk(*args, **kwargs)

    monkeypatch.setattr(stage, "_reduce_chunk", logged)
    fused = shard("triton", kind="sampled", samples=8)
    assert sum(redone) == 3 * SEQ_LEN  # every position, chunk by chunk
    assert_same_store(fused, shard("torch", kind="sampled", samples=8, overlap=False))


def test_bad_logits_are_an_error_when_their_batch_is_finished(overlapped):
    head = LinearHead()
    head.weight[7] = float("nan")
    with pytest.raises(DistillError, match="NaN or infinity at 3 of 3 positions"):
        shard("triton", head, kind="sampled", samples=8)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: the real copy stream (bench/gpu_session.sh runs it)")
@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_the_copy_stream_changes_nothing(kernel):
    options = dict(kind="topk", top_k=4, tail_samples=6)
    assert_same_store(shard(kernel, overlap=True, **options), shard(kernel, overlap=False, **options))


def test_a_shard_is_handed_over_once_the_next_one_is_queued(tmp_path, monkeypatch, overlapped):
    """Across shards (``distill teacher``, torch kernel, the copy stream replaced as above): shard j is
    written only after shard j+1's first batch was queued, and the store is the one written without
    the overlap, row for row."""
    with gzip.open(ROOT / "data" / "corpus" / "heldout.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(6), f)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert run_cli("prepare", "--input", tmp_path / "corpus.jsonl", "--out", tmp_path / "tokens", "--tokenizer",
                   TOKENIZER, "--seq-len", "16", "--rows-per-shard", "40").exit_code == 0
    make_teacher(tmp_path / "teacher")
    write_shard = stage.store_lib.write_shard

    def logged_write(out, name, *args, **kwargs):
        overlapped.append(("write", name))
        return write_shard(out, name, *args, **kwargs)

    monkeypatch.setattr(stage.store_lib, "write_shard", logged_write)
    stores = {}
    for name, flag in (("overlap", "--overlap"), ("plain", "--no-overlap")):
        result = run_cli("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", tmp_path / "teacher",
                         "--out", tmp_path / name, "--kind", "sampled", "--samples", "8", "--rows-per-shard", "6",
                         "--batch-size", "4", "--max-rows", "18", "--kernel", "torch", flag)
        assert result.exit_code == 0, result.output
        stores[name] = open_store(Path(tmp_path / name))
        if name == "overlap":
            log = list(overlapped)
    assert not any(event[0] == "copy" for event in overlapped[len(log):])  # --no-overlap: no copy stream
    writes = [i for i, event in enumerate(log) if event[0] == "write"]
    assert len(writes) == 3
    for j, at in enumerate(writes[:-1]):  # shard j waits for shard j+1's first batch (rows 0..3 of it)
        assert sum(event == ("copy", 0) for event in log[:at]) >= j + 2, log
    a, b = (stores[name].read_rows(0, 18) for name in ("overlap", "plain"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.store import open_store
from tests.conftest import TOKENIZER, one_line_error, run_cli, tree_digest


def prepare(corpus, out, *extra):
    result = run_cli("prepare", "--input", corpus, "--out", out, "--tokenizer", TOKENIZER,
                     "--seq-len", "64", "--rows-per-shard", "50", "--chunk-rows", "16", *extra)
    return result


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_rows_are_the_packed_token_stream(tmp_path, small_corpus, heldout_docs, backend):
    result = prepare(small_corpus, tmp_path / "s", "--backend", backend)
    assert result.exit_code == 0, result.output
    s = open_store(tmp_path / "s", kind="tokens")
    assert len(s.shards) > 1 and s.rows == sum(e["rows"] for e in s.shards)
    rows = np.concatenate([s.read_shard(i, verify=True)["input_ids"] for i in range(len(s.shards))])
    assert rows.dtype == np.uint16 and rows.shape[1] == 64
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    stream = []
    for text in heldout_docs[:60]:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    # Rows overlap by one token (stride 63): together they are the stream, minus the dropped tail.
    expected = [stream[r * 63: r * 63 + 64] for r in range(len(rows))]
    np.testing.assert_array_equal(rows, np.array(expected))
    assert s.index["tokens"] == len(stream)
    assert s.index["dropped_tokens"] == len(stream) - (len(rows) * 63 + 1)
    assert 0 <= s.index["dropped_tokens"] < 63
    assert s.params["tokenizer_hash"] and s.params["corpus_fingerprint"]
    assert (tmp_path / "s" / "config.json").is_file()


def test_deterministic_byte_identical(tmp_path, small_corpus):
    digests = []
    for _ in range(2):  # the same command twice (the resolved config names the output path)
        assert prepare(small_corpus, tmp_path / "s", "--overwrite").exit_code == 0
        digests.append(tree_digest(tmp_path / "s"))
        (tmp_path / "s").rename(tmp_path / f"s-{len(digests)}")
    assert digests[0] == digests[1]


def test_rerun_same_params_is_a_noop_and_different_params_refused(tmp_path, small_corpus):
    assert prepare(small_corpus, tmp_path / "s").exit_code == 0
    before = tree_digest(tmp_path / "s")
    again = prepare(small_corpus, tmp_path / "s")
    assert again.exit_code == 0 and "nothing to do" in again.output
    refused = run_cli("prepare", "--input", small_corpus, "--out", tmp_path / "s", "--tokenizer", TOKENIZER,
                      "--seq-len", "32")
    assert refused.exit_code == 2
    assert "seq_len: 64 vs 32" in refused.output and "--overwrite" in refused.output
    assert tree_digest(tmp_path / "s") == before  # nothing already written is damaged
    replaced = run_cli("prepare", "--input", small_corpus, "--out", tmp_path / "s", "--tokenizer", TOKENIZER,
                       "--seq-len", "32", "--overwrite")
    assert replaced.exit_code == 0
    assert open_store(tmp_path / "s").params["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bad_input_errors(tmp_path, small_corpus):
    msg = one_line_error(prepare(tmp_path / "missing.jsonl", tmp_path / "s"))
    assert "does not exist" in msg
    (tmp_path / "empty.jsonl").write_text("")
    msg = one_line_error(prepare(tmp_path / "empty.jsonl", tmp_path / "s"))
    assert "fewer than one row" in msg
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    msg = one_line_error(prepare(tmp_path / "latin1.txt", tmp_path / "s"))
    assert "latin1.txt: not UTF-8 at byte 3" in msg and "--skip-bad-utf8" in msg
    msg = one_line_error(run_cli("prepare", "--input", small_corpus, "--out", tmp_path / "s",
                                 "--tokenizer", tmp_path / "no-tokenizer"))
    assert "tokenizer path" in msg and "does not exist" in msg
    assert not (tmp_path / "s").exists()


def test_skip_bad_utf8_counts(tmp_path, small_corpus):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(small_corpus.read_bytes() + b'{"text": "caf\xe9"}\n')
    result = prepare(mixed, tmp_path / "s", "--skip-bad-utf8")
    assert result.exit_code == 0 and "skipped 1 non-UTF-8 lines" in result.output
    assert json.loads((tmp_path / "s" / "index.json").read_text())["skipped_lines"] == 1

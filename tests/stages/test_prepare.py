import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.store.contract import open_store
from pipeline.text.packing import RowRule
from tests.conftest import (ROOT, TOKENIZER, bos_tokenizer, chat_tokenizer, one_line_error, run_cli, tree_digest,
                            write_corpus)


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
    assert list(s.index["arrays"]) == ["input_ids"] and "format" not in s.params  # a text store: no mask
    assert s.index["format_version"] == 4
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


def flags_stream(store) -> tuple[np.ndarray, np.ndarray]:
    """(the token stream the rows were cut from, the loss mask moved onto the target tokens)."""
    data = store.read_rows(0, store.rows)
    ids, mask = data["input_ids"], data["loss_mask"]
    stream = np.concatenate([ids[0], ids[1:, 1:].reshape(-1)])
    # position t of row r predicts stream token r·(L−1) + t + 1: shift the mask onto its target
    on_target = np.concatenate([[0], mask[:, :-1].reshape(-1)])
    return stream, on_target


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_prompt_response_mask_is_one_exactly_on_response_targets(tmp_path, heldout_docs, backend):
    """Every response token (and the EOS closing it) is a target exactly once with mask 1, every prompt
    or padding token with mask 0; an example that fits in a row lies in one row, a longer one crosses
    rows with its mask intact; nothing is dropped."""
    words = " ".join(heldout_docs[:5]).split()
    records = [{"q": " ".join(words[i:i + 3 + i % 11]) + "\nA:", "a": " " + " ".join(words[i + 20:i + 22 + i % 5])}
               for i in range(0, 600, 25)]
    records.insert(5, {"q": "Summarise:", "a": " " + " ".join(words[:90])})  # longer than a row of 64
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = prepare(tmp_path / "task.jsonl", tmp_path / "s", "--backend", backend, "--format", "prompt-response",
                     "--prompt-field", "q", "--response-field", "a")
    assert result.exit_code == 0, result.output
    s = open_store(tmp_path / "s", kind="tokens")
    assert s.params["format"] == "prompt-response" and s.index["arrays"]["loss_mask"]["dtype"] == "uint8"
    assert s.index["format_version"] == 4  # a distill that predates the mask (or the digest) refuses it
    data = s.read_rows(0, s.rows)
    assert (data["loss_mask"][:, -1] == 0).all()  # its target is the next row's first token
    stream, on_target = flags_stream(s)

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    eos, at = tokenizer.eos_token_id, 0
    expected = np.zeros(len(stream), dtype=np.uint8)
    crossed = padded = 0
    for r in records:
        prompt = tokenizer.encode(r["q"], add_special_tokens=False)
        response = tokenizer.encode(r["a"], add_special_tokens=False) + [eos]
        padded += stream[at] == eos
        while stream[at] == eos:  # padding before an example that starts a new row
            at += 1
        assert stream[at:at + len(prompt) + len(response)].tolist() == prompt + response
        start, end = at + len(prompt), at + len(prompt) + len(response)
        expected[start:end] = 1
        first_row, last_row = at // 63, (end - 2) // 63  # rows holding the example's targets
        if len(prompt) + len(response) <= 64:
            assert first_row == last_row, r  # whole, with its prompt in context
        crossed += first_row != last_row
        at = end
    assert crossed >= 1 and padded >= 1  # the long example; examples moved to a fresh row
    assert (stream[at:] == eos).all() and 0 < len(stream) - at < 64  # the last row padded, not dropped
    np.testing.assert_array_equal(on_target, expected)
    assert s.index["loss_tokens"] == expected.sum() == data["loss_mask"].sum()
    assert s.index["documents"] == len(records) and s.index["dropped_tokens"] == 0
    assert s.index["padding_tokens"] == (stream == eos).sum() - len(records)


def test_chat_records_train_on_assistant_turns(tmp_path):
    tokenizer_dir = chat_tokenizer(tmp_path / "tok")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"},
                    {"role": "assistant", "content": "Madrid."}, {"role": "user", "content": "Thanks."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"turns": conversation}) + "\n")
    result = run_cli("prepare", "--input", tmp_path / "chat.jsonl", "--out", tmp_path / "s", "--tokenizer",
                     tokenizer_dir, "--seq-len", "64", "--format", "chat", "--messages-field", "turns")
    assert result.exit_code == 0, result.output
    s = open_store(tmp_path / "s")
    assert s.params["format"] == "chat" and len(s.params["chat_template_sha256"]) == 64
    stream, on_target = flags_stream(s)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert tokenizer.decode(stream[:len(tokenizer.encode(rendered))]) == rendered  # the template's rendering
    # the assistant contents and their end-of-turn marker; the headers, other turns and the final EOS
    # (the conversation ends with the user) are not
    assert tokenizer.decode(stream[on_target == 1]) == "Paris.<|endoftext|>\nMadrid.<|endoftext|>\n"


def write_ids_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


IDS_RECORDS = [  # EOS (0) closes the first and third completions, as generate writes a record that ended at EOS
    {"id": 0, "prompt_ids": [0, 5, 6], "completion_ids": [7, 8, 0], "completion_logprobs": [-0.5, -1.25, -2.0]},
    {"id": 1, "prompt_ids": [0, 9], "completion_ids": [10, 11, 12, 13, 14], "completion_logprobs": [-1, -2, -3, -4, -5]},
    {"id": 2, "prompt_ids": [0], "completion_ids": [15, 0], "completion_logprobs": [-0.125, -0.25]},
]


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_ids_records_are_stored_as_given_one_per_row(tmp_path, backend):
    """--format ids: each record from position 0 of its own row, EOS after it, nothing re-tokenized and no
    EOS appended; loss_mask 1 where token t+1 is a completion token; behaviour_logprob that token's
    log-prob there and 0 elsewhere."""
    records = write_ids_records(tmp_path / "gen.jsonl", IDS_RECORDS)
    result = run_cli("prepare", "--input", records, "--out", tmp_path / "s", "--tokenizer", TOKENIZER, "--format", "ids",
                     "--seq-len", "8", "--rows-per-shard", "2", "--chunk-rows", "1", "--backend", backend)
    assert result.exit_code == 0, result.output
    s = open_store(tmp_path / "s", kind="tokens")
    data = s.read_rows(0, s.rows)
    assert s.rows == 3 and len(s.shards) == 2 and s.params["format"] == "ids"
    assert s.index["arrays"]["behaviour_logprob"] == {"dtype": "float32", "shape": [8]}
    np.testing.assert_array_equal(data["input_ids"], [[0, 5, 6, 7, 8, 0, 0, 0],
                                                      [0, 9, 10, 11, 12, 13, 14, 0],
                                                      [0, 15, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(data["loss_mask"], [[0, 0, 1, 1, 1, 0, 0, 0],
                                                      [0, 1, 1, 1, 1, 1, 0, 0],
                                                      [1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(data["behaviour_logprob"], [[0, 0, -0.5, -1.25, -2.0, 0, 0, 0],
                                                              [0, -1, -2, -3, -4, -5, 0, 0],
                                                              [-0.125, -0.25, 0, 0, 0, 0, 0, 0]])
    assert data["behaviour_logprob"].dtype == np.float32
    assert s.index["loss_tokens"] == 10 and s.index["padding_tokens"] == 3 * 8 - 6 - 7 - 3
    assert s.index["target_tokens"] == 3 * 7 and s.index["documents"] == 3
    # without logprobs: the same rows and mask, no behaviour_logprob
    plain = [{k: v for k, v in r.items() if k != "completion_logprobs"} for r in IDS_RECORDS]
    result = run_cli("prepare", "--input", write_ids_records(tmp_path / "plain.jsonl", plain), "--out", tmp_path / "p",
                     "--tokenizer", TOKENIZER, "--format", "ids", "--seq-len", "8")
    assert result.exit_code == 0, result.output
    p = open_store(tmp_path / "p")
    assert set(p.index["arrays"]) == {"input_ids", "loss_mask"}
    np.testing.assert_array_equal(p.read_rows(0, 3)["loss_mask"], data["loss_mask"])


@pytest.mark.parametrize("records,seq_len,message", [
    ([IDS_RECORDS[1]], 6, "gen.jsonl:1 (record 1): 7 tokens (2 prompt + 5 completion) do not fit a row of 6"),
    ([{"prompt_ids": [0, 8192], "completion_ids": [1]}], 8, "'prompt_ids' holds id 8192, outside the tokenizer's "
                                                             "8192 ids"),
    ([IDS_RECORDS[0], {"prompt_ids": [0], "completion_ids": [1]}], 8, "gen.jsonl:2: has no 'completion_logprobs' "
                                                                      "and "),
    ([{"prompt_ids": [0], "completion_ids": [1, 2], "completion_logprobs": [-1.0]}], 8, "not a list of finite numbers"),
    ([{"prompt_ids": [0], "completion_ids": []}], 8, "'completion_ids' is empty"),
    ([{"prompt": "x", "completion_ids": [1]}], 8, "no 'prompt_ids' field"),
])
def test_bad_ids_records_are_one_line_and_write_nothing(tmp_path, records, seq_len, message):
    path = write_ids_records(tmp_path / "gen.jsonl", records)
    line = one_line_error(run_cli("prepare", "--input", path, "--out", tmp_path / "s", "--tokenizer", TOKENIZER,
                                  "--format", "ids", "--seq-len", str(seq_len)))
    assert message in line, line
    assert not (tmp_path / "s").exists()
    if "do not fit" in message:
        assert "raise --seq-len (or lower --max-new-tokens at generate)" in line


def rows_of(path) -> np.ndarray:
    store = open_store(path)
    return np.concatenate([store.read_shard(i)["input_ids"] for i in range(len(store.shards))])


def test_every_input_kind_gives_the_rows_of_the_same_documents(tmp_path, heldout_docs):
    """The same documents as JSON lines, zstd JSON lines, Parquet, an Arrow stream, a datasets directory
    and standard input: the same rows, token for token (the format changes how text is read, nothing else)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from stages.cli import app

    docs = heldout_docs[:60]
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    with pa.output_stream(str(tmp_path / "a.jsonl.zst"), compression="zstd") as f:
        f.write(lines)
    table = pa.table({"text": docs, "n": list(range(len(docs)))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=16)
    saved = tmp_path / "saved"
    saved.mkdir()
    with ipc.new_stream(str(saved / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    reference = None
    for source in ("a.jsonl", "a.jsonl.zst", "a.parquet", "saved"):
        assert prepare(tmp_path / source, tmp_path / f"s-{source}").exit_code == 0, source
        rows = rows_of(tmp_path / f"s-{source}")
        reference = rows if reference is None else reference
        assert np.array_equal(rows, reference), source
    piped = CliRunner().invoke(app, ["prepare", "--input", "-", "--out", str(tmp_path / "s-stdin"), "--tokenizer",
                                     str(TOKENIZER), "--seq-len", "64", "--rows-per-shard", "50", "--chunk-rows", "16"],
                               input=lines)
    assert piped.exit_code == 0, piped.output
    assert np.array_equal(rows_of(tmp_path / "s-stdin"), reference)
    # the same text is the same fingerprint: a rerun from a file finds the store built from the pipe done
    again = prepare(tmp_path / "a.jsonl", tmp_path / "s-stdin")
    assert again.exit_code == 0 and "nothing to do" in again.output
    saved_config = json.loads((tmp_path / "s-stdin" / "config.json").read_text())
    assert saved_config["config"]["inputs"] == ["-"]
    assert [p.name for p in tmp_path.iterdir() if "stdin-" in p.name] == []  # the spooled copy is gone


def test_unknown_files_stop_or_are_listed_and_damaged_files_write_nothing(tmp_path, small_corpus):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(small_corpus.read_bytes())
    (corpus / "README.md").write_text("# a dataset card")
    (corpus / "b.csv").write_text("x,y")
    error = one_line_error(prepare(corpus, tmp_path / "s"))
    assert "README.md (and 1 more) is of no kind distill reads" in error and "--skip-unknown" in error
    assert not (tmp_path / "s").exists()
    assert prepare(corpus, tmp_path / "s", "--skip-unknown").exit_code == 0
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["skipped_inputs"] == [str(corpus / "README.md"), str(corpus / "b.csv")]
    assert np.array_equal(rows_of(tmp_path / "s"), (prepare(small_corpus, tmp_path / "plain"), rows_of(tmp_path / "plain"))[1])

    import pyarrow as pa

    data = b"".join(json.dumps({"text": "word " * 50}).encode() + b"\n" for _ in range(2000))
    with pa.output_stream(str(tmp_path / "whole.jsonl.zst"), compression="zstd") as f:
        f.write(data)
    cut = (tmp_path / "whole.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(cut[:len(cut) // 2])
    error = one_line_error(prepare(tmp_path / "cut.jsonl.zst", tmp_path / "t"))
    assert "cut.jsonl.zst: cannot read" in error
    assert not (tmp_path / "t").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".t.")]


# index_sha256 of `distill prepare --input data/corpus/heldout.jsonl.gz --seq-len 64 --rows-per-shard 512`
# (the default tokenizer, run from the repository root) at 4eff65f, before --document-start existed
BASE_HELDOUT_INDEX = "ee70e8f8e4bdde68332e24284da32c88900f274aa0f212a1b04e2fb383b05350"


def test_default_store_of_the_shipped_tokenizer_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the index records the tokenizer path as given
    result = run_cli("prepare", "--input", "data/corpus/heldout.jsonl.gz", "--seq-len", "64", "--rows-per-shard",
                     "512", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert "document_start" not in index["params"] and "attention" not in index["params"]
    assert index["index_sha256"] == BASE_HELDOUT_INDEX  # same params, shard hashes and facts: same rows


def test_bos_tokenizer_starts_documents_and_mid_document_rows_with_bos(tmp_path, heldout_docs):
    tokenizer_dir = bos_tokenizer(tmp_path / "tok", "llama")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    corpus = write_corpus(tmp_path / "c.jsonl", heldout_docs[:8])
    result = prepare(corpus, tmp_path / "s", "--tokenizer", tokenizer_dir, "--seq-len", "64", "--attention", "document")
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "s")
    assert {k: store.params[k] for k in ("document_start", "row_start", "attention", "bos_token_id")} == {
        "document_start": "bos", "row_start": "bos", "attention": "document", "bos_token_id": bos}
    ids = store.read_rows(0, store.rows)["input_ids"].astype(np.int64)
    stream = np.concatenate([[bos] + tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
                             for d in heldout_docs[:8]])
    np.testing.assert_array_equal(ids[:, 1:].reshape(-1), stream[1:store.rows * 63 + 1])  # targets as before
    firsts = stream[np.arange(store.rows) * 63]
    after_eos = np.r_[True, stream[np.arange(1, store.rows) * 63 - 1] == eos]
    np.testing.assert_array_equal(ids[:, 0], np.where(after_eos | (firsts == eos), firsts, bos))
    assert store.index["documents"] == 8 and (ids == bos).sum() > 8
    # --document-start none: the rows of today, whose index says nothing (read as none, none, causal)
    result = prepare(corpus, tmp_path / "n", "--tokenizer", tokenizer_dir, "--seq-len", "64", "--document-start",
                     "none")
    assert result.exit_code == 0, result.output
    plain = open_store(tmp_path / "n")
    assert "document_start" not in plain.params and RowRule.of(plain.params) == RowRule()
    rows = plain.read_rows(0, plain.rows)["input_ids"]
    np.testing.assert_array_equal(np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])[:200],
                                  np.concatenate([tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
                                                  for d in heldout_docs[:8]])[:200])


@pytest.mark.parametrize("args,message", [
    (("--document-start", "bos"), "--document-start bos: the tokenizer's BOS is its EOS"),
    (("--row-start", "bos"), "--row-start bos: the tokenizer's BOS is its EOS"),
    (("--attention", "documents"), "attention must be one of causal, document"),
    (("--document-start", "yes"), "document_start must be one of bos, none"),
    (("--attention", "document", "--format", "prompt-response"), "--attention document is for --format text"),
])
def test_bad_start_options_are_one_line_and_write_nothing(tmp_path, small_corpus, args, message):
    msg = one_line_error(prepare(small_corpus, tmp_path / "s", *args))
    assert message in msg, msg
    assert list(tmp_path.iterdir()) == [small_corpus]

"""`distill prepare --shard-index i --num-shards n` + `distill merge`, and `--workers N`: the store is
the one a single process writes, row for row and byte for byte (issue #31, part 2)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.store.contract import open_store
from pipeline.text import units as units_lib
from tests.conftest import TOKENIZER, one_line_error, reseal_index, run_cli, tree_digest


def write_zst(path, data: bytes):
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write(data)


def jsonl(docs) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in docs)


@pytest.fixture
def mixed_corpus(tmp_path, heldout_docs, monkeypatch):
    """.jsonl.zst + .parquet (row groups of 7) + .txt + .jsonl, with units of 16 KiB, so that the
    large files are cut into several units (line ranges of the plain and the zstd file, runs of row
    groups) and three tasks each own some."""
    monkeypatch.setattr(units_lib, "UNIT_BYTES", 16 << 10)
    root = tmp_path / "corpus"
    root.mkdir()
    write_zst(root / "a.jsonl.zst", jsonl(heldout_docs[:40]).encode())
    pq.write_table(pa.table({"text": heldout_docs[40:90], "id": list(range(50))}), root / "b.parquet", row_group_size=7)
    (root / "c.txt").write_text(heldout_docs[90])
    (root / "d.jsonl").write_text(jsonl(heldout_docs[91:130]))
    return root


def prepare(corpus, out, *extra):
    return run_cli("prepare", "--input", corpus, "--out", out, "--tokenizer", TOKENIZER, "--seq-len", "64",
                   "--rows-per-shard", "50", "--chunk-rows", "16", "--batch-documents", "8", *extra)


def store_digest(root) -> str:
    """Every file but the resolved config (which names the run): shards and index.json."""
    return tree_digest_without(root, "config.json")


def tree_digest_without(root, name):
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != name):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_units_split_the_mixed_corpus(mixed_corpus):
    from pipeline.text.corpus import find_inputs

    files = find_inputs([str(mixed_corpus)]).files
    plan = units_lib.plan_units(files)
    by_file = {f: [u for u in plan if u.file == f] for f in range(len(files))}
    assert [len(by_file[f]) > 1 for f in range(4)] == [True, True, False, True]  # zst, parquet, txt, jsonl
    assert {u.part for u in plan} == {"lines", "row_groups", "file"}
    owned = [units_lib.owned_units(plan, i, 3) for i in range(3)]
    assert sorted(u.number for o in owned for u in o) == list(range(len(plan)))  # each unit exactly once
    assert all(owned)  # every task has a share
    assert [u.number for u in owned[0]] == list(range(len(owned[0])))  # contiguous runs


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_three_tasks_and_merge_equal_one_process(tmp_path, mixed_corpus, backend):
    one = prepare(mixed_corpus, tmp_path / "one", "--backend", backend)
    assert one.exit_code == 0, one.output
    out = tmp_path / "tasks"
    for i in (2, 0, 1):  # any order
        task = prepare(mixed_corpus, out, "--backend", backend, "--shard-index", str(i), "--num-shards", "3")
        assert task.exit_code == 0, task.output
        assert f"task {i} of 3 tokenized" in task.output and "distill merge" in task.output
        assert not (out / "index.json").exists()  # tasks only tokenize: no store yet
    pieces = sorted(p.name for p in out.glob("piece-*.arrow"))
    assert len(pieces) == len(units_lib.plan_units(sorted(p for p in mixed_corpus.iterdir())))
    merged = run_cli("merge", out)
    assert merged.exit_code == 0, merged.output
    # identical row for row, and byte for byte: shards, their hashes and every fact of index.json
    assert store_digest(out) == store_digest(tmp_path / "one")
    assert (out / "index.json").read_bytes() == (tmp_path / "one" / "index.json").read_bytes()
    a, b = open_store(out, kind="tokens"), open_store(tmp_path / "one", kind="tokens")
    assert a.rows == b.rows > 100 and a.index["documents"] == 130
    assert not list(out.glob("piece-*")) and not list(out.glob("index.part-*"))  # the pieces went with the swap
    config = json.loads((out / "config.json").read_text())
    assert config["merged_from_tasks"] == 3 and config["config"]["num_shards"] == 1
    # the merged store is the single-process one: a rerun of either command finds it done
    again = prepare(mixed_corpus, out, "--backend", backend)
    assert again.exit_code == 0 and "nothing to do" in again.output
    task_again = prepare(mixed_corpus, out, "--backend", backend, "--shard-index", "1", "--num-shards", "3")
    assert task_again.exit_code == 0 and "nothing to do" in task_again.output


def test_workers_equal_one_process(tmp_path, mixed_corpus):
    assert prepare(mixed_corpus, tmp_path / "one").exit_code == 0
    two = prepare(mixed_corpus, tmp_path / "two", "--workers", "2")
    assert two.exit_code == 0, two.output
    assert store_digest(tmp_path / "two") == store_digest(tmp_path / "one")
    # and workers inside tasks
    for i in range(2):
        task = prepare(mixed_corpus, tmp_path / "tw", "--workers", "2", "--shard-index", str(i), "--num-shards", "2")
        assert task.exit_code == 0, task.output
    assert run_cli("merge", tmp_path / "tw").exit_code == 0
    assert store_digest(tmp_path / "tw") == store_digest(tmp_path / "one")


def test_chat_with_workers_equals_one_process(tmp_path, heldout_docs):
    records = [{"prompt": heldout_docs[i][:200], "response": heldout_docs[i + 1][:300]} for i in range(0, 60, 2)]
    corpus = tmp_path / "pr.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert prepare(corpus, tmp_path / "one", "--format", "prompt-response").exit_code == 0
    assert prepare(corpus, tmp_path / "two", "--format", "prompt-response", "--workers", "2").exit_code == 0
    assert store_digest(tmp_path / "two") == store_digest(tmp_path / "one")


def test_rerun_task_keeps_its_pieces_and_merge_names_what_is_missing(tmp_path, mixed_corpus):
    out = tmp_path / "s"
    assert prepare(mixed_corpus, out, "--shard-index", "0", "--num-shards", "3").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("piece-*")}
    again = prepare(mixed_corpus, out, "--shard-index", "0", "--num-shards", "3")
    assert again.exit_code == 0 and "(0 now" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("piece-*")} == before  # nothing redone
    error = one_line_error(run_cli("merge", out))
    assert "units are not tokenized yet" in error and "2 of 3 tasks have not started" in error
    assert "task(s) 1, 2 of 3" in error and not (out / "index.json").exists()
    assert prepare(mixed_corpus, out, "--shard-index", "1", "--num-shards", "3").exit_code == 0
    assert "task(s) 2 of 3" in one_line_error(run_cli("merge", out))
    # a damaged piece is named at merge, never cut into rows
    assert prepare(mixed_corpus, out, "--shard-index", "2", "--num-shards", "3").exit_code == 0
    piece = sorted(out.glob("piece-*.arrow"))[3]
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 1
    piece.write_bytes(bytes(data))
    error = one_line_error(run_cli("merge", out))
    assert piece.name in error and "damaged" in error and not (out / "index.json").exists()


def test_array_problems_are_refused(tmp_path, mixed_corpus):
    out = tmp_path / "s"
    bad = one_line_error(prepare(mixed_corpus, out, "--shard-index", "3", "--num-shards", "3"))
    assert "shard_index must be in [0, 3)" in bad and not out.exists()
    bad = one_line_error(prepare(mixed_corpus, out, "--shard-index", "0", "--num-shards", "2", "--overwrite"))
    assert "--overwrite with --num-shards > 1" in bad and not out.exists()
    bad = one_line_error(prepare(mixed_corpus, out, "--num-shards", "2", "--format", "chat"))
    assert "--num-shards is for --format text" in bad and not out.exists()
    assert "workers must be positive" in one_line_error(prepare(mixed_corpus, out, "--workers", "0"))

    assert prepare(mixed_corpus, out, "--shard-index", "0", "--num-shards", "3").exit_code == 0
    state = tree_digest(out)
    # a task run with other params than the ones before it: refused before it writes anything
    other = one_line_error(run_cli("prepare", "--input", mixed_corpus, "--out", out, "--tokenizer", TOKENIZER,
                                   "--seq-len", "32", "--rows-per-shard", "50", "--chunk-rows", "16",
                                   "--shard-index", "1", "--num-shards", "3"))
    assert "seq_len: 64 vs 32" in other
    # a task that counts the tasks differently: its share would overlap the others'
    count = one_line_error(prepare(mixed_corpus, out, "--shard-index", "1", "--num-shards", "2"))
    assert "being prepared by 3 tasks" in count and "task 1 of 2" in count
    assert tree_digest(out) == state
    # tasks that disagreed anyway (started at the same moment): merge refuses, naming the odd one
    for i in (1, 2):
        assert prepare(mixed_corpus, out, "--shard-index", str(i), "--num-shards", "3").exit_code == 0
    part = out / "index.part-00002-of-00003.json"
    reseal_index(part, lambda body: body["params"].update(seq_len=32))
    error = one_line_error(run_cli("merge", out))
    assert part.name in error and "seq_len: 64 vs 32" in error and not (out / "index.json").exists()


def test_standard_input_is_not_shared(tmp_path):
    error = one_line_error(run_cli("prepare", "--input", "-", "--out", tmp_path / "s", "--tokenizer", TOKENIZER,
                                   "--num-shards", "2"))
    assert "standard input" in error and not (tmp_path / "s").exists()


def test_bad_input_in_a_task_is_one_line_and_leaves_nothing(tmp_path, mixed_corpus):
    with open(mixed_corpus / "d.jsonl", "a") as f:
        f.write("{not json\n")
    error = one_line_error(prepare(mixed_corpus, tmp_path / "s", "--shard-index", "2", "--num-shards", "3"))
    assert "d.jsonl:40: not valid JSON" in error  # the line number of a line in a later byte range
    assert not (tmp_path / "s").exists()


def test_tasks_and_merge_keep_the_row_rule_of_a_bos_tokenizer(tmp_path, mixed_corpus):
    """Documents that start with BOS and rows that start mid-document with BOS: merge replays the
    documents through the same rule as one process, so the rows are the same."""
    from tests.conftest import bos_tokenizer

    tokenizer = bos_tokenizer(tmp_path / "llama-tok")
    extra = ("--tokenizer", str(tokenizer), "--row-start", "bos", "--attention", "document")
    one = prepare(mixed_corpus, tmp_path / "one", *extra)
    assert one.exit_code == 0, one.output
    for i in range(2):
        task = prepare(mixed_corpus, tmp_path / "tasks", *extra, "--shard-index", str(i), "--num-shards", "2")
        assert task.exit_code == 0, task.output
    assert run_cli("merge", tmp_path / "tasks").exit_code == 0
    assert (tmp_path / "tasks" / "index.json").read_bytes() == (tmp_path / "one" / "index.json").read_bytes()
    params = json.loads((tmp_path / "one" / "index.json").read_text())["params"]
    assert params["document_start"] == "bos" and params["row_start"] == "bos" and params["attention"] == "document"

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DistillError
from pipeline.text.corpus import DocumentReader, corpus_fingerprint, expand_inputs, find_inputs
from tests.conftest import ROOT


def read(paths, **kw):
    reader = DocumentReader(expand_inputs([str(p) for p in paths]), **kw)
    return list(reader), reader.stats


def test_jsonl_txt_and_gzip(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("first para\nstill first\n\nsecond para\n")
    docs, stats = read([tmp_path / "a.jsonl", tmp_path / "b.txt.gz"])
    assert docs == ["one", "two", "first para\nstill first\n\nsecond para\n"]
    docs, _ = read([tmp_path / "b.txt.gz"], txt_documents="paragraph")
    assert docs == ["first para\nstill first", "second para"]
    assert stats.documents == 3


def test_a_directory_accounts_for_every_file(tmp_path):
    """Sorted, every file read or named: a file of no accepted kind stops the read (one line naming it
    and how many more), or, asked, is left out and listed; never a silent skip."""
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "notes.md").write_text("not a corpus")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.csv").write_text("x,y")
    with pytest.raises(DistillError, match=r"corpus file .*notes.md \(and 1 more\) is of no kind distill reads "
                                           r".*--skip-unknown"):
        read([tmp_path])
    inputs = find_inputs([str(tmp_path)], skip_unknown=True)
    assert [p.name for p in inputs.files] == ["a.txt", "b.txt"]
    assert [p.name for p in inputs.skipped] == ["notes.md", "c.csv"]
    assert list(DocumentReader(inputs.files)) == ["A", "B"]


def test_custom_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    assert read([tmp_path / "a.jsonl"], text_field="body")[0] == ["x"]
    with pytest.raises(DistillError, match=r"a.jsonl:1: no 'text' field"):
        read([tmp_path / "a.jsonl"])


def test_bad_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nsecond \xff\xfe line\nthird\n")
    with pytest.raises(DistillError, match=r"bad.txt: not UTF-8 at byte 17 \(line 2\)"):
        read([path])
    docs, stats = read([path], skip_bad_utf8=True)
    assert docs == ["good line\nthird\n"] and stats.skipped_lines == 1


def test_bad_json_and_missing_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DistillError, match=r"a.jsonl:2: not valid JSON"):
        read([tmp_path / "a.jsonl"])
    with pytest.raises(DistillError, match="does not exist"):
        expand_inputs([str(tmp_path / "nope.txt")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DistillError, match="is of no kind distill reads"):
        expand_inputs([str(tmp_path / "x.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="holds no"):
        expand_inputs([str(tmp_path / "empty")])


def test_fingerprint_follows_content_and_options(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("hello")
    first = corpus_fingerprint([a], text_field="text")
    assert first == corpus_fingerprint([a], text_field="text")
    assert first != corpus_fingerprint([a], text_field="body")
    a.write_text("hello!")
    assert first != corpus_fingerprint([a], text_field="text")


DOCS = [f"document {i}: " + "word " * (i % 7) + "end" for i in range(50)]


def write_zst(path, data: bytes):
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write(data)
    return path


def jsonl_bytes(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def test_parquet_arrow_and_datasets_directories(tmp_path):
    """Each columnar kind reads the text column, in order, nulls and empty strings left out."""
    table = pa.table({"id": list(range(50)), "text": DOCS})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)  # several row groups
    with ipc.new_file(str(tmp_path / "b.arrow"), table.schema) as w:  # IPC file format
        w.write_table(table, max_chunksize=9)
    with ipc.new_stream(str(tmp_path / "c.arrow"), table.schema) as w:  # IPC stream (what datasets writes)
        w.write_table(table, max_chunksize=11)
    import pyarrow.feather as feather

    feather.write_feather(table, tmp_path / "d.feather")
    for name in ("a.parquet", "b.arrow", "c.arrow", "d.feather"):
        assert read([tmp_path / name])[0] == DOCS, name
    with_nulls = pa.table({"text": ["x", None, "", "y"]})
    pq.write_table(with_nulls, tmp_path / "nulls.parquet")
    assert read([tmp_path / "nulls.parquet"])[0] == ["x", "y"]

    dataset = tmp_path / "saved" / "train"  # the layout datasets.save_to_disk writes
    dataset.mkdir(parents=True)
    for k, part in enumerate((table.slice(0, 20), table.slice(20))):
        with ipc.new_stream(str(dataset / f"data-0000{k}-of-00002.arrow"), table.schema) as w:
            w.write_table(part)
    (dataset / "dataset_info.json").write_text("{}")
    (dataset / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"},
                                                                    {"filename": "data-00001-of-00002.arrow"}]}))
    assert read([dataset])[0] == DOCS  # its metadata JSON is not read as a corpus
    (dataset.parent / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DistillError, match=r"DatasetDict with splits train, test; pass one split's directory"):
        read([dataset.parent])
    (dataset / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../../a.parquet"}]}))
    with pytest.raises(DistillError, match="not a file in"):
        read([dataset])


def test_compressed_lines(tmp_path):
    write_zst(tmp_path / "a.jsonl.zst", jsonl_bytes(DOCS[:20]))
    write_zst(tmp_path / "b.txt.zst", "first\n\nsecond\n".encode())
    with gzip.open(tmp_path / "c.json.gz", "wb") as f:  # Dolma: JSON lines under .json.gz
        f.write(jsonl_bytes(DOCS[20:]))
    docs, _ = read([tmp_path / "a.jsonl.zst", tmp_path / "b.txt.zst", tmp_path / "c.json.gz"], txt_documents="paragraph")
    assert docs == DOCS[:20] + ["first", "second"] + DOCS[20:]
    big = "x" * (3 << 20)  # a line longer than a decompressed block
    write_zst(tmp_path / "long.jsonl.zst", jsonl_bytes([big, "after"]))
    assert read([tmp_path / "long.jsonl.zst"])[0] == [big, "after"]


def test_a_missing_or_wrong_column_names_the_columns(tmp_path):
    pq.write_table(pa.table({"Text": DOCS, "url": ["u"] * 50}), tmp_path / "a.parquet")
    with pytest.raises(DistillError, match=r"a.parquet has no column 'text' \(did you mean 'Text'\?\); its columns "
                                           r"are Text, url: pass --text-field"):
        read([tmp_path / "a.parquet"])
    pq.write_table(pa.table({"text": list(range(5))}), tmp_path / "n.parquet")
    with pytest.raises(DistillError, match=r"column 'text' holds int64, not text"):
        read([tmp_path / "n.parquet"])


@pytest.mark.parametrize("name", ["a.jsonl.zst", "a.jsonl.gz", "a.parquet", "a.arrow"])
def test_a_damaged_file_names_the_file(tmp_path, name):
    whole = tmp_path / ("whole-" + name)
    if name.endswith(".zst"):
        write_zst(whole, jsonl_bytes(DOCS * 40))
    elif name.endswith(".gz"):
        whole.write_bytes(gzip.compress(jsonl_bytes(DOCS * 40)))
    elif name.endswith(".parquet"):
        pq.write_table(pa.table({"text": DOCS}), whole)
    else:
        with ipc.new_file(str(whole), pa.schema([("text", pa.string())])) as w:
            w.write_table(pa.table({"text": DOCS}))
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[:len(data) - 20])  # truncated: the end of a stream, or a footer, is gone
    with pytest.raises(DistillError, match=f"{name}: cannot read") as e:
        read([tmp_path / name])
    assert "\n" not in str(e.value)


BOUNDED = """
import json, resource, sys
from pathlib import Path
from pipeline.text.corpus import DocumentReader
path = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
chars = sum(len(d) for d in DocumentReader([path]))
print(json.dumps({"chars": chars, "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


@pytest.mark.parametrize("kind", ["parquet", "jsonl.zst"])
def test_memory_stays_bounded_whatever_the_file_size(tmp_path, kind):
    """~160 MB of text (random words: a few MB compressed) read document by document: the reader's
    peak RSS grows by far less than the file's text, a row group or a block at a time."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"])
    docs = [" ".join(words[rng.integers(0, 10, 200)]) for _ in range(1000)]  # ~1.2 MB of distinct documents
    path = tmp_path / f"big.{kind}"
    copies = 140
    if kind == "parquet":
        with pq.ParquetWriter(str(path), pa.schema([("text", pa.string())])) as w:
            for _ in range(copies):
                w.write_table(pa.table({"text": docs}), row_group_size=1000)
    else:
        with pa.output_stream(str(path), compression="zstd") as f:
            block = jsonl_bytes(docs)
            for _ in range(copies):
                f.write(block)
    text_mb = copies * sum(len(d) for d in docs) / 1e6
    done = subprocess.run([sys.executable, "-c", BOUNDED, str(path)], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    result = json.loads(done.stdout)
    assert result["chars"] == copies * sum(len(d) for d in docs)
    assert text_mb > 150 and result["grew_kb"] / 1e3 < 40, (text_mb, result)

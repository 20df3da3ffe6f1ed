import gzip

import pytest

from pipeline.errors import DistillError
from pipeline.text.corpus import DocumentReader, corpus_fingerprint, expand_inputs


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


def test_directory_is_sorted_accepted_files(tmp_path):
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "notes.md").write_text("ignored")
    docs, _ = read([tmp_path])
    assert docs == ["A", "B"]


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
    with pytest.raises(DistillError, match="is not one of"):
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

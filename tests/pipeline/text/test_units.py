"""Units of a corpus (pipeline/text/units.py) and reading a range of lines (corpus.read_lines)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DistillError
from pipeline.text import units as units_lib
from pipeline.text.corpus import DocumentReader, read_lines

DOCS = [f"document {i} " + "word " * (i % 17) for i in range(300)]


def jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.zst", "a.jsonl.gz"])
def test_line_ranges_partition_the_lines(tmp_path, name):
    path = tmp_path / name
    data = jsonl(DOCS)
    if name.endswith(".zst"):
        with pa.output_stream(str(path), compression="zstd") as f:
            f.write(data)
    elif name.endswith(".gz"):
        import gzip

        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    whole = list(read_lines(path))
    for cut in (1, 7, 333, 1000):  # boundaries inside lines and on them
        ranges = [(lo, lo + cut) for lo in range(0, len(data), cut)]
        pieces = [line for lo, hi in ranges for line in read_lines(path, start=lo, stop=hi)]
        assert pieces == whole  # every line once, with its line number and offset
    assert list(read_lines(path, start=len(data) + 5)) == []


def test_line_numbers_in_a_later_range(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl(DOCS[:50]) + b"{oops\n" + jsonl(DOCS[50:60]))
    start = len(jsonl(DOCS[:45]))
    reader = DocumentReader([path])
    with pytest.raises(DistillError, match=r"a.jsonl:51: not valid JSON"):
        list(reader._jsonl(path, start, None))


def test_units_read_what_the_reader_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(units_lib, "UNIT_BYTES", 300)
    (tmp_path / "a.jsonl").write_bytes(jsonl(DOCS[:100]))
    with pa.output_stream(str(tmp_path / "b.jsonl.zst"), compression="zstd") as f:
        f.write(jsonl(DOCS[100:200]))
    pq.write_table(pa.table({"text": DOCS[200:290] + [None, ""]}), tmp_path / "c.parquet", row_group_size=9)
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    files = sorted(tmp_path.iterdir())
    plan = units_lib.plan_units(files)
    assert sum(u.file == 0 for u in plan) > 3 and sum(u.file == 1 for u in plan) > 3 and sum(u.file == 2 for u in plan) > 3
    whole = DocumentReader(files)
    expected = list(whole)
    got, documents = [], 0
    for unit in plan:
        reader = DocumentReader([files[unit.file]])
        got += list(units_lib.unit_documents(unit, files[unit.file], reader))
        documents += reader.stats.documents
    assert got == expected and documents == whole.stats.documents == 292 - 2 + 1
    assert units_lib.plan_digest(plan) == units_lib.plan_digest(units_lib.plan_units(files))
    monkeypatch.setattr(units_lib, "UNIT_BYTES", 400)
    assert units_lib.plan_digest(plan) != units_lib.plan_digest(units_lib.plan_units(files))


def test_owned_units_balance_by_bytes():
    plan = [units_lib.Unit(k, 0, "lines", weight=w) for k, w in enumerate([100, 1, 1, 1, 100, 1, 1, 1])]
    owned = [[u.number for u in units_lib.owned_units(plan, i, 2)] for i in range(2)]
    assert owned == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # more tasks than units: a task's share of the bytes may hold no unit start (it owns none)
    owners = {u.number: i for i in range(20) for u in units_lib.owned_units(plan, i, 20)}
    assert owners == {0: 0, 1: 9, 2: 9, 3: 9, 4: 10, 5: 19, 6: 19, 7: 19}


def test_parquet_memory_stays_at_a_row_group(tmp_path):
    """Peak RSS independent of the file's size: the reader holds one row group's text column, not the
    file's (pyarrow's iter_batches kept nearly all of it in its pool)."""
    from pipeline.text.corpus import column_texts

    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"{i} " + "x" * 10_000 for i in range(3000)]}), path, row_group_size=100)
    peak, count = 0, 0
    for count, text in enumerate(column_texts(path, "parquet", "text"), start=1):
        if count % 50 == 0:
            peak = max(peak, pa.total_allocated_bytes())
    assert count == 3000  # 30 MB of text in 30 row groups of 1 MB
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB held while reading"

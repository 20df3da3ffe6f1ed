"""The parts of a corpus that ``distill prepare --shard-index i --num-shards n`` hands out to its tasks.

The documents of a corpus, in reading order (:class:`pipeline.text.corpus.DocumentReader`), are cut
into **units**, each a run of consecutive documents of one file, found from the files' sizes and
Parquet footers alone (nothing is read to plan), so that every task computes the same list:

- a JSON-lines file (plain, gzip or zstd): byte ranges of :data:`UNIT_BYTES`, a unit holding the
  lines that *start* in its range (a line straddling a boundary belongs to the range it starts in).
  A compressed file's ranges are in decompressed bytes, as many as its size times
  :data:`COMPRESSION_RATIO` fills, the last one open-ended (a file that decompresses to less ends in
  empty units, one that decompresses to more has a longer last unit). A plain file is seeked; a
  compressed one is decompressed from its start by the task that reads a later range, the lines
  before it split off but never decoded (decompression runs ~100× faster than tokenization);
- a Parquet file: runs of whole row groups of about :data:`UNIT_BYTES` (uncompressed, as the footer
  says);
- anything else (text files, whose documents may span any range, and Arrow IPC files and streams):
  the whole file.

Task ``i`` of ``n`` owns a contiguous run of units, balanced by their estimated bytes
(:func:`owned_units`). The units' tokens are stream pieces that ``distill merge`` replays in unit
order, so the store does not depend on the units (or on ``n``); the plan's digest in every partial
index makes tasks that planned differently (another distill, other files) a refusal at merge.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import DistillError
from pipeline.text.corpus import DocumentReader, column_texts, input_kind

UNIT_BYTES = 64 << 20  # bytes of text (decompressed, uncompressed in Parquet) per unit
COMPRESSION_RATIO = 4  # decompressed bytes assumed per compressed byte of a .gz / .zst file


@dataclass(frozen=True)
class Unit:
    """Documents ``[start, stop)`` of file ``file`` (an index into the inputs): byte offsets for
    ``lines``, row groups for ``row_groups``, nothing for ``file`` (the whole file). ``stop`` None:
    to the end. ``weight``: estimated bytes, to balance the tasks."""

    number: int
    file: int
    part: str  # "file" | "lines" | "row_groups"
    start: int = 0
    stop: int | None = None
    weight: int = 0


def plan_units(files: list[Path]) -> list[Unit]:
    """Every unit of ``files``, in reading order (numbered 0, 1, …)."""
    units: list[Unit] = []

    def add(file: int, part: str, start: int = 0, stop: int | None = None, weight: int = 0) -> None:
        units.append(Unit(len(units), file, part, start, stop, weight))

    for i, path in enumerate(files):
        kind, compression = input_kind(path) or ("txt", None)
        size = path.stat().st_size
        if kind == "jsonl":
            estimated = size * (COMPRESSION_RATIO if compression else 1)
            count = max(1, math.ceil(estimated / UNIT_BYTES))
            for k in range(count):
                last = k == count - 1
                add(i, "lines", k * UNIT_BYTES, None if last else (k + 1) * UNIT_BYTES,
                    (estimated - k * UNIT_BYTES) if last else UNIT_BYTES)
        elif kind == "parquet":
            sizes = _row_group_bytes(path)
            first, held = 0, 0
            for group, nbytes in enumerate(sizes):
                held += nbytes
                if held >= UNIT_BYTES or group == len(sizes) - 1:
                    add(i, "row_groups", first, group + 1, held)
                    first, held = group + 1, 0
            if not sizes:
                add(i, "row_groups", 0, 0, 0)
        else:
            add(i, "file", 0, None, size * (COMPRESSION_RATIO if compression else 1))
    return units


def _row_group_bytes(path: Path) -> list[int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(str(path)).metadata
    except (OSError, pa.ArrowException) as e:
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise DistillError(f"{path}: cannot read it as parquet ({why}); check the file is complete") from None
    return [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]


def plan_digest(units: list[Unit]) -> str:
    """sha256 of the plan (every unit's file, part and range): tasks that merge must have planned alike."""
    return hashlib.sha256(json.dumps([asdict(u) for u in units], sort_keys=True).encode()).hexdigest()


def owned_units(units: list[Unit], shard_index: int, num_shards: int) -> list[Unit]:
    """Task ``shard_index``'s contiguous run: the units whose estimated bytes before them fall in its
    ``1/num_shards`` of the corpus (a task may own none when there are fewer units than tasks)."""
    total = max(sum(u.weight for u in units), 1)
    owned, before = [], 0
    for unit in units:
        if min(before * num_shards // total, num_shards - 1) == shard_index:
            owned.append(unit)
        before += unit.weight
    return owned


def unit_documents(unit: Unit, path: Path, reader: DocumentReader) -> Iterator[str]:
    """The documents of ``unit`` (a part of ``path``), counted in ``reader.stats`` as the reader
    counts a whole file's."""
    if unit.part == "lines":
        yield from reader._jsonl(path, unit.start, unit.stop)
    elif unit.part == "row_groups":
        for text in column_texts(path, "parquet", reader.text_field, range(unit.start, unit.stop)):
            if text:
                reader.stats.documents += 1
                yield text
    else:
        yield from _one_file(reader, path)


def _one_file(reader: DocumentReader, path: Path) -> DocumentReader:
    """``reader`` reading ``path`` alone (its stats shared)."""
    one = DocumentReader([path], reader.text_field, reader.txt_documents, reader.skip_bad_utf8)
    one.stats = reader.stats
    return one

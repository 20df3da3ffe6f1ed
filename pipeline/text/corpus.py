"""Read a text corpus as a stream of documents.

Accepted inputs, by name (case aside):

- **lines**: ``.jsonl`` / ``.json`` (one JSON record per line, the text under a configurable field;
  Dolma's ``.json.gz`` are JSON lines too) and ``.txt`` (one document per file, or one per
  blank-line-separated paragraph), each plain, gzip (``.gz``) or zstd (``.zst``), decompressed a block
  at a time;
- **columns**: ``.parquet`` (a row group at a time, the text column alone), Arrow IPC files or streams
  (``.arrow``, ``.feather``, ``.ipc``, a record batch at a time), and ``datasets.save_to_disk``
  directories (their ``state.json`` lists the Arrow files, in order).

Memory stays bounded by a block, a row group or a record batch, whatever the file's size. A
directory stands for every file under it, in sorted order, and every one is accounted for: a file of
no accepted kind is an error naming it, or, when the user asks, is left out and reported (never a
silent skip). Text must be UTF-8; a file that is not names the file and the byte offset of the first
bad byte, or, when the user asks, the bad line is skipped and counted. A truncated compressed file or
a damaged Parquet footer names the file and stops.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.errors import DistillError

LINE_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
COMPRESSIONS = {"": None, ".gz": "gzip", ".zst": "zstd"}
COLUMN_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
ACCEPTED = ("txt, jsonl or json (plain, .gz or .zst), parquet, arrow/feather/ipc, or a datasets.save_to_disk "
            "directory")
BLOCK = 1 << 20  # bytes decompressed at a time
BATCH_ROWS = 1024  # rows of a Parquet row group or Arrow batch converted to Python at a time


def input_kind(path: Path) -> tuple[str, str | None] | None:
    """(kind, compression) of a corpus file by its name: kind is jsonl, txt, parquet or arrow; None
    for a name of no accepted kind."""
    name = path.name.lower()
    for suffix, kind in COLUMN_KINDS.items():
        if name.endswith(suffix):
            return kind, None
    for compressed, compression in COMPRESSIONS.items():
        for suffix, kind in LINE_KINDS.items():
            if name.endswith(suffix + compressed):
                return kind, compression
    return None


def _accepted(path: Path) -> bool:
    return input_kind(path) is not None


@dataclass
class Inputs:
    """The files a list of ``--input`` paths stands for, in reading order, and those left out (with
    ``skip_unknown``) as being of no accepted kind."""
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)


def find_inputs(inputs: tuple[str, ...] | list[str], flag: str = "--input", skip_unknown: bool = False) -> Inputs:
    """Files named directly, and every file under named directories (sorted; a ``save_to_disk``
    directory as its Arrow files). A file of no accepted kind is a one-line error naming it and how
    many more there are, unless ``skip_unknown``: then it is left out and listed in ``skipped``."""
    files: list[Path] = []
    unknown: list[Path] = []
    for item in inputs:
        path = Path(item)
        if item == "-":
            raise DistillError(f"{flag} - (standard input) is read by distill prepare alone; pass a file here")
        if path.is_dir():
            found, strangers = _walk(path)
            if not found and not strangers:
                raise DistillError(f"corpus directory {path} holds no files; check {flag}")
            files.extend(found)
            unknown.extend(strangers)
        elif path.is_file():
            (files if _accepted(path) else unknown).append(path)
        else:
            raise DistillError(f"corpus path {path} does not exist; check {flag}")
    if unknown and not skip_unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DistillError(f"corpus file {unknown[0]}{more} is of no kind distill reads ({ACCEPTED}); convert or "
                           "remove it, or pass --skip-unknown to leave such files out (they are listed in the store)")
    if not files:
        raise DistillError(f"no corpus file to read in {', '.join(map(str, inputs)) or 'nothing'}; pass {flag} "
                           f"FILE_OR_DIR ({ACCEPTED})")
    return Inputs(files, unknown)


def expand_inputs(inputs: tuple[str, ...] | list[str], flag: str = "--input") -> list[Path]:
    """:func:`find_inputs`' files, every file of an accepted kind (errors otherwise)."""
    return find_inputs(inputs, flag).files


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(corpus files, files of no accepted kind) under ``root``, sorted; a ``save_to_disk`` dataset
    directory stands for its Arrow files (its metadata JSON is not a corpus)."""
    found: list[Path] = []
    strangers: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        here = Path(directory)
        dataset = _dataset_files(here)
        if dataset is not None:
            found.extend(dataset)
            subdirs.clear()
            continue
        subdirs.sort()
        for name in sorted(names):
            path = here / name
            if path.is_file():
                (found if _accepted(path) else strangers).append(path)
    return found, strangers


def _dataset_files(directory: Path) -> list[Path] | None:
    """The Arrow files of a ``datasets.save_to_disk`` directory, in its order; None for any other
    directory. A ``DatasetDict`` (several splits) is one line naming them."""
    if (directory / "dataset_dict.json").is_file():
        try:
            splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        raise DistillError(f"{directory} is a datasets DatasetDict with splits {', '.join(map(str, splits)) or '?'}; "
                           f"pass one split's directory (e.g. {directory / (splits[0] if splits else 'train')})")
    state = directory / "state.json"
    if not (state.is_file() and (directory / "dataset_info.json").is_file()):
        return None
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DistillError(f"{state} does not list the dataset's Arrow files (_data_files); is {directory} a "
                           "datasets.save_to_disk directory? re-save it") from None
    files = []
    for name in names:
        path = directory / str(name)
        if Path(str(name)).name != name or not path.is_file():
            raise DistillError(f"{state} lists {name!r}, which is not a file in {directory}; re-save the dataset")
        files.append(path)
    return files


def corpus_fingerprint(files: list[Path], **options: object) -> str:
    """sha256 over the inputs' bytes (in order) and the options that change how they are read."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        digest.update(b"\x00file-end\x00")
    return digest.hexdigest()


def _binary_lines(path: Path) -> Iterator[bytes]:
    """The raw lines of a plain, gzip or zstd file, decompressed a block at a time."""
    kind = input_kind(path)
    compression = kind[1] if kind else ("gzip" if path.name.endswith(".gz") else None)
    if compression == "gzip":
        with gzip.open(path, "rb") as f:
            yield from f
    elif compression == "zstd":
        import pyarrow as pa

        with pa.input_stream(str(path), compression="zstd") as f:
            rest = b""
            while block := f.read(BLOCK):
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield line + b"\n"
            if rest:
                yield rest
    else:
        with open(path, "rb") as f:
            yield from f


def _lines_from(path: Path, start: int) -> tuple[int, int, Iterator[bytes]]:
    """(offset, lines before it, raw lines from it) of the first line of a plain file that starts at or
    after byte ``start``: the line that straddles ``start`` belongs to the range before."""
    with open(path, "rb") as f:
        f.seek(start - 1)
        offset = start if f.read(1) == b"\n" else start + len(f.readline())
        f.seek(0)
        before, left = 0, offset
        while left and (block := f.read(min(BLOCK, left))):  # line numbers for messages: newlines counted in C
            before += block.count(b"\n")
            left -= len(block)

    def lines() -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(offset)
            yield from f

    return offset, before, lines()


def jsonl_values(lines: Iterator[tuple[int, int, str]], path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of :func:`read_lines`' output; a line that
    is not JSON is a one-line error naming the file and line."""
    for lineno, _, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the line") from None
        yield lineno, value


def read_lines(path: Path, skipped: "ReadStats | None" = None,
               hint: str = "convert the file or pass --skip-bad-utf8 to skip such lines", start: int = 0,
               stop: int | None = None) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, text) of each line of a plain, gzip or zstd file. A line that is not
    UTF-8 is an error naming the byte offset, or, given ``skipped``, counted there and skipped.

    ``start``/``stop``: only the lines that *start* at a (decompressed) byte offset in ``[start, stop)``,
    so that consecutive ranges share no line and miss none (a part of a file, ``pipeline.text.units``).
    A plain file seeks to ``start``; a compressed one is decompressed from its beginning, the lines
    before ``start`` split off but not decoded."""
    offset, lineno, lines = 0, 0, None
    try:
        if start and (input_kind(path) or ("", None))[1] is None and not path.name.endswith(".gz"):
            offset, lineno, lines = _lines_from(path, start)
        for raw in lines if lines is not None else _binary_lines(path):
            lineno += 1
            if stop is not None and offset >= stop:
                break
            if offset < start:
                offset += len(raw)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if skipped is None:
                    raise DistillError(f"{path}: not UTF-8 at byte {offset + e.start} (line {lineno}); {hint}") from None
                skipped.skipped_lines += 1
            else:
                yield lineno, offset, text
            offset += len(raw)
    except DistillError:
        raise
    except (OSError, EOFError, ValueError) as e:  # a truncated gzip/zstd stream; pyarrow's errors are among these
        raise DistillError(f"{path}: cannot read ({_one_line(e)}); check the file is complete") from None


def _example_hint(record: object) -> str:
    """Where a record looks like a task example, the --format that reads it (pipeline/text/examples.py)."""
    if isinstance(record, dict) and "messages" in record:
        return " (or --format chat for its messages)"
    if isinstance(record, dict) and "prompt" in record:
        return " (or --format prompt-response for its prompt and response)"
    return ""


@dataclass
class ReadStats:
    documents: int = 0
    skipped_lines: int = 0


class DocumentReader:
    """Iterate documents (``str``) from corpus files; ``stats`` counts documents and skipped lines."""

    def __init__(self, files: list[Path], text_field: str = "text", txt_documents: str = "file",
                 skip_bad_utf8: bool = False):
        self.files = files
        self.text_field = text_field
        self.txt_documents = txt_documents
        self.skip_bad_utf8 = skip_bad_utf8
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            kind = (input_kind(path) or ("txt", None))[0]
            if kind == "jsonl":
                yield from self._jsonl(path)
            elif kind == "txt":
                yield from self._txt(path)
            else:
                for text in column_texts(path, kind, self.text_field):
                    if text:
                        self.stats.documents += 1
                        yield text

    def _lines(self, path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, str]]:
        return read_lines(path, self.stats if self.skip_bad_utf8 else None, start=start, stop=stop)

    def _jsonl(self, path: Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """The documents of the lines that start in bytes ``[start, stop)`` (all of them by default)."""
        for lineno, record in jsonl_values(self._lines(path, start, stop), path):
            if not isinstance(record, dict) or self.text_field not in record:
                raise DistillError(f"{path}:{lineno}: no '{self.text_field}' field; pass --text-field with the field "
                                   f"holding the text{_example_hint(record)}")
            text = record[self.text_field]
            if not isinstance(text, str):
                raise DistillError(f"{path}:{lineno}: field '{self.text_field}' is not a string")
            if text:
                self.stats.documents += 1
                yield text

    def _txt(self, path: Path) -> Iterator[str]:
        parts: list[str] = []
        for _, _, line in self._lines(path):
            if self.txt_documents == "paragraph" and not line.strip():
                if parts:
                    self.stats.documents += 1
                    yield "".join(parts).strip("\n")
                    parts = []
                continue
            parts.append(line)
        text = "".join(parts)
        if self.txt_documents == "paragraph":
            text = text.strip("\n")
        if text.strip():
            self.stats.documents += 1
            yield text


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def column_texts(path: Path, kind: str, text_field: str, row_groups: range | None = None) -> Iterator[str | None]:
    """The ``text_field`` column of a Parquet file (a row group at a time; ``row_groups``: those alone)
    or an Arrow IPC file or stream (a record batch at a time), value by value (None for a null). A
    missing column names the columns there are; a damaged file names the file."""
    import pyarrow as pa

    try:
        for batch in _column_batches(path, kind, text_field, row_groups):
            yield from batch.column(0).to_pylist()
    except DistillError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise DistillError(f"{path}: cannot read it as {kind} ({_one_line(e)}); check the file is complete") from None


def _column_batches(path: Path, kind: str, text_field: str, row_groups: range | None = None):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    if kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(str(path))  # the footer: a damaged one fails here, before any row
        _check_column(path, parquet.schema_arrow, text_field)
        # a row group at a time, read and let go: iter_batches kept ~the whole text column of the file
        # in its memory pool (+77 MiB RSS for a 72 MiB file, where this stays flat)
        for group in range(parquet.num_row_groups) if row_groups is None else row_groups:
            yield from parquet.read_row_group(group, columns=[text_field], use_threads=False).to_batches(BATCH_ROWS)
        return
    with pa.memory_map(str(path)) as source:
        is_file = source.read(6) == b"ARROW1"
        source.seek(0)
        reader = ipc.open_file(source) if is_file else ipc.open_stream(source)
        _check_column(path, reader.schema, text_field)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file else reader
        for batch in batches:
            column = batch.select([text_field])
            for start in range(0, column.num_rows, BATCH_ROWS):
                yield column.slice(start, BATCH_ROWS)


def _check_column(path: Path, schema, text_field: str) -> None:
    import pyarrow as pa

    names = list(schema.names)
    if text_field not in names:
        close = difflib.get_close_matches(text_field, names, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise DistillError(f"{path} has no column {text_field!r}{guess}; its columns are {', '.join(names)}: pass "
                           "--text-field with the one holding the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or
            getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DistillError(f"{path}: column {text_field!r} holds {kind}, not text; pass --text-field with the column "
                           "holding the text")

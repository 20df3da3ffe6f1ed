"""Read a text corpus as a stream of documents.

Accepted inputs: ``.txt`` / ``.txt.gz`` (one document per file, or one per blank-line-separated
paragraph) and ``.jsonl`` / ``.jsonl.gz`` (one document per line, text under a configurable field).
A directory stands for the accepted files under it, in sorted order. Text must be UTF-8; a file
that is not names the file and the byte offset of the first bad byte, or, when the user asks,
the bad line is skipped and counted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from pipeline.errors import DistillError

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


def _accepted(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def expand_inputs(inputs: tuple[str, ...] | list[str], flag: str = "--input") -> list[Path]:
    """Files named directly, and accepted files under named directories, sorted; errors if none
    (naming ``flag``, the option they came from)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _accepted(p))
            if not found:
                raise DistillError(f"corpus directory {path} holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if not _accepted(path):
                raise DistillError(f"corpus file {path} is not one of {', '.join(SUFFIXES)}; rename or convert it")
            files.append(path)
        else:
            raise DistillError(f"corpus path {path} does not exist; check {flag}")
    if not files:
        raise DistillError(f"no corpus given; pass {flag} FILE_OR_DIR (txt, txt.gz, jsonl, jsonl.gz)")
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


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


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
               hint: str = "convert the file or pass --skip-bad-utf8 to skip such lines") -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, text) of each line of a plain or gzipped file. A line that is not
    UTF-8 is an error naming the byte offset, or, given ``skipped``, counted there and skipped."""
    offset = 0
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if skipped is None:
                        raise DistillError(f"{path}: not UTF-8 at byte {offset + e.start} (line {lineno}); {hint}") from None
                    skipped.skipped_lines += 1
                else:
                    yield lineno, offset, text
                offset += len(raw)
    except (OSError, EOFError) as e:
        raise DistillError(f"{path}: cannot read ({e}); check the file is complete") from None


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
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                yield from self._jsonl(path)
            else:
                yield from self._txt(path)

    def _lines(self, path: Path) -> Iterator[tuple[int, int, str]]:
        return read_lines(path, self.stats if self.skip_bad_utf8 else None)

    def _jsonl(self, path: Path) -> Iterator[str]:
        for lineno, record in jsonl_values(self._lines(path), path):
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

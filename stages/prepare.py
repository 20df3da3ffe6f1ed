"""Stage 0: text, JSONL or task examples → tokenized documents, EOS-separated, packed into a ``tokens`` store.

Documents are tokenized in batches and appended to one token stream, each followed by EOS. The
stream is cut into rows of ``seq_len`` tokens with a stride of ``seq_len - 1``: consecutive rows
share one token, so every token after the first is a next-token target exactly once (position t of
a row predicts position t+1). The remainder shorter than a row is dropped and counted.

Memory is bounded by one shard of rows plus one batch of documents, whatever the corpus size. The
store is built in a temp directory beside ``out`` and renamed into place when its index is written,
so an existing store is never half-replaced.

Task examples (``--format prompt-response`` or ``chat``, :mod:`pipeline.examples`) go into the same
kind of stream, with two differences. Each token carries a flag: is it a response token (a token of
a response, or the EOS that closes an example ending in one)? The rows then get a ``loss_mask``
beside ``input_ids``: position t of a row is 1 where its *target*, token t+1, is a response token
(the last position, whose target is the next row's first token, is always 0). And an example that
fits in a row but not in what is left of the current one starts the next row, the rest of this one
padded with EOS (flag 0), so that every example that fits in a row is trained with its whole prompt
in context. A longer one is split wherever it falls (padding would not keep it whole), its flags
going with its tokens. The last row is padded too, so no example is dropped. The rows are still cut
from one stream with stride ``seq_len - 1``, so everything that reads a tokens store reads these
the same way.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import store as store_lib
from pipeline.config import check, flag, option, required, save_resolved
from pipeline.corpus import DocumentReader, corpus_fingerprint, expand_inputs
from pipeline.errors import DistillError
from pipeline.examples import FORMATS, ExampleReader, chat_template_sha256, require_chat_template
from pipeline.io import replace_dir
from pipeline.tokenizer import load_tokenizer, tokenizer_hash, vocab_size


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...] = option((), "Corpus files or directories (txt, txt.gz, jsonl, jsonl.gz); repeat --input.")
    out: str = option("", "Directory of the tokens store to write.")
    tokenizer: str = option("data/tokenizer", "Local Hugging Face tokenizer directory.")
    seq_len: int = option(256, "Tokens per row (the model's context length for training).")
    format: str = option("text", "Input records: 'text' (documents; every token is trained on), 'prompt-response' "
                         "(JSONL prompt and response fields) or 'chat' (JSONL message lists, rendered with the "
                         "tokenizer's chat template): these two store a loss_mask, so stage two trains on responses only.")
    prompt_field: str = option("", "JSONL field of the prompt (--format prompt-response; default 'prompt').")
    response_field: str = option("", "JSONL field of the response (--format prompt-response; default 'response').")
    messages_field: str = option("", "JSONL field of the list of {role, content} messages (--format chat; default "
                                 "'messages'); 'assistant' messages are the responses.")
    text_field: str = option("text", "JSONL field that holds the document text.")
    txt_documents: str = option("file", "How .txt files split into documents: 'file' or 'paragraph' (blank lines).")
    skip_bad_utf8: bool = option(False, "Skip (and count) lines that are not UTF-8 instead of stopping.")
    backend: str = option("zarr", "Store backend: 'zarr' (v3, sharded, zstd) or 'arrow' (IPC, zstd).")
    rows_per_shard: int = option(4096, "Rows per store shard.")
    chunk_rows: int = option(64, "Rows per compressed chunk inside a shard (the unit a reader decodes).")
    batch_documents: int = option(512, "Documents tokenized per batch.")
    overwrite: bool = option(False, "Replace an existing store built with different parameters.")

    def __post_init__(self):
        problems = required(self, "inputs", "out")
        if self.seq_len < 2:
            problems.append(f"seq_len must be at least 2, got {self.seq_len}")
        if self.format not in FORMATS:
            problems.append(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for name, wanted in (("prompt_field", "prompt-response"), ("response_field", "prompt-response"),
                             ("messages_field", "chat")):
            if getattr(self, name) and self.format != wanted:
                plain = " (a plain-text corpus has no prompts or responses to mask)" if self.format == "text" else ""
                problems.append(f"{flag(name)} is for --format {wanted}, not --format {self.format}{plain}; "
                                f"pass --format {wanted} or drop {flag(name)}")
        if self.txt_documents not in ("file", "paragraph"):
            problems.append(f"txt_documents must be 'file' or 'paragraph', got {self.txt_documents!r}")
        if self.backend not in store_lib.BACKENDS:
            problems.append(f"backend must be one of {', '.join(store_lib.BACKENDS)}, got {self.backend!r}")
        for name in ("rows_per_shard", "chunk_rows", "batch_documents"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive")
        check(problems, "prepare")


def prepare(config: PrepareConfig) -> Path:
    # --- setup: inputs, tokenizer, and what decides the store's content ---
    files = expand_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer)
    examples = config.format != "text"
    if examples:
        _check_example_inputs(config, files, tokenizer)
    vocab = vocab_size(tokenizer)
    dtype = store_lib.token_dtype(vocab)
    params = {
        "tokenizer": str(config.tokenizer),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": vocab,
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": config.seq_len,
        "stride": config.seq_len - 1,
        "corpus_fingerprint": corpus_fingerprint(files, **_reading_options(config)),
        "rows_per_shard": config.rows_per_shard,
        "chunk_rows": config.chunk_rows,
    }
    if examples:  # (a plain-text store keeps the params it always had)
        params["format"] = config.format
        if config.format == "chat":
            params["chat_template_sha256"] = chat_template_sha256(tokenizer)
    out = Path(config.out)
    if store_lib.existing_store(out, "tokens", config.backend, params, config.overwrite) == "done":
        print(f"{out}: complete store with the same parameters already exists; nothing to do")
        return out

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # --- loop: stream documents (or examples) → token stream → rows → shards ---
    if examples:
        reader = ExampleReader(files, config.format, tokenizer=tokenizer, skip_bad_utf8=config.skip_bad_utf8,
                               **_example_fields(config))
    else:
        reader = DocumentReader(files, config.text_field, config.txt_documents, config.skip_bad_utf8)
    row_len, stride = config.seq_len, config.seq_len - 1
    shard_tokens = config.rows_per_shard * stride + 1  # tokens that fill one shard of overlapping rows
    pending: list[np.ndarray] = []
    pending_flags: list[np.ndarray] = []  # examples only: 1 for each response token of the stream
    pending_len = 0
    shards: list[dict] = []
    total_tokens = 0
    padding_tokens = 0  # examples only: EOS added to start an example on a fresh row, or to fill the last row
    loss_tokens = 0  # examples only: positions whose loss_mask is 1

    def flush(buffer: np.ndarray, flags: np.ndarray | None, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Write ``rows`` rows from the front of ``buffer`` (and ``flags``) as one shard; return the unused rest."""
        nonlocal loss_tokens
        starts = np.arange(rows) * stride
        arrays = {"input_ids": buffer[starts[:, None] + np.arange(row_len)].astype(dtype)}
        if flags is not None:
            arrays["loss_mask"] = loss_mask_rows(flags, rows, row_len)
            loss_tokens += int(arrays["loss_mask"].sum())
        name = store_lib.shard_name(len(shards), config.backend)
        shards.append(store_lib.write_shard(tmp, name, arrays, config.backend, config.chunk_rows))
        return buffer[rows * stride:], None if flags is None else flags[rows * stride:]

    backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else None
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)

    def encode(texts: list[str]) -> list[list[int]]:
        if backend is not None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def append(ids: np.ndarray, flags: np.ndarray | None = None) -> None:
        nonlocal pending_len, total_tokens
        pending.append(ids)
        if flags is not None:
            pending_flags.append(flags)
        pending_len += len(ids)
        total_tokens += len(ids)
        progress.update(len(ids))

    def append_example(pieces: list[tuple[str, bool]], piece_ids: list[list[int]]) -> None:
        nonlocal padding_tokens
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in piece_ids] + [eos])
        flags = np.concatenate([np.full(len(p), response, dtype=np.uint8)
                                for (_, response), p in zip(pieces, piece_ids)]
                               + [np.array([pieces[-1][1]], dtype=np.uint8)])  # EOS: ending a response is learnt
        used = total_tokens % stride  # the next token's place in its row (0: it starts a row)
        if used and stride - used + 1 < len(ids) <= row_len:  # it fits in a row, not in this one: start the next
            pad = stride - used
            append(np.full(pad, eos[0]), np.zeros(pad, dtype=np.uint8))
            padding_tokens += pad
        append(ids, flags)

    documents = iter(reader)
    try:
        # The bar is closed before any error propagates, so the error prints on a line of its own.
        with tqdm(desc="prepare", unit="tok", unit_scale=True, dynamic_ncols=True) as progress:
            while batch := list(itertools.islice(documents, config.batch_documents)):
                if examples:
                    encoded = iter(encode([text for pieces in batch for text, _ in pieces]))
                    for pieces in batch:
                        append_example(pieces, [next(encoded) for _ in pieces])
                else:
                    for ids in encode(batch):
                        append(np.asarray(ids, dtype=np.int64))
                        append(eos)
                if pending_len >= shard_tokens:
                    buffer = np.concatenate(pending)
                    flags = np.concatenate(pending_flags) if examples else None
                    while len(buffer) >= shard_tokens:
                        buffer, flags = flush(buffer, flags, config.rows_per_shard)
                    pending, pending_len = [buffer], len(buffer)
                    pending_flags = [flags] if examples else []
            if examples and total_tokens:  # pad the last row rather than drop the examples in it
                pad = max(row_len - total_tokens, (1 - total_tokens) % stride)
                append(np.full(pad, eos[0]), np.zeros(pad, dtype=np.uint8))
                padding_tokens += pad
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    buffer = np.concatenate(pending) if pending else np.zeros(0, dtype=np.int64)
    flags = np.concatenate(pending_flags) if examples else None
    last_rows = (len(buffer) - 1) // stride if len(buffer) >= row_len else 0
    if last_rows:
        buffer, flags = flush(buffer, flags, last_rows)
    if not shards:
        shutil.rmtree(tmp, ignore_errors=True)
        if not reader.stats.documents and reader.stats.skipped_lines:
            raise DistillError(f"the corpus holds no UTF-8 text: all {reader.stats.skipped_lines} lines were skipped "
                               "as non-UTF-8 (--skip-bad-utf8); is this a text corpus? convert it to UTF-8")
        raise DistillError(f"the corpus yields {total_tokens} tokens from {reader.stats.documents} documents, "
                           f"fewer than one row of {row_len}; add text or lower --seq-len")

    # --- finish: index last, then the whole store renamed into place ---
    rows = sum(s["rows"] for s in shards)
    arrays = {"input_ids": {"dtype": dtype.name, "shape": [row_len]}}
    facts = {}
    if examples:
        arrays["loss_mask"] = {"dtype": "uint8", "shape": [row_len]}
        facts = {"loss_tokens": loss_tokens, "padding_tokens": padding_tokens}
    index = store_lib.new_index(
        "tokens", config.backend, params, shards,
        arrays=arrays,
        documents=reader.stats.documents,
        tokens=total_tokens,
        target_tokens=rows * stride,
        dropped_tokens=int(len(buffer) - 1) if len(buffer) else 0,
        skipped_lines=reader.stats.skipped_lines,
        **facts,
    )
    save_resolved(config, tmp / "config.json")
    store_lib.write_index(tmp, index)
    replace_dir(tmp, out)
    skipped = f", skipped {reader.stats.skipped_lines} non-UTF-8 lines" if reader.stats.skipped_lines else ""
    trained = f"; {loss_tokens} response targets in the loss, {padding_tokens} padding" if examples else ""
    print(f"{out}: {rows} rows x {row_len} tokens from {reader.stats.documents} "
          f"{'examples' if examples else 'documents'} ({total_tokens} tokens{skipped}{trained})")
    return out


def loss_mask_rows(flags: np.ndarray, rows: int, row_len: int) -> np.ndarray:
    """``loss_mask [rows, row_len]`` uint8 of the rows cut with stride ``row_len − 1`` from a stream whose
    tokens' response flags are ``flags``: position t of row r is the flag of its target, stream token
    ``r·(row_len−1) + t + 1``; the last position's target is the next row's first token, so it is 0 here
    (that token is a target, once, at position ``row_len − 2`` of this row)."""
    stride = row_len - 1
    mask = np.zeros((rows, row_len), dtype=np.uint8)
    mask[:, :-1] = flags[np.arange(rows)[:, None] * stride + np.arange(1, row_len)]
    return mask


def _example_fields(config: PrepareConfig) -> dict[str, str]:
    """The record fields an example format reads, defaults filled in."""
    if config.format == "chat":
        return {"messages_field": config.messages_field or "messages"}
    return {"prompt_field": config.prompt_field or "prompt", "response_field": config.response_field or "response"}


def _reading_options(config: PrepareConfig) -> dict:
    """The options that change what is read from the same files (they enter the corpus fingerprint)."""
    if config.format == "text":
        return {"text_field": config.text_field, "txt_documents": config.txt_documents,
                "skip_bad_utf8": config.skip_bad_utf8}
    return {"format": config.format, **_example_fields(config), "skip_bad_utf8": config.skip_bad_utf8}


def _check_example_inputs(config: PrepareConfig, files: list[Path], tokenizer) -> None:
    """Example formats read JSONL records, and chat needs a template: refused before anything is written."""
    text_files = [f for f in files if not f.name.endswith((".jsonl", ".jsonl.gz"))]
    if text_files:
        raise DistillError(f"--format {config.format} reads JSONL records, and {text_files[0]} is plain text "
                           "(no prompts or responses to mask); pass .jsonl files, or --format text to train on every token")
    if config.format == "chat":
        require_chat_template(tokenizer, config.tokenizer)

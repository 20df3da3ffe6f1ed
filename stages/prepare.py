"""Stage 0: text or JSONL → tokenized documents, EOS-separated, packed into a ``tokens`` store.

Documents are tokenized in batches and appended to one token stream, each followed by EOS. The
stream is cut into rows of ``seq_len`` tokens with a stride of ``seq_len - 1``: consecutive rows
share one token, so every token after the first is a next-token target exactly once (position t of
a row predicts position t+1). The remainder shorter than a row is dropped and counted.

Memory is bounded by one shard of rows plus one batch of documents, whatever the corpus size. The
store is built in a temp directory beside ``out`` and renamed into place when its index is written,
so an existing store is never half-replaced.
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
from pipeline.config import check, option, required, save_resolved
from pipeline.corpus import DocumentReader, corpus_fingerprint, expand_inputs
from pipeline.errors import DistillError
from pipeline.io import replace_dir
from pipeline.tokenizer import load_tokenizer, tokenizer_hash, vocab_size


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...] = option((), "Corpus files or directories (txt, txt.gz, jsonl, jsonl.gz); repeat --input.")
    out: str = option("", "Directory of the tokens store to write.")
    tokenizer: str = option("data/tokenizer", "Local Hugging Face tokenizer directory.")
    seq_len: int = option(256, "Tokens per row (the model's context length for training).")
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
    vocab = vocab_size(tokenizer)
    dtype = store_lib.token_dtype(vocab)
    params = {
        "tokenizer": str(config.tokenizer),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": vocab,
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": config.seq_len,
        "stride": config.seq_len - 1,
        "corpus_fingerprint": corpus_fingerprint(
            files, text_field=config.text_field, txt_documents=config.txt_documents,
            skip_bad_utf8=config.skip_bad_utf8),
        "rows_per_shard": config.rows_per_shard,
        "chunk_rows": config.chunk_rows,
    }
    out = Path(config.out)
    if store_lib.existing_store(out, "tokens", config.backend, params, config.overwrite) == "done":
        print(f"{out}: complete store with the same parameters already exists; nothing to do")
        return out

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # --- loop: stream documents → token stream → rows → shards ---
    reader = DocumentReader(files, config.text_field, config.txt_documents, config.skip_bad_utf8)
    row_len, stride = config.seq_len, config.seq_len - 1
    shard_tokens = config.rows_per_shard * stride + 1  # tokens that fill one shard of overlapping rows
    pending: list[np.ndarray] = []
    pending_len = 0
    shards: list[dict] = []
    total_tokens = 0

    def flush(buffer: np.ndarray, rows: int) -> np.ndarray:
        """Write ``rows`` rows from the front of ``buffer`` as one shard; return the unused rest."""
        starts = np.arange(rows) * stride
        block = buffer[starts[:, None] + np.arange(row_len)]
        name = store_lib.shard_name(len(shards), config.backend)
        shards.append(store_lib.write_shard(tmp, name, {"input_ids": block.astype(dtype)},
                                            config.backend, config.chunk_rows))
        return buffer[rows * stride:]

    backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else None
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)

    def encode(texts: list[str]) -> list[list[int]]:
        if backend is not None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]

    documents = iter(reader)
    try:
        # The bar is closed before any error propagates, so the error prints on a line of its own.
        with tqdm(desc="prepare", unit="tok", unit_scale=True, dynamic_ncols=True) as progress:
            while batch := list(itertools.islice(documents, config.batch_documents)):
                for ids in encode(batch):
                    pending += [np.asarray(ids, dtype=np.int64), eos]
                    pending_len += len(ids) + 1
                    total_tokens += len(ids) + 1
                    progress.update(len(ids) + 1)
                if pending_len >= shard_tokens:
                    buffer = np.concatenate(pending)
                    while len(buffer) >= shard_tokens:
                        buffer = flush(buffer, config.rows_per_shard)
                    pending, pending_len = [buffer], len(buffer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    buffer = np.concatenate(pending) if pending else np.zeros(0, dtype=np.int64)
    last_rows = (len(buffer) - 1) // stride if len(buffer) >= row_len else 0
    if last_rows:
        buffer = flush(buffer, last_rows)
    if not shards:
        shutil.rmtree(tmp, ignore_errors=True)
        if not reader.stats.documents and reader.stats.skipped_lines:
            raise DistillError(f"the corpus holds no UTF-8 text: all {reader.stats.skipped_lines} lines were skipped "
                               "as non-UTF-8 (--skip-bad-utf8); is this a text corpus? convert it to UTF-8")
        raise DistillError(f"the corpus yields {total_tokens} tokens from {reader.stats.documents} documents, "
                           f"fewer than one row of {row_len}; add text or lower --seq-len")

    # --- finish: index last, then the whole store renamed into place ---
    rows = sum(s["rows"] for s in shards)
    index = store_lib.new_index(
        "tokens", config.backend, params, shards,
        arrays={"input_ids": {"dtype": dtype.name, "shape": [row_len]}},
        documents=reader.stats.documents,
        tokens=total_tokens,
        target_tokens=rows * stride,
        dropped_tokens=int(len(buffer) - 1) if len(buffer) else 0,
        skipped_lines=reader.stats.skipped_lines,
    )
    save_resolved(config, tmp / "config.json")
    store_lib.write_index(tmp, index)
    replace_dir(tmp, out)
    skipped = f", skipped {reader.stats.skipped_lines} non-UTF-8 lines" if reader.stats.skipped_lines else ""
    print(f"{out}: {rows} rows x {row_len} tokens from {reader.stats.documents} documents "
          f"({total_tokens} tokens{skipped})")
    return out

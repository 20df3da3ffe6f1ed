"""Stage 0: text, JSONL or task examples → tokenized documents, EOS-separated, packed into a ``tokens`` store.

Documents are tokenized in batches and appended to one token stream, each followed by EOS. The
stream is cut into rows of ``seq_len`` tokens with a stride of ``seq_len - 1``: consecutive rows
share one token, so every token after the first is a next-token target exactly once (position t of
a row predicts position t+1). The remainder shorter than a row is dropped and counted.

Memory is bounded by one shard of rows plus one batch of documents, whatever the corpus size. The
store is built in a temp directory beside ``out`` and renamed into place when its index is written,
so an existing store is never half-replaced.

Task examples (``--format prompt-response`` or ``chat``, :mod:`pipeline.text.examples`) go into the same
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

At scale: ``--workers N`` tokenizes batches in N processes, results kept in order
(:mod:`pipeline.text.parallel`), so the store is the same. ``--shard-index i --num-shards n`` (a SLURM
array, ``--format text``) shares the input between n tasks: each tokenizes the units it owns (runs of
documents of one file, :mod:`pipeline.text.units`) into stream pieces in OUT, and ``distill merge``
replays them through the same packer into the store one process writes (see "array tasks" below).

Token ids (``--format ids``: ``distill generate``'s records, read as they are, nothing re-tokenized)
go in **one example per row** instead (:class:`pipeline.text.packing.ExampleRows`): each record's
``prompt_ids + completion_ids`` from position 0 of its own row, the rest EOS, so no position sees
another example; the loss mask marks the completion's tokens (the EOS generate drew included, none
added), and records carrying ``completion_logprobs`` also give ``behaviour_logprob``. An example
longer than a row is refused. The tokenizer gives the store's tokenizer hash, vocabulary and EOS;
the records' ``settings`` give the ``samplers`` param (the set of distinct samplers, None for records
that do not say), which stage one copies and ``--objective policy-gradient`` checks.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from pipeline.config import check, flag, load_config, option, required, save_resolved
from pipeline.errors import DistillError
from pipeline.io import file_sha256, real_out, removed_if_failed, replace_dir
from pipeline.outdir import STORE, claim
from pipeline.store import contract as store_lib
from pipeline.text.corpus import (ACCEPTED, BLOCK, DocumentReader, Inputs, ReadStats, corpus_fingerprint, find_inputs,
                                  input_kind)
from pipeline.text.examples import (FORMATS, ExampleReader, IdsReader, chat_template_sha256, read_samplers,
                                    require_chat_template)
from pipeline.text.mixture import Mixture, MixtureReader, mixture_files, read_sources
from pipeline.text.packing import ATTENTIONS, DOCUMENT_STARTS, ExampleRows, RowPacker, RowRule, row_rule
from pipeline.text.parallel import BatchEncoder, encoder
from pipeline.text.tokenizer import load_tokenizer, tokenizer_hash, vocab_size
from pipeline.text.units import Unit, owned_units, plan_digest, plan_units, unit_documents


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...] = option((), f"Corpus files or directories ({ACCEPTED}), or - for standard input (JSON "
                                     "lines or text); repeat --input.")
    out: str = option("", "Directory of the tokens store to write.")
    tokenizer: str = option("data/tokenizer", "Local Hugging Face tokenizer directory.")
    seq_len: int = option(256, "Tokens per row (the model's context length for training).")
    format: str = option("text", "Input records: 'text' (documents; every token is trained on), 'prompt-response' "
                         "(JSONL prompt and response fields) or 'chat' (JSONL message lists, rendered with the "
                         "tokenizer's chat template): these two store a loss_mask, so stage two trains on responses "
                         "only; or 'ids' (JSONL prompt_ids, completion_ids and optional completion_logprobs, as "
                         "distill generate writes them: stored as given, one example per row, for on-policy stages).")
    prompt_field: str = option("", "JSONL field of the prompt (--format prompt-response; default 'prompt').")
    response_field: str = option("", "JSONL field of the response (--format prompt-response; default 'response').")
    messages_field: str = option("", "JSONL field of the list of {role, content} messages (--format chat; default "
                                 "'messages'); 'assistant' messages are the responses.")
    text_field: str = option("text", "JSONL field, or Parquet/Arrow column, that holds the document text.")
    skip_unknown: bool = option(False, "Leave out files under an --input directory that are of no kind distill "
                                "reads (listed in the index as skipped_inputs) instead of stopping.")
    txt_documents: str = option("file", "How .txt files split into documents: 'file' or 'paragraph' (blank lines).")
    skip_bad_utf8: bool = option(False, "Skip (and count) lines that are not UTF-8 instead of stopping.")
    document_start: str = option("", "What each document begins with: 'bos' (the tokenizer's BOS) or 'none'; "
                                 "default what the tokenizer itself does (a BOS where it adds one). --format text.")
    row_start: str = option("", "What a row that begins inside a document begins with: 'bos' (in place of the "
                            "token it shares with the row before) or 'none'; default as --document-start.")
    attention: str = option("causal", "'causal' (a token sees everything before it in its row) or 'document' (only "
                            "its own document, positions counted from its start): recorded in the store, and "
                            "stage one, stage two and eval attend so.")
    backend: str = option("zarr", "Store backend: 'zarr' (v3, sharded, zstd) or 'arrow' (IPC, zstd).")
    rows_per_shard: int = option(4096, "Rows per store shard.")
    chunk_rows: int = option(64, "Rows per compressed chunk inside a shard (the unit a reader decodes).")
    batch_documents: int = option(512, "Documents tokenized per batch.")
    sources: str = option("", "Instead of --input: a YAML list of weighted sources, {path, weight} or {path, tokens} "
                          "each, interleaved so that each source's share of the store's tokens is its weight "
                          "(pipeline/text/mixture.py).")
    workers: int = option(1, "Processes that tokenize batches in parallel (order kept: the store is the same for "
                          "any number); give each its own core.")
    shard_index: int = option(0, "This task's index among --num-shards tasks (a SLURM array task id): it tokenizes "
                              "its share of the input; `distill merge OUT` then writes the store (--format text).")
    num_shards: int = option(1, "Number of tasks sharing the input; the merged store is the one a single process "
                             "writes.")
    overwrite: bool = option(False, "Replace an existing store built with different parameters.")
    trust_remote_code: bool = option(False, "Allow the tokenizer directory's own code to run.")

    def __post_init__(self):
        problems = required(self, "out")
        if bool(self.inputs) == bool(self.sources):
            problems.append("pass --input FILE_OR_DIR (repeatable) or --sources MIX.yaml, one of the two")
        if self.sources and self.format != "text":
            problems.append(f"--sources mixes documents (--format text); --format {self.format} reads --input alone")
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
        for name, allowed in (("document_start", ("", *DOCUMENT_STARTS)), ("row_start", ("", *DOCUMENT_STARTS)),
                              ("attention", ATTENTIONS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(a for a in allowed if a)}, "
                                f"got {getattr(self, name)!r}")
        if self.backend not in store_lib.BACKENDS:
            problems.append(f"backend must be one of {', '.join(store_lib.BACKENDS)}, got {self.backend!r}")
        for name in ("rows_per_shard", "chunk_rows", "batch_documents", "workers", "num_shards"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive")
        if not 0 <= self.shard_index < max(self.num_shards, 1):
            problems.append(f"shard_index must be in [0, {self.num_shards}) (one of --num-shards tasks), "
                            f"got {self.shard_index}")
        if self.num_shards > 1:
            if self.overwrite:
                problems.append("--overwrite with --num-shards > 1 would let each task delete what the others wrote; "
                                "remove the old store once, then run the tasks without --overwrite")
            if self.format != "text":
                problems.append(f"--num-shards is for --format text; --format {self.format} is prepared by one "
                                "process (with --workers)")
            if "-" in self.inputs:
                problems.append("--input - (standard input) cannot be shared between --num-shards tasks; save it "
                                "to a file first")
            if self.sources:
                problems.append("--sources interleaves its sources in one stream, which --num-shards tasks cannot "
                                "split yet; prepare a mixture in one process (with --workers)")
        if self.workers > 1 and self.format == "ids":
            problems.append("--workers tokenizes in parallel, and --format ids tokenizes nothing; drop --workers")
        check(problems, "prepare")


def prepare(config: PrepareConfig) -> Path:
    with _stdin_spooled(config) as paths:
        return _prepare(config, paths)


def _prepare(config: PrepareConfig, paths: tuple[str, ...]) -> Path:
    # --- setup: inputs, tokenizer, and what decides the store's content ---
    mixture = read_sources(config.sources) if config.sources else None
    if mixture is not None:
        source_files, left_out = mixture_files(mixture, config.skip_unknown)
        inputs = Inputs([f for files in source_files for f in files], left_out)
    else:
        inputs = find_inputs(paths, skip_unknown=config.skip_unknown)
    files = inputs.files
    if inputs.skipped:
        shown = ", ".join(map(str, inputs.skipped[:3])) + (f" and {len(inputs.skipped) - 3} more"
                                                           if len(inputs.skipped) > 3 else "")
        print(f"prepare: left out {len(inputs.skipped)} file(s) of no kind distill reads (--skip-unknown): {shown}")
    tokenizer = load_tokenizer(config.tokenizer, config.trust_remote_code)
    examples = config.format != "text"
    if examples:
        _check_example_inputs(config, files, tokenizer)
    rule = row_rule(tokenizer, config.document_start, config.row_start, config.attention, not examples)
    params = _store_params(config, files, tokenizer, mixture) | rule.params()
    out = real_out(config.out)
    if store_lib.existing_store(out, "tokens", config.backend, params, config.overwrite) == "done":
        print(f"{out}: complete store with the same parameters already exists; nothing to do")
        return out

    if config.format == "ids":
        return _prepare_ids(config, files, tokenizer, params, out, inputs.skipped)
    if config.num_shards > 1:
        return _prepare_task(config, files, tokenizer, params, out, inputs.skipped)

    # --- loop: stream documents (or examples) → token stream → rows → shards ---
    if mixture is not None:  # documents come tokenized: the mixture counts tokens to keep the shares
        reader = MixtureReader(mixture, source_files, batch_encoder(tokenizer), config.text_field, config.txt_documents,
                               config.skip_bad_utf8, config.batch_documents,
                               tokens_around=1 + (rule.document_start == "bos"))
    else:
        reader = _reader(config, files, tokenizer)
    packer = RowPacker(config.seq_len, config.rows_per_shard, tokenizer.eos_token_id, flags=examples,
                       **_packer_starts(rule))
    writer = _ShardWriter(out, config.backend, config.chunk_rows, store_lib.token_dtype(params["vocab_size"]))
    texts_of = (lambda batch: [text for pieces in batch for text, _ in pieces]) if examples else (lambda batch: batch)
    try:
        # The bar is closed before any error propagates, so the error prints on a line of its own.
        with BatchEncoder(tokenizer, config.workers) as encoder, \
                tqdm(desc="prepare", unit="tok", unit_scale=True, dynamic_ncols=True) as progress:
            batches = _batches(iter(reader), config.batch_documents)
            # a mixture's documents come as token ids (it tokenizes to keep its shares): nothing to encode
            pairs = ((b, b) for b in batches) if mixture is not None else encoder.map(batches, texts_of)
            for batch, encoded in pairs:
                before = packer.total_tokens
                if examples:
                    encoded = iter(encoded)
                    for pieces in batch:
                        packer.add_example([next(encoded) for _ in pieces], [response for _, response in pieces])
                else:
                    for ids in encoded:
                        packer.add_document(ids)
                progress.update(packer.total_tokens - before)
                writer.write(packer.full_shards())
            writer.write(packer.finish())
    except BaseException:
        writer.discard()
        raise
    if not writer.shards:
        writer.discard()
        _raise_too_little(reader, packer)

    # --- finish: index last, then the whole store renamed into place ---
    index = writer.index(params, packer, documents=reader.stats.documents, skipped_lines=reader.stats.skipped_lines,
                         examples=examples, skipped_inputs=inputs.skipped)
    if mixture is not None:
        index["mixture"] = reader.facts()
    writer.commit(index, config)
    if mixture is not None:
        print(reader.summary())
    rows = index["rows"]
    skipped = f", skipped {reader.stats.skipped_lines} non-UTF-8 lines" if reader.stats.skipped_lines else ""
    trained = f"; {writer.loss_tokens} response targets in the loss, {packer.padding_tokens} padding" if examples else ""
    print(f"{out}: {rows} rows x {config.seq_len} tokens from {reader.stats.documents} "
          f"{'examples' if examples else 'documents'} ({packer.total_tokens} tokens{skipped}{trained})")
    return out


def _prepare_ids(config: PrepareConfig, files: list[Path], tokenizer, params: dict, out: Path,
                 skipped_inputs: list[Path]) -> Path:
    """``--format ids``: each record's ids in a row of its own, checked and stored as they are."""
    reader = IdsReader(files, params["vocab_size"], config.skip_bad_utf8)
    records = iter(reader)
    first = next(records, None)
    if first is None:
        raise DistillError(f"{', '.join(map(str, files))} holds no records; --format ids reads distill generate's "
                           "generated.jsonl")
    packer = ExampleRows(config.seq_len, config.rows_per_shard, tokenizer.eos_token_id, reader.with_logprobs)
    writer = _ShardWriter(out, config.backend, config.chunk_rows, store_lib.token_dtype(params["vocab_size"]))
    try:
        with tqdm(desc="prepare", unit="tok", unit_scale=True, dynamic_ncols=True) as progress:
            for example in itertools.chain([first], records):
                n = len(example.prompt_ids) + len(example.completion_ids)
                if n > config.seq_len:
                    raise DistillError(f"{example.where}: {n} tokens ({len(example.prompt_ids)} prompt + "
                                       f"{len(example.completion_ids)} completion) do not fit a row of {config.seq_len}, "
                                       "and an example is never split; raise --seq-len (or lower --max-new-tokens at "
                                       "generate)")
                packer.add(example.prompt_ids, example.completion_ids, example.completion_logprobs)
                progress.update(n)
                writer.write(packer.full_shards())
            writer.write(packer.finish())
    except BaseException:
        writer.discard()
        raise
    index = writer.index(params, packer, documents=reader.stats.documents, skipped_lines=reader.stats.skipped_lines,
                         examples=True, skipped_inputs=skipped_inputs)
    writer.commit(index, config)
    with_logprobs = " and behaviour_logprob" if reader.with_logprobs else ""
    print(f"{out}: {index['rows']} rows x {config.seq_len} tokens, one per record of {reader.stats.documents} "
          f"({writer.loss_tokens} completion targets in the loss{with_logprobs}, {packer.padding_tokens} padding)")
    return out


def _store_params(config: PrepareConfig, files: list[Path], tokenizer, mixture: Mixture | None = None) -> dict:
    """What decides the store's content: a rerun with the same params finds the store done."""
    vocab = vocab_size(tokenizer)
    params = {
        "tokenizer": str(config.tokenizer),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": vocab,
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": config.seq_len,
        "stride": config.seq_len - 1,
        "corpus_fingerprint": corpus_fingerprint(files, **_reading_options(config),
                                                 **(mixture.params() if mixture is not None else {})),
        "rows_per_shard": config.rows_per_shard,
        "chunk_rows": config.chunk_rows,
    }
    if mixture is not None:  # (a store of one input keeps the params it always had)
        params |= mixture.params()
    if config.format != "text":  # (a plain-text store keeps the params it always had)
        params["format"] = config.format
        if config.format == "chat":
            params["chat_template_sha256"] = chat_template_sha256(tokenizer)
        if config.format == "ids":  # which distributions behaviour_logprob is of: the policy gradient checks them
            params["samplers"] = read_samplers(files, config.skip_bad_utf8)
    return params


def _packer_starts(rule: RowRule) -> dict:
    """The packer's document-start and row-start tokens under ``rule`` (None: nothing added)."""
    return {"document_start_id": rule.bos_token_id if rule.document_start == "bos" else None,
            "row_start_id": rule.bos_token_id if rule.row_start == "bos" else None}


def _reader(config: PrepareConfig, files: list[Path], tokenizer) -> DocumentReader | ExampleReader:
    """Documents (strings) for --format text; examples (lists of (text, is_response) pieces) otherwise."""
    if config.format != "text":
        return ExampleReader(files, config.format, tokenizer=tokenizer, skip_bad_utf8=config.skip_bad_utf8,
                             **_example_fields(config))
    return DocumentReader(files, config.text_field, config.txt_documents, config.skip_bad_utf8)


batch_encoder = encoder  # texts → token ids without special tokens (pipeline/text/parallel.py)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch


class _ShardWriter:
    """Shards of packed rows into a temp directory beside ``out``, renamed into place by :meth:`commit`
    once the index is written, so an existing store is never half-replaced."""

    def __init__(self, out: Path, backend: str, chunk_rows: int, dtype: np.dtype):
        self.out, self.backend, self.chunk_rows, self.dtype = out, backend, chunk_rows, dtype
        self.tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.shards: list[dict] = []
        self.loss_tokens = 0  # examples only: positions whose loss_mask is 1
        self.behaviour = False  # the shards hold behaviour_logprob (--format ids with completion_logprobs)

    def write(self, shards: Iterator[dict[str, np.ndarray]]) -> None:
        for arrays in shards:
            self.behaviour = self.behaviour or "behaviour_logprob" in arrays
            arrays["input_ids"] = arrays["input_ids"].astype(self.dtype)
            if "loss_mask" in arrays:
                self.loss_tokens += int(arrays["loss_mask"].sum())
            name = store_lib.shard_name(len(self.shards), self.backend)
            self.shards.append(store_lib.write_shard(self.tmp, name, arrays, self.backend, self.chunk_rows))

    def index(self, params: dict, packer: RowPacker, documents: int, skipped_lines: int, examples: bool,
              skipped_inputs: list[Path]) -> dict:
        rows = sum(s["rows"] for s in self.shards)
        arrays = {"input_ids": {"dtype": self.dtype.name, "shape": [packer.row_len]}}
        facts = {}
        if examples:
            arrays["loss_mask"] = {"dtype": "uint8", "shape": [packer.row_len]}
            if self.behaviour:
                arrays["behaviour_logprob"] = {"dtype": "float32", "shape": [packer.row_len]}
            facts = {"loss_tokens": self.loss_tokens, "padding_tokens": packer.padding_tokens}
        if skipped_inputs:  # (--skip-unknown) what was left out is on record, never a silent skip
            facts["skipped_inputs"] = [str(p) for p in skipped_inputs]
        return store_lib.new_index(
            "tokens", self.backend, params, self.shards,
            arrays=arrays,
            documents=documents,
            tokens=packer.total_tokens,
            target_tokens=rows * packer.stride,
            dropped_tokens=packer.dropped_tokens,
            skipped_lines=skipped_lines,
            **facts,
        )

    def commit(self, index: dict, config: PrepareConfig, facts: dict | None = None) -> None:
        save_resolved(config, self.tmp / "config.json", facts)
        store_lib.write_index(self.tmp, index)
        try:  # OUT was checked before the corpus was read; whatever was put there since is not replaced either
            claim(self.out, STORE, config.overwrite)
        except DistillError:
            self.discard()
            raise
        replace_dir(self.tmp, self.out)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------- array tasks and their merge
#
# One token stream is cut into rows with stride seq_len - 1 and shards of rows_per_shard rows, so the
# row a document lands in depends on every token before it: a task cannot cut its own rows until the
# tasks before it are done. So a task (``--shard-index i --num-shards n``) only tokenizes: the units
# it owns (pipeline/text/units.py: files, row-group runs, line ranges) become stream pieces in OUT,
# one Arrow IPC file per unit (a list of token ids per document), each recorded in the task's partial
# index once it is renamed into place. ``distill merge OUT`` then replays the pieces, in unit order,
# through the same RowPacker and shard writer as one process, and swaps the finished store in for OUT:
# the store is the one a single process writes, byte for byte. Merge re-tokenizes nothing; it reads
# the pieces once (about 2-4 bytes per token) and holds one shard and one record batch in memory.

PIECE = "piece-{:06d}.arrow"


def _prepare_task(config: PrepareConfig, files: list[Path], tokenizer, params: dict, out: Path,
                  skipped_inputs: list[Path]) -> Path:
    """Task ``shard_index`` of ``num_shards``: its units as stream pieces, recorded in its partial index."""
    i, n = config.shard_index, config.num_shards
    _check_task_count(out, i, n)
    units = plan_units(files)
    owned = owned_units(units, i, n)
    plan = {"units": len(units), "plan_sha256": plan_digest(units),
            "skipped_inputs": [str(p) for p in skipped_inputs], "owned": [u.number for u in owned]}
    dtype = store_lib.token_dtype(params["vocab_size"])
    arrays = {"input_ids": {"dtype": dtype.name, "shape": [config.seq_len]}}
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = store_lib.JobLock(out, i, n)  # one process per task at a time
    part_path = store_lib.partial_index_path(out, i, n)
    done: dict[int, dict] = {}
    try:
        earlier = store_lib.read_partial_index(part_path).get("pieces") or {}
        same_plan = all(earlier.get(k) == plan[k] for k in ("units", "plan_sha256"))
        done = {e["unit"]: e for e in earlier.get("done", []) if same_plan and (out / e["name"]).is_file()}
        lock.remove_stale_temps([*(PIECE.format(u.number) for u in owned), part_path.name,
                                 f"config.part-{i:05d}.json"])

        def record() -> None:
            pieces = {**plan, "done": [done[u] for u in sorted(done)]}
            store_lib.write_partial_index(part_path, params, config.backend, arrays, [], pieces=pieces)

        record()  # before any piece: OUT reads as a store being built, never as a stranger's directory
        save_resolved(config, out / f"config.part-{i:05d}.json", {"params": params, "units": plan["owned"]})
        todo = [u for u in owned if u.number not in done]
        with BatchEncoder(tokenizer, config.workers) as encoder, \
                tqdm(desc=f"prepare {i}/{n}", unit="tok", unit_scale=True, dynamic_ncols=True) as progress:
            for unit in todo:
                done[unit.number] = _write_piece(out, unit, files[unit.file], config, encoder, dtype, progress)
                record()
    except BaseException as e:
        # Bad input: the files must change, and with them the corpus fingerprint, so nothing this task
        # wrote can be used again: it goes. Anything else (a kill, a full disk) keeps what is recorded.
        if isinstance(e, DistillError) or not done:
            for path in [*(out / entry["name"] for entry in done.values()), part_path,
                         out / f"config.part-{i:05d}.json", lock.path]:
                path.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if no other task has written there meanwhile
        raise
    finally:
        lock.release()
    tokens = sum(e["tokens"] for e in done.values())
    print(f"{out}: task {i} of {n} tokenized {len(owned)} of {len(units)} units ({len(todo)} now, {tokens} tokens); "
          f"once every task has finished, run: distill merge {out}")
    return out


def _check_task_count(out: Path, i: int, n: int) -> None:
    """Tasks of one store agree on how many they are (each one's share depends on it)."""
    counts = {int(m.group(2)) for p in out.glob(store_lib.PARTIAL_GLOB) if (m := store_lib.PARTIAL_NAME.match(p.name))}
    if counts - {n}:
        raise DistillError(f"{out} is being prepared by {', '.join(map(str, sorted(counts - {n})))} tasks, and this is "
                           f"task {i} of {n}; run every task with the same --num-shards (or remove {out})")


def _write_piece(out: Path, unit: Unit, path: Path, config: PrepareConfig, encoder: BatchEncoder, dtype: np.dtype,
                 progress: tqdm) -> dict:
    """One unit's documents, tokenized, as an Arrow IPC file of one ``ids`` column (a list of token ids
    per document), written under a temp name and renamed. Returns its partial-index entry."""
    import pyarrow as pa

    name = PIECE.format(unit.number)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    reader = DocumentReader([path], config.text_field, config.txt_documents, config.skip_bad_utf8)
    schema = pa.schema([("ids", pa.list_(pa.from_numpy_dtype(dtype)))])
    tokens = 0
    with removed_if_failed(tmp):
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as piece:
            for _, encoded in encoder.map(_batches(unit_documents(unit, path, reader), config.batch_documents),
                                          lambda batch: batch):
                lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                values = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(offsets[-1]))
                ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(schema.field("ids").type)
                piece.write_batch(pa.record_batch([ids], schema=schema))
                tokens += int(offsets[-1])
                progress.update(int(offsets[-1]) + len(encoded))  # (EOS included, as one process counts)
        os.replace(tmp, out / name)
    return {"unit": unit.number, "name": name, "bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name),
            "documents": reader.stats.documents, "tokens": tokens, "skipped_lines": reader.stats.skipped_lines}


def building_tokens(root: Path) -> bool:
    """Does ``root`` hold the partial indexes of prepare tasks (stream pieces) rather than of stage one?"""
    return any("pieces" in store_lib.read_partial_index(p) for p in sorted(Path(root).glob(store_lib.PARTIAL_GLOB)))


def merge_tokens(root: Path) -> Path:
    """``distill merge`` of a tokens store the prepare tasks filled: check that their partial indexes
    agree and cover every unit, then replay the pieces in unit order into the store one process would
    write, built beside ``root`` and swapped in for it (pieces and partial indexes go with the old)."""
    root = Path(root)
    paths = [p for p in sorted(root.glob(store_lib.PARTIAL_GLOB)) if store_lib.PARTIAL_NAME.match(p.name)]
    parts = {p: store_lib.read_partial_index(p) for p in paths}
    counts = {int(store_lib.PARTIAL_NAME.match(p.name).group(2)) for p in paths}
    if len(counts) != 1:
        raise DistillError(f"{root}: partial indexes of {' and '.join(map(str, sorted(counts)))} tasks; every task "
                           "must be run with the same --num-shards: remove the store and run them again")
    n = counts.pop()
    first = next(iter(parts.values()))
    for path, body in parts.items():
        if body["params"] != first["params"] or body["backend"] != first["backend"]:
            what = "; ".join(store_lib.param_differences(first["params"], body["params"])) or "backend"
            raise DistillError(f"{root}: {path.name} was written with different parameters ({what}); rerun the odd "
                               "task with the same options as the others")
        if body["pieces"]["plan_sha256"] != first["pieces"]["plan_sha256"]:
            raise DistillError(f"{root}: {path.name} cut the corpus into other units (another distill version, or the "
                               "files changed); rerun every task with the same distill and files")
    params, backend = first["params"], first["backend"]
    locks = []
    try:
        for job in range(n):  # no task may be writing while its pieces are read (a running one is named)
            locks.append(store_lib.JobLock(root, job, n))
        entries = {}
        for body in parts.values():
            for entry in body["pieces"]["done"]:
                store_lib.safe_child(root, entry["name"])
                entries[entry["unit"]] = entry
        units = first["pieces"]["units"]
        missing = [u for u in range(units) if u not in entries or not (root / entries[u]["name"]).is_file()]
        ran = {int(store_lib.PARTIAL_NAME.match(p.name).group(1)) for p in paths}
        if missing or len(ran) < n:
            owners = sorted({int(store_lib.PARTIAL_NAME.match(p.name).group(1)) for p, b in parts.items()
                             if set(b["pieces"]["owned"]) & set(missing)} | (set(range(n)) - ran))
            raise DistillError(f"{root}: {len(missing)} of {units} units are not tokenized yet"
                               f"{f', and {n - len(ran)} of {n} tasks have not started' if len(ran) < n else ''}; "
                               f"run (or rerun) task(s) {', '.join(map(str, owners))} of {n}, then merge again")
        for u in range(units):
            if file_sha256(root / entries[u]["name"]) != entries[u]["sha256"]:
                raise DistillError(f"{root}: {entries[u]['name']} does not match its partial index (damaged); delete "
                                   "it and rerun the task that owns it, then merge again")
        # the tasks' rule (document-start BOS, row-start BOS) is the params': the rows are cut as one process cuts them
        packer = RowPacker(params["seq_len"], params["rows_per_shard"], params["eos_token_id"],
                           **_packer_starts(RowRule.of(params)))
        writer = _ShardWriter(root, backend, params["chunk_rows"], store_lib.token_dtype(params["vocab_size"]))
        try:
            for u in range(units):
                for documents in _piece_batches(root / entries[u]["name"]):
                    for ids in documents:
                        packer.add_document(ids)
                    writer.write(packer.full_shards())
            writer.write(packer.finish())
        except BaseException:
            writer.discard()
            raise
        stats = ReadStats(sum(e["documents"] for e in entries.values()), sum(e["skipped_lines"] for e in entries.values()))
        if not writer.shards:
            writer.discard()
            _raise_too_little(SimpleNamespace(stats=stats), packer)
        index = writer.index(params, packer, documents=stats.documents, skipped_lines=stats.skipped_lines,
                             examples=False, skipped_inputs=[Path(p) for p in first["pieces"]["skipped_inputs"]])
        config = _task_config(root, n)
        writer.commit(index, config, {"merged_from_tasks": n})
    finally:
        for lock in locks:
            lock.release()
    print(f"{root}: merged {units} units of {n} tasks into {index['rows']} rows x {params['seq_len']} tokens from "
          f"{stats.documents} documents ({packer.total_tokens} tokens)")
    return root


def _piece_batches(path: Path) -> Iterator[list[np.ndarray]]:
    """A piece's documents' token ids, a record batch (a tokenized batch of documents) at a time."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for b in range(reader.num_record_batches):
            ids = reader.get_batch(b).column(0)
            offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
            yield [values[offsets[d]:offsets[d + 1]] for d in range(len(ids))]


def _task_config(root: Path, n: int) -> PrepareConfig:
    """The config the merged store records: task 0's (the first task's found), as one process would run it."""
    import json

    for job in range(n):
        path = root / f"config.part-{job:05d}.json"
        if path.is_file():
            body = json.loads(path.read_text())["config"]
            return load_config(PrepareConfig, None, **{**body, "shard_index": 0, "num_shards": 1})
    raise DistillError(f"{root}: no task saved its config (config.part-*.json); rerun the tasks")


def _raise_too_little(reader: DocumentReader | ExampleReader, packer: RowPacker) -> None:
    if not reader.stats.documents and reader.stats.skipped_lines:
        raise DistillError(f"the corpus holds no UTF-8 text: all {reader.stats.skipped_lines} lines were skipped "
                           "as non-UTF-8 (--skip-bad-utf8); is this a text corpus? convert it to UTF-8")
    raise DistillError(f"the corpus yields {packer.total_tokens} tokens from {reader.stats.documents} documents, "
                       f"fewer than one row of {packer.row_len}; add text or lower --seq-len")


def _example_fields(config: PrepareConfig) -> dict[str, str]:
    """The record fields an example format reads, defaults filled in."""
    if config.format == "chat":
        return {"messages_field": config.messages_field or "messages"}
    if config.format == "ids":
        return {}
    return {"prompt_field": config.prompt_field or "prompt", "response_field": config.response_field or "response"}


def _reading_options(config: PrepareConfig) -> dict:
    """The options that change what is read from the same files (they enter the corpus fingerprint)."""
    if config.format == "text":
        return {"text_field": config.text_field, "txt_documents": config.txt_documents,
                "skip_bad_utf8": config.skip_bad_utf8}
    return {"format": config.format, **_example_fields(config), "skip_bad_utf8": config.skip_bad_utf8}


def _check_example_inputs(config: PrepareConfig, files: list[Path], tokenizer) -> None:
    """Example formats read JSONL records, and chat needs a template: refused before anything is written."""
    text_files = [f for f in files if (input_kind(f) or ("",))[0] != "jsonl"]
    if text_files:
        what = "no token ids" if config.format == "ids" else "no prompts or responses to mask"
        raise DistillError(f"--format {config.format} reads JSONL records, and {text_files[0]} is not JSON lines "
                           f"({what}); pass .jsonl files, or --format text to train on every token")
    if config.format == "chat":
        require_chat_template(tokenizer, config.tokenizer)


@contextlib.contextmanager
def _stdin_spooled(config: PrepareConfig) -> Iterator[tuple[str, ...]]:
    """``--input -``: standard input copied (a block at a time) to a private temp file beside OUT,
    read like any file and removed after, so that the store's corpus fingerprint is the content's (a
    rerun of the same text finds the store done) and a pipe is read once. JSON lines when its first
    character other than blank space is ``{``, else text. Yields the inputs with ``-`` replaced by that
    file (the saved config keeps ``-``)."""
    if "-" not in config.inputs:
        yield config.inputs
        return
    if config.inputs.count("-") > 1:
        raise DistillError("--input - (standard input) is given more than once; pass it once")
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix=f".{out.name}.stdin-", dir=out.parent))
    try:
        source = sys.stdin.buffer
        head = source.read(BLOCK)
        first = head.lstrip()[:1]
        path = spool / ("stdin.jsonl" if first == b"{" else "stdin.txt")
        with open(path, "wb") as f:
            while head:
                f.write(head)
                head = source.read(BLOCK)
        if path.stat().st_size == 0:
            raise DistillError("--input -: standard input is empty; pipe JSON lines or text into distill prepare")
        yield tuple(str(path) if item == "-" else item for item in config.inputs)
    finally:
        shutil.rmtree(spool, ignore_errors=True)

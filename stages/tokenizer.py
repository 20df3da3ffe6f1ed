"""Train the project's byte-level BPE tokenizer on a corpus and save it in Hugging Face format."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import check, option, required, save_resolved
from pipeline.errors import DistillError
from pipeline.io import real_out, replace_dir
from pipeline.outdir import TOKENIZER, claim
from pipeline.text.corpus import DocumentReader, expand_inputs


@dataclass(frozen=True)
class TokenizerConfig:
    inputs: tuple[str, ...] = option((), "Corpus files or directories (txt, txt.gz, jsonl, jsonl.gz).")
    out: str = option("", "Directory to write the tokenizer to (Hugging Face format).")
    vocab_size: int = option(8192, "Vocabulary size, EOS included.")
    min_frequency: int = option(2, "Minimum pair count for a merge.")
    text_field: str = option("text", "JSONL field holding the document text.")
    overwrite: bool = option(False, "Replace an existing tokenizer directory.")

    def __post_init__(self):
        problems = required(self, "inputs", "out")
        if self.vocab_size < 257:
            problems.append(f"vocab_size must be at least 257 (256 bytes + EOS), got {self.vocab_size}")
        check(problems, "tokenizer")


def train_tokenizer(config: TokenizerConfig) -> Path:
    out = real_out(config.out)
    _check_out(out, config.overwrite)
    reader = DocumentReader(expand_inputs(config.inputs), text_field=config.text_field)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    from pipeline.text.tokenizer import train_bpe

    try:
        train_bpe(iter(reader), config.vocab_size, tmp, config.min_frequency)
        if reader.stats.documents == 0:
            raise DistillError("the corpus holds no documents; check --input and --text-field")
        save_resolved(config, tmp / "distill_config.json", {"documents": reader.stats.documents})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-made is left beside OUT
        raise
    try:  # checked again: training took a while, and OUT may hold something else by now
        _check_out(out, config.overwrite)
    except DistillError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    """OUT may be missing or empty, or, with ``overwrite``, a tokenizer distill wrote; anything else
    there is refused in one line (:func:`claim`)."""
    if claim(out, TOKENIZER, overwrite) and not overwrite:
        raise DistillError(f"{out} already holds a tokenizer; pass --overwrite to replace it")

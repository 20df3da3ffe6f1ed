"""Tokenizers: train the project's byte-level BPE, load any local Hugging Face tokenizer, hash one."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from pipeline.errors import DistillError

EOS = "<|endoftext|>"


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """A local Hugging Face tokenizer (never downloaded); it must have an EOS token for packing.

    ``trust_remote_code`` is passed explicitly (never left unset): a tokenizer directory whose
    ``tokenizer_config.json`` has an ``auto_map`` (its own Python code, which may come from a store's
    params or a shared config) would otherwise get transformers' interactive prompt. Without it, such a
    directory is one line saying so; no code from it runs."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DistillError(f"tokenizer path {path} does not exist; pass a local Hugging Face tokenizer directory")
    if not trust_remote_code and (custom := _custom_code(path)):
        raise DistillError(f"tokenizer at {path} runs its own code ({custom}); pass --trust-remote-code only if "
                           "you trust that directory, or use a tokenizer without custom code")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot load a tokenizer from {path} ({' '.join(str(e).split())[:200]}); pass a "
                           "Hugging Face tokenizer directory (tokenizer.json or tokenizer_config.json)") from None
    if tokenizer.eos_token_id is None:
        raise DistillError(f"tokenizer at {path} has no EOS token; documents cannot be separated")
    return tokenizer


def _custom_code(path: Path) -> str:
    """The custom classes a tokenizer directory asks for (its ``auto_map`` in tokenizer_config.json or
    config.json), or "" for none."""
    import json

    for name in ("tokenizer_config.json", "config.json"):
        try:
            body = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = body.get("auto_map") if isinstance(body, dict) else None
        if isinstance(auto_map, dict) and (entry := auto_map.get("AutoTokenizer")):
            classes = [c for c in (entry if isinstance(entry, list) else [entry]) if isinstance(c, str)]
            return f"auto_map AutoTokenizer → {', '.join(classes) or entry!r} in {name}"
    return ""


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full serialised definition (vocab, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # slow tokenizers: the vocabulary is the part that decides the ids
        body = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can emit (base vocabulary plus added tokens)."""
    return len(tokenizer)


def train_bpe(documents: Iterable[str], vocab_size: int, out: Path, min_frequency: int = 2) -> None:
    """Train a byte-level BPE (GPT-2 style, EOS as its one special token) and save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=None)
    wrapped.model_max_length = 1 << 30
    wrapped.save_pretrained(str(out))

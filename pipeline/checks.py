"""Compatibility checks between the things a stage puts together: a store, a tokenizer, a model.

One function per check, so that every stage refuses the same mismatch with the same one-line message
(what was wrong and what to do).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DistillError


def check_store_fits(store, role: str, tokenizer_hash: str | None = None, vocab: int | None = None,
                     positions: int | None = None, model: str = "model") -> None:
    """``store`` (called ``role`` in messages) was made with this tokenizer (its hash), this vocabulary
    size, and rows no longer than ``model``'s ``positions``; a check is skipped where its value is None."""
    params = store.params
    if tokenizer_hash is not None and params.get("tokenizer_hash") != tokenizer_hash:
        raise DistillError(f"{role} {store.root} was made with another tokenizer (hash "
                           f"{str(params.get('tokenizer_hash'))[:12]} vs {tokenizer_hash[:12]}); "
                           "pass the tokenizer it was prepared with")
    if vocab is not None and params.get("vocab_size") != vocab:
        raise DistillError(f"{role} {store.root} has vocab size {params.get('vocab_size')}, the tokenizer {vocab}; "
                           "pass the tokenizer it was prepared with")
    if positions is not None and params["seq_len"] > positions:
        raise DistillError(f"{role} {store.root} has sequence length {params['seq_len']}, above the {model}'s "
                           f"maximum of {positions} positions; re-run prepare with --seq-len {positions} or less")


def check_output_rows(role: str, path: str | Path, rows: int, vocab: int, fix: str,
                      max_padding: int | None = None) -> None:
    """A model's ``rows`` output rows cover the tokenizer's ``vocab`` ids (and, with ``max_padding``,
    exceed them by no more than padding would)."""
    if rows < vocab:
        raise DistillError(f"{role} {path} predicts {rows} ids but the tokenizer has {vocab}: its output rows are "
                           f"fewer than the tokenizer's {vocab} ids; {fix}")
    if max_padding is not None and rows - vocab > max_padding:
        raise DistillError(f"{role} {path} predicts {rows} ids, far more than the tokenizer's {vocab}; "
                           "they do not belong together (padding is at most a few hundred rows)")

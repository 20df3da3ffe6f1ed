"""Packing a token stream into the overlapping rows of a ``tokens`` store.

Documents (or task examples) are appended to one token stream, each closed by EOS. The stream is cut
into rows of ``seq_len`` tokens with a stride of ``seq_len − 1``: consecutive rows share one token,
so every token after the first is a next-token target exactly once (position t of a row predicts
position t+1). What is left shorter than a row at the end is dropped and counted.

For task examples each token also carries a flag (1: a response token, or the EOS closing an example
that ends in a response), and the rows get a ``loss_mask``: position t is 1 where its *target*,
token t+1, is flagged. An example that fits in a row but not in what is left of the current one
starts the next row, the rest of this one padded with EOS (flag 0); the last row is padded too, so
no example is dropped.

How a row starts and what it attends to (``distill prepare --document-start``, ``--row-start``,
``--attention``; :class:`RowRule`, recorded in the store's params, docs/FORMAT.md): with
``document_start == "bos"`` each document is ``BOS, its tokens, EOS`` in the stream; with
``row_start == "bos"`` a row that begins *inside* a document (its first two tokens in one document)
holds BOS at position 0 in place of the token it shares with the row before. Position 0 is never a
target (it is the previous row's last token), so every token after the first is still a target
exactly once; only the first prediction's context changes, from one token of the document to BOS.
A document begins at position 0 of a row and after every EOS, so ``--attention document`` is
derived from ``input_ids`` alone (:meth:`RowRule.position_ids`).

:class:`RowPacker` holds only the stream not yet cut into a full shard of rows, so memory is bounded
by one shard plus what the caller appends between two calls of :meth:`RowPacker.full_shards`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DOCUMENT_STARTS = ("bos", "none")
ATTENTIONS = ("causal", "document")


@dataclass(frozen=True)
class RowRule:
    """How a ``tokens`` store's rows begin and attend: what every reader of its rows (stage one, stage
    two, eval) must do alike. A store whose params do not say (every store before this rule, and a
    default store of a tokenizer that adds no BOS) is ``none``/``none``/``causal``: rows as cut.

    - ``document_start``: ``bos`` — each document begins with ``bos_token_id`` in the stream;
    - ``row_start``: ``bos`` — a row that begins inside a document holds ``bos_token_id`` at position 0;
    - ``attention``: ``document`` — each token attends only within its own document of the row (a
      document begins at position 0 and after every EOS), with positions counted from its start.

    A BOS is never a target: it is not predicted, so the positions whose target is ``bos_token_id``
    (the EOS before each document start) are out of the loss and the scores (:meth:`target_mask`).
    """

    document_start: str = "none"
    row_start: str = "none"
    attention: str = "causal"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> "RowRule":
        """The rule a store's params record (absent keys: the rows as cut, causal attention)."""
        if "attention" not in params:
            return cls()
        rule = cls(params.get("document_start"), params.get("row_start"), params["attention"],
                   params.get("bos_token_id"), params.get("eos_token_id"))
        if (rule.document_start not in DOCUMENT_STARTS or rule.row_start not in DOCUMENT_STARTS
                or rule.attention not in ATTENTIONS or not isinstance(rule.eos_token_id, int)
                or (rule.bos_token_id is None) != ("bos" not in (rule.document_start, rule.row_start))):
            from pipeline.errors import DistillError

            raise DistillError(f"the store's row rule is not one distill writes ({rule.describe()}, BOS "
                               f"{rule.bos_token_id}, EOS {rule.eos_token_id}); prepare the store again")
        return rule

    def params(self) -> dict[str, Any]:
        """The keys a store records for this rule; none for the default, so such a store is byte for
        byte the one a distill before the rule wrote."""
        if (self.document_start, self.row_start, self.attention) == ("none", "none", "causal"):
            return {}
        keys = {"document_start": self.document_start, "row_start": self.row_start, "attention": self.attention,
                "eos_token_id": self.eos_token_id}
        return keys | ({"bos_token_id": self.bos_token_id} if self.bos_token_id is not None else {})

    def describe(self) -> str:
        return f"document start {self.document_start}, row start {self.row_start}, attention {self.attention}"

    @property
    def masks_bos(self) -> bool:
        return self.bos_token_id is not None and "bos" in (self.document_start, self.row_start)

    def position_ids(self, input_ids):
        """``[B, L]`` positions counted from each document's start (0 at position 0 and after every
        EOS) for ``attention == "document"``, else None (the model's own ``0 … L−1``). A Hugging Face
        model given these, no attention mask and no cache attends within each document alone
        (transformers' packed-sequence masks; flash-attention's variable-length path)."""
        if self.attention != "document":
            return None
        from pipeline.models import document_position_ids

        return document_position_ids(input_ids, self.eos_token_id)

    def hidden_kwargs(self, input_ids) -> dict:
        """``{"position_ids": …}`` for :meth:`pipeline.models.OutputHead.hidden` under document
        attention, else ``{}`` (the call of every stage before the rule)."""
        position_ids = self.position_ids(input_ids)
        return {} if position_ids is None else {"position_ids": position_ids}

    def target_mask(self, input_ids):
        """``[B, L−1]`` bool, False where position t's target (token t+1) is a BOS, or None when
        the rule puts no BOS in the rows."""
        if not self.masks_bos:
            return None
        return input_ids[:, 1:] != self.bos_token_id


class RowPacker:
    """One token stream (with response flags if ``flags``) → shards of ``rows_per_shard`` overlapping rows.

    Each shard is a dict of ``input_ids [rows, seq_len]`` int64 and, with flags, ``loss_mask
    [rows, seq_len]`` uint8. Counts kept: ``total_tokens`` (appended, padding included),
    ``padding_tokens`` (EOS added for examples) and, after :meth:`finish`, ``dropped_tokens``.
    """

    def __init__(self, seq_len: int, rows_per_shard: int, eos_token_id: int, flags: bool = False,
                 document_start_id: int | None = None, row_start_id: int | None = None):
        """``document_start_id``: a token (BOS) put before each document; ``row_start_id``: the token
        that replaces position 0 of a row beginning inside a document (module docstring)."""
        self.row_len = seq_len
        self.stride = seq_len - 1
        self.rows_per_shard = rows_per_shard
        self.shard_tokens = rows_per_shard * self.stride + 1  # tokens that fill one shard of overlapping rows
        self.eos = np.array([eos_token_id], dtype=np.int64)
        self.flags = flags
        self.document_start = None if document_start_id is None else np.array([document_start_id], dtype=np.int64)
        self.row_start_id = row_start_id
        self._before: int | None = None  # the stream token before the pending buffer (None: the stream's start)
        self.total_tokens = 0
        self.padding_tokens = 0
        self.dropped_tokens = 0
        self._pending: list[np.ndarray] = []
        self._pending_flags: list[np.ndarray] = []
        self._pending_len = 0

    # ---- appending to the stream ----

    def add_document(self, ids: Sequence[int]) -> None:
        """A document's tokens (after the document-start token, if any), then EOS."""
        if self.document_start is not None:
            self._append(self.document_start)
        self._append(np.asarray(ids, dtype=np.int64))
        self._append(self.eos)

    def add_example(self, piece_ids: list[Sequence[int]], responses: list[bool]) -> None:
        """An example's pieces (prompt and response turns, tokenized), then EOS; started on a fresh row
        when it fits in a row but not in what is left of this one. ``responses[i]``: is piece i a
        response? The closing EOS is learnt where the example ends in a response."""
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in piece_ids] + [self.eos])
        flags = np.concatenate([np.full(len(p), response, dtype=np.uint8) for p, response in zip(piece_ids, responses)]
                               + [np.array([responses[-1]], dtype=np.uint8)])
        used = self.total_tokens % self.stride  # the next token's place in its row (0: it starts a row)
        if used and self.stride - used + 1 < len(ids) <= self.row_len:
            self._pad(self.stride - used)
        self._append(ids, flags)

    def _pad(self, count: int) -> None:
        self._append(np.full(count, self.eos[0]), np.zeros(count, dtype=np.uint8))
        self.padding_tokens += count

    def _append(self, ids: np.ndarray, flags: np.ndarray | None = None) -> None:
        self._pending.append(ids)
        if flags is not None:
            self._pending_flags.append(flags)
        self._pending_len += len(ids)
        self.total_tokens += len(ids)

    # ---- cutting rows ----

    def full_shards(self) -> Iterator[dict[str, np.ndarray]]:
        """Every full shard of rows the stream holds now; the rest stays pending."""
        if self._pending_len < self.shard_tokens:
            return
        buffer, flags = self._joined()
        while len(buffer) >= self.shard_tokens:
            yield self._rows(buffer, flags, self.rows_per_shard)
            self._before = int(buffer[self.rows_per_shard * self.stride - 1])
            buffer = buffer[self.rows_per_shard * self.stride:]
            flags = None if flags is None else flags[self.rows_per_shard * self.stride:]
        self._keep(buffer, flags)

    def finish(self) -> Iterator[dict[str, np.ndarray]]:
        """The last, shorter shard (if a row is left); examples pad the last row instead of dropping it."""
        if self.flags and self.total_tokens:
            self._pad(max(self.row_len - self.total_tokens, (1 - self.total_tokens) % self.stride))
        buffer, flags = self._joined()
        rows = (len(buffer) - 1) // self.stride if len(buffer) >= self.row_len else 0
        if rows:
            yield self._rows(buffer, flags, rows)
            self._before = int(buffer[rows * self.stride - 1])
            buffer = buffer[rows * self.stride:]
        self.dropped_tokens = int(len(buffer) - 1) if len(buffer) else 0
        self._keep(np.zeros(0, dtype=np.int64), None)

    def _joined(self) -> tuple[np.ndarray, np.ndarray | None]:
        buffer = np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=np.int64)
        flags = None
        if self.flags:
            flags = np.concatenate(self._pending_flags) if self._pending_flags else np.zeros(0, dtype=np.uint8)
        return buffer, flags

    def _keep(self, buffer: np.ndarray, flags: np.ndarray | None) -> None:
        self._pending, self._pending_len = [buffer], len(buffer)
        self._pending_flags = [flags] if flags is not None else []

    def _rows(self, buffer: np.ndarray, flags: np.ndarray | None, rows: int) -> dict[str, np.ndarray]:
        starts = np.arange(rows) * self.stride
        arrays = {"input_ids": buffer[starts[:, None] + np.arange(self.row_len)]}
        if self.row_start_id is not None:
            ids = arrays["input_ids"]
            # the stream token before each row's first: EOS (or the stream's start) makes it a document start
            before = np.concatenate([[-1 if self._before is None else self._before], buffer[starts[1:] - 1]])
            eos = self.eos[0]
            inside = (before != eos) & (before != -1) & (ids[:, 0] != eos)
            ids[inside, 0] = self.row_start_id
        if flags is not None:
            arrays["loss_mask"] = loss_mask_rows(flags, rows, self.row_len)
        return arrays


class ExampleRows:
    """Examples of token ids (``prepare --format ids``) → shards of ``rows_per_shard`` rows, **one example
    per row**: the example from position 0, the rest of the row EOS (flag 0), so that no position has
    another example in its context. Rows do not overlap: position t predicts token t+1 of its own row,
    and the last position (always EOS padding or the example's last token) has no target.

    Each shard is a dict of ``input_ids [rows, seq_len]`` int64, ``loss_mask [rows, seq_len]`` uint8
    (position t is 1 where token t+1 is a completion token) and, when examples carry the policy's
    log-probs, ``behaviour_logprob [rows, seq_len]`` float32 (position t: token t+1's log-prob where
    ``loss_mask`` is 1, else 0). Counts as :class:`RowPacker`'s (``dropped_tokens`` stays 0)."""

    def __init__(self, seq_len: int, rows_per_shard: int, eos_token_id: int, logprobs: bool):
        self.row_len = seq_len
        self.stride = seq_len - 1  # targets per row, as in an overlapping store
        self.rows_per_shard = rows_per_shard
        self.eos = eos_token_id
        self.logprobs = logprobs
        self.total_tokens = 0
        self.padding_tokens = 0
        self.dropped_tokens = 0
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def add(self, prompt_ids: Sequence[int], completion_ids: Sequence[int],
            completion_logprobs: Sequence[float] | None = None) -> None:
        """One example as its own row; the caller has checked that it fits (``len ≤ seq_len``)."""
        n_prompt, n = len(prompt_ids), len(prompt_ids) + len(completion_ids)
        if n > self.row_len:
            raise ValueError(f"an example of {n} tokens does not fit a row of {self.row_len}")
        ids = np.full(self.row_len, self.eos, dtype=np.int64)
        ids[:n_prompt], ids[n_prompt:n] = prompt_ids, completion_ids
        # position t predicts token t+1: positions first … n−2 predict the completion's tokens (without a
        # prompt, the completion's first token is no position's target)
        first, skip = max(n_prompt - 1, 0), int(n_prompt == 0)
        mask = np.zeros(self.row_len, dtype=np.uint8)
        mask[first:n - 1] = 1
        behaviour = None
        if self.logprobs:
            behaviour = np.zeros(self.row_len, dtype=np.float32)
            behaviour[first:n - 1] = np.asarray(completion_logprobs, dtype=np.float64)[skip:]
        self._rows.append((ids, mask, behaviour))
        self.total_tokens += self.row_len
        self.padding_tokens += self.row_len - n

    def full_shards(self) -> Iterator[dict[str, np.ndarray]]:
        while len(self._rows) >= self.rows_per_shard:
            yield self._shard(self.rows_per_shard)

    def finish(self) -> Iterator[dict[str, np.ndarray]]:
        if self._rows:
            yield self._shard(len(self._rows))

    def _shard(self, rows: int) -> dict[str, np.ndarray]:
        taken, self._rows = self._rows[:rows], self._rows[rows:]
        arrays = {"input_ids": np.stack([r[0] for r in taken]), "loss_mask": np.stack([r[1] for r in taken])}
        if self.logprobs:
            arrays["behaviour_logprob"] = np.stack([r[2] for r in taken])
        return arrays


def loss_mask_rows(flags: np.ndarray, rows: int, row_len: int) -> np.ndarray:
    """``loss_mask [rows, row_len]`` uint8 of the rows cut with stride ``row_len − 1`` from a stream whose
    tokens' response flags are ``flags``: position t of row r is the flag of its target, stream token
    ``r·(row_len−1) + t + 1``; the last position's target is the next row's first token, so it is 0 here
    (that token is a target, once, at position ``row_len − 2`` of this row)."""
    stride = row_len - 1
    mask = np.zeros((rows, row_len), dtype=np.uint8)
    mask[:, :-1] = flags[np.arange(rows)[:, None] * stride + np.arange(1, row_len)]
    return mask


def tokenizer_adds_bos(tokenizer) -> bool:
    """Does the tokenizer itself begin a text with a BOS (Llama 3, Gemma), one distinct from its EOS?"""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == tokenizer.eos_token_id:
        return False
    ids = tokenizer("x")["input_ids"]  # with the special tokens the tokenizer adds by itself
    return bool(ids) and ids[0] == bos


def row_rule(tokenizer, document_start: str, row_start: str, attention: str, text: bool) -> RowRule:
    """The rule ``distill prepare`` packs by: ``document_start`` "" is what the tokenizer does (BOS
    where it adds one), ``row_start`` "" follows the document start. Only ``text`` documents take
    one; task examples and token ids keep their rows as they are. Raises DistillError (one line)."""
    from pipeline.errors import DistillError

    chosen = [f"--{name.replace('_', '-')} {value}" for name, value in
              (("document_start", document_start), ("row_start", row_start), ("attention", attention))
              if value and value not in ("none", "causal")]
    if not text:
        if chosen:
            raise DistillError(f"{chosen[0]} is for --format text (documents); task examples and token ids keep "
                               "their rows as they are: drop it")
        return RowRule()
    document_start = document_start or ("bos" if tokenizer_adds_bos(tokenizer) else "none")
    row_start = row_start or document_start
    bos, eos = getattr(tokenizer, "bos_token_id", None), tokenizer.eos_token_id
    if "bos" in (document_start, row_start) and (bos is None or bos == eos):
        what = "has no BOS token" if bos is None else "'s BOS is its EOS, which already separates documents"
        which = "--document-start" if document_start == "bos" else "--row-start"
        raise DistillError(f"{which} bos: the tokenizer{'' if bos == eos else ' '}{what}; pass {which} none")
    return RowRule(document_start, row_start, attention or "causal",
                   bos if "bos" in (document_start, row_start) else None, eos)

"""The stored teacher of another tokenizer, as a :class:`pipeline.train.teacher_signal.TeacherSignal`.

The loader has already turned each teacher row into the student's row and their byte alignment
(``pipeline/text/align.py``, :class:`RowAligner`): a batch carries the student's ``input_ids``
``[B, M]`` and ``loss_mask``, the teacher's ``teacher_input_ids`` ``[B, L]`` and store arrays
``[B, L, ...]``, and the alignment (``cross_exact``, ``cross_student_chunk``,
``cross_teacher_chunk``, ``cross_counts``). :class:`CrossTokenizer` turns that into per-student-
position tensors, as every signal does, so the student's head and losses still run in chunks of
positions:

- ``exact``: at each student position the aligner pairs with a teacher position (``cross_exact``:
  the start of every kept chunk, or of 1:1 chunks only, by ``RowAligner(positions=...)``), the
  teacher's stored signal there, its ids mapped to student ids (−1 where none; several teacher ids
  of one student id added up), compared by :func:`bucketed_sparse_kd` (top-k + tail) or
  :func:`bucketed_sampled_kd` (drawn targets); with ``groups`` (``--cross-longer group``) the
  student ids no teacher id maps to are first folded into their heads' events (:func:`fold_groups`);
- ``chunk``: ALM's term, which needs whole chunks: the student's own target log-probs at T are
  gathered over all positions (``sequence_term``; ``DistillStep`` collects them across its chunks
  of positions) and summed per chunk, then compared with the teacher's chunk log-prob (its stored
  ``target_logprob`` re-tempered to T, summed over its targets in the chunk) by :func:`chunk_kd`,
  in the base signal's direction (``--direction``);
- ``both``: the sum, the chunk term weighted by ``chunk_weight``; ``chunk_scope='1to1'`` keeps the
  chunk term to the chunks of one student and one teacher token (a diagnostic: where it helps or costs).

Where the next-token term does not compare at a chunk start (``--cross-uncovered``):

- ``teacher`` (the student's default, ``exact``/``both``): at a student position whose target
  begins strictly *inside* a teacher token (a chunk's later student tokens: " instru|ction" against
  " instruction"), the teacher's stored candidates for that token (draws or top-k ids, at the
  teacher position predicting it) are conditioned on the bytes the student has already written
  since the token began (:class:`InsideTargets`): those that spell them and go on give the next
  student token (the student's own first token of the rest of their bytes); those that end exactly
  there have no next token in the store, and their share goes to the true token. The term is
  ``s·KL(p_L ‖ q_T) + (1 − s)·(−log q_T(y))`` with ``p_L`` the candidates going on, renormalised,
  and ``s`` their share of the consistent mass (a ratio of two estimates from the same draws:
  biased for few draws, consistent as they grow). Elsewhere, as ``ce``.
- ``ce``: the teacher's term is the true token's, ``−log q_T(y)`` (the KL from a one-hot teacher),
  so that ``α·CE + (1−α)·T²·KD`` gives such a position its whole weight as with identical
  tokenizers. (Issue #30: with ``none`` those positions train at weight α, and on a pair with few
  chunk starts that costs more than the teacher's term gains.)
- ``none``: nothing; only the α-weighted CE trains those positions.

Per-position teacher tensors refer to chunks by the index of the chunk's first student target
among the positions ``DistillStep`` keeps (those with ``loss_mask`` 1), so the chunk sums are
exact whichever chunks of positions the head runs in.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import DistillError
from pipeline.teacher.topk import retemper
from pipeline.train.cross_losses import (bucketed_sampled_kd, bucketed_sparse_kd, chunk_kd, fold_groups,
                                         group_tensors, merge_duplicates, unmapped_student_ids)
from pipeline.train.teacher_signal import StoredSampled, StoredTopK

MODES = ("exact", "chunk", "both")
CHUNK_SCOPES = ("all", "1to1")  # the chunks the chunk term compares: every kept chunk, or 1:1 ones only
UNCOVERED = ("teacher", "ce", "none")  # the teacher's term where the next-token term does not compare a start


class InsideTargets:
    """The teacher's candidates for a token, conditioned on its first bytes, as the student's next tokens.

    teacher_pieces: each teacher id's bytes (None for a special); first_tokens: ``list[bytes] →
    list[int]``, the student's first token of each byte string (:func:`pipeline.text.align.first_tokens`).
    Built once per run, as two tables over every (teacher id, offset ``k`` ≤ its length), so that a
    batch is conditioned by gathers on its device: ``prefix`` numbers each distinct first-``k``-bytes
    string (two candidates spell the same prefix iff their numbers are equal: exact, no hashing), and
    ``first`` is the student's first token of the bytes after ``k`` (−1 at ``k`` = the length: the
    teacher token ends there). About one entry per byte of the teacher's vocabulary."""

    def __init__(self, teacher_pieces, first_tokens):
        lengths = np.array([len(p) if p is not None else -1 for p in teacher_pieces], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0) + 1)[:-1]]).astype(np.int64)
        total = int((np.maximum(lengths, 0) + 1).sum())
        prefix = np.full(total, -1, dtype=np.int64)
        first = np.full(total, -1, dtype=np.int64)
        numbers: dict[bytes, int] = {}
        rests, where = [], []
        for d, piece in enumerate(teacher_pieces):
            if piece is None:
                continue
            for k in range(len(piece) + 1):
                prefix[starts[d] + k] = numbers.setdefault(piece[:k], len(numbers))
                if 0 < k < len(piece):
                    rests.append(piece[k:])
                    where.append(starts[d] + k)
        if rests:
            first[np.array(where, dtype=np.int64)] = np.array(first_tokens(rests), dtype=np.int64)
        self.lengths, self.starts = torch.from_numpy(lengths), torch.from_numpy(starts)
        self.prefix, self.first = torch.from_numpy(prefix), torch.from_numpy(first)
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.lengths, self.starts, self.prefix, self.first))
        return self._on[device]

    def __call__(self, candidates: torch.Tensor, probs: torch.Tensor, actual: torch.Tensor, offset: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """candidates, probs ``[N, S]`` (teacher ids and their probabilities, 0 at padding); actual
        ``[N]`` the teacher token the row holds there; offset ``[N]`` its bytes before the student's
        target (1 ≤ offset < its length). Returns the student ids ``[N, S]`` (−1 where a candidate
        does not go on), ``p_L`` ``[N, S]`` (the going-on candidates' probabilities over their sum,
        float64) and ``s`` ``[N]`` (that sum over the mass of the candidates that spell the prefix;
        0 where none does)."""
        lengths, starts, prefix, first = self._tables(candidates.device)
        k = offset[:, None]
        d = candidates.clamp(0, len(lengths) - 1)
        long_enough = (candidates >= 0) & (candidates < len(lengths)) & (lengths[d] >= k) & (probs > 0)
        at = torch.where(long_enough, starts[d] + k, 0)
        wanted = prefix[starts[actual] + offset][:, None]
        spelt = long_enough & (prefix[at] == wanted)
        goes_on = spelt & (lengths[d] > k)
        student = torch.where(goes_on, first[at], -1)
        w = probs.double()
        consistent = torch.where(spelt, w, 0.0).sum(-1)
        going = torch.where(goes_on, w, 0.0)
        total = going.sum(-1)
        has = total > 0
        going = going / torch.where(has, total, 1.0)[:, None]
        share = torch.where(has, total / torch.where(has, consistent, 1.0), 0.0)
        return student, going, share


class CrossTokenizer:
    """A stored teacher (``base``: :class:`StoredTopK` with ``tail='tail'``, or :class:`StoredSampled`)
    compared with a student of another tokenizer through ``vocab_map`` (``[V_teacher]`` student ids,
    −1 for none)."""

    def __init__(self, base: StoredTopK | StoredSampled, vocab_map: np.ndarray, mode: str,
                 chunk_weight: float = 1.0, uncovered: str = "none", inside: InsideTargets | None = None,
                 chunk_scope: str = "all", groups: np.ndarray | None = None):
        if mode not in MODES:
            raise DistillError(f"--cross-tokenizer must be one of {', '.join(MODES)}, got {mode!r}")
        if uncovered not in UNCOVERED:
            raise DistillError(f"--cross-uncovered must be one of {', '.join(UNCOVERED)}, got {uncovered!r}")
        if uncovered == "teacher" and mode != "chunk" and inside is None:
            raise ValueError("uncovered='teacher' needs the InsideTargets of the two tokenizers")
        if chunk_scope not in CHUNK_SCOPES:
            raise DistillError(f"--chunk-scope must be one of {', '.join(CHUNK_SCOPES)}, got {chunk_scope!r}")
        self.uncovered, self.chunk_scope = uncovered, chunk_scope
        self.inside = inside if uncovered == "teacher" and mode != "chunk" else None  # chunk mode: as 'ce'
        if isinstance(base, StoredTopK) and base.tail != "tail":
            raise DistillError(f"--cross-tokenizer compares a top-k teacher with one bucket for the mass it cannot map; "
                               f"--tail {base.tail} has no such bucket; use --tail tail")
        self.base, self.mode, self.chunk_weight = base, mode, chunk_weight
        self.direction = getattr(base, "direction", "forward")  # drawn targets are forward only (StoredSampled)
        self.temperature, self.grid = base.temperature, base.grid
        self.map = torch.from_numpy(np.asarray(vocab_map, dtype=np.int64))
        mapped = self.map[self.map >= 0]
        # --unmapped first|prefix, or targets inside teacher tokens: slots of one student id to add up
        self.many_to_one = len(torch.unique(mapped)) < len(mapped) or self.inside is not None or groups is not None
        self.exact = mode in ("exact", "both")
        self.sequence_term = mode in ("chunk", "both")  # DistillStep gathers the student's target log-probs
        fields = base.fields if self.exact else ()
        fields += ("target_logprob", "logsumexp") if self.sequence_term else ()
        self.fields = tuple(dict.fromkeys(fields))
        # positions() gives the compared flag, then the base signal's tensors (ids first) when exact
        self._parts = 1 + ((3 if isinstance(base, StoredTopK) else 2) + (2 if self.inside else 0) if self.exact else 0)
        self._counts = torch.zeros(7, dtype=torch.float64)  # the aligner's six, then inside positions with a target
        self._bucket: dict[tuple[int, torch.device], torch.Tensor] = {}  # the unmapped student ids, per (V_s, device)
        # --cross-longer group: student ids outside the image, each folded into its head's event
        self.groups = None if groups is None else torch.from_numpy(np.asarray(groups, dtype=np.int64))
        self._groups: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}
        self._heads: dict[torch.device, torch.Tensor] = {}  # self.groups on each device, copied once

    # -- what the training loop logs ------------------------------------------------------------
    def take_stats(self) -> dict[str, float]:
        """Shares of the student's targets since the last call that are 1:1 chunks
        (``cross_exact_share``), chunk starts (``cross_start_share``: where the next-token term
        compares under ``--cross-positions starts``), inside teacher tokens with a conditioned
        target (``cross_inside_share``, under ``uncovered='teacher'``) and in kept chunks (``cross_chunk_share``: the
        chunk term), and what was dropped (chunks at row ends, rows whose bytes the student's tokens
        did not spell)."""
        targets, exact, chunked, dropped, unaligned, starts, inside = self._counts.tolist()
        self._counts.zero_()
        stats = {"cross_inside_share": inside / max(targets, 1)} if self.inside is not None else {}
        return stats | {"cross_exact_share": exact / max(targets, 1), "cross_start_share": starts / max(targets, 1),
                "cross_chunk_share": chunked / max(targets, 1), "cross_dropped_chunks": int(dropped),
                "cross_unaligned_rows": int(unaligned)}

    # -- the signal -----------------------------------------------------------------------------
    def positions(self, input_ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Per student position (leading dim ``P = B·(M−1)``): (compared flag ``[P]``, then the base
        signal's tensors at the matching teacher position with ids mapped to the student's, when
        ``exact``; then chunk owner ``[P]`` int64, the teacher's chunk log-prob at owners ``[P]``
        float32 and an owner flag ``[P]``, when ``chunk``)."""
        b, m = input_ids.shape
        teacher_ids = batch["teacher_input_ids"]
        length = teacher_ids.shape[1]
        self._counts[:6] += batch["cross_counts"].sum(0).double().cpu()
        parts: list[torch.Tensor] = []
        teacher_position = batch["cross_exact"][:, :-1]
        compared = (teacher_position >= 0).reshape(-1)
        parts.append(compared)
        if self.exact:
            rows = torch.arange(b, device=input_ids.device)[:, None] * (length - 1)
            source = teacher_position
            if self.inside is not None:  # a position is a chunk start or inside a teacher token, not both
                source = torch.where(teacher_position >= 0, teacher_position, batch["cross_inside"][:, :-1])
            flat = (rows + source.clamp_min(0)).reshape(-1)
            base_parts = self.base.positions(teacher_ids, batch)
            ids = base_parts[0][flat]
            mapping = self.map.to(ids.device)
            student_ids = torch.where(compared[:, None], mapping[ids], -1)
            rest = [part[flat] for part in base_parts[1:]]
            if self.inside is not None:
                inside, share = self._inside(batch, ids, student_ids, rest, compared)
            if self.groups is not None:  # a candidate's student token outside the image: its group's event
                heads = self._heads_on(student_ids.device)
                head = heads[student_ids.clamp(0, len(heads) - 1)]
                student_ids = torch.where((student_ids >= 0) & (student_ids < len(heads)) & (head >= 0), head,
                                          student_ids)
            if self.many_to_one:  # top-k: (log-probs, tail); draws: (weights,)
                if isinstance(self.base, StoredTopK):
                    student_ids, rest[0] = merge_duplicates(student_ids, logprobs=rest[0])
                else:
                    student_ids, rest[0] = merge_duplicates(student_ids, weights=rest[0])
            parts += [student_ids, *rest]
            if self.inside is not None:
                parts += [inside, share]
        if self.sequence_term:
            parts += self._chunk_parts(b, m, length, batch)
        return tuple(parts)

    def _inside(self, batch: dict[str, torch.Tensor], ids: torch.Tensor, student_ids: torch.Tensor,
                rest: list[torch.Tensor], compared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At the positions inside teacher tokens: the conditioned candidates written into
        ``student_ids`` and ``rest`` (in place; top-k: log p_L and an empty tail, draws: p_L), and
        (inside flag ``[P]``, share ``s`` ``[P]``)."""
        teacher_ids = batch["teacher_input_ids"]
        b, length = teacher_ids.shape
        position = batch["cross_inside"][:, :-1]
        inside = (position >= 0).reshape(-1) & ~compared
        share = torch.zeros(inside.shape, dtype=torch.float32, device=ids.device)
        at = inside.nonzero().squeeze(-1)
        if at.numel() == 0:
            return inside, share
        token = (torch.arange(b, device=ids.device)[:, None] * length + position + 1).reshape(-1)[at]
        topk = isinstance(self.base, StoredTopK)
        probs = rest[0][at].double().exp() if topk else rest[0][at].double()
        sid, going, s = self.inside(ids[at], probs, teacher_ids.reshape(-1)[token],
                                    batch["cross_inside_offset"][:, :-1].reshape(-1)[at])
        student_ids[at] = sid
        if topk:
            rest[0][at] = going.log().to(rest[0].dtype)  # −inf where a candidate does not go on
            rest[1][at] = float("-inf")
        else:
            rest[0][at] = going.to(rest[0].dtype)
        share[at] = s.float()
        self._counts[6] += float((s > 0).sum())
        return inside, share

    def _chunk_parts(self, b: int, m: int, length: int, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        device = batch["cross_student_chunk"].device
        g = self.grid
        lp = retemper(batch["target_logprob"][..., None], batch["logsumexp"], g.cache_temperature, g.cache_index,
                      g.index, g.temperature)[..., 0]
        # chunk ids unique over the batch: row · M + the row-local id
        offset = torch.arange(b, device=device)[:, None] * m
        student_chunk = batch["cross_student_chunk"][:, :-1]
        teacher_chunk = batch["cross_teacher_chunk"][:, :-1]
        s_global = torch.where(student_chunk >= 0, student_chunk + offset, -1).reshape(-1)
        t_global = torch.where(teacher_chunk >= 0, teacher_chunk + offset, -1).reshape(-1)
        t_in = (t_global >= 0).nonzero().squeeze(-1)
        teacher_chunk_lp = torch.zeros(b * m, dtype=torch.float32, device=device).index_add(
            0, t_global[t_in], lp[:, :-1].reshape(-1)[t_in].float())
        # the positions DistillStep keeps (loss_mask 1), numbered as it will number them
        keep = batch["loss_mask"][:, :-1].reshape(-1) > 0 if "loss_mask" in batch else \
            torch.ones_like(s_global, dtype=torch.bool)
        kept_index = torch.cumsum(keep.long(), 0) - 1
        s_in = (s_global >= 0).nonzero().squeeze(-1)
        owner_of_chunk = torch.full((b * m,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
        owner_of_chunk = owner_of_chunk.scatter_reduce(0, s_global[s_in], kept_index[s_in], "amin")
        owner = torch.full_like(s_global, -1)
        owner[s_in] = owner_of_chunk[s_global[s_in]]
        is_owner = (owner >= 0) & (owner == kept_index)
        if self.chunk_scope == "1to1":  # a chunk of one student target and one teacher target
            def count(ids: torch.Tensor) -> torch.Tensor:  # targets per chunk id
                return torch.zeros(b * m, dtype=torch.int64, device=device).index_add(0, ids, torch.ones_like(ids))
            single = (count(s_global[s_in]) == 1) & (count(t_global[t_in]) == 1)
            is_owner &= single[s_global.clamp(min=0)]  # owners are chunk members: the clamp only fills non-members
        teacher_at_owner = torch.zeros(s_global.shape, dtype=torch.float32, device=device)
        teacher_at_owner[is_owner] = teacher_chunk_lp[s_global[is_owner]]
        return [owner, teacher_at_owner, is_owner]

    def divergence(self, student_logprobs: torch.Tensor, targets: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        """``[P]`` nats of the exact term at the compared positions; inside teacher tokens under
        ``uncovered='teacher'``, ``s·KL(p_L ‖ q_T) + (1 − s)·(−log q_T(y))``; elsewhere (everywhere in
        ``chunk`` mode) ``−log q_T(y)`` under ``teacher`` or ``ce``, else zero."""
        if self.uncovered in ("teacher", "ce"):
            elsewhere = -student_logprobs.gather(-1, targets[:, None]).squeeze(-1)
        else:
            elsewhere = torch.zeros(student_logprobs.shape[0], device=student_logprobs.device)
        if not self.exact:
            return elsewhere
        one_to_one, student_ids, *rest = parts[:self._parts]
        if self.inside is not None:
            rest, (inside, share) = rest[:-2], rest[-2:]
        events = student_logprobs if self.groups is None else \
            fold_groups(student_logprobs, *self._group_ids(student_logprobs))
        if isinstance(self.base, StoredTopK):
            topk_logprobs, tail_logmass = rest
            loss = bucketed_sparse_kd(events, student_ids, topk_logprobs, tail_logmass, self.base.direction)
        else:
            (weights,) = rest
            loss = bucketed_sampled_kd(events, student_ids, weights, self._bucket_ids(student_logprobs))
        if self.inside is not None:  # where s = 0 the candidates are empty: their term is not used
            elsewhere = torch.where(inside & (share > 0), share * loss + (1 - share) * elsewhere, elsewhere)
        return torch.where(one_to_one, loss, elsewhere)

    def _bucket_ids(self, student_logprobs: torch.Tensor) -> torch.Tensor:
        """The student ids no teacher id maps to, over the width of ``student_logprobs`` (built once);
        under ``groups``, less those folded into a head (their mass is the head's)."""
        key = (student_logprobs.shape[-1], student_logprobs.device)
        if key not in self._bucket:
            unmapped = unmapped_student_ids(self.map, key[0])
            if self.groups is not None:
                unmapped = unmapped[~torch.isin(unmapped, self._group_ids(student_logprobs)[0].cpu())]
            self._bucket[key] = unmapped.to(key[1])
        return self._bucket[key]

    def _heads_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._heads:
            self._heads[device] = self.groups.to(device)
        return self._heads[device]

    def _group_ids(self, student_logprobs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(members, heads, slots) of :func:`group_tensors` over the width of ``student_logprobs``
        (the model's rows may outnumber the tokenizer's ids: those have no head), built once."""
        key = (student_logprobs.shape[-1], student_logprobs.device)
        if key not in self._groups:
            heads = torch.full((key[0],), -1, dtype=torch.int64)
            width = min(key[0], len(self.groups))
            heads[:width] = self.groups[:width]
            heads = torch.where(heads < key[0], heads, -1)
            self._groups[key] = tuple(t.to(key[1]) for t in group_tensors(heads))
        return self._groups[key]

    def sequence_divergence(self, student_target_logprobs: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        """The chunk term, summed (nats, weighted): ``student_target_logprobs [P]`` are the student's
        log-probs at T of its own targets at every kept position."""
        owner, teacher_at_owner, is_owner = parts[self._parts:]
        inside = (owner >= 0).nonzero().squeeze(-1)
        student_chunks = torch.zeros_like(student_target_logprobs).index_add(
            0, owner[inside], student_target_logprobs[inside])
        owners = is_owner.nonzero().squeeze(-1)
        return self.chunk_weight * chunk_kd(teacher_at_owner[owners], student_chunks[owners],
                                            direction=self.direction).sum()

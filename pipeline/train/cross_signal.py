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
  :func:`bucketed_sampled_kd` (drawn targets);
- ``chunk``: ALM's term, which needs whole chunks: the student's own target log-probs at T are
  gathered over all positions (``sequence_term``; ``DistillStep`` collects them across its chunks
  of positions) and summed per chunk, then compared with the teacher's chunk log-prob (its stored
  ``target_logprob`` re-tempered to T, summed over its targets in the chunk) by :func:`chunk_kd`,
  in the base signal's direction (``--direction``);
- ``both``: the sum, the chunk term weighted by ``chunk_weight``.

Per-position teacher tensors refer to chunks by the index of the chunk's first student target
among the positions ``DistillStep`` keeps (those with ``loss_mask`` 1), so the chunk sums are
exact whichever chunks of positions the head runs in.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import DistillError
from pipeline.teacher.topk import retemper
from pipeline.train.cross_losses import (bucketed_sampled_kd, bucketed_sparse_kd, chunk_kd, merge_duplicates,
                                         unmapped_student_ids)
from pipeline.train.teacher_signal import StoredSampled, StoredTopK

MODES = ("exact", "chunk", "both")
ALIGNMENT_FIELDS = ("cross_exact", "cross_student_chunk", "cross_teacher_chunk", "cross_counts")


class CrossTokenizer:
    """A stored teacher (``base``: :class:`StoredTopK` with ``tail='tail'``, or :class:`StoredSampled`)
    compared with a student of another tokenizer through ``vocab_map`` (``[V_teacher]`` student ids,
    −1 for none)."""

    def __init__(self, base: StoredTopK | StoredSampled, vocab_map: np.ndarray, mode: str,
                 chunk_weight: float = 1.0):
        if mode not in MODES:
            raise DistillError(f"--cross-tokenizer must be one of {', '.join(MODES)}, got {mode!r}")
        if isinstance(base, StoredTopK) and base.tail != "tail":
            raise DistillError(f"--cross-tokenizer compares a top-k teacher with one bucket for the mass it cannot map; "
                               f"--tail {base.tail} has no such bucket; use --tail tail")
        self.base, self.mode, self.chunk_weight = base, mode, chunk_weight
        self.direction = getattr(base, "direction", "forward")  # drawn targets are forward only (StoredSampled)
        self.temperature, self.grid = base.temperature, base.grid
        self.map = torch.from_numpy(np.asarray(vocab_map, dtype=np.int64))
        mapped = self.map[self.map >= 0]
        self.many_to_one = len(torch.unique(mapped)) < len(mapped)  # --unmapped first|prefix: slots to add up
        self.exact = mode in ("exact", "both")
        self.sequence_term = mode in ("chunk", "both")  # DistillStep gathers the student's target log-probs
        fields = base.fields if self.exact else ()
        fields += ("target_logprob", "logsumexp") if self.sequence_term else ()
        self.fields = tuple(dict.fromkeys(fields))
        # positions() gives the compared flag, then the base signal's tensors (ids first) when exact
        self._parts = 1 + ((3 if isinstance(base, StoredTopK) else 2) if self.exact else 0)
        self._counts = torch.zeros(6, dtype=torch.float64)
        self._bucket: dict[tuple[int, torch.device], torch.Tensor] = {}  # the unmapped student ids, per (V_s, device)

    # -- what the training loop logs ------------------------------------------------------------
    def take_stats(self) -> dict[str, float]:
        """Shares of the student's targets since the last call that are 1:1 chunks
        (``cross_exact_share``), chunk starts (``cross_start_share``: where the next-token term
        compares under ``--cross-positions starts``) and in kept chunks (``cross_chunk_share``: the
        chunk term), and what was dropped (chunks at row ends, rows whose bytes the student's tokens
        did not spell)."""
        targets, exact, chunked, dropped, unaligned, starts = self._counts.tolist()
        self._counts.zero_()
        return {"cross_exact_share": exact / max(targets, 1), "cross_start_share": starts / max(targets, 1),
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
        self._counts += batch["cross_counts"].sum(0).double().cpu()
        parts: list[torch.Tensor] = []
        teacher_position = batch["cross_exact"][:, :-1]
        compared = (teacher_position >= 0).reshape(-1)
        parts.append(compared)
        if self.exact:
            rows = torch.arange(b, device=input_ids.device)[:, None] * (length - 1)
            flat = (rows + teacher_position.clamp_min(0)).reshape(-1)
            base_parts = self.base.positions(teacher_ids, batch)
            ids = base_parts[0][flat]
            mapping = self.map.to(ids.device)
            student_ids = torch.where(compared[:, None], mapping[ids], -1)
            rest = [part[flat] for part in base_parts[1:]]
            if self.many_to_one:  # top-k: (log-probs, tail); draws: (weights,)
                if isinstance(self.base, StoredTopK):
                    student_ids, rest[0] = merge_duplicates(student_ids, logprobs=rest[0])
                else:
                    student_ids, rest[0] = merge_duplicates(student_ids, weights=rest[0])
            parts += [student_ids, *rest]
        if self.sequence_term:
            parts += self._chunk_parts(b, m, length, batch)
        return tuple(parts)

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
        teacher_at_owner = torch.zeros(s_global.shape, dtype=torch.float32, device=device)
        teacher_at_owner[is_owner] = teacher_chunk_lp[s_global[is_owner]]
        return [owner, teacher_at_owner, is_owner]

    def divergence(self, student_logprobs: torch.Tensor, targets: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        """``[P]`` nats of the exact term (zero off the compared positions, and everywhere in ``chunk`` mode)."""
        if not self.exact:
            return torch.zeros(student_logprobs.shape[0], device=student_logprobs.device)
        one_to_one, student_ids, *rest = parts[:self._parts]
        if isinstance(self.base, StoredTopK):
            topk_logprobs, tail_logmass = rest
            loss = bucketed_sparse_kd(student_logprobs, student_ids, topk_logprobs, tail_logmass, self.base.direction)
        else:
            (weights,) = rest
            loss = bucketed_sampled_kd(student_logprobs, student_ids, weights, self._bucket_ids(student_logprobs))
        return torch.where(one_to_one, loss, 0.0)

    def _bucket_ids(self, student_logprobs: torch.Tensor) -> torch.Tensor:
        """The student ids no teacher id maps to, over the width of ``student_logprobs`` (built once)."""
        key = (student_logprobs.shape[-1], student_logprobs.device)
        if key not in self._bucket:
            self._bucket[key] = unmapped_student_ids(self.map, key[0]).to(key[1])
        return self._bucket[key]

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

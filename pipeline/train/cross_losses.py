"""Cross-tokenizer distillation losses, pure functions. Shapes in docstrings; all values in nats.

The teacher and the student have different vocabularies; ``pipeline/text/align.py`` pairs their
positions by bytes. Two terms (issue #23):

- **exact**, at chunk starts (by default every kept chunk's first student token; with
  ``--cross-positions 1to1`` only chunks of one token on each side): the teacher's stored
  next-token distribution against the student's, id by id through the vocabulary map (teacher
  id → the student id spelling the same bytes, or under ``--unmapped first`` the student's first
  token of them, or under ``bucket`` −1 for none), with one bucket each for the
  rest. For a top-k store (:func:`bucketed_sparse_kd`) the teacher's bucket is its exact tail plus
  the kept ids that have no student id; the student's is its mass outside the mapped kept ids —
  today's ``tail`` mode of :func:`pipeline.train.losses.sparse_kd` with a coarser bucket. For drawn
  targets (:func:`bucketed_sampled_kd`) the teacher's bucket is the weight of drawn ids without a
  student id; the student's its mass on the student ids that no teacher id maps to — fixed by the
  map, not by the draws, so the loss is an unbiased estimate of one divergence. With identical
  tokenizers the map is the identity, the teacher's bucket is exactly today's, and so is the loss.
- **chunk** (ALM, arXiv 2503.20083), on every kept chunk: the teacher's log-probability of the
  chunk's bytes (the sum of its stored ``target_logprob`` over its tokens in the chunk) against the
  student's (the sum over its own tokens), compared as two Bernoulli distributions — the
  binarised KL of :func:`chunk_kd`, forward or reverse.

Both are per position (or per chunk) and summed by the caller, as the same-tokenizer losses are.
"""

from __future__ import annotations

import torch

from pipeline.train.losses import DIRECTIONS, NEG_INF, _reverse_kl, _xlogy_diff

# The student's log-probs are finite; where every id is scattered away (k = V) the rest is empty,
# and a log-sum-exp of −inf alone has a NaN gradient. Clamping the scattered entries keeps it finite
# (exp(−1e30) is 0 in every float type) and changes no value a loss uses.
_EMPTY = -1e30


def _student_rest(student_logprobs: torch.Tensor, ids: torch.Tensor, mapped: torch.Tensor,
                  q_kept: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside the mapped ``ids``, ``[P, 1]``.

    As :func:`pipeline.train.losses._student_tail`: ``log(1 − Σ kept)`` where the kept mass is below
    0.999, the log-sum-exp of the other log-probs where it is closer to 1 (no cancellation)."""
    kept = torch.where(mapped, q_kept, NEG_INF).double().exp().sum(-1, keepdim=True)
    rest = torch.log1p(-kept.clamp(max=1 - 1e-3)).to(q_kept.dtype)
    close = (kept > 1 - 1e-3).squeeze(-1).nonzero().squeeze(-1)
    if close.numel():
        # an unmapped slot points at a mapped id of its row (one exists where the kept mass is ~1)
        first = ids.gather(-1, mapped.int().argmax(-1, keepdim=True))
        scatter_ids = torch.where(mapped, ids, first)[close]
        others = student_logprobs[close].scatter(-1, scatter_ids, NEG_INF).clamp_min(_EMPTY)
        rest = rest.index_put((close,), torch.logsumexp(others, dim=-1, keepdim=True))
    return rest


def bucketed_sparse_kd(student_logprobs: torch.Tensor, student_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                       tail_logmass: torch.Tensor, direction: str = "forward") -> torch.Tensor:
    """Top-k + tail divergence across vocabularies, ``[P]`` nats.

    student_logprobs: ``[P, V_s]`` float32 at T; student_ids: ``[P, k]`` int64, the student id of
    each kept teacher id (−1 where it has none); topk_logprobs: ``[P, k]`` teacher log-probs at T;
    tail_logmass: ``[P]`` log teacher mass outside its top-k (−inf when none). Buckets: each mapped
    kept id, and one for the rest on each side (teacher: tail + unmapped kept; student: everything
    but the mapped kept ids). ``forward`` is KL(teacher ‖ student); ``reverse`` KL(student ‖ teacher),
    with the student renormalised over the teacher's support where a teacher bucket is empty.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}")
    mapped = student_ids >= 0
    ids = student_ids.clamp_min(0)
    p_kept = topk_logprobs.float()
    q_kept = torch.where(mapped, student_logprobs.gather(-1, ids), NEG_INF)
    unmapped_mass = torch.logsumexp(torch.where(mapped, NEG_INF, p_kept), dim=-1)
    p_rest = torch.logaddexp(tail_logmass.float(), unmapped_mass)
    # an unmapped slot is its own empty bucket on both sides (0·log 0: nothing)
    p = torch.cat([torch.where(mapped, p_kept, NEG_INF), p_rest[:, None]], dim=-1)
    q = torch.cat([q_kept, _student_rest(student_logprobs, ids, mapped, q_kept)], dim=-1)
    return _xlogy_diff(p, q) if direction == "forward" else _reverse_kl(q, p)


def bucketed_sampled_kd(student_logprobs: torch.Tensor, student_ids: torch.Tensor, weights: torch.Tensor,
                        bucket_ids: torch.Tensor) -> torch.Tensor:
    """Forward KL against drawn targets across vocabularies, ``[P]`` nats.

    student_logprobs: ``[P, V_s]`` float32 at T; student_ids: ``[P, S]`` int64, the student id of
    each drawn teacher id (−1 where it has none); weights: ``[P, S]`` the estimated teacher
    probabilities (0 at padding), as :func:`pipeline.train.losses.sampled_kd` takes them;
    bucket_ids: ``[U]`` int64, the student ids that no teacher id maps to (the complement of the
    map's image, :func:`unmapped_student_ids`). Returns
    ``Σ_mapped w·(log w − log q) + w_U·(log w_U − log q_U)`` with ``w_U`` the weight of drawn ids
    without a student id and ``q_U`` the student's mass on ``bucket_ids``.

    The events are the map's image and one bucket U, the same on both sides at every position
    whatever was drawn: the teacher's ``p̄`` (mass of the teacher ids mapping to each student id;
    U: the unmapped ids) against the student's ``q̄`` (its own probabilities; U: its mass on
    ``bucket_ids``). The gradient with respect to the student's logits is linear in ``w``, so with
    ``E[w] = p`` its expectation is that of KL(p̄ ‖ q̄): zero exactly at ``q̄ = p̄``. (A bucket of
    "the ids outside the mapped *drawn* ids" moves with the draws; its expected gradient is no
    divergence's, and one draw drives the student's unmapped ids to 0.) Where ``bucket_ids`` is
    empty (every student id spelled by some teacher id) U has no student event and its term is
    left out: the expected gradient is then that of ``Σ_image p̄·log(p̄/q)``, zero at ``q`` ∝ ``p̄``
    over the image. With identical tokenizers ``w_U = 0`` and this is ``sampled_kd``.
    """
    w = weights.float()
    mapped = (student_ids >= 0) & (w > 0)
    ids = student_ids.clamp_min(0)
    q = torch.where(mapped, student_logprobs.gather(-1, ids), 0.0)
    log_w = torch.where(mapped, w, 1.0).log()
    per_id = (torch.where(mapped, w, 0.0) * torch.where(mapped, log_w - q, 0.0)).sum(-1)
    if bucket_ids.numel() == 0:
        return per_id
    w_rest = torch.where(mapped, 0.0, w).sum(-1)
    q_bucket = torch.logsumexp(student_logprobs.index_select(-1, bucket_ids), dim=-1)  # [P]: finite, U non-empty
    used = w_rest > 0
    rest = torch.where(used, w_rest, 1.0)
    return per_id + torch.where(used, rest * (rest.log() - q_bucket), 0.0)


def unmapped_student_ids(vocab_map: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """``[U]`` int64: the student ids in ``[0, student_vocab)`` that no teacher id maps to
    (``vocab_map [V_t]``: student id per teacher id, −1 for none) — the student's side of the
    unmapped bucket of :func:`bucketed_sampled_kd`, fixed by the map."""
    image = torch.zeros(student_vocab, dtype=torch.bool, device=vocab_map.device)
    image[vocab_map[vocab_map >= 0]] = True
    return (~image).nonzero().squeeze(-1)


def group_tensors(heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``heads [V_s]`` (:func:`pipeline.text.align.student_groups`: each student id's head, −1 for
    none): (members ``[G]``, the distinct heads ``[H]``, each member's index into them ``[G]``), as
    :func:`fold_groups` takes them."""
    members = (heads >= 0).nonzero().squeeze(-1)
    distinct, slot = torch.unique(heads[members], return_inverse=True)
    return members, distinct, slot


def fold_groups(student_logprobs: torch.Tensor, members: torch.Tensor, heads: torch.Tensor,
                slot: torch.Tensor) -> torch.Tensor:
    """``[P, V_s]`` the student's log-probs with each member's probability added to its head's and
    the member itself emptied (``_EMPTY``): the student's events when its longer tokens join the
    teacher's first token of their bytes (``--cross-longer group``). Members and heads as
    :func:`group_tensors` gives them. A fixed partition of the student's ids, so the bucketed
    losses on the folded log-probs are the same divergences over coarser student events (their
    expected gradients included); no members: ``student_logprobs`` itself."""
    if members.numel() == 0:
        return student_logprobs
    top = student_logprobs.detach().amax(-1, keepdim=True)  # log Σ exp(x − m) + m: exact for any m
    moved = torch.zeros(student_logprobs.shape[0], len(heads), dtype=student_logprobs.dtype,
                        device=student_logprobs.device)
    moved = moved.index_add(-1, slot, (student_logprobs.index_select(-1, members) - top).exp())
    # a group whose members all underflow adds nothing (the clamp keeps log and gradient finite)
    moved = moved.clamp_min(torch.finfo(moved.dtype).tiny).log() + top
    folded = torch.logaddexp(student_logprobs.index_select(-1, heads), moved)
    return student_logprobs.index_copy(-1, heads, folded).index_fill(-1, members, _EMPTY)


def merge_duplicates(student_ids: torch.Tensor, logprobs: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher slots that a many-to-one map (``--unmapped first`` or ``prefix``) sends to one student id, added up.

    student_ids: ``[P, n]`` (−1 for none); logprobs ``[P, n]`` (top-k) or weights ``[P, n]`` (draws).
    Returns (student_ids, logprobs or weights) ``[P, n]``: each student id's first slot holds the sum
    of its slots' mass, the later ones −1 with no mass (log −inf, weight 0), so the bucketed losses
    see each student id once. ``O(n²)`` per position: n is k or the draws, not the vocabulary.
    """
    same = (student_ids[:, :, None] == student_ids[:, None, :]) & (student_ids[:, :, None] >= 0)
    first = same.int().argmax(-1)  # the first slot holding each slot's student id (itself if unique or −1)
    first = torch.where(student_ids >= 0, first, torch.arange(student_ids.shape[1], device=first.device))
    is_first = first == torch.arange(student_ids.shape[1], device=first.device)
    ids = torch.where(is_first, student_ids, -1)
    if weights is not None:
        merged = torch.zeros_like(weights, dtype=torch.float32).scatter_add(-1, first, weights.float())
        return ids, torch.where(is_first, merged, 0.0)
    probs = logprobs.double().exp()
    merged = torch.zeros_like(probs).scatter_add(-1, first, probs)
    return ids, torch.where(is_first, merged.log(), NEG_INF).to(torch.float32)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler 2012); −inf at x = 0."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chunk_kd(teacher_logprob: torch.Tensor, student_logprob: torch.Tensor, margin: float = 1e-6,
             direction: str = "forward") -> torch.Tensor:
    """ALM's chunk term as a binarised KL, ``[C]`` nats.

    teacher_logprob, student_logprob: ``[C]`` log-probabilities of each chunk's bytes (the sum of
    each side's own next-token log-probs over its tokens in the chunk, at T). With ``p = exp(a)``
    and ``q = exp(b)``, ``forward`` is KL(Bernoulli(p) ‖ Bernoulli(q)) =
    ``p·log(p/q) + (1−p)·log((1−p)/(1−q))``, ``reverse`` KL(Bernoulli(q) ‖ Bernoulli(p)) =
    ``q·log(q/p) + (1−q)·log((1−q)/(1−p))``: zero iff the chunk is as likely under both. The
    student's log-prob is capped at ``log(1 − margin)`` so that ``1 − q`` never rounds to zero (its
    gradient there is then zero). The teacher's is capped at 0 (rounding can exceed it) forward,
    where a certain teacher is finite, and at ``log(1 − margin)`` reverse, where ``1 − p = 0``
    against ``1 − q > 0`` would be infinite (a float32 log-prob of a confident teacher rounds to 0).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}")
    cap = float(torch.log1p(torch.tensor(-margin, dtype=torch.float64)))
    b = student_logprob.clamp(max=cap).double()
    if direction == "reverse":
        a = teacher_logprob.double().clamp(max=cap)
        q = b.exp()
        return (q * (b - a) + (1 - q) * (_log1mexp(b) - _log1mexp(a))).to(student_logprob.dtype)
    a = teacher_logprob.double().clamp(max=0.0)
    p = a.exp()
    one_minus_a, one_minus_b = _log1mexp(a), _log1mexp(b)
    rest = 1 - p
    used = rest > 0
    rest_term = torch.where(used, rest * (torch.where(used, one_minus_a, 0.0) - one_minus_b), 0.0)
    return (p * (a - b) + rest_term).to(student_logprob.dtype)

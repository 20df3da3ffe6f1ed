"""Losses, pure functions. Shapes in docstrings; all values in nats.

Position t of a row predicts token t+1, so a row of L tokens gives L-1 targets.

Distillation against a sparse teacher (stage two). The store gives, per position, the teacher's
top-k ids and log-probs at temperature T and the exact log of the mass outside them (the tail).
Each ``tail`` mode turns that into a teacher distribution ``p`` and says which student distribution
``q`` it is compared with — never a silent renormalisation:

- ``renorm``: ``p`` is the teacher renormalised over its top-k (zero elsewhere), the common choice
  elsewhere. Forward: KL(p ‖ q) with the student's full softmax ``q``. Reverse: KL(q̃ ‖ p) with the
  student renormalised over the same k ids (KL(q ‖ p) is infinite when p has zeros).
- ``tail`` (default): both distributions over k+1 buckets, the kept ids plus one bucket holding all
  remaining mass (the teacher's exact residual, the student's own). With k = V the tail is empty
  and the loss is the full-vocabulary KL.
- ``residual-label``: the residual mass is added to the true next token, so ``p`` lives on the kept
  ids plus the label. Forward: KL(p ‖ q) with the full ``q``. Reverse: with ``q`` renormalised over
  that support.

``direction="forward"`` is KL(teacher ‖ student) (Hinton); ``"reverse"`` is KL(student ‖ teacher),
Eq. 1 of the paper as printed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

TAIL_MODES = ("renorm", "tail", "residual-label")
DIRECTIONS = ("forward", "reverse")
NEG_INF = float("-inf")


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction.

    logits: ``[B, L, V]`` (any float dtype; computed in float32), input_ids: ``[B, L]`` int64.
    Returns the mean over the ``B·(L-1)`` targets (``reduction='mean'``) or their sum (``'sum'``).
    """
    predictions = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), reduction=reduction)


def _xlogy_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ exp(log_a)·(log_a − log_b) over the last dim, with 0·(anything) = 0.

    The masked logs are replaced *before* the product, so no inf·0 appears in the forward pass
    and no NaN leaks into gradients through the unused branch.
    """
    a = log_a.exp()
    used = a > 0
    diff = torch.where(used, log_a, 0.0) - torch.where(used, log_b, 0.0)
    return (a * diff).sum(-1)


def _log1mexp_from_rest(student_logits_t: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside ``ids``: logsumexp over the other logits minus the total."""
    rest = student_logits_t.scatter(-1, ids, NEG_INF)
    return torch.logsumexp(rest, dim=-1, keepdim=True) - lse


def sparse_kd(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              tail_logmass: torch.Tensor, targets: torch.Tensor, temperature: float,
              tail: str = "tail", direction: str = "forward") -> torch.Tensor:
    """Per-position divergence between a sparse teacher and the student, at temperature T.

    student_logits: ``[P, V]`` (float32), topk_ids: ``[P, k]`` int64, topk_logprobs: ``[P, k]`` teacher
    log-probs at T, tail_logmass: ``[P]`` log teacher mass outside top-k at T (−inf when none),
    targets: ``[P]`` int64 true next tokens (used by ``residual-label``). Returns ``[P]`` nats.
    """
    if tail not in TAIL_MODES or direction not in DIRECTIONS:
        raise ValueError(f"tail must be one of {TAIL_MODES} and direction one of {DIRECTIONS}")
    s = student_logits.float() / temperature
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    q_kept = s.gather(-1, topk_ids) - lse  # student log-probs on the kept ids, full softmax
    p_kept = topk_logprobs.float()

    if tail == "tail":
        if topk_ids.shape[-1] == s.shape[-1]:  # k = V: no tail bucket (its log-sum-exp would be of nothing)
            return _xlogy_diff(p_kept, q_kept) if direction == "forward" else _xlogy_diff(q_kept, p_kept)
        p = torch.cat([p_kept, tail_logmass.float()[:, None]], dim=-1)
        q = torch.cat([q_kept, _log1mexp_from_rest(s, topk_ids, lse)], dim=-1)  # lse: [P, 1]
        return _xlogy_diff(p, q) if direction == "forward" else _xlogy_diff(q, p)

    if tail == "renorm":
        p = p_kept - torch.logsumexp(p_kept, dim=-1, keepdim=True)
        if direction == "forward":
            return _xlogy_diff(p, q_kept)
        q = q_kept - torch.logsumexp(q_kept, dim=-1, keepdim=True)
        return _xlogy_diff(q, p)

    # residual-label: support = kept ids + the label; the label's teacher mass gains the residual.
    in_kept = topk_ids == targets[:, None]  # [P, k]
    label_in_kept = in_kept.any(-1)
    residual = tail_logmass.float()
    p_kept = torch.where(in_kept, torch.logaddexp(p_kept, residual[:, None]), p_kept)
    p_label = torch.where(label_in_kept, torch.full_like(residual, NEG_INF), residual)  # merged above
    p = torch.cat([p_kept, p_label[:, None]], dim=-1)
    q_label = s.gather(-1, targets[:, None]) - lse
    # When the label is already kept its extra slot carries no mass for either side.
    q = torch.cat([q_kept, torch.where(label_in_kept[:, None], torch.full_like(q_label, NEG_INF), q_label)], dim=-1)
    if direction == "forward":
        return _xlogy_diff(p, q)
    q = q - torch.logsumexp(q, dim=-1, keepdim=True)
    return _xlogy_diff(q, p)


def dense_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
             direction: str = "forward") -> torch.Tensor:
    """Full-vocabulary divergence (online distillation). Both ``[P, V]``; returns ``[P]`` nats."""
    q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _xlogy_diff(p, q) if direction == "forward" else _xlogy_diff(q, p)


def chunked_sum(fn: Callable[..., tuple[torch.Tensor, ...]], positions: int, chunk: int,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sum ``fn`` over chunks of the leading (position) dim of ``tensors``.

    With more than one chunk each call runs under activation checkpointing: the backward pass
    recomputes a chunk's ``[chunk, V]`` logits instead of keeping every chunk's alive, so memory
    holds one chunk's vocabulary-sized tensors at a time (what lets a 150k vocabulary fit).
    """
    if chunk <= 0 or positions <= chunk:
        return fn(*tensors)
    totals = None
    for start in range(0, positions, chunk):
        parts = [t[start:start + chunk] for t in tensors]
        out = checkpoint(fn, *parts, use_reentrant=False)
        totals = out if totals is None else tuple(a + b for a, b in zip(totals, out))
    return totals

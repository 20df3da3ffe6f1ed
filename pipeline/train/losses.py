"""Losses, pure functions. Shapes in docstrings; all values in nats.

Position t of a row predicts token t+1, so a row of L tokens gives L-1 targets.

Distillation against drawn targets (a ``sampled`` or hybrid store): :func:`sampled_kd`, forward KL
against weights at the drawn ids whose expectation is the teacher's distribution, so the gradient
is unbiased.

Distillation against a top-k teacher (stage two). The store gives, per position, the teacher's
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

A teacher bucket of zero mass (a stored ``−inf``: k = V, every non-kept logit ``−inf``, or a label
slot whose residual is zero) costs nothing in the forward direction (0·log 0 = 0). In the reverse
direction KL(q ‖ p) would be infinite wherever the student puts mass there, so the student is first
renormalised over the teacher's support, as ``renorm`` does: KL(q̃ ‖ p), finite, with a gradient
that matches the student's shape on the support and leaves the zero bucket's mass to the CE term.
Every mode is finite on any finite store.
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


def _reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) over the last dim, ``[P, n]`` → ``[P]``; in rows where the teacher ``p`` has zero-mass
    buckets (log −inf) that the student does not, KL(q̃ ‖ p) with ``q`` renormalised over p's support.

    No data-dependent branch (no host sync): rows without such buckets take ``log_q`` unchanged.
    """
    outside = torch.isneginf(log_p)
    renormalise = (outside & ~torch.isneginf(log_q)).any(-1, keepdim=True)
    on_support = log_q.masked_fill(outside, NEG_INF)
    on_support = on_support - torch.logsumexp(on_support, dim=-1, keepdim=True)
    return _xlogy_diff(torch.where(renormalise, on_support, log_q), log_p)


def _student_tail(student_logprobs: torch.Tensor, ids: torch.Tensor, q_kept: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside ``ids``, ``[P, 1]``.

    ``log(1 − Σ kept)`` where that is well conditioned (kept mass below 0.999: float32 error stays
    under 1e-4 relative); where the kept mass is closer to 1 the subtraction would cancel, so those
    rows take the log-sum-exp of the other log-probs instead — exact, and only for the rows that need it.
    """
    kept = q_kept.double().exp().sum(-1, keepdim=True)
    tail = torch.log1p(-kept.clamp(max=1 - 1e-3)).to(q_kept.dtype)
    close = (kept > 1 - 1e-3).squeeze(-1).nonzero().squeeze(-1)
    if close.numel():
        rest = student_logprobs[close].scatter(-1, ids[close], NEG_INF)
        tail = tail.index_put((close,), torch.logsumexp(rest, dim=-1, keepdim=True))
    return tail


def sparse_kd(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              tail_logmass: torch.Tensor, targets: torch.Tensor, tail: str = "tail",
              direction: str = "forward") -> torch.Tensor:
    """Per-position divergence between a sparse teacher and the student, at one temperature T.

    student_logprobs: ``[P, V]`` float32, ``log_softmax(student_logits / T)`` (shared with the CE term
    when T = 1); topk_ids: ``[P, k]`` int64; topk_logprobs: ``[P, k]`` teacher log-probs at T;
    tail_logmass: ``[P]`` log teacher mass outside top-k at T (−inf when none); targets: ``[P]``
    int64 true next tokens (used by ``residual-label``). Returns ``[P]`` nats.
    """
    if tail not in TAIL_MODES or direction not in DIRECTIONS:
        raise ValueError(f"tail must be one of {TAIL_MODES} and direction one of {DIRECTIONS}")
    q_kept = student_logprobs.gather(-1, topk_ids)  # student log-probs on the kept ids, full softmax
    p_kept = topk_logprobs.float()

    if tail == "tail":
        if topk_ids.shape[-1] == student_logprobs.shape[-1]:  # k = V: no tail bucket
            return _xlogy_diff(p_kept, q_kept) if direction == "forward" else _reverse_kl(q_kept, p_kept)
        p = torch.cat([p_kept, tail_logmass.float()[:, None]], dim=-1)
        q = torch.cat([q_kept, _student_tail(student_logprobs, topk_ids, q_kept)], dim=-1)
        return _xlogy_diff(p, q) if direction == "forward" else _reverse_kl(q, p)

    if tail == "renorm":
        p = p_kept - torch.logsumexp(p_kept, dim=-1, keepdim=True)
        if direction == "forward":
            return _xlogy_diff(p, q_kept)
        q = q_kept - torch.logsumexp(q_kept, dim=-1, keepdim=True)
        return _reverse_kl(q, p)

    # residual-label: support = kept ids + the label; the label's teacher mass gains the residual.
    in_kept = topk_ids == targets[:, None]  # [P, k]
    label_in_kept = in_kept.any(-1)
    residual = tail_logmass.float()
    p_kept = torch.where(in_kept, torch.logaddexp(p_kept, residual[:, None]), p_kept)
    p_label = torch.where(label_in_kept, torch.full_like(residual, NEG_INF), residual)  # merged above
    p = torch.cat([p_kept, p_label[:, None]], dim=-1)
    q_label = student_logprobs.gather(-1, targets[:, None])
    # When the label is already kept its extra slot carries no mass for either side.
    q = torch.cat([q_kept, torch.where(label_in_kept[:, None], torch.full_like(q_label, NEG_INF), q_label)], dim=-1)
    if direction == "forward":
        return _xlogy_diff(p, q)
    q = q - torch.logsumexp(q, dim=-1, keepdim=True)
    return _reverse_kl(q, p)


def dense_kd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, direction: str = "forward") -> torch.Tensor:
    """Full-vocabulary divergence (online distillation) between ``[P, V]`` log-probs at T; ``[P]`` nats."""
    q, p = student_logprobs, teacher_logprobs.float()
    return _xlogy_diff(p, q) if direction == "forward" else _reverse_kl(q, p)


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


def sampled_kd(student_logprobs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Forward KL against a sparse *estimate* of the teacher, ``[P]`` nats.

    student_logprobs: ``[P, V]`` float32 at T; ids: ``[P, S]`` int64; weights: ``[P, S]`` the
    estimated teacher probabilities at those ids (0 at padding): ``count/N`` for a sampled store,
    exact head probabilities plus ``tail mass · count/M`` for the hybrid, importance-weighted draws
    at another temperature. Returns ``Σ w·(log w − log q)``.

    Unbiased where ``E[w] = p``: the gradient with respect to the student's logits (before the 1/T)
    is ``(Σw)·q − w``, linear in ``w``, so its expectation is ``q − p``, the full-vocabulary KD
    gradient — even where ``Σw ≠ 1`` for one draw (importance weights), since ``E[Σw] = 1``. The
    value itself (the KL of the estimate) is biased; it is what the logs report as ``kd``.
    """
    w = weights.float()
    q = student_logprobs.gather(-1, ids)
    used = w > 0
    log_w = torch.where(used, w, 1.0).log()
    return (w * (torch.where(used, log_w - q, 0.0))).sum(-1)

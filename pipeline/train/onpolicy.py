"""On-policy distillation's sampled-token objective: the policy-gradient form of reverse KL. Pure
functions; shapes in docstrings; log-probs in nats.

The student π_θ wrote the text (``distill generate``), recording ``b = log π_behaviour(x)`` for each
token x it drew; stage one stored the teacher's ``g = log p(x)`` of the same token. Per position:

- ``l = log π_θ(x)``, the student being trained (T = 1, with gradient);
- advantage ``A = g − sg(l)`` (stop-gradient): minus the per-token estimate of KL(π_θ ‖ p);
- importance ratio ``r = exp(l − b)`` between the trained student and the one that sampled.

The surrogate ``−r·A`` has gradient ``−A·r·∇l``, and ``E_{x∼π_b}[r·A·∇l] = E_{x∼π_θ}[A·∇l] =
−∇_θ KL(π_θ ‖ p)`` (the ``+1`` of ``∇ Σ π log π`` vanishes as ``E[∇l] = 0``): descending it descends
the reverse KL, unbiased while nothing is clipped. A uses the *current* ``l`` and not ``b``: the
estimator needs ``log π_θ − log p`` of the model whose gradient it is; at a round's first step
``l = b`` and A is the issue's ``log p_teacher − log p_sampler``.

Two ways to keep the ratio near 1 as the student moves away from the sampler:

- ``clip`` (PPO): ``−min(r·A, clip(r, 1−ε, 1+ε)·A)``. A position whose ratio has already moved
  past the band *in the direction its advantage pushes* (A > 0 and r > 1+ε, or A < 0 and r < 1−ε)
  gets no gradient; the others keep ``−A·r·∇l`` (r unclipped). The estimate is then biased towards
  the sampler's distribution — a trust region: it only stops steps that would move further out.
- ``gate``: ``−r·A`` inside ``1−ε ≤ r ≤ 1+ε``, nothing (value 0, no gradient) outside, either way.

Outside the band ``l`` enters without gradient, so a ratio that overflows cannot put a NaN into
the gradient of the positions that are kept.

The identity needs ``π_b(x) > 0`` wherever ``π_θ(x) > 0``: the expectation over the sampler's draws
reaches only the ids it can draw. A truncated sampler (top-k below the vocabulary, top-p < 1), a
rule-constrained one (masked ids; redrawn records the per-token log-probs do not see) or greedy
decoding (one id, stored log-prob 0) leaves the rest out, and no ratio restores it: the estimate is
biased however small the logged clipped share (at a round's first step with top-p, every ratio is
the kept mass, inside the band). :func:`sampler_bias` says which samplers stage two accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

RATIO_MODES = ("clip", "gate")


@dataclass(frozen=True)
class PolicyGradientTerms:
    """Per position, ``[P]`` each: the surrogate ``loss`` (with gradient), and, detached, the
    ``advantage`` A, the ``ratio`` r and ``outside`` (1.0 where the clip or the gate took the
    gradient away)."""

    loss: torch.Tensor
    advantage: torch.Tensor
    ratio: torch.Tensor
    outside: torch.Tensor


def policy_gradient(student_logprob: torch.Tensor, behaviour_logprob: torch.Tensor, teacher_logprob: torch.Tensor,
                    ratio: str = "clip", epsilon: float = 0.2) -> PolicyGradientTerms:
    """The sampled-token reverse-KL surrogate per position.

    student_logprob: ``[P]`` ``log π_θ(x)`` of the drawn token x at T = 1, with gradient (any float
    dtype; computed in it); behaviour_logprob: ``[P]`` the sampler's ``log π_b(x)``;
    teacher_logprob: ``[P]`` the teacher's ``log p(x)`` at T = 1. ``ratio``: ``'clip'`` or
    ``'gate'``; ``epsilon``: the band half-width ε. Returns :class:`PolicyGradientTerms`.
    """
    if ratio not in RATIO_MODES:
        raise ValueError(f"ratio must be one of {RATIO_MODES}, got {ratio!r}")
    dtype = student_logprob.dtype
    l_now = student_logprob.detach()
    b, g = behaviour_logprob.to(dtype), teacher_logprob.to(dtype)
    advantage = g - l_now
    ratio_now = (l_now - b).exp()
    low, high = 1.0 - epsilon, 1.0 + epsilon
    if ratio == "clip":
        outside = ((advantage > 0) & (ratio_now > high)) | ((advantage < 0) & (ratio_now < low))
    else:
        outside = (ratio_now < low) | (ratio_now > high)
    # l without its gradient where the term is constant: exp of a large l − b cannot leak inf·0 there
    r = (torch.where(outside, l_now, student_logprob) - b).exp()
    if ratio == "clip":  # the value PPO gives, −clip(r)·A, constant there
        loss = -torch.where(outside, r.clamp(low, high), r) * advantage
    else:
        loss = torch.where(outside, torch.zeros_like(r), -r * advantage)
    return PolicyGradientTerms(loss, advantage, ratio_now, outside.to(dtype))


def sampler_bias(sampler: Any, vocab_size: int) -> str | None:
    """Why the importance ratio cannot correct the sampler a store's records were drawn with, or None
    where it can. ``sampler``: one entry of a ``--format ids`` store's ``samplers`` param
    (docs/FORMAT.md: ``temperature``, ``top_k``, ``top_p``, ``greedy``, ``rules_sha256``), None where
    the records did not say. Any temperature > 0 with full support is exact (the stored log-probs are
    the tempered distribution's, and the ratio divides by them); ``top_k`` at or above the vocabulary
    keeps every id."""
    keys = ("temperature", "top_k", "top_p", "greedy", "rules_sha256")
    if not isinstance(sampler, dict) or any(k not in sampler for k in keys):
        return "unknown (its records do not say how they were drawn)"
    if sampler["greedy"] or sampler["temperature"] == 0:
        return "greedy (one id per position, stored log-prob 0)"
    if sampler["rules_sha256"]:
        return "rule-constrained (--rules masks ids and redraws records, which per-token log-probs do not see)"
    if sampler["top_p"] < 1:
        return f"top-p {sampler['top_p']:g} (truncated: the ids past p are never drawn)"
    if 0 < sampler["top_k"] < vocab_size:
        return f"top-k {sampler['top_k']} of {vocab_size} ids (truncated: the rest are never drawn)"
    return None

"""Teacher distributions in sparse form: top-k, log-sum-exp per temperature, exact tail mass.

What stage one stores per position, from the teacher's logits ``z`` over the tokenizer's ``V`` ids,
at cache temperature ``T`` and grid temperatures ``T_1..T_G``:

- ``topk_ids [.., k]``: the k largest logits (the set and order are the same at every temperature);
- ``topk_logprobs [.., k]``: ``z_i/T − logsumexp(z/T)``, float16;
- ``logsumexp [.., G]``: ``logsumexp(z/T_g)``, float32;
- ``tail_logmass [.., G]``: ``log(1 − Σ_kept p_i)`` at ``T_g``, float32, computed by summing the
  probabilities *not* kept (not as 1 − Σ kept, which cancels): exact even for a tail of 1e-12.
  Only a tail below float32's range — every non-kept logit more than ~87·T_g under the top-1 —
  underflows to −inf (as it is when k = V);
- ``target_logprob [..]``: ``z_y/T − logsumexp(z/T)`` of the true next token ``y``, float32.

Re-tempering is exact up to storage precision: ``z_i = T·(topk_logprobs_i + logsumexp_T)``, so
``log p_i(T_g) = (T/T_g)·(topk_logprobs_i + logsumexp_T) − logsumexp_{T_g}`` (:func:`retemper`).
"""

from __future__ import annotations

import torch


def sparse_teacher(logits: torch.Tensor, k: int, temperature: float, grid: tuple[float, ...],
                   targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sparse summary of one chunk of positions.

    logits: ``[P, V]`` (any float dtype; computed in float32), targets: ``[P]`` int64 or None,
    ``grid`` must contain ``temperature``. Returns float32/int64 tensors on ``logits.device``:
    ``topk_ids [P, k]``, ``topk_logprobs [P, k]``, ``logsumexp [P, G]``, ``tail_logmass [P, G]`` and
    ``target_logprob [P]`` (when targets are given). Memory: a few ``[P, V]`` float32 buffers.
    """
    z = logits.float()
    top_values, top_ids = torch.topk(z, k, dim=-1)  # sorted, largest first
    buffer = torch.empty_like(z)
    lse, tail = [], []
    for t in grid:
        # One fused pass per temperature, (z − max)/T = z/T − max/T, then exp in place (≤ 1: never
        # overflows); the rest mass is summed after zeroing the kept entries (k writes), not as
        # total − kept, so tiny tails keep their precision.
        torch.add(top_values[:, :1] / -t, z, alpha=1.0 / t, out=buffer).exp_()
        total = buffer.sum(dim=-1)
        rest = buffer.scatter_(-1, top_ids, 0.0).sum(dim=-1)
        lse.append(top_values[:, 0] / t + total.log())
        tail.append(rest.log() - total.log())  # −inf when k == V
    lse_all = torch.stack(lse, dim=-1)
    lse_cache = lse_all[:, grid.index(temperature)]
    out = {
        "topk_ids": top_ids,
        "topk_logprobs": top_values / temperature - lse_cache[:, None],
        "logsumexp": lse_all,
        "tail_logmass": torch.stack(tail, dim=-1),
    }
    if targets is not None:
        out["target_logprob"] = z.gather(-1, targets[:, None]).squeeze(-1) / temperature - lse_cache
    return out


def retemper(topk_logprobs: torch.Tensor, logsumexp: torch.Tensor, cache_temperature: float,
             cache_index: int, target_index: int, target_temperature: float) -> torch.Tensor:
    """Kept log-probs at another grid temperature.

    topk_logprobs: ``[..., k]`` at the cache temperature; logsumexp: ``[..., G]``. Returns
    ``[..., k]`` float32: ``(T/T_g)·(lp + lse_T) − lse_{T_g}``.
    """
    if target_index == cache_index:
        return topk_logprobs.float()
    # float64 for the round trip through the logits (|z/T| can be ~30, where float32 keeps ~1e-6)
    lp, lse = topk_logprobs.double(), logsumexp.double()
    logits_over_t = lp + lse[..., cache_index, None]
    return (logits_over_t * (cache_temperature / target_temperature) - lse[..., target_index, None]).float()

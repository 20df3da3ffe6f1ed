"""Teacher distributions in sparse form: top-k, log-sum-exp per temperature, exact tail mass.

What stage one stores per position, from the teacher's logits ``z`` over the tokenizer's ``V`` ids,
at cache temperature ``T`` and grid temperatures ``T_1..T_G``:

- ``topk_ids [.., k]``: the k largest logits (the set and order are the same at every temperature);
- ``topk_logprobs [.., k]``: ``z_i/T − logsumexp(z/T)``, float16;
- ``logsumexp [.., G]``: ``logsumexp(z/T_g)``, float32;
- ``tail_logmass [.., G]``: ``log(1 − Σ_kept p_i)`` at ``T_g``, float32, computed by summing the
  probabilities *not* kept (not as 1 − Σ kept, which cancels): exact even for a tail of 1e-12.
  The fast passes sum ``exp((z − top)/T_g)``, which loses the tail once every non-kept logit is
  ~87·T_g under the top-1; rows whose tail is below ``e^−45`` are therefore recomputed in float64,
  shifted by the largest non-kept logit (:func:`_exact_small_tails`), so any tail float32 can hold
  is stored exactly. ``−inf`` means a true zero: k = V, or every non-kept logit is ``−inf``;
- ``target_logprob [..]``: ``z_y/T − logsumexp(z/T)`` of the true next token ``y``, float32.

Re-tempering is exact up to storage precision: ``z_i = T·(topk_logprobs_i + logsumexp_T)``, so
``log p_i(T_g) = (T/T_g)·(topk_logprobs_i + logsumexp_T) − logsumexp_{T_g}`` (:func:`retemper`).
"""

from __future__ import annotations

import functools
import sys

import torch

from pipeline.errors import DistillError
from pipeline.teacher import fused_gpu, native


KERNELS = ("auto", "native", "torch")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``native`` (the fused CPU kernel), ``triton`` (the fused GPU kernels) or ``torch`` for logits on
    ``device``; a one-line error where the fused kernel asked for cannot run. ``--kernel native``
    means the fused kernel of the device: C on the CPU, Triton on CUDA. ``triton`` may also be asked
    for by name (tests run it on the CPU under Triton's interpreter)."""
    if kernel not in KERNELS + ("triton",):
        raise DistillError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return "torch"
    if kernel == "triton" or device.type != "cpu":
        why = fused_gpu.load(device, _gpu_agrees)
        if not why:
            return "triton"
        if kernel != "auto":
            raise DistillError(f"the fused GPU kernels are unavailable on {device} ({why}); use --kernel torch")
        if device.type == "cuda":  # elsewhere (mps, …) torch is the only path, as it always was: no warning
            warn_once(f"distill: the fused GPU kernels are unavailable ({why}); stage one reduces the logits with "
                      "torch operations, about 1.7-2.2× a bare forward on an H200")
        return "torch"
    fused, why = fused_kernel()
    if fused is None:
        if kernel == "native":
            raise DistillError(f"the fused CPU kernel is unavailable ({why}); use --kernel torch")
        warn_once(f"distill: the fused CPU kernel is unavailable ({why}); "
                   "stage one uses torch operations, about 3× slower reductions")
        return "torch"
    return "native"


def fused_kernel() -> tuple[native.Kernel | None, str]:
    """The fused kernel whose top-k agrees with the torch path here, or (None, why not); built once."""
    return native.load(_agrees)


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    print(message, file=sys.stderr)


def sparse_teacher(logits: torch.Tensor, k: int, temperature: float, grid: tuple[float, ...],
                   targets: torch.Tensor | None = None, kernel: str = "auto") -> dict[str, torch.Tensor]:
    """Sparse summary of one chunk of positions.

    logits: ``[P, V]`` (any float dtype; computed in float32), targets: ``[P]`` int64 or None,
    ``grid`` must contain ``temperature``. Returns float32/int64 tensors on ``logits.device``:
    ``topk_ids [P, k]``, ``topk_logprobs [P, k]``, ``logsumexp [P, G]``, ``tail_logmass [P, G]`` and
    ``target_logprob [P]`` (when targets are given).

    ``kernel``: ``native`` is the fused kernel of the logits' device (:mod:`pipeline.teacher.native` on
    the CPU, :mod:`pipeline.teacher.fused_gpu` on CUDA), ``torch`` is torch operations (any device;
    memory: a few ``[P, V]`` float32 buffers), ``auto`` is the fused kernel where it builds and agrees
    with torch, else torch. All give the same top-k (ties to the lower id in the kernels; in an
    unspecified order in torch) and agree to float32 rounding elsewhere. A position whose logits
    hold NaN or +inf is an error.
    """
    resolved = resolve_kernel(kernel, logits.device)
    if resolved == "triton":
        return _fused_gpu_sparse_teacher(logits, k, temperature, grid, targets)
    z = logits.float()
    if resolved == "native":
        top_ids, top_values, lse_all, tail, bad_rows = native.sparse_rows(z, k, grid, kernel=fused_kernel()[0])
    else:
        summary = torch_sparse_teacher(z, k, grid)
        top_ids, top_values = summary["topk_ids"], summary["top_values"]
        lse_all, tail = summary["logsumexp"], summary["tail_logmass"]
        bad_rows = int((~torch.isfinite(top_values[:, 0])).sum())  # NaN and +inf sort first; -inf rows too
    if bad_rows:
        raise DistillError(f"the teacher's logits hold NaN or infinity at {bad_rows} of {z.shape[0]} positions; "
                           "check its weights, or run it in float32 (--dtype float32)")
    if k < z.shape[-1]:
        tail = _exact_small_tails(z, top_ids, tail, grid)
    lse_cache = lse_all[:, grid.index(temperature)]
    out = {
        "topk_ids": top_ids,
        "topk_logprobs": top_values / temperature - lse_cache[:, None],
        "logsumexp": lse_all,
        "tail_logmass": tail,
    }
    if targets is not None:
        out["target_logprob"] = z.gather(-1, targets[:, None]).squeeze(-1) / temperature - lse_cache
    return out


# Below this log tail the fast passes' sums may have lost terms: each dropped term is under 2^-126
# relative to the top-1 logit's, so V of them are under V·1.2e-38 ≤ 3e-33 for V ≤ 2^18, against a
# tail of at least e^-45 ≈ 2.9e-20 otherwise: 1e-13 relative at most, far below float32's 6e-8.
SMALL_TAIL = -45.0


def _exact_small_tails(z: torch.Tensor, top_ids: torch.Tensor, tail: torch.Tensor,
                       grid: tuple[float, ...], rows_per_pass: int = 64) -> torch.Tensor:
    """``tail`` with every row whose tail is below ``e^SMALL_TAIL`` at some grid temperature
    recomputed exactly: float64 log-sum-exp of the non-kept logits (shifted by their own maximum,
    so nothing underflows) minus that of all logits. Such rows are rare at T ≥ 1 and common only
    for confident teachers at small T; they cost one float64 pass each."""
    small = (tail < SMALL_TAIL).any(-1).nonzero().squeeze(-1)
    if small.numel() == 0:
        return tail
    tail = tail.clone()
    for start in range(0, small.numel(), rows_per_pass):
        rows = small[start:start + rows_per_pass]
        z64 = z[rows].double()
        rest = z64.scatter(-1, top_ids[rows], float("-inf"))
        exact = [torch.logsumexp(rest / t, -1) - torch.logsumexp(z64 / t, -1) for t in grid]
        tail[rows] = torch.stack(exact, -1).to(tail.dtype)
    return tail


def torch_sparse_teacher(z: torch.Tensor, k: int, grid: tuple[float, ...], stable: bool = False
                         ) -> dict[str, torch.Tensor]:
    """The reductions with torch operations: ``z [P, V]`` float32 → ``topk_ids``, ``top_values``
    (raw logits, largest first) ``[P, k]``, ``logsumexp`` and ``tail_logmass`` ``[P, G]``.
    ``stable``: ties to the lower id, as the fused kernels break them (a full sort, not ``topk``)."""
    if stable:
        top_values, top_ids = (t[:, :k] for t in torch.sort(z, dim=-1, descending=True, stable=True))
    else:
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
    return {"topk_ids": top_ids, "top_values": top_values,
            "logsumexp": torch.stack(lse, dim=-1), "tail_logmass": torch.stack(tail, dim=-1)}


def sparse_teacher_deferred(logits: torch.Tensor, k: int, temperature: float, grid: tuple[float, ...],
                            targets: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`sparse_teacher` by the fused GPU kernels, without waiting for the device: the outputs and
    ``status [P]`` int32 on the device. Where the status, read later, is nonzero at some row, the
    outputs of that row are not to be used: call :func:`sparse_teacher` on those logits again (it
    raises on NaN or +inf, and redoes the rows the kernel left). For callers that resolve kernels
    with :func:`resolve_kernel` first (``"triton"``)."""
    return fused_gpu.sparse_rows(logits, k, temperature, grid, targets)


def _fused_gpu_sparse_teacher(logits: torch.Tensor, k: int, temperature: float, grid: tuple[float, ...],
                              targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """:func:`sparse_teacher` by the Triton kernel: bf16 or float32 logits read once per pass, no float32
    copy. The rows it leaves (thousands of logits tied at the k-th) are redone by torch, stably."""
    out, status = fused_gpu.sparse_rows(logits, k, temperature, grid, targets)
    flags = status.cpu()  # the one synchronisation: bad rows are an error, redone rows need the host
    bad_rows = int((flags & fused_gpu.STATUS_BAD).count_nonzero())
    if bad_rows:
        raise DistillError(f"the teacher's logits hold NaN or infinity at {bad_rows} of {logits.shape[0]} positions; "
                           "check its weights, or run it in float32 (--dtype float32)")
    redo = (flags & fused_gpu.STATUS_REDO).nonzero().squeeze(-1).to(logits.device)
    if redo.numel():
        z = logits[redo].float()
        summary = torch_sparse_teacher(z, k, grid, stable=True)
        tail = _exact_small_tails(z, summary["topk_ids"], summary["tail_logmass"], grid) if k < z.shape[-1] \
            else summary["tail_logmass"]
        lse_cache = summary["logsumexp"][:, grid.index(temperature)]
        out["topk_ids"][redo] = summary["topk_ids"]
        out["topk_logprobs"][redo] = summary["top_values"] / temperature - lse_cache[:, None]
        out["logsumexp"][redo] = summary["logsumexp"]
        out["tail_logmass"][redo] = tail
        if targets is not None:
            out["target_logprob"][redo] = z.gather(-1, targets.to(z.device)[redo, None]).squeeze(-1) / temperature \
                - lse_cache
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


def _gpu_agrees(device: torch.device) -> str:
    """An empty string where the Triton kernel's top-k, log-sum-exp, tails and target log-probs on
    ``device`` match :func:`torch_sparse_teacher`'s, in float32 and bf16, else what differs."""
    generator = torch.Generator().manual_seed(0)
    # interpreted (slow), a short row; compiled, one long enough for the prefilter and its bisection
    vocab = 300 if fused_gpu.interpreted() else 5000
    logits = torch.randn(9, vocab, generator=generator) * 4
    logits[3, :] = 1.5  # all tied
    logits[5, 100:] = float("-inf")
    logits[6, 8:] = logits[6, 8:] - 200.0  # a tail under e^-45: the float64 pass
    grid, targets = (1.0, 2.0, 0.5), torch.randint(0, vocab, (9,), generator=generator)
    for dtype in (torch.float32,) if fused_gpu.interpreted() else (torch.float32, torch.bfloat16):
        z = logits.to(dtype)
        out = _fused_gpu_sparse_teacher(z.to(device), 64, 1.0, grid, targets.to(device))  # the tied row: redone
        out = {name: value.cpu() for name, value in out.items()}
        reference = torch_sparse_teacher(z.float(), 64, grid, stable=True)
        reference["tail_logmass"] = _exact_small_tails(z.float(), reference["topk_ids"], reference["tail_logmass"],
                                                       grid)
        lse = reference["logsumexp"][:, 0]
        if not torch.equal(out["topk_ids"], reference["topk_ids"]):
            return f"top-k ids differ ({dtype})"
        if not torch.allclose(out["topk_logprobs"], reference["top_values"] - lse[:, None], rtol=1e-5, atol=1e-5):
            return f"top-k log-probs differ ({dtype})"
        if not torch.allclose(out["logsumexp"], reference["logsumexp"], rtol=1e-5, atol=1e-5):
            return f"log-sum-exp differs ({dtype})"
        finite = torch.isfinite(reference["tail_logmass"])
        if not torch.equal(finite, torch.isfinite(out["tail_logmass"])) or not torch.allclose(
                out["tail_logmass"][finite], reference["tail_logmass"][finite], rtol=1e-4, atol=1e-4):
            return f"tail mass differs ({dtype})"
        if not torch.allclose(out["target_logprob"], z.float().gather(-1, targets[:, None])[:, 0] - lse,
                              rtol=1e-5, atol=1e-5):
            return f"target log-probs differ ({dtype})"
    return ""


def _agrees(kernel: native.Kernel) -> str:
    """An empty string where the fused kernel's top-k, log-sum-exp and tails match :func:`torch_sparse_teacher`'s, else what differs."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 1000, generator=generator) * 4
    logits[3, :] = 1.5  # all tied
    logits[5, 100:] = float("-inf")
    grid = (1.0, 2.0, 0.5)
    ids, values, lse, tail, bad = native.sparse_rows(logits, 64, grid, threads=2, kernel=kernel)
    reference = torch_sparse_teacher(logits, 64, grid)
    if bad:
        return f"{bad} finite rows reported as non-finite"
    if not torch.equal(values, reference["top_values"]):
        return "top-k values differ"
    if not torch.equal(ids[torch.arange(37) != 3], reference["topk_ids"][torch.arange(37) != 3]):
        return "top-k ids differ"
    if not torch.allclose(lse, reference["logsumexp"], rtol=1e-5, atol=1e-5):
        return "log-sum-exp differs"
    finite = torch.isfinite(reference["tail_logmass"])
    if not torch.equal(finite, torch.isfinite(tail)) or not torch.allclose(
            tail[finite], reference["tail_logmass"][finite], rtol=1e-4, atol=1e-4):
        return "tail mass differs"
    return ""

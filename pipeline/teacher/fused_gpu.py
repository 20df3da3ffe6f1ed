"""The fused GPU kernels of stage one (Triton): top-k, log-sum-exp, exact tail and keyed draws.

On a GPU the torch path reads each chunk of logits ``[P, V]`` many times: a float32 copy, the top-k,
an exp and two sums per grid temperature, a float64 copy, exp, cumulative sum and search for the
draws; on an H200 that doubles stage one's cost over a bare forward (``docs/BENCHMARKS.md``). Here
one program per row streams the row from memory (bf16 or float32, converted in registers) in a few
passes, and writes only what the store keeps.

:func:`sparse_rows` (``_sparse_kernel``), per row:

1. block maxima of 32 logits, the row's maximum, NaN and +inf;
2. a lower bound on the k-th largest logit by bisection on the block maxima (the CPU kernel's
   prefilter), then the logits at or above it gathered as keys ``(value, −id)`` into a scratch row
   of ``CAP`` slots, each ranked among them by comparisons: the top-k, largest first, ties to the
   lower id (the CPU kernel's rule; ``torch.topk`` leaves tied order unspecified);
3. ``exp((z − top)/T_g)`` at every grid temperature in one pass, summed over the logits not kept
   (the tail, never 1 − kept), with the kept mass added from the k kept values;
4. only where a row's tail is under ``e^−45`` at some temperature (or −inf, with k < V): its tail
   again in float64, shifted by the largest non-kept logit, as
   :func:`pipeline.teacher.topk._exact_small_tails` does on the CPU.

Each pass needs what the one before it found: the bound needs every block maximum, the tail sums
need the row's maximum and the k-th key, the float64 pass needs the tail. These are the passes
the algorithm needs, not re-reads that a fused loop could avoid; a row of 32k bf16 logits (64 KB)
is read from memory once and from the L2 cache after. A row whose candidates
overflow ``CAP`` (thousands of logits tied at the k-th, or fewer finite logits than k) is flagged and
recomputed by torch with a stable sort (the same ties); so is nothing else.

:func:`sample_rows` (``_sample_kernel``), per row, two passes (the targets ``u · total`` need the
total before the CDF can be searched; the tiles that hold a target are read a third time):

1. the maximum over the ids not excluded, NaN and +inf, and the total weight ``Σ exp((z − max)/T)``
   in float64, rescaled online as the maximum grows;
2. the weights in float64 tile by tile, and for each draw ``u`` the number of CDF entries below
   ``u · total``: the inverse-CDF draw of the CPU paths (the first id whose cumulative weight
   reaches the target). A tile whose cumulative range holds no target counts whole (or not at
   all); only the tiles that hold one take a parallel scan and compare it with their targets. The
   distinct ids and their counts are written in ascending order, as
   :func:`pipeline.teacher.sampling.unique_counts` writes them.

The CPU paths add the weights one by one in id order; a parallel scan rounds differently. The
draws stay those of the torch path on the CPU bit for bit anyway: every cumulative value and target
here is within ``(8V + 64)·2⁻⁵³·total`` of the sequential one (float64 summation error, plus an
ulp of difference between the GPU's and the CPU's exp), so a draw whose target is farther than that
from every cumulative value is the same draw; a row with a target that close (at most about 2·10⁻⁶
of the draws at V = 32k, by that bound) is flagged and redrawn on the CPU by
:func:`pipeline.teacher.sampling.torch_sample_teacher`, the reference. The uniforms are
:func:`pipeline.teacher.sampling.uniforms`, exact integer arithmetic on any device.

Both kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported) on CPU tensors, which is how ``make test`` checks them without a GPU, and
``python -m pipeline.teacher.fused_gpu`` compiles them for an H100/H200 without one
(:func:`compile_for`: registers, spills). ``DISTILL_TRITON=0`` turns them off. This module is the
binding: :mod:`pipeline.teacher.topk` and :mod:`pipeline.teacher.sampling` choose it and check it
once against their torch path (:func:`load`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch

try:  # an optional dependency (the `gpu` extra; CUDA builds of torch bring it)
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised where triton is absent
    triton, tl, IMPORT_ERROR = None, None, f"triton does not import ({error})"
else:
    IMPORT_ERROR = ""

MAX_GRID = 8  # grid temperatures per call (the store's grid is a handful)
SMALL_TAIL = -45.0  # as pipeline.teacher.topk.SMALL_TAIL: below it the tail is redone in float64
BLOCK = 32  # logits per block maximum
# sample_rows: a draw whose target is within this many float64 ulps of the total (times V) of a
# cumulative value is redrawn on the CPU. The sequential and the scanned sums each stray at most
# V·2⁻⁵³·total, the two exps an ulp per term: 8V + 64 leaves a factor of two and more.
NEAR_ULPS_PER_ID = 8
NEAR_ULPS = 64
STATUS_BAD, STATUS_REDO = 1, 2


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(device: torch.device) -> str:
    """"" where the kernels can run on ``device``, else why not (one phrase)."""
    if triton is None:
        return IMPORT_ERROR
    if os.environ.get("DISTILL_TRITON", "1") == "0":
        return "DISTILL_TRITON=0"
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return ""
    return f"Triton kernels run on CUDA devices (or interpreted), not on {device.type}"


@functools.cache
def load(device: torch.device, check: Callable[[torch.device], str]) -> str:
    """"" where the kernels run on ``device`` and ``check(device)`` (the caller's comparison with its
    torch path) finds nothing different, else why not. Compiles on first use; cached per check."""
    why = usable(device)
    if why:
        return why
    try:
        mismatch = check(device)
    except Exception as error:  # a compiler or driver failure: say it, use torch
        return f"the Triton kernels fail on {device} ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return f"the Triton kernels disagree with torch on {device} ({mismatch})" if mismatch else ""


@functools.lru_cache(maxsize=64)
def _on_device(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """float64 constants on ``device``, made once: a tensor built from a list per call would copy from
    pageable memory and wait for the device, the wait stage one's loop avoids."""
    return torch.tensor(values, dtype=torch.float64).to(device)


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the logits' (a --device-map teacher's head may
    sit on another GPU than the first)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if triton is not None:

    @triton.jit
    def _keys(values, ids):
        """int64 keys that sort like (value descending, id ascending): a float's bits as an int32 whose
        signed order is the float order, in the high half; 2³² − 1 − id in the low half."""
        bits = values.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        return (ordered.to(tl.int64) << 32) | (4294967295 - ids.to(tl.int64))

    @triton.jit
    def _key_values(keys):
        ordered = (keys >> 32).to(tl.int32)
        bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _key_ids(keys):
        return 4294967295 - (keys & 4294967295)

    @triton.jit
    def _sparse_kernel(logits, row_stride, V, K, inverse_temperatures, G, cache_index, temperature,
                       targets, block_max, block_max_stride, candidates, candidates_stride,
                       top_ids, topk_logprobs, logsumexp, tail_logmass, target_logprob, status,
                       HAS_TARGETS: tl.constexpr, BLOCK_V: tl.constexpr, NB: tl.constexpr, RB: tl.constexpr,
                       CAP: tl.constexpr, GP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = logits + row * row_stride
        columns = tl.arange(0, BLOCK_V)
        ninf = float("-inf")
        # ---- 1: block maxima, the row's maximum, NaN and +inf
        nan = tl.zeros([], tl.int32)
        top = tl.full([], ninf, tl.float32)
        for start in range(0, V, BLOCK_V):
            z = tl.load(z_row + start + columns, mask=start + columns < V, other=ninf).to(tl.float32)
            nan = tl.maximum(nan, tl.max((z != z).to(tl.int32), 0))
            z = tl.where(z != z, ninf, z)
            blocks = tl.max(tl.reshape(z, [BLOCK_V // 32, 32]), 1)
            tl.store(block_max + row * block_max_stride + start // 32 + tl.arange(0, BLOCK_V // 32), blocks)
            top = tl.maximum(top, tl.max(z, 0))
        bad = (nan > 0) | (top == float("inf")) | (top == ninf)
        tl.debug_barrier()
        # ---- 2: a bound on the k-th largest (bisection on block maxima), the candidates above it, ranked
        maxima = tl.load(block_max + row * block_max_stride + tl.arange(0, NB),
                         mask=tl.arange(0, NB) < tl.cdiv(V, BLOCK_V) * (BLOCK_V // 32), other=ninf)
        lowest_finite = tl.min(tl.where(maxima > ninf, maxima, float("inf")), 0)
        bound = tl.where(tl.sum((maxima >= lowest_finite).to(tl.int32), 0) >= K, lowest_finite, ninf)
        above = tl.max(maxima, 0)
        for _ in range(32):
            mid = bound + (above - bound) * 0.5
            wanted = (tl.sum((maxima >= bound).to(tl.int32), 0) > K + K // 4) & (mid > bound) & (mid < above)
            enough = tl.sum((maxima >= mid).to(tl.int32), 0) >= K
            bound = tl.where(wanted & enough, mid, bound)
            above = tl.where(wanted & (enough == 0), mid, above)
        count = tl.zeros([], tl.int32)
        cand_row = candidates + row * candidates_stride
        for start in range(0, V, BLOCK_V):
            inside = start + columns < V
            z = tl.load(z_row + start + columns, mask=inside, other=ninf).to(tl.float32)
            z = tl.where(z != z, ninf, z)
            keep = inside & (z >= bound)
            slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(cand_row + slot, _keys(z, start + columns), mask=keep & (slot < CAP))
            count += tl.sum(keep.to(tl.int32), 0)
        overflow = count > CAP
        tl.debug_barrier()
        # each candidate's rank among them (keys are distinct: ids are), by comparisons in slices of
        # RB: the kept are the K of rank < K. (tl.sort would do; ranks need no shuffles and keep the
        # interpreter fast.)
        slots = tl.arange(0, CAP)
        lowest_key = -9223372036854775807 - 1
        keys = tl.load(cand_row + slots, mask=slots < count, other=lowest_key)
        rank = tl.zeros([CAP], tl.int32)
        for first in range(0, CAP, RB):
            others = tl.load(cand_row + first + tl.arange(0, RB), mask=first + tl.arange(0, RB) < count,
                             other=lowest_key)
            rank += tl.sum((others[None, :] > keys[:, None]).to(tl.int32), 1)
        is_kept = (slots < count) & (rank < K)
        values = _key_values(keys)
        kept = tl.where(is_kept, values, ninf)
        kth = tl.min(tl.where(is_kept, values, float("inf")), 0)
        kept_at_kth = tl.sum((is_kept & (values == kth)).to(tl.int32), 0)
        # ---- 3: exp at every grid temperature; the tail summed over the logits not kept
        g_index = tl.arange(0, GP)
        inv_t = tl.load(inverse_temperatures + g_index, mask=g_index < G, other=0.0)  # float64
        inv_t32 = inv_t.to(tl.float32)
        rest = tl.zeros([GP], tl.float64)
        rest_max = tl.full([], ninf, tl.float32)
        at_kth = tl.zeros([], tl.int32)
        for start in range(0, V, BLOCK_V):
            z = tl.load(z_row + start + columns, mask=start + columns < V, other=ninf).to(tl.float32)
            z = tl.where(z != z, ninf, z)
            below = z < kth
            e = tl.exp((z - top)[None, :] * inv_t32[:, None])
            rest += tl.sum(tl.where(below[None, :], e, 0.0), 1).to(tl.float64)
            rest_max = tl.maximum(rest_max, tl.max(tl.where(below, z, ninf), 0))
            at_kth += tl.sum((z == kth).to(tl.int32), 0)
        tied_outside = at_kth - kept_at_kth
        kept_mass = tl.sum(tl.exp((kept - top)[None, :] * inv_t32[:, None]), 1).to(tl.float64)
        tail_mass = rest + tied_outside.to(tl.float64) * tl.exp((kth - top) * inv_t32).to(tl.float64)
        total = tail_mass + kept_mass
        lse = top.to(tl.float64) * inv_t + tl.log(total)
        tail = tl.where(tail_mass > 0.0, tl.log(tail_mass) - tl.log(total), ninf)
        # ---- 4: tails under e^SMALL_TAIL again in float64, shifted by the largest non-kept logit
        rest_max = tl.where(tied_outside > 0, kth, rest_max)
        small = (K < V) & (tl.min(tl.where(g_index < G, tail, 0.0), 0) < -45.0) & (bad == 0)
        if small:
            rest64 = tl.zeros([GP], tl.float64)
            all64 = tl.zeros([GP], tl.float64)
            for start in range(0, V, BLOCK_V):
                z = tl.load(z_row + start + columns, mask=start + columns < V, other=ninf).to(tl.float32)
                z = tl.where(z != z, ninf, z).to(tl.float64)
                e_all = tl.exp((z - top.to(tl.float64))[None, :] * inv_t[:, None])
                e_rest = tl.exp((z - rest_max.to(tl.float64))[None, :] * inv_t[:, None])
                all64 += tl.sum(e_all, 1)
                rest64 += tl.sum(tl.where((z < kth)[None, :], e_rest, 0.0), 1)
            rest64 += tl.where(tied_outside > 0, tied_outside.to(tl.float64), 0.0)  # rest_max is kth then: exp(0)
            exact = (rest_max.to(tl.float64) * inv_t + tl.log(rest64)) - (top.to(tl.float64) * inv_t + tl.log(all64))
            tail = tl.where(rest_max > ninf, exact, ninf)
        # ---- outputs: what the store keeps
        lse32 = lse.to(tl.float32)
        tl.store(logsumexp + row * G + g_index, lse32, mask=g_index < G)
        tl.store(tail_logmass + row * G + g_index, tail.to(tl.float32), mask=g_index < G)
        lse_cache = tl.sum(tl.where(g_index == cache_index, lse32, 0.0), 0)
        tl.store(top_ids + row * K + rank, _key_ids(keys), mask=is_kept)
        tl.store(topk_logprobs + row * K + rank, kept / temperature - lse_cache, mask=is_kept)
        if HAS_TARGETS:
            target = tl.load(targets + row)
            z_target = tl.load(z_row + target).to(tl.float32)
            tl.store(target_logprob + row, z_target / temperature - lse_cache)
        tl.store(status + row, bad.to(tl.int32) * 1 + overflow.to(tl.int32) * 2)

    @triton.jit
    def _excluded(exclude_row, K_EX, ids, HAS_EXCLUDE: tl.constexpr, EXCLUDE_CHUNK: tl.constexpr):
        """Which of ``ids`` are among the row's ``K_EX`` excluded ids (int32 comparisons, EXCLUDE_CHUNK at a time)."""
        out = ids < 0
        if HAS_EXCLUDE:
            for first in range(0, K_EX, EXCLUDE_CHUNK):
                chunk = first + tl.arange(0, EXCLUDE_CHUNK)
                excluded = tl.load(exclude_row + chunk, mask=chunk < K_EX, other=-1).to(tl.int32)
                out |= tl.sum((ids[:, None] == excluded[None, :]).to(tl.int32), 1) > 0
        return out

    @triton.jit
    def _sample_kernel(logits, row_stride, V, inverse_temperature_ptr, uniforms, N, exclude, K_EX,
                       sample_ids, sample_counts, status, near_ulps,
                       BLOCK_V: tl.constexpr, SUB: tl.constexpr, NP: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                       EXCLUDE_CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = logits + row * row_stride
        exclude_row = exclude + row * K_EX
        columns = tl.arange(0, BLOCK_V)
        ninf = float("-inf")
        inverse_temperature = tl.load(inverse_temperature_ptr)  # float64 (a scalar argument would be float32)
        # ---- 1: maximum over the ids not excluded, NaN, +inf, and the total weight (rescaled online)
        nan = tl.zeros([], tl.int32)
        top = tl.full([], ninf, tl.float64)
        total = tl.zeros([], tl.float64)
        for start in range(0, V, BLOCK_V):
            ids = start + columns
            z = tl.load(z_row + ids, mask=ids < V, other=ninf).to(tl.float32).to(tl.float64)
            z = tl.where(_excluded(exclude_row, K_EX, ids, HAS_EXCLUDE, EXCLUDE_CHUNK), ninf, z)
            nan = tl.maximum(nan, tl.max((z != z).to(tl.int32), 0))
            z = tl.where(z != z, ninf, z)
            new_top = tl.maximum(top, tl.max(z, 0))
            shift = tl.where(new_top > ninf, new_top, 0.0)
            scale = tl.where(top > ninf, tl.exp((top - shift) * inverse_temperature), 0.0)
            total = total * scale + tl.sum(tl.exp((z - shift) * inverse_temperature), 0)
            top = new_top
        bad = (nan > 0) | (top == float("inf"))
        live = (top > ninf) & (bad == 0)
        draw = tl.arange(0, NP)
        u = tl.load(uniforms + row * N + draw, mask=draw < N, other=0.0)
        targets = u * total
        margin = near_ulps * 1.1102230246251565e-16 * total  # 2^-53 · (8V + 64) · total
        below = tl.zeros([NP], tl.int64)
        near = tl.zeros([NP], tl.int32)
        if live:
            # ---- 2: the weights tile by tile; per draw, how many cumulative values lie below its target.
            # A tile whose range (± margin) holds no target adds all of its ids to the draws above it
            # and nothing else; a tile that holds one is read again in SUB-wide pieces, scanned and
            # compared with its targets ([SUB, NP]): at most N of a row's V / BLOCK_V tiles.
            carry = tl.zeros([], tl.float64)
            wanted = draw < N
            for start in range(0, V, BLOCK_V):
                ids = start + columns
                inside = ids < V
                z = tl.load(z_row + ids, mask=inside, other=ninf).to(tl.float32).to(tl.float64)
                out = _excluded(exclude_row, K_EX, ids, HAS_EXCLUDE, EXCLUDE_CHUNK)
                w = tl.where(out | (z != z), 0.0, tl.exp((z - top) * inverse_temperature))
                tile_sum = tl.sum(w, 0)
                beyond = wanted & (targets > carry + tile_sum + margin)
                below += tl.where(beyond, tl.sum(inside.to(tl.int64), 0), 0)
                hit = wanted & (targets > carry - margin) & (beyond == 0)
                if tl.max(hit.to(tl.int32), 0) > 0:
                    running = carry
                    for piece in range(start, start + BLOCK_V, SUB):
                        sub_ids = piece + tl.arange(0, SUB)
                        sub_inside = sub_ids < V
                        sub_z = tl.load(z_row + sub_ids, mask=sub_inside, other=ninf).to(tl.float32).to(tl.float64)
                        sub_out = _excluded(exclude_row, K_EX, sub_ids, HAS_EXCLUDE, EXCLUDE_CHUNK)
                        sub_w = tl.where(sub_out | (sub_z != sub_z), 0.0, tl.exp((sub_z - top) * inverse_temperature))
                        cdf = running + tl.cumsum(sub_w, 0)
                        pair = sub_inside[:, None] & hit[None, :]
                        below += tl.sum((pair & (cdf[:, None] < targets[None, :])).to(tl.int64), 0)
                        near = tl.maximum(near, tl.max((pair & (tl.abs(cdf[:, None] - targets[None, :]) <= margin))
                                                       .to(tl.int32), 0))
                        running += tl.sum(sub_w, 0)
                carry += tile_sum
        drawn = tl.minimum(below, V - 1)
        valid = (draw < N) & (live.to(tl.int32) + tl.zeros([NP], tl.int32) > 0)
        # distinct ids ascending with counts: no sort, pairwise comparisons of NP draws
        same = (drawn[:, None] == drawn[None, :]) & valid[:, None] & valid[None, :]
        copies = tl.sum(same.to(tl.int32), 1)
        earlier = tl.sum((same & (draw[None, :] < draw[:, None])).to(tl.int32), 1)
        first = valid & (earlier == 0)
        slot = tl.sum((first[None, :] & (drawn[None, :] < drawn[:, None])).to(tl.int32), 1)
        tl.store(sample_ids + row * N + slot, drawn, mask=first)
        tl.store(sample_counts + row * N + slot, copies, mask=first)
        redo = tl.max(near, 0) > 0
        tl.store(status + row, bad.to(tl.int32) * 1 + (redo & live).to(tl.int32) * 2)


def sparse_rows(logits: torch.Tensor, k: int, temperature: float, grid: tuple[float, ...],
                targets: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Top-k, log-sum-exp and tail of ``logits [P, V]`` (bf16, fp16 or fp32, unit column stride) on
    its device. Returns (``topk_ids [P, k]`` int64, ``topk_logprobs [P, k]`` at ``temperature``,
    ``logsumexp`` and ``tail_logmass [P, G]``, ``target_logprob [P]`` with ``targets`` — float32),
    and ``status [P]`` int32: bit 0 a row holding NaN, +inf or only −inf (outputs unspecified), bit
    1 a row the kernel left to the caller (more than ``CAP`` candidates: redo it with torch)."""
    rows, vocab = logits.shape
    if len(grid) > MAX_GRID:
        raise ValueError(f"at most {MAX_GRID} grid temperatures per call, got {len(grid)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    block_v = min(1024, max(64, _next_power_of_2(vocab)))
    n_blocks = _next_power_of_2(triton.cdiv(vocab, block_v) * (block_v // BLOCK))
    # candidate slots: all of a small row; else 8k, a few times what a language model's logits leave
    cap = _next_power_of_2(vocab) if vocab <= 4096 else max(256, _next_power_of_2(8 * k))
    out = {
        "topk_ids": torch.empty(rows, k, dtype=torch.int64, device=device),
        "topk_logprobs": torch.empty(rows, k, dtype=torch.float32, device=device),
        "logsumexp": torch.empty(rows, len(grid), dtype=torch.float32, device=device),
        "tail_logmass": torch.empty(rows, len(grid), dtype=torch.float32, device=device),
    }
    target_logprob = torch.empty(rows, dtype=torch.float32, device=device)
    status = torch.zeros(rows, dtype=torch.int32, device=device)
    if rows == 0:
        return ({**out, "target_logprob": target_logprob} if targets is not None else out), status
    block_max = torch.empty(rows, n_blocks, dtype=torch.float32, device=device)
    candidates = torch.empty(rows, cap, dtype=torch.int64, device=device)
    inverse = _on_device(tuple(1.0 / t for t in grid), device)
    has_targets = targets is not None
    target_ids = targets.to(device=device, dtype=torch.int64).contiguous() if has_targets else status
    with _on(device):
        _sparse_kernel[(rows,)](
            logits, logits.stride(0), vocab, k, inverse, len(grid), grid.index(temperature), float(temperature),
            target_ids, block_max, block_max.stride(0), candidates, candidates.stride(0),
            out["topk_ids"], out["topk_logprobs"], out["logsumexp"], out["tail_logmass"], target_logprob, status,
            HAS_TARGETS=has_targets, BLOCK_V=block_v, NB=n_blocks, RB=min(cap, 16), CAP=cap,
            GP=_next_power_of_2(len(grid)), num_warps=4 if block_v <= 512 else 8)
    if has_targets:
        out["target_logprob"] = target_logprob
    return out, status


def sample_rows(logits: torch.Tensor, inverse_temperature: float, draws: torch.Tensor,
                exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws from ``logits [P, V]`` (bf16, fp16 or fp32) at ``1/T = inverse_temperature`` on the
    uniforms ``draws [P, n]`` float64, restricted to the ids not in ``exclude [P, k]`` where given.
    Returns ``sample_ids [P, n]`` int64 and ``sample_counts [P, n]`` int32 (distinct ids ascending,
    then id 0 count 0), and ``status [P]`` int32: bit 0 a row holding NaN or +inf among its sampled
    logits, bit 1 a row with a target too close to a CDF boundary to decide here (redraw it on the
    CPU, :func:`pipeline.teacher.sampling.torch_sample_teacher`)."""
    rows, vocab = logits.shape
    n = draws.shape[1]
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    ids = torch.zeros(rows, n, dtype=torch.int64, device=device)
    counts = torch.zeros(rows, n, dtype=torch.int32, device=device)
    status = torch.zeros(rows, dtype=torch.int32, device=device)
    if rows == 0:
        return ids, counts, status
    draws = draws.to(device=device, dtype=torch.float64).contiguous()
    k_ex = 0 if exclude is None else exclude.shape[1]
    excluded = (exclude.to(device=device, dtype=torch.int64).contiguous() if k_ex
                else torch.full((1,), -1, dtype=torch.int64, device=device))
    n_pad = _next_power_of_2(n)
    with _on(device):
        _sample_kernel[(rows,)](
            logits, logits.stride(0), vocab, _on_device((float(inverse_temperature),), device),
            draws, n, excluded, k_ex, ids, counts, status, float(NEAR_ULPS_PER_ID * vocab + NEAR_ULPS),
            BLOCK_V=min(512, max(16, _next_power_of_2(vocab))), SUB=max(16, 2048 // n_pad), NP=n_pad,
            HAS_EXCLUDE=k_ex > 0, EXCLUDE_CHUNK=8, num_warps=4)
    return ids, counts, status


def compile_for(capability: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp32")) -> dict[str, dict[str, int]]:
    """Compile both kernels to a cubin for CUDA compute ``capability`` (90: H100/H200) with Triton's own
    ptxas, without a GPU: what the interpreter cannot show (a construct with no lowering, a register
    spill). Returns each build's registers and spilled bytes per thread, by name. Needs triton's
    compiled mode (``TRITON_INTERPRET`` unset)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target, usage = GPUTarget("cuda", capability, 32), {}
    sparse = dict(row_stride="i64", V="i32", K="i32", inverse_temperatures="*fp64", G="i32", cache_index="i32",
                  temperature="fp32", targets="*i64", block_max="*fp32", block_max_stride="i64", candidates="*i64",
                  candidates_stride="i64", top_ids="*i64", topk_logprobs="*fp32", logsumexp="*fp32",
                  tail_logmass="*fp32", target_logprob="*fp32", status="*i32")
    sample = dict(row_stride="i64", V="i32", inverse_temperature_ptr="*fp64", uniforms="*fp64", N="i32",
                  exclude="*i64", K_EX="i32", sample_ids="*i64", sample_counts="*i32", status="*i32", near_ulps="fp32")
    builds = []
    for dtype in dtypes:  # stage one's shapes at V = 32k: top-64 and top-1, 32 draws, 48 tail draws beside 8 kept
        for k in (64, 1):
            builds.append((f"sparse {dtype} k={k}", _sparse_kernel, {"logits": f"*{dtype}", **sparse},
                           dict(HAS_TARGETS=True, BLOCK_V=1024, NB=1024, RB=16, CAP=max(256, 8 * k), GP=2), 8))
        for n_pad, k_ex in ((32, 0), (64, 8)):
            builds.append((f"sample {dtype} n={n_pad} exclude={k_ex}", _sample_kernel,
                           {"logits": f"*{dtype}", **sample},
                           dict(BLOCK_V=512, SUB=2048 // n_pad, NP=n_pad, HAS_EXCLUDE=k_ex > 0, EXCLUDE_CHUNK=8), 4))
    for name, kernel, signature, constants, warps in builds:
        signature = {**signature, **{key: "constexpr" for key in constants}}
        names = list(signature)
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(key),): value for key, value in constants.items()})
        compiled = triton.compile(source, target=target, options={"num_warps": warps})
        usage[name] = _resource_usage(compiled.asm["cubin"])
    return usage


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and local memory (spills) per thread of a cubin, by the cuobjdump that ships with triton."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True,
                              timeout=60).stdout
    found = {key: re.search(rf"{key}:(\d+)", text) for key in ("REG", "LOCAL")}
    return {"registers": int(found["REG"].group(1)) if found["REG"] else -1,
            "spilled_bytes": int(found["LOCAL"].group(1)) if found["LOCAL"] else -1}


if __name__ == "__main__":  # python -m pipeline.teacher.fused_gpu: compile for an H100/H200 here, GPU or not
    import json
    import sys

    if triton is None or interpreted():
        sys.exit(f"cannot compile: {IMPORT_ERROR or 'TRITON_INTERPRET=1 is set'}")
    print(json.dumps(compile_for(int(sys.argv[1]) if len(sys.argv) > 1 else 90)))

"""Sampled-token teacher targets (RS-KD, Anshumann et al. 2025): N draws per position, as unique ids with counts.

Per position, ``N`` token ids are drawn with replacement from the teacher's ``softmax(z/T)`` at the
cache temperature; the store keeps the distinct ids with their counts, and ``count_i/N`` is an
unbiased estimate of ``p_i`` (so the forward-KL gradient ``(q − p)/T`` is unbiased too). In the
hybrid store (exact top-k plus sampled tail) the draws come from the distribution restricted to
the ids outside the top-k, renormalised.

Draws are reproducible anywhere: the randomness of a position is a pure function of
``(store seed, global row, position)`` (:func:`position_keys`) and the draw index
(:func:`uniforms`), a counter-based hash in exact int64 arithmetic, with no ``torch.Generator``
and no global RNG state. Any shard therefore recomputes the same uniforms on rerun, in another
array job or on another device. Given the uniforms, the draw is the inverse CDF in float64
(:func:`sample_teacher`); the fused CPU kernel and the torch path compute that CDF with the same
float64 operations in the same order, so they draw the same ids except where a uniform falls
within an ulp or so (~1e-16 relative) of a CDF boundary, since their float64 ``exp`` may differ in
the last bit. torch's parallel cumulative sum on a GPU rounds differently again: the same kind of
rare boundary disagreement, not a different distribution. The fused GPU kernel
(:mod:`pipeline.teacher.fused_gpu`) has none: it finds every draw it can decide within its rounding
bound, and the torch path on the CPU redraws the rest, so its draws are the CPU torch path's exactly.
"""

from __future__ import annotations

import torch

from pipeline.errors import DistillError
from pipeline.teacher import fused_gpu, native
from pipeline.teacher.topk import warn_once, resolve_kernel

MASK32 = 0xFFFFFFFF
# torch path: logits per pass, bounding its two float64 [rows, V] buffers: on a CPU, 2 MiB each, so
# they stay in cache (a fresh 128 MiB buffer costs more in page faults than its exp); on a GPU,
# 128 MiB each, few enough launches per chunk
ELEMENTS_PER_PASS = {"cpu": 1 << 18}
ELEMENTS_PER_PASS_DEVICE = 1 << 24


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x · constant) mod 2³²`` for int64 ``x`` in [0, 2³²), in place: the constant is split in
    16-bit halves so that no product leaves int64's range (exact on any device, no reliance on overflow)."""
    high = (x * (constant >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(constant & 0xFFFF).add_(high).bitwise_and_(MASK32)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer mixer, a bijection of [0, 2³²), on int64 tensors (a new tensor)."""
    x = x ^ (x >> 16)
    _mul32(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def _splitmix64(value: int) -> int:
    """One splitmix64 output as a Python int in [0, 2⁶⁴): the store seed's 64-bit mask."""
    z = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def position_keys(seed: int, rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """int64 ``[R, seq_len]`` counter keys of (store seed, global row index, position).

    rows: int64 ``[R]`` global row indices. The key is the global position ``row · seq_len + pos``
    XOR a 64-bit mask hashed from the seed: distinct positions of one store never share a key, and
    another seed's keys are unrelated. Same inputs → same keys on any device or process.
    """
    mask = _splitmix64(seed & 0xFFFFFFFFFFFFFFFF)
    mask = mask - (1 << 64) if mask >= 1 << 63 else mask  # as a signed int64
    positions = torch.arange(seq_len, dtype=torch.int64, device=rows.device)
    return (rows.to(torch.int64)[:, None] * seq_len + positions) ^ mask


def uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """float64 ``[P, n]`` in (0, 1) from int64 ``keys [P]``: draw ``j`` of key ``x`` is a pure
    function of ``(x, j)``.

    Two 32-bit digests of the key, ``a`` and ``b`` (lowbias32 chains over its halves, in opposite
    orders), are each mixed with a hash of ``j``: ``h1 = lowbias32(a ^ lowbias32(j ^ c1))``, ``h2``
    likewise from ``b``; the 52 bits ``h1 · 2²⁰ + h2 >> 12`` give ``u = (m + 0.5) / 2⁵²``, so
    ``2⁻⁵³ ≤ u ≤ 1 − 2⁻⁵³``. All arithmetic is int64 masked to 32 bits (:func:`lowbias32`), exact
    on CPU and CUDA alike.
    """
    keys = keys.to(torch.int64)
    low, high = keys & MASK32, (keys >> 32) & MASK32
    digest_a = lowbias32(low ^ lowbias32(high ^ 0x9E3779B9))
    digest_b = lowbias32(high ^ lowbias32(low ^ 0x85EBCA6B))
    draw = torch.arange(n, dtype=torch.int64, device=keys.device)
    h1 = lowbias32(digest_a[:, None] ^ lowbias32(draw ^ 0x27D4EB2F)[None, :])
    h2 = lowbias32(digest_b[:, None] ^ lowbias32(draw ^ 0x165667B1)[None, :])
    mantissa = h1.bitwise_left_shift_(20).bitwise_or_(h2.bitwise_right_shift_(12))
    return mantissa.double().add_(0.5).mul_(2.0**-52)


def sample_teacher(logits: torch.Tensor, samples: int, temperature: float, keys: torch.Tensor,
                   exclude: torch.Tensor | None = None, kernel: str = "auto") -> dict[str, torch.Tensor]:
    """Sampled-token targets of one chunk of positions.

    logits: ``[P, V]`` (any float dtype; read as float32, CDF in float64), keys: int64 ``[P]``
    (:func:`position_keys`, flattened). Draws ``samples`` ids per position with replacement from
    ``softmax(z / temperature)`` by inverse CDF on ``uniforms(keys, samples)``: draw ``u`` is the
    smallest id whose cumulative weight reaches ``u · total``, so an id of probability exactly 0
    (a ``−inf`` logit, an excluded id) is never drawn. With ``exclude`` int64 ``[P, k]`` (the
    top-k ids of the hybrid store) the draws come from the distribution restricted to the other
    ids (the renormalised residual); a row whose residual holds only ``−inf`` logits gets no draws
    (all counts 0).

    Returns on ``logits.device``: ``sample_ids`` int64 ``[P, S]`` and ``sample_counts`` int32
    ``[P, S]`` with ``S = samples``: the distinct drawn ids in ascending order, then padding (id 0,
    count 0); the counts of a row sum to ``samples`` (or 0 as above).

    ``kernel``: ``native`` is the fused kernel of the logits' device (C on the CPU, Triton on CUDA:
    :mod:`pipeline.teacher.fused_gpu`), ``torch`` is torch operations (any device; memory: two float64
    ``[rows, V]`` buffers of at most 128 MiB each, 2 MiB on a CPU), ``auto`` the fused kernel where it
    builds and agrees, else torch (:func:`pipeline.teacher.topk.resolve_kernel`). The C kernel draws the
    torch path's ids but where a uniform is within ~1e-16 of a CDF boundary; the Triton kernel draws
    exactly the torch path's ids on the CPU (it redraws the rare rows it cannot decide there); torch on
    a GPU rounds its parallel cumulative sum differently, the same rare boundary cases. A position
    whose sampled logits hold NaN or +inf is an error.
    """
    if samples < 1:
        raise DistillError(f"--samples must be at least 1, got {samples}")
    if not temperature > 0:
        raise DistillError(f"the sampling temperature must be positive, got {temperature}")
    vocab = logits.shape[-1]
    if exclude is not None and exclude.numel() and (int(exclude.min()) < 0 or int(exclude.max()) >= vocab):
        raise ValueError(f"exclude holds ids outside [0, {vocab})")
    draws = uniforms(keys.to(logits.device), samples)
    resolved = resolve_kernel(kernel, logits.device)
    if resolved == "triton":
        why = fused_gpu_problem(logits.device)
        if not why:
            return _fused_gpu_sample(logits, temperature, draws, exclude)
        if kernel != "auto":
            raise DistillError(f"the fused GPU kernels' sampling is unavailable on {logits.device} ({why}); "
                               "use --kernel torch")
        warn_once(f"distill: the fused GPU kernels' sampling is unavailable ({why}); stage one draws with torch")
    z = logits.float()
    if resolved == "native" and (fused := fused_kernel(kernel))[0] is not None:
        ids, counts, bad_rows = native.sample_rows(z, 1.0 / temperature, draws, exclude, kernel=fused[0])
    else:
        out = torch_sample_teacher(z, 1.0 / temperature, draws, None if exclude is None else exclude.to(z.device))
        ids, counts, bad_rows = out["sample_ids"], out["sample_counts"], int(out["bad_rows"])
    if bad_rows:
        raise DistillError(f"the teacher's logits hold NaN or infinity at {bad_rows} of {z.shape[0]} positions; "
                           "check its weights, or run it in float32 (--dtype float32)")
    return {"sample_ids": ids.to(logits.device), "sample_counts": counts.to(logits.device)}


def torch_sample_teacher(z: torch.Tensor, inverse_temperature: float, draws: torch.Tensor,
                         exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The draws with torch operations: ``z [P, V]`` float32, ``draws [P, n]`` float64 uniforms,
    ``exclude [P, k]`` int64 or None → ``sample_ids [P, n]`` int64, ``sample_counts [P, n]`` int32
    and ``bad_rows`` (a 0-d tensor: rows whose sampled logits hold NaN or +inf; their outputs are 0).
    Row blocks of ``ELEMENTS_PER_PASS`` logits bound the two float64 buffers."""
    rows, vocab = z.shape
    n = draws.shape[1]
    drawn = torch.empty(rows, n, dtype=torch.int64, device=z.device)
    live = torch.empty(rows, dtype=torch.bool, device=z.device)
    bad = torch.zeros((), dtype=torch.int64, device=z.device)
    step = max(1, ELEMENTS_PER_PASS.get(z.device.type, ELEMENTS_PER_PASS_DEVICE) // max(vocab, 1))
    for start in range(0, rows, step):
        block = slice(start, start + step)
        # The same float64 operations, in the same order, as the kernel's: (z − max) · (1/T) from the
        # logits widened exactly, exp, then a sequential cumulative sum (torch.cumsum on the CPU).
        weights = z[block].double()
        if exclude is not None:
            weights.scatter_(-1, exclude[block], float("-inf"))
        top = weights.max(dim=-1, keepdim=True).values
        row_bad = torch.isnan(top[:, 0]) | torch.isposinf(top[:, 0])
        row_live = torch.isfinite(top[:, 0])
        bad += row_bad.sum()
        live[block] = row_live
        top = torch.where(row_live[:, None], top, torch.zeros_like(top))  # no (−inf) − (−inf) = NaN
        weights.sub_(top).mul_(inverse_temperature).exp_()
        cdf = torch.cumsum(weights, dim=-1)
        del weights
        targets = draws[block] * cdf[:, -1:]
        # left side: the first id whose cumulative weight reaches the target. A zero-weight id
        # repeats the previous cumulative value, so it is never the first to reach a target above
        # that value; the target is at least 2^-53 · total > 0, so neither is a leading zero-weight
        # id; and u < 1 keeps the target at or below the total, inside the row.
        drawn[block] = torch.searchsorted(cdf, targets).clamp_(max=vocab - 1)
        del cdf
    return {**unique_counts(drawn, live), "bad_rows": bad}


def sample_teacher_deferred(logits: torch.Tensor, samples: int, temperature: float, keys: torch.Tensor,
                            exclude: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`sample_teacher` by the fused GPU kernel, without waiting for the device: the draws and
    ``status [P]`` int32 on the device; where it is nonzero, call :func:`sample_teacher` again (it
    raises on NaN or +inf, and redraws undecided rows on the CPU). Arguments as there, checked there."""
    ids, counts, status = fused_gpu.sample_rows(logits, 1.0 / temperature, uniforms(keys.to(logits.device), samples),
                                                exclude)
    return {"sample_ids": ids, "sample_counts": counts}, status


def fused_gpu_problem(device: torch.device) -> str:
    """"" where the fused GPU kernel draws on ``device`` exactly what the torch path draws (checked
    once), else why not."""
    return fused_gpu.load(device, _gpu_agrees)


def _fused_gpu_sample(logits: torch.Tensor, temperature: float, draws: torch.Tensor,
                      exclude: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """:func:`sample_teacher` by the Triton kernel; rows with a target within rounding of a CDF boundary
    are redrawn by :func:`torch_sample_teacher` on the CPU (the reference: a sequential cumulative sum)."""
    ids, counts, status = fused_gpu.sample_rows(logits, 1.0 / temperature, draws, exclude)
    flags = status.cpu()  # the one synchronisation
    bad_rows = int((flags & fused_gpu.STATUS_BAD).count_nonzero())
    if bad_rows:
        raise DistillError(f"the teacher's logits hold NaN or infinity at {bad_rows} of {logits.shape[0]} positions; "
                           "check its weights, or run it in float32 (--dtype float32)")
    redo = (flags & fused_gpu.STATUS_REDO).nonzero().squeeze(-1)
    if redo.numel():
        on_device = redo.to(logits.device)
        again = torch_sample_teacher(logits[on_device].float().cpu(), 1.0 / temperature, draws[on_device].cpu(),
                                     None if exclude is None else exclude[on_device].cpu())
        ids[on_device] = again["sample_ids"].to(ids.device)
        counts[on_device] = again["sample_counts"].to(counts.device)
    return {"sample_ids": ids, "sample_counts": counts}


def unique_counts(drawn: torch.Tensor, live: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per row of ``drawn [P, n]`` ids: the distinct ids ascending with their counts, then id 0
    count 0 — ``sample_ids [P, n]`` int64, ``sample_counts [P, n]`` int32 — without a loop over
    rows: sort, mark where a run starts, number the runs and scatter-add. Rows where ``live [P]``
    is False come back all padding."""
    ordered = drawn.sort(dim=-1).values
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = starts.cumsum(dim=-1) - 1  # the run each draw belongs to: [P, n] in [0, n)
    ids = torch.zeros_like(ordered).scatter_(-1, slot, ordered)  # every draw of a run writes the same id
    counts = torch.zeros(ordered.shape, dtype=torch.int32, device=ordered.device)
    counts.scatter_add_(-1, slot, torch.ones_like(counts))
    if live is not None:
        ids.masked_fill_(~live[:, None], 0)
        counts.masked_fill_(~live[:, None], 0)
    return {"sample_ids": ids, "sample_counts": counts}


def sampled_logprobs(logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 ``[P, S]``: ``log softmax(z / temperature)`` of ``logits [P, V]`` at ``ids [P, S]``
    (the store's ``sample_ids``, with their ``counts [P, S]``), for ``--sample-logprobs``.

    Every slot whose count is 0 — padding, and slot 0 (id 0) of a row that drew nothing, a hybrid
    row whose tail holds no mass — gets **0.0**: finite, so ``count · f(logprob)`` stays 0 there,
    never ``0 · inf``, and never the ``−inf`` that ``log p(id 0)`` is where id 0 has probability 0
    (stores written before this hold it; :class:`pipeline.train.teacher_signal.StoredSampled` masks it on
    read). The log-sum-exp is taken in float64.
    """
    z = logits.float()
    lse = torch.logsumexp(z.double() / temperature, dim=-1, keepdim=True)
    logprobs = (z.gather(-1, ids).double() / temperature - lse).float()
    return logprobs.masked_fill_(counts == 0, 0.0)



def fused_kernel(kernel: str = "auto") -> tuple[native.Kernel | None, str]:
    """The fused kernel whose draws agree with the torch path here, or (None, why not); built once.
    Where it does not, ``kernel="native"`` is a one-line error and ``auto`` warns once and uses torch."""
    fused, why = native.load(_agrees)
    if fused is None:
        if kernel == "native":
            raise DistillError(f"the fused CPU kernel's sampling is unavailable ({why}); use --kernel torch")
        warn_once(f"distill: the fused CPU kernel's sampling is unavailable ({why}); stage one draws with torch")
    return fused, why


def _gpu_agrees(device: torch.device) -> str:
    """An empty string where the Triton kernel on ``device`` draws exactly the ids and counts that
    :func:`torch_sample_teacher` draws on the CPU (its undecided rows redrawn there), in float32 and
    bf16, with and without excluded ids, else what differs."""
    generator = torch.Generator().manual_seed(1)
    vocab = 300 if fused_gpu.interpreted() else 5000  # interpreted (slow), a short row
    logits = torch.randn(9, vocab, generator=generator) * 4
    logits[5, 100:] = float("-inf")
    logits[6, :] = 1.5  # all tied
    exclude = torch.topk(logits, 8, dim=-1).indices
    exclude[7] = torch.arange(vocab - 8, vocab)
    logits[7, :vocab - 8] = float("-inf")  # nothing outside the excluded ids
    draws = uniforms(torch.arange(9, dtype=torch.int64) * 7919, 50)
    for dtype in (torch.float32,) if fused_gpu.interpreted() else (torch.float32, torch.bfloat16):
        z = logits.to(dtype)
        for temperature, excluded in ((1.0, None), (0.7, exclude)):
            got = _fused_gpu_sample(z.to(device), temperature, draws.to(device),
                                    None if excluded is None else excluded.to(device))
            reference = torch_sample_teacher(z.float(), 1.0 / temperature, draws, excluded)
            if not (torch.equal(got["sample_ids"].cpu(), reference["sample_ids"])
                    and torch.equal(got["sample_counts"].cpu(), reference["sample_counts"])):
                return f"sampled ids or counts differ at T = {temperature} ({dtype})"
    return ""


def _agrees(kernel: native.Kernel) -> str:
    """An empty string where the fused kernel draws the ids and counts :func:`torch_sample_teacher` draws, else what differs."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 1000, generator=generator) * 4
    logits[5, 100:] = float("-inf")
    logits[6, :] = 1.5  # all tied
    exclude = torch.topk(logits, 8, dim=-1).indices
    exclude[7] = torch.arange(992, 1000)
    logits[7, :992] = float("-inf")  # nothing outside the excluded ids
    draws = uniforms(torch.arange(37, dtype=torch.int64) * 7919, 50)
    for temperature, excluded in ((1.0, None), (0.7, exclude), (2.0, exclude)):
        ids, counts, bad = native.sample_rows(logits, 1.0 / temperature, draws, excluded, threads=2, kernel=kernel)
        reference = torch_sample_teacher(logits, 1.0 / temperature, draws, excluded)
        if bad:
            return f"sampling: {bad} finite rows reported as non-finite"
        if not (torch.equal(ids, reference["sample_ids"]) and torch.equal(counts, reference["sample_counts"])):
            return f"sampled ids or counts differ at T = {temperature}"
    return ""

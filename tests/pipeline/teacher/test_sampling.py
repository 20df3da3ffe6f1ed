"""Sampled-token draws: the counter-based uniforms, the torch path and the fused kernel against
each other and against the teacher's distribution."""

import math

import pytest
import torch

from pipeline.errors import DistillError
from pipeline.teacher import native
from pipeline.teacher.sampling import lowbias32, position_keys, sample_teacher, sampled_logprobs, uniforms
from tests.pipeline.teacher.test_topk import lm_like_logits

KERNELS = ["torch", "native"]


@pytest.fixture(autouse=True)
def _needs_kernel(request):
    if "kernel" in request.fixturenames and request.getfixturevalue("kernel") == "native" and not native.available():
        pytest.fail(f"the fused kernel does not build here: {native.unavailable_reason()}")


def lowbias32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def check_structure(out, samples: int, live: torch.Tensor | None = None):
    """Distinct ids ascending, then padding (id 0, count 0); counts sum to ``samples`` (0 where not live)."""
    ids, counts = out["sample_ids"], out["sample_counts"]
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32 and ids.shape[1] == samples
    filled = counts > 0
    unique = filled.sum(-1)
    assert torch.equal(filled, torch.arange(samples)[None, :] < unique[:, None])  # filled slots come first
    assert (ids[~filled] == 0).all() and (counts >= 0).all()
    later = ids[:, 1:] > ids[:, :-1]
    assert (later | ~filled[:, 1:]).all()  # strictly ascending among the filled slots
    expected = torch.full_like(unique, samples) if live is None else torch.where(live, samples, 0)
    assert torch.equal(counts.sum(-1).long(), expected)


# ----------------------------------------------------------------- keys and uniforms

def test_lowbias32_is_exact_32_bit_arithmetic():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF, 123456789]
    values += torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    got = lowbias32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [lowbias32_reference(v) for v in values]


def test_keys_are_distinct_and_shard_independent():
    keys = position_keys(17, torch.arange(100), 256)
    assert keys.shape == (100, 256) and keys.dtype == torch.int64
    assert keys.unique().numel() == keys.numel()
    # a shard computing rows 40..59 alone gets the same keys as the whole store
    assert torch.equal(position_keys(17, torch.arange(40, 60), 256), keys[40:60])
    assert torch.equal(position_keys(17, torch.arange(100), 256), keys)
    other = position_keys(18, torch.arange(100), 256)
    assert not torch.isin(other, keys).any()


def test_uniforms_are_deterministic_and_uniform():
    keys = position_keys(5, torch.arange(400), 256).flatten()  # 102400 positions
    u = uniforms(keys, 8)
    assert u.dtype == torch.float64 and u.shape == (keys.numel(), 8)
    assert torch.equal(u, uniforms(keys, 8))
    assert torch.equal(uniforms(keys, 3), u[:, :3])  # draw j does not depend on how many are drawn
    assert torch.equal(uniforms(keys[1000:2000], 8), u[1000:2000])
    assert ((u > 0) & (u < 1)).all()
    assert u.flatten().unique().numel() == u.numel()  # different keys or j: different values
    # Kolmogorov–Smirnov distance of 1e5 values per draw index: 1.95/√n is the 0.1% critical value
    n = keys.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    for j in range(8):
        ordered = u[:, j].sort().values
        distance = torch.maximum(grid - ordered, ordered - (grid - 1 / n)).max().item()
        assert distance < 1.95 / math.sqrt(n), (j, distance)
    # no correlation between draws of a position, nor between neighbouring positions (4 standard errors)
    centred = u - 0.5
    for a, b in ((centred[:, 0], centred[:, 1]), (centred[:-1, 0], centred[1:, 0]), (centred[:-1, 3], centred[1:, 4])):
        correlation = (a * b).mean().item() / (1 / 12)
        assert abs(correlation) < 4 / math.sqrt(n), correlation


def test_extreme_uniforms_stay_inside_the_open_interval():
    """The largest and smallest 52-bit values map strictly inside (0, 1) in float64."""
    assert (2**52 - 1 + 0.5) * 2.0**-52 < 1.0
    assert 0.5 * 2.0**-52 > 0.0


# ----------------------------------------------------------------- the draws

@pytest.mark.parametrize("vocab", [8192, 4133])
def test_native_draws_the_same_ids_as_torch(vocab):
    """Both paths compute the same float64 CDF (up to an ulp of exp): the draws agree, position for position."""
    logits = lm_like_logits(512, vocab, seed=2)
    keys = position_keys(11, torch.arange(2), 256).flatten()
    exclude = torch.topk(logits, 64, dim=-1).indices
    agree, total = 0, 0
    for temperature in (0.5, 1.0, 2.0):
        for excluded in (None, exclude):
            a = sample_teacher(logits, 50, temperature, keys, excluded, kernel="torch")
            b = sample_teacher(logits, 50, temperature, keys, excluded, kernel="native")
            same = (a["sample_ids"] == b["sample_ids"]).all(-1) & (a["sample_counts"] == b["sample_counts"]).all(-1)
            agree += int(same.sum())
            total += same.numel()
            check_structure(a, 50)
            check_structure(b, 50)
    print(f"native vs torch: {agree}/{total} positions identical")
    assert agree / total >= 0.999


def test_low_precision_and_sliced_logits():
    wide = lm_like_logits(64, 5000, seed=4)
    keys = torch.arange(64) * 3
    for logits in (wide[:, :4990], wide.bfloat16()):
        a = sample_teacher(logits, 30, 1.0, keys, kernel="torch")
        b = sample_teacher(logits, 30, 1.0, keys, kernel="native")
        assert torch.equal(a["sample_ids"], b["sample_ids"]) and torch.equal(a["sample_counts"], b["sample_counts"])


def test_threads_split_rows_without_changing_a_bit():
    logits = lm_like_logits(103, 3000)
    draws = uniforms(torch.arange(103), 40)
    one = native.sample_rows(logits, 1.0, draws, threads=1)
    two = native.sample_rows(logits, 1.0, draws, threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the ids expected at least 5 times (the rest pooled), and its degrees of freedom."""
    expected = probabilities * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return statistic, int(keep.sum()) - 1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_frequencies_match_the_teacher(kernel, temperature):
    """20000 positions with the same logits and different keys: the pooled counts follow
    softmax(z/T), and with the top-8 excluded, the renormalised residual (Pearson χ², 0.01% level)."""
    logits = lm_like_logits(1, 200, seed=7, scale=1.5).expand(20000, 200).contiguous()
    keys = position_keys(3, torch.arange(20000), 1).flatten()
    probabilities = torch.softmax(logits[0].double() / temperature, -1)
    top = torch.topk(logits[0], 8).indices
    residual = probabilities.clone()
    residual[top] = 0
    residual /= residual.sum()
    for exclude, expected in ((None, probabilities), (top.expand(20000, 8), residual)):
        out = sample_teacher(logits, 10, temperature, keys, exclude, kernel=kernel)
        check_structure(out, 10)
        pooled = torch.zeros(200, dtype=torch.float64).index_add_(
            0, out["sample_ids"].flatten(), out["sample_counts"].flatten().double())
        assert pooled.sum() == 200000
        if exclude is not None:
            assert pooled[top].sum() == 0
        statistic, freedom = chi_square(pooled, expected)
        # χ² with d degrees of freedom: mean d, sd √(2d); 4.5 sd is beyond the 1e-4 tail here
        assert statistic < freedom + 4.5 * math.sqrt(2 * freedom), (statistic, freedom)
        # and the largest per-id deviation is a few standard errors
        se = (expected * (1 - expected) * 200000).sqrt()
        z_scores = (pooled - expected * 200000)[expected > 0] / se[expected > 0]
        assert z_scores.abs().max() < 5.0


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_probability_ids_are_never_drawn(kernel):
    """−inf logits anywhere in a row (first id, last id, runs in the middle: zero-width CDF
    intervals) and excluded ids are never drawn; a row with nothing left gets no draws."""
    vocab, rows = 64, 600
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, :5] = float("-inf")
    logits[:, 20:30] = float("-inf")
    logits[:, -3:] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, 40] = 0.0  # a single finite id takes every draw
    logits[2, :] = 30.0  # all tied: every id equally likely
    exclude = torch.tensor([5, 6, 7, 40, 41]).expand(rows, 5).contiguous()
    keys = torch.arange(rows) * 101 + 7
    out = sample_teacher(logits, 50, 0.5, keys, kernel=kernel)
    check_structure(out, 50)
    drawn = out["sample_ids"][out["sample_counts"] > 0]
    assert not torch.isinf(logits.gather(-1, out["sample_ids"])[out["sample_counts"] > 0]).any()
    assert out["sample_ids"][1, 0] == 40 and out["sample_counts"][1, 0] == 50
    assert drawn.numel() > 0
    # excluded: id 40 was row 1's only finite id, so row 1 has no residual mass
    out = sample_teacher(logits, 50, 1.0, keys, exclude, kernel=kernel)
    live = torch.ones(rows, dtype=torch.bool)
    live[1] = False
    check_structure(out, 50, live)
    filled = out["sample_counts"] > 0
    assert not torch.isin(out["sample_ids"][filled], torch.tensor([5, 6, 7, 40, 41])).any()
    assert not torch.isinf(logits.gather(-1, out["sample_ids"])[filled]).any()
    assert (out["sample_counts"][1] == 0).all() and (out["sample_ids"][1] == 0).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_residual_far_below_the_top_still_has_mass(kernel):
    """The residual is shifted by its own maximum: a tail ~1000 nats under the top-k (where exp
    of z − top underflows) still gets its draws, from the right distribution."""
    logits = torch.full((4, 100), -1000.0)
    logits[:, :4] = 50.0
    logits[:, 10] = -999.0  # e times more likely than any other tail id
    exclude = torch.arange(4).expand(4, 4)
    out = sample_teacher(logits, 50, 1.0, torch.arange(4), exclude, kernel=kernel)
    check_structure(out, 50)
    assert (out["sample_ids"][out["sample_counts"] > 0] >= 4).all()


def test_empty_and_single_vocabulary_edges():
    logits = torch.zeros(3, 1)
    for kernel in KERNELS:
        out = sample_teacher(logits, 7, 1.0, torch.arange(3), kernel=kernel)
        assert out["sample_ids"][:, 0].tolist() == [0, 0, 0] and out["sample_counts"][:, 0].tolist() == [7, 7, 7]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error(kernel, bad):
    logits = lm_like_logits(40, 2048)
    logits[17, 1234] = bad
    with pytest.raises(DistillError, match="NaN or infinity at 1 of 40 positions"):
        sample_teacher(logits, 10, 1.0, torch.arange(40), kernel=kernel)


def test_bad_arguments_are_reported():
    logits = lm_like_logits(4, 100)
    with pytest.raises(DistillError, match="samples must be at least 1"):
        sample_teacher(logits, 0, 1.0, torch.arange(4))
    with pytest.raises(DistillError, match="temperature must be positive"):
        sample_teacher(logits, 5, 0.0, torch.arange(4))
    with pytest.raises(ValueError, match="outside"):
        sample_teacher(logits, 5, 1.0, torch.arange(4), torch.full((4, 2), 100))


# ----------------------------------------------------------------- the stored log-probs

def test_sampled_logprobs_are_the_teachers_at_the_stored_ids():
    logits = lm_like_logits(64, 3000, seed=9)
    out = sample_teacher(logits, 20, 2.0, torch.arange(64), kernel="torch")
    got = sampled_logprobs(logits, out["sample_ids"], out["sample_counts"], 2.0)
    assert got.dtype == torch.float32 and got.shape == (64, 20)
    expected = torch.log_softmax(logits.double() / 2.0, -1).gather(-1, out["sample_ids"])
    filled = out["sample_counts"] > 0
    torch.testing.assert_close(got.double()[filled], expected[filled], rtol=0, atol=1e-5)
    assert (got[~filled] == 0).all()  # padding is 0.0


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_that_drew_nothing_stores_a_finite_logprob(kernel):
    """A hybrid row whose tail holds only −inf logits draws nothing: slot 0 is id 0 with count 0.
    Where id 0 itself has probability 0 its log-prob is −inf; the store keeps 0.0 there, as at any
    padding, and the teacher's log-probs at the drawn ids of the other rows."""
    logits = lm_like_logits(6, 50, seed=4)
    logits[:, 0] = float("-inf")
    logits[2, 8:] = float("-inf")  # ids 1..7 finite, all in the top 7: nothing left to draw
    exclude = torch.topk(logits, 7, dim=-1).indices
    out = sample_teacher(logits, 12, 1.0, torch.arange(6), exclude, kernel=kernel)
    assert (out["sample_counts"][2] == 0).all() and out["sample_ids"][2, 0] == 0
    got = sampled_logprobs(logits, out["sample_ids"], out["sample_counts"], 2.0)
    assert torch.isfinite(got).all() and (got[2] == 0).all()
    expected = torch.log_softmax(logits.double() / 2.0, -1).gather(-1, out["sample_ids"])
    filled = out["sample_counts"] > 0
    assert filled.sum() > 5 * 6
    torch.testing.assert_close(got.double()[filled], expected[filled], rtol=0, atol=1e-5)

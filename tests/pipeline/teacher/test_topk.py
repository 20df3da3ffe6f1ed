"""Stage one's reductions (torch operations and the fused CPU kernel) against a dense float64 reference."""

import math

import pytest
import torch

from pipeline.errors import DistillError
from pipeline.teacher import fused_gpu, native
from pipeline.teacher.topk import resolve_kernel, retemper, sparse_teacher

KERNELS = ["torch", "native"]


def dense_reference(logits: torch.Tensor, k: int, temperature: float, grid: tuple[float, ...]):
    """Everything from full float64 log-softmaxes; the tail as the sum of the non-kept probabilities."""
    z = logits.double()
    ids = torch.topk(z, k, dim=-1).indices
    out = {"topk_ids": ids, "logsumexp": [], "tail_logmass": []}
    for t in grid:
        logprobs = torch.log_softmax(z / t, dim=-1)
        rest = logprobs.scatter(-1, ids, float("-inf"))
        out["logsumexp"].append(torch.logsumexp(z / t, dim=-1))
        out["tail_logmass"].append(torch.logsumexp(rest, dim=-1))
        if t == temperature:
            out["topk_logprobs"] = logprobs.gather(-1, ids)
            out["logprobs"] = logprobs
    out["logsumexp"] = torch.stack(out["logsumexp"], -1)
    out["tail_logmass"] = torch.stack(out["tail_logmass"], -1)
    return out


def lm_like_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """Logits shaped like a language model's: a low-rank head over random hidden states, with a
    few strong candidates per row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 64, generator=g)
    head = torch.randn(vocab, 64, generator=g) / 8
    return (hidden @ head.T) * scale + torch.randn(rows, vocab, generator=g) * 0.3


def check_against_reference(got, ref, *, tail_atol=1e-4, logits=None):
    """With ``logits``, ties are possible: the kept ids may differ among equal logits, so the
    logits at the kept ids are compared instead."""
    if logits is None:
        torch.testing.assert_close(got["topk_ids"], ref["topk_ids"], rtol=0, atol=0)
    else:
        assert torch.equal(logits.gather(-1, got["topk_ids"]), logits.gather(-1, ref["topk_ids"]))
    torch.testing.assert_close(got["topk_logprobs"].double(), ref["topk_logprobs"], rtol=0, atol=2e-5)
    torch.testing.assert_close(got["logsumexp"].double(), ref["logsumexp"], rtol=1e-6, atol=2e-5)
    finite = torch.isfinite(ref["tail_logmass"])
    assert torch.equal(torch.isfinite(got["tail_logmass"]), finite)
    torch.testing.assert_close(got["tail_logmass"].double()[finite], ref["tail_logmass"][finite],
                               rtol=0, atol=tail_atol)


@pytest.fixture(autouse=True)
def _needs_kernel(request):
    if "kernel" in request.fixturenames and request.getfixturevalue("kernel") == "native" and not native.available():
        pytest.fail(f"the fused kernel does not build here: {native.unavailable_reason()}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("vocab,k,temperature,grid", [
    (8192, 64, 1.0, (1.0, 2.0)),         # the shipped teacher's shape and the default grid
    (4133, 8, 2.0, (0.5, 1.0, 2.0, 4.0)),  # a vocabulary that is no multiple of 8; squares chained
    (1000, 64, 1.0, (1.0, 3.0)),         # fewer blocks than k: no prefilter
    (151936, 64, 1.5, (1.0, 1.5, 2.0)),  # a Qwen-sized vocabulary: float64 sums over 150k logits
])
def test_matches_dense_reference(kernel, vocab, k, temperature, grid):
    logits = lm_like_logits(6 if vocab > 10000 else 40, vocab)
    targets = torch.randint(0, vocab, (logits.shape[0],), generator=torch.Generator().manual_seed(1))
    got = sparse_teacher(logits, k, temperature, grid, targets, kernel=kernel)
    ref = dense_reference(logits, k, temperature, grid)
    check_against_reference(got, ref)
    torch.testing.assert_close(got["target_logprob"].double(), ref["logprobs"].gather(-1, targets[:, None])[:, 0],
                               rtol=0, atol=2e-5)
    # re-tempering from the cache temperature reproduces every grid temperature
    cache = grid.index(temperature)
    for g, t in enumerate(grid):
        again = retemper(got["topk_logprobs"], got["logsumexp"], temperature, cache, g, t).double()
        expected = torch.log_softmax(logits.double() / t, -1).gather(-1, ref["topk_ids"])
        torch.testing.assert_close(again, expected, rtol=0, atol=5e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_tiny_tails_keep_their_precision(kernel):
    """Kept logits far above the rest: the tail is 1e-12 of the mass and is still exact (it is
    summed, not taken as 1 − kept), and stays exact far below where exp(z − top) underflows."""
    vocab, k = 2048, 16
    logits = torch.full((4, vocab), 20.0)
    logits[0, k:] = -10.0   # gap 30: tail ≈ 127·e^−30 ≈ 1e-11 at T = 1
    logits[1, k:] = -60.0   # gap 80: tail ≈ 1e-33, still in float32's normal range
    logits[2, k:] = -80.0   # gap 100: exp(z − top) underflows at T = 1, not at T = 4
    logits[3, k:] = -980.0  # gap 1000: log tail ≈ −994, far outside exp's range, inside float32's
    got = sparse_teacher(logits, k, 1.0, (1.0, 4.0), kernel=kernel)
    for row, gap in enumerate((30.0, 80.0, 100.0, 1000.0)):
        for g, t in enumerate((1.0, 4.0)):
            log_tail = math.log(vocab - k) - gap / t  # log((V − k)·e^(−gap/T))
            expected = log_tail - math.log(k + math.exp(log_tail))
            assert got["tail_logmass"][row, g].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("temperature", [1.0, 0.25, 0.1])
def test_confident_teacher_tails_match_float64(kernel, temperature):
    """A confident teacher at small T: every non-kept logit ~87·T or more below the top (where the
    fast passes' exp underflows) still gets its exact, finite log tail."""
    logits = lm_like_logits(64, 4096, seed=3)
    logits[:, :8] += 120.0 - logits[:, :8].max(-1, keepdim=True).values  # top logit 120 …
    logits[:, 8:] = logits[:, 8:].clamp(max=110.0) - 30.0 * torch.rand(64, 1)  # … the rest ≤ 110
    grid = (1.0, 0.25, 0.1)
    got = sparse_teacher(logits, 4, temperature, grid, kernel=kernel)
    ref = dense_reference(logits, 4, temperature, grid)
    assert torch.isfinite(got["tail_logmass"]).all()
    assert (ref["tail_logmass"] < -87).any()  # the case the fast passes cannot sum
    assert torch.equal(logits.gather(-1, got["topk_ids"]), logits.gather(-1, ref["topk_ids"]))
    torch.testing.assert_close(got["tail_logmass"].double(), ref["tail_logmass"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_all_kept_and_masked_logits(kernel):
    """k = V leaves no tail (−inf); −inf logits (a masked vocabulary) carry no mass."""
    logits = lm_like_logits(5, 300)
    got = sparse_teacher(logits, 300, 1.0, (1.0, 2.0), kernel=kernel)
    assert torch.isneginf(got["tail_logmass"]).all()
    torch.testing.assert_close(torch.logsumexp(got["topk_logprobs"].double(), -1), torch.zeros(5, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    masked = lm_like_logits(4, 4096)
    masked[:, 1000:] = float("-inf")
    got = sparse_teacher(masked, 32, 1.0, (1.0, 2.0), kernel=kernel)
    check_against_reference(got, dense_reference(masked, 32, 1.0, (1.0, 2.0)))


def test_native_breaks_ties_to_the_lower_id():
    logits = torch.zeros(2, 4096)
    logits[1, 100:110] = 1.0  # ten tied leaders, k = 4: ids 100..103; the other six are tail
    got = sparse_teacher(logits, 4, 1.0, (1.0, 2.0), kernel="native")
    assert got["topk_ids"][0].tolist() == [0, 1, 2, 3]
    assert got["topk_ids"][1].tolist() == [100, 101, 102, 103]
    for g, t in enumerate((1.0, 2.0)):
        total = 4086 + 10 * math.exp(1 / t)
        assert got["tail_logmass"][0, g].item() == pytest.approx(math.log(4092 / 4096), abs=1e-6)
        assert got["tail_logmass"][1, g].item() == pytest.approx(math.log((4086 + 6 * math.exp(1 / t)) / total),
                                                                 abs=1e-6)
    # torch's order among ties is unspecified, but the kept values and the tail are the same
    reference = sparse_teacher(logits, 4, 1.0, (1.0, 2.0), kernel="torch")
    torch.testing.assert_close(reference["tail_logmass"], got["tail_logmass"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_padded_and_low_precision_logits(kernel):
    """A column slice (padded output rows dropped) and bfloat16 logits are read as they are."""
    wide = lm_like_logits(20, 5000)
    sliced = wide[:, :4990]
    got = sparse_teacher(sliced, 16, 1.0, (1.0, 2.0), kernel=kernel)
    check_against_reference(got, dense_reference(sliced, 16, 1.0, (1.0, 2.0)))
    half = wide.bfloat16()
    got = sparse_teacher(half, 16, 1.0, (1.0, 2.0), kernel=kernel)
    check_against_reference(got, dense_reference(half.float(), 16, 1.0, (1.0, 2.0)), logits=half.float())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error(kernel, bad):
    logits = lm_like_logits(40, 2048)
    logits[17, 1234] = bad
    with pytest.raises(DistillError, match="NaN or infinity at 1 of 40 positions"):
        sparse_teacher(logits, 8, 1.0, (1.0, 2.0), kernel=kernel)


def test_threads_split_rows_without_changing_a_bit():
    logits = lm_like_logits(103, 3000)
    one = native.sparse_rows(logits, 24, (1.0, 2.0), threads=1)
    two = native.sparse_rows(logits, 24, (1.0, 2.0), threads=2)
    for a, b in zip(one[:4], two[:4]):
        assert torch.equal(a, b)


def test_portable_build_matches_the_native_one():
    """The kernel without -march=native (plain vector code, no AVX intrinsics on x86-64) gives the
    same results, so a machine without AVX or another architecture gets a tested path."""
    portable, why = native.build(native.FLAGS)
    assert portable is not None, why
    logits = lm_like_logits(33, 8200)
    expected = native.sparse_rows(logits, 64, (1.0, 2.0, 3.0), threads=1)
    got = native._run(portable, logits, 64, (1.0, 2.0, 3.0), threads=1)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[3], expected[3], rtol=1e-5, atol=1e-5)
    assert not portable.openmp  # no -fopenmp: rows are split across Python threads instead
    split = native._run(portable, logits, 64, (1.0, 2.0, 3.0), threads=2)
    for a, b in zip(got[:4], split[:4]):
        assert torch.equal(a, b)


def test_kernel_choice(monkeypatch, capsys):
    assert resolve_kernel("torch", torch.device("cpu")) == "torch"
    assert resolve_kernel("torch", torch.device("cuda", 0)) == "torch"
    # on CUDA, native and auto mean the Triton kernels where they load and agree with torch
    monkeypatch.setattr(fused_gpu, "load", lambda device, check: "")
    assert resolve_kernel("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_kernel("native", torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(fused_gpu, "load", lambda device, check: "triton does not import (No module named 'triton')")
    with pytest.raises(DistillError, match="GPU kernels are unavailable on cuda:0 .triton does not import.*--kernel torch"):
        resolve_kernel("native", torch.device("cuda", 0))
    assert resolve_kernel("auto", torch.device("cuda", 0)) == "torch"
    assert "reduces the logits with torch operations" in capsys.readouterr().err
    monkeypatch.setattr(native, "load", lambda check=None: (None, "no C compiler found (set CC or install gcc)"))
    with pytest.raises(DistillError, match="unavailable .no C compiler.*use --kernel torch"):
        resolve_kernel("native", torch.device("cpu"))
    assert resolve_kernel("auto", torch.device("cpu")) == "torch"
    assert "uses torch operations" in capsys.readouterr().err


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    function, why = native.build(native.FLAGS + ("-DTEST_UNIQUE_KEY",))
    assert function is None and "/nonexistent/cc" in why


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [1, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_k_extremes_at_low_temperature_match_float64(kernel, k, temperature):
    """k = 1 and k = V on a confident teacher at T = 1 and 0.1: kept log-probs, log-sum-exps and
    tails (finite for k = 1, −inf for k = V) as a dense float64 reference gives them."""
    logits = lm_like_logits(32, 4096, seed=5, scale=6.0)
    grid = tuple(sorted({1.0, temperature}))
    got = sparse_teacher(logits, k, temperature, grid, kernel=kernel)
    ref = dense_reference(logits, k, temperature, grid)
    if k == 1:
        assert torch.isfinite(got["tail_logmass"]).all()
        torch.testing.assert_close(got["tail_logmass"].double(), ref["tail_logmass"], rtol=1e-6, atol=1e-6)
    else:
        assert torch.isneginf(got["tail_logmass"]).all()
    torch.testing.assert_close(got["logsumexp"].double(), ref["logsumexp"], rtol=1e-6, atol=1e-4)
    kept = logits.gather(-1, got["topk_ids"])
    assert torch.equal(kept, logits.gather(-1, ref["topk_ids"]))
    torch.testing.assert_close(got["topk_logprobs"].double(), ref["logprobs"].gather(-1, got["topk_ids"]),
                               rtol=0, atol=2e-5 / temperature)


def test_a_build_that_fails_its_callers_check_is_not_used():
    """The binding tries each build against the check its caller brings and says why none passed."""
    kernel, why = native.load(lambda kernel: "top-k values differ")
    assert kernel is None and why.count("disagrees with torch (top-k values differ)") == len(native.VARIANTS)
    assert native.load(lambda kernel: "")[0] is not None

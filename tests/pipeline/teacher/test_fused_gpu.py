"""The fused GPU kernels (Triton) against the float64 references the CPU kernel meets, and their draws
against the torch path's, bit for bit.

Without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set in ``tests/conftest.py``
before triton is imported), which executes each program in numpy: slow, so the tensors are tiny.
"""

import math

import pytest
import torch

from pipeline.errors import DistillError
from pipeline.teacher import fused_gpu
from pipeline.teacher.sampling import sample_teacher, torch_sample_teacher, uniforms
from pipeline.teacher.topk import resolve_kernel, sparse_teacher, torch_sparse_teacher

from tests.pipeline.teacher.test_topk import check_against_reference, dense_reference, lm_like_logits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _needs_triton():
    if why := fused_gpu.usable(DEVICE):
        pytest.fail(f"the Triton kernels cannot run here ({why}): install the gpu extra (make setup does), "
                    "and without a GPU set TRITON_INTERPRET=1 before triton is imported")


def fused(logits, k, temperature, grid, targets=None):
    out = sparse_teacher(logits.to(DEVICE), k, temperature, grid,
                         None if targets is None else targets.to(DEVICE), kernel="triton")
    return {name: value.cpu() for name, value in out.items()}


@pytest.mark.parametrize("vocab,k,temperature,grid,dtype", [
    (640, 8, 1.0, (1.0, 2.0), torch.float32),      # the default grid
    (333, 16, 2.0, (0.5, 1.0, 2.0), torch.float32),  # no multiple of the tile; three temperatures
    (300, 1, 1.0, (1.0, 2.0), torch.bfloat16),     # k = 1 (a sampled store's), bf16 read in the kernel
    (96, 96, 1.0, (1.0,), torch.float32),          # k = V: no tail (−inf)
])
def test_matches_dense_reference(vocab, k, temperature, grid, dtype):
    logits = lm_like_logits(6, vocab, seed=vocab).to(dtype)
    targets = torch.randint(0, vocab, (6,), generator=torch.Generator().manual_seed(1))
    got = fused(logits, k, temperature, grid, targets)
    ref = dense_reference(logits.float(), k, temperature, grid)
    check_against_reference(got, ref)
    torch.testing.assert_close(got["target_logprob"].double(), ref["logprobs"].gather(-1, targets[:, None])[:, 0],
                               rtol=0, atol=2e-5)
    if k == vocab:
        assert torch.isinf(got["tail_logmass"]).all() and (got["tail_logmass"] < 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_confident_teacher_tails_are_exact(temperature):
    """Every non-kept logit far under the top (where the float32 exp underflows): the kernel's float64
    pass gives the exact, finite log tail, as the CPU path's does."""
    logits = lm_like_logits(4, 512, seed=3)
    logits[:, :4] = 120.0 - torch.arange(4.0)  # the kept four
    logits[:, 4:] = logits[:, 4:].clamp(max=110.0) - torch.tensor([[0.0], [20.0], [40.0], [60.0]])
    grid = tuple(sorted({1.0, 0.25, temperature}))
    got = fused(logits, 4, temperature, grid)
    ref = dense_reference(logits, 4, temperature, grid)
    assert torch.isfinite(got["tail_logmass"]).all()
    assert (ref["tail_logmass"] < -87).any()  # beyond what float32 exp sums
    assert torch.equal(got["topk_ids"], ref["topk_ids"])
    torch.testing.assert_close(got["tail_logmass"].double(), ref["tail_logmass"], rtol=1e-6, atol=0)
    gap = 1000.0  # log tail ≈ −994 at T = 1: far outside exp's range, inside float32's
    far = torch.full((1, 200), 20.0 - gap)
    far[0, :4] = 20.0
    tail = fused(far, 4, 1.0, (1.0,))["tail_logmass"][0, 0].item()
    log_tail = math.log(196) - gap
    assert tail == pytest.approx(log_tail - math.log(4 + math.exp(log_tail)), rel=1e-6)


@pytest.mark.parametrize("k", [1, 256])
def test_k_extremes_at_low_temperature_match_float64(k):
    """k = 1 and k = V on a confident teacher at T = 0.1: kept log-probs, log-sum-exps and tails (finite
    for k = 1, −inf for k = V) as a dense float64 reference gives them."""
    logits = lm_like_logits(4, 256, seed=5, scale=6.0)
    got = fused(logits, k, 0.1, (0.1, 1.0))
    ref = dense_reference(logits, k, 0.1, (0.1, 1.0))
    if k == 1:
        assert torch.isfinite(got["tail_logmass"]).all()
        torch.testing.assert_close(got["tail_logmass"].double(), ref["tail_logmass"], rtol=1e-6, atol=1e-6)
    else:
        assert torch.isneginf(got["tail_logmass"]).all()
    torch.testing.assert_close(got["logsumexp"].double(), ref["logsumexp"], rtol=1e-6, atol=1e-4)
    assert torch.equal(logits.gather(-1, got["topk_ids"]), logits.gather(-1, ref["topk_ids"]))
    torch.testing.assert_close(got["topk_logprobs"].double(), ref["logprobs"].gather(-1, got["topk_ids"]),
                               rtol=0, atol=2e-4)


def test_ties_go_to_the_lower_id_and_minus_inf_is_a_zero():
    """Ties at the k-th logit keep the lower ids (the CPU kernel's rule) and put the others in the tail;
    −inf logits weigh nothing; a row of ties wider than the candidate slots is redone by torch, stably."""
    logits = lm_like_logits(5, 5000, seed=5)
    logits[0, :] = 1.5                      # all tied: more candidates than slots
    logits[1, 100:110] = logits[1].max() + 1.0  # ten tied at the top, k = 8 keeps ids 100..107
    logits[2, 64:] = float("-inf")          # fewer finite logits than blocks hold
    logits[3, 1:] = float("-inf")           # one finite logit, k = 8: the rest of the kept are −inf
    logits[4, ::2] = 0.25                   # half the row tied below the top
    grid = (1.0, 2.0)
    got = fused(logits, 8, 1.0, grid)
    reference = torch_sparse_teacher(logits, 8, grid, stable=True)
    assert torch.equal(got["topk_ids"], reference["topk_ids"])
    assert got["topk_ids"][0].tolist() == list(range(8)) and got["topk_ids"][1].tolist() == list(range(100, 108))
    ref = dense_reference(logits, 8, 1.0, grid)
    ref["topk_ids"] = reference["topk_ids"]
    for name in ("logsumexp", "tail_logmass"):  # the dense reference's top-k may break ties otherwise: ids aside
        finite = torch.isfinite(ref[name])
        assert torch.equal(torch.isfinite(got[name]), finite)
        torch.testing.assert_close(got[name].double()[finite], ref[name][finite], rtol=0, atol=1e-4)
    assert got["tail_logmass"][3].tolist() == [float("-inf")] * 2
    torch.testing.assert_close(got["tail_logmass"][0], torch.tensor(math.log(4992 / 5000)).expand(2), rtol=0, atol=1e-6)


def test_rows_the_kernel_cannot_select_are_flagged():
    logits = torch.zeros(2, 5000)
    logits[1] = torch.arange(5000.0)
    _, status = fused_gpu.sparse_rows(logits.to(DEVICE), 8, 1.0, (1.0,))
    assert status.cpu().tolist() == [fused_gpu.STATUS_REDO, 0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error(bad):
    logits = lm_like_logits(3, 256)
    logits[1, 17] = bad
    with pytest.raises(DistillError, match="NaN or infinity at 1 of 3 positions"):
        fused(logits, 4, 1.0, (1.0,))
    with pytest.raises(DistillError, match="NaN or infinity at 1 of 3 positions"):
        sample_teacher(logits.to(DEVICE), 5, 1.0, torch.arange(3), kernel="triton")


# ----------------------------------------------------------------- the draws

def draw_both(logits, samples, temperature, keys, exclude=None):
    got = sample_teacher(logits.to(DEVICE), samples, temperature, keys.to(DEVICE),
                         None if exclude is None else exclude.to(DEVICE), kernel="triton")
    reference = torch_sample_teacher(logits.float(), 1.0 / temperature, uniforms(keys, samples), exclude)
    return {name: value.cpu() for name, value in got.items()}, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draws_are_the_torch_paths_bit_for_bit(dtype):
    logits = lm_like_logits(8, 700, seed=2).to(dtype)
    logits[5, 100:] = float("-inf")
    logits[6, :] = 1.5  # all tied
    keys = torch.arange(8) * 7919 + 3
    exclude = torch.topk(logits.float(), 8, dim=-1).indices
    for temperature, excluded, samples in ((1.0, None, 32), (0.5, exclude, 50), (2.0, exclude, 7)):
        got, reference = draw_both(logits, samples, temperature, keys, excluded)
        assert torch.equal(got["sample_ids"], reference["sample_ids"])
        assert torch.equal(got["sample_counts"], reference["sample_counts"])
        assert (got["sample_counts"].sum(-1) == samples).all()


def test_zero_probability_ids_and_empty_residuals():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    logits[:, :5] = float("-inf")
    logits[:, 20:30] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, 40] = 0.0  # one finite id takes every draw
    exclude = torch.tensor([5, 6, 7, 40, 41]).expand(4, 5).contiguous()
    keys = torch.arange(4) * 101
    got, reference = draw_both(logits, 50, 0.5, keys)
    assert got["sample_ids"][1, 0] == 40 and got["sample_counts"][1, 0] == 50
    assert torch.equal(got["sample_ids"], reference["sample_ids"]) and torch.equal(got["sample_counts"],
                                                                                   reference["sample_counts"])
    got, reference = draw_both(logits, 50, 1.0, keys, exclude)  # row 1 has no residual: no draws
    assert (got["sample_counts"][1] == 0).all() and (got["sample_ids"][1] == 0).all()
    assert not torch.isin(got["sample_ids"][got["sample_counts"] > 0], torch.tensor([5, 6, 7, 40, 41])).any()
    assert torch.equal(got["sample_ids"], reference["sample_ids"]) and torch.equal(got["sample_counts"],
                                                                                   reference["sample_counts"])


def test_undecided_draws_are_redrawn_on_the_cpu(monkeypatch):
    """A target within rounding of a CDF boundary is left to the CPU: with a margin that covers every
    target each row is flagged and redrawn there; with none at all the kernel's own draws still agree
    on these rows (no target lies that close), so the flag, not luck, is what the margin adds."""
    logits = lm_like_logits(4, 300, seed=7)
    keys = torch.arange(4) + 11
    draws = uniforms(keys, 20)
    monkeypatch.setattr(fused_gpu, "NEAR_ULPS_PER_ID", 2**52)
    _, _, status = fused_gpu.sample_rows(logits.to(DEVICE), 1.0, draws.to(DEVICE))
    assert status.cpu().tolist() == [fused_gpu.STATUS_REDO] * 4
    got, reference = draw_both(logits, 20, 1.0, keys)
    assert torch.equal(got["sample_ids"], reference["sample_ids"])
    monkeypatch.setattr(fused_gpu, "NEAR_ULPS_PER_ID", 0)
    monkeypatch.setattr(fused_gpu, "NEAR_ULPS", 0)
    ids, counts, status = fused_gpu.sample_rows(logits.to(DEVICE), 1.0, draws.to(DEVICE))
    assert status.cpu().tolist() == [0] * 4
    assert torch.equal(ids.cpu(), reference["sample_ids"]) and torch.equal(counts.cpu(), reference["sample_counts"])


def test_the_cpu_keeps_its_kernels():
    """On the CPU `auto` and `native` still mean the C kernel (or torch), never Triton."""
    assert resolve_kernel("auto", torch.device("cpu")) in ("native", "torch")
    assert resolve_kernel("torch", torch.device("cpu")) == "torch"
    if DEVICE.type == "cpu":
        assert resolve_kernel("triton", DEVICE) == "triton"  # asked for by name: the interpreter


def test_kernels_compile_for_an_h100_without_a_gpu():
    """The interpreter runs the kernels in numpy, so it cannot show a construct that has no GPU lowering:
    compile both, in bf16 and float32, for compute capability 9.0 with triton's own ptxas (no device
    needed), in a process where triton is not interpreted. None may spill registers to local memory."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-m", "pipeline.teacher.fused_gpu", "90"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    usage = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(usage) == 8
    assert all(0 < build["registers"] <= 255 and build["spilled_bytes"] == 0 for build in usage.values()), usage


def test_a_realistic_row_bf16_32k():
    """Two rows at stage one's realistic size (bf16, V = 32768: the prefilter's bisection over 1024
    block maxima, candidates ranked in 512 slots, 64 tiles of draws most of which are counted whole):
    the stable torch path's top-64, log-sum-exps and tails, and its draws from beyond the top-64 (the
    hybrid store's; the plain draws are the same walk without the exclusion)."""
    logits = lm_like_logits(2, 32768, seed=9, scale=4.0).bfloat16()
    got = fused(logits, 64, 1.0, (1.0, 2.0), torch.tensor([5, 6]))
    reference = torch_sparse_teacher(logits.float(), 64, (1.0, 2.0), stable=True)
    assert torch.equal(got["topk_ids"], reference["topk_ids"])
    torch.testing.assert_close(got["logsumexp"], reference["logsumexp"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["tail_logmass"], reference["tail_logmass"], rtol=0, atol=1e-5)
    keys = torch.arange(2) * 31 + 1
    drawn, expected = draw_both(logits, 32, 0.7, keys, reference["topk_ids"])
    assert torch.equal(drawn["sample_ids"], expected["sample_ids"])
    assert torch.equal(drawn["sample_counts"], expected["sample_counts"])
    assert (drawn["sample_counts"].sum(-1) == 32).all()

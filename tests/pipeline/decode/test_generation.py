"""choose_with_logprob: the ids choose draws, and the log-prob of each under the distribution actually
sampled, against a dense float64 reference on tiny tensors."""

import math

import pytest
import torch

from pipeline.decode.generation import Sampling, behaviour_distribution, choose, choose_with_logprob


def reference_logprobs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """``[B, V]`` float64 log-probs of the sampled distribution, written out plainly: scale, keep the k
    largest (ties kept), keep the fewest most-probable ids whose mass reaches p, renormalise."""
    out = torch.full(logits.shape, -math.inf, dtype=torch.float64)
    for b, row in enumerate(logits.double()):
        scaled = row / sampling.temperature
        if sampling.top_k:
            kth = sorted(scaled.tolist(), reverse=True)[sampling.top_k - 1]
            scaled = torch.where(scaled >= kth, scaled, torch.tensor(-math.inf, dtype=torch.float64))
        probs = torch.exp(scaled - torch.logsumexp(scaled, 0))
        if sampling.top_p < 1:
            kept, mass = set(), 0.0
            for i in sorted(range(len(probs)), key=lambda i: (-probs[i].item(), i)):
                if mass >= sampling.top_p:
                    break
                kept.add(i)
                mass += probs[i].item()
            probs = torch.tensor([p if i in kept else 0.0 for i, p in enumerate(probs.tolist())], dtype=torch.float64)
        out[b] = torch.log(probs / probs.sum())
    return out


@pytest.mark.parametrize("sampling", [Sampling(1.0, 0, 1.0), Sampling(0.7, 0, 1.0), Sampling(1.3, 3, 1.0),
                                      Sampling(1.0, 0, 0.6), Sampling(0.8, 4, 0.9)])
def test_logprob_is_the_sampled_distributions_at_the_drawn_id(sampling):
    torch.manual_seed(0)
    logits = torch.randn(64, 7) * 2
    logits[::3, 2] = -math.inf  # ids a rule file masked
    u = torch.rand(64, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    ids, logprob = choose_with_logprob(logits, u, sampling)
    assert torch.equal(ids, choose(logits, u, sampling)) and logprob.dtype == torch.float64
    expected = reference_logprobs(logits, sampling).gather(-1, ids[:, None])[:, 0]
    assert torch.isfinite(expected).all()  # never an id the distribution excludes
    torch.testing.assert_close(logprob, expected, rtol=0, atol=1e-12)
    assert (ids[::3] != 2).all()


def test_greedy_draws_nothing():
    logits = torch.randn(5, 9)
    ids, logprob = choose_with_logprob(logits, torch.full((5,), 0.5, dtype=torch.float64), Sampling(0.0, 0, 1.0))
    assert torch.equal(ids, logits.argmax(-1)) and torch.equal(logprob, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("sampling", [Sampling(1.0, 0, 1.0), Sampling(0.7, 0, 1.0), Sampling(1.3, 3, 1.0),
                                      Sampling(1.0, 0, 0.6), Sampling(0.8, 4, 0.9), Sampling(0.0, 0, 1.0)])
def test_behaviour_distribution_is_what_choose_draws_from(sampling):
    """behaviour_distribution ``[B, V]`` (id order) is the distribution choose samples: the reference's,
    zero on every id truncation or a rule excludes, one-hot at the argmax when greedy; at the drawn ids
    its log is choose_with_logprob's (greedy: log 1 = 0, what generate stores)."""
    torch.manual_seed(1)
    logits = torch.randn(32, 7) * 2
    logits[::3, 2] = -math.inf
    u = torch.rand(32, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    probs = behaviour_distribution(logits, sampling)
    assert probs.dtype == torch.float64 and probs.shape == logits.shape
    torch.testing.assert_close(probs.sum(-1), torch.ones(32, dtype=torch.float64), rtol=0, atol=1e-12)
    if sampling.temperature == 0:
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 7).double())
    else:
        torch.testing.assert_close(probs, reference_logprobs(logits, sampling).exp(), rtol=0, atol=1e-12)
    ids, logprob = choose_with_logprob(logits, u, sampling)
    torch.testing.assert_close(probs.gather(-1, ids[:, None])[:, 0].log(), logprob, rtol=0, atol=1e-12)

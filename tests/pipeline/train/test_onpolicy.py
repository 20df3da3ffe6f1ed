"""The policy-gradient objective (on-policy distillation, #25) against float64 references: its gradient
with respect to the student's logits, position by position, and its expectation against the gradient
of the reverse KL it estimates; the reverse-KL objective against a dense KL(q ‖ p)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.decode.generation import Sampling, behaviour_distribution
from pipeline.errors import DistillError
from pipeline.teacher.topk import sparse_teacher
from pipeline.train.losses import sparse_kd
from pipeline.train.onpolicy import policy_gradient, sampler_bias
from pipeline.train.teacher_signal import StoredPolicyGradient, StoredTopK

EPS = 0.2


def analytic_gradient(logits, x, b, g, ratio, eps):
    """float64 reference: ∂loss/∂logits per position, −A·r·(onehot(x) − softmax) where the term is
    live, zero where the clip (A > 0, r > 1+ε; A < 0, r < 1−ε) or the gate (r outside the band) holds."""
    logits = logits.double()
    q = torch.softmax(logits, -1)
    lx = torch.log_softmax(logits, -1).gather(-1, x[:, None]).squeeze(-1)
    a, r = g.double() - lx, (lx - b.double()).exp()
    if ratio == "clip":
        live = ~(((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps)))
    else:
        live = (r >= 1 - eps) & (r <= 1 + eps)
    onehot = F.one_hot(x, logits.shape[-1]).double()
    return torch.where(live[:, None], -(a * r)[:, None] * (onehot - q), torch.zeros_like(q)), live


def positions_in_every_region(v=6, seed=0):
    """Student logits ``[8, V]``, drawn tokens and behaviour / teacher log-probs that put two positions
    in each of: r inside the band, r above it, r below it (each with A > 0 and A < 0), r = 1."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, v, generator=gen, dtype=torch.float64) * 2
    x = torch.randint(0, v, (8,), generator=gen)
    lx = torch.log_softmax(logits, -1).gather(-1, x[:, None]).squeeze(-1)
    log_r = torch.tensor([0.1, -0.1, 0.6, 0.6, -0.7, -0.7, 0.0, 0.05], dtype=torch.float64)
    advantage = torch.tensor([0.8, -0.5, 1.2, -0.9, 0.7, -1.1, 0.3, -0.2], dtype=torch.float64)
    return logits, x, lx - log_r, lx + advantage


@pytest.mark.parametrize("ratio", ["clip", "gate"])
def test_gradient_matches_float64_reference_in_and_out_of_the_band(ratio):
    logits, x, b, g = positions_in_every_region()
    expected, live = analytic_gradient(logits, x, b, g, ratio, EPS)
    # the regions are what they should be: the clip keeps r > 1+ε with A < 0 and r < 1−ε with A > 0
    want_live = [True, True, False, True, True, False, True, True] if ratio == "clip" else \
        [True, True, False, False, False, False, True, True]
    assert live.tolist() == want_live
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        student = logits.to(dtype).clone().requires_grad_()
        own = torch.log_softmax(student, -1).gather(-1, x[:, None]).squeeze(-1)
        terms = policy_gradient(own, b.to(dtype), g.to(dtype), ratio, EPS)
        terms.loss.sum().backward()
        torch.testing.assert_close(student.grad.double(), expected, atol=tol, rtol=tol)
        assert terms.outside.tolist() == [float(not v) for v in want_live]
        # values: PPO's −min(r·A, clip(r)·A), or −r·A inside the gate and 0 outside
        a, r = (g - own.detach().double()), (own.detach().double() - b).exp()
        want = -torch.minimum(r * a, r.clamp(1 - EPS, 1 + EPS) * a) if ratio == "clip" else \
            torch.where(torch.tensor(want_live), -r * a, torch.zeros_like(r))
        torch.testing.assert_close(terms.loss.double(), want, atol=tol, rtol=tol)
        torch.testing.assert_close(terms.ratio.double(), r, atol=tol, rtol=tol)
        torch.testing.assert_close(terms.advantage.double(), a, atol=tol, rtol=tol)


@pytest.mark.parametrize("ratio", ["clip", "gate"])
def test_a_ratio_that_overflows_outside_the_band_leaves_the_other_gradients_finite(ratio):
    logits, x, b, g = positions_in_every_region()
    b[2] = -200.0  # r = e^(l + 200): inf in float32, A > 0 at position 2: clipped, and gated
    student = logits.float().requires_grad_()
    own = torch.log_softmax(student, -1).gather(-1, x[:, None]).squeeze(-1)
    policy_gradient(own, b.float(), g.float(), ratio, EPS).loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[2].abs().max() == 0


def test_signal_positions_masked_out_contribute_nothing():
    """Through the signal as stage two uses it: a position whose loss_mask is 0 never reaches the
    loss (DistillStep drops it, tested end to end in tests/stages/test_student_onpolicy.py); here what the
    signal hands on is one value per position with a next token, the last one dropped, and the
    divergence of a position depends on that position alone."""
    signal = StoredPolicyGradient("topk", {"temperature": 1.0, "temperature_grid": [1.0]},
                                  {"behaviour_logprob": {}, "target_logprob": {}, "input_ids": {}})
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (2, 5), generator=gen)
    batch = {"behaviour_logprob": -torch.rand(2, 5, generator=gen), "target_logprob": -torch.rand(2, 5, generator=gen)}
    behaviour, teacher = signal.positions(ids, batch)
    assert behaviour.shape == (8,) and torch.equal(behaviour, batch["behaviour_logprob"][:, :-1].reshape(-1))
    student = torch.randn(8, 6, dtype=torch.float64, generator=gen).requires_grad_()
    logprobs = torch.log_softmax(student, -1)
    targets = ids[:, 1:].reshape(-1)
    loss = signal.divergence(logprobs, targets, behaviour, teacher)
    loss[[0, 3, 5]].sum().backward()
    assert student.grad[[1, 2, 4, 6, 7]].abs().max() == 0 and student.grad[[0, 3, 5]].abs().max() > 0


def per_draw_gradients(theta, x, behaviour, teacher_logprob, ratio="clip", eps=EPS):
    """``[N, V]`` the PG loss's gradient with respect to θ, one row per draw (one copy of θ each)."""
    per_draw = theta.expand(len(x), len(theta)).clone().requires_grad_()
    own = torch.log_softmax(per_draw, -1).gather(-1, x[:, None]).squeeze(-1)
    terms = policy_gradient(own, own.detach() if behaviour is None else behaviour, teacher_logprob, ratio, eps)
    terms.loss.sum().backward()
    return per_draw.grad, terms


def test_expectation_equals_the_reverse_kl_gradient():
    """On policy (b = log π_θ(x), r = 1), the mean over draws x ~ π_θ of the PG loss's gradient is
    ∇_θ KL(π_θ ‖ p). Each of the V components is compared by a z-score against its standard error
    estimated from the same draws. At N = 200,000 draws of a bounded per-draw gradient the mean is
    normal to well within the bound, so |z| > 4.5 for one of 6 components has probability about
    6 · 7e-6 = 4e-5 under a correct estimator (the seed is fixed, so the test is deterministic; the
    bound says how surprising a failure would be). The statistic has power: the forward-KL
    gradient π − p lands over a hundred errors away (132 with this seed).

    Off policy (draws from another π_b, b = log π_b(x)), the ratio r = π_θ/π_b with no band (ε
    large) is the exact importance-weighted estimator, within the same bound; the same draws with
    the ratio left out (b = l) are rejected by it."""
    v, n = 6, 200_000
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(v, generator=gen, dtype=torch.float64)
    log_p = torch.log_softmax(torch.randn(v, generator=gen, dtype=torch.float64) * 1.5, -1)
    pi = torch.softmax(theta, -1)
    t = theta.clone().requires_grad_()
    q = torch.softmax(t, -1)
    (reference,) = torch.autograd.grad((q * (q.log() - log_p)).sum(), t)

    def z_scores(grads, want):
        return (grads.mean(0) - want) / (grads.std(0) / math.sqrt(len(grads)))

    x = torch.multinomial(pi, n, replacement=True, generator=gen)
    grads, terms = per_draw_gradients(theta, x, None, log_p[x])
    assert terms.outside.sum() == 0 and torch.allclose(terms.ratio, torch.ones(n, dtype=torch.float64))
    assert z_scores(grads, reference).abs().max() < 4.5, (grads.mean(0), reference)
    assert z_scores(grads, pi - log_p.exp()).abs().max() > 50

    sampler = torch.log_softmax(theta + 0.5 * torch.randn(v, generator=gen, dtype=torch.float64), -1)
    x = torch.multinomial(sampler.exp(), n, replacement=True, generator=gen)
    grads, terms = per_draw_gradients(theta, x, sampler[x], log_p[x], "clip", 1e6)
    assert terms.outside.sum() == 0 and terms.ratio.std() > 0.1  # really off policy, nothing clipped
    assert z_scores(grads, reference).abs().max() < 4.5, (grads.mean(0), reference)
    ignoring_the_ratio, _ = per_draw_gradients(theta, x, None, log_p[x])
    assert z_scores(ignoring_the_ratio, reference).abs().max() > 20


def test_reverse_kl_objective_is_dense_reverse_kl_when_k_is_the_vocabulary():
    """--objective reverse-kl reads a top-k store as StoredTopK(tail='tail', direction='reverse'):
    with k = V it is KL(q ‖ p) over the full vocabulary, in float64 on the same logits, at T = 1 and
    at another grid temperature (re-tempered from the cache)."""
    from stages.student import TrainConfig, _stored_signal

    v, positions = 9, 12
    gen = torch.Generator().manual_seed(3)
    teacher_logits = torch.randn(positions, v, generator=gen, dtype=torch.float64) * 3
    student_logits = torch.randn(positions, v, generator=gen, dtype=torch.float64) * 2
    grid = (1.0, 2.0)
    out = sparse_teacher(teacher_logits.float(), v, 1.0, grid, kernel="torch")
    ids, logprobs, lse, tail = (out[k] for k in ("topk_ids", "topk_logprobs", "logsumexp", "tail_logmass"))

    class FakeStore:  # what _stored_signal reads of a store
        kind, root = "topk", "fake"
        params = {"temperature": 1.0, "temperature_grid": list(grid), "k": v}
        index = {"arrays": {}}

    for t in grid:
        config = TrainConfig(train_store="s", out="o", objective="reverse-kl", temperature=t)
        signal = _stored_signal(config, FakeStore())
        assert isinstance(signal, StoredTopK) and signal.direction == "reverse" and signal.tail == "tail"
        batch = {"topk_ids": ids.long()[None], "topk_logprobs": logprobs.half()[None].float(),
                 "logsumexp": lse[None], "tail_logmass": tail[None]}
        parts = signal.positions(torch.zeros(1, positions + 1, dtype=torch.long), {
            k: torch.cat([val, val[:, -1:]], 1) for k, val in batch.items()})
        student = student_logits.clone().requires_grad_()
        got = signal.divergence(torch.log_softmax(student.float() / t, -1), None, *parts)
        q, p = torch.softmax(student / t, -1), torch.softmax(teacher_logits / t, -1)
        want = (q * (q.log() - p.log())).sum(-1)
        torch.testing.assert_close(got.double(), want.detach(), atol=2e-3, rtol=0)  # float16 stored log-probs
        got.sum().backward()
        expected_grad, = torch.autograd.grad(want.sum(), student)
        torch.testing.assert_close(student.grad, expected_grad, atol=2e-3, rtol=0)


def test_a_store_without_what_the_policy_gradient_needs_is_one_line():
    params = {"temperature": 1.0, "temperature_grid": [1.0, 2.0]}
    with pytest.raises(DistillError, match="no behaviour_logprob.*--format ids"):
        StoredPolicyGradient("topk", params, {"target_logprob": {}}, store="s")
    with pytest.raises(DistillError, match="cannot re-temper them to T = 1"):
        StoredPolicyGradient("target", {"temperature": 2.0, "temperature_grid": [2.0]},
                             {"behaviour_logprob": {}, "target_logprob": {}})
    signal = StoredPolicyGradient("topk", {"temperature": 2.0, "temperature_grid": [1.0, 2.0]},
                                  {"behaviour_logprob": {}, "target_logprob": {}, "logsumexp": {}})
    assert signal.fields == ("behaviour_logprob", "target_logprob", "logsumexp")


def test_a_cache_at_another_temperature_is_re_tempered_to_one():
    """target_logprob stored at T₀ = 2 with the grid's log-sum-exps gives the teacher's T = 1 log-prob."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 4, 7, generator=gen, dtype=torch.float64) * 3
    ids = torch.randint(0, 7, (1, 4), generator=gen)
    lse = torch.stack([torch.logsumexp(logits / t, -1) for t in (1.0, 2.0)], -1)
    at_two = (logits / 2).gather(-1, ids[..., None]).squeeze(-1) - lse[..., 1]
    signal = StoredPolicyGradient("topk", {"temperature": 2.0, "temperature_grid": [1.0, 2.0]},
                                  {"behaviour_logprob": {}, "target_logprob": {}, "logsumexp": {}})
    _, teacher = signal.positions(ids, {"behaviour_logprob": torch.zeros(1, 4), "target_logprob": at_two.float(),
                                        "logsumexp": lse.float()})
    want = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)[:, :-1].reshape(-1)
    torch.testing.assert_close(teacher.double(), want, atol=1e-5, rtol=0)


def enumerated_expectation(theta, log_p, sampling, eps):
    """The policy gradient's expectation over the sampler's draws, enumerated over the vocabulary: the
    student (logits θ ``[V]``) writes with generate's ``sampling`` — a round's first step — so
    π_b = behaviour_distribution(θ, sampling) and b = log π_b(x), what a record stores (greedy: 0).
    Returns (Σ_x π_b(x) ∇_θ(−r·A)(x) ``[V]``, the probability mass of draws the clip took)."""
    probs = behaviour_distribution(theta[None], sampling)[0]
    x = probs.nonzero()[:, 0]
    per_draw = theta.expand(len(x), len(theta)).clone().requires_grad_()
    own = torch.log_softmax(per_draw, -1).gather(-1, x[:, None]).squeeze(-1)
    terms = policy_gradient(own, probs[x].log(), log_p[x], "clip", eps)
    (probs[x] * terms.loss).sum().backward()
    return per_draw.grad.sum(0), float((probs[x] * terms.outside).sum())


def test_the_ratio_corrects_a_full_support_sampler_at_any_temperature_and_no_truncated_one():
    """Exact expectations, no draws (V = 8, float64): with full support (top-k 0 or V, top-p 1) at
    T = 0.5, 1 and 2 the expected policy gradient is ∇_θ KL(π_θ ‖ p) to 1e-6 (no band: at T ≠ 1 the
    first step's ratios π_θ/π_T are far from 1). Truncated, the tail's terms are simply missing:
    top-p 0.9 and top-k 4 are off by 21% and 22% of the gradient's norm while the default band clips
    nothing (at T = 1 every ratio is the kept mass, ≈ 0.9: inside it), so the logged clipped share
    cannot reveal the bias. Greedy (b = 0, r = π_θ(x*)) gives no estimate of the gradient at all."""
    v = 8
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(v, generator=gen, dtype=torch.float64) * 1.5
    log_p = torch.log_softmax(torch.randn(v, generator=gen, dtype=torch.float64) * 1.5, -1)
    t = theta.clone().requires_grad_()
    q = torch.softmax(t, -1)
    (reference,) = torch.autograd.grad((q * (q.log() - log_p)).sum(), t)

    def relative_error(sampling, eps):
        grad, clipped = enumerated_expectation(theta, log_p, sampling, eps)
        return float((grad - reference).abs().max()), float((grad - reference).norm() / reference.norm()), clipped

    for sampling in (Sampling(0.5, 0, 1.0), Sampling(1.0, 0, 1.0), Sampling(2.0, 0, 1.0), Sampling(1.0, v, 1.0),
                     Sampling(1.3, v, 1.0)):
        largest, _, clipped = relative_error(sampling, 1e6)
        assert largest < 1e-6 and clipped == 0, sampling
    assert relative_error(Sampling(1.0, 0, 1.0), EPS)[0] < 1e-6  # on policy at T = 1: r = 1, nothing clipped
    for sampling, low, high in ((Sampling(1.0, 0, 0.9), 0.2, 0.22), (Sampling(1.0, 4, 1.0), 0.21, 0.23)):
        _, error, clipped = relative_error(sampling, EPS)
        assert clipped == 0 and low < error < high, (sampling, error, clipped)
    _, error, clipped = relative_error(Sampling(0.0, 0, 1.0), EPS)
    assert clipped == 1.0 and error == pytest.approx(1.0)  # every draw clipped: no gradient
    _, error, _ = relative_error(Sampling(0.0, 0, 1.0), 1e6)
    assert error > 0.5


FULL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False, "rules_sha256": None}


@pytest.mark.parametrize("sampler,reason", [
    (FULL, None), ({**FULL, "temperature": 0.7}, None), ({**FULL, "temperature": 2.0}, None),
    ({**FULL, "top_k": 8192}, None), ({**FULL, "top_k": 9000}, None),
    ({**FULL, "top_p": 0.9}, "top-p 0.9"), ({**FULL, "top_k": 50}, "top-k 50 of 8192"),
    ({**FULL, "temperature": 0.0, "greedy": True}, "greedy"), ({**FULL, "temperature": 0.0}, "greedy"),
    ({**FULL, "rules_sha256": "ab" * 32}, "rule-constrained"), (None, "unknown"),
    ({"temperature": 1.0}, "unknown"), ("T=1", "unknown"),
])
def test_which_samplers_the_ratio_corrects(sampler, reason):
    """Full support at any temperature > 0 is exact (the stored log-probs are the tempered
    distribution's); truncation, greedy, rules and a sampler nobody recorded are named."""
    got = sampler_bias(sampler, 8192)
    assert got is None if reason is None else reason in got, got


def test_reverse_kl_from_top_k_and_tail_barely_sees_mass_on_one_tail_token():
    """The reverse-kl objective compares the student's tail mass with the teacher's as one bucket: a
    student that matches the teacher's top-k and puts the whole tail mass (0.05) on one tail id, which
    the teacher gives 0.05/992, scores 0 there, while KL(q ‖ p) is 0.05·log 992 = 0.345 nats, and the
    policy gradient's per-token estimate E_{x∼q}[log q(x) − log p(x)] is that KL exactly."""
    v, k = 1000, 8
    head = torch.softmax(torch.linspace(2.0, 0.0, k, dtype=torch.float64), -1) * 0.95
    p = torch.cat([head, torch.full((v - k,), 0.05 / (v - k), dtype=torch.float64)])
    q = torch.cat([head, torch.zeros(v - k, dtype=torch.float64)])
    q[k + 17] = 0.05
    log_q = q.log()[None].float()
    ids = torch.arange(k)[None]
    bucket = sparse_kd(log_q, ids, p[:k].log()[None].float(), torch.tensor([0.05]).log(), ids[:, 0], "tail",
                       "reverse")
    support = q > 0
    exact = float((q[support] * (q[support].log() - p[support].log())).sum())
    assert exact == pytest.approx(0.05 * math.log(v - k), rel=1e-9)
    assert abs(float(bucket)) < 1e-6

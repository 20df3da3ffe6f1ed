"""Every sparse or chunked loss against a dense float64 reference on tiny tensors: values and gradients."""

import pytest
import torch

from pipeline.train.losses import chunked_sum, dense_kd, next_token_ce, sparse_kd

P, V, K = 7, 23, 5


def kl(p, q):
    """Σ p (log p − log q) for dense float64 distributions, 0·log 0 = 0."""
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return torch.where(p > 0, p * (safe.log() - q.clamp_min(1e-300).log()), torch.zeros_like(p)).sum(-1)


def dense_reference(student_logits, teacher_logits, ids, targets, t, tail, direction):
    q = torch.softmax(student_logits / t, -1)
    p = torch.softmax(teacher_logits / t, -1)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    if tail == "tail":  # k kept buckets + one bucket for everything else
        pb = torch.cat([p.gather(-1, ids), (p * ~kept).sum(-1, keepdim=True)], -1)
        qb = torch.cat([q.gather(-1, ids), (q * ~kept).sum(-1, keepdim=True)], -1)
        return kl(pb, qb) if direction == "forward" else kl(qb, pb)
    if tail == "renorm":
        pt = p * kept / (p * kept).sum(-1, keepdim=True)
        if direction == "forward":
            return kl(pt, q)
        qt = q * kept / (q * kept).sum(-1, keepdim=True)
        return kl(qt, pt)
    residual = (p * ~kept).sum(-1, keepdim=True)
    label = torch.zeros_like(kept).scatter(-1, targets[:, None], True)
    pt = p * kept + residual * label
    if direction == "forward":
        return kl(pt, q)
    support = kept | label
    qt = q * support / (q * support).sum(-1, keepdim=True)
    return kl(qt, pt)


def sparse_inputs(teacher_logits, t, k):
    ids = torch.topk(teacher_logits, k, -1).indices
    lp = torch.log_softmax(teacher_logits / t, -1)
    rest = teacher_logits.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest / t, -1) - torch.logsumexp(teacher_logits / t, -1) if k < teacher_logits.shape[-1] \
        else torch.full(teacher_logits.shape[:1], float("-inf"), dtype=teacher_logits.dtype)
    return ids, lp.gather(-1, ids), tail


@pytest.mark.parametrize("tail", ["renorm", "tail", "residual-label"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_sparse_kd_equals_dense_reference(tail, direction, t):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(P, V, generator=g, dtype=torch.float64) * 3
    student = (torch.randn(P, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ids, lp, tail_logmass = sparse_inputs(teacher, t, K)
    targets = torch.randint(0, V, (P,), generator=g)
    targets[:3] = ids[:3, 1]  # some labels inside the kept set, the rest (most likely) outside
    got = sparse_kd(torch.log_softmax(student.float() / t, -1), ids, lp, tail_logmass, targets, tail, direction)
    (grad_got,) = torch.autograd.grad(got.sum(), student)
    want = dense_reference(student, teacher, ids, targets, t, tail, direction)
    (grad_want,) = torch.autograd.grad(want.sum(), student)
    assert got.shape == (P,)
    assert torch.all(want >= -1e-12)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_tail_with_k_equal_vocab_is_the_full_kl(direction):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(P, V, generator=g) * 3
    student = (torch.randn(P, V, generator=g) * 2).requires_grad_()
    ids, lp, tail_logmass = sparse_inputs(teacher, 2.0, V)
    got = sparse_kd(torch.log_softmax(student / 2, -1), ids, lp, tail_logmass, torch.zeros(P, dtype=torch.long),
                    "tail", direction)
    want = dense_kd(torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1), direction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(dense_kd(torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1),
                                         direction).sum(), student)
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_identical_distributions_have_zero_divergence():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(P, V, generator=g)
    ids, lp, tail_logmass = sparse_inputs(logits, 1.0, K)
    for direction in ("forward", "reverse"):
        out = sparse_kd(torch.log_softmax(logits, -1), ids, lp, tail_logmass, torch.zeros(P, dtype=torch.long),
                        "tail", direction)
        torch.testing.assert_close(out, torch.zeros(P), atol=1e-6, rtol=0)


def test_next_token_ce_matches_manual():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, V, generator=g)
    ids = torch.randint(0, V, (2, 5), generator=g)
    manual = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(next_token_ce(logits, ids), manual)


def test_chunked_sum_equals_one_pass():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, 8, generator=g, requires_grad=True)
    head = torch.randn(V, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (37,), generator=g)

    def fn(h, y):
        logits = h @ head.T
        return (torch.nn.functional.cross_entropy(logits, y, reduction="sum"),
                torch.logsumexp(logits, -1).sum())

    whole = fn(hidden, targets)
    grads_whole = torch.autograd.grad(whole[0] + whole[1], (hidden, head))
    chunked = chunked_sum(fn, 37, 10, hidden, targets)
    grads_chunked = torch.autograd.grad(chunked[0] + chunked[1], (hidden, head))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads_whole, grads_chunked):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_student_tail_is_exact_when_the_kept_mass_is_nearly_one(direction):
    """Rows whose kept mass is within 1e-3 of 1 take the exact path; values and gradients still
    match the dense float64 reference down to tails of 1e-9."""
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(P, V, generator=g, dtype=torch.float64) * 3
    student = torch.randn(P, V, generator=g, dtype=torch.float64)
    ids, lp, tail_logmass = sparse_inputs(teacher, 1.0, K)
    boost = torch.zeros_like(student).scatter(-1, ids, torch.linspace(4, 24, P, dtype=torch.float64)[:, None].expand(P, K))
    student = (student + boost).requires_grad_()  # kept mass from ~0.99 to 1 − 1e-9 across rows
    targets = torch.zeros(P, dtype=torch.long)
    got = sparse_kd(torch.log_softmax(student, -1), ids, lp, tail_logmass, targets, "tail", direction)
    want = dense_reference(student, teacher, ids, targets, 1.0, "tail", direction)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("tail", ["renorm", "tail", "residual-label"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_confident_teacher_at_small_temperature_matches_float64(tail, direction):
    """T = 0.1 with a teacher whose non-kept logits lie far below the top: log tails near −110 (what
    stage one now stores exactly, no longer −inf) give the dense reference's value and gradient."""
    g = torch.Generator().manual_seed(6)
    t = 0.1
    teacher = torch.randn(P, V, generator=g, dtype=torch.float64) * 3
    teacher[:, :K] += 14.0  # the kept ids ~11 logits (110 nats at T = 0.1) above the rest
    student = (torch.randn(P, V, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    ids, lp, tail_logmass = sparse_inputs(teacher, t, K)
    assert (tail_logmass < -87).any() and torch.isfinite(tail_logmass).all()
    targets = torch.randint(K, V, (P,), generator=g)  # labels outside the kept ids
    got = sparse_kd(torch.log_softmax(student.float() / t, -1), ids, lp.float(), tail_logmass.float(), targets,
                    tail, direction)
    want = dense_reference(student, teacher, ids, targets, t, tail, direction)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(want.sum(), student)
    # float32 student log-probs at 1/T = 10 carry ~1e-5 absolute error, so gradients of size ~10
    # agree to 1e-5 of their largest entry
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-5 * g2.abs().max().item())


@pytest.mark.parametrize("tail", ["renorm", "tail", "residual-label"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_a_true_zero_teacher_bucket_keeps_every_mode_finite(tail, direction):
    """A stored −inf tail (every non-kept logit −inf) with a student that puts mass there: forward
    ignores the zero bucket (0·log 0); reverse renormalises the student over the teacher's support,
    KL(q̃ ‖ p) — finite, and equal to the dense reference restricted to that support."""
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(P, V, generator=g, dtype=torch.float64) * 2
    teacher[:, K:] = float("-inf")  # the teacher's support is its top K
    student = (torch.randn(P, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ids, lp, tail_logmass = sparse_inputs(teacher, 1.0, K)
    assert torch.isneginf(tail_logmass).all()
    targets = torch.randint(K, V, (P,), generator=g)  # labels where the teacher has no mass
    got = sparse_kd(torch.log_softmax(student.float(), -1), ids, lp.float(), tail_logmass.float(), targets,
                    tail, direction)
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    q = torch.softmax(student, -1)
    p = torch.softmax(teacher, -1)
    if direction == "forward":  # KL(p ‖ q) over the kept ids: the zero bucket contributes nothing
        want = kl(p, q)
    else:  # KL(q̃ ‖ p) with q̃ the student renormalised over the top K
        q_support = q[:, :K] / q[:, :K].sum(-1, keepdim=True)
        want = kl(q_support, p[:, :K])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 0.1])
def test_sampled_kd_equals_dense_reference(t):
    """``sampled_kd`` against float64: with every id and its exact probability it is the full KL;
    with a sparse weight vector (padding included, Σw ≠ 1) its value is Σ w·log(w/q) and its logit
    gradient (Σw)·q − w (before the 1/T)."""
    from pipeline.train.losses import sampled_kd

    g = torch.Generator().manual_seed(8)
    teacher = torch.randn(P, V, generator=g, dtype=torch.float64) * 3
    student = (torch.randn(P, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    q = torch.log_softmax(student.float() / t, -1)
    p = torch.softmax(teacher / t, -1)
    every = torch.arange(V).expand(P, V)
    torch.testing.assert_close(sampled_kd(q, every, p).double(), kl(p, torch.softmax(student / t, -1)),
                               rtol=1e-5, atol=1e-5)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(P)])
    ids[:, -1] = 0  # a padding slot (weight 0) on id 0
    w = torch.rand(P, K, generator=g, dtype=torch.float64)
    w[:, -1] = 0
    got = sampled_kd(torch.log_softmax(student.float() / t, -1), ids, w)
    logits = (student / t).detach().requires_grad_()
    q64 = torch.log_softmax(logits, -1).gather(-1, ids)
    want = torch.where(w > 0, w * (w.clamp_min(1e-300).log() - q64), torch.zeros_like(w)).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), student)
    expected = (w.sum(-1, keepdim=True) * torch.softmax(student / t, -1)
                - torch.zeros(P, V, dtype=torch.float64).scatter_add(-1, ids, w)) / t
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)

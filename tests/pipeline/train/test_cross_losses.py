"""Cross-tokenizer losses against dense float64 brute force on tiny cases (full teacher
distribution, explicit vocabulary map and alignment): values and gradients; identical tokenizers
give today's losses; permuting the student's ids changes nothing; every outcome of the store's
draws enumerated, the drawn-target loss's expected gradient is the divergence's."""

import itertools
import math

import pytest
import torch

from pipeline.train.cross_losses import (bucketed_sampled_kd, bucketed_sparse_kd, chunk_kd, fold_groups, group_tensors,
                                         unmapped_student_ids)
from pipeline.train.losses import sampled_kd, sparse_kd

P, VT, VS = 6, 23, 17


def partial_map(generator, mapped: int = 14) -> torch.Tensor:
    """``[VT]``: ``mapped`` teacher ids paired with distinct student ids, the rest −1."""
    mapping = torch.full((VT,), -1, dtype=torch.long)
    teacher_ids = torch.randperm(VT, generator=generator)[:mapped]
    mapping[teacher_ids] = torch.randperm(VS, generator=generator)[:mapped]
    return mapping


def kl(p, q):
    """Σ p (log p − log q), float64, 0·log 0 = 0."""
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return torch.where(p > 0, p * (safe.log() - q.clamp_min(1e-300).log()), torch.zeros_like(p)).sum(-1)


def bucket(p_teacher, q_student, chosen, mapping):
    """Explicit buckets: each chosen teacher id t (mask ``[P, VT]``, all mapped) against student id
    mapping[t]; one bucket for every other teacher id, one for every other student id."""
    in_image = torch.zeros_like(q_student, dtype=torch.bool)
    rows = []
    for r in range(p_teacher.shape[0]):
        ids = chosen[r].nonzero().squeeze(-1)
        in_image[r, mapping[ids]] = True
        rows.append((p_teacher[r, ids], q_student[r, mapping[ids]]))
    p_rest = (p_teacher * ~chosen).sum(-1)
    q_rest = (q_student * ~in_image).sum(-1)
    return rows, p_rest, q_rest


def dense_bucketed(student_logits, teacher_probs, chosen, mapping, t, direction):
    q = torch.softmax(student_logits / t, -1)
    rows, p_rest, q_rest = bucket(teacher_probs, q, chosen, mapping)
    out = []
    for r, (pk, qk) in enumerate(rows):
        pb, qb = torch.cat([pk, p_rest[r:r + 1]]), torch.cat([qk, q_rest[r:r + 1]])
        if direction == "reverse":
            support = pb > 0  # the student renormalised over the teacher's support (as sparse_kd does)
            qb = qb * support / (qb * support).sum()
            out.append(kl(qb, pb))
        else:
            out.append(kl(pb, qb))
    return torch.stack(out)


CASES = [  # (k, teacher logit scale, T, direction)
    (5, 3.0, 1.0, "forward"), (5, 3.0, 2.0, "reverse"), (1, 3.0, 1.0, "forward"), (1, 3.0, 1.0, "reverse"),
    (VT, 3.0, 1.0, "forward"), (VT, 3.0, 2.0, "reverse"), (5, 60.0, 0.1, "forward"), (5, 60.0, 0.1, "reverse"),
    (VT, 60.0, 0.1, "forward"),
]


@pytest.mark.parametrize("k,scale,t,direction", CASES)
def test_bucketed_sparse_kd_equals_dense_buckets(k, scale, t, direction):
    g = torch.Generator().manual_seed(k + int(scale))
    teacher_logits = torch.randn(P, VT, generator=g, dtype=torch.float64) * scale
    student = (torch.randn(P, VS, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mapping = partial_map(g)
    p = torch.softmax(teacher_logits / t, -1)
    ids = torch.topk(teacher_logits, k, -1).indices
    kept = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    lp = torch.log_softmax(teacher_logits / t, -1)
    tail = torch.logsumexp(lp.masked_fill(kept, float("-inf")), -1)  # exact, as stage one stores it
    got = bucketed_sparse_kd(torch.log_softmax(student.float() / t, -1), mapping[ids], lp.gather(-1, ids).float(),
                             tail.float(), direction)
    want = dense_bucketed(student, p, kept & (mapping >= 0), mapping, t, direction)
    assert got.shape == (P,) and torch.all(want >= -1e-12)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), student)
    (grad_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k,direction", [(5, "forward"), (5, "reverse"), (1, "forward"), (VS, "forward"),
                                         (VS, "reverse")])
def test_identity_map_is_todays_tail_loss(k, direction):
    g = torch.Generator().manual_seed(3)
    teacher_logits = torch.randn(P, VS, generator=g) * 4
    student = (torch.randn(P, VS, generator=g) * 2).requires_grad_()
    ids = torch.topk(teacher_logits, k, -1).indices
    lp = torch.log_softmax(teacher_logits, -1)
    tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    got = bucketed_sparse_kd(torch.log_softmax(student, -1), ids, lp.gather(-1, ids), tail, direction)
    want = sparse_kd(torch.log_softmax(student, -1), ids, lp.gather(-1, ids), tail, torch.zeros(P, dtype=torch.long), "tail", direction)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-6)


def grouped_case(seed):
    """A partial map (14 of 23 teacher ids on distinct student ids of 17) and student groups: of the 3
    student ids outside the image, two join image ids (one head each, or both one head) and one stays
    in the bucket."""
    g = torch.Generator().manual_seed(seed)
    mapping = partial_map(g)
    image = mapping[mapping >= 0]
    outside = [i for i in range(VS) if i not in set(image.tolist())]
    heads = torch.full((VS,), -1, dtype=torch.long)
    heads[outside[0]] = image[0]
    heads[outside[1]] = image[seed % 2]
    return g, mapping, heads


def fold_dense(q, heads):
    """float64 probabilities ``[P, V_s]`` with each member's mass moved onto its head."""
    out = q.clone()
    for member in (heads >= 0).nonzero().squeeze(-1).tolist():
        out[:, heads[member]] = out[:, heads[member]] + q[:, member]
        out[:, member] = 0
    return out


@pytest.mark.parametrize("k,scale,t,direction", [(5, 3.0, 1.0, "forward"), (5, 3.0, 2.0, "reverse"),
                                                 (VT, 3.0, 1.0, "forward"), (VT, 3.0, 1.0, "reverse"),
                                                 (1, 3.0, 1.0, "forward"), (1, 3.0, 1.0, "reverse"),
                                                 (5, 60.0, 0.1, "forward"), (5, 60.0, 0.1, "reverse")])
def test_folded_student_groups_are_the_divergence_over_the_groups_top_k(k, scale, t, direction):
    """--cross-longer group, top-k + tail: the student's ids outside the image added to their heads
    (fold_groups) and compared by bucketed_sparse_kd equal the dense divergence over the groups — each
    head with its members, the non-members outside the image in the bucket — in value and gradient;
    k = 1 and k = V, and a near-certain teacher at T = 0.1, both directions."""
    g, mapping, heads = grouped_case(k + (direction == "reverse"))  # odd: two heads; even: one
    teacher_logits = torch.randn(P, VT, generator=g, dtype=torch.float64) * scale  # 60 at T = 0.1: near certain
    student = (torch.randn(P, VS, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ids = torch.topk(teacher_logits, k, -1).indices
    kept = torch.zeros(P, VT, dtype=torch.bool).scatter(-1, ids, True)
    lp = torch.log_softmax(teacher_logits / t, -1)
    tail = torch.logsumexp(lp.masked_fill(kept, float("-inf")), -1)
    folded = fold_groups(torch.log_softmax(student.float() / t, -1), *group_tensors(heads))
    got = bucketed_sparse_kd(folded, mapping[ids], lp.gather(-1, ids).float(), tail.float(), direction)
    q = fold_dense(torch.softmax(student / t, -1), heads)
    chosen = kept & (mapping >= 0)
    want = []
    for r in range(P):  # in log space: a near-certain teacher's bucket (e^-1000) is no zero under reverse KL
        ids_r = chosen[r].nonzero().squeeze(-1)
        log_p = torch.cat([lp[r, ids_r], torch.logsumexp(lp[r, ~chosen[r]], -1)[None]])
        in_image = torch.zeros(VS, dtype=torch.bool)
        in_image[mapping[ids_r]] = True
        log_q = torch.cat([q[r, mapping[ids_r]], q[r, ~in_image].sum()[None]]).log()
        if direction == "reverse":
            support = torch.isfinite(log_p)  # the student renormalised over the teacher's support
            log_q = torch.where(support, log_q - torch.logsumexp(log_q[support], -1), float("-inf"))
            want.append(torch.where(support, log_q.exp() * (log_q - log_p), 0.0).sum())
        else:
            want.append(torch.where(torch.isfinite(log_p), log_p.exp() * (log_p - log_q), 0.0).sum())
    want = torch.stack(want)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), student)
    (grad_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_folded_student_groups_are_the_divergence_over_the_groups_drawn(seed):
    """--cross-longer group, drawn targets: with the teacher's exact probabilities as the weights (the
    draws' expectation: the loss is linear in them) and the bucket the non-members outside the image,
    bucketed_sampled_kd on the folded log-probs is KL(p̄ ‖ q̄) over (heads with their members, the rest
    of the image, U) — value and gradient; members in the bucket instead would count twice."""
    g, mapping, heads = grouped_case(seed)
    p = torch.softmax(torch.randn(P, VT, generator=g, dtype=torch.float64) * 2, -1)
    student = (torch.randn(P, VS, generator=g, dtype=torch.float64) * 2).requires_grad_()
    members, distinct, slot = group_tensors(heads)
    bucket_ids = unmapped_student_ids(mapping, VS)
    bucket_ids = bucket_ids[~torch.isin(bucket_ids, members)]
    assert bucket_ids.numel() == 1
    teacher_ids = torch.arange(VT).expand(P, -1)
    folded = fold_groups(torch.log_softmax(student.float(), -1), members, distinct, slot)
    got = bucketed_sampled_kd(folded, mapping[teacher_ids], p.float(), bucket_ids)
    q = fold_dense(torch.softmax(student, -1), heads)
    image = mapping >= 0
    want = kl(torch.cat([p[:, image], p[:, ~image].sum(-1, keepdim=True)], -1),
              torch.cat([q[:, mapping[image]], q[:, bucket_ids].sum(-1, keepdim=True)], -1))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), student)
    (grad_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=1e-4, atol=1e-6)


def test_folding_nothing_changes_nothing_and_underflow_stays_finite():
    """No members: the log-probs themselves. A group whose members' probabilities underflow next to
    the row's largest adds nothing, with finite values and gradients."""
    logq = torch.log_softmax(torch.randn(3, VS), -1)
    members, distinct, slot = group_tensors(torch.full((VS,), -1, dtype=torch.long))
    assert fold_groups(logq, members, distinct, slot) is logq
    logits = torch.zeros(1, 4)
    logits[0, 2:] = -500.0  # ids 2, 3 underflow in float32 next to ids 0, 1
    logits.requires_grad_()
    heads = torch.tensor([-1, -1, 1, 0])
    folded = fold_groups(torch.log_softmax(logits, -1), *group_tensors(heads))
    assert torch.isfinite(folded).all()
    torch.testing.assert_close(folded[0, :2].exp(), torch.tensor([0.5, 0.5]))
    (grad,) = torch.autograd.grad(folded[0, :2].sum(), logits)
    assert torch.isfinite(grad).all()


def drawn(generator, probs, draws):
    """Distinct ids drawn from ``probs`` with counts/draws as weights, padded (id 0, weight 0)."""
    counts = torch.stack([torch.bincount(torch.multinomial(row.float(), draws, True, generator=generator),
                                         minlength=probs.shape[-1]) for row in probs])
    width = int((counts > 0).sum(-1).max())
    ids = torch.zeros(probs.shape[0], width, dtype=torch.long)
    weights = torch.zeros(probs.shape[0], width, dtype=torch.float64)
    for r in range(probs.shape[0]):
        nz = counts[r].nonzero().squeeze(-1)
        ids[r, :len(nz)] = nz
        weights[r, :len(nz)] = counts[r, nz].double() / draws
    return ids, weights, counts.double() / draws


def dense_sampled(student_logits, dense_w, mapping, t):
    """Σ over mapped drawn ids w·log(w/q) plus the unmapped drawn weight against the student's mass
    on the ids outside the map's image, row by row, float64."""
    q = torch.softmax(student_logits / t, -1)
    outside = torch.ones(q.shape[-1], dtype=torch.bool)
    outside[mapping[mapping >= 0]] = False
    out = []
    for r in range(q.shape[0]):
        chosen = ((dense_w[r] > 0) & (mapping >= 0)).nonzero().squeeze(-1)
        pb = torch.cat([dense_w[r, chosen], (dense_w[r].sum() - dense_w[r, chosen].sum())[None]])
        qb = torch.cat([q[r, mapping[chosen]], q[r, outside].sum()[None]])
        out.append(kl(pb, qb))
    return torch.stack(out)


@pytest.mark.parametrize("scale,t,draws", [(3.0, 1.0, 32), (60.0, 0.1, 8), (1.0, 2.0, 200)])
def test_bucketed_sampled_kd_equals_dense_buckets(scale, t, draws):
    g = torch.Generator().manual_seed(int(scale) + draws)
    teacher_logits = torch.randn(P, VT, generator=g, dtype=torch.float64) * scale
    student = (torch.randn(P, VS, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mapping = partial_map(g, mapped=10)
    ids, weights, dense_w = drawn(g, torch.softmax(teacher_logits / t, -1), draws)
    got = bucketed_sampled_kd(torch.log_softmax(student.float() / t, -1), torch.where(weights > 0, mapping[ids], -1),
                              weights.float(), unmapped_student_ids(mapping, VS))
    # dense: the drawn, mapped ids each; the other drawn weight against the student's mass outside the map's image
    want = dense_sampled(student, dense_w, mapping, t)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), student)
    (grad_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=1e-4, atol=1e-6)


def test_identity_map_is_todays_sampled_loss():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(P, VS, generator=g, requires_grad=True)
    ids, weights, _ = drawn(g, torch.softmax(torch.randn(P, VS, generator=g) * 3, -1), 16)
    identity = unmapped_student_ids(torch.arange(VS), VS)
    assert identity.numel() == 0
    got = bucketed_sampled_kd(torch.log_softmax(student, -1), ids, weights.float(), identity)
    want = sampled_kd(torch.log_softmax(student, -1), ids, weights.float())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-6)


def test_permuting_the_students_ids_changes_nothing():
    g = torch.Generator().manual_seed(7)
    teacher_logits = torch.randn(P, VT, generator=g) * 3
    student = torch.randn(P, VS, generator=g)
    mapping = partial_map(g)
    perm = torch.randperm(VS, generator=g)  # student id i is called perm[i]
    permuted_student = torch.empty_like(student)
    permuted_student[:, perm] = student
    ids = torch.topk(teacher_logits, 6, -1).indices
    lp = torch.log_softmax(teacher_logits, -1)
    tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    sid = mapping[ids]
    renamed = torch.where(sid >= 0, perm[sid.clamp_min(0)], -1)
    a = bucketed_sparse_kd(torch.log_softmax(student, -1), sid, lp.gather(-1, ids), tail)
    b = bucketed_sparse_kd(torch.log_softmax(permuted_student, -1), renamed, lp.gather(-1, ids), tail)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    w = torch.softmax(lp.gather(-1, ids), -1)
    renamed_map = torch.where(mapping >= 0, perm[mapping.clamp_min(0)], -1)
    torch.testing.assert_close(bucketed_sampled_kd(torch.log_softmax(student, -1), sid, w,
                                                   unmapped_student_ids(mapping, VS)),
                               bucketed_sampled_kd(torch.log_softmax(permuted_student, -1), renamed, w,
                                                   unmapped_student_ids(renamed_map, VS)),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("scale,t", [(3.0, 1.0), (60.0, 0.1), (1.0, 2.0)])
def test_chunk_kd_equals_dense_chunk_likelihoods(scale, t, direction):
    """Explicit alignment of one row: teacher tokens [a][b][c d][e] vs student tokens [a][b c][d e]
    as chunks (by position) — chunk 0: teacher position 0 / student 0; chunk 1: teacher 1, 2, 3 /
    student 1, 2. The teacher's chunk log-prob is the sum of its full distributions at the target ids;
    the two distributions over {chunk, not chunk} are compared by the dense KL, in either direction."""
    g = torch.Generator().manual_seed(int(scale))
    teacher_logits = torch.randn(4, VT, generator=g, dtype=torch.float64) * scale
    student = (torch.randn(3, VS, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher_targets, student_targets = torch.tensor([3, 5, 7, 11]), torch.tensor([2, 4, 6])
    teacher_chunks, student_chunks = [[0], [1, 2, 3]], [[0], [1, 2]]
    t_lp = torch.log_softmax(teacher_logits / t, -1).gather(-1, teacher_targets[:, None]).squeeze(-1)
    s_lp = torch.log_softmax(student / t, -1).gather(-1, student_targets[:, None]).squeeze(-1)
    a = torch.stack([t_lp[c].sum() for c in teacher_chunks])
    b = torch.stack([s_lp[c].sum() for c in student_chunks])
    got = chunk_kd(a.float(), b.float(), direction=direction)
    if direction == "reverse":  # a teacher certain of a chunk to within 1e-6 is capped there (else infinite)
        a = a.clamp(max=math.log1p(-1e-6))
    # log-probabilities of {chunk, not chunk} (a chunk's can be below float64's smallest probability)
    teacher = torch.stack([a, torch.log1p(-a.exp())], -1)
    student_events = torch.stack([b, torch.log1p(-b.exp())], -1)
    first, second = (teacher, student_events) if direction == "forward" else (student_events, teacher)
    want = (first.exp() * (first - second)).sum(-1)
    assert torch.all(want >= -1e-12)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), student, retain_graph=True)
    (grad_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunk_kd_is_zero_when_equal_and_finite_at_certainty(direction):
    x = torch.tensor([-3.0, -0.5, -1e-9, 0.0, 1e-7], requires_grad=True)
    assert torch.allclose(chunk_kd(x.detach().clamp(max=-1e-5), x.clamp(max=-1e-5), direction=direction),
                          torch.zeros(5), atol=1e-7)
    # a certain teacher; a student at q = 1
    out = chunk_kd(torch.tensor([0.0, 0.0, -1e-12, -50.0, -1e-3]), x, direction=direction)
    assert torch.isfinite(out).all() and torch.all(out >= 0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()


def test_reverse_chunk_kd_gradient_is_zero_at_the_teacher():
    """KL(Bernoulli(q) ‖ Bernoulli(p)) has d/d log q = q·(logit q − logit p): zero at q = p, pushing q
    towards p from either side."""
    a = torch.tensor([-2.0, -0.3, -0.3, -2.0], dtype=torch.float64)
    b = torch.tensor([-2.0, -0.3, -1.0, -0.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(chunk_kd(a, b, direction="reverse").sum(), b)
    q, p = b.detach().exp(), a.exp()
    torch.testing.assert_close(grad, q * (torch.logit(q) - torch.logit(p)), rtol=1e-12, atol=1e-12)
    assert grad[:2].abs().max() < 1e-12 and grad[2] < 0 < grad[3]


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_a_many_to_one_map_adds_up_the_teachers_mass(kind):
    """--unmapped prefix: several teacher ids land on one student id; after merge_duplicates the
    bucketed losses equal dense buckets of the teacher's distribution pushed forward through the map."""
    from pipeline.train.cross_losses import merge_duplicates

    g = torch.Generator().manual_seed(11)
    teacher_logits = torch.randn(P, VT, generator=g, dtype=torch.float64) * 3
    student = (torch.randn(P, VS, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mapping = torch.randint(0, 6, (VT,), generator=g)  # many teacher ids per student id
    mapping[torch.randperm(VT, generator=g)[:5]] = -1
    p = torch.softmax(teacher_logits, -1)
    if kind == "topk":
        ids = torch.topk(teacher_logits, 9, -1).indices
        chosen = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
        lp = torch.log_softmax(teacher_logits, -1)
        tail = torch.logsumexp(lp.masked_fill(chosen, float("-inf")), -1)
        sid, merged = merge_duplicates(mapping[ids], logprobs=lp.gather(-1, ids))
        got = bucketed_sparse_kd(torch.log_softmax(student.float(), -1), sid, merged, tail.float())
        dense_w = p
    else:
        ids, weights, dense_w = drawn(g, p, 40)
        chosen = dense_w > 0
        sid, merged = merge_duplicates(torch.where(weights > 0, mapping[ids], -1), weights=weights)
        got = bucketed_sampled_kd(torch.log_softmax(student.float(), -1), sid, merged, unmapped_student_ids(mapping, VS))
    assert len(set(sid[0][sid[0] >= 0].tolist())) == int((sid[0] >= 0).sum())  # each student id once
    q = torch.softmax(student, -1)
    want = []
    for r in range(P):
        buckets = {}
        for t in (chosen[r] & (mapping >= 0)).nonzero().squeeze(-1).tolist():
            buckets[int(mapping[t])] = buckets.get(int(mapping[t]), 0) + dense_w[r, t]
        s_ids = torch.tensor(sorted(buckets))
        pb = torch.stack([buckets[s] for s in sorted(buckets)] + [1 - sum(buckets.values())])
        if kind == "sampled":
            pb[-1] = dense_w[r].sum() - sum(buckets.values())
        qb = torch.cat([q[r, s_ids], (1 - q[r, s_ids].sum())[None]])
        if kind == "sampled":  # the student's bucket: its ids outside the map's image
            qb[-1] = 1 - q[r, mapping[mapping >= 0].unique()].sum()
        want.append(kl(pb, qb))
    want = torch.stack(want)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), student)
    (grad_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=1e-4, atol=1e-6)


# -- drawn targets: every outcome of the store's draws (pipeline/teacher/sampling.py: N ids with
# replacement from the teacher, kept as counts, weight count/N; the hybrid: the exact top-k plus M
# draws from the renormalised tail, weight tail mass · count/M)

ISSUE_TEACHER = torch.tensor([0.35, 0.15, 0.5], dtype=torch.float64)  # ids 0, 1 mapped; id 2 unmapped
ISSUE_MAP = torch.tensor([0, 1, -1])  # student ids 2 and 3: spelled by no teacher id


def draw_outcomes(p: torch.Tensor, n: int, head: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every outcome at one position of a teacher ``p [V]`` (float64): (probability ``[O]``, weights
    ``[O, V]``). ``head`` = 0: a sampled store of n draws; ``head`` = k: the hybrid, ids 0…k−1 exact
    and n draws from the rest."""
    tail_mass = p[head:].sum()
    tail = p[head:] / tail_mass
    probs, weights = [], []
    for combo in itertools.combinations_with_replacement(range(len(tail)), n):
        counts = torch.bincount(torch.tensor(combo), minlength=len(tail)).double()
        ways = math.factorial(n) / math.prod(math.factorial(int(c)) for c in counts)
        probs.append(ways * torch.prod(tail ** counts))
        weights.append(torch.cat([p[:head], tail_mass * counts / n]))
    probs = torch.stack(probs)
    assert abs(float(probs.sum()) - 1) < 1e-12
    return probs, torch.stack(weights)


def expected_gradient(logits, p, mapping, n, head=0, loss=None):
    """E over the draws of the drawn-target loss's gradient with respect to the student's logits ``[V_s]``."""
    probs, weights = draw_outcomes(p, n, head)
    ids = torch.arange(len(p)).expand(len(probs), -1)  # every teacher id a slot; weight 0 where not drawn
    logits = logits.detach().clone().requires_grad_()
    student = torch.log_softmax(logits, -1).expand(len(probs), -1)
    student_ids = torch.where(weights > 0, mapping[ids], -1)
    per_outcome = (loss or (lambda *a: bucketed_sampled_kd(*a, unmapped_student_ids(mapping, logits.shape[-1]))))(
        student, student_ids, weights)
    (grad,) = torch.autograd.grad((probs * per_outcome).sum(), logits)
    return grad


def pushed_forward(p, mapping, student_vocab):
    """The teacher over the student's events: each student id's mass, then the unmapped bucket U."""
    image = torch.zeros(student_vocab, dtype=torch.float64).index_add(0, mapping[mapping >= 0], p[mapping >= 0])
    return image, p[mapping < 0].sum()


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("head", [0, 1])
def test_drawn_targets_expected_gradient_is_zero_at_the_teacher_and_only_there(n, head):
    """The issue's teacher (.35, .15 mapped; .5 unmapped), a student of 4 ids of which 2 are spelled by no
    teacher id: at q̄ = p̄ — any split of the bucket's .5 — the expected gradient is zero; elsewhere not."""
    for target in ([0.35, 0.15, 0.25, 0.25], [0.35, 0.15, 0.45, 0.05]):
        grad = expected_gradient(torch.tensor(target, dtype=torch.float64).log(), ISSUE_TEACHER, ISSUE_MAP, n, head)
        assert grad.abs().max() < 1e-6, (target, grad)
    for elsewhere in ([0.25] * 4, [0.7, 0.3, 1e-6, 1e-6], [0.42, 0.29, 0.145, 0.145]):
        grad = expected_gradient(torch.tensor(elsewhere, dtype=torch.float64).log(), ISSUE_TEACHER, ISSUE_MAP, n,
                                 head)
        assert grad.abs().max() > 1e-2, (elsewhere, grad)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("head", [0, 2])
def test_drawn_targets_expected_gradient_is_the_divergences(n, head):
    """A random teacher of 5 ids, 2 of them unmapped, and a student of 5 ids, 2 outside the image: at
    random logits the expected gradient is KL(p̄ ‖ q̄)'s over (image ∪ U), to 1e-6."""
    g = torch.Generator().manual_seed(n + 10 * head)
    p = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    mapping = torch.tensor([3, -1, 0, 4, -1])
    logits = torch.randn(5, generator=g, dtype=torch.float64) * 2
    got = expected_gradient(logits, p, mapping, n, head)
    image, unmapped = pushed_forward(p, mapping, 5)
    x = logits.clone().requires_grad_()
    q = torch.softmax(x, -1)
    inside = torch.tensor([True, False, False, True, True])
    divergence = kl(torch.cat([image[inside], unmapped[None]]), torch.cat([q[inside], q[~inside].sum()[None]]))
    (want,) = torch.autograd.grad(divergence, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_drawn_targets_settle_at_the_teacher_whatever_the_draws():
    """Gradient descent on the exact expected loss from a uniform student ends at (.35, .15, .25, .25)
    for N = 1, 2, 4 (the bucket of the old loss, the student's ids outside the mapped *drawn* ids, ends at
    (.70, .30, 0, 0) for N = 1 and (.42, .29, .14, .14) for N = 4)."""
    for n in (1, 2, 4):
        logits = torch.zeros(4, dtype=torch.float64)
        for _ in range(300):
            logits -= 4.0 * expected_gradient(logits, ISSUE_TEACHER, ISSUE_MAP, n)
        torch.testing.assert_close(torch.softmax(logits, -1), torch.tensor([0.35, 0.15, 0.25, 0.25], dtype=torch.float64),
                                   rtol=0, atol=1e-6)


def test_drawn_targets_with_no_student_id_outside_the_image_leave_the_bucket_out():
    """A student whose every id some teacher id spells has no event for the unmapped mass: its term is left
    out, the loss stays finite, and the expected gradient is zero at q ∝ p̄ over the image (.7, .3)."""
    mapping = torch.tensor([0, 1, -1])
    assert unmapped_student_ids(mapping, 2).numel() == 0
    for n in (1, 2, 4):
        grad = expected_gradient(torch.tensor([0.7, 0.3], dtype=torch.float64).log(), ISSUE_TEACHER, mapping, n)
        assert grad.abs().max() < 1e-6
    loss = bucketed_sampled_kd(torch.log_softmax(torch.zeros(1, 2), -1), torch.tensor([[-1]]), torch.tensor([[1.0]]),
                               unmapped_student_ids(mapping, 2))
    assert torch.equal(loss, torch.zeros(1))

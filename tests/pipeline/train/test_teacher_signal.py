"""The teacher signal: grid positions, the stored top-k's per-position tensors, and its divergence
against a dense reference."""

import pytest
import torch

from pipeline.errors import DistillError
from pipeline.teacher.topk import torch_sparse_teacher
from pipeline.train.losses import sparse_kd
from pipeline.train.teacher_signal import GridTemperature, OnlineTeacher, StoredTopK

PARAMS = {"temperature": 1.0, "temperature_grid": [1.0, 2.0]}


def test_grid_temperature_names_its_indices_and_refuses_other_temperatures():
    assert GridTemperature.of_store(PARAMS, 2.0) == GridTemperature(1.0, 0, 2.0, 1)
    with pytest.raises(DistillError, match=r"--agreement-temperature 3 is not in the store's grid \(1, 2\)"):
        GridTemperature.of_store(PARAMS, 3.0, option="--agreement-temperature")


class DenseHead:
    """An OutputHead stand-in whose 'hidden states' are the logits themselves."""

    def __init__(self, logits):
        self._logits = logits

    def hidden(self, input_ids):
        return self._logits

    def logits(self, hidden):
        return hidden


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_stored_topk_with_every_id_kept_equals_the_online_teacher(temperature):
    torch.manual_seed(0)
    b, length, vocab = 2, 5, 11
    logits = 3 * torch.randn(b, length, vocab, dtype=torch.float64)
    summary = torch_sparse_teacher(logits.reshape(-1, vocab).float(), vocab, (1.0, 2.0))
    batch = {"topk_ids": summary["topk_ids"].reshape(b, length, vocab),
             "topk_logprobs": (summary["top_values"] - summary["logsumexp"][:, :1]).reshape(b, length, vocab),
             "logsumexp": summary["logsumexp"].reshape(b, length, 2),
             "tail_logmass": summary["tail_logmass"].reshape(b, length, 2)}
    input_ids = torch.randint(0, vocab, (b, length))
    stored = StoredTopK(PARAMS, temperature)
    online = OnlineTeacher(DenseHead(logits.float()), vocab, temperature)
    stored_parts, online_parts = stored.positions(input_ids, batch), online.positions(input_ids, batch)
    assert [p.shape[0] for p in stored_parts + online_parts] == [b * (length - 1)] * 4  # the last position has no target
    targets = input_ids[:, 1:].reshape(-1)
    student = torch.log_softmax(torch.randn(b * (length - 1), vocab, dtype=torch.float64).float() / temperature, -1)
    torch.testing.assert_close(stored.divergence(student, targets, *stored_parts),
                               online.divergence(student, targets, *online_parts), rtol=1e-4, atol=1e-5)
    assert (sparse_kd(student, *stored_parts, targets) > 0).all()


def _drawn_batch(logits: torch.Tensor, draws: int, seed: int, k: int = 0, kernel: str = "torch",
                 seeds: range | None = None) -> dict[str, torch.Tensor]:
    """What a sampled (k = 0) or hybrid (top-k + draws from the tail) store holds for ``logits
    [B, L, V]``, drawn at T = 1 with per-id log-probs, grid (1, 2), by stage one's ``kernel``. With
    ``seeds`` (``logits`` of one row): one row per seed, row i what ``seed = seeds[i]`` gives (the
    draws of a position are a function of its key alone)."""
    from pipeline.teacher.sampling import position_keys, sample_teacher, sampled_logprobs
    from pipeline.teacher.topk import sparse_teacher

    b, length, vocab = logits.shape
    if seeds is None:
        keys = position_keys(seed, torch.arange(b), length).reshape(-1)
    else:
        assert b == 1, "one row, drawn once per seed"
        keys = torch.cat([position_keys(s, torch.arange(1), length).reshape(-1) for s in seeds])
        logits, b = logits.expand(len(seeds), length, vocab), len(seeds)
    z = logits.reshape(-1, vocab).float()
    summary = sparse_teacher(z, max(k, 1), 1.0, (1.0, 2.0), kernel=kernel)
    drawn = sample_teacher(z, draws, 1.0, keys, summary["topk_ids"] if k else None, kernel=kernel)
    prefix = "tail_sample" if k else "sample"
    batch = {f"{prefix}_ids": drawn["sample_ids"], f"{prefix}_counts": drawn["sample_counts"],
             f"{prefix}_logprobs": sampled_logprobs(z, drawn["sample_ids"], drawn["sample_counts"], 1.0), "logsumexp": summary["logsumexp"]}
    if k:
        batch |= {"topk_ids": summary["topk_ids"], "topk_logprobs": summary["topk_logprobs"],
                  "tail_logmass": summary["tail_logmass"]}
    return {name: value.reshape(b, length, *value.shape[1:]) for name, value in batch.items()}


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("temperature, importance", [(1.0, "unbiased"), (2.0, "unbiased"), (2.0, "self-normalised")])
def test_drawn_targets_estimate_the_teacher(kind, temperature, importance):
    """Averaged over many draws the weights converge to the teacher's distribution at T: count/N at
    the drawing temperature, importance-weighted at another (self-normalised: up to its O(1/N) bias).
    At the drawing temperature (and always when self-normalised) each position's weights sum to one."""
    from pipeline.train.teacher_signal import StoredSampled

    torch.manual_seed(1)
    logits = 2.5 * torch.randn(1, 3, 40, dtype=torch.float64)
    p = torch.softmax(logits[0, :-1] / temperature, -1)  # the positions that have a next token
    k = 4 if kind == "hybrid" else 0
    params = {"temperature": 1.0, "temperature_grid": [1.0, 2.0], "sample_logprobs": True,
              **({"tail_samples": 8} if k else {"samples": 8})}
    signal = StoredSampled("topk" if k else "sampled", params, temperature, importance=importance)
    # 3000 seeds' draws as one batch of 3000 rows (one call, not 3000): row i is what seed i alone gives
    batch = _drawn_batch(logits, 8, 0, k, seeds=range(3000))
    for seed in (0, 1, 2999):
        alone = _drawn_batch(logits, 8, seed, k)
        for name, value in alone.items():
            width = value.shape[-1] if name.endswith(("_ids", "_counts", "_logprobs")) else None
            assert torch.equal(batch[name][seed:seed + 1, ..., :width], value), (seed, name)
    ids, weights = signal.positions(None, batch)  # [3000·2, M]: position-major, two positions per row
    if temperature == 1.0 or importance == "self-normalised":
        torch.testing.assert_close(weights.sum(-1).double(), torch.ones(3000 * 2, dtype=torch.float64), rtol=0,
                                   atol=1e-5)
    total = torch.zeros(3000 * 2, p.shape[-1], dtype=torch.float64).scatter_add(-1, ids, weights.double())
    total = total.reshape(3000, 2, -1).sum(0)
    tolerance = 0.05 if importance == "self-normalised" else 0.01  # N = 8: a visible O(1/N) bias
    torch.testing.assert_close(total / 3000, p, rtol=0, atol=tolerance)


def test_drawn_targets_refuse_what_they_cannot_estimate():
    from pipeline.train.teacher_signal import StoredSampled

    params = {"temperature": 1.0, "temperature_grid": [1.0, 2.0], "samples": 50, "sample_logprobs": False}
    with pytest.raises(DistillError, match="--direction reverse needs the teacher's probability"):
        StoredSampled("sampled", params, 1.0, direction="reverse")
    with pytest.raises(DistillError, match="holds no per-id log-probs"):
        StoredSampled("sampled", params, 2.0)


def _hybrid_weights_reference(logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float,
                              importance: str) -> torch.Tensor:
    """float64 ``[P, k + M]``: the hybrid's head and tail weights at ``temperature`` (drawn at T₀ = 1)
    from the dense ``logits [1, L, V]`` — exact teacher probabilities on the head; on the tail
    ``count/M · p_T/p_T₀`` times the tail mass at T₀ (unbiased), or those normalised over the drawn
    ids times the tail mass at T (self-normalised); 0 where nothing was drawn."""
    z = logits[0, :-1].double()
    at_cache, at_t = torch.log_softmax(z, -1), torch.log_softmax(z / temperature, -1)
    head = batch["topk_ids"][0, :-1]
    ids, counts = batch["tail_sample_ids"][0, :-1], batch["tail_sample_counts"][0, :-1].double()
    in_tail = torch.ones_like(z, dtype=torch.bool).scatter_(-1, head, False)
    ratio = torch.where(counts > 0, (at_t.gather(-1, ids) - at_cache.gather(-1, ids)).exp(), 0.0)
    tail = counts / counts.shape[-1] * ratio
    if importance == "unbiased":
        tail = tail * torch.where(in_tail, at_cache.exp(), 0.0).sum(-1, keepdim=True)
    else:
        total = tail.sum(-1, keepdim=True)
        tail = torch.where(total > 0, tail / total.clamp_min(1e-300), 0.0)
        tail = tail * torch.where(in_tail, at_t.exp(), 0.0).sum(-1, keepdim=True)
    return torch.cat([at_t.exp().gather(-1, head), tail], -1)


@pytest.mark.parametrize("importance", ["unbiased", "self-normalised"])
def test_hybrid_row_whose_tail_drew_nothing_has_finite_weights_at_another_temperature(importance):
    """A teacher whose id 0 has probability 0 (a −inf logit), at positions whose tail holds only
    −inf logits (so the tail draws nothing and slot 0 is id 0 with count 0): trained at T = 2 from
    draws made at T₀ = 1, every weight is finite and equals the float64 dense reference — for a
    store stage one writes now (the torch path and the fused kernel alike) and for one written
    before, which stored ``log p(id 0) = −inf`` in that slot (−inf − (−inf) = NaN if read as is)."""
    from pipeline.teacher import native
    from pipeline.train.teacher_signal import StoredSampled

    torch.manual_seed(3)
    logits = 2.0 * torch.randn(1, 5, 12, dtype=torch.float64)
    logits[..., 0] = float("-inf")
    for position in (0, 2):  # three finite logits, all kept by the top-3: the tail is empty
        logits[0, position, [3, 4, 5, 6, 8, 9, 10, 11]] = float("-inf")
    params = {"temperature": 1.0, "temperature_grid": [1.0, 2.0], "sample_logprobs": True, "tail_samples": 6}
    signal = StoredSampled("topk", params, 2.0, importance=importance)
    kernels = ["torch", "native"] if native.available() else ["torch"]
    results = []
    for kernel in kernels:
        batch = _drawn_batch(logits, 6, seed=0, k=3, kernel=kernel)
        counts = batch["tail_sample_counts"][0]
        assert (counts[[0, 2]] == 0).all() and (counts[[1, 3]].sum(-1) == 6).all()  # the case under test
        reference = _hybrid_weights_reference(logits, batch, 2.0, importance)
        written_before = dict(batch)  # slot 0 of a row that drew nothing held log p(id 0) = −inf
        logprobs = batch["tail_sample_logprobs"].clone()
        logprobs[0, [0, 2], 0] = float("-inf")
        written_before["tail_sample_logprobs"] = logprobs
        for stored in (batch, written_before):
            ids, weights = signal.positions(None, stored)
            assert torch.isfinite(weights).all()
            torch.testing.assert_close(weights.double(), reference, rtol=1e-5, atol=1e-7)
            assert (weights[[0, 2], 3:] == 0).all()
        results.append((batch, weights))
    for batch, weights in results[1:]:  # the fused kernel draws the torch path's ids: the same weights
        for name in ("topk_ids", "tail_sample_ids", "tail_sample_counts"):
            assert torch.equal(batch[name], results[0][0][name])
        torch.testing.assert_close(weights, results[0][1], rtol=1e-6, atol=1e-7)  # log-sum-exp: float32 rounding

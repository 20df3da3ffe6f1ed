"""The teacher signal: grid positions, the stored top-k's per-position tensors, and its divergence
against a dense reference."""

import pytest
import torch

from pipeline.errors import DistillError
from pipeline.losses import sparse_kd
from pipeline.teacher_signal import GridTemperature, OnlineTeacher, StoredTopK
from pipeline.topk import torch_sparse_teacher

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


def _drawn_batch(logits: torch.Tensor, draws: int, seed: int, k: int = 0) -> dict[str, torch.Tensor]:
    """What a sampled (k = 0) or hybrid (top-k + draws from the tail) store holds for ``logits
    [B, L, V]``, drawn at T = 1 with per-id log-probs, grid (1, 2)."""
    from pipeline.sampling import position_keys, sample_teacher, sampled_logprobs
    from pipeline.topk import sparse_teacher

    b, length, vocab = logits.shape
    z = logits.reshape(-1, vocab).float()
    summary = sparse_teacher(z, max(k, 1), 1.0, (1.0, 2.0), kernel="torch")
    keys = position_keys(seed, torch.arange(b), length).reshape(-1)
    drawn = sample_teacher(z, draws, 1.0, keys, summary["topk_ids"] if k else None, kernel="torch")
    prefix = "tail_sample" if k else "sample"
    batch = {f"{prefix}_ids": drawn["sample_ids"], f"{prefix}_counts": drawn["sample_counts"],
             f"{prefix}_logprobs": sampled_logprobs(z, drawn["sample_ids"], 1.0), "logsumexp": summary["logsumexp"]}
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
    from pipeline.teacher_signal import StoredSampled

    torch.manual_seed(1)
    logits = 2.5 * torch.randn(1, 3, 40, dtype=torch.float64)
    p = torch.softmax(logits[0, :-1] / temperature, -1)  # the positions that have a next token
    k = 4 if kind == "hybrid" else 0
    params = {"temperature": 1.0, "temperature_grid": [1.0, 2.0], "sample_logprobs": True,
              **({"tail_samples": 8} if k else {"samples": 8})}
    signal = StoredSampled("topk" if k else "sampled", params, temperature, importance=importance)
    total = torch.zeros_like(p)
    for seed in range(3000):
        ids, weights = signal.positions(None, _drawn_batch(logits, 8, seed, k))
        if temperature == 1.0 or importance == "self-normalised":
            torch.testing.assert_close(weights.sum(-1).double(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-5)
        total += torch.zeros_like(p).scatter_add(-1, ids, weights.double())
    tolerance = 0.05 if importance == "self-normalised" else 0.01  # N = 8: a visible O(1/N) bias
    torch.testing.assert_close(total / 3000, p, rtol=0, atol=tolerance)


def test_drawn_targets_refuse_what_they_cannot_estimate():
    from pipeline.teacher_signal import StoredSampled

    params = {"temperature": 1.0, "temperature_grid": [1.0, 2.0], "samples": 50, "sample_logprobs": False}
    with pytest.raises(DistillError, match="--direction reverse needs the teacher's probability"):
        StoredSampled("sampled", params, 1.0, direction="reverse")
    with pytest.raises(DistillError, match="holds no per-id log-probs"):
        StoredSampled("sampled", params, 2.0)

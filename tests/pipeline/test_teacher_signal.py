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

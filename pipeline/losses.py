"""Losses, pure functions. Shapes in docstrings; all values in nats.

Position t of a row predicts token t+1, so a row of L tokens gives L-1 targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction.

    logits: ``[B, L, V]`` (any float dtype; computed in float32), input_ids: ``[B, L]`` int64.
    Returns the mean over the ``B·(L-1)`` targets (``reduction='mean'``) or their sum (``'sum'``).
    """
    predictions = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), reduction=reduction)

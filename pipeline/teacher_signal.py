"""The teacher signal: what the distillation term of stage two (and eval's agreement) gets from a teacher.

One small interface, :class:`TeacherSignal`, with one class per way of having a teacher:

- :class:`StoredTopK`: the teacher as stage one stored it — top-k ids and log-probs re-tempered
  exactly to T (:func:`pipeline.topk.retemper`) and the exact tail mass; compared with
  :func:`pipeline.losses.sparse_kd`. The teacher's weights are never loaded.
- :class:`OnlineTeacher`: the teacher in memory, full vocabulary, compared with
  :func:`pipeline.losses.dense_kd` — the baseline offline distillation is measured against.

A new kind of stored teacher (a sampled-token store, say) is a new class with the same three
members, not a new branch in the training step.

Both split the work in two so that the caller can run the student's output head in chunks of
positions: :meth:`~TeacherSignal.positions` turns a batch into per-position tensors (leading dim
``P = B·(L−1)``, the positions that have a next token), which the caller slices into chunks; then
:meth:`~TeacherSignal.divergence` compares one chunk with the student's log-probs at T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pipeline.errors import DistillError
from pipeline.losses import dense_kd, sparse_kd
from pipeline.topk import retemper


class TeacherSignal(Protocol):
    temperature: float
    fields: tuple[str, ...]  # the store arrays a batch must carry besides input_ids

    def positions(self, input_ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Per-position teacher tensors for ``input_ids [B, L]``, each with leading dim ``B·(L−1)``."""

    def divergence(self, student_logprobs: torch.Tensor, targets: torch.Tensor,
                   *parts: torch.Tensor) -> torch.Tensor:
        """``[P]`` nats between the teacher and ``student_logprobs [P, V]`` (log-softmax at T), for
        one chunk of what :meth:`positions` gave; ``targets [P]`` are the true next tokens."""


@dataclass(frozen=True)
class GridTemperature:
    """Where a ``topk`` store's log-probs lie on its temperature grid, and where they are wanted."""

    cache_temperature: float  # the temperature the log-probs were stored at
    cache_index: int  # its place in the grid (the column of logsumexp / tail_logmass)
    temperature: float  # the temperature asked for
    index: int  # its place in the grid

    @classmethod
    def of_store(cls, params: dict[str, Any], temperature: float, option: str = "--temperature") -> "GridTemperature":
        """The store's grid positions for ``temperature``; a one-line error naming ``option`` when the
        store cannot give it exactly."""
        grid = [float(t) for t in params["temperature_grid"]]
        if temperature not in grid:
            raise DistillError(f"{option} {temperature:g} is not in the store's grid "
                               f"({', '.join(f'{t:g}' for t in grid)}); pick one of those or rerun stage one "
                               "with it in --temperature-grid")
        cache = float(params["temperature"])
        return cls(cache, grid.index(cache), float(temperature), grid.index(temperature))


class StoredTopK:
    """The sparse teacher of a ``topk`` store. Batches carry ``[B, L, ...]`` arrays of the store."""

    fields = ("topk_ids", "topk_logprobs", "logsumexp", "tail_logmass")

    def __init__(self, store_params: dict[str, Any], temperature: float, tail: str = "tail",
                 direction: str = "forward", option: str = "--temperature"):
        self.grid = GridTemperature.of_store(store_params, temperature, option)
        self.temperature, self.tail, self.direction = temperature, tail, direction

    def positions(self, input_ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(topk_ids ``[P, k]``, topk_logprobs at T ``[P, k]`` float32, tail_logmass at T ``[P]`` float32)."""
        g = self.grid
        logprobs = retemper(batch["topk_logprobs"], batch["logsumexp"], g.cache_temperature, g.cache_index, g.index,
                            g.temperature)
        k = logprobs.shape[-1]
        # the last position of a row has no next token in it
        return (batch["topk_ids"][:, :-1].reshape(-1, k), logprobs[:, :-1].reshape(-1, k),
                batch["tail_logmass"][:, :-1, g.index].reshape(-1).float())

    def divergence(self, student_logprobs: torch.Tensor, targets: torch.Tensor, topk_ids: torch.Tensor,
                   topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor) -> torch.Tensor:
        return sparse_kd(student_logprobs, topk_ids, topk_logprobs, tail_logmass, targets, self.tail, self.direction)


class OnlineTeacher:
    """A teacher model in memory (an :class:`pipeline.models.OutputHead`), full vocabulary.

    A plain object, not a ``torch.nn.Module``: a step module that holds it does not count the
    teacher's weights among its parameters (DDP/FSDP and the optimizer never see them)."""

    fields: tuple[str, ...] = ()

    def __init__(self, head, vocab: int, temperature: float, direction: str = "forward"):
        self.head, self.vocab, self.temperature, self.direction = head, vocab, temperature, direction

    @torch.no_grad()
    def positions(self, input_ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(the teacher's hidden states ``[P, H]``): its output head runs per chunk in :meth:`divergence`."""
        b, length = input_ids.shape
        return (self.head.hidden(input_ids)[:, :-1].reshape(b * (length - 1), -1),)

    def divergence(self, student_logprobs: torch.Tensor, targets: torch.Tensor,
                   hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.head.logits(hidden).float()[:, :self.vocab]  # padded output rows are not tokens
            teacher_logprobs = F.log_softmax(logits / self.temperature, dim=-1)
        return dense_kd(student_logprobs, teacher_logprobs, self.direction)

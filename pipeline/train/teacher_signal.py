"""The teacher signal: what the distillation term of stage two (and eval's agreement) gets from a teacher.

One small interface, :class:`TeacherSignal`, with one class per way of having a teacher:

- :class:`StoredTopK`: the teacher as stage one stored it — top-k ids and log-probs re-tempered
  exactly to T (:func:`pipeline.teacher.topk.retemper`) and the exact tail mass; compared with
  :func:`pipeline.train.losses.sparse_kd`. The teacher's weights are never loaded.
- :class:`OnlineTeacher`: the teacher in memory, full vocabulary, compared with
  :func:`pipeline.train.losses.dense_kd` — the baseline offline distillation is measured against.
- :class:`StoredSampled`: draws from the teacher — a ``sampled`` store (unique ids with counts) or
  the hybrid (exact top-k plus draws from the tail) — compared with :func:`pipeline.train.losses.sampled_kd`.
- :class:`StoredPolicyGradient`: on text the student wrote, the teacher's log-prob of each sampled
  token and the sampler's own; the sampled-token reverse-KL surrogate of
  :func:`pipeline.train.onpolicy.policy_gradient` (``--objective policy-gradient``).

:func:`stored_teacher` picks the class a store calls for. A new kind of teacher is a new class
with the same three members, not a new branch in the training step.

Each splits the work in two so that the caller can run the student's output head in chunks of
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
from pipeline.teacher.topk import retemper
from pipeline.train.losses import dense_kd, sampled_kd, sparse_kd
from pipeline.train.onpolicy import RATIO_MODES, policy_gradient


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
    def of_store(cls, params: dict[str, Any], temperature: float, option: str = "--temperature",
                 store: Any = None) -> "GridTemperature":
        """The store's grid positions for ``temperature``; a one-line error naming the store (``store``,
        its path, where given), ``option`` and the grid when the store cannot give it exactly."""
        grid = [float(t) for t in params["temperature_grid"]]
        shown = ", ".join(f"{t:g}" for t in grid)
        name = f"store {store}: " if store is not None else ""
        cache = float(params["temperature"])
        if cache not in grid:  # open_store refuses such an index; a hand-made params dict lands here
            raise DistillError(f"{name}the cache temperature {cache:g} is not in the store's grid ({shown}); the "
                               "index is damaged: rebuild it (distill merge, or rerun stage one)")
        if temperature not in grid:
            raise DistillError(f"{name}{option} {temperature:g} is not in the store's grid ({shown}); pick one of "
                               "those or rerun stage one with it in --temperature-grid")
        return cls(cache, grid.index(cache), float(temperature), grid.index(temperature))


class StoredTopK:
    """The sparse teacher of a ``topk`` store. Batches carry ``[B, L, ...]`` arrays of the store."""

    fields = ("topk_ids", "topk_logprobs", "logsumexp", "tail_logmass")

    def __init__(self, store_params: dict[str, Any], temperature: float, tail: str = "tail",
                 direction: str = "forward", option: str = "--temperature", store: Any = None):
        self.grid = GridTemperature.of_store(store_params, temperature, option, store)
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

    def __init__(self, head, vocab: int, temperature: float, direction: str = "forward", rule=None):
        self.head, self.vocab, self.temperature, self.direction = head, vocab, temperature, direction
        self.rule = rule  # the rows' RowRule (pipeline/text/packing.py): the teacher attends as the student does

    @torch.no_grad()
    def positions(self, input_ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(the teacher's hidden states ``[P, H]``): its output head runs per chunk in :meth:`divergence`."""
        b, length = input_ids.shape
        documents = self.rule.hidden_kwargs(input_ids) if self.rule is not None else {}
        return (self.head.hidden(input_ids, **documents)[:, :-1].reshape(b * (length - 1), -1),)

    def divergence(self, student_logprobs: torch.Tensor, targets: torch.Tensor,
                   hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.head.logits(hidden).float()[:, :self.vocab]  # padded output rows are not tokens
            teacher_logprobs = F.log_softmax(logits / self.temperature, dim=-1)
        return dense_kd(student_logprobs, teacher_logprobs, self.direction)


class StoredSampled:
    """Draws from the teacher, as a ``sampled`` store or the hybrid ``topk`` store (``--tail-samples``)
    holds them; compared with :func:`pipeline.train.losses.sampled_kd` (forward KL only).

    - ``sampled``: N draws at the cache temperature T₀ per position, stored as unique ids with
      counts; the target is ``count/N`` — an unbiased estimate of the teacher's distribution.
    - hybrid: the exact top-k (re-tempered as :class:`StoredTopK` does) plus M draws from the teacher
      restricted to its tail; the exact tail mass is spread over the drawn tail ids by their counts,
      ``m·count/M`` — exact on the head, unbiased on the tail.

    At a grid temperature T ≠ T₀ the draws (made at T₀) are reweighted by ``p_T(i)/p_T₀(i)`` from
    the stored per-id log-probs (``--sample-logprobs``): ``importance="unbiased"`` keeps
    ``E[w] = p_T`` (plain importance sampling; the weights need not sum to one per position, and
    the gradient stays unbiased); ``"self-normalised"`` divides by their sum (a distribution per
    position again, lower variance, biased by about 0.25/N: at N = 32 the weight of a position's
    most likely id is 7.7e-3 too high on average and up to 0.48 at one position, measured by
    ``bench/importance_bias.py``, docs/DESIGN.md).
    """

    IMPORTANCE = ("unbiased", "self-normalised")

    def __init__(self, store_kind: str, store_params: dict[str, Any], temperature: float,
                 direction: str = "forward", importance: str = "unbiased", option: str = "--temperature",
                 store: Any = None):
        if direction != "forward":
            raise DistillError("--direction reverse needs the teacher's probability wherever the student puts mass, "
                               "and drawn targets know it only at the drawn ids (reverse KL of a sampled target is "
                               "neither finite nor unbiased); use --direction forward, or a top-k store")
        if importance not in self.IMPORTANCE:
            raise DistillError(f"importance must be one of {', '.join(self.IMPORTANCE)}, got {importance!r}")
        self.grid = GridTemperature.of_store(store_params, temperature, option, store)
        self.temperature, self.importance = temperature, importance
        self.hybrid = store_kind == "topk"
        self.prefix = "tail_sample" if self.hybrid else "sample"
        self.draws = store_params["tail_samples" if self.hybrid else "samples"]
        reweight = self.grid.index != self.grid.cache_index
        if reweight and not store_params.get("sample_logprobs"):
            raise DistillError(f"{option} {temperature:g} differs from the temperature the store drew at "
                               f"({self.grid.cache_temperature:g}) and the store holds no per-id log-probs to "
                               f"reweight the draws; train at {self.grid.cache_temperature:g} or rerun stage one "
                               "with --sample-logprobs")
        self.reweight = reweight
        drawn = (f"{self.prefix}_ids", f"{self.prefix}_counts") + ((f"{self.prefix}_logprobs",) if reweight else ())
        head = ("topk_ids", "topk_logprobs", "tail_logmass") if self.hybrid else ()
        self.fields = head + drawn + ("logsumexp",)

    def positions(self, input_ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(ids ``[P, S]`` int64, weights ``[P, S]`` float32): the estimated teacher probabilities at T
        (0 at padding)."""
        g, p = self.grid, self.prefix
        counts = batch[f"{p}_counts"]
        weights = counts.float() / self.draws
        if self.reweight:  # importance weights p_T(i) / p_T₀(i), exact from the stored log-probs
            at_cache = batch[f"{p}_logprobs"].float()
            at_t = retemper(batch[f"{p}_logprobs"], batch["logsumexp"], g.cache_temperature, g.cache_index, g.index,
                            g.temperature)
            # only where something was drawn: stores written before the fix hold log p(id 0) in slot 0
            # of a hybrid row whose tail drew nothing, −inf where p(id 0) = 0, and 0·exp(−inf − (−inf)) is NaN
            weights = weights * torch.where(counts > 0, at_t - at_cache, 0.0).exp()
        ids = batch[f"{p}_ids"]
        unbiased = self.reweight and self.importance == "unbiased"
        normalised = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
        if self.hybrid and unbiased:  # count/M · p_T/p_T₀ estimates p_T(i)/m_T₀ on the tail
            weights = weights * batch["tail_logmass"][..., g.cache_index, None].float().exp()
        elif self.hybrid:  # a distribution over the drawn tail ids, scaled to the tail's exact mass at T
            weights = normalised * batch["tail_logmass"][..., g.index, None].float().exp()
        elif self.reweight and not unbiased:
            weights = normalised
        if self.hybrid:
            head = retemper(batch["topk_logprobs"], batch["logsumexp"], g.cache_temperature, g.cache_index, g.index,
                            g.temperature).exp()
            ids, weights = torch.cat([batch["topk_ids"], ids], -1), torch.cat([head, weights], -1)
        s = ids.shape[-1]
        # the last position of a row has no next token in it
        return ids[:, :-1].reshape(-1, s), weights[:, :-1].reshape(-1, s)

    def divergence(self, student_logprobs: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
        return sampled_kd(student_logprobs, ids, weights)


class StoredPolicyGradient:
    """On-policy text scored by the teacher: per position t, the sampler's ``behaviour_logprob`` and
    the teacher's ``target_logprob`` of token t+1 (re-tempered to T = 1 through the store's
    ``logsumexp`` where it was cached at another grid temperature). Any stage-one store (or a
    ``target`` store) that holds ``behaviour_logprob`` serves; compared with
    :func:`pipeline.train.onpolicy.policy_gradient` at T = 1.

    What a user watches (:meth:`take_stats`: over the positions of the step logged, every micro-batch
    of it, as the loss is, so a resumed run logs what an uninterrupted one does; rank 0's under DDP):
    ``pg_advantage`` the mean advantage (≈ minus the per-token reverse KL to the teacher on the
    sampler's tokens), ``pg_ratio`` the mean importance ratio, and ``pg_clipped_share`` (clip) or
    ``pg_gated_share`` (gate), the share of positions the band took the gradient from.
    """

    temperature = 1.0

    def __init__(self, store_kind: str, store_params: dict[str, Any], store_arrays, ratio: str = "clip",
                 epsilon: float = 0.2, store: Any = None):
        name = f"store {store}" if store is not None else "the store"
        if ratio not in RATIO_MODES:
            raise DistillError(f"ratio must be one of {', '.join(RATIO_MODES)}, got {ratio!r}")
        if "behaviour_logprob" not in store_arrays:
            raise DistillError(f"{name} holds no behaviour_logprob (the log-prob the sampler gave each token), which "
                               "--objective policy-gradient needs; prepare the student's distill generate output with "
                               "--format ids, then score it with distill teacher")
        if "target_logprob" not in store_arrays:
            raise DistillError(f"{name} ('{store_kind}') holds no target_logprob (the teacher's log-prob of each "
                               "token); score it with distill teacher")
        cache = float(store_params["temperature"])
        self.grid = None  # target_logprob is at T = 1 as stored
        if cache != 1.0:
            grid = [float(t) for t in store_params.get("temperature_grid", ())]
            if "logsumexp" not in store_arrays or 1.0 not in grid:
                raise DistillError(f"{name} holds the teacher's log-probs at T = {cache:g} and cannot re-temper them "
                                   "to T = 1, where the policy gradient compares them with the student's; rerun "
                                   "stage one with --temperature 1 (or with 1 in --temperature-grid)")
            self.grid = GridTemperature.of_store(store_params, 1.0, "--objective policy-gradient", store)
        self.ratio, self.epsilon = ratio, epsilon
        self.fields = ("behaviour_logprob", "target_logprob") + (("logsumexp",) if self.grid else ())
        self._sums = torch.zeros(4, dtype=torch.float64)  # positions, Σ advantage, Σ ratio, Σ outside

    def positions(self, input_ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(behaviour_logprob ``[P]`` float32, the teacher's log-prob at T = 1 ``[P]`` float32)."""
        teacher = batch["target_logprob"]
        if self.grid is not None:
            g = self.grid
            teacher = retemper(teacher[..., None], batch["logsumexp"], g.cache_temperature, g.cache_index, g.index,
                               g.temperature)[..., 0]
        # the last position of a row has no next token in it
        return (batch["behaviour_logprob"][:, :-1].reshape(-1).float(), teacher[:, :-1].reshape(-1).float())

    def _terms(self, student_logprobs: torch.Tensor, targets: torch.Tensor, behaviour: torch.Tensor,
               teacher: torch.Tensor):
        own = student_logprobs.gather(-1, targets[:, None]).squeeze(-1)
        return policy_gradient(own, behaviour, teacher, self.ratio, self.epsilon)

    def divergence(self, student_logprobs: torch.Tensor, targets: torch.Tensor, behaviour: torch.Tensor,
                   teacher: torch.Tensor) -> torch.Tensor:
        """``[P]`` the surrogate loss (nats at r = 1 and A's value; its gradient is what matters)."""
        return self._terms(student_logprobs, targets, behaviour, teacher).loss

    @torch.no_grad()
    def position_stats(self, student_logprobs: torch.Tensor, targets: torch.Tensor, behaviour: torch.Tensor,
                       teacher: torch.Tensor) -> torch.Tensor:
        """``[4]`` sums over one chunk: positions, advantage, ratio, positions outside the band."""
        terms = self._terms(student_logprobs, targets, behaviour, teacher)
        return torch.stack([torch.tensor(float(targets.numel()), device=targets.device, dtype=torch.float64),
                            terms.advantage.double().sum(), terms.ratio.double().sum(), terms.outside.double().sum()])

    def new_step(self) -> None:
        """Forget the statistics of earlier steps (the training loop calls it as each step begins)."""
        self._sums.zero_()

    def add_stats(self, sums: torch.Tensor) -> None:
        """Adds a micro-batch's :meth:`position_stats` (summed over its chunks); one sync per micro-batch."""
        self._sums += sums.detach().double().cpu()

    def take_stats(self) -> dict[str, float]:
        """Means over the positions since :meth:`new_step` (or the last call); zeros reset."""
        count, advantage, ratio, outside = self._sums.tolist()
        self._sums.zero_()
        n = max(count, 1.0)
        share = "pg_clipped_share" if self.ratio == "clip" else "pg_gated_share"
        return {"pg_advantage": advantage / n, "pg_ratio": ratio / n, share: outside / n}


def stored_teacher(store_kind: str, store_params: dict[str, Any], temperature: float, tail: str = "tail",
                   direction: str = "forward", importance: str = "unbiased",
                   option: str = "--temperature", store: Any = None) -> TeacherSignal:
    """The signal a store gives: draws (a ``sampled`` store, or a hybrid one under ``--tail tail``),
    or the exact top-k with its tail treatment. ``store`` (its path) names it in errors."""
    if store_kind == "sampled" or (store_params.get("tail_samples") and tail == "tail"):
        return StoredSampled(store_kind, store_params, temperature, direction, importance, option, store)
    return StoredTopK(store_params, temperature, tail, direction, option, store)

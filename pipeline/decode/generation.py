"""Sampling text from a causal LM so that each record depends on its own key alone, not its batch.

A record's randomness is a pure function of ``(seed, prompt index, sample index, attempt)``
(:func:`record_keys`): token ``t`` of the completion is drawn by the inverse CDF of the
(temperature-scaled, top-k / top-p filtered) next-token distribution at the uniform
``uniforms(key, budget)[t]`` — the counter-based uniforms stage one's draws use
(:mod:`pipeline.teacher.sampling`), with no ``torch.Generator`` and no global RNG state. Which records
share a batch, which array job runs them, a rerun after a kill: none of it changes a record's
uniforms or its prompt's tokens.

Batches are left-padded with an attention mask and explicit position ids, so a padded row sees the
same positions as it would alone, and decoding runs one token at a time on the model's KV cache.
What batching can change is the float rounding of the logits (a matrix product blocks its sums by
the batch's shape; about 1e-6 here): a drawn token changes only where its uniform lies within that
distance of a CDF boundary, and greedy decoding only at a near-tie. That is rarer than it is
negligible: with the shipped teacher at T = 1, 64 held-out prompts × 2 samples of up to 64 tokens,
batch 8 against batch 1 gave 2 different tokens in 7,822 (2 of 128 records then differ from there
on), both drawn where p ≈ e⁻¹³. A record is still a pure function of its key for a given batch size
and device; tests compare batch sizes 1 and 4, and 1 and 2 array jobs, record for record, on a small
model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from pipeline.decode.rules import Rules
from pipeline.teacher.sampling import position_keys, uniforms

SAMPLES_PER_PROMPT_MAX = 1 << 16
ATTEMPTS_MAX = 1 << 8


def record_keys(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor, attempt: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]`` counter keys of records: ``(prompt · 2¹⁶ + sample) · 2⁸ + attempt``, mixed with
    the seed as stage one mixes its positions. A prompt's sample ``s`` keeps its key when
    ``--samples-per-prompt`` grows; another seed's keys are unrelated."""
    flat = (prompt_index.to(torch.int64) * SAMPLES_PER_PROMPT_MAX + sample_index.to(torch.int64)) * ATTEMPTS_MAX \
        + attempt.to(torch.int64)
    return position_keys(seed, flat, 1).reshape(-1)


@dataclass(frozen=True)
class Sampling:
    temperature: float  # 0 = greedy (argmax)
    top_k: int  # 0 = off
    top_p: float  # 1 = off


def choose(logits: torch.Tensor, u: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """int64 ``[B]`` next tokens from ``logits [B, V]`` (masked ids at ``-inf``) and uniforms ``u [B]``
    (float64, in (0, 1)).

    Temperature, then top-k (ties at the k-th value are kept), then top-p (the smallest set of
    most probable ids whose mass reaches p, by a stable sort), then the inverse CDF in float64:
    the first id whose cumulative mass reaches ``u`` times the kept mass.
    """
    return choose_with_logprob(logits, u, sampling)[0]


def choose_with_logprob(logits: torch.Tensor, u: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose`'s ids ``[B]`` and float64 ``[B]`` the natural log of the probability each was
    drawn with: under the distribution actually sampled (temperature-scaled, top-k / top-p filtered
    and renormalised over what is kept, masked ids excluded), from the same float64 tensor the
    inverse CDF reads. Greedy decoding draws nothing: 0.0."""
    if sampling.temperature == 0:
        ids = logits.argmax(dim=-1)
        return ids, torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
    probs, order = _filtered(logits, sampling)
    cdf = probs.cumsum(dim=-1)
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1)
    # the chosen id's share of the kept mass (top-p zeroes what it drops, so cdf[:, -1] is the kept mass)
    logprob = probs.gather(-1, index).log().squeeze(-1) - cdf[:, -1].log()
    return (order.gather(-1, index) if order is not None else index).squeeze(-1), logprob


def _filtered(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float64 ``[B, V]`` kept probabilities (not renormalised: top-p zeroes what it drops) and, under
    top-p, the sort ``order`` they are in (None: id order). Temperature, then top-k (ties at the k-th
    value kept), then top-p by a stable sort: what :func:`choose_with_logprob` draws from."""
    scaled = logits.double() / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = scaled.topk(sampling.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    order = None
    if sampling.top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= sampling.top_p, 0.0)
    return probs, order


def behaviour_distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """float64 ``[B, V]``, id order: the distribution :func:`choose` draws each row's token from (what
    a record's ``completion_logprobs`` are log-probs of): temperature-scaled, top-k / top-p filtered
    and renormalised, masked ids (``-inf`` logits) 0; greedy, one-hot at the argmax. For checks and
    enumeration: the sampler itself never forms it in id order."""
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).double()
    probs, order = _filtered(logits, sampling)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs if order is None else torch.zeros_like(probs).scatter_(-1, order, probs)


@dataclass
class Decoded:
    tokens: list[int]  # completion ids (EOS not included)
    finish: str  # 'eos', 'length', 'stop' (the rules' stop text) or 'dead-end' (the rules left no token)
    logprobs: list[float] = field(default_factory=list)  # one per id of tokens: :func:`choose_with_logprob`'s
    eos_logprob: float | None = None  # the drawn EOS's, where finish is 'eos'

    def completion(self, eos: int) -> tuple[list[int], list[float]]:
        """The ids the model drew and their log-probs, the EOS included where the record ended at one
        (what an on-policy objective scores: the policy chose to stop there)."""
        if self.finish == "eos":
            return [*self.tokens, eos], [*self.logprobs, self.eos_logprob]
        return list(self.tokens), list(self.logprobs)


class CausalLM:
    """A model's forward for decoding: the cache keyword and ``logits_to_keep`` where it takes them
    (transformers ≥ 5 names the cache ``cache``, earlier ones ``past_key_values``)."""

    def __init__(self, model, vocab: int):
        self.model = model
        self.vocab = vocab  # tokenizer ids; output rows beyond them (padding) are never drawn
        params = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" in params
        self.device = next(model.parameters()).device

    def __call__(self, input_ids, attention_mask, position_ids, cache=None):
        kwargs = {"logits_to_keep": 1} if self.keep_last else {}
        if cache is not None:
            kwargs[self.cache_name] = cache
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **kwargs)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits[:, -1, :self.vocab].float(), cache


@torch.no_grad()
def decode(lm: CausalLM, prompts: list[list[int]], keys: torch.Tensor, sampling: Sampling, budget: int,
           eos: int | None, rules: Rules | None = None, prompt_texts: list[str] | None = None) -> list[Decoded]:
    """Complete each prompt (token ids, BOS included where wanted) with up to ``budget`` tokens.
    ``prompt_texts``: each prompt as text, where a banned phrase of ``rules`` may begin (a record's
    text is prompt + completion); without them the completion is judged alone.

    Stops a row at EOS, at the budget, or (with ``rules``) where the rules allow no token or at a
    token holding the rules' ``stop`` text (finish 'stop', the token kept). The batch runs until its
    last row stops; rows already stopped are fed EOS and ignored.
    """
    rows, device = len(prompts), lm.device
    width = max(len(p) for p in prompts)
    pad = eos if eos is not None else 0
    input_ids = torch.full((rows, width), pad, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    positions = (attention.cumsum(dim=1) - 1).clamp_(min=0)
    input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)
    u = uniforms(keys.to(torch.int64), budget)  # [rows, budget] float64, step t's draw in column t
    states = [rules.state(prompt_texts[row] if prompt_texts else "") for row in range(rows)] \
        if rules is not None else None
    results = [Decoded([], "") for _ in range(rows)]
    active = list(range(rows))

    logits, cache = lm(input_ids, attention, positions)
    for step in range(budget):
        if states is not None:
            for row in active:
                allowed = rules.allowed(states[row]).to(logits.device)
                if not allowed.any():
                    results[row].finish = "dead-end"
                else:
                    logits[row].masked_fill_(~allowed, float("-inf"))
            active = [row for row in active if not results[row].finish]
        chosen, logprob = choose_with_logprob(logits, u[:, step], sampling)
        chosen, logprob = chosen.cpu(), logprob.cpu()
        for row in active:
            token = int(chosen[row])
            if token == eos:
                results[row].finish = "eos"
                results[row].eos_logprob = float(logprob[row])
                continue
            results[row].tokens.append(token)
            results[row].logprobs.append(float(logprob[row]))
            if states is not None:
                states[row].append(token, rules.pieces[token])
                if token in rules.stops:
                    results[row].finish = "stop"
            if len(results[row].tokens) == budget and not results[row].finish:
                results[row].finish = "length"
        active = [row for row in active if not results[row].finish]
        if not active:
            break
        attention = torch.cat([attention, attention.new_ones((rows, 1))], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = lm(chosen.to(device).unsqueeze(1), attention, positions, cache)
    return results


def greedy_under_rules(model, prompts: list[list[int]], rules: Rules, eos: int, batch_size: int) -> list[Decoded]:
    """Greedy completions of ``prompts`` (ids) under ``rules`` (eval's QA answers), in batches of
    similar length; each ends at EOS, the rules' stop text, the budget or a dead end."""
    lm = CausalLM(model, rules.vocab)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Decoded] = [Decoded([], "")] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        zeros = torch.zeros(len(batch), dtype=torch.int64)
        for i, decoded in zip(batch, decode(lm, [prompts[i] for i in batch], zeros, Sampling(0.0, 0, 1.0),
                                            rules.budget, eos, rules)):
            results[i] = decoded
    return results


def qa_under_rules(scorer, rules: Rules, prompts: list[str], free_answers: list[str], items, shots: int,
                   definition) -> dict:
    """``distill eval --rules``: one QA task's prompts answered greedily under ``rules`` (compiled with
    the task's stop sequences, and cut at them as the free answers are: ``definition``, its
    :class:`pipeline.evaluate.tasks.QADefinition`), against the free answers. Returns, for ``shots``: ``rules_em_Kshot`` (exact match under the rules, by the
    definition's normalisation), ``violating_Kshot`` and ``rules_violating_Kshot`` (share of answers
    breaking any rule, free and enforced), ``violating_Kshot_RULE`` (free, per rule) and
    ``rules_unsatisfiable_Kshot`` (answers the rules left no token for). Generation tasks only: a
    task scored by log-likelihood has no answer to constrain."""
    from pipeline.decode.rules import violations

    keep = max(1, scorer.max_length - rules.budget)
    decoded = greedy_under_rules(scorer.model, [scorer.encode(p)[-keep:] for p in prompts], rules, scorer.eos,
                                 scorer.batch_size)
    enforced = [definition.answer(scorer.tokenizer.decode(d.tokens)) for d in decoded]
    free = [violations(rules.spec, a, len(scorer.encode(a))) for a in free_answers]
    ruled = [violations(rules.spec, a, len(d.tokens)) + (["dead end"] if d.finish == "dead-end" else [])
             for a, d in zip(enforced, decoded)]
    n, k = max(len(prompts), 1), f"{shots}shot"
    result = {f"rules_em_{k}": sum(definition.exact_match(a, it.answers) for a, it in zip(enforced, items)) / n,
              f"violating_{k}": sum(bool(v) for v in free) / n, f"rules_violating_{k}": sum(bool(v) for v in ruled) / n,
              f"rules_unsatisfiable_{k}": sum(d.finish == "dead-end" for d in decoded) / n}
    for rule in rules.spec.given():
        result[f"violating_{k}_{rule}"] = sum(any(v.startswith(rule + ":") for v in vs) for vs in free) / n
    return result

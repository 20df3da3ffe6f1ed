"""``distill eval``: the paper's evidence for any local causal LM.

Held-out perplexity (per token and bits per byte), LAMBADA (last-word accuracy and perplexity),
HellaSwag and StoryCloze (log-likelihood multiple choice, ``acc`` and ``acc_norm``), NQ-open,
TriviaQA and WebQuestions (exact match, zero/one/few-shot), a custom QA task (``--custom``), with
``--rules`` the QA answers under rules as well (:func:`pipeline.decode.generation.qa_under_rules`), and
agreement with a stored teacher (top-1 agreement and KL from a ``topk`` store made with the model's
tokenizer), and with ``--harness`` any lm-evaluation-harness task (MMLU, ARC, ...) run by lm_eval's own
``simple_evaluate`` on the loaded model (:func:`eval_harness`). The completion tasks follow lm-evaluation-harness's
prompts and scoring; the QA tasks follow its ``nq_open``, ``triviaqa`` and ``webqs`` under
``--qa-format lm-eval`` (the default; webqs zero-shot only) or GPT-3's prompts under ``gpt3`` (see
:mod:`pipeline.evaluate.tasks`). ``tests/stages/test_lm_eval.py`` checks the agreement: same prompts,
predictions and metrics on the same files.

One JSON file comes out: the model, its parameters, how it was trained (when it was trained by
``distill student``), every task's metrics, the harness's results under ``harness`` and the resolved
config. ``distill report`` reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.checks import check_store_fits
from pipeline.config import check, flag, option, required, split_list, to_dict
from pipeline.decode.generation import qa_under_rules
from pipeline.decode.rules import Rules, load_rules
from pipeline.errors import DistillError
from pipeline.evaluate import tasks
from pipeline.io import atomic_write_text
from pipeline.models import (ATTN_HELP, AUTO_DTYPE_HELP, TF32_HELP, OutputHead, attn_implementation_problems,
                             check_document_attention, count_parameters, device_problems, dtype_problems, has_weights,
                             load_model, max_positions, resolve_device, resolve_dtype, set_tf32)
from pipeline.train.tracking import REPORT_TO_HELP, Tracker, TrackerPaths, check_installed, report_to_problems
from pipeline.text.corpus import DocumentReader, expand_inputs
from pipeline.text.packing import RowRule, tokenizer_adds_bos
from pipeline.text.tokenizer import load_tokenizer, tokenizer_hash, vocab_size
from pipeline.threads import THREADS_HELP, set_threads, threads_problems

COMPLETION = ("heldout", "lambada", "hellaswag", "storycloze")
QA_TASKS = ("nq", "webq", "triviaqa", "custom")
TASKS = COMPLETION + QA_TASKS + ("agreement",)


@dataclass(frozen=True)
class EvalConfig:
    model: str = option("", "Model to evaluate: a local Hugging Face causal-LM directory.")
    out: str = option("", "JSON file to write: metrics, model facts and this resolved config.")
    tasks: tuple[str, ...] = option(("heldout", "lambada", "hellaswag", "storycloze"),
                                    f"Tasks, comma-separated: {', '.join(TASKS)}.")
    name: str = option("", "Name of the model in reports (default: its directory, or its run's directory).")
    heldout: tuple[str, ...] = option(("data/corpus/heldout.jsonl.gz",),
                                      "Held-out text files (.txt, .txt.gz, .jsonl, .jsonl.gz), one document per "
                                      "file or JSON line.")
    text_field: str = option("text", "JSON field holding the text of a held-out JSONL document.")
    lambada: str = option("data/eval/lambada.jsonl", "LAMBADA JSONL ({\"text\": ...}).")
    hellaswag: str = option("data/eval/hellaswag.jsonl", "HellaSwag JSONL (ctx or ctx_a/ctx_b, endings, label).")
    storycloze: str = option("data/eval/storycloze.jsonl", "StoryCloze JSONL (InputSentence1..4, "
                             "RandomFifthSentenceQuiz1/2, AnswerRightEnding).")
    nq: str = option("", "NQ-open JSONL to evaluate (question, answer list).")
    nq_shots: str = option("", "NQ-open JSONL the few-shot examples are drawn from (its train split).")
    webq: str = option("", "WebQuestions JSONL to evaluate (question, answers list).")
    webq_shots: str = option("", "WebQuestions JSONL the few-shot examples are drawn from.")
    triviaqa: str = option("", "TriviaQA JSONL to evaluate (question, answer {value, aliases}).")
    triviaqa_shots: str = option("", "TriviaQA JSONL the few-shot examples are drawn from.")
    custom: str = option("", "Your own task for --tasks custom: prompt/response JSONL (e.g. the held-out part of a "
                         "fine-tuning set); the prompt is sent as written, the answer generated greedily up to a "
                         "newline and matched against the record's 'answers' list, or its response.")
    custom_prompt_field: str = option("prompt", "JSONL field of a custom task record holding the prompt.")
    custom_response_field: str = option("response", "JSONL field of a custom task record holding the response.")
    shots: tuple[int, ...] = option((0,), "QA prompt sizes, comma-separated: 0, 1, k (GPT-3's zero-, one-, few-shot).")
    qa_format: str = option("lm-eval", "QA prompts and scoring: lm-eval or gpt3 (lm-evaluation-harness's "
                            "nq_open, triviaqa and webqs; or GPT-3's Q:/A: prompts, for the paper's tables).")
    agreement: str = option("", "A topk store (stage one over held-out sequences) for teacher agreement.")
    agreement_temperature: float = option(1.0, "Temperature of the agreement KL (one of the store's grid).")
    limit: int = option(0, "At most this many items per task, the first ones (0 = all).")
    max_length: int = option(0, "Context window in tokens (0 = the model's maximum positions).")
    max_new_tokens: int = option(0, "Most tokens generated per QA answer (0 = the QA format's: lm-eval 256, "
                                 "gpt3 24); generation ends at the format's stop sequences.")
    rules: str = option("", "Rule file (pipeline/decode/rules.py): QA answers are also generated under it, enforced while "
                        "decoding; each QA task adds the share of answers breaking each rule and exact match, "
                        "without and with the rules (violating_*, rules_*).")
    batch_size: int = option(16, "Sequences per forward pass.")
    seed: int = option(1234, "Seed for drawing few-shot examples (lm-eval's default fewshot_random_seed).")
    log_samples: bool = option(False, "Also write every item's prediction and score to OUT's .samples.jsonl.")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int = option(0, THREADS_HELP)
    dtype: str = option("auto", "Weights and activations: auto, float32, bfloat16 or float16 (log-probs are taken "
                        "in float32 from the logits). " + AUTO_DTYPE_HELP)
    tf32: bool = option(True, TF32_HELP)
    attn_implementation: str = option("auto", ATTN_HELP)
    trust_remote_code: bool = option(False, "Allow the model directory's own code to run.")
    harness: tuple[str, ...] = option((), "lm-evaluation-harness tasks, groups or tags, comma-separated (e.g. "
                                      "mmlu,arc_easy,arc_challenge,hellaswag): run by lm_eval's simple_evaluate on "
                                      "the loaded model after --tasks, with --limit, --batch-size, --device, "
                                      "--dtype and --seed; needs pip install 'distill[lmeval]'.")
    harness_include: tuple[str, ...] = option((), "Directories of lm-eval task YAMLs for --harness besides lm_eval's "
                                              "own (e.g. data/lm_eval; a local dataset_path reads no network).")
    harness_fewshot: int = option(-1, "Few-shot examples per --harness task (lm_eval's num_fewshot); -1 = each "
                                  "task's own default.")
    report_to: tuple[str, ...] = option(("jsonl",), REPORT_TO_HELP + " For eval: OUT's X.metrics.jsonl, "
                                        "tensorboard/X beside it, every task's numbers at the model's training step.")

    def __post_init__(self):
        split = split_list(self.tasks)  # a config file's "a,b" too
        object.__setattr__(self, "tasks", split)
        object.__setattr__(self, "harness", split_list(self.harness))
        object.__setattr__(self, "harness_include", split_list(self.harness_include))
        problems = required(self, "model", "out")
        unknown = [t for t in split if t not in TASKS]
        if unknown:
            problems.append(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if not split and not self.harness:
            problems.append("no --tasks or --harness given")
        if self.harness_fewshot < -1:
            problems.append("harness_fewshot must be -1 (each task's default) or at least 0")
        if (self.harness_include or self.harness_fewshot >= 0) and not self.harness:
            problems.append("--harness-include and --harness-fewshot apply to --harness tasks; name them with "
                            "--harness TASKS")
        for name in QA_TASKS:
            if name in split and not getattr(self, name):
                problems.append(f"task {name} needs --{name} FILE (a local JSONL file; nothing is downloaded)")
            if name in split and any(s > 0 for s in self.shots) and name != "custom" \
                    and not getattr(self, f"{name}_shots"):
                problems.append(f"--shots {max(self.shots)} for {name} needs --{name}-shots FILE "
                                "(examples from a split other than the one evaluated)")
        if "agreement" in split and not self.agreement:
            problems.append("task agreement needs --agreement STORE (a topk store of held-out sequences)")
        if any(s < 0 for s in self.shots):
            problems.append("shots must not be negative")
        if self.qa_format not in tasks.QA_FORMATS:
            problems.append(f"qa_format must be one of {', '.join(tasks.QA_FORMATS)}, got {self.qa_format!r}")
        else:
            for name in QA_TASKS:
                why = tasks.qa_definition(self.qa_format, name).zero_shot_only
                if name in split and why and any(s > 0 for s in self.shots):
                    problems.append(f"{name} is zero-shot only ({why}); pass --shots 0 or evaluate it apart"
                                    if name == "custom" else
                                    f"{name} with --qa-format {self.qa_format} is zero-shot only ({why}); "
                                    "pass --shots 0 or --qa-format gpt3")
        if self.batch_size < 1:
            problems.append("batch_size must be at least 1")
        for name in ("limit", "max_length", "max_new_tokens"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        problems += device_problems(self.device) + threads_problems(self.threads) + report_to_problems(self.report_to)
        problems += attn_implementation_problems(self.attn_implementation, self.device, self.dtype)
        problems += dtype_problems(self.dtype)
        check(problems, "eval")


# ------------------------------------------------------------------------------------------------
# scoring


class Scorer:
    """Batched log-likelihoods and greedy generations of one model."""

    def __init__(self, model, tokenizer, device: torch.device, batch_size: int, max_length: int):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.batch_size, self.max_length = batch_size, max_length
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        # what a whole document is scored after: BOS where the tokenizer begins a text with one (as
        # the model was trained, and as ``distill prepare`` packs by default), else EOS
        self.document_start = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else self.eos
        self.vocab = len(tokenizer)
        probe = torch.tensor([[self.eos, self.eos]], device=device)
        self.head = OutputHead(model, probe)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split where the text splits (trailing context spaces move
        into the continuation; the continuation is what the whole string adds to the context)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eos], self.encode(continuation)
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def score(self, requests: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """For each ``(input ids, targets)``, where the targets are what the last ``len(targets)``
        positions of the input predict: (sum of target log-probs, every target is the argmax)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        total = sum(len(r[0]) for r in requests)
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                inputs = [requests[i][0][-self.max_length:] for i in idx]
                width = max(len(x) for x in inputs)
                batch = torch.full((len(idx), width), self.eos, dtype=torch.long)
                for row, x in enumerate(inputs):
                    batch[row, :len(x)] = torch.tensor(x)  # right padding: causal rows never see it
                hidden = self.head.hidden(batch.to(self.device))
                rows, cols, targets = [], [], []  # every scored position: its batch row, column, target
                for row, (i, x) in enumerate(zip(idx, inputs)):
                    n = len(requests[i][1])
                    rows += [row] * n
                    cols += range(len(x) - n, len(x))
                    targets += requests[i][1]
                logits = self.head.logits(hidden[torch.tensor(rows), torch.tensor(cols)]).float()[:, :self.vocab]
                logprobs = F.log_softmax(logits, dim=-1)
                y = torch.tensor(targets, device=logprobs.device)
                picked = logprobs.gather(-1, y[:, None])[:, 0].double().cpu()
                hit = (logprobs.argmax(-1) == y).cpu()
                owner = torch.tensor(rows)
                sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, owner, picked)
                misses = torch.zeros(len(idx), dtype=torch.long).index_add_(0, owner, (~hit).long())
                for row, i in enumerate(idx):
                    results[i] = (float(sums[row]), bool(misses[row] == 0))
                bar.update(sum(len(x) for x in inputs))
        return results

    def loglikelihood(self, pairs: list[tuple[str, str]], desc: str) -> list[tuple[float, bool, int]]:
        """(log p(continuation | context), continuation is greedy, continuation tokens) per pair."""
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        for (c, x), (_, cont) in zip(pairs, encoded):
            if not cont:
                raise DistillError(f"continuation {x!r} encodes to no tokens")
            if len(cont) > self.max_length:
                raise DistillError(f"continuation {x[:40]!r}… is {len(cont)} tokens, longer than the context "
                                   f"window ({self.max_length}); raise --max-length or shorten the task's answers")
        scored = self.score([((ctx + cont)[:-1], cont) for ctx, cont in encoded], desc)
        return [(ll, greedy, len(cont)) for (ll, greedy), (_, cont) in zip(scored, encoded)]

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, desc: str,
                 stops: tuple[str, ...] = ("\n",)) -> list[str]:
        """Greedy continuations, as decoded up to EOS; a row stops once it holds one of ``stops``
        (cutting there is the caller's: :meth:`tasks.QADefinition.answer`). Batches are formed as
        lm-evaluation-harness forms them (longest prompt in tokens first, then by text), left-padded."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer, eos = self.tokenizer, self.eos

        class Stop(StoppingCriteria):
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids, scores, **kwargs):
                texts = tokenizer.batch_decode(input_ids[:, self.start:])
                return torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)

        outputs: list[str] = [""] * len(prompts)
        encoded_all = [self.encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded_all[i]), prompts[i]))
        keep = max(1, self.max_length - max_new_tokens)
        with tqdm(total=len(prompts), desc=desc, unit="q", leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                encoded = [encoded_all[i][-keep:] for i in idx]
                width = max(len(x) for x in encoded)
                ids = torch.full((len(idx), width), eos, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, x in enumerate(encoded):  # left padding: every prompt ends at the same column
                    ids[row, width - len(x):] = torch.tensor(x)
                    mask[row, width - len(x):] = 1
                out = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                    max_new_tokens=max_new_tokens, pad_token_id=eos, eos_token_id=eos,
                    stopping_criteria=StoppingCriteriaList([Stop(width)]))
                for row, i in enumerate(idx):
                    new = out[row, width:].tolist()
                    if eos in new:
                        new = new[:new.index(eos)]
                    outputs[i] = tokenizer.decode(new)
                bar.update(len(idx))
        return outputs


# ------------------------------------------------------------------------------------------------
# tasks


def _limit(items: list, limit: int) -> list:
    return items[:limit] if limit else items


def eval_heldout(scorer: Scorer, config: EvalConfig, samples: list) -> dict[str, float]:
    """Per-token loss and perplexity, bits per byte and word perplexity over whole documents."""
    reader = DocumentReader(expand_inputs(config.heldout, "--heldout"), text_field=config.text_field)
    docs = _limit([d for d in reader if d.strip()], config.limit)
    if not docs:
        raise DistillError(f"no held-out text in {', '.join(config.heldout)}")
    requests, owner = [], []
    for d, text in enumerate(docs):
        for window in tasks.rolling_windows(scorer.encode(text), scorer.document_start, scorer.max_length):
            requests.append(window)
            owner.append(d)
    scored = scorer.score(requests, "held-out")
    per_doc = np.zeros(len(docs))
    for d, (ll, _) in zip(owner, scored):
        per_doc[d] += ll
    nats = -per_doc.sum()
    tokens = sum(len(targets) for _, targets in requests)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    words = sum(len(re.split(r"\s+", t)) for t in docs)  # lm-evaluation-harness's word count
    for d, text in enumerate(docs):
        samples.append({"task": "heldout", "doc": d, "loglikelihood": per_doc[d], "bytes": len(text.encode())})
    return {"loss": nats / tokens, "ppl": math.exp(nats / tokens), "bits_per_byte": nats / n_bytes / math.log(2),
            "word_ppl": math.exp(nats / words), "tokens": tokens, "bytes": n_bytes, "documents": len(docs)}


def eval_lambada(scorer: Scorer, config: EvalConfig, samples: list) -> dict[str, float]:
    items = _limit(tasks.lambada(config.lambada), config.limit)
    scored = scorer.loglikelihood([(it.context, it.target) for it in items], "lambada")
    for i, (it, (ll, greedy, n)) in enumerate(zip(items, scored)):
        samples.append({"task": "lambada", "doc": i, "target": it.target, "loglikelihood": ll, "greedy": greedy,
                        "target_tokens": n})
    lls = np.array([s[0] for s in scored])
    return {"acc": float(np.mean([s[1] for s in scored])), "ppl": float(np.exp(-lls.mean())), "n": len(items)}


def choice_metrics(loglikelihoods: list[float], endings: tuple[str, ...], label: int) -> tuple[bool, bool]:
    """(acc, acc_norm) of one multiple-choice item: the most likely ending, in total and per character."""
    lls = np.array(loglikelihoods)
    per_char = lls / np.array([len(e) for e in endings])
    return bool(np.argmax(lls) == label), bool(np.argmax(per_char) == label)


def eval_choice(scorer: Scorer, task: str, items: list[tasks.Choice], samples: list) -> dict[str, float]:
    pairs = [(it.context, " " + ending) for it in items for ending in it.endings]
    scored = iter(scorer.loglikelihood(pairs, task))
    acc, acc_norm = [], []
    for i, it in enumerate(items):
        lls = [next(scored)[0] for _ in it.endings]
        a, an = choice_metrics(lls, it.endings, it.label)
        acc.append(a)
        acc_norm.append(an)
        samples.append({"task": task, "doc": i, "loglikelihoods": lls, "label": it.label, "acc": a, "acc_norm": an})
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(items)}


def draw_shots(pool: list[tasks.QA], k: int, seed: int, index: int, question: str) -> list[tasks.QA]:
    """``k`` examples for item ``index``: a fixed draw per (seed, item), never the item's own question
    (the ``gpt3`` format's sampler)."""
    if k == 0:
        return []
    candidates = [q for q in pool if q.question != question]
    if len(candidates) < k:
        raise DistillError(f"{k}-shot prompts need {k} examples besides the question; the shots file has "
                           f"{len(candidates)}")
    rng = np.random.default_rng([seed, index])
    return [candidates[j] for j in rng.choice(len(candidates), size=k, replace=False)]


def lm_eval_shots(pool: list[tasks.QA], items: list[tasks.QA], k: int, seed: int,
                  exclude_item: bool) -> list[list[tasks.QA]]:
    """lm-evaluation-harness's default ContextSampler (api/samplers.py), item after item: one
    ``random.Random(seed)`` for the whole task, ``sample(pool, k)`` per item, or, where the task's
    few-shot split equals its test split (``exclude_item``; for nq_open and triviaqa both are None),
    ``sample(pool, k + 1)`` less the rows equal to the item, first k, redrawn from the pool without
    them if fewer are left. The same seed and order give the same shots as lm_eval's."""
    if k == 0:
        return [[] for _ in items]
    need = k + 1 if exclude_item else k
    if len(pool) < need:
        raise DistillError(f"{k}-shot prompts draw {need} examples at a time; the shots file has {len(pool)}")
    rnd, shots = random.Random(seed), []
    for item in items:
        drawn = [pool[j] for j in rnd.sample(range(len(pool)), need)]  # the same indices as sampling the rows
        if exclude_item:
            drawn = [s for s in drawn if s.doc != item.doc][:k]
            if len(drawn) < k:
                rest = [s for s in pool if s.doc != item.doc]
                if len(rest) < k:
                    raise DistillError(f"{k}-shot prompts need {k} examples besides the item itself; the shots "
                                       f"file has {len(rest)}")
                drawn = [rest[j] for j in rnd.sample(range(len(rest)), k)]
        shots.append(drawn)
    return shots


def eval_qa(scorer: Scorer, config: EvalConfig, task: str, samples: list, rules=None) -> dict[str, Any]:
    """One QA task under its definition for ``--qa-format``; ``rules(stops, budget)`` compiles the
    rule file for ``--rules`` (generation tasks only)."""
    definition = tasks.qa_definition(config.qa_format, task)
    if task == "custom":
        items = _limit(tasks.prompted(config.custom, config.custom_prompt_field, config.custom_response_field),
                       config.limit)
        pool = []
    else:
        items = _limit(tasks.qa(getattr(config, task), definition), config.limit)
        pool = tasks.qa(getattr(config, f"{task}_shots"), definition) if any(config.shots) else []
    budget = config.max_new_tokens or definition.max_new_tokens
    result: dict[str, Any] = {"n": len(items), "format": "custom" if task == "custom" else config.qa_format,
                              "definition": definition.name}
    if task == "custom":
        result["file"] = config.custom
    if rules is not None and definition.scoring != "generate":
        result["rules"] = (f"not applied: {task} is scored by the log-likelihood of its answers under "
                           f"--qa-format {config.qa_format}; no answer is generated")
    for k in config.shots:
        if definition.sampler == "per-item":
            shots = [draw_shots(pool, k, config.seed, i, it.question) for i, it in enumerate(items)]
        else:
            shots = lm_eval_shots(pool, items, k, config.seed, definition.exclude_item)
        prompts = [definition.prompt(it.question, s) for it, s in zip(items, shots)]
        desc = f"{task} {k}-shot"
        if definition.scoring == "loglikelihood":
            scored = iter(scorer.loglikelihood([(p, definition.target_delimiter + a) for p, it in zip(prompts, items)
                                                for a in it.answers], desc))
            per_item = [[next(scored) for _ in it.answers] for it in items]
            hits = [any(greedy for _, greedy, _ in s) for s in per_item]
            for i, (it, p, s, h) in enumerate(zip(items, prompts, per_item, hits)):
                samples.append({"task": task, "shots": k, "doc": i, "prompt": p, "answers": list(it.answers),
                                "loglikelihoods": [ll for ll, _, _ in s], "greedy": [g for _, g, _ in s], "em": h})
        else:
            generated = scorer.generate(prompts, budget, desc, definition.stops)
            answers = [definition.answer(g) for g in generated]
            hits = [definition.exact_match(a, it.answers) for a, it in zip(answers, items)]
            if rules is not None:
                result |= qa_under_rules(scorer, rules(definition.stops, budget), prompts, answers, items, k,
                                         definition)
            for i, (it, p, g, a, h) in enumerate(zip(items, prompts, generated, answers, hits)):
                samples.append({"task": task, "shots": k, "doc": i, "prompt": p, "generated": g, "prediction": a,
                                "answers": list(it.answers), "em": h})
        result[f"em_{k}shot"] = float(np.mean(hits))
    return result


def agreement_teacher(config: EvalConfig):
    """The agreement task's topk store and its teacher at ``--agreement-temperature``, checked before
    the model loads or any task runs."""
    from pipeline.store.contract import open_store
    from pipeline.train.teacher_signal import StoredTopK

    store = open_store(config.agreement)
    if store.kind != "topk":
        raise DistillError(f"agreement store {store.root} is a '{store.kind}' store; the agreement task needs a "
                           "topk store: run distill teacher --kind topk over held-out tokens")
    return store, StoredTopK(store.params, config.agreement_temperature, "tail", "forward",
                             option="--agreement-temperature", store=store.root)


def check_task_files(config: EvalConfig) -> None:
    """Every file the chosen tasks read is there, before the model loads or the first task runs."""
    if "heldout" in config.tasks:
        expand_inputs(config.heldout, "--heldout")
    for task in ("lambada", "hellaswag", "storycloze", *QA_TASKS):
        if task in config.tasks:
            shots = (f"{task}_shots",) if task in QA_TASKS and task != "custom" and any(config.shots) else ()
            for name in (task, *shots):
                tasks.require_file(getattr(config, name), flag(name))


@torch.no_grad()
def eval_agreement(scorer: Scorer, config: EvalConfig, samples: list, store, teacher) -> dict[str, float]:
    """Top-1 agreement with the stored teacher and KL(teacher ‖ model) over the kept top-k plus one
    tail bucket (exact for the store's distribution; a lower bound on the full-vocabulary KL)."""
    from pipeline.train.loader import sequential

    params = store.params
    t = config.agreement_temperature
    if params.get("tokenizer_hash") != tokenizer_hash(scorer.tokenizer):
        return eval_agreement_across(scorer, config, store, teacher)
    check_store_fits(store, "agreement store", tokenizer_hash(scorer.tokenizer), scorer.vocab, scorer.max_length)
    rule = RowRule.of(params)  # the model reads the rows as stage one's teacher did
    if rule.attention == "document":
        check_document_attention(scorer.model, rule.eos_token_id, f"model {config.model}")
    rows = config.limit or store.rows
    agree = kl = positions = 0.0
    with tqdm(total=min(rows, store.rows) * params["seq_len"], desc="agreement", unit="tok", unit_scale=True,
              leave=False) as bar:
        for batch in sequential(store, config.batch_size, rows):
            batch = {k: v.to(scorer.device) for k, v in batch.items()}
            ids = batch["input_ids"]
            hidden = scorer.head.hidden(ids, **rule.hidden_kwargs(ids))[:, :-1]
            logits = scorer.head.logits(hidden).float()[..., :scorer.vocab]
            n = logits.shape[0] * logits.shape[1]
            logits = logits.reshape(n, -1)
            teacher_ids, teacher_logprobs, tail = teacher.positions(ids, batch)
            targets = ids[:, 1:].reshape(n)
            if (scored := rule.target_mask(ids)) is not None:  # a BOS is not predicted: no score there
                keep = scored.reshape(-1).nonzero().squeeze(-1)
                logits, targets, teacher_ids, teacher_logprobs, tail = (
                    x[keep] for x in (logits, targets, teacher_ids, teacher_logprobs, tail))
                n = len(keep)
            student = F.log_softmax(logits / t, dim=-1)
            agree += float((logits.argmax(-1) == teacher_ids[:, 0]).sum())
            kl += float(teacher.divergence(student, targets, teacher_ids, teacher_logprobs, tail).sum())
            positions += n
            bar.update(ids.numel())
    return {"top1": agree / positions, "kl": kl / positions, "temperature": t, "tokens": int(positions)}


@torch.no_grad()
def eval_agreement_across(scorer: Scorer, config: EvalConfig, store, teacher) -> dict[str, float]:
    """Agreement with a teacher of another tokenizer, over the **1:1 chunks** only (a chunk of the
    same bytes that is one token on each side, pipeline/text/align.py): top-1 agreement (the
    model's argmax is the student id of the teacher's top-1; a teacher top-1 with no student id
    counts as a miss) and the bucketed KL of pipeline/train/cross_losses.py, with the share of the
    model's positions that are 1:1. Named ``*_1to1``: not comparable with same-tokenizer agreement."""
    from pipeline.train.loader import sequential
    from pipeline.text.align import RowAligner, check_byte_level, token_bytes, vocab_map
    from pipeline.train.cross_signal import CrossTokenizer

    if RowRule.of(store.params).attention == "document":
        raise DistillError(f"agreement store {config.agreement} keeps attention within documents, which the "
                           "comparison across tokenizers does not carry over; use a store prepared with --attention "
                           "causal")
    store_tokenizer = load_tokenizer(store.params["tokenizer"], config.trust_remote_code)
    check_byte_level(store_tokenizer, "teacher", store.params["tokenizer"])
    check_byte_level(scorer.tokenizer, "model", config.model)
    teacher_bytes, model_bytes = token_bytes(store_tokenizer), token_bytes(scorer.tokenizer)
    mapping, _ = vocab_map(teacher_bytes, model_bytes)
    backend = scorer.tokenizer.backend_tokenizer
    aligner = RowAligner(teacher_bytes, model_bytes,
                         lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)],
                         scorer.max_length, scorer.tokenizer.eos_token_id)
    signal = CrossTokenizer(teacher, mapping, "exact")
    t = config.agreement_temperature
    agree = kl = positions = 0.0
    rows = config.limit or store.rows
    for batch in tqdm(sequential(store, config.batch_size, rows), desc="agreement (1:1 chunks)", leave=False):
        arrays = aligner({k: v.numpy() for k, v in batch.items()})
        batch = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "ui" else v).to(scorer.device)
                 for k, v in arrays.items()}
        ids = batch["input_ids"]
        hidden = scorer.head.hidden(ids)[:, :-1]
        logits = scorer.head.logits(hidden).float()[..., :scorer.vocab]
        n = logits.shape[0] * logits.shape[1]
        logits = logits.reshape(n, -1)
        parts = signal.positions(ids, batch)
        one_to_one, student_ids = parts[0], parts[1]
        divergence = signal.divergence(F.log_softmax(logits / t, dim=-1), ids[:, 1:].reshape(n), *parts)
        agree += float(((logits.argmax(-1) == student_ids[:, 0]) & one_to_one).sum())
        kl += float(divergence.sum())
        positions += float(one_to_one.sum())
    targets = signal.take_stats()
    return {"top1_1to1": agree / max(positions, 1), "kl_1to1": kl / max(positions, 1),
            "share_1to1": targets["cross_exact_share"], "temperature": t, "tokens_1to1": int(positions)}


# ------------------------------------------------------------------------------------------------
# lm-evaluation-harness, as a library


def harness_tasks(config: EvalConfig):
    """lm_eval's TaskManager over its own tasks and ``--harness-include``, with every ``--harness`` name
    found in it: checked before the model loads (indexing lm_eval's ~15k task names takes seconds)."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DistillError("--harness needs lm-evaluation-harness, which is not installed: pip install "
                           "'distill[lmeval]'") from None
    missing = [d for d in config.harness_include if not Path(d).is_dir()]
    if missing:
        raise DistillError(f"--harness-include {', '.join(missing)}: no such directory; pass directories of lm-eval "
                           "task YAMLs")
    manager = TaskManager(include_path=list(config.harness_include) or None)
    known = set(manager.all_tasks)
    unknown = [t for t in config.harness if t not in known and not Path(t).is_file()]
    if unknown:
        import difflib

        close = {t: difflib.get_close_matches(t, manager.all_tasks, n=3, cutoff=0.6) for t in unknown}
        named = "; ".join(f"{t} (did you mean {', '.join(close[t])}?)" if close[t] else t for t in unknown)
        where = f" or in {', '.join(config.harness_include)}" if config.harness_include else ""
        raise DistillError(f"unknown lm-eval task(s): {named}; lm_eval has no such task{where} "
                           "(python -m lm_eval ls tasks lists them; --harness-include DIR adds your own YAMLs)")
    return manager


def _config_hash(task_config: dict) -> str:
    """sha256 of a task's resolved lm-eval config (prompt, dataset, metrics, few-shot split): two
    results with the same hash and version ran the same task."""
    import hashlib

    text = json.dumps(task_config, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def harness_section(results: dict[str, Any], requested: tuple[str, ...], version: str,
                    options: dict[str, Any]) -> dict[str, Any]:
    """The eval JSON's ``harness`` section from what ``lm_eval.simple_evaluate`` returned: per task or
    group, ``metrics`` {name: {value, stderr}} (lm-eval's ``acc,none`` becomes ``acc``; another filter
    stays ``exact_match,strict-match``), higher_is_better, n_shot, version, config_hash and samples
    (lm-eval's n-samples: original and effective)."""
    tasks_out: dict[str, Any] = {}
    for name, row in results["results"].items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in row.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            stderr = row.get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name == "none" else key
            metrics[label] = {"value": float(value) if isinstance(value, (int, float)) else None,
                              "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        better = results.get("higher_is_better", {}).get(name, {})
        entry = {"metrics": metrics,
                 "higher_is_better": {m: better.get(m.split(",")[0], True) for m in metrics},
                 "n_shot": results.get("n-shot", {}).get(name), "version": results.get("versions", {}).get(name),
                 "samples": results.get("n-samples", {}).get(name)}
        if name in results.get("configs", {}):
            entry["config_hash"] = _config_hash(results["configs"][name])
        if name in results.get("group_subtasks", {}):
            entry["subtasks"] = list(results["group_subtasks"][name])
        tasks_out[name] = entry
    return {"lm_eval_version": version, "requested": list(requested), "tasks": tasks_out, "options": options}


def eval_harness(model, tokenizer, config: EvalConfig, manager, max_length: int) -> dict[str, Any]:
    """``config.harness`` run by lm_eval's own ``simple_evaluate`` on the model distill loaded (weights
    once; its dtype, device and trust_remote_code as distill's options say), through lm_eval's ``HFLM``;
    the eval JSON's ``harness`` section (:func:`harness_section`). Runs after the paper's tasks: lm_eval
    reseeds Python's, numpy's and torch's global generators."""
    from importlib.metadata import version

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, max_length=max_length,
              trust_remote_code=config.trust_remote_code)
    num_fewshot = None if config.harness_fewshot < 0 else config.harness_fewshot
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(config.harness), num_fewshot=num_fewshot,
                                          limit=config.limit or None, task_manager=manager, log_samples=False,
                                          fewshot_random_seed=config.seed)
    except ValueError as e:
        if not str(e).startswith("Duplicate task"):
            raise
        raise DistillError(f"--harness {','.join(config.harness)}: {e} (lm_eval runs a task once); drop the "
                           "task or the group that holds it") from None
    options = {"tasks": list(config.harness), "include_path": list(config.harness_include),
               "num_fewshot": num_fewshot, "limit": config.limit or None, "batch_size": config.batch_size,
               "device": str(model.device), "dtype": config.dtype, "max_length": max_length,
               "fewshot_random_seed": config.seed}
    return harness_section(results, config.harness, version("lm_eval"), options)


# ------------------------------------------------------------------------------------------------
# the command


def training_facts(model_dir: Path) -> dict[str, Any]:
    """How a model was trained, when ``distill student`` trained it (its run's metrics.json)."""
    for path in (model_dir / "training.json", model_dir / "metrics.json", model_dir.parent / "metrics.json"):
        if path.is_file() and (path.parent == model_dir or model_dir.name == "model"):
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            keep = ("alpha", "temperature", "tail", "direction", "teacher_source", "teacher_signal", "store_kind",
                    "cross_tokenizer", "tokens", "step", "heldout_loss", "heldout_ppl", "seed", "init")
            return {k: data[k] for k in keep if k in data}
    return {}


def run_eval(config: EvalConfig) -> dict[str, Any]:
    threads = set_threads(config.threads)  # before anything runs torch: see pipeline/threads.py
    model_dir = Path(config.model)
    if not has_weights(model_dir):
        raise DistillError(f"model {model_dir} is not a local Hugging Face directory with weights; check the path")
    out = Path(config.out)
    check_installed(config.report_to)
    check_task_files(config)
    harness_manager = harness_tasks(config) if config.harness else None
    agreement = agreement_teacher(config) if "agreement" in config.tasks else ()
    device = resolve_device(config.device)
    requested = config.dtype  # the report's config holds what it resolved to here
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, device))
    tf32 = set_tf32(device, config.tf32)
    tokenizer = load_tokenizer(str(model_dir), config.trust_remote_code)
    # ids of another tokenizer mean other tokens, even where there are as many of them: such a store is
    # compared across tokenizers, over 1:1 chunks (eval_agreement_across); one of this tokenizer must fit
    if agreement and agreement[0].params.get("tokenizer_hash") == tokenizer_hash(tokenizer):
        check_store_fits(agreement[0], "agreement store", tokenizer_hash(tokenizer), vocab_size(tokenizer))
    rules = None
    if config.rules:
        spec = load_rules(config.rules)
        rules = functools.cache(lambda stops, budget: Rules(spec, tokenizer, budget, stop=stops))
        for task in (t for t in QA_TASKS if t in config.tasks):  # compiled now: a rule error stops before any task
            definition = tasks.qa_definition(config.qa_format, task)
            if definition.scoring == "generate":
                rules(definition.stops, config.max_new_tokens or definition.max_new_tokens)
    model = load_model(model_dir, config.dtype, config.trust_remote_code,
                       attn_implementation=config.attn_implementation).to(device).eval()
    limit = max_positions(model.config) or 2048
    if config.max_length > limit:
        raise DistillError(f"--max-length {config.max_length} exceeds the model's {limit} positions; "
                           "lower it, or pass 0 for the model's maximum")
    scorer = Scorer(model, tokenizer, device, config.batch_size, config.max_length or limit)
    started = time.time()
    samples: list[dict] = []
    results: dict[str, Any] = {}
    for task in config.tasks:
        if task == "heldout":
            results[task] = eval_heldout(scorer, config, samples)
        elif task == "lambada":
            results[task] = eval_lambada(scorer, config, samples)
        elif task in ("hellaswag", "storycloze"):
            items = _limit(getattr(tasks, task)(getattr(config, task)), config.limit)
            results[task] = eval_choice(scorer, task, items, samples)
        elif task in QA_TASKS:
            results[task] = eval_qa(scorer, config, task, samples, rules)
        else:
            results[task] = eval_agreement(scorer, config, samples, *agreement)
        print(f"{task}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in results[task].items()))
    harness = eval_harness(model, tokenizer, config, harness_manager, scorer.max_length) if config.harness else None
    for task, entry in (harness or {}).get("tasks", {}).items():
        print(f"harness/{task}: " + "  ".join(f"{m} {v['value']:.4f}" for m, v in entry["metrics"].items()
                                              if v["value"] is not None))
    name = config.name or (model_dir.resolve().parent.name if model_dir.name == "model" else model_dir.resolve().name)
    report = {"name": name, "model": str(model_dir), "parameters": count_parameters(model),
              "tokenizer_hash": tokenizer_hash(tokenizer),  # distill report compares across tokenizers by bytes
              "training": training_facts(model_dir), "tasks": results, "seconds": time.time() - started,
              "config": to_dict(config)}
    if harness is not None:
        report["harness"] = harness
    report |= threads  # the number torch used, and where it came from
    report |= {"dtype_requested": requested, "tf32": tf32}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if config.log_samples:
        lines = "".join(json.dumps(s, default=float) + "\n" for s in samples)
        atomic_write_text(out.with_suffix(".samples.jsonl"), lines)
    tracker = Tracker(TrackerPaths.beside(out), config.report_to, {"stage": "eval", **report["config"], "name": name,
                      "parameters": report["parameters"], "training": report["training"]},
                      resume_step=None, name=name, group=name, job_type="eval")
    tracker.log(step=int(report["training"].get("step", 0)), **task_scalars(results))
    tracker.close()
    print(f"{out}: {name}, {len(results)} task(s) in {report['seconds']:.0f} s")
    return report


def task_scalars(results: dict[str, Any]) -> dict[str, float]:
    """Every task's numbers as ``task/metric`` (``heldout/bits_per_byte``, ``lambada/acc``, …)."""
    return {f"{task}/{metric}": value for task, metrics in results.items() if isinstance(metrics, dict)
            for metric, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}

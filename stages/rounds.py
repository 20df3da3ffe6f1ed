"""On-policy distillation in rounds (issue #25): the student writes, the teacher scores offline, the
student learns — with the teacher never in memory beside the student.

A round ``r`` (1 … R) is a chain of today's stages, each a batch job with its own resume:

1. ``prompts``: the round's slice of the training prompts (``--prompts-per-round`` of them, cycling
   through the file), split by λ (``--student-fraction``) into those the current student completes
   and those the teacher completes (GKD's mix; λ = 1 is purely on-policy, λ = 0 the paper's
   teacher-written text). The split is a seeded permutation of (seed, round): the same in any rerun.
2. ``generate-student`` / ``generate-teacher``: ``distill generate`` with round ``r − 1``'s student
   (or the teacher) as the model; every record keeps its token ids and the log-prob its sampling
   distribution gave each sampled token.
3. ``prepare``: ``distill prepare --format ids``: one example per row, the prompt masked out, the
   sampling log-probs kept as ``behaviour_logprob``.
4. ``teacher``: stage one over those exact tokens, writing the store the objective needs: ``sampled``
   draws for ``forward-kl``, a top-k + tail store for ``reverse-kl``, the teacher's log-prob of each
   token alone (``--kind target``, 4 bytes per token) for ``policy-gradient``; ``ce`` trains on the
   tokens and needs no teacher pass.
5. ``student``: stage two for ``--steps-per-round`` steps from round ``r − 1``'s student, with
   ``--resume auto`` (a fresh optimizer each round).
6. ``eval``: the new student completes the held-out prompts at T = 1 (fixed keys: the same prompts and
   uniforms every round), the teacher scores those tokens (``--kind target``), and the per-token
   reverse KL to the teacher is estimated from the student's own samples:
   ``KL(π ‖ p) ≈ mean over completion tokens of (log π(x) − log p(x))``, with its standard error over
   sequences; then ``distill eval`` on the tasks asked for.
7. ``finish``: ``round.json`` (atomic) — the round's numbers and teacher tokens spent so far. A round
   with ``round.json`` is skipped; round 0 is the eval of the starting student.

Every step writes under ``OUT/round-RRR/`` and is one of today's idempotent stage runs (a finished one
says "nothing to do"), so a run killed at any moment and run again ends as an uninterrupted one. The
step configs are saved as ``OUT/round-RRR/steps/STEP.json``: ``distill slurm --rounds`` submits the
same steps as chained jobs (``distill <stage> --config …``), and ``--round r --step s`` runs one step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from pipeline.config import check, load_config, option, required, to_dict
from pipeline.errors import DistillError
from pipeline.io import atomic_write_text
from pipeline.models import (ATTN_HELP, AUTO_DTYPE_HELP, TF32_HELP, attn_implementation_problems, device_problems,
                             dtype_problems, has_weights)
from pipeline.threads import THREADS_HELP, threads_problems
from pipeline.train.tracking import REPORT_TO_HELP, Tracker, TrackerPaths, check_installed, report_to_problems

OBJECTIVES = ("forward-kl", "reverse-kl", "policy-gradient", "ce")
STORE_KIND = {"forward-kl": "sampled", "reverse-kl": "topk", "policy-gradient": "target", "ce": ""}
STEPS = ("prompts", "generate-student", "generate-teacher", "prepare", "teacher", "student",
         "heldout-generate", "heldout-prepare", "heldout-teacher", "eval", "finish")
# options a rerun may change without changing what any round computes (how the steps compute, as --device:
# --attn-implementation moves scores by float rounding only; dtype and tf32 too, each step's own params record
# the resolved dtype, so a step is never finished in another)
RERUN_FREE = ("rounds", "round", "step", "device", "threads", "attn_implementation", "eval_tasks", "eval_limit",
              "eval_options", "reference", "report_to", "dtype", "tf32")
COUNTS = ("tokens", "bytes", "documents", "items", "seconds")  # eval facts that are not scores
STAGE_OPTIONS = ("generate_options", "teacher_options", "student_options", "eval_options")


def _mapping(help: str) -> Any:
    return dataclasses.field(default=None, metadata={"help": help, "file_only": True})


@dataclass(frozen=True)
class RoundsConfig:
    out: str = option("", "Output directory: round-RRR/{prompts,gen-*,tokens,store,student,eval,steps}, "
                      "round-RRR/round.json, rounds.json (every round), rounds.md and a figure.")
    prompts: str = option("", "Training prompts: JSONL (the prompt under --prompt-field) or text, one per line.")
    heldout_prompts: str = option("", "Held-out prompts, completed by each round's student to estimate its reverse "
                                  "KL to the teacher.")
    prompt_field: str = option("prompt", "JSONL field that holds the prompt.")
    teacher: str = option("data/models/teacher", "Local Hugging Face teacher directory (with weights).")
    student: str = option("", "The starting student: a local Hugging Face directory with weights (round 0).")
    tokenizer: str = option("", "Tokenizer directory shared by teacher and student (default: the teacher's).")
    rounds: int = option(3, "Rounds R (0: only the starting student's held-out eval; a rerun with a larger R "
                         "continues after the last finished round).")
    prompts_per_round: int = option(0, "Training prompts per round, taken in order and cycling (0 = all, every round).")
    student_fraction: float = option(1.0, "λ: the share of a round's prompts the student completes (the rest the "
                                     "teacher writes); 1 = on-policy, 0 = teacher-written text (off-policy).")
    samples_per_prompt: int = option(1, "Completions per prompt.")
    max_new_tokens: int = option(64, "Completion tokens at most (EOS stops earlier).")
    generation_temperature: float = option(1.0, "Temperature the student and teacher write at (the held-out "
                                           "estimate always samples at 1).")
    objective: str = option("reverse-kl", "forward-kl (KL(teacher‖student), GKD β = 0, from a sampled store), "
                            "reverse-kl (KL(student‖teacher), exact on the top-k, a tail bucket beyond), "
                            "policy-gradient (the sampled-token form: advantage log p_teacher − log p_student, "
                            "importance ratio clipped) or ce (cross-entropy on the round's text, no teacher pass).")
    alpha: Optional[float] = option(None, "Weight of CE on the round's tokens (default: 0, or 1 for --objective ce; "
                                    "0.5 is the paper's FD step on teacher-written text).")
    temperature: float = option(1.0, "Distillation temperature of forward-kl / reverse-kl.")
    samples: int = option(32, "Draws per position of forward-kl's sampled store.")
    top_k: int = option(64, "Kept teacher ids per position of reverse-kl's store.")
    seq_len: int = option(0, "Tokens per row (0 = the longest prompt + --max-new-tokens + 1, found from the prompts).")
    steps_per_round: int = option(50, "Student optimizer steps per round (E).")
    micro_batch_size: int = option(16, "Rows per student step.")
    lr: float = option(3e-4, "Student learning rate (constant within a round after --warmup-steps).")
    warmup_steps: int = option(0, "Linear warmup steps at the start of each round.")
    heldout_samples: int = option(1, "Completions per held-out prompt for the reverse-KL estimate.")
    eval_tasks: tuple[str, ...] = option(("heldout",), "`distill eval` tasks after each round (empty: none).")
    eval_limit: int = option(0, "At most this many items per eval task (0 = all).")
    reference: tuple[str, ...] = option((), "OUT directories of other rounds runs (e.g. λ = 0, off-policy) whose "
                                        "curves rounds.png draws beside this one's.")
    seed: int = option(0, "Seed: prompt split, generation keys, stage-one draws and data order follow from it.")
    round: int = option(0, "Run only this round (with --step: one step of it; SLURM's jobs do this).")
    step: str = option("", f"Run only this step of --round: {', '.join(STEPS)}.")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N' for every step.")
    threads: int = option(0, THREADS_HELP)
    report_to: tuple[str, ...] = option(("jsonl",), REPORT_TO_HELP + " For rounds: a record per finished round "
                                        "(its step), OUT/metrics.jsonl; each round's training logs to its own "
                                        "student/ (report_to under student_options).")
    attn_implementation: str = option("auto", ATTN_HELP + " Every step's models: the generating student and "
                                      "teacher, stage one, the trained student, eval.")
    dtype: str = option("auto", "Compute dtype of every generate, stage-one, training (autocast) and eval step: auto, "
                        "float32 or bfloat16, resolved by each step where it runs. " + AUTO_DTYPE_HELP)
    tf32: bool = option(True, TF32_HELP + " For every step.")
    generate_options: Any = _mapping("Config file only: more `distill generate` options for every generate step.")
    teacher_options: Any = _mapping("Config file only: more `distill teacher` options for every stage-one step.")
    student_options: Any = _mapping("Config file only: more `distill student` options for every training step "
                                    "(e.g. ratio, ratio_epsilon).")
    eval_options: Any = _mapping("Config file only: more `distill eval` options.")

    def __post_init__(self):
        problems = required(self, "out", "prompts", "heldout_prompts", "student") + report_to_problems(self.report_to)
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 <= self.student_fraction <= 1.0:
            problems.append(f"student_fraction (λ) must be in [0, 1], got {self.student_fraction}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.objective == "policy-gradient" and self.temperature != 1.0:
            problems.append("policy-gradient scores the sampled tokens at T = 1; drop --temperature")
        for name in ("samples_per_prompt", "max_new_tokens", "steps_per_round", "micro_batch_size",
                     "samples", "top_k", "heldout_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("rounds", "prompts_per_round", "seq_len", "warmup_steps", "eval_limit", "round", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.generation_temperature > 0 or not self.temperature > 0 or not self.lr > 0:
            problems.append("generation_temperature, temperature and lr must be positive")
        if self.step and self.step not in STEPS:
            problems.append(f"step must be one of {', '.join(STEPS)}, got {self.step!r}")
        if self.step and not self.round and self.step not in STEPS[6:]:
            problems.append(f"--step {self.step} needs --round R (1 or more)")
        for name in STAGE_OPTIONS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                problems.append(f"{name} must be a mapping of option: value, got {type(value).__name__}")
        problems += self._sampler_problems()
        problems += dtype_problems(self.dtype, ("float32", "bfloat16"))  # the student's autocast has no float16
        problems += device_problems(self.device) + threads_problems(self.threads)
        problems += attn_implementation_problems(self.attn_implementation, self.device)
        check(problems, "rounds")

    def _sampler_problems(self) -> list[str]:
        """The policy gradient's ratio corrects only a sampler with full support (docs/DESIGN.md; stage two
        refuses any other store): generate options that truncate or constrain the round's writers are
        refused here, before a round spends a generate and a stage-one pass, unless the student's
        ``allow_biased_sampler`` says to train on them anyway."""
        generate, student = self.generate_options, self.student_options
        if self.objective != "policy-gradient" or not isinstance(generate, dict) \
                or isinstance(student, dict) and student.get("allow_biased_sampler"):
            return []
        biased = [f"{name} {generate[name]:g}" for name, off in (("top_p", 1), ("top_k", 0))
                  if type(generate.get(name)) in (int, float) and generate[name] != off]
        if generate.get("rules"):
            biased.append(f"rules {generate['rules']}")
        if not biased:
            return []
        return [f"--objective policy-gradient cannot correct a sampler with generate_options {', '.join(biased)} "
                "(its ratio reweights only what the sampler can draw); drop them (top_p 1, top_k 0, no rules), or "
                "use --objective reverse-kl, or set student_options allow_biased_sampler: true to train on them "
                "anyway"]

    @property
    def alpha_value(self) -> float:
        return self.alpha if self.alpha is not None else (1.0 if self.objective == "ce" else 0.0)


# ---------------------------------------------------------------------- where things go


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:03d}"


def student_model(config: RoundsConfig, out: Path, r: int) -> str:
    """The student after round ``r`` (round 0: the starting one)."""
    return config.student if r == 0 else str(round_dir(out, r) / "student" / "model")


@dataclass
class Step:
    """One step of one round: a stage and its config (``None`` for the rounds' own steps), and whether
    it is already done."""

    name: str
    stage: str  # the distill command, or "rounds" for prompts / finish
    config: Any
    done: Callable[[], bool]


# the held-out estimate must sample the student's own distribution at T = 1 and store only the teacher's
# log-probs: of the user's generate and teacher options it takes those that change neither
HELDOUT_GENERATE_DROPS = ("top_k", "top_p", "rules", "max_attempts")
HELDOUT_TEACHER_KEEPS = ("batch_size", "position_chunk", "rows_per_shard", "chunk_rows", "backend", "kernel",
                         "device_map", "max_memory", "trust_remote_code", "on_preempt", "overlap")


def _stage(cls, options: dict | None, **values) -> Any:
    """A stage's config from this round's values, the user's extra options for that stage on top."""
    extra = dict(options or {})
    clash = sorted(set(extra) & set(values))
    if clash:
        raise DistillError(f"rounds: {', '.join(clash)} in the stage options are set by the rounds themselves; "
                           "set them through the rounds config instead")
    return load_config(cls, **{**values, **extra})


def steps(config: RoundsConfig, out: Path, r: int, seq_len: int) -> list[Step]:
    """The steps of round ``r`` in order (round 0: the held-out eval of the starting student)."""
    from stages.eval import EvalConfig
    from stages.generate import GenerateConfig
    from stages.prepare import PrepareConfig
    from stages.student import TrainConfig
    from stages.teacher import TeacherConfig

    d = round_dir(out, r)
    common = {"device": config.device, "threads": config.threads, "attn_implementation": config.attn_implementation,
              "dtype": config.dtype, "tf32": config.tf32}
    tokenizer = config.tokenizer or config.teacher
    result: list[Step] = []

    def generate(name, prompts, field, model, gen_out, seed, temperature, samples, heldout=False):
        options = {k: v for k, v in (config.generate_options or {}).items()
                   if not (heldout and k in HELDOUT_GENERATE_DROPS)}
        return Step(name, "generate", _stage(
            GenerateConfig, options, prompts=str(prompts), prompt_field=field, model=model,
            tokenizer=tokenizer, temperature=temperature, max_new_tokens=config.max_new_tokens,
            samples_per_prompt=samples, seed=seed, out=str(gen_out), **common),
            lambda: (gen_out / "summary.json").is_file())

    def stage_one(name, tokens, store, kind):
        # draws are made at the distillation temperature (a sampled store re-tempers only with stored
        # log-probs); a top-k store caches at 1 and re-tempers exactly to any T of its grid
        cache = float(config.temperature) if kind == "sampled" else 1.0
        values = {"tokens_store": str(tokens), "teacher": config.teacher, "tokenizer": tokenizer, "kind": kind,
                  "out": str(store), "seed": config.seed * 1000 + r, "temperature": cache}
        grid = sorted({1.0, float(config.temperature)}) if kind != "target" else [1.0]
        values["temperature_grid"] = tuple(grid)
        if kind == "sampled":
            values["samples"] = config.samples
        if kind == "topk":
            values["top_k"] = config.top_k
        options = {k: v for k, v in (config.teacher_options or {}).items()
                   if kind != "target" or name != "heldout-teacher" or k in HELDOUT_TEACHER_KEEPS}
        return Step(name, "teacher", _stage(TeacherConfig, options, **values, **common),
                    lambda: (store / "index.json").is_file())

    def prepare(name, inputs, tokens):
        return Step(name, "prepare", _stage(PrepareConfig, None, inputs=tuple(str(i) for i in inputs), format="ids",
                                            tokenizer=tokenizer, seq_len=seq_len, out=str(tokens)),
                    lambda: (tokens / "index.json").is_file())

    if r > 0:
        split = _split(config, r)
        result.append(Step("prompts", "rounds", None, lambda: (d / "prompts.json").is_file()))
        inputs = []
        for who, model, offset in (("student", student_model(config, out, r - 1), 0), ("teacher", config.teacher, 1)):
            if split[who]:
                gen_out = d / f"gen-{who}"
                result.append(generate(f"generate-{who}", d / f"prompts-{who}.jsonl", "prompt", model, gen_out,
                                       (config.seed * 1000 + r) * 2 + offset, config.generation_temperature,
                                       config.samples_per_prompt))
                inputs.append(gen_out / "generated.jsonl")
        result.append(prepare("prepare", inputs, d / "tokens"))
        kind = STORE_KIND[config.objective]
        train_store = d / "tokens"
        if kind:
            result.append(stage_one("teacher", d / "tokens", d / "store", kind))
            train_store = d / "store"
        student_out = d / "student"
        values = {"train_store": str(train_store), "model": student_model(config, out, r - 1), "init": "auto",
                  "tokenizer": tokenizer, "alpha": config.alpha_value, "temperature": config.temperature,
                  "out": str(student_out), "seed": config.seed * 1000 + r, "micro_batch_size": config.micro_batch_size,
                  "max_steps": config.steps_per_round, "lr": config.lr, "warmup_steps": config.warmup_steps,
                  "min_lr_ratio": 1.0, "eval_every": 0, "resume": "auto", **common}
        if config.objective != "ce":
            values["objective"] = config.objective
        result.append(Step("student", "student", _stage(TrainConfig, config.student_options, **values),
                           lambda: (student_out / "metrics.json").is_file() and has_weights(student_out / "model")))
    model = student_model(config, out, r)
    ev = d / "eval"
    result.append(generate("heldout-generate", Path(config.heldout_prompts), config.prompt_field, model, ev / "gen",
                           config.seed * 1000 + 999, 1.0, config.heldout_samples, heldout=True))
    result.append(prepare("heldout-prepare", [ev / "gen" / "generated.jsonl"], ev / "tokens"))
    result.append(stage_one("heldout-teacher", ev / "tokens", ev / "store", "target"))
    if config.eval_tasks:
        result.append(Step("eval", "eval", _stage(
            EvalConfig, config.eval_options, model=model, out=str(ev / "tasks.json"), tasks=config.eval_tasks,
            name=f"round-{r:03d}", limit=config.eval_limit, **common),
            lambda: (ev / "tasks.json").is_file()))
    result.append(Step("finish", "rounds", None, lambda: (d / "round.json").is_file()))
    return result


# ---------------------------------------------------------------------- the rounds' own steps


def read_prompts(path: str, field: str) -> list[str]:
    """A prompts file read as ``distill generate`` reads it."""
    from stages.generate import GenerateConfig
    from stages.generate import read_prompts as generate_prompts

    return generate_prompts(GenerateConfig(prompts=path, prompt_field=field, out="-"))


def _slice(config: RoundsConfig, r: int, total: int) -> list[int]:
    """Indices of round ``r``'s prompts: the next ``prompts_per_round`` in order, cycling."""
    per = config.prompts_per_round or total
    return [((r - 1) * per + i) % total for i in range(per)]


def _split(config: RoundsConfig, r: int) -> dict[str, list[int]]:
    """Round ``r``'s prompt indices by who completes them: round(λ·P) of them, chosen by a permutation
    seeded by (seed, round), go to the student."""
    total = len(read_prompts(config.prompts, config.prompt_field))
    chosen = _slice(config, r, total)
    order = np.random.default_rng([config.seed, r]).permutation(len(chosen))
    n_student = math.floor(config.student_fraction * len(chosen) + 0.5)  # halves up, not to even
    to_student = set(order[:n_student].tolist())
    return {"student": [chosen[i] for i in range(len(chosen)) if i in to_student],
            "teacher": [chosen[i] for i in range(len(chosen)) if i not in to_student]}


def write_prompts(config: RoundsConfig, out: Path, r: int) -> None:
    d = round_dir(out, r)
    prompts = read_prompts(config.prompts, config.prompt_field)
    split = _split(config, r)
    for who, indices in split.items():
        text = "".join(json.dumps({"prompt": prompts[i], "index": i}, ensure_ascii=False) + "\n" for i in indices)
        atomic_write_text(d / f"prompts-{who}.jsonl", text)
    if config.student_fraction > 0 and not split["student"]:
        print(f"round {r}: warning: λ = {config.student_fraction:g} of {sum(map(len, split.values()))} prompts rounds "
              "to none for the student; this round is teacher-written only")
    atomic_write_text(d / "prompts.json", json.dumps({k: len(v) for k, v in split.items()}, indent=2) + "\n")


def reverse_kl_estimate(store_path: Path, samples_per_prompt: int = 1) -> dict[str, Any]:
    """Per-token reverse KL of the sampler to the teacher from a ``target`` store of the sampler's own
    completions (one row per record, records in order: prompt · S + sample): the mean of
    ``behaviour_logprob − target_logprob`` over completion tokens, a consistent (ratio) estimate of
    E_t KL(π_t ‖ p_t) per token when the completions were drawn at T = 1 without filtering; its
    standard error over prompts (a prompt's S completions and a sequence's tokens are not independent;
    None with fewer than two prompts); and the per-sequence sum's mean."""
    from pipeline.store.contract import open_store

    store = open_store(store_path)
    per_row, tokens = [], []
    for i in range(len(store.index["shards"])):
        arrays = store.read_shard(i)
        mask = arrays["loss_mask"].astype(bool)
        diff = np.where(mask, arrays["behaviour_logprob"].astype(np.float64) - arrays["target_logprob"], 0.0)
        per_row.extend(diff.sum(axis=1).tolist())
        tokens.extend(mask.sum(axis=1).tolist())
    row_sum, row_n = np.asarray(per_row), np.asarray(tokens, dtype=np.float64)
    if not row_n.sum():
        raise DistillError(f"{store_path}: no completion tokens to estimate the reverse KL from; "
                           "raise --max-new-tokens or check the held-out prompts")
    groups = np.arange(len(row_sum)) // samples_per_prompt  # a prompt's completions are one cluster
    seq, n = np.bincount(groups, row_sum), np.bincount(groups, row_n)
    seq, n = seq[n > 0], n[n > 0]
    per_token = float(seq.sum() / n.sum())
    resid = seq - per_token * n  # the ratio estimator's linearised residuals, per prompt
    stderr = float(math.sqrt((resid ** 2).sum() / (len(seq) - 1) / len(seq)) / n.mean()) if len(seq) > 1 else None
    sequences = row_n > 0
    return {"reverse_kl_per_token": per_token, "reverse_kl_stderr": stderr,
            "reverse_kl_per_sequence": float(row_sum[sequences].mean()), "heldout_sequences": int(sequences.sum()),
            "heldout_prompts": int(len(seq)), "heldout_tokens": int(row_n.sum())}


def generated_tokens(path: Path) -> tuple[int, int]:
    """(prompt + completion tokens, completion tokens) of a generate output's records."""
    total = completion = 0
    summary = path / "generated.jsonl"
    if not summary.is_file():
        return 0, 0
    with open(summary, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            total += len(record["prompt_ids"]) + len(record["completion_ids"])
            completion += len(record["completion_ids"])
    return total, completion


def finish_round(config: RoundsConfig, out: Path, r: int, started: float) -> dict[str, Any]:
    d = round_dir(out, r)
    result: dict[str, Any] = {"round": r, "objective": config.objective, "student_fraction": config.student_fraction,
                              "seed": config.seed, "model": student_model(config, out, r)}
    result |= reverse_kl_estimate(d / "eval" / "store", config.heldout_samples)
    result["eval"] = {"tasks": list(config.eval_tasks), "limit": config.eval_limit}
    if (d / "eval" / "tasks.json").is_file():
        tasks = json.loads((d / "eval" / "tasks.json").read_text())
        result["tasks"] = tasks["tasks"]
    scored = student_written = teacher_written = 0
    if r > 0:
        s_total, s_completion = generated_tokens(d / "gen-student")
        t_total, t_completion = generated_tokens(d / "gen-teacher")
        student_written, teacher_written = s_completion, t_completion
        scored = s_total + t_total if STORE_KIND[config.objective] else 0
        metrics = d / "student" / "metrics.json"
        if metrics.is_file():
            result["student_metrics"] = json.loads(metrics.read_text())
    previous = json.loads((round_dir(out, r - 1) / "round.json").read_text()) if r > 0 else {}
    result |= {"teacher_scored_tokens": scored, "teacher_written_tokens": teacher_written,
               "student_written_tokens": student_written,
               "teacher_scored_total": previous.get("teacher_scored_total", 0) + scored,
               "teacher_tokens_total": previous.get("teacher_tokens_total", 0) + scored + teacher_written,
               "seconds": round(time.time() - started, 1)}
    atomic_write_text(d / "round.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


# ---------------------------------------------------------------------- the run


def derive_seq_len(config: RoundsConfig) -> int:
    """The longest prompt (tokens, BOS included) + the completion budget + 1 (the sampled EOS)."""
    from pipeline.text.tokenizer import load_tokenizer
    from stages.generate import tokenize_prompts

    tokenizer = load_tokenizer(config.tokenizer or config.teacher,
                               bool((config.generate_options or {}).get("trust_remote_code", False)))
    longest = 0
    for path in (config.prompts, config.heldout_prompts):
        ids = tokenize_prompts(read_prompts(path, config.prompt_field), tokenizer, add_bos=True)
        longest = max(longest, max(len(i) for i in ids))
    return longest + config.max_new_tokens + 1


def _claim(config: RoundsConfig, out: Path) -> int:
    """Check OUT against an earlier run of these rounds (same options but those a rerun may change);
    return the row length."""
    saved = out / "config.json"
    body = {k: v for k, v in to_dict(config).items() if k not in RERUN_FREE}
    if saved.is_file():
        before = json.loads(saved.read_text())
        differ = sorted(k for k in set(body) | set(before["config"]) if body.get(k) != before["config"].get(k))
        if differ:
            raise DistillError(f"{out} holds rounds run with other options ({', '.join(differ)}); use another --out "
                               "or the same options (only rounds, device, threads and eval options may change)")
        return before["seq_len"]
    seq_len = config.seq_len or derive_seq_len(config)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps({"stage": "RoundsConfig", "config": body, "seq_len": seq_len},
                                        indent=2, sort_keys=True) + "\n")
    return seq_len


def run_step(config: RoundsConfig, out: Path, r: int, step: Step, started: float) -> None:
    from stages import eval as eval_stage
    from stages import generate, prepare, student, teacher

    if step.name == "prompts":
        write_prompts(config, out, r)
    elif step.name == "finish":
        finish_round(config, out, r, started)
    else:
        run = {"generate": generate.generate, "prepare": prepare.prepare, "teacher": teacher.run_teacher,
               "student": student.train, "eval": eval_stage.run_eval}[step.stage]
        run(step.config)


def save_steps(out: Path, r: int, round_steps: list[Step]) -> None:
    """Each step's resolved stage config, as ``distill <stage> --config`` reads it."""
    for step in round_steps:
        if step.config is not None:
            body = {k: v for k, v in to_dict(step.config).items() if v is not None}
            atomic_write_text(round_dir(out, r) / "steps" / f"{step.name}.json",
                              json.dumps(body, indent=2, sort_keys=True) + "\n")


def run_rounds(config: RoundsConfig) -> list[dict[str, Any]]:
    """``distill rounds``: rounds 0 … R (or the one step asked for), skipping what is finished."""
    out = Path(config.out)
    if not has_weights(Path(config.student)):
        raise DistillError(f"student {config.student} is not a local Hugging Face directory with weights; "
                           "pretrain one first (make pretrain-student, or distill train)")
    check_installed(config.report_to)
    seq_len = _claim(config, out)
    wanted = [config.round] if config.round or config.step else range(config.rounds + 1)
    if config.round and not (round_dir(out, config.round - 1) / "round.json").is_file():
        raise DistillError(f"--round {config.round}: round {config.round - 1} is not finished in {out} "
                           f"(no round-{config.round - 1:03d}/round.json); run the rounds before it first")
    tracker = rounds_tracker(config, out, seq_len) if config.step in ("", "finish") else None
    try:
        _run_rounds(config, out, seq_len, wanted, tracker)
    finally:
        if tracker is not None:
            tracker.close()
    return summarize(config, out)


def rounds_tracker(config: RoundsConfig, out: Path, seq_len: int) -> Tracker:
    """OUT's metrics log and sinks: one record per round at step = the round, continuing after the
    rounds already finished (a rerun, or a later --rounds)."""
    finished = -1
    while (round_dir(out, finished + 1) / "round.json").is_file():
        finished += 1
    return Tracker(TrackerPaths.in_dir(out), config.report_to,
                   {"stage": "rounds", **to_dict(config), "seq_len": seq_len},
                   resume_step=finished if finished >= 0 else None, name=out.name, job_type="rounds")


def round_record(result: dict[str, Any]) -> dict[str, Any]:
    """A finished round's numbers for the metrics: its reverse KL (and standard error), teacher tokens so
    far, and every eval task's scores as ``eval/TASK/METRIC``."""
    keys = ("reverse_kl_per_token", "reverse_kl_stderr", "reverse_kl_per_sequence", "teacher_scored_total",
            "teacher_tokens_total", "student_written_tokens", "teacher_written_tokens")
    record = {"step": result["round"], **{k: result[k] for k in keys if result.get(k) is not None}}
    for task, metrics in result.get("tasks", {}).items():
        if isinstance(metrics, dict):
            record |= {f"eval/{task}/{m}": v for m, v in metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and m not in COUNTS}
    return record


def _run_rounds(config: RoundsConfig, out: Path, seq_len: int, wanted, tracker: Tracker | None) -> None:
    for r in wanted:
        d = round_dir(out, r)
        finished_before = (d / "round.json").is_file()
        if finished_before and not config.step:
            print(f"round {r}: finished; skipped")
            continue
        started = time.time()
        round_steps = steps(config, out, r, seq_len)
        save_steps(out, r, round_steps)
        for step in round_steps:
            if config.step and step.name != config.step:
                continue
            if step.done():
                continue
            print(f"round {r}: {step.name}", flush=True)
            d.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            run_step(config, out, r, step, started)
            print(f"round {r}: {step.name} took {time.time() - t0:.1f} s", flush=True)
        if tracker is not None and not finished_before and (d / "round.json").is_file():  # finished now
            tracker.log(**round_record(json.loads((d / "round.json").read_text())))
        if not config.step:
            result = json.loads((d / "round.json").read_text())
            print(f"round {r}: reverse KL to the teacher {_estimate(result)} nats/token; teacher tokens so far "
                  f"{result['teacher_tokens_total']}")


def _estimate(result: dict[str, Any]) -> str:
    stderr = result["reverse_kl_stderr"]
    return f"{result['reverse_kl_per_token']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def summarize(config: RoundsConfig, out: Path) -> list[dict[str, Any]]:
    """``rounds.json`` and ``rounds.md`` over the finished rounds, and the curve of reverse KL against
    teacher tokens (``rounds.png``)."""
    results = []
    r = 0
    while (round_dir(out, r) / "round.json").is_file():
        results.append(json.loads((round_dir(out, r) / "round.json").read_text()))
        r += 1
    if not results:
        return results
    atomic_write_text(out / "rounds.json", json.dumps(results, indent=2, sort_keys=True) + "\n")
    task_metrics = sorted({f"{task}/{m}" for res in results for task, ms in res.get("tasks", {}).items()
                           if isinstance(ms, dict) for m, v in ms.items()
                           if isinstance(v, float) and m not in COUNTS})
    lines = [f"# Rounds: {config.objective}, λ = {config.student_fraction:g}, seed {config.seed}", "",
             "| round | teacher tokens | reverse KL (nats/token) | " + " | ".join(task_metrics) + " |",
             "|---|---|---|" + "---|" * len(task_metrics)]
    for res in results:
        cells = []
        for tm in task_metrics:
            task, metric = tm.split("/", 1)
            value = res.get("tasks", {}).get(task, {}).get(metric)
            cells.append("" if value is None else f"{value:.4g}")
        lines.append(f"| {res['round']} | {res['teacher_tokens_total']} | {_estimate(res)} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "rounds.md", "\n".join(lines) + "\n")
    curves = {f"{config.objective}, λ = {config.student_fraction:g} (this run)": results}
    for other in config.reference:
        done = Path(other) / "rounds.json"
        if not done.is_file():
            raise DistillError(f"--reference {other} holds no rounds.json; pass the OUT of a finished `distill rounds`")
        theirs = json.loads(done.read_text())
        curves[f"{theirs[0]['objective']}, λ = {theirs[0]['student_fraction']:g} ({other})"] = theirs
    figure(curves, out / "rounds.png")
    return results


def figure(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Held-out reverse KL (± its standard error) against teacher-scored tokens, one curve per run."""
    from stages.report import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    for label, results in curves.items():
        ax.errorbar([r["teacher_scored_total"] / 1e3 for r in results], [r["reverse_kl_per_token"] for r in results],
                    yerr=[r["reverse_kl_stderr"] or 0.0 for r in results], marker="o", ms=3, capsize=2, label=label)
    ax.set_xlabel("teacher-scored tokens (thousands)")
    ax.set_ylabel("held-out reverse KL to the teacher\n(nats/token, ± s.e.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)


def rounds_command(config: RoundsConfig) -> None:
    run_rounds(config)

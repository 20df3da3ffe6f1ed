"""Stage two: train a student — the one training loop of distill.

setup → loop → finish, top to bottom. The loss is

    L = α·CE(y, student) + (1 − α)·T²·D(teacher_T, student_T)

where the teacher comes from

- a stage-one store (offline, the default use; the teacher's weights are never loaded): a
  ``sampled`` store's draws (stage one's default) or a hybrid store's top-k plus drawn tail, the
  draws reweighted to T where T is not the temperature they were drawn at
  (:class:`pipeline.train.teacher_signal.StoredSampled`); or a ``topk`` store's sparse predictions,
  re-tempered exactly to T, with ``--tail``'s treatment of the rest;
- ``--teacher DIR`` (online): the teacher in memory, full vocabulary — the baseline offline mode is
  measured against;
- nothing: a ``tokens`` store trains with cross-entropy alone (α = 1). This is how the shipped
  teacher and the same-size-from-scratch baseline are trained.

The student's body runs once per micro-batch; its output head and the losses run on chunks of
positions (recomputed in backward when there is more than one chunk), so memory holds one chunk's
``[chunk, V]`` tensors rather than several ``[B, L, V]``. Runs under ``torchrun`` (DDP; ``--fsdp``
shards the student), the ranks splitting each global batch's rows (how: ``pipeline/train/distributed.py``).
Checkpoints hold model, optimizer, scheduler, step, RNG state and data position: ``--resume auto``
continues exactly, on CPU with the same seed to the same weights as an uninterrupted run, and on
another number of processes to the same global batches.

Pre-emption (``pipeline/preempt.py``): on SIGUSR1 or SIGTERM, to any rank, every rank finishes the
step it is in (the signal rides on the step's all-reduce, so they agree on which), rank 0 writes a
checkpoint there and ``OUT/preempted.json``, and the run exits with status 75; ``--resume auto``
continues it to the same weights and metrics log as a run never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import preempt
from pipeline.checks import check_output_rows, check_store_fits
from pipeline.config import check, option, required, save_resolved, to_dict
from pipeline.errors import DistillError
from pipeline.io import atomic_write_text, disk_full_is_an_error, remove_leftovers, removed_if_failed, replace_dir
from pipeline.models import (ATTN_HELP, AUTO_DTYPE_HELP, DTYPES, TF32_HELP, OutputHead, attn_implementation,
                             attn_implementation_problems, check_document_attention, compile_layers, compile_seconds,
                             count_parameters, device_problems, dtype_problems, enable_gradient_checkpointing,
                             has_weights, hf_config, load_model, max_positions, resolve_device, resolve_dtype, set_tf32)
from pipeline.outdir import RUN, claim, clear
from pipeline.store.contract import Store, open_store
from pipeline.text.packing import ATTENTIONS, RowRule
from pipeline.text.tokenizer import load_tokenizer, tokenizer_hash, vocab_size
from pipeline.threads import THREADS_HELP, set_threads, threads_problems
from pipeline.train import checkpoint, distributed
from pipeline.train.init import init_from_teacher_layers
from pipeline.train.loader import Loader, sequential
from pipeline.train.losses import DIRECTIONS, TAIL_MODES, chunked_sum
from pipeline.train.metrics import target_bytes, token_byte_lengths
from pipeline.train.onpolicy import RATIO_MODES, sampler_bias
from pipeline.train.teacher_signal import (OnlineTeacher, StoredPolicyGradient, StoredSampled, StoredTopK,
                                           TeacherSignal, stored_teacher)
from pipeline.train.tracking import (PEAK_TFLOPS_HELP, REPORT_TO_HELP, StepCost, Tracker, TrackerPaths,
                                     check_installed, peak_tflops_problems, report_to_problems, teacher_signal_scalars)

# Changing any of these under a checkpoint would silently change what "resume" means.
# The global batch is fixed too (checked in _resume); micro-batch, accumulation and processes may change.
RESUME_FIXED = ("train_store", "model", "seed", "alpha", "temperature",
                "tail", "direction", "importance", "teacher", "shuffle_chunks", "cross_tokenizer", "chunk_weight",
                "chunk_scope", "unmapped", "cross_longer", "cross_positions", "cross_uncovered", "objective", "ratio",
                "ratio_epsilon")
# resume-fixed options that older checkpoints do not record
ADDED_SINCE = {"importance": "unbiased", "cross_tokenizer": "", "chunk_weight": 1.0, "chunk_scope": "all",
               "unmapped": "bucket", "cross_longer": "bucket",
               "cross_positions": "1to1", "cross_uncovered": "none",
               "objective": "", "ratio": "clip", "ratio_epsilon": 0.2}
OBJECTIVES = ("forward-kl", "reverse-kl", "policy-gradient")
PREEMPTED = "preempted.json"  # in OUT while a pre-empted run waits to be continued (preempt.py)


@dataclass(frozen=True)
class TrainConfig:
    train_store: str = option("", "Store to train from: a stage-one store ('sampled', 'topk' or hybrid: offline "
                              "distillation) or a 'tokens' store (CE, or online with --teacher).")
    eval_store: str = option("", "Held-out store for periodic evaluation of next-token loss (optional).")
    model: str = option("data/models/student.json", "Student: a model config file (scratch) or a local HF directory.")
    init: str = option("auto", "'auto' (weights when MODEL is a directory holding them, else scratch), 'scratch', "
                       "or 'teacher-layers' (every other layer of the teacher; architectures must match).")
    init_teacher: str = option("", "Teacher directory for --init teacher-layers (default: the store's teacher).")
    teacher: str = option("", "Online distillation: a local HF teacher kept in memory (full vocabulary).")
    alpha: Optional[float] = option(None, "Weight of CE against the true tokens (default 0.5 when distilling, "
                                    "1 for a tokens store without --teacher).")
    temperature: float = option(1.0, "Distillation temperature T (offline: any temperature of the store's grid).")
    tail: str = option("tail", "Top-k teacher support: 'renorm', 'tail' (exact residual bucket; on a hybrid store, the "
                       "tail mass spread over the drawn tail ids) or 'residual-label'. Not read for a sampled "
                       "store's draws.")
    direction: str = option("forward", "'forward' KL(teacher‖student) or 'reverse' KL(student‖teacher) (paper Eq. 1).")
    objective: str = option("", "On-policy distillation (student-written text): 'forward-kl' (GKD, beta 0; as "
                            "--direction forward), 'reverse-kl' (KL(student‖teacher) from a top-k store, exact on the "
                            "kept ids plus one tail bucket) or 'policy-gradient' (the sampled-token reverse KL from "
                            "the teacher's and the sampler's log-prob of each token; needs --alpha, 0 is the "
                            "sensible choice). Empty: --direction decides, as before.")
    ratio: str = option("clip", "--objective policy-gradient: the importance ratio r between the trained and the "
                        "sampling student, 'clip' (PPO: -min(r·A, clip(r)·A)) or 'gate' (no gradient where r is "
                        "outside the band).")
    ratio_epsilon: float = option(0.2, "--objective policy-gradient: the band 1-eps <= r <= 1+eps of --ratio.")
    allow_biased_sampler: bool = option(False, "--objective policy-gradient: train from a store whose sampler the "
                                        "importance ratio cannot correct (top-k below the vocabulary, top-p < 1, "
                                        "greedy, --rules, or not recorded), which is refused otherwise: the "
                                        "gradient is then biased (docs/DESIGN.md).")
    importance: str = option("unbiased", "Drawn targets at a temperature other than the store's: 'unbiased' "
                             "importance weights, or 'self-normalised' (lower variance; biased, about 0.25/N on "
                             "the shipped teacher from T=1 to 2, docs/DESIGN.md).")
    tokenizer: str = option("", "Tokenizer directory (default: the one recorded in the store).")
    cross_tokenizer: str = option("", "A teacher store of another tokenizer than --tokenizer (the student's): 'exact' "
                                  "(next-token KL on 1:1 byte chunks through the vocabulary map), 'chunk' (ALM "
                                  "chunk likelihoods, every chunk) or 'both'. Empty: the tokenizers must match.")
    chunk_weight: float = option(1.0, "Weight of the chunk term under --cross-tokenizer chunk or both.")
    chunk_scope: str = option("all", "The chunks the chunk term compares: 'all' (every kept chunk) or '1to1' (chunks "
                              "of one student and one teacher token only).")
    unmapped: str = option("first", "Cross-tokenizer exact term, teacher ids no student id spells: 'first' (to the "
                           "student's own first token of their bytes), 'bucket' (one bucket each side) or 'prefix' "
                           "(to the student's longest token beginning their bytes).")
    cross_longer: str = option("group", "Cross-tokenizer exact term, student ids no teacher id maps to (mostly "
                               "tokens longer than the teacher's: ' destroys' against ' destroy' + 's'): 'group' (each "
                               "joins the student id of the teacher's first token of its bytes, against that token's "
                               "probability) or 'bucket' (in the unmapped bucket, against the teacher's tail, as "
                               "before).")
    cross_positions: str = option("starts", "Cross-tokenizer exact term, where it compares the two next-token "
                                  "distributions: 'starts' (the first token of every chunk, 1:1 or not) or '1to1' "
                                  "(1:1 chunks only, as before).")
    cross_uncovered: str = option("teacher", "Cross-tokenizer, student positions that are no chunk start (all of "
                                  "them under --cross-tokenizer chunk): 'teacher' (a target inside a teacher token: "
                                  "the teacher's candidates for that token that spell what the student wrote since it "
                                  "began; elsewhere as 'ce'), 'ce' (the teacher's term is the CE against the true "
                                  "token, so the position keeps its whole weight) or 'none' (only the alpha-weighted "
                                  "CE, as before).")
    attention: str = option("", "What a token attends to: 'causal' or 'document', which must be what the train "
                            "store records (distill prepare --attention); empty: as the store says.")
    out: str = option("", "Output directory: model/, checkpoints/, metrics.jsonl, metrics.json, config.json.")
    seed: int = option(0, "Seed for initialisation and data order.")
    micro_batch_size: int = option(16, "Rows per forward/backward pass, per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step, per process (with a global batch set, it follows).")
    global_batch_rows: int = option(0, "Rows per optimizer step, all processes together; the gradient accumulation "
                                    "follows (rows / (micro-batch × processes)), so the run resumes on another "
                                    "number of processes on the same batches. 0: micro-batch × processes × "
                                    "--grad-accum.")
    global_batch_tokens: int = option(0, "As --global-batch-rows, counted in tokens: a multiple of the train "
                                      "store's sequence length.")
    max_steps: int = option(1000, "Optimizer steps.")
    lr: float = option(1e-3, "Peak learning rate (AdamW).")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak (cosine decay).")
    warmup_steps: int = option(50, "Linear warmup steps.")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only; not norms, biases).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.95, "AdamW beta2.")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0 = off).")
    loss_chunk: int = option(0, "Positions per output-head/loss chunk (0 = as many as keep chunk × vocab ≤ 64M).")
    eval_every: int = option(100, "Evaluate on the held-out store every N steps (0 = only at the end).")
    eval_rows: int = option(256, "Held-out rows per periodic evaluation (the final one uses all).")
    checkpoint_every: int = option(100, "Write a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = option(2, "Complete checkpoints to keep.")
    resume: str = option("never", "'auto' (newest complete checkpoint in OUT, or start fresh), 'never', or a path.")
    log_every: int = option(10, "Write a metrics line every N steps.")
    report_to: tuple[str, ...] = option(("jsonl",), REPORT_TO_HELP)
    peak_tflops: float = option(0.0, PEAK_TFLOPS_HELP)
    workers: int = option(0, "Loader worker processes decoding store chunks ahead (0 = read in the main process).")
    prefetch: int = option(4, "Batches the loader reads ahead.")
    shuffle_chunks: int = option(16, "Store chunks whose rows are shuffled together: each batch mixes rows from up "
                                 "to this many places in the corpus (memory: about two such blocks).")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N' (under torchrun: cuda:LOCAL_RANK).")
    threads: int = option(0, THREADS_HELP)
    dtype: str = option("auto", "Autocast dtype on CUDA: auto, float32 or bfloat16 (weights, gradients and AdamW "
                        "states stay float32; losses are taken in float32 from the logits). " + AUTO_DTYPE_HELP)
    tf32: bool = option(True, TF32_HELP)
    fsdp: bool = option(False, "Shard the student with FSDP (under torchrun) instead of replicating it (DDP); "
                        "bf16 runs compute in bf16 and reduce gradients in float32. Checkpoints are sharded "
                        "(torch.distributed.checkpoint) and resume on any number of processes.")
    fsdp_offload: bool = option(False, "With --fsdp under torchrun: keep the sharded parameters, gradients and "
                                "optimizer state on the CPU (the optimizer steps there); the GPU holds the layers "
                                "being gathered.")
    gradient_checkpointing: bool = option(False, "Recompute each decoder layer's activations in backward instead of "
                                          "keeping them: memory for longer rows or larger micro-batches, for about "
                                          "one more forward pass per step. Same loss and gradients.")
    attn_implementation: str = option("auto", ATTN_HELP + " Also the online --teacher's.")
    compile: bool = option(False, "torch.compile each decoder layer of the student (the first step, and the first "
                           "evaluation, include the compile: its seconds are logged as compile_s).")
    save_dtype: str = option("float32", "dtype of the saved final model: float32, bfloat16 or float16.")
    trust_remote_code: bool = option(False, "Allow model directories' own code to run.")
    overwrite: bool = option(False, "Start over in an OUT that already holds a run.")

    def __post_init__(self):
        problems = required(self, "train_store", "out")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.tail not in TAIL_MODES:
            problems.append(f"tail must be one of {', '.join(TAIL_MODES)}, got {self.tail!r}")
        if self.importance not in StoredSampled.IMPORTANCE:
            problems.append(f"importance must be one of {', '.join(StoredSampled.IMPORTANCE)}, got {self.importance!r}")
        if self.direction not in DIRECTIONS:
            problems.append(f"direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        problems += self._objective_problems()
        if self.cross_tokenizer not in ("", "exact", "chunk", "both"):
            problems.append(f"cross_tokenizer must be exact, chunk or both, got {self.cross_tokenizer!r}")
        if self.unmapped not in ("first", "bucket", "prefix"):
            problems.append(f"unmapped must be first, bucket or prefix, got {self.unmapped!r}")
        if self.attention not in ("", *ATTENTIONS):
            problems.append(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.cross_longer not in ("group", "bucket"):
            problems.append(f"cross_longer must be group or bucket, got {self.cross_longer!r}")
        if self.cross_positions not in ("starts", "1to1"):
            problems.append(f"cross_positions must be starts or 1to1, got {self.cross_positions!r}")
        if self.cross_uncovered not in ("teacher", "ce", "none"):
            problems.append(f"cross_uncovered must be teacher, ce or none, got {self.cross_uncovered!r}")
        if self.chunk_scope not in ("all", "1to1"):
            problems.append(f"chunk_scope must be all or 1to1, got {self.chunk_scope!r}")
        if not self.chunk_weight >= 0:
            problems.append(f"chunk_weight must not be negative, got {self.chunk_weight}")
        if self.init not in ("auto", "scratch", "teacher-layers"):
            problems.append(f"init must be auto, scratch or teacher-layers, got {self.init!r}")
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every", "prefetch", "shuffle_chunks"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_rows", "checkpoint_every", "keep_checkpoints",
                     "loss_chunk", "workers", "global_batch_rows", "global_batch_tokens"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.global_batch_rows and self.global_batch_tokens:
            problems.append("pass --global-batch-rows or --global-batch-tokens, not both")
        if (self.global_batch_rows or self.global_batch_tokens) and self.grad_accum != 1:
            problems.append("a global batch sets the gradient accumulation; drop --grad-accum")
        if self.fsdp_offload and not self.fsdp:
            problems.append("--fsdp-offload offloads FSDP's shards; add --fsdp")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        problems += dtype_problems(self.dtype, ("float32", "bfloat16"))  # autocast: float16 would need loss scaling
        problems += device_problems(self.device) + threads_problems(self.threads)
        problems += report_to_problems(self.report_to) + peak_tflops_problems(self.peak_tflops)
        problems += attn_implementation_problems(self.attn_implementation, self.device, self.dtype)
        if self.save_dtype not in DTYPES:
            problems.append(f"save_dtype must be one of {', '.join(DTYPES)}, got {self.save_dtype!r}")
        check(problems, "student")

    def _objective_problems(self) -> list[str]:
        """What ``--objective`` (and its ``--ratio``) cannot be combined with."""
        problems = []
        if self.ratio not in RATIO_MODES:
            problems.append(f"ratio must be one of {', '.join(RATIO_MODES)}, got {self.ratio!r}")
        if not 0 < self.ratio_epsilon < 1:
            problems.append(f"ratio_epsilon must be in (0, 1), got {self.ratio_epsilon}")
        if self.objective and self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)} (or empty), got {self.objective!r}")
        elif self.objective == "forward-kl" and self.direction != "forward":
            problems.append("--objective forward-kl is KL(teacher‖student); drop --direction reverse "
                            "(or use --objective reverse-kl)")
        elif self.objective == "reverse-kl" and self.tail != "tail":
            problems.append(f"--objective reverse-kl compares the kept ids plus one bucket for the exact tail; drop "
                            f"--tail {self.tail}")
        elif self.objective == "policy-gradient":
            if self.alpha is None:
                problems.append("--objective policy-gradient needs --alpha set: 0 learns from the teacher's scores "
                                "alone, the sensible choice on text the student wrote (CE there imitates the "
                                "student's own samples); a larger value adds that CE")
            if self.temperature != 1.0:
                problems.append(f"--objective policy-gradient compares log-probs at T = 1 (the student's and the "
                                f"teacher's); drop --temperature {self.temperature:g}")
            if self.direction != "forward":
                problems.append("--objective policy-gradient is reverse KL by construction; drop --direction")
            if self.teacher or self.cross_tokenizer:
                problems.append("--objective policy-gradient reads the teacher's and the sampler's log-probs from the "
                                "store; drop --teacher and --cross-tokenizer")
        if self.allow_biased_sampler and self.objective != "policy-gradient":
            problems.append("--allow-biased-sampler is for --objective policy-gradient (no other objective divides "
                            "by the sampler's log-probs); drop it")
        return problems

    @property
    def kl_direction(self) -> str:
        """The KL direction the run uses: the objective's where one is set (the policy gradient
        estimates reverse KL), else ``--direction``."""
        return {"forward-kl": "forward", "reverse-kl": "reverse", "policy-gradient": "reverse"}.get(
            self.objective, self.direction)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DistillStep(torch.nn.Module):
    """One micro-batch's loss sums. A module so that DDP/FSDP see the forward they wrap.

    forward(input_ids ``[B, L]``, store arrays ``[B, L, ...]``) → (CE sum, divergence sum, targets),
    over the ``B·(L−1)`` positions that have a next token — only those whose ``loss_mask`` is 1 when
    the batch has one (task fine-tuning: the positions whose target is a response token; the others
    never reach the output head, so they add nothing to the loss, its gradient or the target count).
    ``teacher`` (a :class:`pipeline.train.teacher_signal.TeacherSignal`) gives the divergence term; None
    trains with CE alone. ``rule`` (the store's :class:`pipeline.text.packing.RowRule`): with
    ``attention == "document"`` each token attends within its own document; positions whose target
    is a BOS are out of the loss, as a task store's masked positions are.
    """

    def __init__(self, model, vocab: int, alpha: float, loss_chunk: int, teacher: TeacherSignal | None = None, *,
                 output: OutputHead, rule: RowRule = RowRule()):
        super().__init__()
        self.rule = rule
        self.model = model
        self.output = output  # the student's logits as its own forward computes them (post-head transforms)
        self.vocab, self.alpha, self.loss_chunk = vocab, alpha, loss_chunk
        self.teacher = teacher  # a plain object: an online teacher's weights stay out of this module's parameters

    def forward(self, input_ids: torch.Tensor, batch: dict[str, torch.Tensor], ce_only: bool = False):
        model, b, length = self.model, input_ids.shape[0], input_ids.shape[1]
        hidden = self.output.hidden(input_ids, **self.rule.hidden_kwargs(input_ids))  # [B, L, H]
        hidden = hidden[:, :-1].reshape(b * (length - 1), -1)
        targets = input_ids[:, 1:].reshape(-1)
        head, teacher = self.output.logits, self.teacher
        distill = self.alpha < 1.0 and not ce_only and teacher is not None
        t = teacher.temperature if distill else 1.0
        teacher_positions = teacher.positions(input_ids, batch) if distill else ()
        trained = trained_positions(input_ids, batch, self.rule)
        if trained is not None:
            keep = trained.reshape(-1).nonzero().squeeze(-1)
            hidden, targets = hidden[keep], targets[keep]
            teacher_positions = tuple(part[keep] for part in teacher_positions)
        # a term over whole chunks of positions (cross-tokenizer, pipeline/train/cross_signal.py) needs
        # the student's target log-probs at every position, gathered across the head's chunks
        sequence = distill and getattr(teacher, "sequence_term", False)
        # a signal that reports per-position quantities (the policy gradient's advantage, ratio, clip
        # share) sums them beside the loss, once per forward (not again when a chunk is recomputed)
        watched = distill and hasattr(teacher, "position_stats")
        positions = hidden.shape[0]
        index = (torch.arange(positions, device=hidden.device),) if sequence else ()

        def sums(h, y, *teacher_parts):
            logits = head(h).float()[:, :self.vocab]  # padded output rows are not tokens
            logprobs = F.log_softmax(logits, dim=-1)  # one softmax pass shared by CE and, at T = 1, the KD term
            ce = -logprobs.gather(-1, y[:, None]).sum()
            if not distill:
                return ce, torch.zeros((), device=ce.device)
            student_t = logprobs if t == 1.0 else F.log_softmax(logits / t, dim=-1)
            if not sequence:
                kd = teacher.divergence(student_t, y, *teacher_parts).sum()
                return (ce, kd, teacher.position_stats(student_t, y, *teacher_parts)) if watched else (ce, kd)
            at, teacher_parts = teacher_parts[0], teacher_parts[1:]
            own = torch.zeros(positions, device=h.device).index_add(0, at, student_t.gather(-1, y[:, None]).squeeze(-1))
            return ce, teacher.divergence(student_t, y, *teacher_parts).sum(), own

        ce_sum, kd_sum, *own = chunked_sum(sums, positions, self.loss_chunk, hidden, targets, *index,
                                           *teacher_positions)
        if watched:
            teacher.add_stats(own[0])
        if sequence:
            kd_sum = kd_sum + teacher.sequence_divergence(own[0], *teacher_positions)
        return ce_sum, kd_sum, targets.numel()


def trained_positions(input_ids: torch.Tensor, batch: dict[str, torch.Tensor], rule: RowRule) -> torch.Tensor | None:
    """``[B, L−1]`` bool, the positions with a next token that are trained on: those whose ``loss_mask``
    is 1 and whose target is not a BOS (:meth:`RowRule.target_mask`); None where every one is."""
    trained = batch["loss_mask"][:, :-1] > 0 if "loss_mask" in batch else None
    not_bos = rule.target_mask(input_ids)
    if not_bos is None:
        return trained
    return not_bos if trained is None else trained & not_bos


def target_count(batch: dict[str, torch.Tensor], rule: RowRule = RowRule()) -> int:
    """The positions of a batch that :class:`DistillStep` trains on (its third output), from the batch
    alone: those whose ``loss_mask`` is 1 and whose target is no BOS, else every position with a next token."""
    trained = trained_positions(batch["input_ids"], batch, rule)
    if trained is not None:
        return int(trained.count_nonzero())
    return batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)


def masks(arrays: dict, device=None) -> dict:
    """The ``loss_mask`` among a store's arrays (or a batch's tensors, moved to ``device``), if it has one."""
    return {k: v if device is None else v.to(device) for k, v in arrays.items() if k == "loss_mask"}


@torch.no_grad()
def evaluate(wrapped, store, batch_rows: int, max_rows: int, device, autocast,
             stop: Callable[[], Any] | None = None, byte_lengths: torch.Tensor | None = None
             ) -> dict[str, float] | None:
    """Mean next-token loss (nats) and perplexity over the held-out rows (cross-entropy only), and
    with ``byte_lengths`` (bytes per token id) bits per byte; None if ``stop()`` (asked before each
    batch, on every rank alike) said to stop first.

    Goes through the wrapped step module, so FSDP gathers the parameters it needs."""
    module = getattr(wrapped, "module", wrapped)
    was_training = module.training
    module.eval()
    total, count, nbytes = 0.0, 0, 0
    for batch in sequential(store, batch_rows, max_rows or None):
        if stop is not None and stop():
            module.train(was_training)
            return None
        input_ids = batch["input_ids"].to(device)
        with autocast():
            ce_sum, _, n = wrapped(input_ids, masks(batch, device), ce_only=True)
        total += ce_sum.item()
        count += n
        if byte_lengths is not None:
            nbytes += target_bytes(batch["input_ids"], batch.get("loss_mask"), byte_lengths)
    module.train(was_training)
    loss = total / max(count, 1)
    result = {"heldout_loss": loss, "heldout_ppl": math.exp(loss), "heldout_tokens": count}
    if byte_lengths is not None:
        result["heldout_bits_per_byte"] = total / math.log(2) / max(nbytes, 1)
    return result


@dataclass
class Run:
    """What :func:`setup` builds for the loop and :func:`finish`: one training run's state."""

    config: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    train_store: Store
    eval_store: Store | None
    teacher_source: str  # 'store', 'online' or 'none'
    alpha: float  # the resolved CE weight
    model: torch.nn.Module
    wrapped: torch.nn.Module  # the step module as DDP/FSDP wraps it: what forward and backward go through
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Loader
    start_step: int  # the first step to run (0, or where the resumed checkpoint left off)
    tokens_seen: int
    facts: dict[str, Any]  # saved beside the resolved config and in every checkpoint
    metrics: Tracker | None  # rank 0 only: metrics.jsonl and the --report-to sinks
    batch: distributed.GlobalBatch  # rows per step, per micro-batch, and micro-batches per step
    saved_step: int | None = None  # the step of the newest checkpoint in OUT this run wrote or resumed from
    cost: StepCost | None = None  # what a step's tokens cost (MFU) and memory, for the metrics
    eval_byte_lengths: torch.Tensor | None = None  # bytes per token id: held-out bits per byte
    steps_run: int = 0  # optimizer steps this process has taken (0: an out-of-memory error is the first step's)

    @property
    def is_rank0(self) -> bool:
        """Rank 0 writes files and prints; every rank computes."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.config.fsdp and self.world > 1

    def autocast(self):
        enabled = self.device.type == "cuda" and self.config.dtype == "bfloat16"  # bf16 autocast is slow on CPU
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def save_checkpoint(self, step: int) -> None:
        """Every rank: the checkpoint of ``step`` (DCP shards under --fsdp, else rank 0's state.pt)."""
        self.saved_step = step  # on every rank, so that all decide alike whether a checkpoint is missing
        device = self.device
        state = {  # model and optimizer are added as the layout calls for (distributed.save_checkpoint)
            "scheduler": self.scheduler.state_dict(), "step": step, "tokens_seen": self.tokens_seen,
            "data": self.loader.state(),
            "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)}
                                                        if device.type == "cuda" else {})},
        }
        with disk_full_resumes(self.out / "checkpoints" / f"step-{step:08d}"):
            distributed.save_checkpoint(self.out / "checkpoints", step, self.model, self.optimizer, state,
                                        {"config": to_dict(self.config) | {"alpha": self.alpha}, **self.facts},
                                        self.config.keep_checkpoints, rank=self.rank, world=self.world,
                                        fsdp=self.config.fsdp)


def disk_full_resumes(path: Path | str):
    """A full disk while writing ``path`` stops the run with one line; the checkpoints already written
    are intact, so the same run continues from the newest one."""
    return disk_full_is_an_error(path, "free space there, then rerun with --resume auto: training continues from "
                                       "the newest complete checkpoint")


@preempt.takes_signals
def train(config: TrainConfig) -> Path:
    # SIGUSR1 / SIGTERM from here on stop the run at a whole step; a full disk is one line
    with preempt.Preemption() as preemption, disk_full_resumes(config.out):  # disk: the metrics log, config.json, …
        run = setup(config)
        if run is None:  # finished already
            return Path(config.out) / "model"
        if (signal_name := preemption.agreed(run.world)) is not None:  # came during setup: no step is run
            leave_preempted(run, run.start_step, signal_name)
        try:
            stopped = train_loop(run, preemption)
        except OUT_OF_MEMORY:
            if run.steps_run:  # memory held at the first step and ran out later: not a sizing question
                raise
            run.loader.close()
            raise DistillError(out_of_memory_message(run)) from None
        if stopped is not None:
            leave_preempted(run, *stopped)
        return finish(run, preemption)


# ---------------------------------------------------------------------- setup


def setup(config: TrainConfig) -> Run | None:
    """Stores, tokenizer, teacher signal, student, its wrapper, optimizer, scheduler, loader and the
    resume position: every check that can fail runs here, before the first step. None when OUT
    holds this run finished (nothing is written then)."""
    threads = set_threads(config.threads)  # before anything runs torch: see pipeline/threads.py
    check_installed(config.report_to)  # a missing tensorboard or wandb: one line, before anything loads
    rank, world, local_rank = distributed.process_group()
    out = Path(config.out)
    resume_from = _claim_out(config, out, rank)
    train_store = open_store(config.train_store)
    teacher_source, alpha = _teacher_source(config, train_store)
    tokenizer = load_tokenizer(config.tokenizer or train_store.params["tokenizer"], config.trust_remote_code)
    tok_hash, vocab = tokenizer_hash(tokenizer), vocab_size(tokenizer)
    teacher: TeacherSignal | None = None
    if teacher_source == "store" and alpha < 1.0:  # at α = 1 only the store's tokens are read: its T does not matter
        teacher = _stored_signal(config, train_store)
        if config.objective == "policy-gradient":
            _check_sampler(config, train_store, print if rank == 0 else lambda line: None)

    device = resolve_device(config.device if not (world > 1 and torch.cuda.is_available()) else f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # --dtype auto resolves on this rank's device: the resolved config, checkpoints and metrics.json record it
    requested = config.dtype
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, device))
    tf32 = set_tf32(device, config.tf32)
    torch.manual_seed(config.seed)
    model = _student(config, train_store).to(device)
    if config.gradient_checkpointing:  # here, before FSDP wraps the layers (distributed.wrap): it shards what checkpoints
        enable_gradient_checkpointing(model, config.model)
    check_output_rows("model", config.model, model.config.vocab_size, vocab,
                      f"set vocab_size in the model config to {vocab}")
    positions = max_positions(model.config)
    aligner, cross_facts = None, {}
    if config.cross_tokenizer:  # the teacher's rows become the student's in the loader
        aligner, teacher, cross_facts = _cross_tokenizer(config, train_store, teacher_source, tokenizer, teacher,
                                                         positions)
    elif train_store.params.get("tokenizer_hash") != tok_hash and train_store.kind != "tokens":
        raise DistillError(f"train store {train_store.root} was made with another tokenizer (hash "
                           f"{str(train_store.params.get('tokenizer_hash'))[:12]} vs {tok_hash[:12]}); pass the tokenizer "
                           "it was prepared with, or --cross-tokenizer exact|chunk|both to distil across tokenizers")
    else:
        check_store_fits(train_store, "train store", tok_hash, vocab, positions)
    eval_store = open_store(config.eval_store) if config.eval_store else None
    if eval_store is not None:
        check_store_fits(eval_store, "eval store", tok_hash, vocab, positions)
    rule = _row_rule(config, train_store, eval_store, model)
    if teacher_source == "online" and alpha < 1.0:
        teacher = _online_teacher(config, train_store, vocab, device, rule)

    loss_chunk = config.loss_chunk or max(1, (1 << 26) // model.config.vocab_size)
    probe_rows = train_store.read_rows(0, 1)["input_ids"]
    probe_rows = aligner({"input_ids": probe_rows})["input_ids"] if aligner is not None else probe_rows
    probe = torch.from_numpy(probe_rows.astype("int64")).to(device)
    output = OutputHead(model, probe)
    batch = distributed.global_batch(config.global_batch_rows, config.global_batch_tokens, config.micro_batch_size,
                                     config.grad_accum, world, train_store.params["seq_len"])
    if config.compile:  # after the probes above (eval mode, no gradients: they would compile a graph of their own)
        compile_layers(model)
    # bf16 (the resolved --dtype): FSDP gathers and computes in bf16, reduces gradients in float32
    wrapped = distributed.wrap(DistillStep(model, vocab, alpha, loss_chunk, teacher, output=output, rule=rule),
                               world, device, fsdp=config.fsdp, offload=config.fsdp_offload,
                               bf16=config.dtype == "bfloat16")
    optimizer, scheduler = _optimizer(model, config)
    epoch, offset, start_step, tokens_seen = 0, 0, 0, 0
    if resume_from is not None:
        epoch, offset, start_step, tokens_seen = _resume(resume_from, config, alpha, batch, model, optimizer,
                                                         scheduler, device)
        if start_step >= config.max_steps and (out / "metrics.json").is_file() and (out / "model").is_dir():
            if rank == 0:  # a rerun of a finished run (make student twice) changes nothing
                print(f"{out / 'model'}: already trained for {config.max_steps} steps; nothing to do")
            return None
        if rank == 0:
            print(f"resumed from {resume_from} at step {start_step}")
    fields = ("input_ids", *teacher.fields) if teacher is not None and alpha < 1.0 else ("input_ids",)
    if aligner is None:  # across tokenizers the aligner makes the student's rows and their mask
        fields += tuple(masks(train_store.index["arrays"]))
    # global step s reads rows s·G … of the seed's order, the ranks splitting them (distributed.py)
    loader = Loader(train_store, batch.micro_rows, config.seed, rank, world, epoch, offset,
                    config.workers, config.prefetch, fields, config.shuffle_chunks, transform=aligner)

    facts = {"parameters": count_parameters(model), "device": str(device), "world_size": world,
             "global_batch_rows": batch.rows, "grad_accum": batch.accum,
             "tokenizer_hash": tok_hash, "train_rows": train_store.rows, "seq_len": train_store.params["seq_len"],
             "teacher_source": teacher_source, "alpha": alpha, "loss_chunk": loss_chunk,
             "attn_implementation": attn_implementation(model),  # what ran: 'auto' resolved
             "train_store_params": train_store.params, "dtype": config.dtype, "dtype_requested": requested,
             "tf32": tf32, **threads, **cross_facts}
    metrics = None
    if rank == 0:
        if config.overwrite and out.exists():
            clear(out, RUN)  # what a run writes, nothing else (checked again: nothing else appeared meanwhile)
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(config, out / "config.json", facts)
        hyper = {"stage": "student", **to_dict(config), **facts, **signal_facts(teacher, train_store)}
        metrics = Tracker(TrackerPaths.in_dir(out), config.report_to, hyper, name=out.name, job_type="student",
                          resume_step=start_step if resume_from else None)
        (out / PREEMPTED).unlink(missing_ok=True)  # this run has taken over from the pre-empted one
    in_out = resume_from is not None and resume_from.resolve() == (out / "checkpoints" / resume_from.name).resolve()
    return Run(config, out, rank, world, device, tokenizer, train_store, eval_store, teacher_source, alpha, model,
               wrapped, optimizer, scheduler, loader, start_step, tokens_seen, facts, metrics, batch,
               saved_step=start_step if in_out else None,
               cost=StepCost.of(model, train_store.params["seq_len"], device, config.peak_tflops, world),
               eval_byte_lengths=token_byte_lengths(tokenizer) if eval_store is not None else None)


def _claim_out(config: TrainConfig, out: Path, rank: int = 0) -> Path | None:
    """The checkpoint to resume from; refuse to mix two runs in OUT, and refuse an OUT holding anything a
    run does not write (:data:`RUN`), with or without ``--overwrite``. With ``--overwrite`` there is no
    checkpoint: the earlier run is removed at the end of setup, once every check has passed, so a run
    refused for a bad input leaves it intact."""
    claim(out, RUN, config.overwrite)
    if config.overwrite:
        return None
    ckpt_dir = out / "checkpoints"
    # every rank checks the checkpoint it will load; rank 0 says which it passed over
    resume_from = checkpoint.resolve(ckpt_dir, config.resume, **({} if rank == 0 else {"say": lambda line: None}))
    if resume_from is None and (ckpt_dir.exists() or (out / "metrics.jsonl").exists()) and config.resume != "auto":
        raise DistillError(f"{out} already holds a run; pass --resume auto to continue it or --overwrite to start over")
    return resume_from


def _stored_signal(config: TrainConfig, train_store: Store) -> TeacherSignal:
    """The teacher signal of a stage-one (or ``target``) store under ``--objective``: the policy
    gradient's per-token log-probs, reverse KL over a top-k store's kept ids and exact tail, or (no
    objective, or ``forward-kl``) what the store's kind calls for, as before."""
    root = train_store.root
    if config.objective == "policy-gradient":
        return StoredPolicyGradient(train_store.kind, train_store.params, train_store.index["arrays"], config.ratio,
                                    config.ratio_epsilon, store=root)
    if config.objective == "reverse-kl":
        if train_store.kind != "topk":
            raise DistillError(f"--objective reverse-kl needs the teacher's probability wherever the student puts "
                               f"mass: a top-k store's kept ids and exact tail; {root} is a '{train_store.kind}' "
                               "store; rerun stage one with --kind topk")
        # a hybrid store's exact top-k and tail: its drawn tail ids are not read
        return StoredTopK(train_store.params, config.temperature, "tail", "reverse", store=root)
    return stored_teacher(train_store.kind, train_store.params, config.temperature, config.tail, config.kl_direction,
                          config.importance, store=root)


def _check_sampler(config: TrainConfig, train_store: Store, say: Callable[[str], None]) -> None:
    """Refuse (or, with --allow-biased-sampler, warn about) a store whose ``behaviour_logprob`` came from
    a sampler the policy gradient's ratio cannot correct: the ``samplers`` that ``prepare --format ids``
    recorded from the records and stage one copied (absent from a store prepared before they were
    recorded: unknown). Full support at any temperature passes (docs/DESIGN.md)."""
    samplers = train_store.params.get("samplers")
    vocab = train_store.params["vocab_size"]
    reasons = [sampler_bias(s, vocab) for s in samplers] if isinstance(samplers, list) and samplers else \
        ["unknown (the store records no sampler: prepared before distill recorded them, or not from distill "
         "generate's records)"]
    reasons = list(dict.fromkeys(r for r in reasons if r))
    if not reasons:
        return
    what = (f"{train_store.root}: --objective policy-gradient cannot correct the sampler that wrote these records, "
            f"{'; '.join(reasons)}: its ratio π_θ/π_b reweights only what the sampler could draw, so the gradient is "
            "biased whatever the clipped share")
    if config.allow_biased_sampler:
        say(f"warning: {what}; training anyway (--allow-biased-sampler)")
        return
    raise DistillError(f"{what}; regenerate with --top-p 1 --top-k 0 (any --temperature > 0) and no --rules, or use "
                       "--objective reverse-kl, or pass --allow-biased-sampler to train on it anyway")


def _teacher_source(config: TrainConfig, train_store: Store) -> tuple[str, float]:
    """Where the teacher comes from ('online', 'store' or 'none') and the resolved alpha."""
    if train_store.kind == "target" and config.objective != "policy-gradient":
        raise DistillError(f"{config.train_store}: a target store holds only the teacher's log-prob of each token; "
                           "train with --objective policy-gradient --alpha 0")
    if train_store.kind not in ("tokens", "topk", "sampled", "target"):
        raise DistillError(f"{config.train_store} is a '{train_store.kind}' store; stage two trains from 'topk' or 'tokens'")
    if config.objective == "policy-gradient" and train_store.kind == "tokens":
        raise DistillError(f"{config.train_store} is a tokens store: the teacher has not scored it; run distill "
                           "teacher on it first (--objective policy-gradient needs target_logprob)")
    teacher_source = "online" if config.teacher else ("none" if train_store.kind == "tokens" else "store")
    alpha = config.alpha if config.alpha is not None else (1.0 if teacher_source == "none" else 0.5)
    if alpha < 1.0 and teacher_source == "none":
        raise DistillError(f"{config.train_store} is a tokens store: it holds no teacher predictions; run "
                           "distill teacher to make a topk store, pass --teacher DIR (online), or use --alpha 1")
    return teacher_source, alpha


def _cross_tokenizer(config: TrainConfig, train_store: Store, teacher_source: str, tokenizer,
                     teacher: TeacherSignal | None, positions: int):
    """(the loader's transform, the teacher signal, facts to record) for a store of another tokenizer:
    its rows are retokenized for the student and aligned by bytes (pipeline/text/align.py)."""
    from pipeline.text.align import RowAligner, check_byte_level, first_tokens, student_groups, token_bytes, vocab_map
    from pipeline.train.cross_signal import CrossTokenizer, InsideTargets

    if teacher_source == "online":
        raise DistillError("--cross-tokenizer distils from a teacher store; drop --teacher (online teachers must "
                           "share the student's tokenizer)")
    if "loss_mask" in train_store.index["arrays"]:
        raise DistillError(f"{train_store.root} is a store of task examples; --cross-tokenizer does not yet carry a "
                           "loss mask across tokenizers")
    store_tokenizer = load_tokenizer(train_store.params["tokenizer"], config.trust_remote_code)
    if tokenizer_hash(store_tokenizer) != train_store.params.get("tokenizer_hash"):
        raise DistillError(f"the tokenizer at {train_store.params['tokenizer']} is no longer the one {train_store.root} "
                           "was made with (its hash differs); the teacher's bytes cannot be recovered from another")
    check_byte_level(store_tokenizer, "teacher", train_store.params["tokenizer"])
    check_byte_level(tokenizer, "student", config.tokenizer or train_store.params["tokenizer"])
    teacher_bytes, student_bytes = token_bytes(store_tokenizer), token_bytes(tokenizer)
    mapping, digest = vocab_map(teacher_bytes, student_bytes, config.unmapped, tokenizer)
    backend = tokenizer.backend_tokenizer

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    aligner = RowAligner(teacher_bytes, student_bytes, encode, positions, tokenizer.eos_token_id,
                         positions=config.cross_positions)
    # --cross-longer group: the student's ids outside the image, folded into their heads' events
    # (identical tokenizers: today's loss, nothing folded; chunk mode has no next-token term)
    groups = student_groups(mapping, student_bytes, store_tokenizer) if config.cross_longer == "group" \
        and config.cross_tokenizer != "chunk" and teacher_bytes.tokenizer_hash != student_bytes.tokenizer_hash \
        else None
    if teacher is not None:
        # the inside-token tables (seconds for a large vocabulary) only where the next-token term runs
        inside = InsideTargets(teacher_bytes.pieces, lambda pieces: first_tokens(tokenizer, pieces)) \
            if config.cross_uncovered == "teacher" and config.cross_tokenizer != "chunk" else None
        teacher = CrossTokenizer(teacher, mapping, config.cross_tokenizer, config.chunk_weight, config.cross_uncovered,
                                 inside, config.chunk_scope, groups)
    facts = {"cross_tokenizer": {"mode": config.cross_tokenizer, "unmapped": config.unmapped,
                                 "positions": config.cross_positions, "uncovered": config.cross_uncovered,
                                 "chunk_scope": config.chunk_scope, "longer": config.cross_longer,
                                 "teacher_tokenizer_hash": teacher_bytes.tokenizer_hash,
                                 "vocab_map_sha256": digest, "teacher_ids_mapped": int((mapping >= 0).sum()),
                                 "teacher_vocab": len(mapping),
                                 "student_ids_grouped": int((groups >= 0).sum()) if groups is not None else 0}}
    return aligner, teacher, facts


def _student(config: TrainConfig, train_store: Store) -> torch.nn.Module:
    model_path = Path(config.model)
    if config.init == "teacher-layers":
        source = Path(config.init_teacher or config.teacher or train_store.params.get("teacher", ""))
        return init_from_teacher_layers(hf_config(model_path), source, config.attn_implementation)
    attention = {"trust_remote_code": config.trust_remote_code, "attn_implementation": config.attn_implementation}
    if config.init == "scratch" and has_weights(model_path):
        return load_model(model_path / "config.json", **attention)
    return load_model(model_path, **attention)


def _online_teacher(config: TrainConfig, train_store: Store, vocab: int, device: torch.device,
                    rule: RowRule) -> OnlineTeacher:
    teacher_model = load_model(config.teacher, trust_remote_code=config.trust_remote_code,
                               attn_implementation=config.attn_implementation).to(device).eval()
    teacher_model.requires_grad_(False)
    check_output_rows("teacher", config.teacher, teacher_model.config.vocab_size, vocab,
                      "use a teacher of the student's tokenizer")
    if rule.attention == "document":
        check_document_attention(teacher_model, rule.eos_token_id, f"teacher {config.teacher}")
    probe = train_store.read_rows(0, 1)["input_ids"].astype("int64")
    return OnlineTeacher(OutputHead(teacher_model, torch.from_numpy(probe).to(device)), vocab,
                         config.temperature, config.kl_direction, rule)


def _row_rule(config: TrainConfig, train_store: Store, eval_store: Store | None, model) -> RowRule:
    """How the rows start and attend, as the train store records it (stage one computed the teacher's
    predictions so): ``--attention`` must agree, and so must the eval store; one line otherwise."""
    rule = RowRule.of(train_store.params)
    if config.attention and config.attention != rule.attention:
        raise DistillError(f"--attention {config.attention}, but train store {train_store.root} was prepared (and its "
                           f"teacher predictions computed) with attention {rule.attention}; drop --attention or "
                           f"prepare the store with --attention {config.attention}")
    if eval_store is not None and RowRule.of(eval_store.params) != rule:
        raise DistillError(f"eval store {eval_store.root} has {RowRule.of(eval_store.params).describe()}, train store "
                           f"{train_store.root} has {rule.describe()}; prepare both with the same --document-start, "
                           "--row-start and --attention")
    if rule.attention == "document" and config.cross_tokenizer:
        raise DistillError(f"train store {train_store.root} keeps attention within documents, which --cross-tokenizer "
                           "does not carry over to the student's rows; prepare the store with --attention causal")
    if config.cross_tokenizer:  # the rule's ids are the teacher's; the aligner makes the student's rows and mask
        return RowRule()
    if rule.attention == "document":
        check_document_attention(model, rule.eos_token_id, f"student {config.model}")
    return rule


def _optimizer(model, config: TrainConfig):
    """AdamW (weight decay on matrices only) and its warmup-then-cosine schedule, over the parameters
    as the wrapper left them (fused where they are on the GPU, not when FSDP offloads them)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    on_gpu = all(p.device.type == "cuda" for p in model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), fused=on_gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.max_steps, config.min_lr_ratio))
    return optimizer, scheduler


def _resume(resume_from: Path, config: TrainConfig, alpha: float, batch: distributed.GlobalBatch, model, optimizer,
            scheduler, device: torch.device) -> tuple[int, int, int, int]:
    """Load a checkpoint into model, optimizer, scheduler and RNG; returns (epoch, offset, step, tokens seen).
    The number of processes may differ from the checkpoint's, the global batch may not."""
    state, saved_config = checkpoint.load(resume_from, verified=True)  # resolve() checked its manifest
    resolved = to_dict(config) | {"alpha": alpha}
    saved = ADDED_SINCE | saved_config["config"]  # an option newer than the checkpoint had its default then
    changed = [k for k in RESUME_FIXED if saved.get(k) != resolved.get(k)]
    if (rows := distributed.saved_global_rows(saved_config)) != batch.rows:
        changed.append(f"global batch ({rows} rows a step, now {batch.rows}: pass --global-batch-rows {rows} to "
                       "keep it on any number of processes)")
    if changed:
        raise DistillError(f"checkpoint {resume_from} was made with other {', '.join(changed)}; "
                           "resume with the same options or pass --overwrite")
    distributed.load_checkpoint(resume_from, state, model, optimizer, world=batch.world,
                                sharded=config.fsdp and batch.world > 1)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["data"]["epoch"], state["data"]["offset"], state["step"], state["tokens_seen"]


# ---------------------------------------------------------------------- loop


def train_loop(run: Run, preemption: preempt.Preemption | None = None) -> tuple[int, str] | None:
    """Steps ``start_step`` … ``max_steps``; (step, signal) if a pre-emption signal stopped it after that
    step (a checkpoint due at that step is written), None when every step ran."""
    config, alpha, wrapped, world = run.config, run.alpha, run.wrapped, run.world
    preemption = preemption or preempt.Preemption()  # one never entered is never signalled
    stopped = None
    tokens_per_step = run.batch.rows * (run.train_store.params["seq_len"] - 1)
    progress = tqdm(total=config.max_steps * tokens_per_step, initial=run.start_step * tokens_per_step, desc="train",
                    unit="tok", unit_scale=True, dynamic_ncols=True, disable=not run.is_rank0)
    run.model.train()
    t2 = config.temperature ** 2
    teacher_signal = getattr(wrapped, "module", wrapped).teacher
    rule = getattr(wrapped, "module", wrapped).rule
    for step in range(run.start_step, config.max_steps):
        started = time.perf_counter()
        # --compile: this process's first step compiles the layers' forward and backward; its time is split
        first_compiled = config.compile and step == run.start_step
        compiled_before = compile_seconds() if first_compiled else 0.0
        if hasattr(teacher_signal, "new_step"):  # its statistics are of the step logged, as the loss is
            teacher_signal.new_step()
        # CE sum, divergence sum, targets, then a pre-emption flag per signal (this rank)
        sums = torch.zeros(3 + len(preemption.signals), dtype=torch.float64)
        # The step's loss is the mean over every rank's and micro-batch's targets. Their counts differ
        # where rows are masked or retokenized (task stores, --cross-tokenizer), so they are counted
        # before the first backward and summed over the ranks; DDP/FSDP then average the gradients of
        # the ranks' sums over (global count / world), which is the global sum over the global count.
        # this rank's share of global step `step`'s rows (distributed.py: the same rows at any world size)
        micro_batches = [next(run.loader) for _ in range(run.batch.accum)]  # on the host until used
        step_targets = torch.tensor([sum(target_count(b, rule) for b in micro_batches)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(step_targets)
        per_rank_targets = max(step_targets.item(), 1) / world  # c · accumulation exactly where counts are equal
        for micro, host_batch in enumerate(micro_batches):
            batch = {k: v.to(run.device, non_blocking=True) for k, v in host_batch.items()}
            with distributed.accumulating(wrapped, last=micro == len(micro_batches) - 1):
                with run.autocast():
                    ce_sum, kd_sum, count = wrapped(batch["input_ids"], batch)
                loss = (alpha * ce_sum + (1 - alpha) * t2 * kd_sum) / per_rank_targets
                loss.backward()
            sums[:3] += torch.tensor([ce_sum.item(), kd_sum.item(), count], dtype=torch.float64)
        sums[3:] = torch.tensor(preemption.flags(), dtype=torch.float64)  # read as late as possible
        if world > 1:  # the flags ride on the one collective a step has anyway: all ranks see any rank's signal
            dist.all_reduce(sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip or float("inf"))
        # The sums are all-reduced and the norm is of all-reduced gradients: every rank stops alike,
        # before the optimizer touches the weights.
        if not (torch.isfinite(sums).all() and torch.isfinite(grad_norm)):
            progress.close()
            run.loader.close()
            raise DistillError(non_finite_message(step + 1, sums, grad_norm, alpha, run.out / "checkpoints",
                                                  config.objective))
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.steps_run += 1
        run.tokens_seen += tokens_per_step
        elapsed = time.perf_counter() - started
        ce, kd = (sums[:2] / sums[2].clamp_min(1)).tolist()  # no targets: a step of prompts alone (fine-tuning)
        total = alpha * ce + (1 - alpha) * t2 * kd
        progress.update(tokens_per_step)
        progress.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
        done = step + 1
        compile_s = compile_seconds() - compiled_before if first_compiled else 0.0
        if first_compiled and run.is_rank0:  # (no extra metrics line: a resumed run's log stays the uninterrupted one's)
            progress.write(f"step {done}: {elapsed:.1f} s, of which torch.compile {compile_s:.1f} s and the step "
                           f"itself {elapsed - compile_s:.1f} s")
        if run.is_rank0 and (done % config.log_every == 0 or done == config.max_steps):
            record = {"step": done, "loss": total, "ce": ce, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens": run.tokens_seen, "tokens_per_s": tokens_per_step / elapsed, "step_s": elapsed,
                      **({"compile_s": compile_s} if first_compiled else {})}
            if alpha < 1.0:
                record["kd"] = kd
            if hasattr(teacher_signal, "take_stats"):
                # cross-tokenizer: the share of positions each term reached; policy gradient: advantage, ratio
                record.update(teacher_signal.take_stats())
            record.update(teacher_signal_scalars(alpha < 1.0 and teacher_signal is not None, config.temperature,
                                                 record, config.cross_positions))
            record.update(run.cost.scalars(record["tokens_per_s"]))  # MFU (where a peak is known), peak memory
            run.metrics.log(**record)
        if run.eval_store is not None and config.eval_every and done % config.eval_every == 0 and done < config.max_steps:
            result = evaluate(wrapped, run.eval_store, config.micro_batch_size, config.eval_rows, run.device,
                              run.autocast, byte_lengths=run.eval_byte_lengths)
            if run.is_rank0:
                run.metrics.log(step=done, tokens=run.tokens_seen, **result)
                progress.write(f"step {done}: held-out loss {result['heldout_loss']:.4f} "
                               f"(ppl {result['heldout_ppl']:.2f})")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.max_steps:
            run.save_checkpoint(done)
        if (signal_name := preemption.signal_name(sums[3:].tolist())) is not None:
            stopped = (done, signal_name)  # the step is whole: logged, evaluated, checkpointed if due
            break
    progress.close()
    run.loader.close()
    return stopped


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch >= 2.5 names it at the top


def out_of_memory_message(run: Run) -> str:
    """One line for the accelerator running out of memory in the first step a run takes (the step that
    first holds the activations, gradients and AdamW states together): what to lower, and what keeps
    the batch the same (docs/DESIGN.md, "Memory of a student process")."""
    config, device = run.config, run.device
    seq_len = run.train_store.params["seq_len"]
    peak = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = (f"; {torch.cuda.max_memory_allocated(device) / 2**30:.1f} of {total / 2**30:.1f} GiB allocated "
                "at the peak")
    if config.micro_batch_size > 1:
        smaller = config.micro_batch_size // 2
        accum = math.ceil(config.micro_batch_size * config.grad_accum / smaller)
        lower = (f"lower --micro-batch-size (e.g. --micro-batch-size {smaller} --grad-accum {accum} keeps "
                 f"{smaller * accum} rows per step; --global-batch-tokens sets the accumulation for you)")
    else:
        lower = "--micro-batch-size is 1 already"
    return (f"out of memory in the first training step on {device} ({config.micro_batch_size} rows of {seq_len} "
            f"tokens per micro-batch, {config.dtype}{peak}): {lower}, or pass --gradient-checkpointing (recompute "
            f"each layer's activations in backward); distill plan with --student {config.model} --gpu-memory GB "
            "estimates the peak and suggests both")


def non_finite_message(step: int, sums: torch.Tensor, grad_norm: torch.Tensor, alpha: float, ckpt_dir: Path,
                       objective: str = "") -> str:
    """One line: which quantity went non-finite at ``step``, the likely cause, what is intact."""
    ce, kd = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    if not math.isfinite(ce):
        cause = "the student's logits overflowed (lower --lr, raise --warmup-steps, or train in float32)"
    elif alpha < 1.0 and not math.isfinite(kd) and objective == "policy-gradient":
        cause = ("an importance ratio that overflowed: the student moved far from the one that sampled (fewer steps "
                 "per round, a lower --lr, or --ratio gate, which has no unbounded side)")
    elif alpha < 1.0 and not math.isfinite(kd):
        cause = "a non-finite teacher signal (check the store with distill inspect STORE --verify)"
    else:
        cause = "an exploding gradient (lower --lr or set --grad-clip)"
    saved = checkpoint.complete(ckpt_dir)
    last = f"the last checkpoint {saved[-1]} is intact" if saved else "no checkpoint was written yet"
    return (f"step {step}: non-finite loss or gradient (CE {ce:.4g}, KD {kd:.4g}, gradient norm "
            f"{float(grad_norm):.4g}), likely {cause}; weights not updated, no model saved, {last} "
            "(fix the cause, then rerun with --resume auto)")


# ---------------------------------------------------------------------- finish


def leave_preempted(run: Run, step: int, signal_name: str) -> None:
    """Every rank, stopped alike after ``step``: a checkpoint there (unless one exists, or no step
    has run), ``OUT/preempted.json`` (what the batch script requeues on), one line, and status 75."""
    run.loader.close()  # its reader processes (--workers) end with it
    ckpt = run.out / "checkpoints" / f"step-{step:08d}"
    if step > 0 and run.saved_step != step:
        run.save_checkpoint(step)
    line = None
    if run.is_rank0:
        saved = ckpt if step > 0 else None
        record = {"step": step, "signal": signal_name, "checkpoint": str(saved) if saved else None,
                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(run.out / PREEMPTED, json.dumps(record, indent=2, sort_keys=True) + "\n")
        run.metrics.close(preempted=True)
        where = f"checkpoint {saved}; rerun with --resume auto to continue" if saved else \
            "no step had run, so no checkpoint; rerun with --resume auto to start"
        line = f"distill: preempted by {signal_name} at step {step}; {where}"
    if run.world > 1:
        dist.barrier()  # the checkpoint and preempted.json are on disk before any rank leaves
    preempt.leave(line, run.world)


def signal_facts(teacher: TeacherSignal | None, train_store: Store) -> dict[str, Any]:
    """What ``metrics.json`` says of the teacher signal a run used: ``teacher_signal`` (its class, or
    'none'), ``store_kind`` ('topk', 'sampled' or 'hybrid' — a ``topk`` store with drawn tails —;
    None for an online teacher or none) and ``tail`` (the top-k tail treatment applied; None where
    there is none: drawn targets of a ``sampled`` store, an online teacher, CE alone). A hybrid
    store under ``--tail tail`` is read as draws, its tail mass spread over them: ``tail`` then. Across
    tokenizers the store's kind and tail are those of the signal it reads through the alignment."""
    from pipeline.train.cross_signal import CrossTokenizer

    facts = {"teacher_signal": type(teacher).__name__ if teacher is not None else "none", "store_kind": None,
             "tail": None}
    if isinstance(teacher, CrossTokenizer):  # the store's own signal, read across tokenizers
        teacher = teacher.base
    if isinstance(teacher, (StoredSampled, StoredTopK, StoredPolicyGradient)):
        hybrid = train_store.kind == "topk" and bool(train_store.params.get("tail_samples"))
        facts["store_kind"] = "hybrid" if hybrid else train_store.kind
    if isinstance(teacher, StoredTopK):
        facts["tail"] = teacher.tail
    elif isinstance(teacher, StoredSampled) and teacher.hybrid:
        facts["tail"] = "tail"
    return facts


def finish(run: Run, preemption: preempt.Preemption | None = None) -> Path:
    """Last checkpoint, final held-out evaluation, the saved model and metrics.json. A pre-emption
    signal before the model is saved stops it after the checkpoint (the rerun redoes the rest)."""
    config, out = run.config, run.out
    preemption = preemption or preempt.Preemption()
    run.save_checkpoint(config.max_steps)

    def stop() -> str | None:
        return preemption.agreed(run.world)

    if (signal_name := stop()) is not None:
        leave_preempted(run, config.max_steps, signal_name)
    final = {"step": config.max_steps, "tokens": run.tokens_seen, "parameters": run.facts["parameters"],
             "seed": config.seed, "init": config.model,  # the config or the earlier model it started from
             "teacher_source": run.teacher_source, "alpha": run.alpha, "temperature": config.temperature,
             "direction": config.kl_direction, "dtype": config.dtype, "tf32": run.facts["tf32"],
             "save_dtype": config.save_dtype,
             **({"objective": config.objective} if config.objective else {}),
             **({"ratio": config.ratio, "ratio_epsilon": config.ratio_epsilon}
                if config.objective == "policy-gradient" else {}),
             **({"allow_biased_sampler": True} if config.allow_biased_sampler else {}),
             **({"cross_tokenizer": config.cross_tokenizer} if config.cross_tokenizer else {}),
             **signal_facts(getattr(run.wrapped, "module", run.wrapped).teacher, run.train_store)}
    if run.eval_store is not None:
        result = evaluate(run.wrapped, run.eval_store, config.micro_batch_size, 0, run.device, run.autocast, stop,
                          run.eval_byte_lengths)
        if result is None:  # every rank stopped at the same batch, so each asks once more, alike
            leave_preempted(run, config.max_steps, stop())
        final.update(result)
    if run.device.type == "cuda":
        final["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    model_state, _ = distributed.gather_state(run.model, None, run.sharded)
    if run.is_rank0:
        if run.eval_store is not None:
            run.metrics.log(step=config.max_steps, tokens=run.tokens_seen, final=True,
                            **{k: v for k, v in final.items() if k.startswith("heldout")})
        run.metrics.close()
        with disk_full_resumes(out / "model"):
            save_model(run.model, model_state, run.tokenizer, out / "model", config.save_dtype)
        atomic_write_text(out / "metrics.json", json.dumps(final, indent=2, sort_keys=True) + "\n")
        summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k in ("heldout_loss", "heldout_ppl"))
        print(f"{out / 'model'}: saved after {config.max_steps} steps ({run.tokens_seen} tokens)"
              f"{'; ' + summary if summary else ''}")
    if run.world > 1:
        dist.barrier()
    return out / "model"


def save_model(model, state: dict, tokenizer, path: Path, dtype: str) -> None:
    """``save_pretrained`` (safetensors) plus the tokenizer, written to a temp name and renamed; a
    failed write (a full disk) leaves no temp directory, nor does an earlier killed one once this runs."""
    tmp = path.with_name(f".{path.name}.tmp")
    remove_leftovers(path.parent, re.escape(path.name))
    converted: dict[int, torch.Tensor] = {}  # by storage, so tied weights stay one tensor (saved once)
    for v in state.values():
        if v.data_ptr() not in converted:
            converted[v.data_ptr()] = v.detach().to("cpu", DTYPES[dtype])
    state = {k: converted[v.data_ptr()] for k, v in state.items()}
    with removed_if_failed(tmp):
        model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        record_weights_dtype(tmp / "config.json", dtype)
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, path)


def record_weights_dtype(config_json: Path, dtype: str) -> None:
    """Make ``config.json`` say what the saved weights are: ``save_pretrained`` writes the dtype of the
    model's parameters (float32 while training) even where the state dict it saved was converted, so
    ``from_pretrained(dtype="auto")`` (transformers 5's default) would widen bfloat16 weights back to
    float32. ``dtype`` is what transformers reads since 4.56, ``torch_dtype`` what older ones read."""
    config = json.loads(config_json.read_text())
    config["dtype"] = config["torch_dtype"] = dtype
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

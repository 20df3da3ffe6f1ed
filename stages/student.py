"""Train a causal LM from a store: the one training loop of distill.

setup → loop → finish, top to bottom. From a ``tokens`` store the loss is next-token cross-entropy
(this is how the shipped teacher and the CE-only baseline student are trained); stage two extends
this same loop with the distillation term from a ``topk`` store.

Checkpoints hold model, optimizer, scheduler, step, RNG state and data position, so ``--resume auto``
continues exactly where the newest complete checkpoint left off: on CPU with the same seed a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import check, option, save_resolved, to_dict
from pipeline.data import Batches, sequential
from pipeline.errors import DistillError
from pipeline.io import atomic_write_text
from pipeline.losses import next_token_ce
from pipeline.metrics import MetricsLog
from pipeline.models import DTYPES, count_parameters, load_model, max_positions, resolve_device
from pipeline.store import open_store
from pipeline.tokenizer import load_tokenizer, tokenizer_hash, vocab_size

# Changing any of these under a checkpoint would silently change what "resume" means.
RESUME_FIXED = ("train_store", "model", "seed", "micro_batch_size", "grad_accum")


@dataclass(frozen=True)
class TrainConfig:
    train_store: str = option("", "Store to train from ('tokens' store: cross-entropy).")
    eval_store: str = option("", "Held-out 'tokens' store for periodic evaluation (optional).")
    model: str = option("data/models/student.json", "Model config file (train from scratch) or local HF directory.")
    tokenizer: str = option("", "Tokenizer directory (default: the one recorded in the store).")
    out: str = option("", "Output directory: model/, checkpoints/, metrics.jsonl, config.json.")
    seed: int = option(0, "Seed for initialisation and data order.")
    micro_batch_size: int = option(16, "Rows per forward/backward pass.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    max_steps: int = option(1000, "Optimizer steps.")
    lr: float = option(1e-3, "Peak learning rate (AdamW).")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak (cosine decay).")
    warmup_steps: int = option(50, "Linear warmup steps.")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only; not norms, biases).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.95, "AdamW beta2.")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0 = off).")
    eval_every: int = option(100, "Evaluate on the held-out store every N steps (0 = only at the end).")
    eval_rows: int = option(256, "Held-out rows per evaluation (0 = all).")
    checkpoint_every: int = option(100, "Write a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = option(2, "Complete checkpoints to keep.")
    resume: str = option("never", "'auto' (newest complete checkpoint in OUT, or start fresh), 'never', or a path.")
    log_every: int = option(10, "Write a metrics line every N steps.")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = option("float32", "Autocast dtype on CUDA: float32 or bfloat16 (weights stay float32).")
    save_dtype: str = option("float32", "dtype of the saved final model: float32, bfloat16 or float16.")
    overwrite: bool = option(False, "Start over in an OUT that already holds a run.")

    def __post_init__(self):
        problems = []
        if not self.train_store:
            problems.append("no --train-store given")
        if not self.out:
            problems.append("no --out given")
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_rows", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.save_dtype not in DTYPES:
            problems.append(f"save_dtype must be one of {', '.join(DTYPES)}, got {self.save_dtype!r}")
        check(problems, "student")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, store, batch_rows: int, max_rows: int, device, autocast) -> dict[str, float]:
    """Mean next-token loss (nats) and perplexity over the held-out rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in sequential(store, batch_rows, max_rows or None):
        input_ids = batch["input_ids"].to(device)
        with autocast():
            logits = model(input_ids=input_ids).logits
        total += next_token_ce(logits, input_ids, reduction="sum").item()
        count += input_ids[:, 1:].numel()
    model.train(was_training)
    loss = total / count
    return {"heldout_loss": loss, "heldout_ppl": math.exp(loss), "heldout_tokens": count}


def check_store(store, name: str, tok_hash: str, vocab: int, positions: int | None) -> None:
    params = store.params
    if params.get("tokenizer_hash") != tok_hash:
        raise DistillError(f"{name} {store.root} was tokenized with another tokenizer "
                           f"(hash {params.get('tokenizer_hash', '?')[:12]} vs {tok_hash[:12]}); re-run prepare with this tokenizer")
    if params.get("vocab_size") != vocab:
        raise DistillError(f"{name} {store.root} has vocab size {params.get('vocab_size')}, the tokenizer {vocab}")
    if positions is not None and params["seq_len"] > positions:
        raise DistillError(f"{name} {store.root} has sequence length {params['seq_len']}, above the model's "
                           f"maximum of {positions} positions; re-run prepare with --seq-len {positions} or less")


def train(config: TrainConfig) -> Path:
    # ------------------------------------------------------------------ setup
    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    if config.overwrite and out.exists():
        shutil.rmtree(out)
    resume_from = checkpoint.resolve(ckpt_dir, config.resume)
    if resume_from is None and (ckpt_dir.exists() or (out / "metrics.jsonl").exists()) and config.resume != "auto":
        raise DistillError(f"{out} already holds a run; pass --resume auto to continue it or --overwrite to start over")

    train_store = open_store(config.train_store)
    if train_store.kind != "tokens":
        raise DistillError(f"{config.train_store} is a '{train_store.kind}' store; this loop trains from 'tokens' stores")
    tokenizer = load_tokenizer(config.tokenizer or train_store.params["tokenizer"])
    tok_hash, vocab = tokenizer_hash(tokenizer), vocab_size(tokenizer)

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = load_model(config.model).to(device)
    if model.config.vocab_size < vocab:
        raise DistillError(f"model {config.model} has {model.config.vocab_size} output rows, fewer than the "
                           f"tokenizer's {vocab} ids; set vocab_size in the model config to {vocab}")
    positions = max_positions(model.config)
    check_store(train_store, "train store", tok_hash, vocab, positions)
    eval_store = open_store(config.eval_store, kind="tokens") if config.eval_store else None
    if eval_store is not None:
        check_store(eval_store, "eval store", tok_hash, vocab, positions)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.max_steps, config.min_lr_ratio))
    batches = Batches(train_store, config.micro_batch_size, config.seed)
    start_step, tokens_seen = 0, 0
    if resume_from is not None:
        state, saved_config = checkpoint.load(resume_from)
        changed = [k for k in RESUME_FIXED if saved_config["config"].get(k) != getattr(config, k)]
        if changed:
            raise DistillError(f"checkpoint {resume_from} was made with other {', '.join(changed)}; "
                               "resume with the same options or pass --overwrite")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        batches = Batches(train_store, config.micro_batch_size, config.seed,
                          state["data"]["epoch"], state["data"]["offset"])
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        print(f"resumed from {resume_from} at step {start_step}")

    def autocast():
        enabled = device.type == "cuda" and config.dtype == "bfloat16"  # bf16 autocast is slow on CPU
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    facts = {"parameters": count_parameters(model), "device": str(device), "tokenizer_hash": tok_hash,
             "train_rows": train_store.rows, "seq_len": train_store.params["seq_len"]}
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(config, out / "config.json", facts)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if resume_from else None)

    def save_checkpoint(step: int) -> None:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "tokens_seen": tokens_seen, "data": batches.state(),
            "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)}
                                                        if device.type == "cuda" else {})},
        }
        checkpoint.save(ckpt_dir, step, state, {"config": to_dict(config), **facts}, config.keep_checkpoints)

    # ------------------------------------------------------------------ loop
    tokens_per_step = config.micro_batch_size * config.grad_accum * (train_store.params["seq_len"] - 1)
    progress = tqdm(total=config.max_steps * tokens_per_step, initial=start_step * tokens_per_step,
                    desc="train", unit="tok", unit_scale=True, dynamic_ncols=True)
    model.train()
    last_eval: dict[str, float] = {}
    for step in range(start_step, config.max_steps):
        started = time.perf_counter()
        loss_sum = 0.0
        for _ in range(config.grad_accum):
            input_ids = next(batches)["input_ids"].to(device, non_blocking=True)
            with autocast():
                logits = model(input_ids=input_ids).logits
            loss = next_token_ce(logits, input_ids) / config.grad_accum
            loss.backward()
            loss_sum += loss.item()  # sync point, once per micro-batch: cheap next to the backward
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        elapsed = time.perf_counter() - started
        progress.update(tokens_per_step)
        progress.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")
        done = step + 1
        if done % config.log_every == 0 or done == config.max_steps:
            metrics.log(step=done, loss=loss_sum, ce=loss_sum, lr=lr, grad_norm=float(grad_norm),
                        tokens=tokens_seen, tokens_per_s=tokens_per_step / elapsed)
        if eval_store is not None and config.eval_every and done % config.eval_every == 0 and done < config.max_steps:
            last_eval = evaluate(model, eval_store, config.micro_batch_size, config.eval_rows, device, autocast)
            metrics.log(step=done, tokens=tokens_seen, **last_eval)
            progress.write(f"step {done}: held-out loss {last_eval['heldout_loss']:.4f} "
                           f"(ppl {last_eval['heldout_ppl']:.2f})")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.max_steps:
            save_checkpoint(done)
    progress.close()

    # ------------------------------------------------------------------ finish
    save_checkpoint(config.max_steps)
    final = {"step": config.max_steps, "tokens": tokens_seen, "parameters": facts["parameters"]}
    if eval_store is not None:
        final.update(evaluate(model, eval_store, config.micro_batch_size, 0, device, autocast))
        metrics.log(step=config.max_steps, tokens=tokens_seen, **{k: v for k, v in final.items() if k.startswith("heldout")})
    metrics.close()
    model_dir = out / "model"
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(DTYPES[config.save_dtype]).save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    import json

    atomic_write_text(out / "metrics.json", json.dumps(final, indent=2, sort_keys=True) + "\n")
    summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k in ("heldout_loss", "heldout_ppl"))
    print(f"{model_dir}: saved after {config.max_steps} steps ({tokens_seen} tokens){'; ' + summary if summary else ''}")
    return model_dir

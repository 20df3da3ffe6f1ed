"""``distill inspect STORE``: what a store holds and what it costs; ``--verify`` checks every shard
against the checksums and content hash in its index, and ``--repair`` drops the records of bad
shards so that rerunning stage one recomputes just those."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import check, option
from pipeline.errors import DistillError
from pipeline.store.contract import INDEX, PARTIAL_NAME, open_store, repair


@dataclass(frozen=True)
class InspectConfig:
    store: str = option("", "Store directory.")
    verify: bool = option(False, "Check every shard against its chunk checksums and content hash (reads the whole "
                          "store); lists every bad shard.")
    repair: bool = option(False, "With --verify, on a stage-one store: forget bad or missing shards (their records in "
                          "the index and partial indexes, and their files), so that rerunning the same stage-one "
                          "command recomputes just those.")
    max_rows: int = option(2048, "Rows sampled (the first ones) for the distribution statistics; 0 = all.")
    json: bool = option(False, "Print the report as JSON.")

    def __post_init__(self):
        problems = [] if self.store else ["no store given"]
        if self.max_rows < 0:
            problems.append(f"max_rows must be 0 (all) or a positive number of rows, got {self.max_rows}")
        if self.repair and not self.verify:
            problems.append("--repair acts on what --verify finds: pass --verify --repair")
        check(problems, "inspect")


def unfinished_store(path: str) -> None:
    """A store still being written (partial indexes, no index.json yet) is status's, not inspect's."""
    root = Path(path)
    if root.is_dir() and not os.path.lexists(root / INDEX) and any(PARTIAL_NAME.match(p.name) for p in root.iterdir()):
        raise DistillError(f"store {root} has no {INDEX} yet: its stage-one jobs are still writing it (or stopped "
                           f"before the end); 'distill status {root}' shows its progress")
    if not os.path.lexists(root) and root.parent.is_dir() and any(
            p.name.startswith(f".{root.name}.tmp-") for p in root.parent.iterdir()):
        raise DistillError(f"store {root} does not exist yet: distill prepare is writing it (or was stopped); "
                           f"'distill status {root}' shows its progress")


def percentiles(values: np.ndarray) -> dict[str, float]:
    qs = (1, 5, 25, 50, 75, 95, 99)
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(values, qs))} | {"mean": float(values.mean())}


def inspect_store(config: InspectConfig) -> dict:
    if config.repair:
        return repair_store(config)
    unfinished_store(config.store)
    store = open_store(config.store, check=not config.verify)  # --verify names every bad shard at once
    if config.verify:
        store.verify()
    params, index = store.params, store.index
    seq_len = params["seq_len"]
    tokens = store.rows * seq_len
    report = {
        "store": str(store.root),
        "kind": store.kind,
        "backend": index["backend"],
        "format_version": index["format_version"],
        "rows": store.rows,
        "seq_len": seq_len,
        "tokens": tokens,
        "shards": len(store.shards),
        "bytes": index["bytes"],
        "bytes_per_token": index["bytes"] / tokens,
    }
    if config.verify:
        report["verified_shards"] = len(store.shards)
    if "loss_mask" in index["arrays"]:  # task examples: the share of next-token targets stage two trains on
        rows = store.rows if config.max_rows == 0 else min(config.max_rows, store.rows)
        report |= {"format": params.get("format"),
                   "loss_mask_share": float(store.read_rows(0, rows)["loss_mask"][:, :-1].mean())}
    if store.kind == "topk":
        report |= {"teacher": params["teacher"], "top_k": params["top_k"], "temperature": params["temperature"],
                   "temperature_grid": params["temperature_grid"]}
        report |= distribution_report(store, config.max_rows)
    if store.kind == "target":
        report |= {"teacher": params["teacher"], "temperature": params["temperature"]}
        report |= target_report(store, config.max_rows)
    draws = "sample" if store.kind == "sampled" else "tail_sample" if params.get("tail_samples") else None
    if store.kind == "sampled":
        report |= {"teacher": params["teacher"], "samples": params["samples"], "temperature": params["temperature"],
                   "temperature_grid": params["temperature_grid"]}
    if draws:
        report |= draws_report(store, draws, config.max_rows)
    if config.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                value = "  ".join(f"{k} {v:.4f}" for k, v in value.items())
            elif isinstance(value, float):
                value = f"{value:.4f}"
            print(f"{key:>22}  {value}")
    return report


def distribution_report(store, max_rows: int) -> dict:
    """Kept-mass percentiles per grid temperature and teacher entropy, from the first rows."""
    params = store.params
    grid, t_cache = params["temperature_grid"], params["temperature"]
    rows = store.rows if max_rows == 0 else min(max_rows, store.rows)
    arrays = store.read_rows(0, rows)
    tail = arrays["tail_logmass"][:, :-1].astype(np.float64)  # the last position of a row has no target
    out = {}
    for g, t in enumerate(grid):
        out[f"kept_mass_T{t:g}"] = percentiles(1.0 - np.exp(tail[..., g]).reshape(-1))
    # Entropy at the cache temperature, in nats. The tail's own spread is not stored, so it is
    # bounded: as one bucket (lower bound) or spread evenly over the V − k other ids (upper bound).
    lp = arrays["topk_logprobs"][:, :-1].astype(np.float64)
    tail_t = tail[..., grid.index(t_cache)]
    tail_mass = np.exp(tail_t)
    kept_entropy = -(np.exp(lp) * lp).sum(-1)
    bucket = np.where(tail_mass > 0, -tail_mass * tail_t, 0.0)
    spread = bucket + tail_mass * np.log(max(params["vocab_size"] - params["top_k"], 1))
    out[f"entropy_lower_bound_T{t_cache:g}"] = percentiles((kept_entropy + bucket).reshape(-1))
    out[f"entropy_upper_bound_T{t_cache:g}"] = percentiles((kept_entropy + spread).reshape(-1))
    if 1.0 in grid:  # the teacher's own next-token loss at T=1, re-tempered exactly from the target's logit
        lse = arrays["logsumexp"][:, :-1].astype(np.float64)
        logit = t_cache * (arrays["target_logprob"][:, :-1].astype(np.float64) + lse[..., grid.index(t_cache)])
        out["teacher_loss_nats_T1"] = float(-(logit - lse[..., grid.index(1.0)]).mean())
    out["top1_is_target"] = float((arrays["topk_ids"][:, :-1, 0] == arrays["input_ids"][:, 1:]).mean())
    return out


def target_report(store, max_rows: int) -> dict:
    """A target store, from the first rows: what each scored token costs uncompressed (the teacher's
    log-prob, 4 bytes, beside the copied arrays) and the teacher's mean log-prob of the scored tokens;
    with the sampling policy's log-probs also the mean of log p_policy − log p_teacher over them, a
    one-sample estimate of KL(policy ‖ teacher) per token when the policy sampled at the cache temperature."""
    rows = store.rows if max_rows == 0 else min(max_rows, store.rows)
    arrays = store.read_rows(0, rows)
    per_position = sum(np.dtype(spec["dtype"]).itemsize * int(np.prod(spec["shape"][1:], dtype=np.int64))
                       for spec in store.index["arrays"].values())
    scored = np.zeros(arrays["input_ids"].shape, bool)
    scored[:, :-1] = arrays["loss_mask"][:, :-1] > 0 if "loss_mask" in arrays else True
    target = arrays["target_logprob"].astype(np.float64)
    out = {"raw_bytes_per_position": float(per_position), "scored_positions": int(scored.sum()),
           "teacher_logprob_scored_mean": float(target[scored].mean()) if scored.any() else float("nan")}
    if "behaviour_logprob" in arrays and scored.any():
        out["policy_minus_teacher_nats_mean"] = float((arrays["behaviour_logprob"][scored] - target[scored]).mean())
    return out


def draws_report(store, prefix: str, max_rows: int) -> dict:
    """Distinct drawn ids per position (what the store pays for) and, for a sampled store, how often
    the true next token was among them, from the first rows."""
    rows = store.rows if max_rows == 0 else min(max_rows, store.rows)
    arrays = store.read_rows(0, rows)
    counts = arrays[f"{prefix}_counts"][:, :-1]
    out = {f"{prefix}_unique_ids_per_position": percentiles((counts > 0).sum(-1).reshape(-1).astype(np.float64))}
    if prefix == "sample":
        drawn = (arrays["sample_ids"][:, :-1] == arrays["input_ids"][:, 1:, None]) & (counts > 0)
        out["target_drawn"] = float(drawn.any(-1).mean())
    return out


def repair_store(config: InspectConfig) -> dict:
    """``--verify --repair``: say what was bad and which stage-one jobs recompute it."""
    done = repair(config.store)
    report = {"store": config.store, "verified_shards": done.checked - len(done.bad), "bad_shards": done.bad}
    if config.json:
        print(json.dumps(report | {"owners": done.owners}, indent=2))
        return report
    for name, why in done.bad.items():
        print(f"bad shard {name}: {why}; removed")
    if not done.bad:
        state = ("the store is complete" if done.complete else
                 f"the store is unfinished: rerun its stage-one jobs, or 'distill merge {config.store}' if all ran")
        print(f"{config.store}: all {done.checked} recorded shards verify; nothing to repair ({state})")
        return report
    jobs = sorted(set(done.owners.values()))
    n = jobs[0][1]
    tasks = ", ".join(str(j) for j, _ in jobs)
    print(f"{config.store}: {len(done.bad)} of {done.checked} shards removed; the store is incomplete until they "
          f"are recomputed: rerun the same 'distill teacher' command"
          + (f" (--shard-index {tasks} of --num-shards {n})" if n > 1 else "")
          + f", then 'distill inspect {config.store} --verify'")
    return report

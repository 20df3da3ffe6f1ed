"""Generate: the teacher writes a synthetic corpus — the paper's "collection of training examples
produced by the instructor model" — that ``distill prepare`` reads like any other JSONL corpus.

setup → loop → finish. Records are numbered ``i = prompt · S + sample`` (S = samples per prompt;
``--unconditional N`` stands for N empty prompts, the completion starting from BOS). Record ``i``
is drawn from its own key (``pipeline.decode.generation.record_keys``: seed, prompt, sample, attempt), so
it is the same in any batch, array job or rerun.

Parallel and resumable: job ``j`` of ``n`` owns records ``i ≡ j (mod n)`` and writes them, in
order, in parts of ``--records-per-part`` records: ``OUT/parts/job-JJJJJ-of-NNNNN.part-KKKKK``
(JSON lines), each written under a temp name, fsynced and renamed into place, then recorded with
its record count and sha256 in the job's progress index ``OUT/parts/index.job-JJJJJ-of-NNNNN.json``
(replaced atomically). A kill loses at most the part in flight: a rerun skips the parts its index
records and recomputes any other one (a part renamed but not yet recorded is recomputed to the same
records and replaces itself), so no record is written twice or lost. When every job's index covers
all its parts, the parts are merged in record order into ``OUT/generated.jsonl`` (temp + rename;
then ``OUT/summary.json``) by whichever job finishes last, or by rerunning any job. Records no
attempt could make satisfy ``--rules`` are flagged ``unsatisfiable`` in their part and listed in
the summary, not merged.

Each record holds its text (``prompt``, ``completion``, ``text``) and, for on-policy stages, what
the model saw and drew (record format 2): ``prompt_ids`` (BOS included where added),
``completion_ids`` (the EOS included where the record ended at it, finish 'eos') and
``completion_logprobs``, the natural log of the probability each id was drawn with under the
distribution actually sampled (temperature, top-k / top-p renormalised, rules-masked; 0.0 when
greedy). ``settings`` says which distribution that was (temperature, ``greedy``, top-k, top-p, the
rules' digest) beside the seed and budgets. ``prepare --format ids`` stores the ids and log-probs as
they are and the sampler in the store's params; ``--objective policy-gradient`` refuses a sampler its
ratio cannot correct. ``--model`` names the writer when it is the student (``--teacher`` is the same
option).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from pipeline.checks import check_output_rows
from pipeline.config import array_job_problems, check, option, required, save_resolved
from pipeline.decode.generation import ATTEMPTS_MAX, SAMPLES_PER_PROMPT_MAX, CausalLM, Decoded, Sampling, decode, record_keys
from pipeline.decode.rules import Rules, load_rules, violations
from pipeline.errors import DistillError
from pipeline.io import atomic_write, atomic_write_bytes, atomic_write_text, file_sha256
from pipeline.models import (ATTN_HELP, AUTO_DTYPE_HELP, TF32_HELP, attn_implementation_problems, device_problems,
                             dtype_problems, has_weights, hf_config, load_model, matmul_precision, max_positions,
                             resolve_device, resolve_dtype, set_tf32)
from pipeline.outdir import GENERATED, claim, clear
from pipeline.store.contract import JobLock, param_differences, safe_child
from pipeline.text.corpus import jsonl_values, read_lines
from pipeline.text.tokenizer import load_tokenizer, vocab_size
from pipeline.threads import THREADS_HELP, set_threads, threads_problems
from stages.teacher import weights_sha256

FORMAT = 2  # 2: every record also carries prompt_ids, completion_ids (EOS included) and completion_logprobs
DEFAULT_MODEL = "data/models/teacher"
OUTPUT, SUMMARY, PARTS = "generated.jsonl", "summary.json", "parts"
TEXT_MODES = ("prompt+completion", "completion")


@dataclass(frozen=True)
class GenerateConfig:
    prompts: str = option("", "Prompts file: JSONL (.jsonl, .jsonl.gz; the prompt under --prompt-field) or text "
                          "(one prompt per line; blank lines skipped).")
    prompt_field: str = option("prompt", "JSONL field that holds the prompt.")
    unconditional: int = option(0, "Instead of --prompts: N completions from BOS alone (empty prompts).")
    out: str = option("", "Output directory: generated.jsonl (the corpus), summary.json, parts/ (resume state).")
    teacher: str = option(DEFAULT_MODEL, "Local Hugging Face causal LM directory (with weights) that writes.")
    model: str = option("", "The same as --teacher, under the name that fits when the student writes (on-policy "
                        "rounds); give one of them.")
    tokenizer: str = option("", "Tokenizer directory (default: the model's directory).")
    temperature: float = option(1.0, "Sampling temperature; 0 = greedy (argmax, one sample per prompt).")
    top_k: int = option(0, "Draw only among the k most probable tokens (0 = all).")
    top_p: float = option(1.0, "Draw only among the most probable tokens whose mass reaches p, in (0, 1] (1 = all).")
    max_new_tokens: int = option(128, "Completion tokens at most (EOS stops earlier).")
    samples_per_prompt: int = option(1, "Completions per prompt, each drawn from its own key.")
    seed: int = option(0, "Seed: record (prompt, sample) is drawn from (seed, prompt, sample) in any job or rerun.")
    text: str = option("prompt+completion", "What a record's 'text' field (what prepare reads) holds: "
                       "'prompt+completion' or 'completion'.")
    add_bos: bool = option(True, "Begin each prompt with the tokenizer's BOS token (EOS where it has none), as "
                           "documents begin in a packed training corpus.")
    rules: str = option("", "YAML rule file enforced while decoding (pipeline/decode/rules.py: banned, required, regex, "
                        "charset, vocabulary, max_tokens, max_words).")
    max_attempts: int = option(4, "Draws of a record (fresh randomness each) before it is reported unsatisfiable "
                               "under --rules.")
    batch_size: int = option(8, "Records decoded together (does not change any record).")
    records_per_part: int = option(256, "Records per part file: the unit of resume after a kill.")
    shard_index: int = option(0, "This job's index among --num-shards jobs (a SLURM array task id).")
    num_shards: int = option(1, "Number of independent jobs: job j writes records i with i % n == j.")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int = option(0, THREADS_HELP)
    dtype: str = option("auto", "Compute dtype of the model that writes: auto, float32, bfloat16 or float16 (the "
                        "sampling distribution is computed in float32 from its logits). " + AUTO_DTYPE_HELP
                        + " The resolved dtype is one of the output's params.")
    tf32: bool = option(True, TF32_HELP)
    attn_implementation: str = option("auto", ATTN_HELP)
    trust_remote_code: bool = option(False, "Allow the teacher directory's own model code to run.")
    overwrite: bool = option(False, "Replace an output directory written with other parameters (single job only).")

    def __post_init__(self):
        problems = required(self, "out")
        if self.model and self.teacher not in (DEFAULT_MODEL, self.model):
            problems.append("--model and --teacher both name the model that writes; give one of them")
        if bool(self.prompts) == bool(self.unconditional):
            problems.append("give either --prompts FILE or --unconditional N (not both)")
        if self.unconditional < 0:
            problems.append(f"unconditional must not be negative, got {self.unconditional}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            problems.append(f"temperature must be > 0, or 0 for greedy decoding, got {self.temperature}")
        if self.temperature == 0 and self.samples_per_prompt > 1:
            problems.append("--temperature 0 is greedy: every sample of a prompt would be the same; "
                            "use --samples-per-prompt 1 or a temperature > 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 1 <= self.samples_per_prompt <= SAMPLES_PER_PROMPT_MAX:
            problems.append(f"samples_per_prompt must be in [1, {SAMPLES_PER_PROMPT_MAX}], got {self.samples_per_prompt}")
        if not 1 <= self.max_attempts <= ATTEMPTS_MAX:
            problems.append(f"max_attempts must be in [1, {ATTEMPTS_MAX}], got {self.max_attempts}")
        if self.text not in TEXT_MODES:
            problems.append(f"text must be one of {', '.join(TEXT_MODES)}, got {self.text!r}")
        for name in ("batch_size", "records_per_part"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        problems += dtype_problems(self.dtype) + device_problems(self.device) + threads_problems(self.threads)
        problems += attn_implementation_problems(self.attn_implementation, self.device, self.dtype)
        problems += array_job_problems(self.shard_index, self.num_shards, self.overwrite, "output")
        check(problems, "generate")

    @property
    def writer(self) -> str:
        """The model that writes: --model, else --teacher."""
        return self.model or self.teacher


@dataclass
class GenerateJob:
    """What setup gives the loop: this job's records, the teacher, the rules, where progress goes."""

    config: GenerateConfig
    out: Path
    prompts: list[str]
    prompt_ids: list[list[int]]
    params: dict  # what decides every record (the progress index's and summary's params)
    lm: CausalLM
    tokenizer: object
    rules: Rules | None
    budget: int  # completion tokens at most
    todo: list[int]  # part numbers this job still has to write
    done: dict[str, dict]  # progress entries of this job's finished parts, by name
    lock: JobLock

    @property
    def records(self) -> range:
        """Global ids of this job's records, in the order its parts hold them."""
        total = len(self.prompts) * self.config.samples_per_prompt
        return range(self.config.shard_index, total, self.config.num_shards)

    def record_progress(self, entry: dict) -> None:
        self.done[entry["name"]] = entry
        body = {"format": FORMAT, "job": self.config.shard_index, "jobs": self.config.num_shards,
                "params": self.params, "parts": sorted(self.done.values(), key=lambda e: e["part"])}
        atomic_write_text(index_path(self.out, self.config.shard_index, self.config.num_shards),
                          json.dumps(body, indent=1, ensure_ascii=False) + "\n")


def part_name(job: int, jobs: int, part: int) -> str:
    return f"job-{job:05d}-of-{jobs:05d}.part-{part:05d}"


def index_path(out: Path, job: int, jobs: int) -> Path:
    return out / PARTS / f"index.job-{job:05d}-of-{jobs:05d}.json"


def part_path(out: Path, entry: dict) -> Path:
    """Where the part a progress entry records lies: a plain name in ``OUT/parts``, as shard names
    in a store (:func:`safe_child`), so a progress index read off disk never points elsewhere."""
    name = entry.get("name") if isinstance(entry, dict) else None
    try:
        return safe_child(out / PARTS, name if isinstance(name, str) else "")
    except DistillError:
        raise DistillError(f"a progress index in {out / PARTS} names part {name!r}, which is not a plain file name: "
                           "the index is damaged or hostile; delete that job's index.job-*.json and rerun the "
                           "job") from None


def generate(config: GenerateConfig) -> Path:
    job = setup(config)
    if job is None:
        return Path(config.out) / OUTPUT
    try:
        records, tokens, seconds = write_parts(job)
    finally:
        job.lock.release()
    # ------------------------------------------------------------------ finish
    rate = f", {records / seconds:.1f} records/s, {tokens / seconds:.0f} tokens/s" if records else ""
    print(f"{job.out}: job {config.shard_index}/{config.num_shards} holds {len(job.done)} parts "
          f"({len(job.todo)} written now{rate})")
    try:
        return merge_generated(job.out)
    except DistillError as e:
        if config.num_shards == 1:
            raise
        print(f"{job.out}: not merged yet ({e})")
        return job.out / OUTPUT


def setup(config: GenerateConfig) -> GenerateJob | None:
    """Check every input before anything is written; None when the output is already complete."""
    threads = set_threads(config.threads)  # before anything runs torch: see pipeline/threads.py
    prompts = read_prompts(config) if config.prompts else [""] * config.unconditional
    teacher_dir = Path(config.writer)
    if not has_weights(teacher_dir):
        raise DistillError(f"model {teacher_dir} is not a local Hugging Face model directory with weights; pass "
                           "--teacher (or --model) a directory written by save_pretrained (config.json and "
                           "model.safetensors)")
    tokenizer = load_tokenizer(config.tokenizer or teacher_dir, config.trust_remote_code)
    vocab = vocab_size(tokenizer)
    teacher_config = hf_config(teacher_dir, config.trust_remote_code)
    check_output_rows("teacher", teacher_dir, teacher_config.vocab_size, vocab,
                      "pass the teacher's own tokenizer with --tokenizer", max_padding=max(1024, vocab // 10))
    if config.top_k > vocab:
        raise DistillError(f"--top-k {config.top_k} is larger than the vocabulary ({vocab} ids); lower it or pass 0")
    rules = None
    if config.rules:
        rules = Rules(load_rules(config.rules), tokenizer, config.max_new_tokens)
    budget = rules.budget if rules is not None else config.max_new_tokens
    prompt_ids = tokenize_prompts(prompts, tokenizer, config.add_bos)
    positions = max_positions(teacher_config)
    if positions is not None:
        longest = max(range(len(prompt_ids)), key=lambda p: len(prompt_ids[p]))
        if len(prompt_ids[longest]) + budget > positions:
            raise DistillError(f"prompt {longest} is {len(prompt_ids[longest])} tokens; with {budget} new tokens "
                               f"it exceeds the teacher's {positions} positions; shorten it or lower --max-new-tokens")

    # --dtype auto resolves on the device the model will run on, before the params that record it are compared
    requested, device = config.dtype, resolve_device(config.device)
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, device))
    tf32 = set_tf32(device, config.tf32)
    params = generate_params(config, prompts, rules, vocab, device)
    out = Path(config.out)
    decision = existing_output(out, params, config.overwrite)
    if decision == "done":
        print(f"{out}: complete with the same parameters already; nothing to do")
        return None
    existed = out.exists()
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    lock = JobLock(out / PARTS, config.shard_index, config.num_shards)  # one process per job at a time
    try:
        model = load_model(teacher_dir, config.dtype, config.trust_remote_code,
                           attn_implementation=config.attn_implementation).to(device).eval()
    except BaseException:  # unreadable weights, ...: leave OUT as it was
        lock.release()
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if decision == "replace":  # only now that the teacher has loaded; only what generate writes (checked again)
        try:
            clear(out, GENERATED, keep=(lock.path,))
        except BaseException:
            lock.release()
            raise

    progress_file = index_path(out, config.shard_index, config.num_shards)
    progress = read_progress(progress_file)
    if progress and progress["params"] != params:  # another run's parts: refused above unless --overwrite
        progress = {}
    done = {e["name"]: e for e in progress.get("parts", []) if part_path(out, e).exists()}
    n_records = len(range(config.shard_index, len(prompts) * config.samples_per_prompt, config.num_shards))
    n_parts = math.ceil(n_records / config.records_per_part)
    names = [part_name(config.shard_index, config.num_shards, k) for k in range(n_parts)]
    todo = [k for k in range(n_parts) if names[k] not in done]
    lock.remove_stale_temps([*names, progress_file.name])
    save_resolved(config, out / f"config.job-{config.shard_index:05d}-of-{config.num_shards:05d}.json",
                  {"params": params, "parts_planned": n_parts, "records_planned": n_records,
                   "dtype_requested": requested, "tf32": tf32, **threads})
    return GenerateJob(config, out, prompts, prompt_ids, params, CausalLM(model, vocab), tokenizer, rules, budget,
                       todo, done, lock)


def read_prompts(config: GenerateConfig) -> list[str]:
    """The prompts, in file order: JSONL values of --prompt-field, or the non-blank lines of a text file."""
    path = Path(config.prompts)
    if not path.is_file():
        raise DistillError(f"prompts file {path} does not exist; check --prompts")
    prompts: list[str] = []
    lines = read_lines(path, hint="convert the file to UTF-8")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for lineno, value in jsonl_values(lines, path):
            if not isinstance(value, dict) or config.prompt_field not in value:
                raise DistillError(f"{path}:{lineno}: no '{config.prompt_field}' field; pass --prompt-field with the "
                                   "field holding the prompt")
            if not isinstance(value[config.prompt_field], str):
                raise DistillError(f"{path}:{lineno}: field '{config.prompt_field}' is not a string")
            prompts.append(value[config.prompt_field])
    else:
        prompts = [line.rstrip("\r\n") for _, _, line in lines if line.strip()]
    if not prompts:
        raise DistillError(f"prompts file {path} holds no prompts; give one per line (text) or per JSONL record")
    return prompts


def tokenize_prompts(prompts: list[str], tokenizer, add_bos: bool) -> list[list[int]]:
    """Each prompt's ids, beginning with BOS (EOS where the tokenizer has none) when ``add_bos``; an
    empty prompt without one is refused (nothing to condition on)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    out = []
    for index, ids in enumerate(encoded):
        ids = list(ids)
        if add_bos and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if not ids:
            raise DistillError(f"prompt {index} is empty and --no-add-bos leaves nothing to condition on; "
                               "drop it or keep --add-bos")
        out.append(ids)
    return out


def generate_params(config: GenerateConfig, prompts: list[str], rules: Rules | None, vocab: int,
                    device: torch.device | str = "cpu") -> dict:
    """What decides the records: a rerun with other params is refused, the same ones resume. (Batch
    size, job count and device do not change a record, and are not here; ``dtype`` is the resolved one,
    and ``matmul_precision`` appears only where TF32 reaches float32 compute on ``device``.)"""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode() + b"\0")
    return {
        "prompts": config.prompts or None,
        "prompts_sha256": digest.hexdigest(),
        "prompt_count": len(prompts),
        "record_format": FORMAT,
        "teacher": str(Path(config.writer)),
        "teacher_weights_sha256": weights_sha256(Path(config.writer)),
        "tokenizer": str(config.tokenizer or config.writer),
        "vocab_size": vocab,
        "add_bos": config.add_bos,
        "dtype": config.dtype,
        **({"matmul_precision": "tf32"} if matmul_precision(device, config.dtype, config.tf32) == "tf32" else {}),
        "text": config.text,
        "records_per_part": config.records_per_part,
        "settings": record_settings(config, rules),
    }


def record_settings(config: GenerateConfig, rules: Rules | None) -> dict:
    """The sampling settings every record carries (plus ``greedy``, :func:`make_record`): among them the
    sampler, everything that shapes the distribution its ``completion_logprobs`` are log-probs of
    (temperature, top-k, top-p, the rules' digest: :func:`pipeline.text.examples.sampler_of`), which
    ``prepare --format ids`` carries into the store for ``--objective policy-gradient`` to check."""
    return {"seed": config.seed, "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens, "samples_per_prompt": config.samples_per_prompt,
            "rules": rules.spec.source if rules else None, "rules_sha256": rules.spec.sha256 if rules else None,
            "max_attempts": config.max_attempts if rules else None}


def existing_output(out: Path, params: dict, overwrite: bool) -> str:
    """'done' (a merged output with these params), 'resume' (none, or parts with these params) or
    'replace' (other params, with --overwrite); other params without --overwrite are refused, and so is,
    with or without it, anything in OUT that generate does not write (:data:`GENERATED`)."""
    claim(out, GENERATED, overwrite)
    summary = read_progress(out / SUMMARY)
    if summary and summary.get("params") == params and (out / OUTPUT).is_file() \
            and file_sha256(out / OUTPUT) == summary.get("sha256"):
        return "done"
    earlier = [read_progress(p) for p in sorted((out / PARTS).glob("index.job-*.json"))] if out.is_dir() else []
    earlier = [e for e in earlier + [summary] if e]
    for other in earlier:
        if other.get("params") != params:
            if overwrite:
                return "replace"
            what = "; ".join(param_differences(other.get("params", {}), params)[:4])
            raise DistillError(f"{out} holds records generated with other parameters ({what}); pass --overwrite to "
                               "replace them, or another --out")
    return "resume"


def read_progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise DistillError(f"{path} is not readable JSON; delete it (its job recomputes what it recorded)") from None


# ---------------------------------------------------------------------------------------- loop


def write_parts(job: GenerateJob) -> tuple[int, int, float]:
    """The loop: each part this job still owes, decoded in batches and written atomically, then
    recorded in the job's progress index. Returns (records, completion tokens, seconds)."""
    config, records = job.config, job.records
    per_part = config.records_per_part
    total_records = total_tokens = 0
    started = time.perf_counter()
    done_records = sum(e["records"] for e in job.done.values())
    with tqdm(total=len(records), initial=done_records, desc=f"generate {config.shard_index}/{config.num_shards}",
              unit="rec", dynamic_ncols=True) as bar:
        for k in job.todo:
            ids = list(records[k * per_part:(k + 1) * per_part])
            lines, tokens, unsatisfiable = [], 0, []
            for record in generate_records(job, ids, bar):
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                tokens += record["completion_tokens"]
                if record.get("unsatisfiable"):
                    unsatisfiable.append(record["id"])
            name = part_name(config.shard_index, config.num_shards, k)
            data = "".join(lines).encode()
            atomic_write_bytes(job.out / PARTS / name, data)
            job.record_progress({"name": name, "part": k, "records": len(ids), "first": ids[0], "last": ids[-1],
                                 "tokens": tokens, "unsatisfiable": unsatisfiable, "bytes": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()})
            total_records += len(ids)
            total_tokens += tokens
            seconds = time.perf_counter() - started
            bar.set_postfix_str(f"{total_tokens / seconds:.0f} tok/s")
    return total_records, total_tokens, time.perf_counter() - started


def generate_records(job: GenerateJob, ids: list[int], bar) -> list[dict]:
    """The records ``ids`` (global ids), in that order. Decoded in batches of similar prompt
    length (a record does not depend on its batch); under rules, a record that hits a dead end or
    breaks a rule is drawn again with the next attempt's key, up to --max-attempts."""
    config = job.config
    samples = config.samples_per_prompt
    sampling = Sampling(config.temperature, config.top_k, config.top_p)
    results: dict[int, tuple[Decoded, str, list[str], int]] = {}
    pending = [(i, 0) for i in sorted(ids, key=lambda i: (len(job.prompt_ids[i // samples]), i))]
    while pending:
        retry = []
        for start in range(0, len(pending), config.batch_size):
            batch = pending[start:start + config.batch_size]
            prompt_index = torch.tensor([i // samples for i, _ in batch])
            keys = record_keys(config.seed, prompt_index, torch.tensor([i % samples for i, _ in batch]),
                               torch.tensor([a for _, a in batch]))
            decoded = decode(job.lm, [job.prompt_ids[p] for p in prompt_index.tolist()], keys, sampling,
                             job.budget, job.tokenizer.eos_token_id, job.rules,
                             [job.prompts[p] for p in prompt_index.tolist()])
            for (i, attempt), d in zip(batch, decoded):
                completion = job.tokenizer.decode(d.tokens, clean_up_tokenization_spaces=False)
                broken = []
                if job.rules is not None:
                    broken = violations(job.rules.spec, completion, len(d.tokens), job.prompts[i // samples])
                    if d.finish == "dead-end":
                        broken = ["dead end: the rules left no token to draw", *broken]
                if broken and attempt + 1 < config.max_attempts:
                    retry.append((i, attempt + 1))
                    continue
                results[i] = (d, completion, broken, attempt + 1)
                bar.update(1)
        pending = retry
    return [make_record(job, i, *results[i]) for i in ids]


def make_record(job: GenerateJob, i: int, decoded: Decoded, completion: str, broken: list[str], attempts: int) -> dict:
    config = job.config
    prompt_index, sample_index = divmod(i, config.samples_per_prompt)
    prompt = job.prompts[prompt_index]
    completion_ids, completion_logprobs = decoded.completion(job.tokenizer.eos_token_id)
    # greedy is said outright, though temperature 0 implies it; it is not in the params, so an output
    # written before records said it still resumes
    settings = {**job.params["settings"], "greedy": config.temperature == 0}
    record = {"id": i, "prompt_index": prompt_index, "sample_index": sample_index, "prompt": prompt,
              "completion": completion, "text": prompt + completion if config.text == "prompt+completion" else completion,
              "teacher": job.params["teacher"], "settings": settings,
              "completion_tokens": len(decoded.tokens), "finish_reason": decoded.finish,
              # what the model saw and drew: prepare --format ids stores these as they are, for on-policy stages
              "prompt_ids": job.prompt_ids[prompt_index], "completion_ids": completion_ids,
              "completion_logprobs": completion_logprobs}
    if job.rules is not None:
        record["attempts"] = attempts
        if broken:
            record["unsatisfiable"] = True
            record["violations"] = broken
    return record


# --------------------------------------------------------------------------------------- merge


def merge_generated(out: Path) -> Path:
    """Check that the jobs' progress indexes cover every record once, then write ``generated.jsonl``
    (record order, unsatisfiable records left out) and ``summary.json``. Safe to run again."""
    indexes = [read_progress(p) for p in sorted((out / PARTS).glob("index.job-*.json"))]
    indexes = [i for i in indexes if i]
    if not indexes:
        raise DistillError(f"{out} holds no finished parts; run distill generate first")
    params, jobs = indexes[0]["params"], indexes[0]["jobs"]
    for index in indexes[1:]:
        if index["params"] != params or index["jobs"] != jobs:
            raise DistillError(f"{out}: the jobs' progress indexes disagree (parameters or --num-shards); "
                               "rerun the odd jobs with the same options")
    total = params["prompt_count"] * params["settings"]["samples_per_prompt"]
    per_part = params["records_per_part"]
    by_job = {index["job"]: index for index in indexes}
    missing = []
    for job in range(jobs):
        n_parts = math.ceil(len(range(job, total, jobs)) / per_part)
        have = {e["part"] for e in by_job.get(job, {}).get("parts", [])}
        missing += [f"job {job} part {k}" for k in range(n_parts) if k not in have]
    if missing:
        raise DistillError(f"{len(missing)} parts still to write ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})")

    def job_records(index: dict) -> Iterator[tuple[int, str]]:
        for entry in sorted(index["parts"], key=lambda e: e["part"]):
            path = part_path(out, entry)
            data = path.read_bytes() if path.is_file() else b""
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise DistillError(f"{path} is missing or changed since it was written; delete it and rerun job "
                                   f"{index['job']}, which recomputes it")
            for line in data.decode().splitlines(keepends=True):
                yield json.loads(line)["id"], line

    digest, records, tokens, unsatisfiable, last = hashlib.sha256(), 0, 0, [], -1

    def write(f) -> None:
        nonlocal records, tokens, last
        # a job that owns no record (more jobs than records) writes no index: nothing of it to merge
        for i, line in heapq.merge(*(job_records(by_job[j]) for j in sorted(by_job))):
            if i != last + 1:
                raise DistillError(f"{out}: record {last + 1} is missing from the parts; rerun the job that owns it")
            last = i
            record = json.loads(line)
            if record.get("unsatisfiable"):
                unsatisfiable.append({"id": i, "violations": record["violations"]})
                continue
            f.write(line.encode())
            digest.update(line.encode())
            records += 1
            tokens += record["completion_tokens"]

    atomic_write(out / OUTPUT, write)
    atomic_write_text(out / SUMMARY, json.dumps({
        "format": FORMAT, "params": params, "records": records, "completion_tokens": tokens,
        "unsatisfiable": unsatisfiable, "jobs": jobs, "sha256": digest.hexdigest(), "output": OUTPUT,
    }, indent=1, ensure_ascii=False) + "\n")
    note = f"; {len(unsatisfiable)} unsatisfiable under the rules (listed in {SUMMARY})" if unsatisfiable else ""
    print(f"{out / OUTPUT}: {records} records, {tokens} completion tokens{note}")
    return out / OUTPUT

"""Bad input across every command (#13, part 4): one case each.

Every case is refused with exit status 2 and exactly one ``error: …`` line (no traceback) that says
what is wrong and what to do, and nothing is written or damaged: the inputs (the shared stores,
models and corpus, and whatever a case copied and spoiled) are byte-identical afterwards and the
output path does not exist (or, where it did, is byte-identical).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.conftest import (TOKENIZER, chat_tokenizer, make_teacher, one_line_error, reseal_index, run_cli,
                            tree_digest, write_corpus, write_tiny_model_config)

ROWS = ("--rows-per-shard", "8", "--chunk-rows", "4")


def ok(result) -> None:
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def shared(tmp_path_factory, heldout_docs) -> Path:
    """Built once, never written by a case: a corpus, tokens stores (rows of 32 and of 256 tokens, the
    latter above the models' 128 positions), a tiny teacher (and a copy with its tokenizer, to
    evaluate), a sampled and a topk store from it, a tokenizer of another vocabulary (300 ids) and a
    tiny student config."""
    root = tmp_path_factory.mktemp("bad-inputs")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:20])
    for name, seq_len in (("tokens", "32"), ("long", "256")):
        ok(run_cli("prepare", "--input", corpus, "--out", root / name, "--tokenizer", TOKENIZER,
                   "--seq-len", seq_len, "--rows-per-shard", "32", "--chunk-rows", "8"))
    make_teacher(root / "teacher")
    shutil.copytree(root / "teacher", root / "model")  # a model directory as eval reads one: with its tokenizer
    shutil.copytree(TOKENIZER, root / "model", dirs_exist_ok=True)
    teacher = ("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--max-rows", "16", *ROWS)
    ok(run_cli(*teacher, "--out", root / "sampled", "--samples", "4"))
    ok(run_cli(*teacher, "--out", root / "topk", "--kind", "topk", "--top-k", "8"))
    ok(run_cli("tokenizer", "--input", corpus, "--out", root / "other-tokenizer", "--vocab-size", "300"))
    write_tiny_model_config(root / "tiny.json")
    return root


@pytest.fixture(scope="module")
def shared_digest(shared) -> str:
    return tree_digest(shared)


class Case:
    """What a case builds its command from: the shared inputs (read only), copies of them it may
    spoil, files it writes, and ``out``, the output path that must not appear."""

    def __init__(self, shared: Path, tmp: Path):
        self.shared, self.tmp = shared, tmp
        self.out = tmp / "out"
        self.corpus, self.tiny = shared / "corpus.jsonl", shared / "tiny.json"
        self.tokens, self.long, self.sampled, self.topk = (shared / n for n in ("tokens", "long", "sampled", "topk"))
        self.teacher, self.model, self.other_tokenizer = (shared / n for n in ("teacher", "model", "other-tokenizer"))

    def copy(self, name: str) -> Path:
        source, target = self.shared / name, self.tmp / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        return target

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def store_with(self, name: str, edit: Callable[[dict], None] | str, index: str = "index.json") -> Path:
        """A copy of shared store ``name`` whose ``index`` (a JSON file in it) ``edit`` changed, or
        replaced with the text ``edit``."""
        store = self.copy(name)
        if isinstance(edit, str):
            (store / index).write_text(edit)
        else:
            reseal_index(store / index, edit)  # sealed again: the checks behind the digest are what is tested
        return store

    def teacher_args(self, *flags) -> list:
        return ["teacher", "--tokens-store", self.tokens, "--teacher", self.teacher, "--out", self.out,
                "--max-rows", "16", *ROWS, *flags]

    def student_args(self, *flags, store: Path | None = None) -> list:
        return ["student", "--train-store", store or self.topk, "--model", self.tiny, "--out", self.out,
                "--max-steps", "2", "--micro-batch-size", "2", "--device", "cpu", *flags]

    def eval_args(self, *flags, model: Path | None = None) -> list:
        return ["eval", "--model", model or self.model, "--out", self.out, "--device", "cpu", *flags]

    def generate_args(self, *flags) -> list:
        return ["generate", "--teacher", self.teacher, "--tokenizer", TOKENIZER, "--prompts",
                self.write("prompts.txt", "Once upon a time\n"), "--out", self.out, "--max-new-tokens", "2",
                "--device", "cpu", *flags]


def gemma2_config(s: Case) -> Path:
    """A tiny Gemma 2 student config (transformers gives Gemma 2 no sdpa path)."""
    return s.write("gemma2.json", json.dumps({"model_type": "gemma2", "vocab_size": 8192, "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 2, "head_dim": 16,
                                              "num_attention_heads": 2, "num_key_value_heads": 2,
                                              "max_position_embeddings": 128}))


def without_weights(s: Case) -> Path:
    """The teacher's directory with its config but no weight files."""
    model = s.tmp / "no-weights"
    model.mkdir()
    shutil.copy(s.teacher / "config.json", model / "config.json")
    return model


def corrupt_weights(s: Case) -> Path:
    """The teacher's directory with its weight file cut in half (a copy that died mid-transfer)."""
    model = s.copy("teacher")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def shard_outside(body: dict) -> None:
    body["shards"][0]["name"] = "../x"


def newer_format(body: dict) -> None:
    body["format_version"] = 99


def task_args(s: Case, *records: dict, fmt: str = "prompt-response") -> list:
    """distill prepare of a JSONL file holding ``records`` as task examples (``--format fmt``)."""
    task = s.write("task.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return ["prepare", "--input", task, "--out", s.out, "--format", fmt]


CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]


def student_rerun(s: Case, *flags) -> list:
    """distill student into an OUT holding an earlier run (its config, a checkpoint, metrics), which must
    stay as it was."""
    s.write("out/config.json", json.dumps({"stage": "TrainConfig", "config": {"out": str(s.out)}}))
    s.write("out/checkpoints/step-00000002/state.pt", b"an earlier run")
    s.write("out/metrics.jsonl", '{"step": 2}\n')
    return s.student_args(*flags)


def planted_lock(s: Case, where: str, store: str = "") -> Case:
    """OUT (a copy of shared ``store``, or nothing) with a link under job 0's lock name, in OUT/``where``,
    to a user's file: opening the lock through it would truncate and write that file."""
    if store:
        shutil.copytree(s.shared / store, s.out)
    canary = s.write("canary.txt", "a user's file: byte for byte the same afterwards\n")
    lock = s.out / where / ".lock.part-00000-of-00001"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.unlink(missing_ok=True)  # the lock the store's writer left: replaced by the link
    os.symlink(canary, lock)
    return s


CASES = [
    # ---- the command line itself: one line, a suggestion, where the help is
    pytest.param(lambda s: s.teacher_args("--tempreature", "2"),
                 ("No such option: --tempreature (did you mean --temperature?); see 'distill teacher --help'",),
                 id="cli-unknown-flag-suggests"),
    pytest.param(lambda s: s.teacher_args("--top-k", "many"), ("Invalid value for '--top-k'", "see 'distill teacher --help'"),
                 id="cli-flag-not-an-int"),
    pytest.param(lambda s: s.student_args("--alpha", "half"), ("Invalid value for '--alpha'", "see 'distill student --help'"),
                 id="cli-flag-not-a-float"),
    pytest.param(lambda s: ["teachr", "--out", s.out], ("No such command 'teachr' (did you mean 'teacher'?); see 'distill --help'",),
                 id="cli-unknown-command"),
    pytest.param(lambda s: ["merge", s.sampled, s.out], ("unexpected extra argument", "see 'distill merge --help'"),
                 id="cli-extra-argument"),
    pytest.param(lambda s: s.eval_args("--tasks"), ("'--tasks' requires an argument; see 'distill eval --help'",),
                 id="cli-flag-missing-value"),
    # ---- config files
    pytest.param(lambda s: s.teacher_args("--config", s.write("c.yaml", "tempreature: 2\n")),
                 ("unknown key tempreature (did you mean 'temperature'?)", "rename or remove it"),
                 id="config-typo-suggests"),
    pytest.param(lambda s: s.student_args("--config", s.write("c.yaml", "alhpa: 0.5\nmax_stpes: 3\nzzz: 1\n")),
                 ("alhpa (did you mean 'alpha'?)", "max_stpes (did you mean 'max_steps'?)", "zzz;",
                  "known keys:"), id="config-typos-each-suggested"),
    pytest.param(lambda s: s.student_args("--config", s.tmp / "missing.yaml"),
                 ("config file", "does not exist; check the --config path"), id="config-missing"),
    pytest.param(lambda s: s.student_args("--config", s.write("c.yaml", "lr: [0.1\n")),
                 ("does not parse as YAML", "fix it"), id="config-does-not-parse"),
    pytest.param(lambda s: s.student_args("--config", s.write("c.json", '["lr", 0.1]')),
                 ("holds a list, not a mapping", "option_name: value"), id="config-not-a-mapping"),
    pytest.param(lambda s: ["prepare", "--config", s.write("c.yaml", "seq_len: long\n"), "--input", s.corpus,
                            "--out", s.out], ("key 'seq_len' must be int, got 'long'",), id="config-string-for-int"),
    pytest.param(lambda s: s.student_args("--config", s.write("c.yaml", "lr: [0.1, 0.2]\n")),
                 ("key 'lr' must be float, got [0.1, 0.2]",), id="config-list-for-float"),
    pytest.param(lambda s: s.student_args("--config", s.write("c.yaml", "max_steps: true\n")),
                 ("key 'max_steps' must be int, got True",), id="config-bool-for-int"),
    pytest.param(lambda s: ["prepare", "--config", s.write("c.yaml", "overwrite: 'yes'\n"), "--input",
                            s.corpus, "--out", s.out], ("key 'overwrite' must be true or false",),
                 id="config-string-for-bool"),
    pytest.param(lambda s: s.teacher_args("--config", s.write("c.yaml", "out: [a, b]\n")),
                 ("key 'out' must be str",), id="config-list-for-path"),
    # ---- tokenizer
    pytest.param(lambda s: ["tokenizer", "--input", s.tmp / "nope.jsonl", "--out", s.out],
                 ("corpus path", "does not exist; check --input"), id="tokenizer-missing-corpus"),
    pytest.param(lambda s: ["tokenizer", "--input", s.write("empty.jsonl", ""), "--out", s.out],
                 ("holds no documents", "check --input"), id="tokenizer-empty-corpus"),
    pytest.param(lambda s: ["tokenizer", "--input", s.corpus, "--out", s.out, "--vocab-size", "100"],
                 ("vocab_size must be at least 257",), id="tokenizer-vocab-too-small"),
    pytest.param(lambda s: ["tokenizer", "--input", s.corpus, "--out", s.write("out/x", "keep"), "--overwrite"],
                 ("is a file, not a directory; choose another --out",), id="tokenizer-out-is-a-file"),
    pytest.param(lambda s: ["tokenizer", "--input", s.corpus, "--out", s.copy("other-tokenizer")],
                 ("already holds a tokenizer; pass --overwrite to replace it",), id="tokenizer-out-holds-a-tokenizer"),
    # ---- prepare
    pytest.param(lambda s: ["prepare", "--input", s.tmp / "nope.jsonl", "--out", s.out],
                 ("corpus path", "does not exist; check --input"), id="prepare-missing-corpus"),
    pytest.param(lambda s: ["prepare", "--input", s.write("empty.jsonl", "\n"), "--out", s.out],
                 ("fewer than one row", "add text"), id="prepare-empty-corpus"),
    pytest.param(lambda s: ["prepare", "--input", s.write("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1")),
                            "--out", s.out],
                 ("not UTF-8 at byte 3 (line 1)", "--skip-bad-utf8"), id="prepare-non-utf8"),
    pytest.param(lambda s: ["prepare", "--input", s.write("binary.txt", bytes(range(128, 256)) * 64),
                            "--out", s.out, "--skip-bad-utf8"],
                 ("holds no UTF-8 text: all 1 lines were skipped", "convert it to UTF-8"), id="prepare-not-text-at-all"),
    pytest.param(lambda s: ["prepare", "--input", s.write("corpus.jsonl.gz", b"not gzip"), "--out", s.out],
                 ("cannot read", "check the file is complete"), id="prepare-corrupt-gzip"),
    pytest.param(lambda s: ["prepare", "--input", s.write("corpus.csv", "a,b\n"), "--out", s.out],
                 ("corpus.csv is of no kind distill reads", "--skip-unknown"), id="prepare-unsupported-file"),
    pytest.param(lambda s: ["prepare", "--input", s.write("corpus.jsonl.zst", b"not zstd"), "--out", s.out],
                 ("corpus.jsonl.zst: cannot read", "check the file is complete"), id="prepare-corrupt-zstd"),
    pytest.param(lambda s: ["prepare", "--input", s.write("corpus.parquet", b"PAR1 not a parquet file PAR1"),
                            "--out", s.out],
                 ("corpus.parquet: cannot read it as parquet", "check the file is complete"),
                 id="prepare-corrupt-parquet"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--text-field", "body"],
                 ("no 'body' field", "pass --text-field"), id="prepare-missing-text-field"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--tokenizer", s.tmp / "nope"],
                 ("tokenizer path", "does not exist"), id="prepare-missing-tokenizer"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--seq-len", "1"],
                 ("seq_len must be at least 2",), id="prepare-seq-len-1"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--backend", "parquet"],
                 ("backend must be one of zarr, arrow, got 'parquet'",), id="prepare-bad-backend"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--txt-documents", "line"],
                 ("txt_documents must be 'file' or 'paragraph'",), id="prepare-bad-txt-documents"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--batch-documents", "0"],
                 ("batch_documents must be positive",), id="prepare-batch-documents-0"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.copy("tokens"), "--seq-len", "64",
                            "--rows-per-shard", "32", "--chunk-rows", "8"],
                 ("already holds a store built differently", "seq_len: 32 vs 64", "pass --overwrite"),
                 id="prepare-out-holds-other-store"),
    # ---- prepare: task examples (prompt/response and chat records, stored with a loss mask)
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--format", "csv"],
                 ("format must be one of text, prompt-response, chat, ids, got 'csv'",), id="prepare-bad-format"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--format", "prompt-response"],
                 ("corpus.jsonl:1: no 'prompt' field; pass --prompt-field",), id="prepare-missing-prompt-field"),
    pytest.param(lambda s: [*task_args(s, {"prompt": "Q?", "answer": " A."}), "--response-field", "reply"],
                 ("task.jsonl:1: no 'reply' field; pass --response-field",), id="prepare-missing-response-field"),
    pytest.param(lambda s: task_args(s, {"prompt": "Q?", "response": " A."}, {"prompt": "Q2?", "response": ""}),
                 ("task.jsonl:2: the response ('response') is empty", "fill it in or remove the record"),
                 id="prepare-empty-response"),
    pytest.param(lambda s: task_args(s, {"prompt": "Q?", "response": 3}), ("field 'response' is not a string",),
                 id="prepare-response-not-a-string"),
    pytest.param(lambda s: task_args(s, {"messages": CHAT}, fmt="chat"),
                 ("--format chat renders --messages-field with the tokenizer's chat template",
                  "has none; pass a --tokenizer that has one"), id="prepare-chat-without-template"),
    pytest.param(lambda s: [*task_args(s, {"messages": CHAT[:1]}, fmt="chat"), "--tokenizer", chat_tokenizer(s.tmp / "t")],
                 ("task.jsonl:1: the conversation has no 'assistant' message",), id="prepare-chat-without-reply"),
    pytest.param(lambda s: [*task_args(s, {"messages": [CHAT[0], {"role": "assistant", "content": ""}]}, fmt="chat"),
                            "--tokenizer", chat_tokenizer(s.tmp / "t")],
                 ("task.jsonl:1: an 'assistant' message is empty",), id="prepare-chat-empty-reply"),
    pytest.param(lambda s: [*task_args(s, {"messages": "Capital of France? Paris."}, fmt="chat"),
                            "--tokenizer", chat_tokenizer(s.tmp / "t")],
                 ("field 'messages' is not a list of",), id="prepare-chat-messages-not-a-list"),
    pytest.param(lambda s: [*task_args(s, {"messages": CHAT}, fmt="chat"), "--tokenizer",
                            chat_tokenizer(s.tmp / "t", "{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                                                        "{% endfor %}")],
                 ("does not render this conversation as the start of its continuation",),
                 id="prepare-chat-template-not-incremental"),
    pytest.param(lambda s: [*task_args(s, {"messages": CHAT}, fmt="chat"), "--tokenizer",
                            chat_tokenizer(s.tmp / "t", "{{ raise_exception('roles must alternate') }}")],
                 ("the chat template cannot render this conversation (roles must alternate)",),
                 id="prepare-chat-template-refuses"),
    pytest.param(lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--prompt-field", "question"],
                 ("--prompt-field is for --format prompt-response, not --format text",
                  "a plain-text corpus has no prompts or responses to mask"), id="prepare-mask-option-on-text"),
    pytest.param(lambda s: [*task_args(s, {"prompt": "Q?", "response": " A."}), "--messages-field", "turns"],
                 ("--messages-field is for --format chat, not --format prompt-response",),
                 id="prepare-messages-field-on-prompt-response"),
    pytest.param(lambda s: ["prepare", "--input", s.write("notes.txt", "some plain text\n"), "--out", s.out,
                            "--format", "prompt-response"],
                 ("--format prompt-response reads JSONL records", "notes.txt is not JSON lines"),
                 id="prepare-mask-format-on-txt"),
    pytest.param(lambda s: ["prepare", "--input", s.write("task.jsonl", json.dumps({"prompt": "Q?", "response": "A"})),
                            "--out", s.out], ("no 'text' field", "or --format prompt-response"),
                 id="prepare-task-records-read-as-text"),
    # ---- teacher (stage one)
    pytest.param(lambda s: s.teacher_args("--attn-implementation", "flash_attention_2"), ("flash_attention_2", "--attn-implementation sdpa"),
                 id="teacher-flash-attention-without-package-or-gpu"),
    pytest.param(lambda s: s.teacher_args("--temperature", "0"), ("temperature must be > 0",),
                 id="teacher-temperature-0"),
    pytest.param(lambda s: s.teacher_args("--kind", "topk", "--top-k", "0"), ("top_k must be at least 1",),
                 id="teacher-top-k-0"),
    pytest.param(lambda s: s.teacher_args("--kind", "topk", "--top-k", "9000"),
                 ("--top-k 9000 is larger than the vocabulary (8192 ids); lower it",), id="teacher-top-k-above-vocab"),
    pytest.param(lambda s: s.teacher_args("--samples", "0"), ("samples must be in [1, 65535], got 0",),
                 id="teacher-samples-0"),
    pytest.param(lambda s: s.teacher_args("--batch-size", "0"), ("batch_size must be at least 1",),
                 id="teacher-batch-size-0"),
    pytest.param(lambda s: s.teacher_args("--kind", "dense"), ("kind must be topk, sampled or target, got 'dense'",),
                 id="teacher-bad-kind"),
    pytest.param(lambda s: s.teacher_args("--on-preempt", "stop"),
                 ("on_preempt must be one of finish, abandon, got 'stop'",), id="teacher-bad-on-preempt"),
    pytest.param(lambda s: s.teacher_args("--dtype", "float8"),
                 ("dtype must be auto, float32, bfloat16 or float16, got 'float8'",),
                 id="teacher-bad-dtype"),
    pytest.param(lambda s: s.teacher_args("--device", "tpu"), ("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'",),
                 id="teacher-bad-device"),
    pytest.param(lambda s: s.teacher_args("--device", "cuda"), ("no CUDA device is visible; use --device cpu",),
                 id="teacher-cuda-without-gpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    pytest.param(lambda s: s.teacher_args("--shard-index", "2", "--num-shards", "2"),
                 ("shard_index must be in [0, 2), got 2",), id="teacher-shard-index-out-of-range"),
    pytest.param(lambda s: ["teacher", "--tokens-store", s.tmp / "nope", "--teacher", s.teacher, "--out", s.out],
                 ("does not exist; run the stage that writes it first",), id="teacher-missing-tokens-store"),
    pytest.param(lambda s: s.teacher_args("--teacher", s.tmp / "nope"),
                 ("is not a local Hugging Face model directory with weights",), id="teacher-missing-teacher-dir"),
    pytest.param(lambda s: s.teacher_args("--teacher", without_weights(s)),
                 ("is not a local Hugging Face model directory with weights",), id="teacher-dir-without-weights"),
    pytest.param(lambda s: s.teacher_args("--teacher", corrupt_weights(s)), ("weights", "corrupt"),
                 id="teacher-corrupt-weights"),
    pytest.param(lambda s: ["teacher", "--tokens-store", s.topk, "--teacher", s.teacher, "--out", s.out],
                 ("is a 'topk' store, expected a 'tokens' store; pass",), id="teacher-topk-store-as-tokens"),
    pytest.param(lambda s: ["teacher", "--tokens-store", s.long, "--teacher", s.teacher, "--out", s.out, *ROWS],
                 ("sequence length 256, above the teacher's maximum of 128 positions", "--seq-len 128"),
                 id="teacher-rows-too-long"),
    pytest.param(lambda s: s.teacher_args("--tokenizer", s.other_tokenizer),
                 ("made with another tokenizer", "pass the tokenizer it was prepared with"),
                 id="teacher-tokenizer-of-another-vocab"),
    pytest.param(lambda s: ["teacher", "--tokens-store", s.store_with("tokens", shard_outside), "--teacher",
                            s.teacher, "--out", s.out], ("names shard '../x', which is not a plain file name",),
                 id="teacher-index-points-outside"),
    pytest.param(lambda s: ["teacher", "--tokens-store", s.store_with("tokens", '{"kind": "tok'), "--teacher",
                            s.teacher, "--out", s.out], ("index.json does not parse",),
                 id="teacher-index-does-not-parse"),
    pytest.param(lambda s: ["teacher", "--tokens-store", s.store_with("tokens", newer_format), "--teacher", s.teacher,
                            "--out", s.out], ("has format version 99",), id="teacher-newer-format"),
    pytest.param(lambda s: ["teacher", "--tokens-store", s.tokens, "--teacher", s.teacher, "--out", s.copy("sampled"),
                            "--max-rows", "16", *ROWS, "--samples", "8"],
                 ("already holds a store built differently", "samples: 4 vs 8", "pass --overwrite"),
                 id="teacher-out-holds-other-store"),
    pytest.param(lambda s: planted_lock(s, ".").teacher_args(),
                 (".lock.part-00000-of-00001 (a symbolic link), which distill did not write",),
                 id="teacher-lock-is-a-planted-link"),
    pytest.param(lambda s: planted_lock(s, ".", store="sampled").teacher_args("--samples", "8", "--overwrite"),
                 (".lock.part-00000-of-00001 (a symbolic link), which distill did not write",
                  "--overwrite replaces only a store distill wrote"), id="teacher-overwrite-store-with-a-planted-lock"),
    pytest.param(lambda s: s.teacher_args("--device-map", "auto"),
                 ("--device-map auto spreads the model over CUDA devices and none is visible", "drop --device-map"),
                 id="teacher-device-map-auto-without-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    pytest.param(lambda s: s.teacher_args("--device-map", s.tmp / "nope.json"), ("no such file, and not a preset",),
                 id="teacher-device-map-missing-file"),
    pytest.param(lambda s: s.teacher_args("--device-map", '{"model.layerz.1": "disk", "": "cpu"}'),
                 ("'model.layerz.1' is not a module of the model (did you mean 'model.layers.1'?)",),
                 id="teacher-device-map-unknown-module"),
    pytest.param(lambda s: s.teacher_args("--device-map", '{"model.layers": "cpu", "model.embed_tokens": "cpu"}'),
                 ("gives no device to 2 parameter(s) (model.norm.weight, lm_head.weight)", "add 'model.norm', 'lm_head'"),
                 id="teacher-device-map-leaves-parameters"),
    pytest.param(lambda s: s.teacher_args("--device-map", '{"": "tpu"}'),
                 ("module '' has device 'tpu'; use a GPU index",), id="teacher-device-map-bad-device"),
    pytest.param(lambda s: s.teacher_args("--device-map", '{"": "cpu"}', "--device", "cpu"),
                 ("--device cpu and --device-map both place the teacher",), id="teacher-device-map-and-device"),
    pytest.param(lambda s: s.teacher_args("--max-memory", "0=70GiB"), ("--max-memory applies to --device-map",),
                 id="teacher-max-memory-without-device-map"),
    # ---- merge
    pytest.param(lambda s: ["merge", s.write("not-a-store/notes.txt", "hello").parent],
                 ("holds no partial indexes; run distill teacher first",), id="merge-not-a-store"),
    pytest.param(lambda s: ["merge", s.tmp / "nope"], ("does not exist; run distill teacher first",),
                 id="merge-missing-dir"),
    pytest.param(lambda s: ["merge", s.store_with("sampled", shard_outside, "index.part-00000-of-00001.json")],
                 ("names shard '../x', which is not a plain file name",), id="merge-partial-index-points-outside"),
    # ---- inspect
    pytest.param(lambda s: ["inspect", s.tmp / "nope"], ("does not exist",), id="inspect-missing-dir"),
    pytest.param(lambda s: ["inspect", s.store_with("topk", "{")], ("index.json does not parse",),
                 id="inspect-index-does-not-parse"),
    pytest.param(lambda s: ["inspect", s.store_with("topk", shard_outside)], ("which is not a plain file name",),
                 id="inspect-index-points-outside"),
    pytest.param(lambda s: ["inspect", s.store_with("sampled", newer_format), "--verify"], ("format version 99",),
                 id="inspect-newer-format"),
    pytest.param(lambda s: ["inspect", s.sampled, "--max-rows", "-1"], ("max_rows must be 0 (all) or a positive",),
                 id="inspect-negative-max-rows"),
    pytest.param(lambda s: ["inspect", s.sampled, "--repair"], ("pass --verify --repair",),
                 id="inspect-repair-without-verify"),
    # ---- status
    pytest.param(lambda s: ["status", s.tmp / "nope"], ("does not exist", "distill status reads"), id="status-missing-dir"),
    # ---- student / train (stage two)
    pytest.param(lambda s: ["student", "--train-store", s.topk, "--model", gemma2_config(s), "--out", s.out,
                            "--device", "cpu", "--attn-implementation", "sdpa"],
                 ("Gemma2ForCausalLM has no sdpa attention", "--attn-implementation eager"),
                 id="student-sdpa-on-an-architecture-without-it"),
    pytest.param(lambda s: s.student_args("--alpha", "-0.1"), ("alpha must be in [0, 1], got -0.1",),
                 id="student-alpha-below-0"),
    pytest.param(lambda s: ["train", *s.student_args("--alpha", "1.5")[1:]], ("alpha must be in [0, 1], got 1.5",),
                 id="train-alpha-above-1"),
    pytest.param(lambda s: s.student_args("--temperature", "-1"), ("temperature must be > 0",),
                 id="student-temperature-negative"),
    pytest.param(lambda s: s.student_args("--temperature", "3"), ("not in the store's grid (1, 2)",),
                 id="student-temperature-off-grid"),
    pytest.param(lambda s: s.student_args("--micro-batch-size", "0"), ("micro_batch_size must be at least 1, got 0",),
                 id="student-micro-batch-0"),
    pytest.param(lambda s: s.student_args("--tail", "cut"), ("tail must be one of",), id="student-bad-tail"),
    pytest.param(lambda s: s.student_args("--dtype", "float16"),
                 ("dtype must be auto, float32 or bfloat16, got 'float16'",),
                 id="student-bad-dtype"),
    pytest.param(lambda s: s.student_args("--device", "gpu"), ("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'",),
                 id="student-bad-device"),
    pytest.param(lambda s: s.student_args(store=s.tmp / "nope"), ("does not exist; run the stage that writes it",),
                 id="student-missing-train-store"),
    pytest.param(lambda s: s.student_args("--eval-store", s.tmp / "nope"), ("does not exist",),
                 id="student-missing-eval-store"),
    pytest.param(lambda s: s.student_args("--model", s.tmp / "nope.json"),
                 ("neither a model config file nor a local Hugging Face directory", "check the path"),
                 id="student-missing-model-config"),
    pytest.param(lambda s: s.student_args("--model", s.write("bad.json", '{"model_type": ')),
                 ("model config", "does not parse", "fix it"), id="student-model-config-does-not-parse"),
    pytest.param(lambda s: s.student_args("--alpha", "0.5", store=s.tokens),
                 ("holds no teacher predictions", "--alpha 1"), id="student-tokens-store-needs-teacher"),
    pytest.param(lambda s: s.student_args("--alpha", "1", store=s.long),
                 ("sequence length 256, above the model's maximum of 128 positions", "--seq-len 128"),
                 id="student-rows-too-long"),
    pytest.param(lambda s: s.student_args("--tokenizer", s.other_tokenizer),
                 ("made with another tokenizer", "pass the tokenizer it was prepared with"),
                 id="student-tokenizer-of-another-vocab"),
    pytest.param(lambda s: s.student_args(store=s.store_with("topk", shard_outside)),
                 ("which is not a plain file name",), id="student-index-points-outside"),
    pytest.param(lambda s: s.student_args("--direction", "reverse", store=s.sampled),
                 ("reverse",), id="student-reverse-on-drawn-targets"),
    pytest.param(lambda s: s.student_args("--objective", "policy-gradient", "--alpha", "0"),
                 ("holds no behaviour_logprob", "--format ids"), id="student-policy-gradient-without-behaviour"),
    pytest.param(lambda s: s.student_args("--objective", "policy-gradient"),
                 ("needs --alpha set", "0 learns from the teacher's scores alone"),
                 id="student-policy-gradient-without-alpha"),
    pytest.param(lambda s: s.student_args("--objective", "reverse-kl", store=s.sampled),
                 ("--objective reverse-kl needs", "rerun stage one with --kind topk"),
                 id="student-reverse-kl-on-drawn-targets"),
    pytest.param(lambda s: s.student_args("--resume", s.tmp / "nowhere"),
                 ("no checkpoint there", "pass --resume auto"), id="student-resume-without-checkpoint"),
    pytest.param(lambda s: student_rerun(s, "--temperature", "3", "--overwrite"),
                 ("not in the store's grid",), id="student-overwrite-keeps-old-run-on-error"),
    pytest.param(lambda s: student_rerun(s),
                 ("already holds a run", "--resume auto", "--overwrite"), id="student-out-holds-run"),
    # ---- generate
    pytest.param(lambda s: s.generate_args("--attn-implementation", "flash_attention_2"), ("flash_attention_2", "--attn-implementation sdpa"),
                 id="generate-flash-attention-without-package-or-gpu"),
    pytest.param(lambda s: planted_lock(s, "parts").generate_args(),
                 ("parts/.lock.part-00000-of-00001 (a symbolic link), which distill did not write",),
                 id="generate-lock-is-a-planted-link"),
    # ---- eval
    pytest.param(lambda s: s.eval_args("--attn-implementation", "flash_attention_2"), ("flash_attention_2", "--attn-implementation sdpa"),
                 id="eval-flash-attention-without-package-or-gpu"),
    pytest.param(lambda s: s.eval_args(model=s.tmp / "nope"), ("not a local Hugging Face directory with weights",
                                                             "check the path"), id="eval-missing-model"),
    pytest.param(lambda s: s.eval_args(model=without_weights(s)), ("not a local Hugging Face directory with weights",),
                 id="eval-model-without-weights"),
    pytest.param(lambda s: s.eval_args(model=s.teacher), ("cannot load a tokenizer from", "tokenizer.json"),
                 id="eval-model-without-tokenizer"),
    pytest.param(lambda s: s.eval_args("--tasks", "agreement", "--agreement", s.tokens),
                 ("is a 'tokens' store", "distill teacher --kind topk"), id="eval-agreement-tokens-store"),
    pytest.param(lambda s: s.eval_args("--tasks", "lambada,agreement", "--agreement", s.sampled),
                 ("is a 'sampled' store", "distill teacher --kind topk"), id="eval-agreement-sampled-store"),
    pytest.param(lambda s: s.eval_args("--tasks", "agreement", "--agreement", s.topk,
                                       "--agreement-temperature", "3"),
                 ("not in the store's grid",), id="eval-agreement-temperature-off-grid"),
    pytest.param(lambda s: s.eval_args("--max-length", "4096"),
                 ("--max-length 4096 exceeds the model's 128 positions", "0 for the model's maximum"),
                 id="eval-max-length-too-long"),
    pytest.param(lambda s: s.eval_args("--batch-size", "0"), ("batch_size must be at least 1",),
                 id="eval-batch-size-0"),
    pytest.param(lambda s: s.eval_args("--tasks", "squad"), ("unknown task(s) squad; choose from",),
                 id="eval-unknown-task"),
    pytest.param(lambda s: s.eval_args("--dtype", "int8"),
                 ("dtype must be auto, float32, bfloat16 or float16, got 'int8'",), id="eval-bad-dtype"),
    pytest.param(lambda s: s.eval_args("--qa-format", "gpt-3"), ("qa_format must be one of lm-eval, gpt3, got 'gpt-3'",),
                 id="eval-bad-qa-format"),
    pytest.param(lambda s: s.eval_args("--tasks", "heldout", "--heldout", s.tmp / "nope.jsonl"),
                 ("corpus path", "does not exist; check --heldout"), id="eval-missing-heldout-file"),
    pytest.param(lambda s: s.eval_args("--tasks", "heldout,lambada", "--lambada", s.tmp / "nope.jsonl"),
                 ("no such task file", "with --lambada"), id="eval-missing-task-file"),
    # ---- plan
    pytest.param(lambda s: ["plan", "--kind", "topk"], ("give the corpus size: --tokens N or --tokens-store DIR",),
                 id="plan-no-corpus-size"),
    pytest.param(lambda s: ["plan", "--tokens", "lots", "--seq-len", "2048"],
                 ("'lots' is not a count: write e.g. 2e9, 2B, 500M or 1.5T",), id="plan-tokens-not-a-count"),
    pytest.param(lambda s: ["plan", "--tokens", "2B"], ("--tokens needs --seq-len",), id="plan-tokens-without-seq-len"),
    pytest.param(lambda s: ["plan", "--tokens-store", s.tokens, "--time-limit", "4h"],
                 ("time_limit must be HH:MM:SS or D-HH:MM:SS",), id="plan-bad-time-limit"),
    pytest.param(lambda s: ["plan", "--tokens-store", s.tokens, "--mfu", "1.5"], ("mfu must be in (0, 1]",),
                 id="plan-mfu-above-1"),
    pytest.param(lambda s: ["plan", "--tokens-store", s.tokens, "--kind", "topk", "--top-k", "9000"],
                 ("--top-k 9000 is larger than the vocabulary (8192 ids)",), id="plan-top-k-above-vocab"),
    pytest.param(lambda s: ["plan", "--tokens-store", s.tokens, "--teacher", s.teacher, "--teacher-params", "8B"],
                 ("give the teacher's size once",), id="plan-teacher-twice"),
    pytest.param(lambda s: ["plan", "--tokens-store", s.tmp / "nope"], ("does not exist",),
                 id="plan-missing-tokens-store"),
    pytest.param(lambda s: ["plan", "--tokens-store", s.tokens, "--pilot", s.sampled],
                 ("has another format than the plan (samples: 4 vs 32)", "write a pilot with yours"),
                 id="plan-pilot-of-another-format"),
    pytest.param(lambda s: ["plan", "--tokens-store", s.tokens, "--pilot", s.tokens],
                 ("is a 'tokens' store; pass a store distill teacher wrote",), id="plan-pilot-is-a-tokens-store"),
    pytest.param(lambda s: ["plan", "--tokens", "1B", "--seq-len", "2048", "--vocab-size", "32000", "--teacher-params",
                            "70B", "--dtype", "bfloat16", "--gpus", "1"],
                 ("the teacher needs 2 GPUs per task", "give more GPUs"), id="plan-teacher-larger-than-the-gpus"),
    pytest.param(lambda s: ["plan", "--tokens", "1B", "--seq-len", "2048", "--vocab-size", "32000",
                            "--teacher-tokens-per-gpu-s", "10", "--time-limit", "01:00:00"],
                 ("one shard of 256 rows takes", "lower --rows-per-shard to"), id="plan-shard-longer-than-time-limit"),
    pytest.param(lambda s: ["plan", "--tokens", "1B", "--seq-len", "2048"], ("the vocabulary size is unknown",),
                 id="plan-vocabulary-unknown"),
    pytest.param(lambda s: ["plan", "--tokens", "1B", "--seq-len", "2048", "--vocab-size", "32000", "--student-dtype",
                            "float16"], ("student_dtype must be auto, float32 or bfloat16, got 'float16'",),
                 id="plan-bad-student-dtype"),
    pytest.param(lambda s: s.generate_args("--dtype", "half"), ("dtype must be auto, float32, bfloat16 or float16",),
                 id="generate-bad-dtype"),
    # ---- report
    pytest.param(lambda s: ["report", s.write("evals/notes.txt", "").parent, "--out", s.out],
                 ("holds no eval result files", "run distill eval --out"), id="report-no-eval-files"),
    pytest.param(lambda s: ["report", s.write("a.json", '{"name": "a", "tasks": '), "--out", s.out],
                 ("not a JSON file", "pass the files distill eval wrote"), id="report-eval-json-does-not-parse"),
    pytest.param(lambda s: ["report", s.tmp / "missing.json", "--out", s.out],
                 ("no such eval result", "run `distill eval"), id="report-missing-eval-file"),
    pytest.param(lambda s: ["report", s.write("a.json", "[1, 2]"), "--out", s.out],
                 ("not a `distill eval` result",), id="report-not-an-eval-result"),
    pytest.param(lambda s: ["report", "--out", s.out], ("no eval result files given",), id="report-no-runs"),
]


def snapshot(root: Path) -> tuple[str, list[str]]:
    """Every file's bytes and every path, directories too (an empty leftover temp directory counts)."""
    return tree_digest(root), sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("build, phrases", CASES)
def test_bad_input_is_one_line_and_touches_nothing(shared, shared_digest, tmp_path, build, phrases):
    case = Case(shared, tmp_path)
    args = build(case)
    out_existed = case.out.exists()
    before = snapshot(tmp_path)
    message = one_line_error(run_cli(*args))
    for phrase in phrases:
        assert phrase in message, message
    assert snapshot(tmp_path) == before, f"{message}\nsomething was written or changed"
    assert case.out.exists() == out_existed
    assert tree_digest(shared) == shared_digest


def foreign_out(s: Case) -> Path:
    """An OUT holding what distill did not write: a thesis, a source tree and a git directory."""
    s.write("out/thesis.tex", "\\documentclass{article}\n")
    s.write("out/src/main.c", "int main(void) { return 0; }\n")
    s.write("out/.git/HEAD", "ref: refs/heads/main\n")
    return s.out


FOREIGN = {  # each stage that takes --overwrite, writing into s.out
    "prepare": lambda s: ["prepare", "--input", s.corpus, "--out", s.out, "--seq-len", "32", *ROWS],
    "teacher": lambda s: s.teacher_args(),
    "student": lambda s: s.student_args(),
    "generate": lambda s: s.generate_args(),
    "tokenizer": lambda s: ["tokenizer", "--input", s.corpus, "--out", s.out, "--vocab-size", "300"],
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("stage", sorted(FOREIGN))
def test_an_out_of_someone_elses_files_is_refused_and_never_deleted(shared, shared_digest, tmp_path, stage, overwrite):
    """--overwrite once deleted thesis.tex and src/ from OUT; now every stage refuses
    such an OUT in one line naming what is there, with or without --overwrite, without telling the
    user to pass --overwrite, and every foreign byte stays."""
    case = Case(shared, tmp_path)
    foreign_out(case)
    args = [*FOREIGN[stage](case), *(["--overwrite"] if overwrite else [])]
    before = snapshot(tmp_path)
    message = one_line_error(run_cli(*args))
    assert f"{case.out} holds src, thesis.tex and .git, which distill did not write" in message, message
    assert "choose another --out" in message and "pass --overwrite" not in message
    assert ("--overwrite replaces only" in message) == overwrite
    assert snapshot(tmp_path) == before
    assert tree_digest(shared) == shared_digest


def test_at_least_34_cases_cover_every_command():
    assert len(CASES) >= 34
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    for command in ("cli", "config", "tokenizer", "prepare", "teacher", "generate", "merge", "inspect", "status",
                    "student",
                    "train", "eval", "plan", "report"):
        assert any(i.startswith(command + "-") for i in ids), command

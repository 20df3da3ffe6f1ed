"""Where on the text a cross-tokenizer student gains less than a same-tokenizer one (issue #30).

Held-out bits per byte split by the *kind of chunk* each byte lies in: the chunks of the teacher's
and the student tokenizer's tokenizations of each document (``pipeline/text/align.py``'s common
boundaries), by how many tokens each side has in the chunk — ``1:1`` (one each), ``t1:sN`` (one
teacher token the student spells in several), ``tN:s1`` (the student's longer token), ``tN:sN``.
A chunk is the same bytes for every model, so a model's bits on a kind of chunk are comparable
across tokenizers: each scored token's nats go to the chunk its bytes lie in (a token never crosses
a chunk boundary). Models are ``name=path`` and read with the tokenizer saved beside them; each
document is scored in rolling windows as ``distill eval --tasks heldout`` scores it (the sums agree
with its bits per byte; the script checks that per model). Gains are named ``a-b`` (bits of ``a``
minus bits of ``b``)::

    python bench/cross_regions.py --teacher-tokenizer data/models/smollm2-135m --student-tokenizer data/tokenizer \\
        --heldout data/pydoc/heldout.jsonl.gz --models same-ce=runs/x/same-ce/model,... \\
        --gains same-ce-same-kd,cross-ce-cross-exact --out bench/results/cross_regions_cpu.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluate.tasks import rolling_windows  # noqa: E402
from pipeline.text.align import token_bytes  # noqa: E402

KINDS = ("1:1", "t1:sN", "tN:s1", "tN:sN")


def byte_ends(tokenizer, table, text: str) -> tuple[list[int], np.ndarray]:
    """The tokenizer's ids of ``text`` (no specials) and each token's end byte; the pieces must spell the text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lengths = np.array([len(table.pieces[i] or b"") for i in ids], dtype=np.int64)
    if b"".join(table.pieces[i] or b"" for i in ids) != text.encode("utf-8"):
        raise SystemExit(f"{tokenizer.name_or_path}'s tokens do not spell a held-out document byte for byte")
    return ids, np.cumsum(lengths)


def chunks(teacher_ends: np.ndarray, student_ends: np.ndarray, n_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per byte, its chunk's index; per chunk, its kind (an index into KINDS)."""
    common = np.intersect1d(teacher_ends, student_ends)
    byte_chunk = np.searchsorted(common, np.arange(n_bytes), side="right")  # byte b lies before common[c]
    t = np.bincount(np.searchsorted(common, teacher_ends - 1, side="right"), minlength=len(common))
    s = np.bincount(np.searchsorted(common, student_ends - 1, side="right"), minlength=len(common))
    kind = np.where((t == 1) & (s == 1), 0, np.where(t == 1, 1, np.where(s == 1, 2, 3)))
    return byte_chunk, kind


@torch.no_grad()
def token_nats(model, ids: list[int], start: int, max_len: int) -> np.ndarray:
    out = []
    for inputs, targets in rolling_windows(ids, start, max_len):
        logits = model(torch.tensor([inputs])).logits[0, -len(targets):].float()
        out.append(-torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[:, None])[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.eval import tokenizer_adds_bos

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-tokenizer", required=True)
    parser.add_argument("--student-tokenizer", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--models", required=True, help="name=path,... (a saved student, its tokenizer beside it)")
    parser.add_argument("--gains", default="", help="a-b,...: bits of a minus bits of b, per kind of chunk")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    sides = {}
    for role, path in (("teacher", args.teacher_tokenizer), ("student", args.student_tokenizer)):
        tok = AutoTokenizer.from_pretrained(ROOT / path)
        sides[role] = (tok, token_bytes(tok))
    opener = gzip.open if args.heldout.endswith(".gz") else open
    with opener(ROOT / args.heldout, "rt", encoding="utf-8") as f:
        docs = [t for t in (json.loads(line)["text"] for line in f) if t.strip()][:args.limit]
    layout = []  # per document: byte → chunk, chunk kinds, bytes
    for text in docs:
        _, t_ends = byte_ends(*sides["teacher"], text)
        _, s_ends = byte_ends(*sides["student"], text)
        layout.append(chunks(t_ends, s_ends, len(text.encode("utf-8"))))
    bytes_by_kind = np.zeros(len(KINDS))
    for byte_chunk, kind in layout:
        bytes_by_kind += np.bincount(kind[byte_chunk], minlength=len(KINDS))
    results = {}
    for spec in args.models.split(","):
        name, path = spec.split("=", 1)
        tokenizer = AutoTokenizer.from_pretrained(ROOT / path)
        table = token_bytes(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(ROOT / path, dtype=torch.float32).eval()
        start = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else tokenizer.eos_token_id
        nats = np.zeros(len(KINDS))
        for text, (byte_chunk, kind) in zip(docs, layout):
            ids, ends = byte_ends(tokenizer, table, text)
            per_token = token_nats(model, ids, start, model.config.max_position_embeddings)
            nats += np.bincount(kind[byte_chunk[ends - 1]], weights=per_token, minlength=len(KINDS))
        bits = nats / math.log(2)
        results[name] = {"bits_per_byte": float(bits.sum() / bytes_by_kind.sum()),
                         "bits_per_byte_by_kind": {k: float(b / n) if n else None
                                                   for k, b, n in zip(KINDS, bits, bytes_by_kind)},
                         "bits_by_kind": dict(zip(KINDS, bits.tolist()))}
        print(f"{name}: {results[name]['bits_per_byte']:.4f} bits/byte; by kind "
              + ", ".join(f"{k} {v:.3f}" for k, v in results[name]["bits_per_byte_by_kind"].items() if v is not None),
              flush=True)
    total = bytes_by_kind.sum()
    gains = {}
    for spec in filter(None, args.gains.split(",")):
        a, b = _pair(spec, results)
        per = {k: (results[a]["bits_by_kind"][k] - results[b]["bits_by_kind"][k]) / total for k in KINDS}
        gains[f"{a} - {b}"] = {"bits_per_byte": sum(per.values()), "by_kind": per}
        print(f"{a} - {b}: {sum(per.values()):.4f} bits/byte; by kind (per byte of all text) "
              + ", ".join(f"{k} {v:.4f}" for k, v in per.items()))
    out = {"teacher_tokenizer": args.teacher_tokenizer, "student_tokenizer": args.student_tokenizer,
           "heldout": args.heldout, "documents": len(docs),
           "byte_share_by_kind": {k: float(n / total) for k, n in zip(KINDS, bytes_by_kind)},
           "models": {name: {"path": spec.split("=", 1)[1], **results[name]}
                      for name, spec in zip(results, args.models.split(","))},
           "gains": gains}
    print("byte share by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in out["byte_share_by_kind"].items()))
    Path(ROOT / args.out).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / args.out).write_text(json.dumps(out, indent=2) + "\n")


def _pair(spec: str, results: dict) -> tuple[str, str]:
    """``a-b`` where the names themselves hold dashes: the split whose two sides are both models."""
    for i, c in enumerate(spec):
        if c == "-" and spec[:i] in results and spec[i + 1:] in results:
            return spec[:i], spec[i + 1:]
    raise SystemExit(f"--gains {spec!r}: not two model names joined by '-'")


if __name__ == "__main__":
    main()

"""What the first-token map and chunk-start positions change on a pair of tokenizers (issue #23
follow-up): no training, seconds on a CPU.

- **The map** (``pipeline/text/align.py``, ``build_vocab_map``): how many teacher ids get a student
  id under each rule, and how many get a different one under ``first`` than under ``bucket`` and
  ``prefix``; how many teacher ids are strict prefixes of student tokens (the ambiguous case,
  docs/DESIGN.md).
- **The positions** on the held-out corpus, packed as ``distill prepare`` packs it (each document's
  teacher tokens then EOS, rows of ``--seq-len`` overlapping by one) and aligned as stage two aligns
  it: the share of the student's targets that are 1:1 chunks (the old next-token term) and chunk
  starts (the new one); at the chunk starts, how often the teacher's own next token maps (first
  rule) to the student's own next token, and how often the teacher's is a strict prefix of the
  student's (there the teacher's event is the student's shorter token).

    python bench/cross_first_token.py --out bench/results/cross_first_token.json
    python bench/cross_first_token.py --teacher-tokenizer data/tokenizer-4096 --student-tokenizer data/tokenizer \
        --out bench/results/cross_first_token_reverse.json   # the student has the longer tokens
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from pipeline.text.align import RowAligner, align, build_vocab_map, check_byte_level, token_bytes

ROOT = Path(__file__).resolve().parents[1]


def map_numbers(teacher, student, student_tokenizer) -> tuple[dict, np.ndarray]:
    maps = {rule: build_vocab_map(teacher, student, rule, student_tokenizer) for rule in ("bucket", "prefix", "first")}
    has_bytes = np.array([bool(p) for p in teacher.pieces])
    unmapped = (maps["bucket"] < 0) & has_bytes
    student_pieces = [p for p in student.pieces if p]
    teacher_pieces = {p for p in teacher.pieces if p}
    extends, extends_unspelt = set(), set()
    for p in student_pieces:  # every strict prefix of a student token (of one the teacher cannot spell)
        for n in range(1, len(p)):
            extends.add(p[:n])
            if p not in teacher_pieces:
                extends_unspelt.add(p[:n])
    strict_prefix = [t for t in np.nonzero(has_bytes)[0] if teacher.pieces[t] in extends]
    ambiguous = [t for t in strict_prefix if teacher.pieces[t] in extends_unspelt]
    numbers = {
        "teacher_vocab": len(teacher.pieces), "student_vocab": len(student.pieces),
        "teacher_ids_with_bytes": int(has_bytes.sum()),
        "mapped": {rule: int((m >= 0).sum()) for rule, m in maps.items()},
        "unmapped_by_bucket": int(unmapped.sum()),
        "first_differs_from_bucket": int((maps["first"] != maps["bucket"]).sum()),
        "first_differs_from_prefix": int((maps["first"] != maps["prefix"]).sum()),
        "prefix_differs_from_bucket": int((maps["prefix"] != maps["bucket"]).sum()),
        "teacher_ids_strict_prefix_of_a_student_token": len(strict_prefix),
        "of_which_the_student_also_spells": int((maps["bucket"][strict_prefix] >= 0).sum()),
        # the ambiguous ones: the teacher writes that longer student token as this one + more
        "teacher_ids_strict_prefix_of_a_student_token_the_teacher_lacks": len(ambiguous),
    }
    return numbers, maps["first"]


def position_numbers(teacher_tok, student_tok, teacher, student, first: np.ndarray, texts: list[str],
                     seq_len: int) -> dict:
    ids: list[int] = []
    for doc in teacher_tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += doc.ids + [teacher_tok.eos_token_id]
    backend = student_tok.backend_tokenizer
    aligner = RowAligner(teacher, student, lambda t: [e.ids for e in backend.encode_batch(t, add_special_tokens=False)],
                         10_000, student_tok.eos_token_id)
    stride = seq_len - 1
    targets = one_to_one = starts = same_event = teacher_shorter = unaligned = 0
    for r in range((len(ids) - 1) // stride):
        row = np.array(ids[r * stride: r * stride + seq_len])
        try:
            t, s, cut = aligner.row(row)
        except Exception:  # a row whose student tokens do not spell its bytes: stage two counts it
            unaligned += 1
            continue
        a = align(t, s, cut)
        targets += len(s.ids) - 1
        one_to_one += len(a.exact)
        starts += len(a.starts)
        for s_pos, t_pos in a.starts.tolist():
            s_next, t_next = int(s.ids[s_pos + 1]), int(t.ids[t_pos + 1])
            same_event += int(first[t_next] == s_next)
            t_bytes, s_bytes = teacher.pieces[t_next], student.pieces[s_next]
            teacher_shorter += int(t_bytes is not None and s_bytes is not None and len(t_bytes) < len(s_bytes))
    return {"rows": (len(ids) - 1) // stride, "seq_len": seq_len, "student_targets": targets,
            "unaligned_rows": unaligned, "one_to_one_share": one_to_one / targets, "start_share": starts / targets,
            "starts_where_first_maps_teacher_next_to_student_next": same_event / max(starts, 1),
            "starts_where_teacher_next_is_a_strict_prefix_of_student_next": teacher_shorter / max(starts, 1),
            "non_1to1_starts_where_teacher_next_is_a_strict_prefix": teacher_shorter / max(starts - one_to_one, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-tokenizer", default=str(ROOT / "data" / "tokenizer"))
    parser.add_argument("--student-tokenizer", default=str(ROOT / "data" / "tokenizer-4096"))
    parser.add_argument("--heldout", default=str(ROOT / "data" / "corpus" / "heldout.jsonl.gz"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    teacher_tok, student_tok = (AutoTokenizer.from_pretrained(p) for p in (args.teacher_tokenizer,
                                                                          args.student_tokenizer))
    check_byte_level(teacher_tok, "teacher", args.teacher_tokenizer)
    check_byte_level(student_tok, "student", args.student_tokenizer)
    teacher, student = token_bytes(teacher_tok), token_bytes(student_tok)
    vocabulary, first = map_numbers(teacher, student, student_tok)
    with gzip.open(args.heldout, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    def shown(path: str) -> str:
        resolved = Path(path).resolve()
        return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path

    result = {"teacher_tokenizer": shown(args.teacher_tokenizer), "student_tokenizer": shown(args.student_tokenizer),
              "heldout": shown(args.heldout), "map": vocabulary,
              "positions": position_numbers(teacher_tok, student_tok, teacher, student, first, texts, args.seq_len)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

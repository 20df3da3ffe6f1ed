"""A byte-level BPE tokenizer cut to its first SIZE ids (its specials, its bytes and the first merges),
and a student config at that vocabulary: the control of issue #30's harder pair.

Every token of the cut tokenizer is a token of the source, and it splits text as the source would
had it stopped merging there. A student of it, distilled across tokenizers from the source's
teacher, has the cross-tokenizer student's vocabulary size (8192) with the least possible mismatch
of tokenizers: what share of the same-tokenizer gain it recovers separates what the vocabulary's
size costs from what the mismatch costs (docs/BENCHMARKS.md, "Across tokenizers").

    python scripts/truncate_bpe.py --source data/models/smollm2-135m --size 8192 \
        --out runs/trunc8k/tokenizer --student data/models/student-smollm2.json --student-out runs/trunc8k/student.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def truncate(source: Path, size: int, out: Path) -> int:
    """Write the cut tokenizer to ``out``; returns its number of merges."""
    config = json.loads((source / "tokenizer.json").read_text())
    model = config["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"{source}: a {model.get('type')} tokenizer; only a BPE one can be cut by merges")
    by_id = {i: token for token, i in model["vocab"].items()}
    base = len(model["vocab"]) - len(model["merges"])  # specials and bytes, before the first merge's token
    if not base < size <= len(model["vocab"]):
        raise SystemExit(f"--size {size} must lie between {base + 1} and {len(model['vocab'])}")
    merges = model["merges"][:size - base]
    for i, merge in enumerate(merges):  # merge i makes id base + i, of two earlier ids
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        if by_id.get(base + i) != a + b or max(model["vocab"][a], model["vocab"][b]) >= base + i:
            raise SystemExit(f"{source}: merge {i} ({a!r} + {b!r}) does not make id {base + i}; its ids are not in "
                             "merge order, so it cannot be cut by id")
    model["vocab"] = {token: i for token, i in model["vocab"].items() if i < size}
    model["merges"] = merges
    if any(t["id"] >= size for t in config.get("added_tokens", [])):
        raise SystemExit(f"{source}: an added token has an id past {size}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(config, ensure_ascii=False))
    shutil.copy(source / "tokenizer_config.json", out / "tokenizer_config.json")
    return len(merges)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a Hugging Face directory with a BPE tokenizer.json")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--student", type=Path, help="a model config to copy at the cut vocabulary")
    parser.add_argument("--student-out", type=Path)
    args = parser.parse_args()
    merges = truncate(args.source, args.size, args.out)
    print(f"{args.out}: {args.size} ids ({merges} merges)")
    if args.student and args.student_out:
        config = json.loads(args.student.read_text()) | {"vocab_size": args.size}
        args.student_out.write_text(json.dumps(config, indent=1))
        print(f"{args.student_out}: {args.student} at {args.size} ids")


if __name__ == "__main__":
    main()

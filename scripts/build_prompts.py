"""The prompt sets of `make onpolicy` (issue #25): the opening words of corpus documents.

A prompt is the first W words of a document, W from 6 to 15 (decided by the document's sha256, so the
sets are stable), its whitespace kept as one space; documents that open with a word over 20
characters, a character that is not printable, or more than 100 characters in those words (ASCII
art, code, line noise) are passed over, so that prompts stay short in tokens and rows stay short. Training prompts come from train documents,
held-out prompts from held-out documents only; documents are taken in the order of the sha256 of
their id, so each set is a fixed, source-mixed sample.

    python scripts/build_prompts.py --corpus data/corpus --out data/prompts --train 2048 --heldout 128
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path


def prompts(path: Path, count: int) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    docs.sort(key=lambda d: hashlib.sha256(d["id"].encode()).hexdigest())
    out = []
    for doc in docs:
        words = doc["text"].split()
        width = 6 + int(hashlib.sha256(doc["text"].encode()).hexdigest()[:8], 16) % 10
        head = words[:width]
        if len(words) > width and len(" ".join(head)) <= 100 and all(len(w) <= 20 and w.isprintable() for w in head):
            out.append({"prompt": " ".join(head), "doc": doc["id"], "source": doc["source"]})
        if len(out) == count:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--out", type=Path, default=Path("data/prompts"))
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--heldout", type=int, default=128)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", args.train), ("heldout", args.heldout)):
        records = prompts(args.corpus / f"{name}.jsonl.gz", count)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (args.out / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{args.out / name}.jsonl: {len(records)} prompts")


if __name__ == "__main__":
    main()

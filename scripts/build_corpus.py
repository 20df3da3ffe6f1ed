"""Rebuild data/corpus/ from the Debian-extracted corpora in ../shared/corpora.

A *document* is a run of consecutive paragraphs of one source, at least
``--min-chars`` long (fortunes: one quotation each). Documents are assigned to
the held-out split by a hash of their text, so the split is by document, is
stable when sources are added, and no held-out text is ever trained on.

    python scripts/build_corpus.py --src ../shared/corpora --out data/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from pathlib import Path

SOURCES = ["tdavid", "web_bible", "mhcc", "scofield", "jargon", "fortunes"]


def paragraphs(name: str, text: str) -> list[str]:
    if name == "fortunes":
        blocks = re.split(r"^%\s*$", text, flags=re.M)
    else:
        blocks = re.split(r"\n\s*\n", text)
    out = []
    for block in blocks:
        # Fortunes keep their line breaks (verse, dialogue); prose paragraphs are one line already.
        lines = [line.strip() for line in block.strip().splitlines()]
        joined = "\n".join(line for line in lines if line)
        joined = re.sub(r"[ \t]+", " ", joined)
        if joined:
            out.append(joined)
    return out


def documents(name: str, text: str, min_chars: int) -> list[str]:
    paras = paragraphs(name, text)
    if name == "fortunes":
        return paras
    docs, current, size = [], [], 0
    for para in paras:
        current.append(para)
        size += len(para)
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def is_heldout(doc: str, heldout_permille: int) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < heldout_permille


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path("../shared/corpora"))
    parser.add_argument("--out", type=Path, default=Path("data/corpus"))
    parser.add_argument("--min-chars", type=int, default=2000)
    parser.add_argument("--heldout-permille", type=int, default=30)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "heldout": []}
    seen: set[str] = set()
    for name in SOURCES:
        text = gzip.decompress((args.src / f"{name}.txt.gz").read_bytes()).decode("utf-8")
        for i, doc in enumerate(documents(name, text, args.min_chars)):
            if doc in seen:  # exact duplicates would leak across the split
                continue
            seen.add(doc)
            split = "heldout" if is_heldout(doc, args.heldout_permille) else "train"
            splits[split].append({"id": f"{name}-{i:06d}", "source": name, "text": doc})

    stats = {}
    for split, rows in splits.items():
        path = args.out / f"{split}.jsonl.gz"
        tmp = path.with_suffix(".tmp")
        # mtime=0 and a fixed filename keep the gzip bytes reproducible.
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            for row in rows:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        tmp.replace(path)
        stats[split] = {"documents": len(rows), "characters": sum(len(r["text"]) for r in rows)}
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()

"""Build data/pydoc/: English text of a domain the project's tokenizer never saw, for the harder pair
of ``make bench-cross-real`` (issue #30).

The text is the docstrings of CPython's standard library as installed on this machine (Debian
bookworm's ``libpython3.11-minimal`` / ``libpython3.11-stdlib``, ``/usr/lib/python3.11``; PSF
License Version 2, ``/usr/lib/python3.11/LICENSE.txt``): technical prose about programming, with
identifiers, signatures and examples in it — none of it in ``data/corpus`` (Bible text,
commentaries, the Jargon File, fortunes), which ``data/tokenizer`` was trained on.

Every ``.py`` file under the directory, tests, ``site-packages``/``dist-packages``, ``idlelib`` and
``lib2to3``'s fixers left out, is parsed with :mod:`ast` (nothing is imported or run); its module,
class and function docstrings are taken in source order and cleaned with :func:`inspect.cleandoc`.
A *document* is a run of consecutive docstrings of one module at least ``--min-chars`` long (a
module's short remainder joins its last document). A **module** is held out when the first four
bytes of the sha256 of its dotted name, as an integer, are below ``--heldout-permille`` modulo
1000, so no module has text on both sides of the split; exact duplicate docstrings (``__init__``
boilerplate, overrides that repeat a parent's) are kept once, where first met in path order.

    python scripts/build_pydoc_corpus.py --src /usr/lib/python3.11 --out data/pydoc
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import json
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "fixes", "__pycache__"}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file of another Python (lib2to3's examples): not read
        return []
    found = []
    for node in ast.walk(tree):  # breadth first; sorted back to source order below
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=False)
            if text and text.strip():
                found.append((getattr(node, "lineno", 0), inspect.cleandoc(text)))
    return [text for _, text in sorted(found, key=lambda item: item[0])]


def documents(texts: list[str], min_chars: int) -> list[str]:
    docs, current, size = [], [], 0
    for text in texts:
        current.append(text)
        size += len(text)
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if docs and size < min_chars // 2:
            docs[-1] += "\n\n" + "\n\n".join(current)
        else:
            docs.append("\n\n".join(current))
    return docs


def is_heldout(name: str, heldout_permille: int) -> bool:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < heldout_permille


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="/usr/lib/python3.11")
    parser.add_argument("--out", default="data/pydoc")
    parser.add_argument("--min-chars", type=int, default=2000)
    parser.add_argument("--heldout-permille", type=int, default=150)
    args = parser.parse_args()
    src, out = Path(args.src), Path(args.out)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    for path in sorted(src.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(src).parts) or path.name.startswith("_sysconfigdata"):
            continue
        name = module_name(path, src)
        texts = []
        for text in docstrings(path.read_text(encoding="utf-8", errors="replace")):
            if text not in seen:
                seen.add(text)
                texts.append(text)
        split = "heldout" if is_heldout(name, args.heldout_permille) else "train"
        for i, doc in enumerate(documents(texts, args.min_chars)):
            splits[split].append({"id": f"{name}-{i:03d}", "source": "python-stdlib-docstrings", "text": doc})
    out.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        # mtime=0: the same input gives the same bytes
        with open(out / f"{split}.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for doc in docs:
                f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
        chars = sum(len(d["text"]) for d in docs)
        print(f"{split}: {len(docs)} documents, {chars:,} characters -> {out / (split + '.jsonl.gz')}")


if __name__ == "__main__":
    main()

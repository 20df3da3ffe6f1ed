"""Sources with weights: documents of several corpora interleaved so that each source's share of the
store's tokens is its weight (``distill prepare --sources mix.yaml``), as pretraining-scale runs
are fed.

A sources file is a list (or ``{sources: [...], seed: S}``) of entries ``{path, weight}`` — shares,
normalised — or ``{path, tokens}`` — a budget of tokens from each, all entries alike; ``path`` is a
file or directory as ``--input`` takes it (relative to the sources file), ``text_field`` may differ
per source, and ``repeat: true`` lets a weighted source start over when it runs out (upsampling a
small one, its passes counted).

The order is a pure function of the sources and the seed. Each source is read in its own order, a
batch of documents tokenized at a time; the next document comes from the source furthest below its
share of the tokens so far (``weight·total − tokens``, the largest deficit; ties to the seed's
order of sources), so every share stays within one document of its target all along, not only on
average. Tokens count as the packer will store them (each document, its EOS, and its BOS where
documents start with one).

When a weighted source without ``repeat`` runs out, the mixture stops there, so that the shares
hold, and says which source it was; with budgets, a source that runs out short is reported and the
others go on to theirs. What was taken from each source is recorded in the store's index
(``mixture``).
"""

from __future__ import annotations

import collections
import difflib
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DistillError
from pipeline.text.corpus import DocumentReader, ReadStats, find_inputs

ENTRY_KEYS = ("path", "weight", "tokens", "text_field", "repeat")


@dataclass(frozen=True)
class Source:
    path: str  # as the user wrote it (recorded in params)
    resolved: Path  # relative to the sources file
    weight: float | None = None
    tokens: int | None = None
    text_field: str | None = None
    repeat: bool = False

    def spec(self) -> dict[str, Any]:
        """What decides this source's part of the store (its params entry)."""
        body = {"path": self.path, "weight": self.weight, "tokens": self.tokens, "text_field": self.text_field,
                "repeat": self.repeat}
        return {k: v for k, v in body.items() if v not in (None, False)}


@dataclass(frozen=True)
class Mixture:
    sources: tuple[Source, ...]
    seed: int = 0

    @property
    def by_tokens(self) -> bool:
        return self.sources[0].tokens is not None

    def shares(self) -> list[float]:
        amounts = [s.tokens if self.by_tokens else s.weight for s in self.sources]
        return [a / sum(amounts) for a in amounts]

    def params(self) -> dict[str, Any]:
        return {"sources": [s.spec() for s in self.sources], "mixture_seed": self.seed}


def read_sources(path: str | Path) -> Mixture:
    """A sources file, checked: every problem is one line naming the entry."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"sources file {path} does not exist; check --sources")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DistillError(f"sources file {path} does not parse ({' '.join(str(e).split())[:200]}); fix the YAML") \
            from None
    seed = 0
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"sources", "seed"})
        if unknown:
            raise DistillError(f"sources file {path}: unknown key {unknown[0]!r}; it holds 'sources' (a list) and "
                               "optionally 'seed'")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DistillError(f"sources file {path}: seed must be an integer, got {seed!r}")
        data = data.get("sources")
    if not isinstance(data, list) or not data:
        raise DistillError(f"sources file {path} must list sources: a list of {{path, weight}} or {{path, tokens}}")
    sources = [_entry(path, i, entry) for i, entry in enumerate(data)]
    kinds = {s.tokens is not None for s in sources}
    if len(kinds) > 1:
        raise DistillError(f"sources file {path} mixes 'weight' and 'tokens' entries; give every source a weight "
                           "(shares) or every source a token budget")
    if sources[0].tokens is not None and any(s.repeat for s in sources):
        raise DistillError(f"sources file {path}: 'repeat' is for weighted sources (a budget says how much to take)")
    if all(s.repeat for s in sources):
        raise DistillError(f"sources file {path}: every source has repeat: true, so the mixture would never end; leave "
                           "the largest without it (the store ends when it runs out)")
    paths = [s.resolved for s in sources]
    if len(set(paths)) < len(paths):
        raise DistillError(f"sources file {path} names {next(p for p in paths if paths.count(p) > 1)} twice; "
                           "list each source once")
    return Mixture(tuple(sources), seed)


def _entry(path: Path, i: int, entry: Any) -> Source:
    where = f"sources file {path}, entry {i + 1}"
    if not isinstance(entry, dict):
        raise DistillError(f"{where}: must be a mapping with 'path' and 'weight' or 'tokens', got {entry!r}")
    for key in entry:
        if key not in ENTRY_KEYS:
            close = difflib.get_close_matches(str(key), ENTRY_KEYS, n=1)
            raise DistillError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f"; an entry holds {', '.join(ENTRY_KEYS)}")
    source_path = entry.get("path")
    if not isinstance(source_path, str) or not source_path:
        raise DistillError(f"{where}: 'path' must name a corpus file or directory")
    weight, tokens = entry.get("weight"), entry.get("tokens")
    if (weight is None) == (tokens is None):
        raise DistillError(f"{where}: give exactly one of 'weight' (a share) and 'tokens' (a budget)")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0):
        raise DistillError(f"{where}: weight must be a positive number, got {weight!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise DistillError(f"{where}: tokens must be a positive integer, got {tokens!r}")
    text_field = entry.get("text_field")
    if text_field is not None and (not isinstance(text_field, str) or not text_field):
        raise DistillError(f"{where}: text_field must be a field or column name")
    repeat = entry.get("repeat", False)
    if not isinstance(repeat, bool):
        raise DistillError(f"{where}: repeat must be true or false, got {repeat!r}")
    resolved = Path(source_path) if Path(source_path).is_absolute() else path.parent / source_path
    return Source(source_path, resolved, float(weight) if weight is not None else None, tokens, text_field, repeat)


@dataclass
class SourceTally:
    documents: int = 0
    tokens: int = 0
    passes: int = 1
    ran_out: bool = False


@dataclass
class MixtureReader:
    """Token ids of documents (without EOS), interleaved from ``mixture``'s sources; ``encode`` turns a
    batch of texts into token ids. ``files[i]`` are source i's files (:func:`mixture_files`)."""

    mixture: Mixture
    files: list[list[Path]]
    encode: Callable[[list[str]], list[list[int]]]
    text_field: str = "text"
    txt_documents: str = "file"
    skip_bad_utf8: bool = False
    batch_documents: int = 512
    tokens_around: int = 1  # the tokens the packer adds to each document: EOS, and a BOS before it where it starts one
    tally: list[SourceTally] = field(default_factory=list)
    stopped_by: int | None = None  # the weighted source whose running out ended the mixture

    def __post_init__(self):
        self.readers = [DocumentReader(files, s.text_field or self.text_field, self.txt_documents, self.skip_bad_utf8)
                        for s, files in zip(self.mixture.sources, self.files)]
        self.tally = [SourceTally() for _ in self.mixture.sources]

    @property
    def stats(self) -> ReadStats:
        return ReadStats(documents=sum(t.documents for t in self.tally),
                         skipped_lines=sum(r.stats.skipped_lines for r in self.readers))

    def __iter__(self) -> Iterator[list[int]]:
        sources, shares = self.mixture.sources, self.mixture.shares()
        budgets = [s.tokens for s in sources]
        # ties (the first choice above all) go to the sources in the seed's order
        rank = {i: r for r, i in enumerate(random.Random(self.mixture.seed).sample(range(len(sources)), len(sources)))}
        texts = [iter(r) for r in self.readers]
        queues: list[collections.deque] = [collections.deque() for _ in sources]
        live = set(range(len(sources)))
        total = 0
        while live:
            i = max(live, key=lambda j: (shares[j] * total - self.tally[j].tokens, -rank[j]))
            if not queues[i] and not self._refill(i, texts, queues[i]):
                self.tally[i].ran_out = True
                live.discard(i)
                if budgets[i] is None:  # a weighted source is gone: stop, so that the shares hold
                    self.stopped_by = i
                    return
                continue
            ids = queues[i].popleft()
            tally = self.tally[i]
            tally.documents += 1
            tally.tokens += len(ids) + self.tokens_around  # as the packer stores it (EOS, BOS)
            total += len(ids) + self.tokens_around
            if budgets[i] is not None and tally.tokens >= budgets[i]:
                live.discard(i)
            yield ids

    def _refill(self, i: int, texts: list[Iterator[str]], queue: collections.deque) -> bool:
        batch = list(itertools.islice(texts[i], self.batch_documents))
        if not batch and self.mixture.sources[i].repeat and self.tally[i].documents:
            self.tally[i].passes += 1
            texts[i] = iter(self.readers[i])
            batch = list(itertools.islice(texts[i], self.batch_documents))
        queue.extend(self.encode(batch) if batch else ())
        return bool(queue)

    def facts(self) -> list[dict[str, Any]]:
        """The store index's ``mixture``: what was taken from each source."""
        total = sum(t.tokens for t in self.tally) or 1
        return [{"path": s.path, "target_share": round(share, 6), "share": round(t.tokens / total, 6),
                 "tokens": t.tokens, "documents": t.documents, "passes": t.passes, "ran_out": t.ran_out}
                for s, share, t in zip(self.mixture.sources, self.mixture.shares(), self.tally)]

    def summary(self) -> str:
        """One line: the shares reached, and which source ran out."""
        parts = [f"{f['path']} {f['share']:.1%} (target {f['target_share']:.1%}, {f['tokens']} tokens"
                 + (f", {f['passes']} passes" if f["passes"] > 1 else "") + ")" for f in self.facts()]
        line = "mixture: " + "; ".join(parts)
        if self.stopped_by is not None:
            line += (f"; stopped when {self.mixture.sources[self.stopped_by].path} ran out (add text to it, give it "
                     "repeat: true, or lower its weight)")
        short = [s.path for s, t in zip(self.mixture.sources, self.tally) if t.ran_out and s.tokens is not None
                 and t.tokens < s.tokens]
        if short:
            line += f"; ran out before its budget: {', '.join(short)}"
        return line


def mixture_files(mixture: Mixture, skip_unknown: bool = False) -> tuple[list[list[Path]], list[Path]]:
    """Each source's corpus files (as ``--input`` finds them), and every file left out as of no kind
    distill reads (with ``skip_unknown``)."""
    files, skipped = [], []
    for source in mixture.sources:
        found = find_inputs([str(source.resolved)], flag=f"--sources entry {source.path}", skip_unknown=skip_unknown)
        files.append(found.files)
        skipped.extend(found.skipped)
    return files, skipped

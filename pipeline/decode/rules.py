"""Rules on generated text — the paper's "set of rules" — enforced while decoding.

A rule file is YAML; every key is optional, at least one is needed, and all apply to the
*completion* (the text after the prompt) — ``banned`` to any occurrence that overlaps it, including
one that begins in the prompt (see below):

    banned: ["Lord", "thee"]          # phrases that must never appear (substrings, case-sensitive)
    required: ["the end"]             # phrases that must appear
    regex: "[A-Z][^.]*\\."            # the whole completion must match (Python / `regex` syntax)
    charset: "[a-zA-Z ,.'\\n]"        # allowed characters: a bracketed class, or the characters themselves
    vocabulary: [the, a, man, ...]    # allowed words; a word is ``\\w+(?:'\\w+)*``
    max_tokens: 48                    # at most this many completion tokens
    max_words: 12                     # at most this many words (same definition)

How each is enforced at decoding time (:meth:`Rules.allowed`, called on one record's state
before each token is drawn; the sampler never sees a masked token):

- ``banned``: a token is masked when appending it would *complete* a banned phrase anywhere in
  the decoded text, whichever tokens spell it. Precomputed over the vocabulary's byte strings:
  tokens that contain the phrase are masked always; for each split ``phrase = a + b`` the tokens
  whose bytes start with ``b`` are masked when the text ends with ``a``. A step costs one
  ``endswith`` per split and a mask assignment, whatever the vocabulary size. The text checked
  begins with the end of the prompt (:meth:`Rules.state`), so a phrase straddling the two is
  forbidden too: with ``banned: [" and"]`` a prompt ending in a space may not go on with ``and``,
  since the record's text (what ``prepare`` reads) would hold `` and`` — as transformers'
  ``bad_words_ids``, which matches over the prompt's tokens as well, would forbid it. A phrase
  wholly inside the prompt is not the completion's doing and does not count.
- ``charset``: tokens whose bytes decode to characters outside the set are masked (a static mask);
  tokens that are only part of a UTF-8 character, and any token after an incomplete one, are
  checked on the bytes they would complete.
- ``regex`` and ``vocabulary``: by a token-level automaton over the tokenizer's vocabulary. The
  vocabulary's byte strings form a trie; a step walks it from the root and keeps a prefix only if
  the text with that prefix appended can still be completed to a match (``regex``'s partial
  matching, ``fullmatch(text, partial=True)``; for ``vocabulary``, every finished word is allowed
  and the unfinished one begins an allowed word). Both conditions are prefix-closed, so a failed
  prefix prunes its whole subtree, and a step visits only the viable part of the vocabulary plus
  its border — a few hundred nodes for a restrictive pattern. The regex engine holds the
  automaton's state implicitly (it re-reads the text), which buys the full syntax of Python's
  ``re`` with no compiled-DFA dependency, and the check at the end is the same engine, so
  enforcement and checking cannot disagree. Rejection and resampling alone were not chosen: a
  pattern narrower than the teacher's habits (most useful ones) would almost never be hit.
  Resampling stays as the fallback for the one thing a step-wise mask cannot see, a dead end
  (see below).
- ``max_tokens``: the token budget (the smaller of it and ``--max-new-tokens``); at the last
  token only tokens that leave a *finished* completion (a full regex match, whole allowed words,
  required phrases present) are allowed.
- ``max_words``: once the text is within one token's words of the limit, every candidate is
  counted exactly and the ones that would exceed it are masked.
- ``required``: end-of-sequence is masked until every phrase appears, and once the remaining
  budget (tokens, or words) is just enough to write the missing phrases, they are forced: their
  tokens are appended in turn, each still checked against the other rules' mask.

EOS is allowed only when the completion as it stands satisfies every rule. A state where no
token is allowed is a dead end: the record's attempt fails and the caller redraws it with fresh
randomness (``--max-attempts``); a record that fails every attempt is reported ``unsatisfiable``.
A rule set that no completion can satisfy — a required phrase longer than the budget or
containing a banned one, an allowed set with no token in it, no token able to begin a completion
— is found when the rules are compiled against the tokenizer and is a one-line error.

:func:`violations` is the ground truth: it checks a finished completion against every rule, and
the generator checks every record with it after decoding.
"""

from __future__ import annotations

import codecs
import difflib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch
import yaml

from pipeline.errors import DistillError

RULES = ("banned", "required", "regex", "charset", "vocabulary", "max_tokens", "max_words")
# A rule file is shared like a config, and a backtracking engine takes exponential time on nested
# repetition ("(a|aa)+b" on 40 a's): every match is bounded, and so is one decoding step's walk of the
# vocabulary (thousands of matches), so a bad pattern is one line instead of a stalled job.
MATCH_SECONDS = 1.0
STEP_SECONDS = 60.0
WORD = regex.compile(r"\w+(?:'\w+)*")
NOT_IN_WORD = regex.compile(r"[^\w']")  # a character no word contains: words on either side are separate


# ------------------------------------------------------------------------------ the rule file


@dataclass(frozen=True)
class RuleSpec:
    """A parsed, checked rule file (no tokenizer needed). ``None`` / empty = rule not given."""

    banned: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    regex: str | None = None
    charset: str | None = None
    vocabulary: tuple[str, ...] = ()
    max_tokens: int | None = None
    max_words: int | None = None
    source: str = ""  # the file, for messages

    @property
    def sha256(self) -> str:
        body = {name: getattr(self, name) for name in RULES}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=list).encode()).hexdigest()

    def given(self) -> list[str]:
        return [name for name in RULES if getattr(self, name) not in (None, ())]


def load_rules(path: str | Path) -> RuleSpec:
    """Read and check a rule file; every problem is a one-line :class:`DistillError` naming the rule."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"rule file {path} does not exist; check --rules")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DistillError(f"rule file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise DistillError(f"rule file {path} does not parse as YAML: {' '.join(str(e).split())}; fix it") from None
    return parse_rules(data, str(path))


def parse_rules(data: Any, source: str = "rules") -> RuleSpec:
    def bad(rule: str, what: str) -> DistillError:
        return DistillError(f"rule file {source}: rule '{rule}' {what}")

    if data is None or data == {}:
        raise DistillError(f"rule file {source} holds no rules; give at least one of {', '.join(RULES)}")
    if not isinstance(data, dict):
        raise DistillError(f"rule file {source} holds a {type(data).__name__}, not a mapping; write one "
                           f"`rule: value` per line ({', '.join(RULES)})")
    for key in data:
        if key not in RULES:
            close = difflib.get_close_matches(str(key), RULES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known rules: {', '.join(RULES)}"
            raise DistillError(f"rule file {source}: unknown rule '{key}'{hint}")

    def phrases(rule: str) -> tuple[str, ...]:
        value = data.get(rule, ())
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad(rule, "must be a list of strings")
        if any(v == "" for v in value):
            raise bad(rule, "holds an empty string; remove it")
        return tuple(value)

    def positive(rule: str) -> int | None:
        value = data.get(rule)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(rule, f"must be a positive integer, got {value!r}")
        return value

    pattern = data.get("regex")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise bad("regex", f"must be a string, got {pattern!r}")
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise bad("regex", f"is not a valid regular expression ({e})") from None
    charset = data.get("charset")
    if charset is not None:
        if not isinstance(charset, str):
            raise bad("charset", f"must be a string of characters or a bracketed class, got {charset!r}")
        if charset == "" or charset == "[]":
            raise bad("charset", "is an empty allowed set; list the characters a completion may use")
        _charset_matcher(charset, source)
    vocabulary = phrases("vocabulary")
    if "vocabulary" in data and not vocabulary:
        raise bad("vocabulary", "is an empty allowed set; list the words a completion may use")
    for word in vocabulary:
        if not WORD.fullmatch(word):
            raise bad("vocabulary", f"entry {word!r} is not one word (letters, digits, _ and inner apostrophes)")
    spec = RuleSpec(banned=phrases("banned"), required=phrases("required"), regex=pattern, charset=charset,
                    vocabulary=vocabulary, max_tokens=positive("max_tokens"), max_words=positive("max_words"),
                    source=source)
    if "banned" in data and not spec.banned:
        raise bad("banned", "is empty; remove it or list phrases")
    if "required" in data and not spec.required:
        raise bad("required", "is empty; remove it or list phrases")
    return spec


def _charset_matcher(charset: str, source: str):
    """``charset`` as a compiled single-character class: ``[a-z ,.]`` as written, else the literal characters."""
    body = charset if charset.startswith("[") and charset.endswith("]") and len(charset) > 2 else \
        "[" + "".join(regex.escape(c) for c in charset) + "]"
    try:
        return regex.compile(body + "*")
    except regex.error as e:
        raise DistillError(f"rule file {source}: rule 'charset' is not a valid character class ({e})") from None


def count_words(text: str) -> int:
    return sum(1 for _ in WORD.finditer(text))


def violations(spec: RuleSpec, completion: str, n_tokens: int, before: str = "") -> list[str]:
    """Every rule a finished completion breaks, as ``rule: detail`` (empty when it satisfies all).
    ``before``: the text the completion follows (its prompt); a banned phrase that begins there and
    ends in the completion counts, one wholly inside it does not."""
    found = []
    for phrase in spec.banned:
        if phrase in _overlapping(before, len(phrase)) + completion:
            found.append(f"banned: {phrase!r} appears")
    for phrase in spec.required:
        if phrase not in completion:
            found.append(f"required: {phrase!r} missing")
    if spec.regex is not None and bounded_fullmatch(regex.compile(spec.regex), completion) is None:
        found.append("regex: no full match")
    if spec.charset is not None and not _charset_matcher(spec.charset, spec.source).fullmatch(completion):
        others = sorted({c for c in completion if not _charset_matcher(spec.charset, spec.source).fullmatch(c)})
        found.append(f"charset: {''.join(others)!r} not allowed")
    if spec.vocabulary:
        allowed = set(spec.vocabulary)
        unknown = sorted({w for w in WORD.findall(completion) if w not in allowed})
        if unknown:
            found.append(f"vocabulary: {', '.join(unknown[:5])} not allowed")
    if spec.max_tokens is not None and n_tokens > spec.max_tokens:
        found.append(f"max_tokens: {n_tokens} > {spec.max_tokens}")
    if spec.max_words is not None and count_words(completion) > spec.max_words:
        found.append(f"max_words: {count_words(completion)} > {spec.max_words}")
    return found


def _overlapping(before: str | bytes, length: int) -> str | bytes:
    """The end of ``before`` that an occurrence of a phrase of ``length`` characters (or bytes)
    overlapping what follows can begin in: its last ``length − 1``."""
    return before[max(0, len(before) - (length - 1)):]


# ------------------------------------------------------------------------- the vocabulary's bytes


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (byte-level BPE token → bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id adds to the decoded text (special tokens: ``b""``), checked on probe texts.

    Byte-level BPE (GPT-2, Llama 3, Qwen, the project's tokenizer) maps each byte to a printable
    character; SentencePiece writes ``▁`` for a space and ``<0xNN>`` for byte fallback; other
    tokenizers are decoded one token at a time. Whatever the route, the concatenated bytes of a
    probe's tokens must give back the probe, or rules are refused for this tokenizer.
    """
    vocab = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    special = set(tokenizer.all_special_ids)
    alphabet = _byte_level_alphabet()
    table: list[bytes]
    if all(p is None or i in special or all(c in alphabet for c in p) for i, p in enumerate(pieces)):
        table = [b"" if p is None or i in special else bytes(alphabet[c] for c in p) for i, p in enumerate(pieces)]
    elif any(p and "▁" in p for p in pieces):
        def sentencepiece(p: str) -> bytes:
            if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                return bytes([int(p[3:5], 16)])
            return p.replace("▁", " ").encode("utf-8")
        table = [b"" if p is None or i in special else sentencepiece(p) for i, p in enumerate(pieces)]
    else:
        table = [b"" if i in special else tokenizer.decode([i]).encode("utf-8") for i in range(vocab)]
    for probe in ("The quick brown fox, 12 jumps!", "naïve café — 東京 ok", "two  spaces\nand a\ttab"):
        ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
        joined = b"".join(table[i] for i in ids)
        if joined not in (probe.encode(), b" " + probe.encode()):
            raise DistillError("rules need a tokenizer whose tokens map to bytes (byte-level BPE or SentencePiece); "
                               f"this one turns {probe!r} into {joined!r}")
    return table


def decode_prefix(data: bytes) -> str:
    """``data`` decoded as UTF-8 without an incomplete character at its end (invalid bytes become U+FFFD)."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


class _Trie:
    __slots__ = ("children", "ids")

    def __init__(self):
        self.children: dict[int, _Trie] = {}
        self.ids: list[int] = []


# ------------------------------------------------------------------------ compiled against a tokenizer


@dataclass
class RuleState:
    """One record's progress under the rules: the completion's bytes and tokens, forced tokens queued,
    and ``before``, the end of the prompt (:meth:`Rules.state`), where a banned phrase may begin."""

    text: bytes = b""
    n_tokens: int = 0
    forced: list[int] = field(default_factory=list)
    before: bytes = b""

    def append(self, token: int, piece: bytes) -> None:
        self.text += piece
        self.n_tokens += 1
        if self.forced and self.forced[0] == token:
            self.forced.pop(0)


class Rules:
    """A :class:`RuleSpec` compiled against a tokenizer's vocabulary (see the module docstring)."""

    def __init__(self, spec: RuleSpec, tokenizer, max_new_tokens: int, stop: str | tuple[str, ...] = ""):
        """``stop``: text (or texts) that ends a completion as EOS does (eval's QA answers end at its
        format's stop sequences): a token holding one is allowed only where the completion up to the
        first of them satisfies every rule."""
        self.spec = spec
        self.tokenizer = tokenizer
        self.pieces = token_bytes(tokenizer)
        self.vocab = len(self.pieces)
        self.eos = tokenizer.eos_token_id
        self.budget = min(max_new_tokens, spec.max_tokens or max_new_tokens)
        source = f"rule file {spec.source}"
        special = set(tokenizer.all_special_ids)
        texts = [p.decode("utf-8", errors="strict") if _is_utf8(p) else None for p in self.pieces]
        # tokens that are not whole UTF-8 characters, and those that continue a character begun before them
        self.fragments = [i for i, p in enumerate(self.pieces) if p and texts[i] is None and i not in special]
        self.continuations = [i for i in self.fragments if 0x80 <= self.pieces[i][0] < 0xC0]
        self.longest_continuation = max((len(self.pieces[i]) for i in self.continuations
                                         if all(0x80 <= b < 0xC0 for b in self.pieces[i])), default=1)
        self.continues = torch.zeros(self.vocab, dtype=torch.bool)
        self.continues[self.continuations] = True

        # static mask: tokens no completion may hold, whatever comes before them
        static = torch.tensor([bool(p) and i not in special for i, p in enumerate(self.pieces)])
        self.charset = _charset_matcher(spec.charset, spec.source) if spec.charset is not None else None
        if self.charset is not None:
            for i, t in enumerate(texts):
                if t is not None and not self.charset.fullmatch(t):
                    static[i] = False
            if not any(static[i] for i, t in enumerate(texts) if t is not None):
                raise DistillError(f"{source}: rule 'charset' allows none of the tokenizer's tokens; widen it")
            # the beginnings of the allowed characters' UTF-8 (a token may end inside one of those only)
            beyond_ascii = "".join(chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000)
            self.charset_prefixes = {b""} | {c.encode()[:k] for c in regex.findall(self.charset.pattern[:-1],
                                                                                    beyond_ascii)
                                             for k in range(1, len(c.encode()))}
        self.banned_splits: list[tuple[bytes, torch.Tensor]] = []
        # how far back into the prompt a banned phrase overlapping the completion can begin (bytes)
        self.banned_reach = max((len(phrase.encode()) - 1 for phrase in spec.banned), default=0)
        for phrase in spec.banned:
            inside, splits = self._phrase_tables(phrase.encode())
            static[inside] = False
            self.banned_splits += splits
        stops = [t.encode() for t in ((stop,) if isinstance(stop, str) else stop) if t]
        self.stops = {i: piece[:min(piece.index(t) for t in stops if t in piece)] for i, piece in enumerate(self.pieces)
                      if any(t in piece for t in stops)}
        static[list(self.stops)] = False  # judged apart, like EOS
        self.static = static
        self.vocabulary = set(spec.vocabulary)
        self.word_prefixes = {w[:k] for w in spec.vocabulary for k in range(1, len(w) + 1)}
        if self.vocabulary and not any(self._vocabulary_ok(t, final=False) for t in texts if t):
            raise DistillError(f"{source}: rule 'vocabulary' allows none of the tokenizer's tokens")
        self.pattern = regex.compile(spec.regex) if spec.regex is not None else None
        if self.pattern is not None and _matches_ascii_only(spec.regex):
            static[self.fragments] = False  # no part of a non-ASCII character can begin a match
        self.trie = self._build_trie() if (self.pattern is not None or self.vocabulary) else None
        # each whole token's words, and whether its first word could continue the text's last one
        self.piece_words = torch.tensor([count_words(t) if t else 0 for t in texts])
        self.starts_word = torch.tensor([bool(t) and _is_word_char(t[0]) for t in texts])
        self.starts_apostrophe_word = torch.tensor([bool(t) and len(t) > 1 and t[0] == "'" and _is_word_char(t[1])
                                                    for t in texts])
        self._masks: dict[tuple[bytes, int], torch.Tensor] = {}  # mask by (text, tokens left), oldest first
        self._masks_max = max(16, (1 << 23) // max(self.vocab, 1))
        self.required = [p.encode() for p in spec.required]
        self.required_tables = {p: self._phrase_tables(p) for p in self.required}
        self._check_satisfiable(source)

    # ---- compile-time checks: rule sets no completion can satisfy

    def _check_satisfiable(self, source: str) -> None:
        spec = self.spec
        for phrase in spec.required:
            for banned in spec.banned:
                if banned in phrase:
                    raise DistillError(f"{source}: unsatisfiable: required {phrase!r} contains banned {banned!r}")
            if self.charset is not None and not self.charset.fullmatch(phrase):
                raise DistillError(f"{source}: unsatisfiable: required {phrase!r} has characters outside 'charset'")
        tokens = sum(self._forced_cost(p.encode()) for p in spec.required)
        if tokens > self.budget:
            raise DistillError(f"{source}: unsatisfiable: the required phrases take {tokens} tokens, more than the "
                               f"budget of {self.budget} (max_tokens / --max-new-tokens)")
        words = sum(count_words(p) for p in spec.required)
        if spec.max_words is not None and words > spec.max_words:
            raise DistillError(f"{source}: unsatisfiable: the required phrases hold {words} words, more than "
                               f"max_words {spec.max_words}")
        if not self._can_begin(RuleState(), depth=3, calls=[2000]):
            raise DistillError(f"{source}: unsatisfiable: no token can begin a completion under rules "
                               f"{', '.join(self.spec.given())} (and the empty completion breaks them)")

    def _can_begin(self, state: RuleState, depth: int, calls: list[int]) -> bool:
        """Does some token (or EOS) fit ``state``? A token that ends inside a character (a UTF-8 lead
        byte) counts only if the rest of the character can follow it, looked for up to ``depth``
        bytes ahead and ``calls`` masks in all (beyond that, assumed possible)."""
        allowed = self.allowed(state)
        fragments = [i for i in self.fragments if allowed[i]]
        allowed[fragments] = False
        if allowed.any():
            return True
        for i in fragments:
            calls[0] -= 1
            if calls[0] < 0 or depth == 0:
                return True  # not looked into further: assumed possible (a dead end is still caught while decoding)
            if self._can_begin(RuleState(state.text + self.pieces[i], state.n_tokens + 1), depth - 1, calls):
                return True
        return False

    def _phrase_tables(self, phrase: bytes) -> tuple[torch.Tensor, list[tuple[bytes, torch.Tensor]]]:
        """Which tokens complete ``phrase`` when appended: the ids whose bytes contain it, and for
        each split ``phrase = a + b`` (``a`` non-empty) the ids whose bytes start with ``b``, to be
        used where the text ends with ``a``."""
        inside = torch.tensor([phrase in piece for piece in self.pieces], dtype=torch.bool)
        splits = []
        for k in range(1, len(phrase)):
            ids = [i for i, piece in enumerate(self.pieces) if piece.startswith(phrase[k:])]
            if ids:
                splits.append((phrase[:k], torch.tensor(ids)))
        return inside, splits

    def _completing(self, phrase: bytes, text: bytes) -> torch.Tensor:
        """bool ``[V]``: the tokens that, appended to ``text``, complete ``phrase``."""
        inside, splits = self.required_tables[phrase]
        mask = inside.clone()
        for prefix, ids in splits:
            if text.endswith(prefix):
                mask[ids] = True
        return mask

    def _forced_cost(self, phrase: bytes) -> int:
        return max(len(self._encode(phrase)), len(self._encode(b" " + phrase)))

    def _encode(self, phrase: bytes) -> list[int]:
        return self.tokenizer(phrase.decode(), add_special_tokens=False)["input_ids"]

    def _build_trie(self) -> _Trie:
        root = _Trie()
        for i, piece in enumerate(self.pieces):
            if not self.static[i]:
                continue
            node = root
            for b in piece:
                node = node.children.setdefault(b, _Trie())
            node.ids.append(i)
        return root

    # ---- the checks on decoded text

    def _vocabulary_ok(self, tail: str, final: bool) -> bool:
        """Words of ``tail`` (text that begins at a word boundary): finished ones allowed, and the
        unfinished last one (``final=False``) the beginning of an allowed word."""
        for match in WORD.finditer(tail):
            word, after = match.group(), tail[match.end():]
            if final or after not in ("", "'"):
                ok = word in self.vocabulary
            elif after == "'":  # "don'" goes on to "don't", or the apostrophe closes a quote after "don"
                ok = word + "'" in self.word_prefixes or word in self.vocabulary
            else:
                ok = word in self.word_prefixes
            if not ok:
                return False
        return True

    def finished(self, text: bytes) -> bool:
        """Could the completion stop here: complete UTF-8, every rule satisfied (all but length, which holds)?"""
        decoded = decode_prefix(text)
        if len(decoded.encode()) != len(text):
            return False
        if any(phrase not in text for phrase in self.required):
            return False
        if self.pattern is not None and bounded_fullmatch(self.pattern, decoded) is None:
            return False
        if self.vocabulary and not self._vocabulary_ok(decoded, final=True):
            return False
        if self.spec.max_words is not None and count_words(decoded) > self.spec.max_words:
            return False
        return True

    # ---- one step

    def state(self, prompt: str = "") -> RuleState:
        """A record's state before its first token, after ``prompt`` (text): its last characters,
        as many as a banned phrase could begin in, are kept as ``before``."""
        return RuleState(before=_overlapping(prompt, self.banned_reach + 1).encode())

    def allowed(self, state: RuleState) -> torch.Tensor:
        """bool ``[V]``: the tokens that may come next in ``state`` (EOS included when it may stop)."""
        tokens_left = min(self.budget - state.n_tokens, 4)  # beyond 4, the mask does not depend on it
        # the prompt's bytes a banned phrase ending in the next token could still begin in (none once
        # the completion is longer than any phrase): prompts that end alike share their masks
        before = _overlapping(state.before, max(0, self.banned_reach - len(state.text)) + 1)
        key = (before, state.text, tokens_left)
        mask = self._masks.get(key)
        if mask is None:  # every record's first step, and any prefix records share, is computed once
            mask = self._mask(state.text, tokens_left, before)
            if len(self._masks) >= self._masks_max:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = mask
        allowed = mask.clone()
        if self.eos is not None:
            allowed[self.eos] = self.finished(state.text)
        self._force_required(state, allowed)
        return allowed

    def _mask(self, text: bytes, tokens_left: int, before: bytes = b"") -> torch.Tensor:
        """The tokens (EOS aside) that may follow ``text`` with ``tokens_left`` in the budget (this one
        included); ``before``: the prompt's end, where a banned phrase may begin."""
        last = tokens_left <= 1
        allowed = self.static.clone()
        for prefix, ids in self.banned_splits:
            if (before + text).endswith(prefix):
                allowed[ids] = False
        decoded = decode_prefix(text)
        pending = text[len(decoded.encode()):]  # an incomplete UTF-8 character at the end
        if self.charset is not None:  # the static mask judged whole characters; here the parts of one
            candidates = self.fragments
            if pending:  # only the rest of that character can follow
                allowed &= self.continues
                candidates = self.continuations
            for i in candidates:
                if allowed[i]:
                    data = pending + self.pieces[i]
                    added = decode_prefix(data)
                    allowed[i] = "\ufffd" not in added and bool(self.charset.fullmatch(added)) and \
                        data[len(added.encode()):] in self.charset_prefixes
        boundary = _last_boundary(decoded)
        head, tail = decoded[:boundary], decoded[boundary:]
        if self.trie is not None:
            walked = torch.zeros_like(allowed)
            walked[self._walk(head, tail, pending, last)] = True
            allowed &= walked
        if self.spec.max_words is not None:
            self._mask_words(allowed, head, tail, pending)
        for i in self.fragments:  # a character left open must be finished within the budget
            if allowed[i] and not last:
                data = text + self.pieces[i]
                open_bytes = data[len(decode_prefix(data).encode()):]
                if open_bytes and _utf8_size(open_bytes[0]) - len(open_bytes) > (tokens_left - 1) * self.longest_continuation:
                    allowed[i] = False
        if last:  # the budget's last token: only ones that leave a finished completion (the walk saw to
            # regex and vocabulary, the word mask to max_words; left: whole characters, required phrases)
            for phrase in self.required:
                if phrase not in text:
                    allowed &= self._completing(phrase, text)
            for i in self.fragments:
                if allowed[i] and not self.finished(text + self.pieces[i]):
                    allowed[i] = False
        for i, until in self.stops.items():  # ends the completion at ``stop``: all of it must hold
            allowed[i] = not violations(self.spec, (text + until).decode("utf-8", errors="replace"), 0,
                                        before.decode("utf-8", errors="replace"))
        return allowed

    def _mask_words(self, allowed: torch.Tensor, head: str, tail: str, pending: bytes) -> None:
        """Mask the tokens that would take the completion past ``max_words``. Words before ``tail``
        are finished; a token adds its own words, less one where its first word continues the
        tail's last (``don`` + ``'t``, ``don'`` + ``t``, ``wor`` + ``ds``)."""
        limit, head_words = self.spec.max_words, count_words(head)
        exact = self.fragments
        if pending:
            exact = allowed.nonzero().flatten().tolist()
        else:
            ends_word = bool(tail) and _is_word_char(tail[-1])
            ends_apostrophe = len(tail) >= 2 and tail[-1] == "'" and _is_word_char(tail[-2])
            merge = (ends_word & (self.starts_word | self.starts_apostrophe_word)) | (ends_apostrophe & self.starts_word)
            words = head_words + count_words(tail) + self.piece_words - merge.long()
            allowed &= words <= limit
        for i in exact:
            if allowed[i] and head_words + count_words(tail + decode_prefix(pending + self.pieces[i])) > limit:
                allowed[i] = False

    def _vocabulary_char_fits(self, text: str, open_bytes: bytes) -> bool:
        """Can the character whose UTF-8 begins with ``open_bytes`` follow ``text`` (which begins at a
        word boundary) under ``vocabulary``: as a letter that continues the open word into the
        beginning of an allowed word, or as a non-word character once that word is allowed?"""
        last = None
        for last in WORD.finditer(text):
            pass
        open_word = ""
        if last is not None and last.end() >= len(text) - (text.endswith("'") and last.end() == len(text) - 1):
            open_word = text[last.start():]
        finished = open_word.rstrip("'")
        if (not finished or finished in self.vocabulary) and _range_has_non_word(open_bytes):
            return True
        return any(w.startswith(open_word) and len(w) > len(open_word) and
                   w[len(open_word)].encode().startswith(open_bytes) for w in self.vocabulary)

    def _walk(self, head: str, tail: str, pending: bytes, final: bool) -> list[int]:
        """Token ids whose bytes, appended, leave a completion that can still satisfy ``regex`` and
        ``vocabulary`` (with ``final``: that satisfies them as it stands). A depth-first walk of the
        vocabulary's trie that stops at the first prefix that cannot."""
        import time

        deadline = time.monotonic() + STEP_SECONDS

        def viable(prefix: bytes, final: bool) -> bool:
            if not pending and prefix.isascii():
                added = prefix.decode("ascii")
            else:
                added = decode_prefix(pending + prefix)
                if "\ufffd" in added:
                    return False
            if self.vocabulary and not self._vocabulary_ok(tail + added, final):
                return False
            if self.vocabulary and not prefix.isascii():
                open_bytes = (pending + prefix)[len(added.encode()):]
                if open_bytes and not self._vocabulary_char_fits(tail + added, open_bytes):
                    return False
            if self.pattern is not None:
                match = bounded_fullmatch(self.pattern, head + tail + added, partial=not final, deadline=deadline)
                if match is None or (final and match.partial):
                    return False
            return True

        found: list[int] = []
        stack = [(self.trie, b"")]
        while stack:
            node, prefix = stack.pop()
            for byte, child in node.children.items():
                extended = prefix + bytes((byte,))
                if not viable(extended, False):
                    continue
                if child.ids and (not final or viable(extended, True)):
                    found.extend(child.ids)
                if child.children:
                    stack.append((child, extended))
        return found

    def _force_required(self, state: RuleState, allowed: torch.Tensor) -> None:
        """Required phrases: once the budget left is just enough for the missing ones, queue the
        first missing phrase's tokens and allow only the next of them (if the mask allows it)."""
        if not self.required:
            return
        missing = [p for p in self.required if p not in state.text]
        if not missing:
            state.forced.clear()
            return
        if not state.forced:
            tokens_left = self.budget - state.n_tokens
            words_left = (self.spec.max_words - count_words(decode_prefix(state.text))
                          if self.spec.max_words is not None else None)
            tight = tokens_left <= sum(self._forced_cost(p) for p in missing) or (
                words_left is not None and words_left <= sum(count_words(p.decode()) for p in missing) + 1)
            if not tight:
                return
            phrase = missing[0]
            space = state.text and not state.text[-1:].isspace() and (self.charset is None or self.charset.fullmatch(" "))
            state.forced = self._encode(b" " + phrase if space else phrase)
        token = state.forced[0]
        keep = bool(allowed[token])
        allowed[:] = False
        allowed[token] = keep


def bounded_fullmatch(pattern: regex.Pattern, text: str, partial: bool = False, deadline: float | None = None):
    """``pattern.fullmatch(text, partial=partial)``, stopped after :data:`MATCH_SECONDS` (or at
    ``deadline``, a ``time.monotonic()`` value): then a one-line error naming the pattern."""
    import time

    step_bound = deadline is not None and deadline - time.monotonic() < MATCH_SECONDS
    seconds = deadline - time.monotonic() if step_bound else MATCH_SECONDS
    try:
        if seconds <= 0:
            raise TimeoutError
        return pattern.fullmatch(text, partial=partial, timeout=seconds)
    except TimeoutError:
        what = (f"took over {STEP_SECONDS:g} s to choose one token" if step_bound
                else f"took over {MATCH_SECONDS:g} s to match {len(text)} characters")
        raise DistillError(f"the rule file's regex {pattern.pattern!r} {what}; nested repetition such as (a|aa)+ "
                           "takes exponential time: rewrite it without repeated groups that can match the same "
                           "text in several ways") from None


def _matches_ascii_only(pattern: str) -> bool:
    """Can ``pattern`` match ASCII text only? Read from the parse of Python's own ``re`` (the
    pattern's literals and class ranges, no ``.``, negated class, ``\\w``-style category or
    ignore-case); False whenever unsure, including a pattern only the ``regex`` module parses."""
    import re
    from re import _constants as c, _parser

    try:
        parsed = _parser.parse(pattern)
    except (re.error, RecursionError):
        return False
    if parsed.state.flags & (re.IGNORECASE | re.DOTALL):
        return False

    def ascii_only(items) -> bool:
        for op, arg in items:
            if op in (c.LITERAL,) and arg >= 0x80:
                return False
            if op in (c.NOT_LITERAL, c.ANY, c.CATEGORY, c.NEGATE, c.GROUPREF_EXISTS):
                return False
            if op is c.RANGE and arg[1] >= 0x80:
                return False
            if op is c.IN and not ascii_only(arg):
                return False
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)) and not ascii_only(arg[2]):
                return False
            if op is c.SUBPATTERN and not ascii_only(arg[3]):
                return False
            if op is c.BRANCH and not all(ascii_only(branch) for branch in arg[1]):
                return False
            if op is getattr(c, "ATOMIC_GROUP", None) and not ascii_only(arg):
                return False
        return True  # AT (anchors), ASSERT / ASSERT_NOT (consume nothing), GROUPREF (repeats a group)

    return ascii_only(parsed)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _utf8_size(lead: int) -> int:
    return 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


@functools.lru_cache(maxsize=None)
def _range_has_non_word(open_bytes: bytes) -> bool:
    """Is some character whose UTF-8 begins with ``open_bytes`` (an incomplete character) outside
    words (neither ``\\w`` nor an apostrophe)?"""
    size = _utf8_size(open_bytes[0])

    def code_point(raw: bytes) -> int:  # the bits of a (possibly overlong) sequence
        value = raw[0] & (0x7F >> size)
        for b in raw[1:]:
            value = (value << 6) | (b & 0x3F)
        return value

    missing = size - len(open_bytes)
    low = max(code_point(open_bytes + b"\x80" * missing), (0x80, 0x800, 0x10000)[size - 2])
    high = min(code_point(open_bytes + b"\xbf" * missing), 0x10FFFF)
    chars = [chr(c) for c in range(low, high + 1) if not 0xD800 <= c < 0xE000]
    return NOT_IN_WORD.search("".join(chars)) is not None


def _is_word_char(char: str) -> bool:
    return WORD.match(char) is not None


def _last_boundary(text: str) -> int:
    """Index just after the last character that no word contains: words before it are finished."""
    last = None
    for last in NOT_IN_WORD.finditer(text):
        pass
    return last.end() if last is not None else 0

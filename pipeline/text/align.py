"""Byte alignment of a teacher's and a student's tokenizations of the same text (cross-tokenizer
distillation; issue #23, ``docs/DESIGN.md`` "Across tokenizers").

Nothing here depends on the student at stage one: a teacher store's rows are ``input_ids`` of the
teacher's tokenizer, and what each id stands for in bytes is derivable from the tokenizer itself
(:func:`token_bytes`): byte-level BPE maps each character of a token back to its byte (GPT-2's
byte↔unicode table); SentencePiece-style vocabularies spell a space as ``▁`` and a byte-fallback
token ``<0xNN>`` as the byte ``NN``. So stage two rebuilds each teacher row's bytes, tokenizes them
with the student's tokenizer (:class:`RowAligner`, run by the loader on every batch: deterministic,
so resume and ranks see exactly what an uninterrupted single process sees) and aligns the two.

Units. A row is laid out on one axis of *units*: every byte of text is one unit, and a special
token (EOS, BOS) that both tokenizers have is one unit of its own, on both sides. A special the
student lacks (a teacher's BOS) is a token of zero width: context, never a target.

Chunks. Each token covers a span ``[start, end)`` of units; spans are contiguous on each side. A
*common boundary* is a unit position where a token ends on both sides. A chunk is the span between
consecutive common boundaries; no token crosses one, so each chunk holds whole tokens of both
sides. Position ``t`` of a row predicts token ``t + 1``; a chunk's *targets* are its tokens of
non-zero width, predicted by the positions just before them. A chunk is dropped (and counted) when

- it holds a row's first token on either side (nothing in the row predicts that token),
- it lies past the last common boundary (one side's row ends before the other's),
- it is the row's last chunk and the student's tokens were cut at the row's end: the row's bytes
  end wherever the teacher's row ended, and the student's tokenization of the full stream could
  have a token crossing that point (the teacher's could not: its rows are cut from its own stream).

A chunk with one target on each side is *1:1*: the teacher's and the student's next-token
distributions at the positions before it are conditioned on the same bytes and predict the same
bytes, so they can be compared id by id through the vocabulary map (:func:`vocab_map`), the ids of
both tokenizers that spell the same bytes. At the *start* of any kept chunk, 1:1 or not, both
sides have read the same bytes and predict a token that begins at the same byte: with the
first-token map (each teacher id to the student's own first token of its bytes, rule ``first``)
their distributions compare there too. Every kept chunk can be compared by its likelihood (the
ALM term).

With identical tokenizers (equal hashes) the student's tokens are the teacher's own: every target
but the first is a 1:1 chunk, the map is the identity, and nothing is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.errors import DistillError

VOCAB_MAP_VERSION = 1  # bump when the rule that builds a map changes: cached maps are keyed by it
PROBE_TEXT = "Hello, World!  Tab\there.\n\nnaïve café 世界 🙂 x2=3.5 ÀÉ ßﬁ\r\n  end"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character byte-level BPE uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@dataclass(frozen=True)
class TokenBytes:
    """What each id of a tokenizer spells.

    pieces: per id, its bytes, or None for a special token; specials: per special id, its role
    (``eos``, ``bos``, …) or its content; fallback: ids that are byte-fallback tokens (``<0xNN>``);
    scheme: ``byte-level`` or ``sentencepiece``; tokenizer_hash: whose ids these are."""

    pieces: tuple[bytes | None, ...]
    specials: dict[int, str]
    fallback: frozenset[int]
    scheme: str
    tokenizer_hash: str


def _components(definition: dict, key: str) -> list[dict]:
    """A tokenizer.json component and, for a ``Sequence``, its members (flat)."""
    node = definition.get(key)
    if not node:
        return []
    if node.get("type") != "Sequence":
        return [node]
    return list(node.get("normalizers") or node.get("pretokenizers") or node.get("decoders")
                or node.get("processors") or [])


def byte_problem(tokenizer) -> str | None:
    """Why ``tokenizer``'s tokens do not spell the bytes of the text they encode (None when they do).

    Checked from its definition (a normaliser that changes text, a prefix space it adds, a model
    other than BPE/Unigram, byte tokens ``<0xNN>`` registered as specials) and on a probe text
    (CJK, emoji, accents, ligatures, mixed whitespace)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "it is a slow (Python) tokenizer; pass a directory with tokenizer.json"
    definition = json.loads(backend.to_str())
    for node in _components(definition, "normalizer"):
        if node.get("type") == "Replace" and node.get("content") == "▁":
            continue  # SentencePiece spelling of spaces; decoded back below
        kind = node.get("type")
        return (f"its normaliser ({kind}) rewrites the text before it is split, so its tokens need not spell "
                "the text's bytes")
    for node in _components(definition, "pre_tokenizer") + _components(definition, "normalizer"):
        if node.get("add_prefix_space") or node.get("prepend_scheme") in ("always", "first") \
                or node.get("type") == "Prepend":
            return "it adds a space before the text (add_prefix_space / prepend), a byte the text does not have"
    if definition.get("model", {}).get("type") not in ("BPE", "Unigram"):
        return f"its model is {definition.get('model', {}).get('type')}, not BPE or Unigram"
    byte_specials = [t["content"] for t in definition.get("added_tokens", []) if t.get("special")
                     and len(t["content"]) == 6 and t["content"].startswith("<0x") and t["content"].endswith(">")]
    if byte_specials:
        return (f"its {len(byte_specials)} byte token(s) ({byte_specials[0]}, …) are special added tokens, "
                "so the bytes they stand for would be read as specials and lost")
    bytes_of = token_bytes(tokenizer)
    ids = backend.encode(PROBE_TEXT, add_special_tokens=False).ids
    spelt = b"".join(bytes_of.pieces[i] or b"" for i in ids)
    if spelt != PROBE_TEXT.encode("utf-8"):
        return "its tokens of a probe text spell other bytes than the text (normalisation or unknown tokens)"
    return None


def token_bytes(tokenizer) -> TokenBytes:
    """The bytes every id of ``tokenizer`` (a Hugging Face fast tokenizer) spells."""
    from pipeline.text.tokenizer import tokenizer_hash

    backend = tokenizer.backend_tokenizer
    definition = json.loads(backend.to_str())
    kinds = {n.get("type") for key in ("pre_tokenizer", "decoder") for n in _components(definition, key)}
    scheme = "byte-level" if "ByteLevel" in kinds else "sentencepiece"
    added = {t["id"]: t for t in definition.get("added_tokens", [])}
    roles = {}
    for role in ("eos", "bos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            roles.setdefault(token_id, role)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(len(tokenizer), max(vocab.values()) + 1)
    table = _unicode_to_byte()
    pieces: list[bytes | None] = [b""] * size
    specials: dict[int, str] = {}
    fallback = set()
    for token, token_id in vocab.items():
        entry = added.get(token_id)
        if token_id in roles or (entry is not None and entry.get("special")):
            pieces[token_id] = None
            specials[token_id] = roles.get(token_id, token)
        elif entry is not None:  # an added non-special token is plain text
            pieces[token_id] = token.encode("utf-8")
        elif scheme == "byte-level":
            pieces[token_id] = bytes(table[c] for c in token) if all(c in table for c in token) else token.encode()
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            pieces[token_id] = bytes([int(token[3:5], 16)])
            fallback.add(token_id)
        else:
            pieces[token_id] = token.replace("▁", " ").encode("utf-8")
    return TokenBytes(tuple(pieces), specials, frozenset(fallback), scheme, tokenizer_hash(tokenizer))


MAP_RULES = ("bucket", "prefix", "first")
POSITIONS = ("starts", "1to1")  # where the next-token term compares the two (RowAligner)


def first_tokens(student_tokenizer, pieces: list[bytes]) -> list[int]:
    """The student's first token of each byte string, as its tokenizer cuts that string alone.

    The context is the one a chunk boundary gives: both sides start a token there, and what follows
    is these bytes. Each string is encoded as a text of its own (no specials; the student's
    normaliser, pre-tokenizer and model, as :class:`RowAligner` encodes a row), so it starts a
    pre-token, as it does in a row wherever the boundary is one of the student's pre-token
    boundaries, and it ends one, as if the next byte began another word. Bytes that are not whole
    UTF-8 characters (a byte-level teacher's piece of 世) are no text: a byte-level student's BPE
    runs on them alone (they lie inside one pre-token in any row), any other student takes its
    longest token that begins them. −1 where the student spells nothing (empty bytes)."""
    backend = student_tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    specials = set(student_tokenizer.all_special_ids)
    texts, where = [], []
    out = [-1] * len(pieces)
    rest = []
    for k, piece in enumerate(pieces):
        try:
            texts.append(piece.decode("utf-8"))
            where.append(k)
        except UnicodeDecodeError:
            rest.append(k)
    for k, encoding in zip(where, backend.encode_batch(texts, add_special_tokens=False) if texts else []):
        if encoding.ids and encoding.ids[0] not in specials:  # a text that spells a special's name: below
            out[k] = encoding.ids[0]
        else:
            rest.append(k)
    definition = json.loads(backend.to_str())
    byte_level = "ByteLevel" in {n.get("type") for n in _components(definition, "pre_tokenizer")}
    char = {b: c for c, b in _unicode_to_byte().items()}
    student = None
    for k in rest:
        if not pieces[k]:
            continue
        if byte_level:
            tokens = backend.model.tokenize("".join(char[b] for b in pieces[k]))
            if tokens:  # a byte no valid UTF-8 holds (0xC0, 0xF5…) may be missing from the vocabulary
                out[k] = vocab[tokens[0].value]
            continue
        if student is None:  # the ids it emits first (not a byte fallback), then the lowest
            student, spelt = token_bytes(student_tokenizer), {}
            for i in sorted(range(len(student.pieces)), key=lambda i: (i in student.fallback, i)):
                if student.pieces[i]:
                    spelt.setdefault(student.pieces[i], i)
        for size in range(len(pieces[k]), 0, -1):
            if pieces[k][:size] in spelt:
                out[k] = spelt[pieces[k][:size]]
                break
    return out


def build_vocab_map(teacher: TokenBytes, student: TokenBytes, rule: str = "bucket",
                    student_tokenizer=None) -> np.ndarray:
    """``[V_teacher]`` int32: the student id that spells the same bytes as each teacher id, −1 for none.

    Specials pair by role (EOS with EOS, BOS with BOS), or by content. Injective: where several
    ids of one side spell the same bytes (a byte-fallback ``<0x41>`` beside ``A``), the one the
    tokenizer emits (not a fallback; then the lowest id) is paired and the others stay unmapped,
    so their mass goes to the bucket and never counts twice.

    The other rules also map the teacher ids no student id spells, to a student token that begins
    their bytes; the map is then many-to-one and the loss adds up the teacher's slots of one student
    id (:func:`pipeline.train.cross_losses.merge_duplicates`):

    - ``first``: the student's own first token of those bytes (:func:`first_tokens`; needs
      ``student_tokenizer``): the token the student emits first where the teacher's token is next.
      Identical tokenizers (equal hashes) map to the identity.
    - ``prefix``: the student's longest token that begins them (a greedy cut, often longer than
      what its BPE emits: ``Ġinstruction`` → ``Ġinstruct`` where the student writes ``Ġinstru``)."""
    def canonical(side: TokenBytes) -> dict[bytes | str, int]:
        best: dict[bytes | str, int] = {}
        order = sorted(range(len(side.pieces)), key=lambda i: (i in side.fallback, i))
        for i in order:
            key = side.pieces[i] if side.pieces[i] is not None else side.specials[i]
            if key != b"":
                best.setdefault(key, i)
        return best

    if rule not in MAP_RULES:
        raise ValueError(f"rule must be one of {MAP_RULES}")
    if rule == "first" and student_tokenizer is None:
        raise ValueError("rule 'first' needs the student tokenizer (its first token of each teacher token's bytes)")
    if rule == "first" and teacher.tokenizer_hash == student.tokenizer_hash:
        return np.arange(len(teacher.pieces), dtype=np.int32)
    student_of = canonical(student)
    mapping = np.full(len(teacher.pieces), -1, dtype=np.int32)
    for key, teacher_id in canonical(teacher).items():
        if key in student_of:
            mapping[teacher_id] = student_of[key]
    todo = [t for t, piece in enumerate(teacher.pieces) if mapping[t] < 0 and piece]
    if rule == "first":
        mapping[todo] = first_tokens(student_tokenizer, [teacher.pieces[t] for t in todo])
    elif rule == "prefix":
        longest = max((len(k) for k in student_of if isinstance(k, bytes)), default=0)
        for teacher_id in todo:
            piece = teacher.pieces[teacher_id]
            for size in range(min(len(piece), longest), 0, -1):
                if piece[:size] in student_of:
                    mapping[teacher_id] = student_of[piece[:size]]
                    break
    return mapping


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def vocab_map(teacher: TokenBytes, student: TokenBytes, rule: str = "bucket",
              student_tokenizer=None) -> tuple[np.ndarray, str]:
    """The teacher→student id map and its sha256 (over the int32 array's bytes), built once per
    pair of tokenizer hashes and rule (:func:`build_vocab_map`; ``first`` needs
    ``student_tokenizer``) and cached in ``$DISTILL_CACHE`` (default ``~/.cache/distill``) under
    ``vocab-map-v{version}-{teacher hash}-{student hash}.npy`` (``-{rule}`` before ``.npy`` for a
    rule other than ``bucket``); a cached file is rebuilt when it does not read back as a map of the
    teacher's size."""
    suffix = "" if rule == "bucket" else f"-{rule}"
    path = cache_dir() / f"vocab-map-v{VOCAB_MAP_VERSION}-{teacher.tokenizer_hash}-{student.tokenizer_hash}{suffix}.npy"
    mapping = None
    if path.is_file():
        try:
            mapping = np.load(path)
        except (OSError, ValueError):
            mapping = None
        if mapping is not None and (mapping.shape != (len(teacher.pieces),) or mapping.dtype != np.int32):
            mapping = None
    if mapping is None:
        mapping = build_vocab_map(teacher, student, rule, student_tokenizer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, mapping)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache costs a rebuild next time, nothing else
    return mapping, hashlib.sha256(mapping.tobytes()).hexdigest()


def student_groups(mapping: np.ndarray, student: TokenBytes, teacher_tokenizer) -> np.ndarray:
    """``[V_student]`` int32: for each student id outside the map's image, the image id whose event
    holds it (its *head*); −1 for the image's own ids and for those with no head.

    A student token that no teacher id maps to is mostly a longer token than the teacher has
    (" destroys" where the teacher writes " destroy" + "s"): the teacher's next-token event for
    those bytes is its own first token of them (" destroy", the teacher's tokenizer run on the
    bytes alone, as :func:`first_tokens` runs the student's), and that event's student id is
    ``mapping`` of it. The student's probability of " destroys" then belongs with its " destroy"
    against the teacher's p(" destroy"), which holds " destroy" + "s" too (``--cross-longer group``,
    :func:`pipeline.train.cross_losses.fold_groups`); in the bucket it would be pushed towards the
    teacher's tail. Specials and ids spelling nothing have no head."""
    image = np.zeros(len(student.pieces), dtype=bool)
    image[mapping[(mapping >= 0) & (mapping < len(student.pieces))]] = True
    heads = np.full(len(student.pieces), -1, dtype=np.int32)
    todo = [s for s, piece in enumerate(student.pieces) if not image[s] and piece]
    if todo:
        firsts = np.asarray(first_tokens(teacher_tokenizer, [student.pieces[s] for s in todo]), dtype=np.int64)
        ok = (firsts >= 0) & (firsts < len(mapping))
        head = np.where(ok, mapping[np.clip(firsts, 0, len(mapping) - 1)], -1)
        heads[np.asarray(todo)] = np.where(np.asarray(todo) == head, -1, head)
    return heads


# ---------------------------------------------------------------------- one row


@dataclass(frozen=True)
class Spans:
    """One side's tokens of a row: ids ``[n]`` and unit spans ``starts``/``ends`` ``[n]`` (contiguous)."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


@dataclass(frozen=True)
class Alignment:
    """Where a row's chunks are, for both sides (row-local indices).

    exact: ``[(student position, teacher position)]`` of 1:1 chunks (the positions predicting the
    chunk's token); starts: the same for every kept chunk, 1:1 or not (the positions predicting its
    first token on each side: both predict a token that begins at the chunk's first byte, after the
    same bytes); student_chunk ``[M]``/teacher_chunk ``[L]``: per *position* t, the kept chunk
    its target (token t+1) lies in, −1 if none; chunks: number of kept chunks; dropped: chunks
    dropped at a row's ends."""

    exact: np.ndarray
    starts: np.ndarray
    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    chunks: int
    dropped: int


def align(teacher: Spans, student: Spans, cut_at_end: bool) -> Alignment:
    """Chunks of two tokenizations of one row (see the module docstring for the rules)."""
    def ends_of(side: Spans) -> np.ndarray:
        width = side.ends > side.starts
        return side.ends[width]

    common = np.intersect1d(ends_of(teacher), ends_of(student))  # sorted
    n_common = len(common)

    def chunk_of(side: Spans) -> np.ndarray:
        """Per token, the index of the chunk it lies in (n_common past the last boundary), −1 if zero-width."""
        where = np.searchsorted(common, side.ends, side="left")
        return np.where(side.ends > side.starts, where, -1)

    t_chunk, s_chunk = chunk_of(teacher), chunk_of(student)
    valid = np.zeros(n_common, dtype=bool)
    t_count = np.bincount(t_chunk[t_chunk >= 0], minlength=n_common + 1)[:n_common]
    s_count = np.bincount(s_chunk[s_chunk >= 0], minlength=n_common + 1)[:n_common]
    valid[:] = (t_count > 0) & (s_count > 0)
    dropped = 0
    for first in (t_chunk[:1], s_chunk[:1]):  # a row's first token has nothing predicting it
        if len(first) and 0 <= first[0] < n_common and valid[first[0]]:
            valid[first[0]] = False
            dropped += 1
    if cut_at_end and n_common and valid[-1]:
        valid[-1] = False
        dropped += 1
    dropped += int((np.concatenate([t_chunk, s_chunk]) == n_common).any())  # past the last common boundary
    renumber = np.cumsum(valid) - 1

    def position_chunks(chunk: np.ndarray) -> np.ndarray:
        """Per position t (predicting token t+1): its target's kept chunk, −1 if none."""
        out = np.full(len(chunk), -1, dtype=np.int64)
        target = chunk[1:]
        keep = (target >= 0) & (target < n_common)
        keep[keep] = valid[target[keep]]
        out[:-1][keep] = renumber[target[keep]]
        return out

    t_pos, s_pos = position_chunks(t_chunk), position_chunks(s_chunk)
    one_to_one = np.nonzero(valid & (t_count == 1) & (s_count == 1))[0]
    # the first target token of each chunk, on each side: its position is one before it
    t_first = np.full(n_common, -1, dtype=np.int64)
    s_first = np.full(n_common, -1, dtype=np.int64)
    t_idx = np.nonzero((t_chunk >= 0) & (t_chunk < n_common))[0]
    s_idx = np.nonzero((s_chunk >= 0) & (s_chunk < n_common))[0]
    t_first[t_chunk[t_idx][::-1]] = t_idx[::-1]
    s_first[s_chunk[s_idx][::-1]] = s_idx[::-1]

    def pairs(chunks: np.ndarray) -> np.ndarray:
        return np.stack([s_first[chunks] - 1, t_first[chunks] - 1], axis=1).astype(np.int64) if len(chunks) else \
            np.zeros((0, 2), dtype=np.int64)

    return Alignment(pairs(one_to_one), pairs(np.nonzero(valid)[0]), s_pos, t_pos, int(valid.sum()), dropped)


def _valid_utf8_span(data: bytes) -> tuple[int, int]:
    """(start, stop) of the longest middle of ``data`` that is valid UTF-8 once a row's cut
    characters are trimmed: leading continuation bytes, a trailing incomplete character."""
    start = 0
    while start < len(data) and start < 3 and 0x80 <= data[start] < 0xC0:
        start += 1
    stop = len(data)
    for back in range(1, 4):  # a lead byte within the last 3 whose character is not complete
        if stop - back < start:
            break
        byte = data[stop - back]
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if back < need:
                stop -= back
            break
        if byte < 0x80:
            break
    return start, stop


class RowAligner:
    """Turns teacher rows into student rows and their alignment (the loader's per-batch transform).

    teacher, student: :class:`TokenBytes`; encode: the student tokenizer's batch encoder,
    ``list[str] → list[list[int]]`` (no specials added); max_length: the longest student row (its
    model's positions); a longer one is cut there (and its last chunk dropped); positions: where the
    next-token term compares the two (``cross_exact``): ``1to1`` chunks only, or every kept chunk's
    ``starts``."""

    def __init__(self, teacher: TokenBytes, student: TokenBytes, encode, max_length: int, eos_id: int,
                 positions: str = "1to1"):
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}")
        self.teacher, self.student, self.encode = teacher, student, encode
        self.max_length, self.eos_id, self.starts = max_length, eos_id, positions == "starts"
        self.same = teacher.tokenizer_hash == student.tokenizer_hash
        student_special = {role: i for i, role in student.specials.items()}
        # a teacher special becomes the student's special of the same role (or content), else nothing
        self.special_to_student = {i: student_special.get(role, -1) for i, role in teacher.specials.items()}
        self.student_lengths = np.array([len(p) if p is not None else 1 for p in student.pieces], dtype=np.int64)

    def row(self, teacher_ids: np.ndarray) -> tuple[Spans, Spans, bool]:
        """(teacher spans, student spans, whether the student's tokens were cut at the row's end)."""
        n = len(teacher_ids)
        if self.same:
            lengths = np.array([len(self.teacher.pieces[i]) if self.teacher.pieces[i] is not None else 1
                                for i in teacher_ids], dtype=np.int64)
            ends = np.cumsum(lengths)
            spans = Spans(np.asarray(teacher_ids, dtype=np.int64), ends - lengths, ends)
            return spans, spans, False
        # the teacher's row on the unit axis: text segments between specials
        t_starts, t_ends = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        segments: list[tuple[int, bytes]] = []  # (first unit, bytes)
        specials: list[tuple[int, int]] = []  # (unit, student id)
        at, text, text_start = 0, bytearray(), 0
        for j, token in enumerate(teacher_ids.tolist()):
            piece = self.teacher.pieces[token] if token < len(self.teacher.pieces) else b""
            t_starts[j] = at
            if piece is None:
                if text:
                    segments.append((text_start, bytes(text)))
                student_id = self.special_to_student.get(token, -1)
                if student_id >= 0:
                    specials.append((at, student_id))
                    at += 1
                text, text_start = bytearray(), at
            else:
                text += piece
                at += len(piece)
            t_ends[j] = at
        if text:
            segments.append((text_start, bytes(text)))
        # the student's tokens of each segment, then the specials, in unit order
        strings, offsets = [], []
        for k, (start, data) in enumerate(segments):
            lo, hi = _valid_utf8_span(data) if k in (0, len(segments) - 1) else (0, len(data))
            strings.append(data[lo:hi].decode("utf-8", errors="replace"))
            offsets.append((start + lo, data[lo:hi]))
        encoded = self.encode(strings) if strings else []
        pieces: list[tuple[int, int, int]] = [(unit, unit + 1, sid) for unit, sid in specials]
        for (start, data), ids in zip(offsets, encoded):
            lengths = self.student_lengths[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, dtype=np.int64)
            if b"".join(self.student.pieces[i] or b"" for i in ids) != data:
                raise _Unaligned()
            ends = start + np.cumsum(lengths)
            pieces.extend(zip((ends - lengths).tolist(), ends.tolist(), ids))
        pieces.sort()
        cut = bool(segments) and segments[-1][0] + len(segments[-1][1]) == at  # text runs up to the row's end
        if len(pieces) > self.max_length:
            pieces, cut = pieces[:self.max_length], True
        s = np.array(pieces, dtype=np.int64).reshape(-1, 3)
        return Spans(np.asarray(teacher_ids, dtype=np.int64), t_starts, t_ends), Spans(s[:, 2], s[:, 0], s[:, 1]), cut

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A loader batch of teacher rows → the student's rows and the alignment arrays:

        ``input_ids [B, M]`` (student ids, EOS-padded to the longest row), ``loss_mask [B, M]``
        (1 where position t's target is a real student token), ``teacher_input_ids [B, L]``,
        ``cross_exact [B, M]`` (the teacher position compared with student position t by the
        next-token term, at a 1:1 chunk or a chunk's start by ``positions``; −1 if none),
        ``cross_inside [B, M]`` and ``cross_inside_offset [B, M]`` (at a student position whose
        target begins strictly inside a teacher token of a kept chunk: the teacher position
        predicting that token, and how many of its bytes lie before the target; −1 and 0 elsewhere),
        ``cross_student_chunk [B, M]`` and ``cross_teacher_chunk [B, L]`` (per position, the
        row-local id of its target's kept chunk, −1 if none) and ``cross_counts [B, 6]`` (student
        targets, 1:1 chunks, student targets in kept chunks, chunks dropped at row ends, 1 for a
        row whose student tokens do not spell its bytes: it trains nothing, and kept chunks)."""
        teacher_rows = batch["input_ids"]
        rows = []
        for r in range(teacher_rows.shape[0]):
            try:
                t, s, cut = self.row(teacher_rows[r])
                rows.append((t, s, align(t, s, cut)))
            except _Unaligned:
                rows.append((None, None, None))
        width = max(2, max(len(s.ids) if s is not None else 2 for _, s, _ in rows))
        b, length = teacher_rows.shape
        out = {k: v for k, v in batch.items() if k != "input_ids"}
        out["teacher_input_ids"] = teacher_rows
        ids = np.full((b, width), self.eos_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.uint8)
        exact = np.full((b, width), -1, dtype=np.int64)
        s_chunk = np.full((b, width), -1, dtype=np.int64)
        t_chunk = np.full((b, length), -1, dtype=np.int64)
        counts = np.zeros((b, 6), dtype=np.int64)
        inside = np.full((b, width), -1, dtype=np.int64)
        offset = np.zeros((b, width), dtype=np.int64)
        for r, (t, s, a) in enumerate(rows):
            if s is None:  # unaligned: the row trains nothing, and is counted
                counts[r, 4] = 1
                continue
            m = len(s.ids)
            ids[r, :m] = s.ids
            mask[r, :m - 1] = 1
            compared = a.starts if self.starts else a.exact
            if len(compared):
                exact[r, compared[:, 0]] = compared[:, 1]
            s_chunk[r, :m] = a.student_chunk
            t_chunk[r] = a.teacher_chunk
            at, into = _inside(t, s, a, exact[r, :m])
            inside[r, at], offset[r, at] = into[:, 0], into[:, 1]
            counts[r] = (m - 1, len(a.exact), int((a.student_chunk >= 0).sum()), a.dropped, 0, len(a.starts))
        out.update(input_ids=ids, loss_mask=mask, cross_exact=exact, cross_inside=inside, cross_inside_offset=offset,
                   cross_student_chunk=s_chunk,
                   cross_teacher_chunk=t_chunk, cross_counts=counts)
        return out


def _inside(teacher: Spans, student: Spans, alignment: Alignment, compared: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """The student positions whose target begins strictly inside a teacher token of a kept chunk and
    that the next-token term does not compare (``compared [M]``: −1 there): (positions ``[n]``,
    ``[n, 2]`` the teacher position predicting that token and the bytes of it before the target)."""
    m = len(student.ids)
    at = np.nonzero((alignment.student_chunk[:m - 1] >= 0) & (compared[:m - 1] < 0))[0]
    begins = student.starts[at + 1]  # the target's first unit
    token = np.searchsorted(teacher.ends, begins, side="right")  # the teacher token whose span holds it
    ok = (token >= 1) & (token < len(teacher.ids))
    ok[ok] &= teacher.starts[token[ok]] < begins[ok]
    # the teacher's token must lie in the target's chunk (its position in the same kept chunk)
    ok[ok] &= alignment.teacher_chunk[token[ok] - 1] == alignment.student_chunk[at[ok]]
    at, token, begins = at[ok], token[ok], begins[ok]
    return at, np.stack([token - 1, begins - teacher.starts[token]], axis=1).reshape(-1, 2)


class _Unaligned(Exception):
    """A row whose student tokens do not spell its bytes (a tokenizer :func:`byte_problem` missed)."""


def check_byte_level(tokenizer, role: str, path: str) -> None:
    """One line, and stop, when ``tokenizer`` cannot be aligned by bytes."""
    problem = byte_problem(tokenizer)
    if problem is not None:
        raise DistillError(f"{role} tokenizer {path} cannot be aligned by bytes: {problem}; cross-tokenizer "
                           "distillation needs a byte-level BPE or a SentencePiece-style tokenizer that "
                           "spells the text unchanged")

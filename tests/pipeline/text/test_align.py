"""Byte alignment across tokenizers: token bytes, spans, chunks against a brute-force reference,
the vocabulary map, and the refusal of tokenizers that do not spell their text."""

import random

import numpy as np
import torch
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.errors import DistillError
from pipeline.text.align import (RowAligner, Spans, TokenBytes, align, build_vocab_map, byte_problem,
                                 check_byte_level, student_groups, token_bytes, vocab_map)
from tests.conftest import ROOT, TOKENIZER

SECOND = ROOT / "data" / "tokenizer-4096"
TEXTS = ["Hello, 世界! 東京は晴れ 🙂🙂 and emoji 👩‍👩‍👧 done.",
         "Merged   whitespace\n\n\n   and\ttabs  \r\n  end.",
         "naïve café — ÀÉÎ ßﬁ “quotes” 1,234.5 ½"]


def sentencepiece_tokenizer(prepend: str = "never", normalizer=None) -> PreTrainedTokenizerFast:
    """A tiny SentencePiece-style BPE with byte fallback (▁ for space, <0xNN> for bytes) and a BOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁"] + list("abcdefghijklmnopqrstuvwxyzHW,.!") + ["▁▁", "he", "ll", "llo", "hello", "▁hello",
                                                                   "▁w", "or", "ld", "▁t", "A"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "▁"), ("h", "e"), ("l", "l"), ("ll", "o"), ("he", "llo"), ("▁", "hello"), ("▁", "w"),
              ("o", "r"), ("l", "d"), ("▁", "t")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizer or normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers():
    return {"bpe8192": AutoTokenizer.from_pretrained(str(TOKENIZER)),
            "bpe4096": AutoTokenizer.from_pretrained(str(SECOND)),
            "sentencepiece": sentencepiece_tokenizer()}


def encoder(tokenizer):
    backend = tokenizer.backend_tokenizer
    return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def stream(tokenizer, docs, bos: bool = False) -> list[int]:
    """Documents as distill prepare packs them: each one's tokens then EOS (a BOS first, optionally)."""
    ids = []
    for doc in docs:
        ids += ([tokenizer.bos_token_id] if bos else []) + encoder(tokenizer)([doc])[0] + [tokenizer.eos_token_id]
    return ids


def units(side: TokenBytes, ids, starts, ends) -> dict[int, object]:
    """unit position → what a token of ``side`` puts there (a byte, or a special's role)."""
    out = {}
    for token, start, end in zip(ids, starts, ends):
        piece = side.pieces[token]
        values = list(piece) if piece is not None else [side.specials[token]] * (end - start)
        assert len(values) == end - start  # a token's span is as wide as its bytes
        out.update(zip(range(start, end), values))
    return out


def check_row(aligner: RowAligner, row: np.ndarray) -> tuple[Spans, Spans, bool]:
    """Spans are contiguous on both sides, and the student's tokens spell the teacher's units."""
    t, s, cut = aligner.row(row)
    assert t.starts[0] == 0 and np.array_equal(t.starts[1:], t.ends[:-1])
    assert np.array_equal(s.starts[1:], s.ends[:-1]) and s.ends[-1] <= t.ends[-1]
    teacher_units = units(aligner.teacher, t.ids, t.starts, t.ends)
    student_units = units(aligner.student, s.ids, s.starts, s.ends)
    # a special the student lacks is zero-width on the teacher's side; every role both have is one unit
    roles = {"eos": "eos", "bos": "bos"}
    for unit, value in student_units.items():
        assert teacher_units[unit] == roles.get(value, value), unit
    skipped = [teacher_units[u] for u in range(s.starts[0])] + \
        [teacher_units[u] for u in range(s.ends[-1], t.ends[-1])]
    assert all(isinstance(v, int) and 0x80 <= v for v in skipped)  # only a cut character is left out
    assert len(skipped) <= 6
    return t, s, cut


@pytest.mark.parametrize("teacher_name,student_name", [("bpe8192", "bpe4096"), ("bpe4096", "bpe8192"),
                                                       ("bpe8192", "sentencepiece"), ("sentencepiece", "bpe8192")])
def test_spans_are_contiguous_and_spell_the_bytes_of_packed_rows(tokenizers, teacher_name, student_name):
    teacher, student = tokenizers[teacher_name], tokenizers[student_name]
    bos = teacher_name == "sentencepiece"  # a BOS on the teacher's side only (the student has none)
    ids = stream(teacher, TEXTS * 2, bos=bos)
    aligner = RowAligner(token_bytes(teacher), token_bytes(student), encoder(student), 10_000,
                         student.eos_token_id)
    seq_len = 17
    rows = [ids[r * (seq_len - 1): r * (seq_len - 1) + seq_len] for r in range((len(ids) - 1) // (seq_len - 1))]
    starts_mid_character = 0
    for row in rows:
        t, s, cut = check_row(aligner, np.array(row))
        starts_mid_character += int(s.starts[0] > 0)
        assert cut == (aligner.teacher.pieces[row[-1]] is not None)  # rows ending in text were cut
    assert starts_mid_character > 0 or teacher_name != "bpe8192"  # byte-level rows do start inside 世界
    if bos:
        t, s, _ = aligner.row(np.array(ids[:20]))
        assert t.ends[0] == t.starts[0] == 0 and s.starts[0] == 0  # the BOS is context of width zero


def test_sentencepiece_spaces_and_byte_fallback_decode_to_their_bytes(tokenizers):
    side = token_bytes(tokenizers["sentencepiece"])
    vocab = tokenizers["sentencepiece"].get_vocab()
    assert side.scheme == "sentencepiece"
    assert side.pieces[vocab["▁▁"]] == b"  " and side.pieces[vocab["<0xE4>"]] == b"\xe4"
    assert vocab["<0x41>"] in side.fallback and side.pieces[vocab["<0x41>"]] == side.pieces[vocab["A"]] == b"A"
    ids = encoder(tokenizers["sentencepiece"])(["hello  世 🙂"])[0]
    assert b"".join(side.pieces[i] for i in ids) == "hello  世 🙂".encode()
    assert {side.specials[i] for i in side.specials} == {"unk", "bos", "eos"}


def reference_alignment(t: Spans, s: Spans, cut: bool):
    """The rules of pipeline/text/align.py written as plain loops over sets."""
    def wide(side):
        return [(j, a, b) for j, (a, b) in enumerate(zip(side.starts.tolist(), side.ends.tolist())) if b > a]

    common = sorted({b for _, _, b in wide(t)} & {b for _, _, b in wide(s)})
    kept, lo = [], 0
    for k, hi in enumerate(common):
        tt = [j for j, a, b in wide(t) if lo <= a and b <= hi]
        ss = [j for j, a, b in wide(s) if lo <= a and b <= hi]
        lo = hi
        if not tt or not ss:
            continue
        if 0 in tt or 0 in ss or (cut and k == len(common) - 1):
            continue
        kept.append((tt, ss))
    exact = [(ss[0] - 1, tt[0] - 1) for tt, ss in kept if len(tt) == 1 and len(ss) == 1]
    s_chunk = [-1] * len(s.ids)
    t_chunk = [-1] * len(t.ids)
    for k, (tt, ss) in enumerate(kept):
        for j in tt:
            t_chunk[j - 1] = k
        for i in ss:
            s_chunk[i - 1] = k
    return exact, s_chunk, t_chunk, len(kept)


def random_spans(rng: random.Random, n: int, start: int = 0, stop: int | None = None, zero_width: int = 0) -> Spans:
    stop = n if stop is None else stop
    cuts = sorted(rng.sample(range(start + 1, stop), rng.randint(0, stop - start - 1)))
    bounds = [start] + cuts + [stop]
    spans = list(zip(bounds[:-1], bounds[1:]))
    for _ in range(zero_width):
        at = rng.choice(bounds[:-1])  # a token of width zero (a BOS) just before the one starting there
        spans.insert([a for a, _ in spans].index(at), (at, at))
    ids = np.arange(len(spans))
    return Spans(ids, np.array([a for a, _ in spans]), np.array([b for _, b in spans]))


def reference_starts(t: Spans, s: Spans, cut: bool):
    """(student position, teacher position) before each kept chunk's first target, 1:1 or not."""
    def wide(side):
        return [(j, a, b) for j, (a, b) in enumerate(zip(side.starts.tolist(), side.ends.tolist())) if b > a]

    starts = []
    exact, s_chunk, t_chunk, chunks = reference_alignment(t, s, cut)
    for k in range(chunks):
        ss = [i + 1 for i, c in enumerate(s_chunk) if c == k]
        tt = [j + 1 for j, c in enumerate(t_chunk) if c == k]
        starts.append((min(ss) - 1, min(tt) - 1))
    assert set(exact) <= set(starts)
    assert all(b > a for i, _ in starts for j, a, b in wide(s) if j == i + 1)
    return starts


def test_chunks_equal_a_brute_force_reference_on_random_tokenizations():
    rng = random.Random(0)
    for case in range(400):
        n = rng.randint(2, 24)
        t = random_spans(rng, n, zero_width=rng.choice([0, 0, 1]))
        s = random_spans(rng, n, start=rng.choice([0, 0, 0, 1]) if n > 3 else 0,
                         stop=n - rng.choice([0, 0, 1]) if n > 3 else n, zero_width=rng.choice([0, 0, 1]))
        cut = rng.random() < 0.5
        got = align(t, s, cut)
        exact, s_chunk, t_chunk, chunks = reference_alignment(t, s, cut)
        assert [tuple(p) for p in got.exact.tolist()] == exact, case
        assert got.student_chunk.tolist() == s_chunk and got.teacher_chunk.tolist() == t_chunk, case
        assert got.chunks == chunks
        assert [tuple(p) for p in got.starts.tolist()] == reference_starts(t, s, cut), case


def test_identical_tokenizers_align_every_target_one_to_one(tokenizers):
    side = token_bytes(tokenizers["bpe8192"])
    aligner = RowAligner(side, side, encoder(tokenizers["bpe8192"]), 10_000, 0)
    row = np.array(stream(tokenizers["bpe8192"], TEXTS)[5:70])
    batch = aligner({"input_ids": row[None]})
    assert np.array_equal(batch["input_ids"][0], row)
    assert np.array_equal(batch["cross_exact"][0, :-1], np.arange(len(row) - 1))  # position t ↔ position t
    counts = batch["cross_counts"][0]
    n = len(row) - 1
    assert counts.tolist() == [n, n, n, 1, 0, n]  # only the first token's chunk; every chunk 1:1
    starts = RowAligner(side, side, encoder(tokenizers["bpe8192"]), 10_000, 0, positions="starts")
    assert np.array_equal(starts({"input_ids": row[None]})["cross_exact"], batch["cross_exact"])


def test_different_tokenizers_share_most_targets_and_count_what_they_drop(tokenizers):
    teacher, student = tokenizers["bpe8192"], tokenizers["bpe4096"]
    aligner = RowAligner(token_bytes(teacher), token_bytes(student), encoder(student), 10_000, 0)
    ids = stream(teacher, TEXTS * 3)
    rows = np.array([ids[r * 31: r * 31 + 32] for r in range(len(ids) // 31 - 1)])
    batch = aligner({"input_ids": rows})
    targets, exact, in_chunks, dropped, unaligned, starts = batch["cross_counts"].sum(0)
    assert unaligned == 0 and dropped >= len(rows)  # every row's first chunk, and the cut last ones
    assert 0.3 < exact / targets < 1.0 and exact < starts < in_chunks < targets
    # positions="starts": the next-token term at every kept chunk's first target, 1:1 or not
    wide = RowAligner(token_bytes(teacher), token_bytes(student), encoder(student), 10_000, 0, positions="starts")
    at_starts = wide({"input_ids": rows})
    assert np.array_equal(at_starts["cross_counts"], batch["cross_counts"])
    assert (at_starts["cross_exact"] >= 0).sum() == starts and (batch["cross_exact"] >= 0).sum() == exact
    one_to_one = batch["cross_exact"] >= 0
    assert np.array_equal(at_starts["cross_exact"][one_to_one], batch["cross_exact"][one_to_one])
    # the student's ids are its own tokenization of each row's bytes (padding masked)
    for r in range(len(rows)):
        m = int(batch["loss_mask"][r].sum()) + 1
        row_text = b"".join(aligner.teacher.pieces[i] or b"" for i in rows[r])
        spelt = b"".join(aligner.student.pieces[i] or b"" for i in batch["input_ids"][r, :m])
        assert spelt in row_text


@pytest.mark.parametrize("teacher_name,student_name", [("bpe8192", "bpe4096"), ("bpe8192", "sentencepiece"),
                                                       ("sentencepiece", "bpe4096")])
def test_every_later_target_of_a_kept_chunk_is_placed_inside_its_teacher_token(tokenizers, teacher_name,
                                                                              student_name):
    """``cross_inside``: a student target in a kept chunk that is no chunk start begins strictly inside a
    teacher token (else both sides would have a boundary there); the aligner names the teacher position
    predicting that token and the token's bytes before the target, which the student has just written."""
    teacher, student = tokenizers[teacher_name], tokenizers[student_name]
    aligner = RowAligner(token_bytes(teacher), token_bytes(student), encoder(student), 10_000, 0, positions="starts")
    ids = stream(teacher, TEXTS * 3)
    rows = np.array([ids[r * 31: r * 31 + 32] for r in range(len(ids) // 31 - 1)])
    batch = aligner({"input_ids": rows})
    inside = 0
    for r in range(len(rows)):
        t, s, _ = aligner.row(rows[r])
        student_units = units(aligner.student, s.ids, s.starts, s.ends)
        m = len(s.ids)
        for i in range(m - 1):
            later = batch["cross_student_chunk"][r, i] >= 0 and batch["cross_exact"][r, i] < 0
            j, k = batch["cross_inside"][r, i], batch["cross_inside_offset"][r, i]
            assert (j >= 0) == later, (r, i)
            if j < 0:
                assert k == 0
                continue
            inside += 1
            u = s.starts[i + 1]  # the target's first unit
            assert t.starts[j + 1] < u < t.ends[j + 1] and k == u - t.starts[j + 1]
            written = bytes(student_units[x] for x in range(t.starts[j + 1], u))  # may begin in an earlier token
            assert aligner.teacher.pieces[rows[r, j + 1]][:k] == written
    assert inside >= {"bpe4096": 2, "sentencepiece": 100}[student_name]  # 2 of 331 targets; 117 of 438


def test_vocabulary_map_pairs_equal_bytes_and_follows_a_permutation(tokenizers, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    big, small = token_bytes(tokenizers["bpe8192"]), token_bytes(tokenizers["bpe4096"])
    assert np.array_equal(build_vocab_map(big, big), np.arange(len(big.pieces)))
    mapping, digest = vocab_map(big, small)
    assert len(list(tmp_path.glob("vocab-map-*.npy"))) == 1
    again, digest_again = vocab_map(big, small)  # read from the cache
    assert digest == digest_again and np.array_equal(mapping, again)
    for t, s in enumerate(mapping.tolist()):
        if s >= 0:
            assert (big.pieces[t] or big.specials[t]) == (small.pieces[s] or small.specials[s])
    assert len(set(mapping[mapping >= 0].tolist())) == int((mapping >= 0).sum())  # injective
    perm = np.random.default_rng(0).permutation(len(small.pieces))  # student id i becomes perm[i]
    shuffled = TokenBytes(tuple(small.pieces[i] for i in np.argsort(perm)),
                          {int(perm[i]): r for i, r in small.specials.items()}, frozenset(), small.scheme, "other")
    permuted = build_vocab_map(big, shuffled)
    assert np.array_equal(permuted, np.where(mapping >= 0, perm[np.maximum(mapping, 0)], -1))
    sp = token_bytes(tokenizers["sentencepiece"])
    sp_map = build_vocab_map(sp, sp)
    vocab = tokenizers["sentencepiece"].get_vocab()
    assert sp_map[vocab["<0x41>"]] == -1 and sp_map[vocab["A"]] == vocab["A"]  # one id per spelling


def test_tokenizers_that_change_bytes_are_refused_in_one_line():
    from tokenizers import normalizers

    lower = sentencepiece_tokenizer(normalizer=normalizers.Sequence([normalizers.Lowercase(),
                                                                     normalizers.Replace(" ", "▁")]))
    assert "normaliser (Lowercase)" in byte_problem(lower)
    assert "adds a space" in byte_problem(sentencepiece_tokenizer(prepend="always"))
    with pytest.raises(DistillError) as e:
        check_byte_level(lower, "student", "x")
    assert "\n" not in str(e.value) and "cannot be aligned by bytes" in str(e.value)


def test_prefix_map_sends_each_unspelt_teacher_id_to_its_longest_student_prefix(tokenizers):
    big, small = token_bytes(tokenizers["bpe8192"]), token_bytes(tokenizers["bpe4096"])
    exact, prefix = build_vocab_map(big, small), build_vocab_map(big, small, "prefix")
    assert np.array_equal(prefix[exact >= 0], exact[exact >= 0])  # spelt ids keep their pair
    assert (prefix >= 0).all() and (exact < 0).sum() > 1000
    student_pieces = {p for p in small.pieces if p}
    for t in np.nonzero(exact < 0)[0][:300]:
        piece, chosen = big.pieces[t], small.pieces[prefix[t]]
        assert piece.startswith(chosen) and len(chosen) < len(piece)
        assert not any(piece[:n] in student_pieces for n in range(len(chosen) + 1, len(piece) + 1))
    assert np.array_equal(build_vocab_map(big, big, "prefix"), np.arange(len(big.pieces)))


# ---------------------------------------------------------------- the first-token map (--unmapped first)

def byte_bpe(words: list[str], merges: list[tuple[str, str]] = ()) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (GPT-2's pre-tokenizer, no prefix space): the 256 bytes, each word of
    ``words`` built left to right (" and" = " "+"a", " a"+"n", " an"+"d"), then ``merges``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from pipeline.text.align import _unicode_to_byte

    char = {b: c for c, b in _unicode_to_byte().items()}

    def spell(text: str) -> str:
        return "".join(char[b] for b in text.encode("utf-8"))

    pairs = [(w[:i], w[i]) for w in words for i in range(1, len(w))] + list(merges)
    vocab = {"<|endoftext|>": 0} | {char[b]: b + 1 for b in range(256)}
    merge_list = []
    for a, b in pairs:
        if (spell(a), spell(b)) not in merge_list:
            merge_list.append((spell(a), spell(b)))
            vocab.setdefault(spell(a + b), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_list))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def id_of(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def optimum(mapping: np.ndarray, teacher_ids: list[int], teacher_probs: list[float], student_vocab: int,
            sampled: bool, groups: np.ndarray | None = None) -> torch.Tensor:
    """The student distribution that minimises the bucketed loss against one teacher position
    (top-k with an empty tail, or the same probabilities as drawn weights), merged as
    CrossTokenizer merges a many-to-one map; with ``groups`` (:func:`student_groups`) the student's
    ids outside the image folded into their heads, as ``--cross-longer group`` does."""
    from pipeline.train.cross_losses import (bucketed_sampled_kd, bucketed_sparse_kd, fold_groups, group_tensors,
                                             merge_duplicates, unmapped_student_ids)

    bucket_ids = unmapped_student_ids(torch.from_numpy(mapping.astype(np.int64)), student_vocab)
    folding = group_tensors(torch.from_numpy(groups.astype(np.int64))) if groups is not None else None
    if folding is not None:
        bucket_ids = bucket_ids[~torch.isin(bucket_ids, folding[0])]
    student_ids = torch.from_numpy(mapping[np.array(teacher_ids)].astype(np.int64))[None]
    probs = torch.tensor([teacher_probs], dtype=torch.float32)
    if sampled:
        student_ids, weights = merge_duplicates(student_ids, weights=probs)
    else:
        student_ids, logprobs = merge_duplicates(student_ids, logprobs=probs.log())
    logits = torch.zeros(1, student_vocab, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.3)
    for _ in range(400):
        opt.zero_grad()
        logq = torch.log_softmax(logits, -1)
        logq = fold_groups(logq, *folding) if folding is not None else logq
        loss = bucketed_sampled_kd(logq, student_ids, weights, bucket_ids) if sampled else \
            bucketed_sparse_kd(logq, student_ids, logprobs, torch.tensor([-float("inf")]))
        loss.sum().backward()
        opt.step()
    return torch.softmax(logits.detach(), -1)[0]


@pytest.mark.parametrize("sampled", [False, True])
def test_first_rule_gives_a_longer_teacher_token_to_the_students_first_token_of_it(sampled):
    """Teacher p(" destroys") = .5, p(" destroy") = .3, p(" and") = .2; the student writes
    " destroys" as " destroy" + "s". Its next token is " destroy" with probability .8; the bucket
    rule teaches .3 (" destroys" goes to the bucket with the student's "s"-less rest)."""
    teacher, student = byte_bpe([" destroys", " and"]), byte_bpe([" destroy", " and"])
    assert student(" destroys", add_special_tokens=False)["input_ids"] == [id_of(student, " destroy"),
                                                                         id_of(student, "s")]
    t_side, s_side = token_bytes(teacher), token_bytes(student)
    ids = [id_of(teacher, w) for w in (" destroys", " destroy", " and")]
    destroy = id_of(student, " destroy")
    first = build_vocab_map(t_side, s_side, "first", student)
    assert first[ids].tolist() == [destroy, destroy, id_of(student, " and")]
    q = optimum(first, ids, [.5, .3, .2], len(s_side.pieces), sampled)
    assert float(q[destroy]) == pytest.approx(0.80, abs=2e-3)
    q = optimum(build_vocab_map(t_side, s_side, "bucket"), ids, [.5, .3, .2], len(s_side.pieces), sampled)
    # top-k: .3, the rest of the student's mass is its bucket; drawn targets: the student's bucket is its
    # ids outside the map's image, and here the teacher spells every student token, so there is none and
    # the target is the mapped mass renormalised, .3 / .5. Neither is the byte-consistent .8.
    assert float(q[destroy]) == pytest.approx(0.60 if sampled else 0.30, abs=2e-3)


def test_a_teacher_token_shorter_than_the_students_goes_to_the_students_first_token_of_its_own_bytes():
    """The strict-prefix case: the teacher writes " destroys" as " destroy" + "s", the student as
    " destroys". Teacher " destroy" goes to the student's first token of " destroy" alone: " destroy"
    where the student has it (so the teacher's mass on " destroy" + "s" teaches q(" destroy"), not
    q(" destroys")), else the shorter token its BPE cuts first (" des")."""
    teacher = byte_bpe([" destroy", " and"])
    with_it = byte_bpe([" destroys", " and"])  # " destroy" is one of its merges on the way
    without = byte_bpe([" des", "troys", " and"], merges=[(" des", "troys")])
    assert id_of(with_it, " destroys") and id_of(without, " destroys")
    assert [without.decode([i]) for i in without(" destroy", add_special_tokens=False)["input_ids"]] == \
        [" des", "troy"]
    t_side = token_bytes(teacher)
    for student, expected in ((with_it, " destroy"), (without, " des")):
        mapping = build_vocab_map(t_side, token_bytes(student), "first", student)
        assert mapping[id_of(teacher, " destroy")] == id_of(student, expected)
        assert mapping[id_of(teacher, "s")] == id_of(student, "s")
    # what the comparison then teaches: the teacher's " destroy" (followed by "s" or not) is the
    # student's " destroy"; its " destroys", which no teacher id maps to, joins that event under
    # --cross-longer group (the teacher's first token of " destroys" is " destroy"): together they
    # take the teacher's .7, split as the student likes. In the bucket (the old rule) " destroys" is
    # pushed to the teacher's tail, here empty: 0, though the teacher's .7 holds " destroy" + "s".
    s_side = token_bytes(with_it)
    mapping = build_vocab_map(t_side, s_side, "first", with_it)
    groups = student_groups(mapping, s_side, teacher)
    destroy, destroys = id_of(with_it, " destroy"), id_of(with_it, " destroys")
    assert groups[destroys] == destroy and groups[destroy] == -1
    assert all(groups[i] == -1 for i in mapping[mapping >= 0])  # the image's own ids are no members
    ids = [id_of(teacher, " destroy"), id_of(teacher, " and")]
    for sampled in (False, True):
        q = optimum(mapping, ids, [.7, .3], len(s_side.pieces), sampled, groups)
        assert float(q[destroy] + q[destroys]) == pytest.approx(0.70, abs=2e-3)
        assert float(q[destroys]) > 0.1  # not pushed down: nothing tells the two apart
        assert float(q[id_of(with_it, " and")]) == pytest.approx(0.30, abs=2e-3)
    q = optimum(mapping, ids, [.7, .3], len(s_side.pieces), sampled=False)
    assert float(q[destroy]) == pytest.approx(0.70, abs=2e-3)
    assert float(q[destroys]) < 1e-3


def reference_first(teacher: TokenBytes, student_tokenizer, exact: np.ndarray) -> np.ndarray:
    """The student's first token of each teacher id's bytes, from the student tokenizer's own
    encode of those bytes as a text of their own (the pairs of equal bytes kept first)."""
    backend = student_tokenizer.backend_tokenizer
    out = exact.copy()
    for t, piece in enumerate(teacher.pieces):
        if out[t] >= 0 or not piece:
            continue
        try:
            ids = backend.encode(piece.decode("utf-8"), add_special_tokens=False).ids
        except UnicodeDecodeError:  # part of a character
            student = token_bytes(student_tokenizer)
            if student.scheme == "byte-level":  # the student's BPE of those bytes alone
                from pipeline.text.align import _unicode_to_byte

                char = {b: c for c, b in _unicode_to_byte().items()}
                tokens = backend.model.tokenize("".join(char[b] for b in piece))
                ids = [backend.token_to_id(x.value) for x in tokens]
            else:  # its longest token beginning them (a byte fallback <0xNN> only where nothing else)
                ids = [max((i for i, p in enumerate(student.pieces) if p and piece.startswith(p)),
                           key=lambda i: (len(student.pieces[i]), i not in student.fallback, -i))]
        out[t] = ids[0]
    return out


@pytest.mark.parametrize("teacher_name,student_name", [("bpe8192", "bpe4096"), ("bpe4096", "bpe8192"),
                                                       ("sentencepiece", "bpe4096"), ("bpe4096", "sentencepiece")])
def test_first_map_is_the_students_first_token_of_each_teacher_tokens_bytes(tokenizers, teacher_name,
                                                                             student_name):
    teacher, student = token_bytes(tokenizers[teacher_name]), token_bytes(tokenizers[student_name])
    exact = build_vocab_map(teacher, student)
    first = build_vocab_map(teacher, student, "first", tokenizers[student_name])
    assert np.array_equal(first[exact >= 0], exact[exact >= 0])  # pairs of equal bytes unchanged: 1:1 as before
    assert np.array_equal(first, reference_first(teacher, tokenizers[student_name], exact))
    has_bytes = np.array([bool(p) for p in teacher.pieces])
    assert (first[has_bytes] >= 0).all()
    for t in np.nonzero(has_bytes)[0]:
        assert teacher.pieces[t].startswith(student.pieces[first[t]])  # always a prefix of its bytes
    if teacher_name == "bpe8192":
        prefix = build_vocab_map(teacher, student, "prefix")
        assert (first != prefix).sum() > 100  # the longest prefix is often not what BPE emits


def test_first_map_of_identical_tokenizers_is_the_identity_and_is_cached_by_rule(tokenizers, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    for name in ("bpe8192", "sentencepiece"):
        side = token_bytes(tokenizers[name])
        assert np.array_equal(build_vocab_map(side, side, "first", tokenizers[name]), np.arange(len(side.pieces)))
    big, small = token_bytes(tokenizers["bpe8192"]), token_bytes(tokenizers["bpe4096"])
    maps = {rule: vocab_map(big, small, rule, tokenizers["bpe4096"]) for rule in ("bucket", "prefix", "first")}
    assert len(list(tmp_path.glob("vocab-map-*.npy"))) == 3 and len({d for _, d in maps.values()}) == 3
    again, digest = vocab_map(big, small, "first", tokenizers["bpe4096"])
    assert digest == maps["first"][1] and np.array_equal(again, maps["first"][0])
    with pytest.raises(ValueError, match="student tokenizer"):
        build_vocab_map(big, small, "first")


def byte_fallback_as_specials() -> PreTrainedTokenizerFast:
    """The SentencePiece-style tokenizer with its <0xNN> byte tokens registered as special added
    tokens (as some conversions do): its bytes are lost when read back as text."""
    tokenizer = sentencepiece_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<0x{b:02X}>" for b in range(256)]})
    return tokenizer


def test_byte_tokens_registered_as_specials_are_refused_on_either_side():
    tokenizer = byte_fallback_as_specials()
    assert "special" in byte_problem(tokenizer)
    with pytest.raises(DistillError) as e:
        check_byte_level(tokenizer, "teacher", "store-tokenizer")
    assert "\n" not in str(e.value) and str(e.value).startswith("teacher tokenizer store-tokenizer cannot be aligned")

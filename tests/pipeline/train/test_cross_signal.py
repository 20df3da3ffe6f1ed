"""The cross-tokenizer teacher signal on real store rows, through stage two's DistillStep:
identical tokenizers give today's loss and gradients (top-k + tail, and drawn targets); renaming
the student's ids changes nothing; against a second tokenizer both terms equal plain loops over
the alignment with a full student forward."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from pipeline.models import OutputHead, load_model
from pipeline.store.contract import open_store
from pipeline.text.align import RowAligner, TokenBytes, first_tokens, student_groups, token_bytes, vocab_map
from pipeline.train.cross_signal import CrossTokenizer, InsideTargets
from pipeline.train.loader import _as_torch
from pipeline.train.teacher_signal import stored_teacher
from stages.student import DistillStep
from tests.conftest import ROOT, TOKENIZER, make_teacher, run_cli, write_tiny_model_config

SECOND = ROOT / "data" / "tokenizer-4096"
ROWS = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("cross")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in heldout_docs[:12]))
    result = run_cli("prepare", "--input", root / "corpus.jsonl", "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--rows-per-shard", "64", "--chunk-rows", "8")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher", scale=8.0)
    for name, flags in (("topk", ["--kind", "topk", "--top-k", "8"]),
                        ("sampled", ["--kind", "sampled", "--samples", "50"]),
                        ("hybrid", ["--kind", "topk", "--top-k", "4", "--tail-samples", "16"]),
                        ("topk1", ["--kind", "topk", "--top-k", "1", "--temperature-grid", "0.5"])):
        result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                         root / name, "--rows-per-shard", "16", "--chunk-rows", "8", "--max-rows", "16",
                         "--temperature-grid", "1", "--temperature-grid", "2", *flags)
        assert result.exit_code == 0, result.output
    return root


def tiny_model(path, vocab: int, seed: int = 0):
    config = write_tiny_model_config(path)
    config.write_text(json.dumps(json.loads(config.read_text()) | {"vocab_size": vocab}))
    torch.manual_seed(seed)
    return load_model(config)


def encoder(tokenizer):
    backend = tokenizer.backend_tokenizer
    return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def tensors(arrays):
    return {k: torch.from_numpy(_as_torch(v)) for k, v in arrays.items()}


def conditioned_loop(teacher_side, student_tok, candidates, probs, prefix: bytes, event=None):
    """The float64 reference of InsideTargets: (mass of the candidates spelling ``prefix``, {student
    id: mass} of those going on, by the student's first token of the rest — then ``event`` of it,
    where given)."""
    k = len(prefix)
    spelt, going = 0.0, {}
    for d, w in zip(candidates, probs):
        piece = teacher_side.pieces[d]
        if w <= 0 or piece is None or len(piece) < k or piece[:k] != prefix:
            continue
        spelt += w
        if len(piece) > k:
            sid = first_tokens(student_tok, [piece[k:]])[0]
            sid = int(event[sid]) if event is not None else sid
            going[sid] = going.get(sid, 0.0) + w
    return spelt, going


def step_loss(model, vocab, signal, batch, loss_chunk):
    """(CE sum, KD sum, targets, gradients) of one DistillStep with α = 0.5."""
    probe = batch["input_ids"][:1]
    step = DistillStep(model, vocab, 0.5, loss_chunk, signal, output=OutputHead(model, probe))
    model.zero_grad()
    ce, kd, n = step(batch["input_ids"], batch)
    (0.5 * ce + 0.5 * signal.temperature ** 2 * kd).div(n).backward()
    return ce.item(), kd.item(), n, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("kind,temperature,loss_chunk", [("topk", 1.0, 0), ("topk", 2.0, 40), ("sampled", 1.0, 40),
                                                         ("hybrid", 1.0, 40)])
def test_identical_tokenizers_give_todays_loss_and_gradients(root, tmp_path, kind, temperature, loss_chunk):
    store = open_store(root / kind)
    rows = store.read_rows(0, ROWS)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    side = token_bytes(tokenizer)
    model = tiny_model(tmp_path / "student.json", 8192)
    kind = store.kind  # the hybrid is a topk store with tail draws (read as drawn targets)
    today = stored_teacher(kind, store.params, temperature)
    ce, kd, n, grads = step_loss(model, 8192, today, tensors(rows), loss_chunk)
    # the identity map at 1:1 chunks, and the default: the first-token map at every chunk start
    first, _ = vocab_map(side, side, "first", tokenizer)
    assert np.array_equal(first, np.arange(8192))
    inside = InsideTargets(side.pieces, lambda pieces: first_tokens(tokenizer, pieces))
    for mapping, positions, uncovered in ((np.arange(8192), "1to1", "none"), (first, "starts", "none"),
                                          (first, "starts", "ce"), (first, "starts", "teacher")):
        aligner = RowAligner(side, side, encoder(tokenizer), 10_000, tokenizer.eos_token_id, positions=positions)
        cross = CrossTokenizer(stored_teacher(kind, store.params, temperature), mapping, "exact",
                               uncovered=uncovered, inside=inside)
        batch = tensors(aligner(rows))
        ce2, kd2, n2, grads2 = step_loss(model, 8192, cross, batch, loss_chunk)
        assert n2 == n == ROWS * 31 and kd > 0.01
        assert abs(ce2 - ce) / n < 1e-6 and abs(kd2 - kd) / n < 1e-6
        for name in grads:
            torch.testing.assert_close(grads2[name], grads[name], rtol=0, atol=1e-6)
        stats = cross.take_stats()
        assert stats["cross_exact_share"] == stats["cross_start_share"] == 1.0


def permuted(side: TokenBytes, perm: np.ndarray, name: str) -> TokenBytes:
    """``side`` with id i renamed perm[i] (same bytes, another tokenizer as far as hashes go)."""
    pieces = [None] * len(side.pieces)
    for i, piece in enumerate(side.pieces):
        pieces[perm[i]] = piece
    return TokenBytes(tuple(pieces), {int(perm[i]): r for i, r in side.specials.items()},
                      frozenset(int(perm[i]) for i in side.fallback), side.scheme, name)


@pytest.mark.parametrize("mode", ["exact", "both"])
def test_renaming_the_students_ids_changes_nothing(root, tmp_path, mode, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    store = open_store(root / "topk")
    rows = store.read_rows(0, ROWS)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    teacher_side = token_bytes(tokenizer)
    encode = encoder(tokenizer)
    perm = np.random.default_rng(0).permutation(8192)
    results = []
    for student_side, rename in ((permuted(teacher_side, np.arange(8192), "copy"), np.arange(8192)),
                                 (permuted(teacher_side, perm, "renamed"), perm)):
        # another hash: the rows are retokenized and aligned as for any other tokenizer
        aligner = RowAligner(teacher_side, student_side, lambda texts, r=rename: [r[ids].tolist() for ids in
                                                                               map(np.array, encode(texts))],
                             10_000, int(rename[tokenizer.eos_token_id]))
        mapping, _ = vocab_map(teacher_side, student_side)
        assert np.array_equal(mapping, rename)
        model = tiny_model(tmp_path / "student.json", 8192)
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[torch.from_numpy(rename)] = weight.clone()
        signal = CrossTokenizer(stored_teacher("topk", store.params, 1.0), mapping, mode)
        ce, kd, n, _ = step_loss(model, 8192, signal, tensors(aligner(rows)), 40)
        results.append((ce, kd, n, signal.take_stats()))
    (ce_a, kd_a, n_a, stats_a), (ce_b, kd_b, n_b, stats_b) = results
    assert n_a == n_b and stats_a == stats_b and stats_a["cross_exact_share"] < 1.0  # row ends are dropped
    assert ce_b == pytest.approx(ce_a, rel=1e-6) and kd_b == pytest.approx(kd_a, rel=1e-6)


@pytest.mark.parametrize("rule,positions", [("bucket", "1to1"), ("first", "starts")])
def test_both_terms_equal_loops_over_the_alignment_with_a_second_tokenizer(root, tmp_path, monkeypatch, rule,
                                                                          positions):
    """The old 1:1-only term with the bucket map, and the default: every chunk start, the teacher's
    ids through the first-token map (several teacher ids of one student id added up)."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    store = open_store(root / "topk")
    rows = store.read_rows(0, ROWS)
    teacher_tok, student_tok = AutoTokenizer.from_pretrained(str(TOKENIZER)), AutoTokenizer.from_pretrained(str(SECOND))
    teacher_side, student_side = token_bytes(teacher_tok), token_bytes(student_tok)
    mapping, _ = vocab_map(teacher_side, student_side, rule, student_tok)
    aligner = RowAligner(teacher_side, student_side, encoder(student_tok), 10_000, student_tok.eos_token_id,
                         positions=positions)
    arrays = aligner(rows)
    batch = tensors(arrays)
    model = tiny_model(tmp_path / "student.json", 4096)
    t = 2.0
    got = {}
    for mode in ("exact", "chunk"):
        signal = CrossTokenizer(stored_teacher("topk", store.params, t), mapping, mode)
        got[mode] = step_loss(model, 4096, signal, batch, 40)[1]
        # --cross-uncovered ce: the true token's −log q_T wherever the next-token term does not compare
        signal = CrossTokenizer(stored_teacher("topk", store.params, t), mapping, mode, uncovered="ce")
        got[mode + "-ce"] = step_loss(model, 4096, signal, batch, 40)[1]
    # the default 'teacher' in chunk mode has no next-token term to condition: it is 'ce', and needs no tables
    signal = CrossTokenizer(stored_teacher("topk", store.params, t), mapping, "chunk", uncovered="teacher")
    assert signal.inside is None and step_loss(model, 4096, signal, batch, 40)[1] == pytest.approx(got["chunk-ce"])
    # --direction reverse: the chunk term is KL(student ‖ teacher) on {chunk, not chunk}
    signal = CrossTokenizer(stored_teacher("topk", store.params, t, "tail", "reverse"), mapping, "chunk")
    got["chunk-reverse"] = step_loss(model, 4096, signal, batch, 40)[1]
    # --chunk-scope 1to1: the chunk term over the chunks of one student and one teacher token only
    signal = CrossTokenizer(stored_teacher("topk", store.params, t), mapping, "chunk", chunk_scope="1to1")
    got["chunk-1to1"] = step_loss(model, 4096, signal, batch, 40)[1]

    with torch.no_grad():
        logq = F.log_softmax(model(input_ids=batch["input_ids"]).logits.double() / t, -1).numpy()
    grid = store.params["temperature_grid"]
    lse = arrays["logsumexp"].astype(np.float64)
    cache = store.params["temperature"]

    def at_t(logprob, r, j):  # a stored log-prob re-tempered from the cache temperature to t
        return (cache / t) * (logprob + lse[r, j, grid.index(cache)]) - lse[r, j, grid.index(t)]

    exact = chunk = chunk_reverse = chunk_1to1 = uncovered = every = 0.0
    ids = arrays["input_ids"]
    for r in range(ROWS):
        for i in range(ids.shape[1] - 1):
            j = arrays["cross_exact"][r, i]
            if arrays["loss_mask"][r, i]:  # DistillStep's positions: a target that is not padding
                every -= logq[r, i, ids[r, i + 1]]
                uncovered -= logq[r, i, ids[r, i + 1]] if j < 0 else 0.0
            if j < 0:
                continue
            p = {}
            rest = math.exp(arrays["tail_logmass"][r, j, grid.index(t)])
            for tid, lp in zip(arrays["topk_ids"][r, j], arrays["topk_logprobs"][r, j].astype(np.float64)):
                if mapping[tid] >= 0:
                    p[int(mapping[tid])] = p.get(int(mapping[tid]), 0.0) + math.exp(at_t(lp, r, j))
                else:
                    rest += math.exp(at_t(lp, r, j))
            q = {s: math.exp(logq[r, i, s]) for s in p}
            q_rest = 1 - sum(q.values())
            exact += sum(p[s] * math.log(p[s] / q[s]) for s in p) + (rest * math.log(rest / q_rest) if rest else 0.0)
        student_chunks, teacher_chunks, tokens = {}, {}, {}
        for i, c in enumerate(arrays["cross_student_chunk"][r]):
            if c >= 0:
                student_chunks[c] = student_chunks.get(c, 0.0) + logq[r, i, ids[r, i + 1]]
                tokens[c] = tokens.get(c, 0) + 1
        for j, c in enumerate(arrays["cross_teacher_chunk"][r]):
            if c >= 0:
                teacher_chunks[c] = teacher_chunks.get(c, 0.0) + at_t(float(arrays["target_logprob"][r, j]), r, j)
                tokens[c] = tokens.get(c, 0) + 1
        assert student_chunks.keys() == teacher_chunks.keys()
        for c in student_chunks:
            a, b = math.exp(teacher_chunks[c]), math.exp(student_chunks[c])
            chunk += a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
            if tokens[c] == 2:  # one token on each side
                chunk_1to1 += a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
            a = min(a, 1 - 1e-6)  # reverse: a teacher certain of a chunk is capped as the student is
            chunk_reverse += b * math.log(b / a) + (1 - b) * math.log((1 - b) / (1 - a))
    targets, one_to_one, starts = (arrays["cross_counts"][:, c].sum() for c in (0, 1, 5))
    assert 0.2 < one_to_one / targets < starts / targets < 1.0
    assert (arrays["cross_exact"] >= 0).sum() == (starts if positions == "starts" else one_to_one)
    assert got["exact"] == pytest.approx(exact, rel=1e-5)
    assert got["chunk"] == pytest.approx(chunk, rel=1e-5)
    assert got["chunk-1to1"] == pytest.approx(chunk_1to1, rel=1e-5) and 0 < chunk_1to1 < chunk
    assert uncovered > 0.1 * every and got["exact-ce"] == pytest.approx(exact + uncovered, rel=1e-5)
    assert got["chunk-ce"] == pytest.approx(chunk + every, rel=1e-5)
    assert got["chunk-reverse"] == pytest.approx(chunk_reverse, rel=1e-5) and chunk_reverse != pytest.approx(chunk)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_renaming_the_teachers_ids_changes_nothing(root, tmp_path, kind, monkeypatch):
    """The teacher's ids renamed everywhere they appear (rows, stored ids, its vocabulary): the
    student of another tokenizer sees the same bytes, chunks and mapped distributions."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    store = open_store(root / kind)
    rows = store.read_rows(0, ROWS)
    teacher_side = token_bytes(AutoTokenizer.from_pretrained(str(TOKENIZER)))
    student_tok = AutoTokenizer.from_pretrained(str(SECOND))
    student_side = token_bytes(student_tok)
    perm = np.random.default_rng(1).permutation(8192)
    renamed_rows = {k: (perm[v.astype(np.int64)].astype(v.dtype) if k in ("input_ids", "topk_ids", "sample_ids")
                        else v) for k, v in rows.items()}
    results = []
    for side, arrays in ((teacher_side, rows), (permuted(teacher_side, perm, "renamed"), renamed_rows)):
        mapping, _ = vocab_map(side, student_side)
        aligner = RowAligner(side, student_side, encoder(student_tok), 10_000, student_tok.eos_token_id)
        model = tiny_model(tmp_path / "student.json", 4096)
        signal = CrossTokenizer(stored_teacher(kind, store.params, 1.0), mapping, "both")
        results.append(step_loss(model, 4096, signal, tensors(aligner(arrays)), 40)[:3])
    (ce_a, kd_a, n_a), (ce_b, kd_b, n_b) = results
    assert n_a == n_b and kd_a > 0
    assert ce_b == pytest.approx(ce_a, rel=1e-6) and kd_b == pytest.approx(kd_a, rel=1e-6)


def test_inside_targets_condition_the_candidates_on_the_bytes_written():
    """Teacher " destroys" .5, " destroy" .2, " dest" .1, " and" .2; the student has written
    " destroy" (7 bytes) of the row's " destroys": " and" does not spell it, " destroy" ends there
    (no next token in the store), " destroys" goes on with "s" — and " dest", shorter, cannot."""
    pieces = (b" destroys", b" destroy", b" dest", b" and", None)
    first = {b"s": 40}
    inside = InsideTargets(pieces, lambda rests: [first.get(r, 99) for r in rests])
    t = torch.tensor
    sid, going, share = inside(t([[0, 1, 2, 3, 4]]), t([[.5, .2, .1, .2, 0.0]]), t([0]), t([8]))
    assert sid.tolist() == [[40, -1, -1, -1, -1]] and going[0].tolist() == [1.0, 0, 0, 0, 0]
    assert share[0].item() == pytest.approx(.5 / .7)
    # nothing spells the prefix: no target (the position falls back to the true token)
    sid, going, share = inside(t([[3, 2]]), t([[.6, .4]]), t([0]), t([8]))
    assert (sid < 0).all() and share[0] == 0 and going.sum() == 0
    # a special (no bytes) and padding never count
    sid, going, share = inside(t([[4, 0, 0]]), t([[.3, .7, 0.0]]), t([0]), t([8]))
    assert sid.tolist() == [[-1, 40, -1]] and share[0].item() == 1.0


@pytest.mark.parametrize("name,t,teacher,direction", [
    ("topk", 1.0, "as stored", "forward"), ("sampled", 1.0, "as stored", "forward"),
    ("topk", 2.0, "as stored", "forward"), ("topk", 1.0, "certain", "forward"), ("sampled", 1.0, "certain", "forward"),
    ("topk1", 0.5, "as stored", "forward"), ("topk", 1.0, "as stored", "reverse"), ("topk", 2.0, "as stored", "reverse"),
    ("topk", 1.0, "certain", "reverse"), ("topk1", 0.5, "as stored", "reverse")])
def test_inside_term_equals_a_loop_over_the_teachers_candidates(root, tmp_path, monkeypatch, name, t, teacher,
                                                                direction):
    """--cross-uncovered teacher against a second tokenizer: its loss minus --cross-uncovered none's
    (the chunk starts' terms are the same) equals, over the positions that are no chunk start, a float64
    loop: inside a teacher token, the candidates that spell the student's bytes since the token began,
    those going on mapped by the student's first token of the rest, ``s·KL(p_L ‖ q_T) + (1 − s)·CE_T``;
    elsewhere CE_T. Also at T = 2, for a teacher certain of the row's token (its other candidates at
    e^−80, or no other draw), and for k = 1 at T = 0.5; the gradients are finite in every case. Under
    ``--direction reverse`` (top-k: T = 1 and 2, a certain teacher, k = 1 at T = 0.5) the term is
    ``KL(q̃_T ‖ p_L)``, the student renormalised over the student ids the candidates go on to (the
    teacher's other buckets are empty)."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    store = open_store(root / name)
    kind = store.kind
    rows = store.read_rows(0, ROWS)
    # the toy teacher rarely names the row's own token: make it the first candidate everywhere, so that
    # most positions inside a teacher token have candidates that spell the student's bytes
    ids_field, mass_field = ("topk_ids", "topk_logprobs") if kind == "topk" else ("sample_ids", "sample_counts")
    rows[ids_field][:, :-1, 0] = rows["input_ids"][:, 1:]
    assert (rows[mass_field][:, :-1, 0] > (-np.inf if kind == "topk" else 0)).all()
    if teacher == "certain" and kind == "topk":
        rows["topk_logprobs"][:, :, 0], rows["topk_logprobs"][:, :, 1:] = 0.0, -80.0
        rows["tail_logmass"][:] = -80.0
    elif teacher == "certain":
        rows["sample_counts"][:, :, 0], rows["sample_counts"][:, :, 1:] = rows["sample_counts"].sum(-1), 0
    teacher_tok, student_tok = AutoTokenizer.from_pretrained(str(TOKENIZER)), AutoTokenizer.from_pretrained(str(SECOND))
    teacher_side, student_side = token_bytes(teacher_tok), token_bytes(student_tok)
    mapping, _ = vocab_map(teacher_side, student_side, "first", student_tok)
    aligner = RowAligner(teacher_side, student_side, encoder(student_tok), 10_000, student_tok.eos_token_id,
                         positions="starts")
    arrays = aligner(rows)
    batch = tensors(arrays)
    model = tiny_model(tmp_path / "student.json", 4096)
    inside = InsideTargets(teacher_side.pieces, lambda pieces: first_tokens(student_tok, pieces))
    got = {}
    for uncovered in ("none", "teacher"):
        signal = CrossTokenizer(stored_teacher(kind, store.params, t, "tail", direction), mapping, "exact",
                                uncovered=uncovered, inside=inside)
        _, got[uncovered], _, grads = step_loss(model, 4096, signal, batch, 40)
        assert all(torch.isfinite(g).all() for g in grads.values()), uncovered
    stats = signal.take_stats()
    assert 0.05 < stats["cross_inside_share"] < 1 - stats["cross_start_share"]

    with torch.no_grad():
        logq = F.log_softmax(model(input_ids=batch["input_ids"]).logits.double() / t, -1).numpy()
    base = stored_teacher(kind, store.params, t).positions(batch["teacher_input_ids"], batch)
    length = arrays["teacher_input_ids"].shape[1]
    ids = arrays["input_ids"]
    expected, other, conditioned = 0.0, 0.0, 0
    for r in range(ROWS):
        for i in range(ids.shape[1] - 1):
            if not arrays["loss_mask"][r, i] or arrays["cross_exact"][r, i] >= 0:
                continue
            ce = -logq[r, i, ids[r, i + 1]]
            j = arrays["cross_inside"][r, i]
            if j < 0:
                expected += ce
                continue
            k = int(arrays["cross_inside_offset"][r, i])
            prefix = teacher_side.pieces[arrays["teacher_input_ids"][r, j + 1]][:k]
            flat = r * (length - 1) + j
            candidates = base[0][flat].tolist()
            probs = (base[1][flat].double().exp() if kind == "topk" else base[1][flat].double()).tolist()
            spelt, going = conditioned_loop(teacher_side, student_tok, candidates, probs, prefix)
            total = sum(going.values())
            if total == 0:
                expected += ce
                continue
            conditioned += 1
            s = total / spelt
            forward = sum(w / total * (math.log(w / total) - logq[r, i, sid]) for sid, w in going.items())
            z = sum(math.exp(logq[r, i, sid]) for sid in going)
            reverse = sum(math.exp(logq[r, i, sid]) / z * (logq[r, i, sid] - math.log(z) - math.log(w / total))
                          for sid, w in going.items())
            expected += s * (forward if direction == "forward" else reverse) + (1 - s) * ce
            other += s * (reverse if direction == "forward" else forward) + (1 - s) * ce
    assert conditioned == round(stats["cross_inside_share"] * arrays["cross_counts"][:, 0].sum()) > 0
    assert got["teacher"] - got["none"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if teacher != "certain":  # the other direction's loop gives another number: the check can tell them apart
        assert got["teacher"] - got["none"] != pytest.approx(other, rel=1e-3)


@pytest.fixture(scope="module")
def small_teacher_root(tmp_path_factory, heldout_docs):
    """A teacher of the 4096-id tokenizer: the student of 8192 ids then has longer tokens than the
    teacher's (every one of its ids outside the first map's image, 4096 of them, has a head)."""
    root = tmp_path_factory.mktemp("cross-small-teacher")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in heldout_docs[:12]))
    result = run_cli("prepare", "--input", root / "corpus.jsonl", "--out", root / "tokens", "--tokenizer", SECOND,
                     "--seq-len", "32", "--rows-per-shard", "64", "--chunk-rows", "8")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher", vocab=4096, scale=8.0)
    for name, flags in (("topk", ["--kind", "topk", "--top-k", "8"]), ("sampled", ["--kind", "sampled", "--samples", "50"])):
        result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                         root / name, "--rows-per-shard", "16", "--chunk-rows", "8", "--max-rows", "16", *flags)
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("pair", ["longer", "every seventh"])
def test_grouped_longer_student_tokens_equal_a_loop(request, tmp_path, monkeypatch, kind, pair):
    """--cross-longer group (student_groups) with a 4096-id teacher and the 8192-id student, exact mode,
    --cross-uncovered teacher: the loss equals a float64 loop in which each student id outside the map's
    image adds its probability to its head's (the student id of the teacher's first token of its bytes)
    and has none of its own; at chunk starts the teacher's ids go through the first-token map; inside a
    teacher token its candidates going on give the student's first token of the rest, *then* its head
    where it has one. Without groups the loss differs (the longer tokens sit in the bucket). The 4096
    vocabulary's merges are a subset of the 8192's, so that pair has no student target inside a teacher
    token; the second case (``every seventh``: the 8192-id teacher's store and the 4096-id student, whose
    every id the map reaches, each seventh student id made a member of the next) is a partition of the
    student's ids the folding does not check, and has them (29% of the targets)."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    longer = pair == "longer"
    store = open_store(request.getfixturevalue("small_teacher_root" if longer else "root") / kind)
    rows = store.read_rows(0, ROWS)
    ids_field = "topk_ids" if kind == "topk" else "sample_ids"
    rows[ids_field][:, :-1, 0] = rows["input_ids"][:, 1:]  # the row's own token a candidate: inside targets exist
    teacher_tok, student_tok = (AutoTokenizer.from_pretrained(str(path)) for path in
                                ((SECOND, TOKENIZER) if longer else (TOKENIZER, SECOND)))
    teacher_side, student_side = token_bytes(teacher_tok), token_bytes(student_tok)
    vocab = len(student_side.pieces)
    mapping, _ = vocab_map(teacher_side, student_side, "first", student_tok)
    groups = student_groups(mapping, student_side, teacher_tok)
    if longer:
        assert (groups >= 0).sum() > 1000 and (groups[mapping[mapping >= 0]] == -1).all()
    else:
        assert (groups == -1).all()  # every student id is some teacher id's first token
        groups[np.arange(0, vocab - 1, 7)] = np.arange(1, vocab, 7)
    aligner = RowAligner(teacher_side, student_side, encoder(student_tok), 10_000, student_tok.eos_token_id,
                         positions="starts")
    arrays = aligner(rows)
    batch = tensors(arrays)
    model = tiny_model(tmp_path / "student.json", vocab)
    inside = InsideTargets(teacher_side.pieces, lambda pieces: first_tokens(student_tok, pieces))
    got = {}
    for name, grouping in (("group", groups), ("bucket", None)):
        signal = CrossTokenizer(stored_teacher(kind, store.params, 1.0), mapping, "exact", uncovered="teacher",
                                inside=inside, groups=grouping)
        _, got[name], _, grads = step_loss(model, vocab, signal, batch, 40)
        assert all(torch.isfinite(g).all() for g in grads.values()), name

    with torch.no_grad():
        q = F.softmax(model(input_ids=batch["input_ids"]).logits.double(), -1).numpy()
    members = np.nonzero(groups >= 0)[0]
    folded = q.copy()
    np.add.at(folded, (slice(None), slice(None), groups[members]), q[:, :, members])
    folded[:, :, members] = 0.0
    event = np.where(groups >= 0, groups, np.arange(len(groups)))  # a student id's event: its head or itself
    base = stored_teacher(kind, store.params, 1.0).positions(batch["teacher_input_ids"], batch)
    length = arrays["teacher_input_ids"].shape[1]
    ids = arrays["input_ids"]

    def divergence(r, i, p, rest):  # p: {student event: teacher mass}; rest: the teacher's mass elsewhere
        qb = {s: folded[r, i, s] for s in p}
        if kind == "topk":
            q_rest = 1 - sum(qb.values())
        else:  # drawn: the student's bucket is its ids outside the image that are no member (here, none)
            rest = 0.0
        out = sum(w * math.log(w / qb[s]) for s, w in p.items())
        return out + (rest * math.log(rest / q_rest) if rest > 0 else 0.0)

    expected, starts_seen, conditioned = 0.0, 0, 0
    for r in range(ROWS):
        for i in range(ids.shape[1] - 1):
            if not arrays["loss_mask"][r, i]:
                continue
            ce = -math.log(q[r, i, ids[r, i + 1]])
            j = arrays["cross_exact"][r, i]
            jj = j if j >= 0 else arrays["cross_inside"][r, i]
            if jj < 0:
                expected += ce
                continue
            flat = r * (length - 1) + jj
            candidates = base[0][flat].tolist()
            probs = (base[1][flat].double().exp() if kind == "topk" else base[1][flat].double()).tolist()
            if j >= 0:  # a chunk start: the first-token map, then the student's events
                starts_seen += 1
                p, rest = {}, (math.exp(float(base[2][flat])) if kind == "topk" else 0.0)
                for d, w in zip(candidates, probs):
                    if w <= 0:
                        continue
                    if mapping[d] >= 0:
                        p[int(event[mapping[d]])] = p.get(int(event[mapping[d]]), 0.0) + w
                    else:
                        rest += w
                expected += divergence(r, i, p, rest)
                continue
            k = int(arrays["cross_inside_offset"][r, i])
            prefix = teacher_side.pieces[arrays["teacher_input_ids"][r, jj + 1]][:k]
            spelt, going = conditioned_loop(teacher_side, student_tok, candidates, probs, prefix, event)
            total = sum(going.values())
            if total == 0:
                expected += ce
                continue
            conditioned += 1
            s = total / spelt
            expected += s * divergence(r, i, {sid: w / total for sid, w in going.items()}, 0.0) + (1 - s) * ce
    assert starts_seen > 50 and (longer or conditioned > 5)
    assert got["group"] == pytest.approx(expected, rel=1e-5)
    assert got["bucket"] != pytest.approx(got["group"], rel=1e-3)

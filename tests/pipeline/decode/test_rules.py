"""Rules (pipeline/decode/rules.py): each mask checked against brute force over the whole vocabulary,
sampling under masks on hand-made logits, every rule type holding on many completions of a tiny
teacher, unsatisfiable rule sets reported, bad rule files one line naming the rule."""

import functools
import json
from collections import Counter, defaultdict

import pytest
import regex
import torch

from pipeline.decode.generation import CausalLM, Sampling, choose, decode, record_keys
from pipeline.decode.rules import RuleState, Rules, count_words, decode_prefix, parse_rules, token_bytes, violations
from pipeline.errors import DistillError
from tests.conftest import TOKENIZER, make_teacher, one_line_error, run_cli


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrix products: a second thread only waits (see tests/stages/test_generate.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from pipeline.text.tokenizer import load_tokenizer

    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def pieces(tokenizer):
    return token_bytes(tokenizer)


def rules(tokenizer, budget=64, **spec):
    return Rules(parse_rules(spec, "test.yaml"), tokenizer, budget)


STATES = [b"", b"The Lord said unto Mo", b"and the Lo", b"he is L", b"don", b"don'", b"one two thre", b"caf\xc3",
          b"12, 4", b"a b c d"]


def test_token_bytes_spell_any_text(tokenizer, pieces, heldout_docs):
    for text in heldout_docs[:20]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(pieces[i] for i in ids) == text.encode()
    assert pieces[tokenizer.eos_token_id] == b""


def test_banned_mask_equals_brute_force_over_the_vocabulary(tokenizer, pieces):
    """A token is masked exactly when appending it completes a banned phrase, across BPE merges."""
    r = rules(tokenizer, banned=["Lord", "unto M", "é"])
    for text in STATES:
        allowed = r.allowed(RuleState(text=text))
        for i, piece in enumerate(pieces):
            if i == tokenizer.eos_token_id or not piece:
                continue
            # an occurrence that ends inside the new token (the text may hold earlier ones)
            completes = any(p in (text + piece)[max(0, len(text) - len(p) + 1):]
                            for p in (b"Lord", b"unto M", "é".encode()))
            assert bool(allowed[i]) == (not completes), (text, piece)
    lo = r.allowed(RuleState(text=b"and the L"))  # " L" + "ord" spells it without the token "Lord"
    assert not lo[pieces.index(b"ord")] and not lo[pieces.index(b"ords")] and lo[pieces.index(b"o")]


def test_charset_vocabulary_regex_and_words_equal_brute_force(tokenizer, pieces):
    cases = {
        "charset": (dict(charset="[a-z ',é]"), lambda s: regex.fullmatch(r"[a-z ',é]*", s) is not None),
        "regex": (dict(regex=r"(The|and|he|[0-9]{1,3})( [a-zA-Z]{1,4}| [0-9]{1,3},?)*"),
                  lambda s: regex.fullmatch(r"(The|and|he|[0-9]{1,3})( [a-zA-Z]{1,4}| [0-9]{1,3},?)*", s,
                                            partial=True) is not None),
        "vocabulary": (dict(vocabulary=["the", "Lord", "said", "unto", "Moses", "and", "don't", "one", "two", "three"]),
                       None),
        "max_words": (dict(max_words=4), lambda s: count_words(s) <= 4),
    }
    words = {"the", "Lord", "said", "unto", "Moses", "and", "don't", "one", "two", "three"}

    def vocabulary_ok(s):  # finished words allowed, the open last one the beginning of an allowed word
        for m in regex.finditer(r"\w+(?:'\w+)*", s):
            rest = s[m.end():]
            if rest == "":
                ok = any(w.startswith(m.group()) for w in words)
            elif rest == "'":
                ok = any(w.startswith(m.group() + "'") for w in words) or m.group() in words
            else:
                ok = m.group() in words
            if not ok:
                return False
        return True

    for name, (spec, ok) in cases.items():
        ok = ok or vocabulary_ok
        r = rules(tokenizer, **spec)
        for text in STATES:
            before = decode_prefix(text)
            if not ok(before) and name != "max_words":
                continue  # a state these rules would never have reached
            allowed = r.allowed(RuleState(text=text))
            for i, piece in enumerate(pieces):
                if i == tokenizer.eos_token_id or not piece:
                    continue
                after = decode_prefix(text + piece)
                expected = ok(after) and "\ufffd" not in after[len(before):] if name != "max_words" else ok(after)
                left_open = (text + piece)[len(after.encode()):]
                if name == "charset":  # and a character left open must be able to become "é" (c3 a9)
                    expected = expected and left_open in (b"", b"\xc3")
                if name == "regex":  # an ASCII-only pattern: no part of another character at all
                    expected = expected and not left_open
                if name == "vocabulary" and expected and left_open:  # some character it can become must fit
                    if left_open[0] >= 0xF0:
                        continue  # 4-byte characters: up to 2¹⁸ each, too many to try here
                    expected = any(ok(after + c) for c in chars_beginning_with()[left_open])
                assert bool(allowed[i]) == expected, (name, text, piece)


@functools.lru_cache(maxsize=None)
def chars_beginning_with() -> dict[bytes, list[str]]:
    """Every non-ASCII character of the Basic Multilingual Plane under each proper prefix of its UTF-8."""
    table = defaultdict(list)
    for code in range(0x80, 0x10000):
        if not 0xD800 <= code < 0xE000:
            encoded = chr(code).encode()
            for k in range(1, len(encoded)):
                table[encoded[:k]].append(chr(code))
    return table


def test_last_token_and_eos_leave_a_finished_completion(tokenizer, pieces):
    r = rules(tokenizer, budget=3, regex=r"[0-9]{1,4}(, [0-9]{1,4})*\.", max_words=2)
    state = RuleState(text=b"12, 3", n_tokens=2)  # one token left: it must end the match
    allowed = r.allowed(state)
    assert not allowed[tokenizer.eos_token_id] and allowed.any()
    for i in allowed.nonzero().flatten().tolist():
        assert regex.fullmatch(r"[0-9]{1,4}(, [0-9]{1,4})*\.", (state.text + pieces[i]).decode())
    assert r.allowed(RuleState(text=b"12, 3.", n_tokens=2))[tokenizer.eos_token_id]


def test_required_phrase_is_forced_when_the_budget_runs_out(tokenizer, pieces):
    r = rules(tokenizer, budget=10, required=["the end"], banned=["xyz"])
    state = RuleState(text=b" once upon", n_tokens=3)
    assert not r.allowed(state)[tokenizer.eos_token_id]  # the phrase is missing: no stopping
    assert r.allowed(state).sum() > 1000  # plenty of budget left: nothing forced yet
    state.n_tokens = 8
    while b"the end" not in state.text:
        allowed = r.allowed(state)
        assert allowed.sum() == 1
        token = int(allowed.nonzero())
        state.append(token, pieces[token])
    assert state.text == b" once upon the end" and state.n_tokens == 10
    assert r.allowed(RuleState(text=state.text, n_tokens=9))[tokenizer.eos_token_id]


STRADDLE_PROMPT = "The climb grows steep "  # ends in a space: " and" may begin in the prompt


def test_a_banned_phrase_straddling_the_prompt_counts():
    """banned: [" and"], a prompt ending in a space and a completion beginning "and difficulty": the
    record's text (prompt + completion, what prepare reads) holds " and", so it is a violation; one
    wholly inside the prompt is not the completion's doing."""
    spec = parse_rules({"banned": [" and"]}, "test.yaml")
    assert violations(spec, "and difficulty rises.", 4, STRADDLE_PROMPT) == ["banned: ' and' appears"]
    assert violations(spec, "and difficulty rises.", 4) == []  # the completion alone does not hold it
    assert violations(spec, "nd so on", 3, "steep a") == ["banned: ' and' appears"]  # " a" + "nd"
    assert violations(spec, "difficulty rises.", 3, "steep and ") == []
    assert violations(spec, "difficulty and ease.", 4, STRADDLE_PROMPT) == ["banned: ' and' appears"]


def test_banned_mask_after_a_prompt_equals_brute_force(tokenizer, pieces):
    """After a prompt, a token is masked exactly when prompt + completion + token holds a banned
    phrase ending inside the token: "and" right after a prompt ending in a space is masked."""
    r = rules(tokenizer, banned=[" and", "Lord"])
    for prompt in (STRADDLE_PROMPT, "steep a", "and the Lo", "L", ""):
        for text in (b"", b" ", b"a", b"Lo"):
            state = r.state(prompt)
            state.text = text
            allowed = r.allowed(state)
            seen = prompt.encode() + text
            for i, piece in enumerate(pieces):
                if i == tokenizer.eos_token_id or not piece:
                    continue
                completes = any(p in (seen + piece)[max(0, len(seen) - len(p) + 1):] for p in (b" and", b"Lord"))
                assert bool(allowed[i]) == (not completes), (prompt, text, piece)
    after_space = r.allowed(r.state(STRADDLE_PROMPT))
    assert not after_space[pieces.index(b"and")] and after_space[pieces.index(b"the")]
    assert r.allowed(r.state("steep"))[pieces.index(b"and")]  # no space before: "steepand" is allowed


class WantsAnd:
    """A decoder stand-in (``CausalLM``'s call) that would write "and difficulty" after any prompt:
    "and" first, " difficulty" next, "the" as the runner-up."""

    def __init__(self, pieces):
        self.device = torch.device("cpu")
        self.order = [pieces.index(p) for p in (b"and", b" difficulty", b"the")]
        self.vocab = len(pieces)

    def __call__(self, input_ids, attention_mask, position_ids, cache=None):
        logits = torch.zeros(input_ids.shape[0], self.vocab)
        step = 0 if cache is None else cache
        logits[:, self.order[min(step, 1)]] = 10.0
        logits[:, self.order[2]] = 5.0
        return logits, step + 1


def test_decoding_after_a_prompt_ending_in_a_space_never_writes_the_banned_phrase(tokenizer, pieces):
    """The stage's record loop with a teacher that writes "and difficulty": without the prompt the
    completion alone looks clean (what was enforced before), with it "and" is masked at the first
    step, the record's text holds no " and" and its violations are none."""
    from types import SimpleNamespace

    from stages.generate import generate_records

    r = rules(tokenizer, budget=2, banned=[" and"])
    prompt_ids = [[tokenizer.eos_token_id] + tokenizer(STRADDLE_PROMPT)["input_ids"]]
    keys = torch.zeros(1, dtype=torch.int64)
    alone = decode(WantsAnd(pieces), prompt_ids, keys, Sampling(0.0, 0, 1.0), 2, tokenizer.eos_token_id, r)
    assert tokenizer.decode(alone[0].tokens) == "and difficulty"  # the case: prompt + it holds " and"
    config = SimpleNamespace(samples_per_prompt=1, temperature=0.0, top_k=0, top_p=1.0, seed=0, batch_size=1,
                             max_attempts=1, text="prompt+completion")
    job = SimpleNamespace(config=config, lm=WantsAnd(pieces), prompts=[STRADDLE_PROMPT], prompt_ids=prompt_ids,
                          tokenizer=tokenizer, rules=r, budget=2, params={"teacher": "stand-in", "settings": {}})
    [record] = generate_records(job, [0], SimpleNamespace(update=lambda n: None))
    assert record["completion"] == "the difficulty" and record["text"] == STRADDLE_PROMPT + "the difficulty"
    assert " and" not in record["text"] and "violations" not in record


def test_sampling_under_a_mask_on_hand_made_logits(tokenizer, pieces):
    """Logits that put almost all mass on the tokens completing a banned phrase: they are never
    drawn, and the rest are drawn in proportion to the teacher's probabilities."""
    r = rules(tokenizer, banned=["Lord"])
    rd, ng, e = (pieces.index(t) for t in (b"ord", b"ng", b"e"))
    logits = torch.full((1, len(pieces)), -30.0)
    logits[0, rd], logits[0, ng], logits[0, e] = 10.0, 1.0, 0.0
    allowed = r.allowed(RuleState(text=b"and the L"))
    masked = logits.masked_fill(~allowed, float("-inf"))
    u = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000  # an even grid: frequencies exact to 1/4000
    drawn = torch.cat([choose(masked.expand(500, -1), u[k:k + 500], Sampling(1.0, 0, 1.0)) for k in range(0, 4000, 500)])
    counts = Counter(drawn.tolist())
    assert rd not in counts and set(counts) == {ng, e}
    assert abs(counts[ng] / 4000 - 0.7311) < 1e-3  # e / (1 + e), the unmasked tokens renormalised


def test_choose_greedy_top_k_top_p_and_frequencies():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 2.0 - 1e-3]])
    u = torch.linspace(0.001, 0.999, 4000, dtype=torch.float64)
    many = logits.expand(4000, -1)
    assert choose(many, u, Sampling(0.0, 0, 1.0)).unique().tolist() == [1]
    assert choose(many, u, Sampling(1.0, 1, 1.0)).unique().tolist() == [1]
    assert choose(many, u, Sampling(1.0, 0, 0.3)).unique().tolist() == [1]  # p(1) = 0.392 reaches 0.3 alone
    assert sorted(choose(many, u, Sampling(1.0, 2, 1.0)).unique().tolist()) == [1, 4]
    # a grid of uniforms through the inverse CDF reproduces the probabilities at T = 2 to 1/4000
    counts = torch.bincount(choose(many, u, Sampling(2.0, 0, 1.0)), minlength=5).double() / 4000
    assert torch.allclose(counts, torch.softmax(logits[0].double() / 2, -1), atol=1e-3)
    # top-p 0.8 keeps 1 and 4 (0.392 each) and 2 (mass before it 0.783 < 0.8), renormalised
    probs = torch.softmax(logits[0].double(), -1)
    kept = torch.zeros(5, dtype=torch.float64)
    kept[[1, 4, 2]] = probs[[1, 4, 2]]
    counts = torch.bincount(choose(many, u, Sampling(1.0, 0, 0.8)), minlength=5).double() / 4000
    assert torch.allclose(counts, kept / kept.sum(), atol=1e-3)


@pytest.mark.parametrize("spec, message", [
    (dict(required=["a long required phrase that does not fit"], max_tokens=3), "unsatisfiable: the required phrases take"),
    (dict(required=["the Lord God"], banned=["Lord"]), "unsatisfiable: required 'the Lord God' contains banned 'Lord'"),
    (dict(required=["Amen"], charset="[a-z ]"), "outside 'charset'"),
    (dict(required=["one two three"], max_words=2), "hold 3 words, more than max_words 2"),
    (dict(regex="[0-9]+", charset="[a-z ]"), "no token can begin a completion"),
    (dict(charset="\u2603"), "rule 'charset' allows none of the tokenizer's tokens"),
])
def test_unsatisfiable_rule_sets_are_reported(tokenizer, spec, message):
    with pytest.raises(DistillError, match=regex.escape(message)):
        rules(tokenizer, budget=20, **spec)


def test_the_shipped_rule_file_uses_every_rule_and_the_reference_shows_it(tokenizer):
    import yaml

    from pipeline.decode.rules import RULES, load_rules
    from tests.conftest import ROOT

    spec = load_rules(ROOT / "data" / "rules" / "example.yaml")
    assert spec.given() == list(RULES)
    page = (ROOT / "docs" / "reference" / "generate.md").read_text()
    shown = page.split("\n## Rules\n")[1].split("```yaml\n")[1].split("```")[0]
    assert parse_rules(yaml.safe_load(shown)).sha256 == spec.sha256
    assert Rules(spec, tokenizer, 64).budget == 40  # satisfiable as far as compiling can tell


BAD_RULES = [
    ("bannned: [x]\n", "unknown rule 'bannned' (did you mean 'banned'?)"),
    ("regex: '([a-z'\n", "rule 'regex' is not a valid regular expression"),
    ("charset: ''\n", "rule 'charset' is an empty allowed set"),
    ("vocabulary: []\n", "rule 'vocabulary' is an empty allowed set"),
    ("vocabulary: [two words]\n", "rule 'vocabulary' entry 'two words' is not one word"),
    ("max_tokens: 0\n", "rule 'max_tokens' must be a positive integer"),
    ("max_words: many\n", "rule 'max_words' must be a positive integer"),
    ("banned: [3]\n", "rule 'banned' must be a list of strings"),
    ("required: ['']\n", "rule 'required' holds an empty string"),
    ("- banned\n", "not a mapping"),
    ("", "holds no rules"),
    ("banned: [x\n", "does not parse as YAML"),
    ("required: ['a b c d e f g h i j']\nmax_tokens: 2\n", "unsatisfiable"),
]


@pytest.mark.parametrize("text, message", BAD_RULES)
def test_bad_rule_files_are_one_line_errors_naming_the_rule(tmp_path, text, message):
    (tmp_path / "rules.yaml").write_text(text)
    line = one_line_error(run_cli("generate", "--unconditional", "2", "--tokenizer", TOKENIZER, "--teacher",
                                  "data/models/teacher", "--rules", tmp_path / "rules.yaml", "--out", tmp_path / "out"))
    assert message in line and "rules.yaml" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ rules hold on a tiny teacher


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_teacher(tmp_path_factory.mktemp("teacher") / "model")
    return CausalLM(AutoModelForCausalLM.from_pretrained(str(path)).eval(), 8192)


PROMPTS = ["The Lord said", "A hacker is", "In the beginning", "Once upon a time", "Verse 3.", "He said"]


def complete(lm, tokenizer, spec, n=24, budget=16, seed=0):
    """``n`` completions (4 per prompt) under ``spec`` (None: no rules): (token ids, text, finish) each."""
    r = Rules(parse_rules(spec, "test.yaml"), tokenizer, budget) if spec else None
    prompts = [[0] + tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(n)]
    keys = record_keys(seed, torch.arange(n), torch.zeros(n), torch.zeros(n))
    out = decode(lm, prompts, keys, Sampling(1.0, 0, 1.0), r.budget if r else budget, 0, r)
    return [(d.tokens, tokenizer.decode(d.tokens), d.finish) for d in out]


def test_banned_phrases_never_appear(lm, tokenizer):
    free = complete(lm, tokenizer, None)
    common = Counter(t for tokens, _, _ in free for t in tokens).most_common(2)
    banned = [tokenizer.decode([t]).strip() or tokenizer.decode([t]) for t, _ in common]
    assert sum(any(b in text for b in banned) for _, text, _ in free) >= 6  # the teacher's favourites
    held = complete(lm, tokenizer, {"banned": banned})
    for tokens, text, finish in held:
        assert not any(b in text for b in banned) and finish != "dead-end"
        assert not set(t for t, _ in common) & set(tokens)


def test_regex_charset_vocabulary_and_lengths_hold(lm, tokenizer):
    specs = {
        "regex": {"regex": r"[0-9]{1,3}(, [0-9]{1,3}){1,4}\."},
        "charset": {"charset": "[a-z ]"},
        "vocabulary": {"vocabulary": ["the", "lord", "said", "unto", "him", "and", "he", "was", "a", "of", "in", "to",
                                      "it", "is", "that", "god", "man", "his", "not", "be"]},
        "lengths": {"max_tokens": 5, "max_words": 3},
        "required": {"required": ["amen"], "max_tokens": 8},
    }
    for name, spec in specs.items():
        got = complete(lm, tokenizer, spec)
        parsed = parse_rules(spec, name)
        for tokens, text, finish in got:
            assert finish != "dead-end" and violations(parsed, text, len(tokens)) == [], (name, text)
        if name == "regex":
            assert all(regex.fullmatch(r"[0-9]{1,3}(, [0-9]{1,3}){1,4}\.", text) for _, text, _ in got)
        if name == "charset":
            assert set("".join(text for _, text, _ in got)) <= set("abcdefghijklmnopqrstuvwxyz ")
        if name == "lengths":
            assert all(len(tokens) <= 5 and count_words(text) <= 3 for tokens, text, _ in got)
        if name == "required":
            assert all("amen" in text and len(tokens) <= 8 for tokens, text, _ in got)
        assert len({text for _, text, _ in got}) > 12  # still drawn, not one forced string


def test_generate_with_rules_and_an_unsatisfiable_record(lm, tokenizer, tmp_path):
    """Through the command: records carry their attempts and the rules' hash; rules no completion
    can meet within the budget (40 digits in 3 tokens) are reported per record, not looped on."""
    teacher = make_teacher(tmp_path / "teacher")
    (tmp_path / "ok.yaml").write_text("charset: '[a-z ]'\nmax_words: 4\n")
    (tmp_path / "never.yaml").write_text("regex: '[0-9]{40}'\nmax_tokens: 3\n")
    common = ("generate", "--teacher", teacher, "--tokenizer", TOKENIZER, "--unconditional", "6", "--max-new-tokens", "12")
    assert run_cli(*common, "--rules", tmp_path / "ok.yaml", "--out", tmp_path / "ok").exit_code == 0
    got = [json.loads(line) for line in (tmp_path / "ok" / "generated.jsonl").read_text().splitlines()]
    assert len(got) == 6 and all(r["attempts"] >= 1 and "unsatisfiable" not in r for r in got)
    assert all(set(r["completion"]) <= set("abcdefghijklmnopqrstuvwxyz ") and count_words(r["completion"]) <= 4
               for r in got)
    assert got[0]["settings"]["rules_sha256"] == parse_rules({"charset": "[a-z ]", "max_words": 4}).sha256
    result = run_cli(*common, "--rules", tmp_path / "never.yaml", "--max-attempts", "3", "--out", tmp_path / "never")
    assert result.exit_code == 0, result.output
    assert "6 unsatisfiable under the rules" in result.output
    assert (tmp_path / "never" / "generated.jsonl").read_text() == ""
    summary = json.loads((tmp_path / "never" / "summary.json").read_text())
    assert [u["id"] for u in summary["unsatisfiable"]] == list(range(6))
    assert all(u["violations"][0].startswith("dead end") for u in summary["unsatisfiable"])
    part = (tmp_path / "never" / "parts" / "job-00000-of-00001.part-00000").read_text().splitlines()
    assert all(json.loads(line)["attempts"] == 3 for line in part)


def test_eval_reports_qa_answers_with_and_without_the_rules(tmp_path):
    """``distill eval --rules``: every enforced answer keeps the rules (or is counted unsatisfiable),
    and the free answers' violations are reported per rule."""
    import shutil

    model = make_teacher(tmp_path / "model", scale=8.0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, model / name)
    (tmp_path / "rules.yaml").write_text("charset: '[a-z ]'\nmax_words: 2\nbanned: [e]\n")
    fixtures = TOKENIZER.parents[1] / "tests" / "fixtures" / "eval"
    result = run_cli("eval", "--model", model, "--out", tmp_path / "eval.json", "--tasks", "nq", "--nq",
                     fixtures / "nq_open.jsonl", "--limit", "8", "--max-new-tokens", "8", "--rules", tmp_path / "rules.yaml")
    assert result.exit_code == 0, result.output
    nq = json.loads((tmp_path / "eval.json").read_text())["tasks"]["nq"]
    assert nq["rules_violating_0shot"] == nq["rules_unsatisfiable_0shot"] == 0.0
    assert 0 <= nq["rules_em_0shot"] <= 1 and nq["violating_0shot"] > 0
    assert {"violating_0shot_charset", "violating_0shot_max_words", "violating_0shot_banned"} <= set(nq)
    assert nq["violating_0shot"] >= max(nq[f"violating_0shot_{r}"] for r in ("charset", "max_words", "banned"))
    line = one_line_error(run_cli("eval", "--model", model, "--out", tmp_path / "bad.json", "--tasks", "nq", "--nq",
                                  fixtures / "nq_open.jsonl", "--rules", tmp_path / "missing.yaml"))
    assert "rule file" in line and not (tmp_path / "bad.json").exists()


def test_a_pattern_that_backtracks_exponentially_is_one_line_not_a_stall(tokenizer, monkeypatch):
    """A shared rule file's "(a|aa)+b" on a run of a's takes exponential time in a backtracking engine:
    each match is bounded (MATCH_SECONDS), and so is a decoding step's whole walk of the vocabulary."""
    import time

    from pipeline.decode import rules as rules_module

    monkeypatch.setattr(rules_module, "MATCH_SECONDS", 0.2)
    r = rules(tokenizer, regex="(a|aa)+b")
    started = time.monotonic()
    with pytest.raises(DistillError, match=r"regex '\(a\|aa\)\+b' took over 0.2 s to match \d+ characters; "
                                           "nested repetition") as e:
        r.allowed(RuleState(text=b"a" * 40))
    assert "\n" not in str(e.value) and time.monotonic() - started < 30
    with pytest.raises(DistillError, match="took over 0.2 s"):
        violations(parse_rules({"regex": "(a|aa)+b"}, "test.yaml"), "a" * 40, 40)
    # a walk of many matches each under the bound still stops: at the step's deadline
    monkeypatch.setattr(rules_module, "MATCH_SECONDS", 5.0)
    monkeypatch.setattr(rules_module, "STEP_SECONDS", 0.3)
    slow = rules(tokenizer, regex="(a|aa)+b")
    with pytest.raises(DistillError, match="took over 0.3 s to choose one token"):
        slow.allowed(RuleState(text=b"a" * 30))
    assert r.allowed(RuleState(text=b"a" * 3)).any()  # short runs still match in time: the rules still work

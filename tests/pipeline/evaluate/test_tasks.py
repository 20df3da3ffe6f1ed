"""Task readers in the real formats, scoring rules with hand-computed answers, malformed files."""

import random
from pathlib import Path

import pytest

from pipeline.errors import DistillError
from pipeline.evaluate import tasks
from stages.eval import choice_metrics, draw_shots, lm_eval_shots

FIXTURES = Path(__file__).parents[2] / "fixtures" / "eval"
QA = FIXTURES / "qa"


@pytest.mark.parametrize("text, normalized", [
    ("The Beatles", "beatles"),
    ("  Paris! ", "paris"),
    ("an apple a day", "apple day"),
    ("14 December, 1972", "14 december 1972"),
    ("A.B.C.", "abc"),
    ("Padmé   Amidala", "padmé amidala"),
    ("the", ""),
    ("Theresa", "theresa"),  # articles are whole words only
])
def test_normalize_answer(text, normalized):
    assert tasks.normalize_answer(text) == normalized


def test_exact_match_against_any_alias():
    gpt3 = tasks.qa_definition("gpt3", "triviaqa")
    aliases = tasks.qa(FIXTURES / "triviaqa.jsonl")[0].answers
    assert gpt3.exact_match("the Sunset Blvd.", aliases)
    assert gpt3.exact_match("SUNSET BOULEVARD", aliases)
    assert not gpt3.exact_match("Sunset", aliases)
    assert gpt3.answer(" Paris\nQ: what is") == "Paris"


def test_choice_metrics_acc_and_acc_norm_differ():
    # totals: -10 > -12, so acc picks ending 0; per character: -10/2 = -5 < -12/8 = -1.5, so acc_norm picks 1
    assert choice_metrics([-10.0, -12.0], ("ab", "abcdefgh"), 1) == (False, True)
    assert choice_metrics([-10.0, -12.0], ("ab", "abcdefgh"), 0) == (True, False)


def test_lambada_reader_splits_at_the_last_space():
    items = tasks.lambada(FIXTURES / "lambada.jsonl")
    assert len(items) == 3  # the blank line is skipped
    assert items[1].context.endswith("was full of") and items[1].target == " tulips"


def test_hellaswag_reader_follows_lm_eval_preprocessing():
    first, wikihow = tasks.hellaswag(FIXTURES / "hellaswag.jsonl")
    assert first.context.startswith("Removing ice from car: Then, the man") and first.context.endswith("smiles. Then")
    assert first.label == 3 and len(first.endings) == 4
    assert wikihow.context == "Home and Garden: How to clean a rug. Vacuum the rug."
    assert wikihow.endings[0] == " Use a stiff brush." and wikihow.endings[2] == " Shake it outside."  # no space before [title]


def test_storycloze_reader():
    items = tasks.storycloze(FIXTURES / "storycloze.jsonl")
    assert items[0].context.startswith("Rick grew up") and items[0].context.endswith("turn a new leaf.")
    assert items[0].endings == ("He is happy now.", "He joined a gang.")
    assert [it.label for it in items] == [0, 0]  # AnswerRightEnding 1 (int or string) is the first ending


def test_qa_readers_take_every_format():
    nq = tasks.qa(FIXTURES / "nq_open.jsonl")
    webq = tasks.qa(FIXTURES / "webq.jsonl")
    trivia = tasks.qa(FIXTURES / "triviaqa.jsonl")
    assert nq[0].answers == ("14 December 1972 UTC", "December 1972")
    assert webq[1].answers == ("Padmé Amidala",)
    assert trivia[0].answers[0] == "Sunset Boulevard" and "sunset blvd" in trivia[0].answers


def test_qa_prompt_and_shots():
    item = tasks.qa(FIXTURES / "nq_open.jsonl")[2]
    pool = tasks.qa(FIXTURES / "nq_open_train.jsonl")
    gpt3 = tasks.qa_definition("gpt3", "nq")
    assert gpt3.prompt(item.question) == "Q: how many episodes are in season 2 of the handmaid's tale\nA:"
    shots = draw_shots(pool, 1, 0, 2, item.question)
    prompt = gpt3.prompt(item.question, shots)
    assert prompt == f"Q: {shots[0].question}\nA: {shots[0].answers[0]}\n\n" + gpt3.prompt(item.question)
    assert draw_shots(pool, 2, 0, 2, item.question) == draw_shots(pool, 2, 0, 2, item.question)
    with pytest.raises(DistillError, match="3-shot prompts need 3 examples"):
        draw_shots(pool, 3, 0, 0, pool[0].question)  # the question itself is never its own example


# lm-eval's QA definitions; the literal prompts below are copied from `lm_eval --log_samples` (0.4.13,
# data/lm_eval/distill_*.yaml, --num_fewshot 0 and 5, fewshot seed 1234) on the fixture files

NQ_5SHOT = [
    "Answer these questions:\n\nQ: what metal is liquid at room temperature?\nA: mercury\n"
    "Q: what is the boiling point of water in celsius?\nA: 100\nQ: what is the capital of france?\nA: Paris\n"
    "Q: how many sides does a triangle have?\nA: three\nQ: who wrote the book of revelation?\nA: John\n"
    "Q: who is my shepherd in psalm 23?\nA:",
    "Answer these questions:\n\nQ: how many sides does a triangle have?\nA: three\n"
    "Q: what is the boiling point of water in celsius?\nA: 100\nQ: who composed the moonlight sonata?\n"
    "A: Ludwig van Beethoven\nQ: what is the capital of japan?\nA: Tokyo\nQ: what is the capital of france?\n"
    "A: Paris\nQ: who built the ark in the book of genesis?\nA:",
]
TRIVIAQA_5SHOT_FIRST = (
    "Question: What metal is liquid at room temperature??\nAnswer: mercury\n\n"
    "Question: What is the boiling point of water in celsius??\nAnswer: 100\n\n"
    "Question: What is the capital of france??\nAnswer: Paris\n\n"
    "Question: How many sides does a triangle have??\nAnswer: three\n\n"
    "Question: Who wrote the book of revelation??\nAnswer: John\n\n"
    "Question: Who is my shepherd in psalm 23??\nAnswer:")


def lm_eval_prompts(task, file, shots_file, k, n):
    definition = tasks.qa_definition("lm-eval", task)
    items = tasks.qa(QA / file, definition)[:n]
    shots = lm_eval_shots(tasks.qa(QA / shots_file, definition), items, k, 1234, definition.exclude_item)
    return [definition.prompt(it.question, s) for it, s in zip(items, shots)]


def test_lm_eval_zero_shot_prompts_are_lm_evals():
    assert lm_eval_prompts("nq", "nq_open_validation.jsonl", "nq_open_train.jsonl", 0, 2) == [
        "Answer these questions:\n\nQ: who is my shepherd in psalm 23?\nA:",
        "Answer these questions:\n\nQ: who built the ark in the book of genesis?\nA:"]
    assert lm_eval_prompts("triviaqa", "triviaqa_validation.jsonl", "triviaqa_train.jsonl", 0, 1) == [
        "Question: Who is my shepherd in psalm 23??\nAnswer:"]  # lm-eval appends "?" to a question that has one
    assert lm_eval_prompts("webq", "webqs_test.jsonl", "webqs_train.jsonl", 0, 1) == [
        "Question: who is my shepherd in psalm 23?\nAnswer:"]


def test_lm_eval_few_shot_prompts_and_shots_are_lm_evals():
    """Same shots in the same order (one random.Random(1234) per task, item after item), same
    delimiters: nq_open one newline between examples, triviaqa the default blank line."""
    assert lm_eval_prompts("nq", "nq_open_validation.jsonl", "nq_open_train.jsonl", 5, 2) == NQ_5SHOT
    assert lm_eval_prompts("triviaqa", "triviaqa_validation.jsonl", "triviaqa_train.jsonl", 5, 1) == [
        TRIVIAQA_5SHOT_FIRST]


def test_lm_eval_sampler_draws_one_extra_and_drops_the_item_itself():
    pool = [tasks.QA(f"q{i}", (f"a{i}",), {"question": f"q{i}", "answer": [f"a{i}"]}) for i in range(4)]
    item = tasks.QA("q2", ("a2",), dict(pool[2].doc))  # equal to a pool row: never its own example
    for shots in lm_eval_shots(pool, [item] * 20, 3, 7, exclude_item=True):
        assert sorted(s.question for s in shots) == ["q0", "q1", "q3"]
    rnd = random.Random(7)  # without exclusion: plain sample(pool, k), the generator shared by the items
    expected = [[pool[j] for j in rnd.sample(range(4), 2)] for _ in range(3)]
    assert lm_eval_shots(pool, [item] * 3, 2, 7, exclude_item=False) == expected
    assert lm_eval_shots(pool, [item] * 3, 0, 7, exclude_item=True) == [[], [], []]
    with pytest.raises(DistillError, match="5-shot prompts draw 6 examples at a time; the shots file has 4"):
        lm_eval_shots(pool, [item], 5, 7, exclude_item=True)


@pytest.mark.parametrize("qa_format, task, generated, answer", [
    ("lm-eval", "nq", " Paris, France.\nQ: next", "Paris"),  # until "\n", ".", ",", then stripped
    ("lm-eval", "triviaqa", " 3.5 million\n", "3"),
    ("lm-eval", "nq", "\n Paris", ""),
    ("gpt3", "nq", " Paris, France.\nQ: next", "Paris, France."),  # a newline only
])
def test_answers_end_at_the_stop_sequences(qa_format, task, generated, answer):
    assert tasks.qa_definition(qa_format, task).answer(generated) == answer


@pytest.mark.parametrize("text, normalized", [
    ("The Beatles", "beatles"),
    ("the beatles", "beatles"),
    ("THE Beatles", "the beatles"),  # the regex is case-sensitive and runs before lower-casing
    ("a cat, an owl", "cat owl"),
    ("Santa Fe", "santa fe"),  # articles only at a word's start
    ("A.B.C.", "abc"),
    ("Bob  Russell", "bob  russell"),  # spaces are kept
])
def test_lm_eval_nq_normalisation(text, normalized):
    assert tasks.lm_eval_nq_normalize(text) == normalized


def test_lm_eval_exact_match_per_task():
    nq, trivia = tasks.qa_definition("lm-eval", "nq"), tasks.qa_definition("lm-eval", "triviaqa")
    assert nq.exact_match("Lord", ("The Lord",)) and nq.exact_match("the LORD!", ("Lord",))
    assert trivia.exact_match("the LORD!", ("The Lord",)) and not trivia.exact_match("Lord", ("The Lord",))
    assert not nq.exact_match("Bob Russell", ("Bob  Russell",))
    assert tasks.qa_definition("gpt3", "nq").exact_match("Bob Russell", ("Bob  Russell",))


def test_lm_eval_golds_per_task(tmp_path):
    trivia = tasks.qa(FIXTURES / "triviaqa.jsonl", tasks.qa_definition("lm-eval", "triviaqa"))
    assert trivia[0].answers == ("Sunset Blvd", "Sunset Boulevard", "Sunset Bulevard")  # aliases only, in order
    path = tmp_path / "webq.jsonl"
    path.write_text('{"question": "q?", "answers": ["Jaxon Bieber", "Jazmyn Bieber", "Jaxon", "Bieber"]}\n')
    assert tasks.qa(path, tasks.qa_definition("lm-eval", "webq"))[0].answers == ("Bieber", "Jaxon", "Jazmyn Bieber")
    path.write_text('{"question": "q?", "answer": {"value": "x"}}\n')
    with pytest.raises(DistillError, match=r":1: field 'answer' has no 'aliases'"):
        tasks.qa(path, tasks.qa_definition("lm-eval", "triviaqa"))
    path.write_text('{"question": "q?", "answer": []}\n')
    with pytest.raises(DistillError, match=r":1: field 'answer' should be a non-empty list of answer strings"):
        tasks.qa(path, tasks.qa_definition("lm-eval", "nq"))


def test_every_format_defines_every_qa_task():
    from stages.eval import QA_TASKS

    for qa_format in tasks.QA_FORMATS:
        for task in QA_TASKS:
            assert tasks.qa_definition(qa_format, task).name


def test_rolling_windows_score_every_token_once_with_the_context_that_fits():
    tokens = list(range(1, 22))
    sequence = [0] + tokens  # the prefix (EOS) then the document
    windows = tasks.rolling_windows(tokens, prefix=0, max_len=8)
    assert sum((t for _, t in windows), []) == tokens
    for inputs, targets in windows:
        assert len(inputs) <= 8
        end = sequence.index(targets[-1])
        assert inputs == sequence[end - len(inputs):end]  # the input is the context right before
        assert (inputs[1:] + [targets[-1]])[-len(targets):] == targets
    assert tasks.rolling_windows([5, 6], prefix=0, max_len=8) == [([0, 5], [5, 6])]


@pytest.mark.parametrize("content, reader, message", [
    ('{"text": "a b"}\n{"text": "c d"\n', tasks.lambada, ":2: not valid JSON"),
    ('{"txt": "a b"}\n', tasks.lambada, ":1: missing field 'text'"),
    ("\n\n", tasks.lambada, "empty task file"),
    ('{"ctx": "x", "endings": ["a", "b"], "label": 2}\n', tasks.hellaswag, ":1: field 'label' = 2 is out of range"),
    ('{"ctx": "x", "endings": "a", "label": 0}\n', tasks.hellaswag, ":1: field 'endings' should be list"),
    ('{"question": "q"}\n', tasks.qa, ":1: missing field 'answers'"),
    ('{"InputSentence1": "a", "InputSentence2": "b", "InputSentence3": "c", "InputSentence4": "d", '
     '"RandomFifthSentenceQuiz1": "e", "RandomFifthSentenceQuiz2": "f", "AnswerRightEnding": 3}\n',
     tasks.storycloze, ":1: field 'AnswerRightEnding' = 3 is out of range"),
])
def test_malformed_files_name_file_and_line(tmp_path, content, reader, message):
    path = tmp_path / "task.jsonl"
    path.write_text(content)
    with pytest.raises(DistillError, match=message) as info:
        reader(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_task_file_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "lambada.jsonl"
    path.write_bytes(b'{"text": "a b"}\n{"text": "c \xff d"}\n')
    with pytest.raises(DistillError, match=r"not UTF-8 at byte 28 \(line 2\); convert the file to UTF-8"):
        tasks.lambada(path)

"""Task readers in the real formats, scoring rules with hand-computed answers, malformed files."""

from pathlib import Path

import pytest

from pipeline import tasks
from pipeline.errors import DistillError
from stages.eval import choice_metrics, draw_shots

FIXTURES = Path(__file__).parents[1] / "fixtures" / "eval"


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
    aliases = tasks.qa(FIXTURES / "triviaqa.jsonl")[0].answers
    assert tasks.exact_match("the Sunset Blvd.", aliases)
    assert tasks.exact_match("SUNSET BOULEVARD", aliases)
    assert not tasks.exact_match("Sunset", aliases)
    assert tasks.first_line(" Paris\nQ: what is") == "Paris"


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
    assert tasks.qa_prompt(item, []) == "Q: how many episodes are in season 2 of the handmaid's tale\nA:"
    shots = draw_shots(pool, 1, 0, 2, item.question)
    prompt = tasks.qa_prompt(item, shots)
    assert prompt == f"Q: {shots[0].question}\nA: {shots[0].answers[0]}\n\n" + tasks.qa_prompt(item, [])
    assert draw_shots(pool, 2, 0, 2, item.question) == draw_shots(pool, 2, 0, 2, item.question)
    with pytest.raises(DistillError, match="3-shot prompts need 3 examples"):
        draw_shots(pool, 3, 0, 0, pool[0].question)  # the question itself is never its own example


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

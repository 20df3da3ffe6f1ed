"""Evaluation task files in their usual public formats, and the scoring rules the paper uses.

Each reader turns a JSONL file into plain items and reports a malformed file as
``path:line: what is wrong`` (one line, non-zero exit through :class:`DistillError`). The prompt
and scoring conventions follow GPT-3 (Brown et al., 2020) as lm-evaluation-harness implements
them, so a model scored here and there gets the same numbers:

* LAMBADA: context = the text up to its last space, target = `` `` + last word; accuracy = the
  whole target is the greedy continuation, perplexity = exp(−mean log p(target | context)).
* HellaSwag, StoryCloze: one log-likelihood per ending (`` `` + ending after the context);
  ``acc`` picks the highest sum, ``acc_norm`` the highest sum per character of the ending.
* NQ-open, WebQuestions, TriviaQA: ``Q: question\\nA:`` after k solved examples, greedy generation
  cut at the first newline, exact match after SQuAD normalisation against any alias.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.corpus import jsonl_values, read_lines
from pipeline.errors import DistillError


@dataclass(frozen=True)
class Cloze:
    context: str
    target: str  # with its leading space


@dataclass(frozen=True)
class Choice:
    context: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class QA:
    question: str
    answers: tuple[str, ...]


class TaskFileError(DistillError):
    pass


def require_file(path: str | Path, flag: str = "") -> Path:
    """``path``, a task file that is there (``flag``: the option that named it, for the message)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such task file; pass the path of a local JSONL file"
                            + (f" with {flag}" if flag else ""))
    return path


def jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; errors name the file and line."""
    path = require_file(path)
    count = 0
    for line_no, obj in jsonl_values(read_lines(path, hint="convert the file to UTF-8"), path):
        if not isinstance(obj, dict):
            raise TaskFileError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        count += 1
        yield line_no, obj
    if count == 0:
        raise TaskFileError(f"{path}: empty task file (no JSON lines)")


def _field(obj: dict, name: str, kind: type | tuple[type, ...], path: Path, line: int) -> Any:
    if name not in obj:
        raise TaskFileError(f"{path}:{line}: missing field {name!r} (has {', '.join(sorted(obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, kind):
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TaskFileError(f"{path}:{line}: field {name!r} should be {want}, got {type(value).__name__}")
    return value


def _label(value: Any, n: int, base: int, name: str, path: Path, line: int) -> int:
    """A label given as int or digit string, ``base``-indexed, checked against ``n`` choices."""
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise TaskFileError(f"{path}:{line}: field {name!r} is not an integer: {value!r}") from None
    if not base <= label < n + base:
        raise TaskFileError(f"{path}:{line}: field {name!r} = {label} is out of range "
                            f"({base}..{n + base - 1} for {n} choices)")
    return label - base


# -- completion tasks --------------------------------------------------------------------------

def lambada(path: str | Path) -> list[Cloze]:
    """LAMBADA (``{"text": ...}``): predict the last word from the passage before it."""
    path = Path(path)
    items = []
    for line, obj in jsonl(path):
        text = _field(obj, "text", str, path, line).strip()
        if " " not in text:
            raise TaskFileError(f"{path}:{line}: field 'text' has no context before its last word")
        context, word = text.rsplit(" ", 1)
        items.append(Cloze(context, " " + word))
    return items


_BRACKETS = re.compile(r"\[.*?\]")


def hellaswag_text(text: str) -> str:
    """HellaSwag's WikiHow clean-up, as lm-evaluation-harness applies it."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETS.sub("", text)
    return text.replace("  ", " ")


def hellaswag(path: str | Path) -> list[Choice]:
    """HellaSwag (``ctx`` or ``ctx_a``/``ctx_b``, ``endings``, ``label``; ``activity_label`` optional)."""
    path = Path(path)
    items = []
    for line, obj in jsonl(path):
        if "ctx_a" in obj and "ctx_b" in obj:
            ctx = _field(obj, "ctx_a", str, path, line) + " " + _field(obj, "ctx_b", str, path, line).capitalize()
        else:
            ctx = _field(obj, "ctx", str, path, line)
        if "activity_label" in obj:
            ctx = _field(obj, "activity_label", str, path, line) + ": " + ctx
        endings = _field(obj, "endings", list, path, line)
        if len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise TaskFileError(f"{path}:{line}: field 'endings' should be a list of at least two strings")
        label = _label(_field(obj, "label", (int, str), path, line), len(endings), 0, "label", path, line)
        items.append(Choice(hellaswag_text(ctx), tuple(hellaswag_text(e) for e in endings), label))
    return items


def storycloze(path: str | Path) -> list[Choice]:
    """StoryCloze (``InputSentence1..4``, ``RandomFifthSentenceQuiz1/2``, ``AnswerRightEnding`` 1 or 2)."""
    path = Path(path)
    items = []
    for line, obj in jsonl(path):
        context = " ".join(_field(obj, f"InputSentence{i}", str, path, line).strip() for i in range(1, 5))
        endings = tuple(_field(obj, f"RandomFifthSentenceQuiz{i}", str, path, line).strip() for i in (1, 2))
        label = _label(_field(obj, "AnswerRightEnding", (int, str), path, line), 2, 1, "AnswerRightEnding",
                       path, line)
        items.append(Choice(context, endings, label))
    return items


# -- question answering ------------------------------------------------------------------------

def qa(path: str | Path) -> list[QA]:
    """NQ-open (``question``, ``answer`` list), WebQuestions (``question``, ``answers`` list) or
    TriviaQA (``question``, ``answer`` = {``value``, ``aliases``, ...})."""
    path = Path(path)
    items = []
    for line, obj in jsonl(path):
        question = _field(obj, "question", str, path, line).strip()
        key = "answer" if "answer" in obj else "answers"
        raw = _field(obj, key, (list, dict, str), path, line)
        if isinstance(raw, dict):  # TriviaQA
            answers = [raw.get("value", "")] + list(raw.get("aliases", [])) + list(raw.get("normalized_aliases", []))
        elif isinstance(raw, str):
            answers = [raw]
        else:
            answers = raw
        answers = tuple(dict.fromkeys(a.strip() for a in answers if isinstance(a, str) and a.strip()))
        if not answers:
            raise TaskFileError(f"{path}:{line}: field {key!r} holds no answer strings")
        items.append(QA(question, answers))
    return items


def qa_prompt(item: QA, shots: list[QA]) -> str:
    """GPT-3's open-domain QA prompt: solved examples, blank-line separated, then the question."""
    solved = "".join(f"Q: {s.question}\nA: {s.answers[0]}\n\n" for s in shots)
    return f"{solved}Q: {item.question}\nA:"


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: tuple[str, ...] | list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def first_line(generated: str) -> str:
    """The answer part of a generation: up to the first newline, stripped."""
    return generated.split("\n", 1)[0].strip()


# -- perplexity --------------------------------------------------------------------------------

def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Windows that score every token of ``tokens`` exactly once, each seen with as much preceding
    context as fits in ``max_len``: ``(window input, targets)``, the targets being what the last
    ``len(targets)`` positions of the input predict.
    The first window starts from ``prefix`` (the EOS token), so the first token is predicted from
    a document boundary (lm-evaluation-harness's rolling log-likelihood, context length 1)."""
    windows = []
    first = min(max_len, len(tokens))
    if first:
        windows.append(([prefix] + tokens[:first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        take = min(len(tokens) - done, max_len)
        end = done + take
        windows.append((tokens[end - max_len - 1:end - 1], tokens[end - take:end]))
        done = end
    return windows

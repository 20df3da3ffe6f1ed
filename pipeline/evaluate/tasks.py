"""Evaluation task files in their usual public formats, and the scoring rules the paper uses.

Each reader turns a JSONL file into plain items and reports a malformed file as
``path:line: what is wrong`` (one line, non-zero exit through :class:`DistillError`). The prompt
and scoring conventions follow GPT-3 (Brown et al., 2020) as lm-evaluation-harness implements
them, so a model scored here and there gets the same numbers:

* LAMBADA: context = the text up to its last space, target = `` `` + last word; accuracy = the
  whole target is the greedy continuation, perplexity = exp(−mean log p(target | context)).
* HellaSwag, StoryCloze: one log-likelihood per ending (`` `` + ending after the context);
  ``acc`` picks the highest sum, ``acc_norm`` the highest sum per character of the ending.
* NQ-open, TriviaQA, WebQuestions: one :class:`QADefinition` per (format, task) in
  :data:`QA_DEFINITIONS`. Format ``lm-eval`` (the default) is lm-evaluation-harness 0.4.13's
  ``nq_open``, ``triviaqa`` and ``webqs``, string for string (description, templates, delimiters,
  stop sequences, normalisation; webqs scored by the log-likelihood of its answers); ``gpt3`` is
  GPT-3's ``Q: …\nA:`` with blank-line separated shots, cut at a newline, SQuAD normalisation.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import DistillError
from pipeline.text.corpus import jsonl_values, read_lines


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
    answers: tuple[str, ...]  # gold answers; the first is the one a few-shot example shows
    doc: dict = field(default_factory=dict, compare=False, repr=False)  # the row as read (lm-eval's doc)


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

def qa(path: str | Path, definition: "QADefinition | None" = None) -> list[QA]:
    """NQ-open (``question``, ``answer`` list), WebQuestions (``question``, ``answers`` list) or
    TriviaQA (``question``, ``answer`` = {``value``, ``aliases``, ...}), with the gold answers the
    ``definition`` scores against (:attr:`QADefinition.golds`; by default GPT-3's: every answer
    string the row has)."""
    definition = definition or QA_DEFINITIONS["gpt3", "nq"]
    path = Path(path)
    items = []
    for line, obj in jsonl(path):
        question = _field(obj, "question", str, path, line)
        answers = definition.golds(obj, path, line)
        items.append(QA(question.strip() if definition.strip_question else question, answers, obj))
    return items


def _answer_strings(raw: Any) -> tuple[str, ...]:
    """Every distinct non-blank answer string of an NQ / WebQ list or a TriviaQA answer object."""
    if isinstance(raw, dict):  # TriviaQA
        raw = [raw.get("value", "")] + list(raw.get("aliases", [])) + list(raw.get("normalized_aliases", []))
    elif isinstance(raw, str):
        raw = [raw]
    return tuple(dict.fromkeys(a.strip() for a in raw if isinstance(a, str) and a.strip()))


def _string_list(obj: dict, name: str, path: Path, line: int, value: Any = None) -> list[str]:
    value = _field(obj, name, (list, str), path, line) if value is None else value
    value = [value] if isinstance(value, str) else value
    if not value or not all(isinstance(a, str) for a in value):
        raise TaskFileError(f"{path}:{line}: field {name!r} should be a non-empty list of answer strings")
    return value


def nq_golds(obj: dict, path: Path, line: int) -> tuple[str, ...]:
    """lm-eval's nq_open target ``{{answer}}``: the ``answer`` list as it is (the first one is a
    shot's answer)."""
    return tuple(_string_list(obj, "answer", path, line))


def triviaqa_golds(obj: dict, path: Path, line: int) -> tuple[str, ...]:
    """lm-eval's triviaqa target ``{{answer.aliases}}``: the aliases only (not ``value``, not
    ``normalized_aliases``), the first one a shot's answer."""
    answer = _field(obj, "answer", dict, path, line)
    if "aliases" not in answer:
        raise TaskFileError(f"{path}:{line}: field 'answer' has no 'aliases' (TriviaQA rows: answer = "
                            "{value, aliases, normalized_aliases})")
    return tuple(_string_list(obj, "answer.aliases", path, line, answer["aliases"]))


def webqs_golds(obj: dict, path: Path, line: int) -> tuple[str, ...]:
    """lm-eval's webqs choices (lm_eval/tasks/webqs/utils.py): the answers sorted, dropping any that
    starts with the one kept before it (lm-eval: if the prefix is the greedy continuation, the
    item is already a hit)."""
    answers = sorted(_string_list(obj, "answers", path, line))
    kept = [answers[0]]
    for alias in answers[1:]:
        if not alias.startswith(kept[-1]):
            kept.append(alias)
    return tuple(kept)


def gpt3_golds(obj: dict, path: Path, line: int) -> tuple[str, ...]:
    key = "answer" if "answer" in obj else "answers"
    answers = _answer_strings(_field(obj, key, (list, dict, str), path, line))
    if not answers:
        raise TaskFileError(f"{path}:{line}: field {key!r} holds no answer strings")
    return answers


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
NQ_OPEN_ARTICLES = re.compile(r"\b(?:The |the |An |A |The |a |an )")  # nq_open.yaml's regexes_to_ignore


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def lm_eval_nq_normalize(text: str) -> str:
    """lm-eval's exact_match as nq_open configures it: ``regexes_to_ignore`` (articles followed by a
    space, case-sensitive, before lower-casing), then ``ignore_case``, then ``ignore_punctuation``;
    spaces are kept as they are."""
    return NQ_OPEN_ARTICLES.sub("", text).lower().translate(_NO_PUNCTUATION)


def lm_eval_case_punctuation(text: str) -> str:
    """lm-eval's exact_match with ``ignore_case`` and ``ignore_punctuation`` (triviaqa): articles and
    spaces count."""
    return text.lower().translate(_NO_PUNCTUATION)


@dataclass(frozen=True)
class QADefinition:
    """How one QA task is asked and scored. The prompt is ``description``, then per shot
    ``template`` + ``target_delimiter`` + its first gold answer + ``shot_delimiter``, then the
    item's ``template`` (lm-eval's ConfigurableTask.fewshot_context)."""

    name: str  # recorded in the eval JSON next to the format
    template: str  # str.format with ``question``
    golds: Callable[[dict, Path, int], tuple[str, ...]]  # (row, path, line) → gold answers, first = shot answer
    normalize: Callable[[str], str] | None  # applied to prediction and golds before comparing
    description: str = ""
    target_delimiter: str = " "
    shot_delimiter: str = "\n\n"
    stops: tuple[str, ...] = ("\n",)  # generation ends at the first of them; the answer is what precedes it
    scoring: str = "generate"  # or "loglikelihood": some gold is the greedy continuation
    sampler: str = "lm-eval"  # or "per-item": see stages.eval.draw_shots
    exclude_item: bool = False  # draw k + 1 shots, drop the item's own row, keep k (lm-eval's eval_doc)
    max_new_tokens: int = 256  # lm-eval's max_gen_toks
    zero_shot_only: str = ""  # why k > 0 is refused, if it is
    strip_question: bool = False  # lm-eval renders ``{{question}}`` as it is in the file

    def prompt(self, question: str, shots: "list[QA]" = ()) -> str:
        solved = "".join(self.template.format(question=s.question) + self.target_delimiter + s.answers[0]
                         + self.shot_delimiter for s in shots)
        return self.description + solved + self.template.format(question=question)

    def answer(self, generated: str) -> str:
        """The scored answer of a generation: cut at the first stop sequence, stripped (lm-eval's
        ``until`` split, then its ``remove_whitespace`` and ``take_first`` filters)."""
        for stop in self.stops:
            generated = generated.split(stop)[0]
        return generated.strip()

    def exact_match(self, prediction: str, golds: tuple[str, ...] | list[str]) -> bool:
        norm = self.normalize or (lambda t: t)
        return any(norm(prediction) == norm(g) for g in golds)


_LM_EVAL_ZERO_SHOT = "lm-eval 0.4.13's webqs fails to build few-shot prompts: its targets are answer indices"

# (format, task) → definition. lm-eval's rows copy lm_eval 0.4.13's task YAMLs (tasks/nq_open/nq_open.yaml,
# tasks/triviaqa/default.yaml, tasks/webqs/webqs.yaml); gpt3's are Brown et al. (2020)'s prompts, as
# distill had them before. A custom task or format is one more row.
QA_DEFINITIONS: dict[tuple[str, str], QADefinition] = {
    ("lm-eval", "nq"): QADefinition(
        "nq_open v4.0", "Q: {question}?\nA:", nq_golds, lm_eval_nq_normalize,
        description="Answer these questions:\n\n", shot_delimiter="\n", stops=("\n", ".", ","), exclude_item=True),
    ("lm-eval", "triviaqa"): QADefinition(
        "triviaqa v3.0", "Question: {question}?\nAnswer:", triviaqa_golds, lm_eval_case_punctuation,
        stops=("\n", ".", ","), exclude_item=True),
    ("lm-eval", "webq"): QADefinition(
        "webqs v2.0", "Question: {question}\nAnswer:", webqs_golds, None, scoring="loglikelihood",
        zero_shot_only=_LM_EVAL_ZERO_SHOT),
    **{("gpt3", task): QADefinition("gpt3 Q/A", "Q: {question}\nA:", gpt3_golds, normalize_answer,
                                    sampler="per-item", max_new_tokens=24,
                                    strip_question=True)
       for task in ("nq", "webq", "triviaqa")},
}
QA_FORMATS = tuple(dict.fromkeys(f for f, _ in QA_DEFINITIONS))

# Your own task (``--tasks custom``): prompt/response records such as a fine-tuning set's held-out
# part, whatever --qa-format says. The prompt is sent as written, so it carries its own template and
# any solved examples; the answer is the greedy continuation up to a newline, matched after SQuAD's
# normalisation against the record's ``answers`` or its response.
CUSTOM = QADefinition("prompt as written", "{question}", gpt3_golds, normalize_answer, max_new_tokens=32,
                      zero_shot_only="its prompts are sent as written; put solved examples in them")


def qa_definition(qa_format: str, task: str) -> QADefinition:
    return CUSTOM if task == "custom" else QA_DEFINITIONS[qa_format, task]


def prompted(path: str | Path, prompt_field: str = "prompt", response_field: str = "response") -> list[QA]:
    """Prompt/response JSONL (what ``distill prepare --format prompt-response`` trains on) as QA items:
    the prompt as it is, and as gold answers the record's ``answers`` list when it has one, else its
    response stripped."""
    path = Path(path)
    items = []
    for line, obj in jsonl(path):
        prompt = _field(obj, prompt_field, str, path, line)
        if "answers" in obj:
            answers = _answer_strings(_field(obj, "answers", (list, str), path, line))
        else:
            answers = _answer_strings(_field(obj, response_field, str, path, line))
        if not prompt.strip() or not answers:
            raise TaskFileError(f"{path}:{line}: an empty prompt or no answer; every record needs both")
        items.append(QA(prompt, answers, obj))
    return items


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

"""Read task examples (fine-tuning data) as text pieces, each marked prompt or response, or as token ids.

Three JSONL record formats (``distill prepare --format``):

- ``prompt-response``: the prompt under ``--prompt-field`` and the response under
  ``--response-field``, both strings. The two are joined as they are: a separator (``"\\nAnswer:"``,
  a space) belongs at the end of the prompt or the start of the response.
- ``chat``: a list of ``{"role", "content"}`` messages under ``--messages-field``, rendered with the
  tokenizer's chat template. Each assistant turn is a response; its span is what the template adds
  when that turn is appended to the conversation rendered up to it *with* the generation prompt, so
  the template's assistant header is prompt and its end-of-turn marker is response (the model learns
  to end its turn). A template that does not render each conversation as a prefix of its
  continuation cannot be split this way and is refused.
- ``ids``: token ids as a model saw and drew them (``distill generate``'s records): ``prompt_ids``
  and ``completion_ids`` (lists of ids, the completion non-empty) and optionally
  ``completion_logprobs`` (one float per completion id: the log-prob the sampling policy drew it
  with). Nothing is re-tokenized; :class:`IdsReader` yields one :class:`IdsExample` per record, and
  :func:`read_samplers` gives the distinct samplers the records' ``settings`` name.

:class:`ExampleReader` yields one list of ``(text, is_response)`` pieces per record. The packer
(``stages/prepare.py``) tokenizes each piece on its own, so no token straddles a prompt/response
boundary. A record without a response to learn (a missing field, an empty response, a conversation
with no assistant turn) is a one-line error naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import DistillError
from pipeline.text.corpus import ReadStats, jsonl_values, read_lines

FORMATS = ("text", "prompt-response", "chat", "ids")  # 'text': a plain corpus (pipeline/text/corpus.py), no loss mask
RESPONSE_ROLE = "assistant"

Pieces = list[tuple[str, bool]]  # (text, is_response), in order


def chat_template_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's chat template (it decides the rendered text; the tokenizer hash does not cover it)."""
    return hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()


def require_chat_template(tokenizer, tokenizer_path: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(f"--format chat renders --messages-field with the tokenizer's chat template, and the "
                           f"tokenizer at {tokenizer_path} has none; pass a --tokenizer that has one (chat_template in "
                           "its tokenizer_config.json) or write the records as prompt/response (--format prompt-response)")


class ExampleReader:
    """Iterate the records of JSONL files as :data:`Pieces`; ``stats.documents`` counts records."""

    def __init__(self, files: list[Path], format: str, prompt_field: str = "prompt", response_field: str = "response",
                 messages_field: str = "messages", tokenizer=None, skip_bad_utf8: bool = False):
        if format not in ("prompt-response", "chat"):
            raise ValueError(f"format must be prompt-response or chat, got {format!r}")
        self.files, self.format, self.tokenizer = files, format, tokenizer
        self.prompt_field, self.response_field, self.messages_field = prompt_field, response_field, messages_field
        self.skip_bad_utf8 = skip_bad_utf8
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[Pieces]:
        for path in self.files:
            lines = read_lines(path, self.stats if self.skip_bad_utf8 else None)
            for lineno, record in jsonl_values(lines, path):
                where = f"{path}:{lineno}"
                if not isinstance(record, dict):
                    raise DistillError(f"{where}: not a JSON object; each line of --format {self.format} input is one "
                                       "record")
                pieces = self._prompt_response(record, where) if self.format == "prompt-response" \
                    else self._chat(record, where)
                self.stats.documents += 1
                yield pieces

    def _field(self, record: dict, name: str, flag: str, where: str):
        if name not in record:
            raise DistillError(f"{where}: no '{name}' field; pass {flag} with the field that holds it")
        return record[name]

    def _prompt_response(self, record: dict, where: str) -> Pieces:
        prompt = self._field(record, self.prompt_field, "--prompt-field", where)
        response = self._field(record, self.response_field, "--response-field", where)
        for name, value in ((self.prompt_field, prompt), (self.response_field, response)):
            if not isinstance(value, str):
                raise DistillError(f"{where}: field '{name}' is not a string")
        if not response:
            raise DistillError(f"{where}: the response ('{self.response_field}') is empty: there is nothing to learn "
                               "from this record; fill it in or remove the record")
        return [(prompt, False), (response, True)]

    def _chat(self, record: dict, where: str) -> Pieces:
        messages = self._field(record, self.messages_field, "--messages-field", where)
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DistillError(f"{where}: field '{self.messages_field}' is not a list of "
                               "{\"role\": str, \"content\": str} messages")
        turns = [i for i, m in enumerate(messages) if m["role"] == RESPONSE_ROLE]
        if not turns:
            raise DistillError(f"{where}: the conversation has no '{RESPONSE_ROLE}' message: there is nothing to "
                               "learn from this record; add the reply or remove the record")
        if any(not messages[i]["content"] for i in turns):
            raise DistillError(f"{where}: an '{RESPONSE_ROLE}' message is empty: there is nothing to learn from it; "
                               "fill it in or remove it")
        pieces: Pieces = []
        done = ""
        for i in turns:
            before = self._render(messages[:i], True, where) if i else ""
            after = self._render(messages[:i + 1], False, where)
            pieces += [(self._after(done, before, where), False), (self._after(before, after, where), True)]
            done = after
        pieces.append((self._after(done, self._render(messages, False, where), where), False))
        return [p for p in pieces if p[0]]

    def _render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as e:  # the template's own raise_exception(), or a Jinja error
            raise DistillError(f"{where}: the chat template cannot render this conversation "
                               f"({' '.join(str(e).split())[:200]}); fix the record or the template") from None

    @staticmethod
    def _after(prefix: str, text: str, where: str) -> str:
        """What ``text`` adds to ``prefix``; the template must render a conversation as the prefix of its continuation."""
        if not text.startswith(prefix):
            raise DistillError(f"{where}: the tokenizer's chat template does not render this conversation as the "
                               "start of its continuation, so its assistant turns cannot be marked; use a template "
                               "that does, or write the records as prompt/response (--format prompt-response)")
        return text[len(prefix):]


@dataclass(frozen=True)
class IdsExample:
    """One ``--format ids`` record: where it was read (file:line and its ``id``, if any), the prompt's
    and completion's ids, and the completion ids' log-probs under the policy that drew them (or None)."""

    where: str
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_logprobs: list[float] | None


class IdsReader:
    """Iterate the ``--format ids`` records of JSONL files, every id checked ``< vocab`` and every
    record agreeing with the first on carrying ``completion_logprobs``; ``stats.documents`` counts
    records. A bad record is a one-line error naming file, line and record id."""

    FIELDS = ("prompt_ids", "completion_ids")
    LOGPROBS = "completion_logprobs"

    def __init__(self, files: list[Path], vocab: int, skip_bad_utf8: bool = False):
        self.files, self.vocab, self.skip_bad_utf8 = files, vocab, skip_bad_utf8
        self.stats = ReadStats()
        self.with_logprobs: bool | None = None  # decided by the first record
        self._first = ""

    def __iter__(self) -> Iterator[IdsExample]:
        for path in self.files:
            lines = read_lines(path, self.stats if self.skip_bad_utf8 else None)
            for lineno, record in jsonl_values(lines, path):
                where = f"{path}:{lineno}"
                if not isinstance(record, dict):
                    raise DistillError(f"{where}: not a JSON object; each line of --format ids input is one record")
                if "id" in record:
                    where += f" (record {record['id']})"
                example = self._example(record, where)
                self.stats.documents += 1
                yield example

    def _example(self, record: dict, where: str) -> IdsExample:
        ids = {}
        for name in self.FIELDS:
            if name not in record:
                raise DistillError(f"{where}: no '{name}' field; --format ids reads prompt_ids and completion_ids "
                                   "(distill generate's records)")
            value = record[name]
            if not isinstance(value, list) or not all(type(i) is int for i in value):
                raise DistillError(f"{where}: '{name}' is not a list of token ids")
            bad = [i for i in value if not 0 <= i < self.vocab]
            if bad:
                raise DistillError(f"{where}: '{name}' holds id {bad[0]}, outside the tokenizer's {self.vocab} ids; "
                                   "pass the --tokenizer of the model that wrote the records")
            ids[name] = value
        if not ids["completion_ids"]:
            raise DistillError(f"{where}: 'completion_ids' is empty: there is nothing to learn from this record; "
                               "remove it")
        logprobs = record.get(self.LOGPROBS)
        has = logprobs is not None
        if self.with_logprobs is None:
            self.with_logprobs, self._first = has, where
        elif has != self.with_logprobs:
            which = f"has '{self.LOGPROBS}' and {self._first} has none" if has else \
                f"has no '{self.LOGPROBS}' and {self._first} has them"
            raise DistillError(f"{where}: {which}; every record must carry them or none (generate writes them all)")
        if has and (not isinstance(logprobs, list) or len(logprobs) != len(ids["completion_ids"])
                    or not all(type(v) in (int, float) and math.isfinite(v) for v in logprobs)):
            raise DistillError(f"{where}: '{self.LOGPROBS}' is not a list of finite numbers, one per completion id")
        return IdsExample(where, ids["prompt_ids"], ids["completion_ids"], logprobs)


def sampler_of(settings: Any) -> dict | None:
    """The sampler a ``distill generate`` record's ``settings`` describe, as ``prepare --format ids``
    stores it (docs/FORMAT.md, ``samplers``): ``temperature``, ``top_k``, ``top_p``, ``greedy`` and
    ``rules_sha256`` (the rule file's digest, None without ``--rules``) — everything that shapes the
    distribution a record's ``completion_logprobs`` are log-probs of (nothing else does: no repetition
    penalty, no minimum length; EOS is masked only by rules). None where the settings do not say
    (records of another writer, or of a generate before record format 2); ``greedy``, written since
    the sampler is checked, is ``temperature == 0`` in records before it."""
    if not isinstance(settings, dict):
        return None
    temperature, top_k, top_p = settings.get("temperature"), settings.get("top_k"), settings.get("top_p")
    rules, greedy = settings.get("rules_sha256", ""), settings.get("greedy", temperature == 0)
    if (type(temperature) not in (int, float) or not temperature >= 0 or type(top_k) is not int or top_k < 0
            or type(top_p) not in (int, float) or not 0 < top_p <= 1 or type(greedy) is not bool
            or not (rules is None or isinstance(rules, str) and rules)):
        return None
    return {"temperature": float(temperature), "top_k": top_k, "top_p": float(top_p), "greedy": greedy,
            "rules_sha256": rules}


def read_samplers(files: list[Path], skip_bad_utf8: bool = False) -> list[dict | None]:
    """The distinct samplers of ``--format ids`` records (:func:`sampler_of`
    of each record's ``settings``; None for a record that does not say), sorted by their JSON, None
    first: ``prepare``'s ``samplers`` param. A pass of its own before the records are stored, since
    the params decide whether the store is there already. Records of several samplers are recorded
    as the set, not refused: every row's ``behaviour_logprob`` is its own sampler's, so each row's
    ratio is right, and whether a sampler is acceptable is the objective's to say."""
    seen: dict[str, dict | None] = {}
    for path in files:
        for _, record in jsonl_values(read_lines(path, ReadStats() if skip_bad_utf8 else None), path):
            if isinstance(record, dict):  # anything else is refused when the records are read
                sampler = sampler_of(record.get("settings"))
                seen.setdefault(json.dumps(sampler, sort_keys=True), sampler)
    return [seen[key] for key in sorted(seen)]

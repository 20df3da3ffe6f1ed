"""Build the demo evaluation sets in data/eval/ from the held-out documents only.

    python scripts/build_eval_sets.py --heldout data/corpus/heldout.jsonl.gz --out data/eval

Three sets in the real tasks' formats, so that `distill eval` and lm-evaluation-harness read them
like the originals:

* lambada.jsonl — LAMBADA-style cloze ({"text"}): a passage of consecutive sentences whose last
  word (the target, final punctuation removed) already occurs earlier in the passage, so that
  predicting it rewards using the context.
* storycloze.jsonl — StoryCloze-style: four consecutive sentences, the true fifth and a fifth
  taken from another document of the same source, in random order (AnswerRightEnding 1 or 2).
* hellaswag.jsonl — HellaSwag-style: two sentences of context, the true next sentence and three
  sentences from other documents of the same source (label 0..3).

And one task set for `make demo-fd`'s fine-tuning step (docs/PROCESS.md), in --tasks-out:

* source-train.jsonl, source-test.jsonl — prompt/response pairs ({"prompt", "response", "answers"}):
  a passage of one to three sentences and the kind of text it comes from (fortune, bible,
  commentary or jargon), at most 150 train items per kind. Only from held-out documents no
  evaluation item above uses, split by document, so fine-tuning on the train part leaks nothing
  into LAMBADA, StoryCloze, HellaSwag or the test part.

Held-out documents are never trained on (data/PROVENANCE.md), so neither are these sets. The
output is deterministic for a given input and seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

import numpy as np

SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
WORD = re.compile(r"^[A-Za-z][a-z]+$")
STOPWORDS = set("""a about above after again against all am an and any are as at be because been before being
below between both but by can did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with you your yours yourself yourselves shall unto thou thee thy
thine ye hath doth upon also even may might must one would could""".split())


def sentences(text: str) -> list[str]:
    out = []
    for paragraph in text.split("\n"):
        paragraph = " ".join(paragraph.split())
        out += [s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()]
    return out


def words(s: str) -> int:
    return len(s.split())


def good_sentence(s: str, lo: int = 4, hi: int = 50) -> bool:
    return lo <= words(s) <= hi and s[-1] in ".!?\"')" and "[" not in s and "]" not in s


def lambada_items(docs, rng, limit: int) -> list[dict]:
    items = []
    for doc in docs:
        sents = sentences(doc["text"])
        for end in range(3, len(sents), 4):  # passages ending 4 sentences apart
            passage = []
            for s in reversed(sents[:end + 1]):
                if words(" ".join([s] + passage)) > 110:
                    break
                passage.insert(0, s)
            text = " ".join(passage)
            if words(text) < 40:
                continue
            text = text.rstrip(".!?\"')];:, ")
            context, last = text.rsplit(" ", 1)
            if not WORD.match(last) or len(last) < 3 or last.lower() in STOPWORDS:
                continue
            if not re.search(r"\b" + re.escape(last.lower()) + r"\b", context.lower()):
                continue
            items.append({"text": text, "source": doc["source"], "doc": doc["id"]})
    rng.shuffle(items)
    return items[:limit]


def ending_items(docs, rng, limit: int, context_sentences: int, distractors: int) -> list[dict]:
    """(context, true next sentence, distractor sentences from other documents of the same source)."""
    by_source: dict[str, list[tuple[str, str]]] = {}
    windows = []
    for doc in docs:
        sents = sentences(doc["text"])
        for s in sents:
            if good_sentence(s):
                by_source.setdefault(doc["source"], []).append((doc["id"], s))
        step = context_sentences + 1
        for start in range(0, len(sents) - context_sentences, step):
            window = sents[start:start + step]
            if len(window) == step and all(good_sentence(s) for s in window):
                windows.append((doc, window))
    rng.shuffle(windows)
    items = []
    for doc, window in windows:
        pool = [s for d, s in by_source[doc["source"]] if d != doc["id"]]
        if len(pool) < distractors:
            continue
        true = window[-1]
        # distractors of about the true ending's length, so length alone does not give it away
        lengths = np.array([abs(words(s) - words(true)) for s in pool])
        near = [pool[i] for i in np.argsort(lengths, kind="stable")[:50]]
        chosen = [near[i] for i in rng.choice(len(near), size=distractors, replace=False)]
        items.append((doc, window[:-1], true, chosen))
        if len(items) == limit:
            break
    return items


LABELS = {"fortunes": "fortune", "web_bible": "bible", "tdavid": "commentary", "mhcc": "commentary",
          "scofield": "commentary", "jargon": "jargon"}
SOURCE_PROMPT = "Passage: {passage}\nSource (fortune, bible, commentary or jargon):"


def source_items(docs, used: set[str], rng, per_label: int = 150) -> tuple[list[dict], list[dict]]:
    """(train, test) prompt/response pairs from the documents outside ``used``: a passage of one to
    three sentences and the kind of text it comes from, at most ``per_label`` train items (a quarter
    of that for test) per label, the test set from every fifth such document of each source."""
    free = [d for d in docs if d["id"] not in used]
    test_docs = {d["id"] for src in LABELS for d in [d for d in free if d["source"] == src][::5]}
    by_label: dict[tuple[str, bool], list[dict]] = {}
    for doc in free:
        paragraphs = re.split(r"\n\s*\n", doc["text"])  # a single newline only wraps a line here
        sents = [s for p in paragraphs for s in sentences(" ".join(p.split())) if not s.startswith(("--", "Verse", "Ver."))]
        passages, current = [], []
        for sent in sents:  # consecutive sentences, up to three and 60 words
            if current and (len(current) == 3 or words(" ".join(current + [sent])) > 60):
                passages.append(" ".join(current))
                current = []
            current.append(sent)
        passages.append(" ".join(current))
        for passage in passages:
            if not 8 <= words(passage) <= 60 or "[" in passage:
                continue
            label = LABELS[doc["source"]]
            item = {"prompt": SOURCE_PROMPT.format(passage=passage), "response": f" {label}\n", "answers": [label],
                    "source": doc["source"], "doc": doc["id"]}
            by_label.setdefault((label, doc["id"] in test_docs), []).append(item)
    train, test = [], []
    for (label, is_test), items in sorted(by_label.items()):
        chosen = [items[i] for i in sorted(rng.permutation(len(items))[:per_label // 4 if is_test else per_label])]
        (test if is_test else train).extend(chosen)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout", default="data/corpus/heldout.jsonl.gz")
    parser.add_argument("--out", default="data/eval")
    parser.add_argument("--tasks-out", default="data/tasks", help="where the cloze task set goes")
    parser.add_argument("--items", type=int, default=400, help="items per set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with gzip.open(args.heldout, "rt", encoding="utf-8") as f:
        docs = sorted((json.loads(line) for line in f), key=lambda d: d["id"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([args.seed, 0])
    lambada = lambada_items(docs, rng, args.items)
    write_jsonl(out / "lambada.jsonl", lambada)

    rng = np.random.default_rng([args.seed, 1])
    story = []
    for doc, context, true, (wrong,) in ending_items(docs, rng, args.items, 4, 1):
        right = int(rng.integers(1, 3))
        endings = [true, wrong] if right == 1 else [wrong, true]
        story.append({**{f"InputSentence{i + 1}": s for i, s in enumerate(context)},
                      "RandomFifthSentenceQuiz1": endings[0], "RandomFifthSentenceQuiz2": endings[1],
                      "AnswerRightEnding": right, "source": doc["source"], "doc": doc["id"]})
    write_jsonl(out / "storycloze.jsonl", story)

    rng = np.random.default_rng([args.seed, 2])
    swag = []
    for doc, context, true, wrong in ending_items(docs, rng, args.items, 2, 3):
        label = int(rng.integers(0, 4))
        endings = list(wrong)
        endings.insert(label, true)
        swag.append({"ctx": " ".join(context), "endings": endings, "label": label, "source": doc["source"],
                     "doc": doc["id"]})
    write_jsonl(out / "hellaswag.jsonl", swag)
    print(f"{out}: lambada {len(lambada)}, storycloze {len(story)}, hellaswag {len(swag)} items")

    used = {item["doc"] for item in lambada + story + swag}
    train, test = source_items(docs, used, np.random.default_rng([args.seed, 3]))
    tasks_out = Path(args.tasks_out)
    tasks_out.mkdir(parents=True, exist_ok=True)
    write_jsonl(tasks_out / "source-train.jsonl", train)
    write_jsonl(tasks_out / "source-test.jsonl", test)
    print(f"{tasks_out}: source-train {len(train)}, source-test {len(test)} items")


if __name__ == "__main__":
    main()

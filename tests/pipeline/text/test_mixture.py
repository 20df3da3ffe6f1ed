"""Sources with weights (pipeline/text/mixture.py): the shares of the store's tokens, checked from the
store's rows alone; budgets; a source that runs out; bad sources files as one line."""

import gzip
import re
import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from pipeline.errors import DistillError
from pipeline.store.contract import open_store
from pipeline.text.mixture import read_sources
from tests.conftest import ROOT, TOKENIZER, one_line_error, run_cli

CORPUS = ROOT / "data" / "corpus" / "train.jsonl.gz"


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """The shipped training corpus split by its ``source`` field into three sources (a slice of each,
    for time): fortunes, tdavid, and the other four together."""
    root = tmp_path_factory.mktemp("sources")
    groups = defaultdict(list)
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            group = record["source"] if record["source"] in ("fortunes", "tdavid") else "other"
            groups[group].append(record["text"])
    limits = {"fortunes": 2500, "tdavid": 500, "other": 600}
    for group, docs in groups.items():
        (root / f"{group}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:limits[group]]))
    return root, {g: docs[:limits[g]] for g, docs in groups.items()}


def tokens_by_source(store_path, docs_by_source) -> Counter:
    """Tokens per source (each document and its EOS) read back from the store's rows: the stream is the
    rows without their one-token overlap, cut at EOS; each document is traced to the source that holds
    its token ids (the independent check of the shares)."""
    from pipeline.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    owner = {}
    for source, docs in docs_by_source.items():
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            owner.setdefault(tuple(ids), source)
    store = open_store(store_path)
    rows = np.concatenate([store.read_shard(i)["input_ids"] for i in range(len(store.shards))]).astype(np.int64)
    stream = np.concatenate([rows[0], *(row[1:] for row in rows[1:])])
    counts = Counter()
    start = 0
    for end in np.flatnonzero(stream == tokenizer.eos_token_id):
        counts[owner[tuple(stream[start:end].tolist())]] += end - start + 1
        start = end + 1
    counts["(rows)"] = len(stream)  # every token in the rows, a last document cut short included
    return counts


def test_each_sources_share_of_the_tokens_is_its_weight(tmp_path, three_sources):
    root, docs = three_sources
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{path: {root}/fortunes.jsonl, weight: 5}}\n"
                   f"  - {{path: {root}/tdavid.jsonl, weight: 3}}\n  - {{path: {root}/other.jsonl, weight: 2}}\n"
                   "seed: 1\n")
    result = run_cli("prepare", "--sources", mix, "--out", tmp_path / "s", "--tokenizer", TOKENIZER, "--seq-len", "128",
                     "--rows-per-shard", "256")
    assert result.exit_code == 0, result.output
    assert "stopped when" in result.output and "ran out" in result.output
    counts = tokens_by_source(tmp_path / "s", docs)
    in_rows = counts.pop("(rows)")
    total = sum(counts.values())
    for source, weight in (("fortunes", .5), ("tdavid", .3), ("other", .2)):
        assert abs(counts[source] / total - weight) < 0.01, (source, counts[source] / total)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["params"]["sources"][0] == {"path": f"{root}/fortunes.jsonl", "weight": 5.0}
    recorded = {m["path"].split("/")[-1].split(".")[0]: m for m in index["mixture"]}
    assert sum(m["ran_out"] for m in recorded.values()) == 1
    dropped = index["dropped_tokens"]  # the tail too short for a row is not in the rows
    assert sum(m["tokens"] for m in recorded.values()) == in_rows + dropped
    # deterministic: the same sources and seed give the same store; another seed, other rows, same shares
    again = run_cli("prepare", "--sources", mix, "--out", tmp_path / "s2", "--tokenizer", TOKENIZER, "--seq-len", "128",
                    "--rows-per-shard", "256")
    assert again.exit_code == 0
    a, b = open_store(tmp_path / "s"), open_store(tmp_path / "s2")
    assert [e["sha256"] for e in a.shards] == [e["sha256"] for e in b.shards]


def test_budgets_and_a_repeated_small_source(tmp_path, three_sources):
    root, docs = three_sources
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"- {{path: {root}/fortunes.jsonl, tokens: 30000}}\n- {{path: {root}/other.jsonl, tokens: 20000}}\n")
    assert run_cli("prepare", "--sources", mix, "--out", tmp_path / "b", "--tokenizer", TOKENIZER,
                   "--seq-len", "128").exit_code == 0
    facts = {m["path"].split("/")[-1]: m for m in json.loads((tmp_path / "b" / "index.json").read_text())["mixture"]}
    for name, budget in (("fortunes.jsonl", 30000), ("other.jsonl", 20000)):
        assert budget <= facts[name]["tokens"] < budget + 2000 and not facts[name]["ran_out"]  # one document past
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs["other"][:20]))
    mix.write_text(f"- {{path: {root}/fortunes.jsonl, weight: 0.8}}\n- {{path: {small}, weight: 0.2, repeat: true}}\n")
    assert run_cli("prepare", "--sources", mix, "--out", tmp_path / "r", "--tokenizer", TOKENIZER,
                   "--seq-len", "128").exit_code == 0
    facts = {m["path"].split("/")[-1]: m for m in json.loads((tmp_path / "r" / "index.json").read_text())["mixture"]}
    assert facts["small.jsonl"]["passes"] > 3 and facts["fortunes.jsonl"]["ran_out"]
    assert abs(facts["small.jsonl"]["share"] - 0.2) < 0.01


@pytest.mark.parametrize("text, message", [
    ("[]", "must list sources"),
    ("- {path: a.jsonl}", "exactly one of 'weight'"),
    ("- {path: a.jsonl, weight: -1}", "weight must be a positive number"),
    ("- {path: a.jsonl, weigth: 1}", "unknown key 'weigth' (did you mean 'weight'?)"),
    ("- {path: a.jsonl, weight: 1}\n- {path: b.jsonl, tokens: 5}", "mixes 'weight' and 'tokens'"),
    ("- {path: a.jsonl, weight: 1, repeat: true}", "would never end"),
    ("- {path: a.jsonl, weight: 1}\n- {path: a.jsonl, weight: 2}", "twice"),
    ("sources: [{path: a.jsonl, weight: 1}]\nseed: x", "seed must be an integer"),
])
def test_bad_sources_files_are_one_line(tmp_path, text, message):
    (tmp_path / "mix.yaml").write_text(text)
    with pytest.raises(DistillError, match=re.escape(message)):
        read_sources(tmp_path / "mix.yaml")


def test_sources_and_input_are_one_or_the_other(tmp_path, three_sources):
    root, _ = three_sources
    mix = tmp_path / "mix.yaml"
    mix.write_text("- {path: missing.jsonl, weight: 1}\n")
    line = one_line_error(run_cli("prepare", "--sources", mix, "--out", tmp_path / "s", "--tokenizer", TOKENIZER))
    assert "missing.jsonl does not exist" in line and str(tmp_path) in line  # relative to the sources file
    line = one_line_error(run_cli("prepare", "--sources", mix, "--input", root / "other.jsonl", "--out", tmp_path / "s"))
    assert "--input FILE_OR_DIR (repeatable) or --sources MIX.yaml, one of the two" in line
    assert not (tmp_path / "s").exists()

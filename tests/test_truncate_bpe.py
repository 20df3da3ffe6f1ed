"""scripts/truncate_bpe.py (issue #30's control tokenizer): a byte-level BPE cut to its first ids keeps
its tokens and splits text as the source does until the cut; a tokenizer it cannot cut is refused."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from tests.conftest import ROOT, TOKENIZER

TEXT = "The standard library's docstrings: def truncate(source, size) -> int, 12345 bytes."


def cut(tmp_path, size, source=TOKENIZER):
    return subprocess.run([sys.executable, "scripts/truncate_bpe.py", "--source", str(source), "--size", str(size),
                           "--out", str(tmp_path / f"cut-{size}")], cwd=ROOT, capture_output=True, text=True)


def test_a_cut_keeps_the_sources_tokens_and_its_splits_at_full_size(tmp_path):
    source = AutoTokenizer.from_pretrained(str(TOKENIZER))
    done = cut(tmp_path, 1024)
    assert done.returncode == 0, done.stderr
    small = AutoTokenizer.from_pretrained(str(tmp_path / "cut-1024"))
    assert len(small) == 1024
    vocab, small_vocab = source.get_vocab(), small.get_vocab()
    assert all(vocab[token] == i for token, i in small_vocab.items())  # every token a source token, same id
    ids = small(TEXT)["input_ids"]
    assert small.decode(ids) == TEXT and max(ids) < 1024
    assert len(ids) > len(source(TEXT)["input_ids"])  # fewer merges: more pieces
    assert cut(tmp_path, len(source)).returncode == 0  # cut nowhere: the source's own splits
    whole = AutoTokenizer.from_pretrained(str(tmp_path / f"cut-{len(source)}"))
    assert whole(TEXT)["input_ids"] == source(TEXT)["input_ids"]


def test_a_size_outside_the_merges_or_merges_out_of_id_order_are_refused(tmp_path):
    done = cut(tmp_path, 10)
    assert done.returncode != 0 and "--size 10 must lie between" in done.stderr
    config = json.loads((TOKENIZER / "tokenizer.json").read_text())
    merges = config["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(json.dumps(config))
    (bad / "tokenizer_config.json").write_text((TOKENIZER / "tokenizer_config.json").read_text())
    done = cut(tmp_path, 1024, bad)
    assert done.returncode != 0 and "merge 0" in done.stderr and "not in merge order" in done.stderr

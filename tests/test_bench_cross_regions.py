"""bench/cross_regions.py (issue #30): chunks of two tokenizations by kind, each token inside one chunk,
and each model's bits per kind summing to its whole-text bits per byte as distill eval scores it."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.text.align import token_bytes
from tests.conftest import TOKENIZER, make_teacher

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cross_regions", ROOT / "bench" / "cross_regions.py")
regions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regions)


def test_chunks_have_the_kind_of_their_token_counts():
    # bytes 0..9; the teacher's tokens end at 3, 5, 10, the student's at 2, 3, 5, 7, 10
    byte_chunk, kind = regions.chunks(np.array([3, 5, 10]), np.array([2, 3, 5, 7, 10]), 10)
    assert byte_chunk.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert [regions.KINDS[k] for k in kind] == ["t1:sN", "1:1", "t1:sN"]
    _, kind = regions.chunks(np.array([2, 3, 5]), np.array([3, 5]), 5)  # the student's longer token, then 1:1
    assert [regions.KINDS[k] for k in kind] == ["tN:s1", "1:1"]


def test_every_token_of_either_side_lies_in_one_chunk(heldout_docs):
    sides = [(tok, token_bytes(tok)) for tok in (AutoTokenizer.from_pretrained(str(TOKENIZER)),
                                                 AutoTokenizer.from_pretrained(str(ROOT / "data" / "tokenizer-4096")))]
    for text in heldout_docs[:5]:
        (_, t_ends), (_, s_ends) = (regions.byte_ends(tok, table, text) for tok, table in sides)
        byte_chunk, kind = regions.chunks(t_ends, s_ends, len(text.encode()))
        for ends in (t_ends, s_ends):
            starts = np.concatenate([[0], ends[:-1]])
            assert (byte_chunk[starts] == byte_chunk[ends - 1]).all()
        assert {regions.KINDS[k] for k in kind} >= {"1:1", "t1:sN"}


def test_bits_by_kind_add_up_to_distill_evals_bits_per_byte(tmp_path, heldout_docs):
    from tests.conftest import run_cli

    make_teacher(tmp_path / "model", scale=2.0)
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(tmp_path / "model")
    docs = tmp_path / "heldout.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in heldout_docs[:4]))
    result = run_cli("eval", "--model", tmp_path / "model", "--tasks", "heldout", "--heldout", docs,
                     "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    want = json.loads((tmp_path / "eval.json").read_text())["tasks"]["heldout"]["bits_per_byte"]
    regions.main(["--teacher-tokenizer", str(TOKENIZER), "--student-tokenizer", str(ROOT / "data" / "tokenizer-4096"),
                  "--heldout", str(docs), "--models", f"m={tmp_path / 'model'}", "--out", str(tmp_path / "regions.json")])
    got = json.loads((tmp_path / "regions.json").read_text())
    assert got["models"]["m"]["bits_per_byte"] == pytest.approx(want, rel=1e-4)
    shares = got["byte_share_by_kind"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["1:1"] > 0.5

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pipeline.errors import DistillError
from pipeline.text.packing import RowPacker, RowRule, row_rule, tokenizer_adds_bos
from tests.conftest import TOKENIZER, bos_tokenizer

EOS, BOS = 1, 2


def packed(docs, seq_len, rows_per_shard, **starts):
    packer = RowPacker(seq_len, rows_per_shard, EOS, **starts)
    shards = []
    for doc in docs:
        packer.add_document(doc)
        shards += list(packer.full_shards())
    shards += list(packer.finish())
    return np.concatenate([s["input_ids"] for s in shards])


@pytest.mark.parametrize("rows_per_shard", [1, 3, 100])
@pytest.mark.parametrize("document_start,row_start", [(None, None), (BOS, None), (BOS, BOS), (None, BOS)])
def test_starts_keep_every_target_once_and_replace_only_mid_document_row_starts(rows_per_shard, document_start,
                                                                                  row_start):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 50, size=n)) for n in (1, 9, 4, 13, 2, 7, 20, 3)]
    rows = packed(docs, 6, rows_per_shard, document_start_id=document_start, row_start_id=row_start)
    start = [] if document_start is None else [document_start]
    stream = np.concatenate([start + d + [EOS] for d in docs])
    doc_start = np.zeros(len(stream), dtype=bool)
    doc_start[0] = True
    doc_start[1:] = stream[:-1] == EOS
    stride = 5
    # every stream token after the first is the target of exactly one position, as without starts
    np.testing.assert_array_equal(rows[:, 1:].reshape(-1), stream[1:len(rows) * stride + 1])
    replaced = 0
    for r, row in enumerate(rows):
        first = stream[r * stride]
        inside = not doc_start[r * stride] and first != EOS  # its first two tokens in one document
        assert row[0] == (row_start if row_start is not None and inside else first), (r, row, first)
        replaced += row_start is not None and inside
    assert replaced >= (5 if row_start is not None else 0)


def test_position_ids_restart_after_each_eos():
    ids = torch.tensor([[5, 6, EOS, BOS, 7, 8, EOS, EOS, BOS], [EOS, BOS, 3, 4, 5, 6, 7, 8, 9]])
    rule = RowRule("bos", "bos", "document", BOS, EOS)
    assert rule.position_ids(ids).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert RowRule("bos", "bos", "causal", BOS, EOS).position_ids(ids) is None
    # a BOS is never a target; EOS is
    assert rule.target_mask(ids)[0].tolist() == [True, True, False, True, True, True, True, False]
    assert RowRule().target_mask(ids) is None and RowRule.of({"seq_len": 8}) == RowRule()


def test_defaults_follow_the_tokenizer_and_the_default_records_nothing(tmp_path):
    project = AutoTokenizer.from_pretrained(str(TOKENIZER))
    llama = AutoTokenizer.from_pretrained(str(bos_tokenizer(tmp_path / "llama", "llama")))
    assert not tokenizer_adds_bos(project) and tokenizer_adds_bos(llama)
    assert row_rule(project, "", "", "causal", text=True).params() == {}  # today's stores, unchanged
    rule = row_rule(llama, "", "", "causal", text=True)
    assert rule.params() == {"document_start": "bos", "row_start": "bos", "attention": "causal",
                             "bos_token_id": llama.bos_token_id, "eos_token_id": llama.eos_token_id}
    assert RowRule.of(rule.params()) == rule
    assert row_rule(llama, "none", "", "document", text=True).params() == {
        "document_start": "none", "row_start": "none", "attention": "document", "eos_token_id": llama.eos_token_id}
    assert row_rule(llama, "", "", "causal", text=False) == RowRule()  # task examples keep their rows
    with pytest.raises(DistillError, match="BOS is its EOS"):
        row_rule(project, "bos", "", "causal", text=True)
    with pytest.raises(DistillError, match="--format text"):
        row_rule(llama, "", "", "document", text=False)


def test_a_row_rule_distill_does_not_write_is_refused():
    good = {"document_start": "bos", "row_start": "none", "attention": "document", "eos_token_id": EOS,
            "bos_token_id": BOS}
    assert RowRule.of(good) == RowRule("bos", "none", "document", BOS, EOS)
    for bad in ({"attention": "documents"}, {"bos_token_id": None}, {"row_start": None}, {"eos_token_id": None}):
        with pytest.raises(DistillError, match="row rule is not one distill writes"):
            RowRule.of(good | bad)

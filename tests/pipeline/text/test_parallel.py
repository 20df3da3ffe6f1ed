"""Tokenizing in worker processes (pipeline/text/parallel.py): the same ids, in the order given."""

import numpy as np
from transformers import AutoTokenizer

from pipeline.text.parallel import BatchEncoder
from tests.conftest import TOKENIZER


def test_workers_give_the_ids_of_one_process_in_order(heldout_docs):
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    batches = [heldout_docs[i:i + 7] for i in range(0, 140, 7)] + [[""], ["<|endoftext|> inside a text"]]
    with BatchEncoder(tokenizer, 1) as one:
        expected = list(one.map(iter(batches), lambda b: b))
    with BatchEncoder(tokenizer, 2) as two:
        got = list(two.map(iter(batches), lambda b: b))  # 22 batches through at most 4 in flight
        assert two.pool is not None
    assert two.pool is None  # closed on leaving the block
    assert [b for b, _ in got] == batches
    for (_, ids_one), (_, ids_two) in zip(expected, got):
        assert len(ids_one) == len(ids_two)
        for a, b in zip(ids_one, ids_two):
            np.testing.assert_array_equal(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    assert sum(len(ids) for _, batch in got for ids in batch) > 10_000


def test_an_error_in_the_batches_stops_the_workers(heldout_docs):
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))

    def batches():
        yield heldout_docs[:5]
        raise ValueError("bad input after the first batch")

    encoder = BatchEncoder(tokenizer, 2)
    try:
        list(encoder.map(batches(), lambda b: b))
    except ValueError as e:
        assert "bad input" in str(e)
    else:
        raise AssertionError("the error did not reach the caller")
    finally:
        encoder.close()
    assert encoder.pool is None

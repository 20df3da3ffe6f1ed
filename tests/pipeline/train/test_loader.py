"""The loader's order: every row once per epoch, batches mixed across chunks, exact resume, ranks."""

import numpy as np
import pytest

from pipeline.store import contract as store
from pipeline.train.loader import Loader

CHUNK = 8


@pytest.fixture(params=store.BACKENDS)
def numbered(tmp_path, request):
    """A store of 3 shards (40 + 40 + 13 rows) whose row r holds the number r in every position."""
    backend = request.param
    root = tmp_path / "s"
    root.mkdir()
    entries, first = [], 0
    for i, rows in enumerate((40, 40, 13)):
        ids = np.repeat(np.arange(first, first + rows, dtype=np.uint16)[:, None], 4, axis=1)
        entries.append(store.write_shard(root, store.shard_name(i, backend), {"input_ids": ids}, backend,
                                         chunk_rows=CHUNK))
        first += rows
    index = store.new_index("tokens", backend, {"seq_len": 4, "chunk_rows": CHUNK}, entries,
                            arrays={"input_ids": {"dtype": "uint16", "shape": [4]}})
    store.write_index(root, index)
    return store.open_store(root)


def row_numbers(batch):
    ids = batch["input_ids"]
    assert ids.dtype.is_floating_point is False and (ids == ids[:, :1]).all()
    return ids[:, 0].tolist()


def take(loader, batches):
    return [row_numbers(next(loader)) for _ in range(batches)]


def test_each_epoch_visits_every_row_once_in_a_new_order(numbered):
    loader = Loader(numbered, batch_rows=31, seed=3, shuffle_chunks=4)
    seen = sum(take(loader, 6), [])  # 186 rows = two epochs of 93
    first, second = seen[:93], seen[93:]
    assert sorted(first) == list(range(93)) and sorted(second) == list(range(93))
    assert first != second


def test_batches_mix_rows_from_several_chunks(numbered):
    mixed = Loader(numbered, batch_rows=8, seed=0, shuffle_chunks=4)
    plain = Loader(numbered, batch_rows=8, seed=0, shuffle_chunks=1)
    chunks = lambda rows: len({r // CHUNK if r < 80 else 10 + (r - 80) // CHUNK for r in rows})
    assert all(chunks(b) >= 2 for b in take(mixed, 4))
    assert all(chunks(b) <= 2 for b in take(plain, 4))  # one chunk, or the seam of two


@pytest.mark.parametrize("stop", [1, 4, 7])
def test_resume_from_state_continues_the_same_sequence(numbered, stop):
    whole = take(Loader(numbered, batch_rows=10, seed=5, shuffle_chunks=3), 12)
    first = Loader(numbered, batch_rows=10, seed=5, shuffle_chunks=3)
    head = take(first, stop)
    state = first.state()
    rest = take(Loader(numbered, 10, 5, epoch=state["epoch"], offset=state["offset"], shuffle_chunks=3), 12 - stop)
    assert head + rest == whole


def test_ranks_split_the_global_batch(numbered):
    one = take(Loader(numbered, batch_rows=12, seed=1, shuffle_chunks=2), 9)
    ranks = [take(Loader(numbered, batch_rows=6, seed=1, rank=r, world=2, shuffle_chunks=2), 9) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one


def test_worker_processes_give_the_same_batches(numbered):
    inline = take(Loader(numbered, batch_rows=16, seed=2), 7)
    pooled = Loader(numbered, batch_rows=16, seed=2, workers=1, prefetch=2)
    try:
        assert take(pooled, 7) == inline
    finally:
        pooled.close()


def open_files() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_a_store_of_more_shards_than_may_be_open_reads_the_same_and_closes(tmp_path):
    """A reader keeps at most ``max_open`` shards open (a zarr shard holds a descriptor per array; a
    store of thousands of shards read in shuffled order would exhaust the process's open files): the
    batches are those of an unbounded reader, and closing the loader closes every shard."""
    root = tmp_path / "many"
    root.mkdir()
    entries = []
    for i in range(12):
        ids = np.repeat(np.arange(i * 16, i * 16 + 16, dtype=np.uint16)[:, None], 4, axis=1)
        entries.append(store.write_shard(root, store.shard_name(i, "zarr"), {"input_ids": ids}, "zarr",
                                         chunk_rows=CHUNK))
    index = store.new_index("tokens", "zarr", {"seq_len": 4, "chunk_rows": CHUNK}, entries,
                            arrays={"input_ids": {"dtype": "uint16", "shape": [4]}})
    store.write_index(root, index)
    many = store.open_store(root)
    baseline = open_files()
    unbounded = Loader(many, batch_rows=24, seed=4, shuffle_chunks=4)
    unbounded.reader.max_open = 1000
    want = take(unbounded, 16)  # two epochs of 192 rows
    assert open_files() == baseline + 12  # every shard, one array each
    unbounded.close()
    assert open_files() == baseline
    bounded = Loader(many, batch_rows=24, seed=4, shuffle_chunks=4)
    bounded.reader.max_open = 3
    got = []
    for _ in range(16):
        got += take(bounded, 1)
        assert open_files() <= baseline + 3
    assert got == want
    bounded.close()
    assert open_files() == baseline

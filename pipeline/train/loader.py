"""Deterministic, resumable, rank-partitioned batches from a store, read chunk by chunk.

The unit of reading is a store chunk (``chunk_rows`` rows of one shard: one compressed zarr chunk
or one Arrow record batch), so every read decodes exactly what it uses. Each epoch visits every
row once: the chunks in an order drawn from an RNG seeded by ``(seed, epoch)``, cut into blocks of
``shuffle_chunks`` chunks whose rows are shuffled together. A global batch is the next ``batch_rows × world`` rows of that order; rank ``r``
takes the ``r``-th slice, so ranks read disjoint rows and ``world`` processes see exactly the
batches one process with the same global batch would. The position — ``(epoch, offset)``, the next
global row of the epoch — is all a checkpoint needs.

With ``workers > 0`` chunks are read and decoded in worker processes, ``prefetch`` batches ahead.
``transform`` (optional) maps each batch's arrays to new ones before they become tensors: a
deterministic function of the rows (cross-tokenizer stage two retokenizes the teacher's rows for
the student, ``pipeline/text/align.py``), so the resume position stays ``(epoch, offset)``.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing as mp
import signal
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.errors import DistillError
from pipeline.preempt import SIGNALS, held_back
from pipeline.store.contract import ShardReader, Store


class ChunkReader:
    """Reads one chunk of one shard; opens shards lazily (in whichever process it lives), keeping the
    ``max_open`` most recently read open (each holds a descriptor per array: a store of thousands of
    shards read in shuffled order would otherwise reach the process's limit of open files)."""

    def __init__(self, root: str, index: dict, fields: tuple[str, ...] | None = None, check: bool = True,
                 max_open: int = 32):
        self.root = Path(root)
        self.index = index
        self.fields = tuple(fields or index["arrays"])
        self.check = check
        self.max_open = max(1, max_open)
        self._open: collections.OrderedDict[int, ShardReader] = collections.OrderedDict()

    def read(self, shard: int, chunk: int) -> dict[str, np.ndarray]:
        """The chunk's arrays, checked against the index's CRC-32s (a one-line error if they differ)."""
        reader = self._open.get(shard)
        if reader is None:
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            reader = self._open[shard] = ShardReader(self.root, self.index, shard, self.fields, self.check)
        else:
            self._open.move_to_end(shard)
        return reader.read_chunk(chunk)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


_worker_reader: ChunkReader | None = None


def _die_with_parent() -> None:
    """A killed trainer (SIGKILL, a preempted job) must not leave its readers running (Linux only)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker_init(root: str, index: dict, fields: tuple[str, ...], check: bool) -> None:
    global _worker_reader
    _die_with_parent()
    # A batch system warns every process of the job (SIGUSR1, SIGTERM): the trainer stops at a whole
    # step (pipeline/preempt.py) and needs its readers until then; they end with its pool, or with it.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)
    _worker_reader = ChunkReader(root, index, fields, check)


def _worker_read(shard: int, chunk: int) -> dict[str, np.ndarray]:
    return _worker_reader.read(shard, chunk)


class Loader:
    """Yields this rank's ``[batch_rows, ...]`` tensors of the store's arrays (all, or ``fields``);
    token ids as int64. Every chunk is checked against the store's CRC-32s as it is decoded (``check=False``
    skips that, for the benchmark that measures its cost)."""

    def __init__(self, store: Store, batch_rows: int, seed: int, rank: int = 0, world: int = 1,
                 epoch: int = 0, offset: int = 0, workers: int = 0, prefetch: int = 4,
                 fields: tuple[str, ...] | None = None, shuffle_chunks: int = 16, check: bool = True,
                 transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None):
        self.store, self.batch_rows, self.seed = store, batch_rows, seed
        self.transform = transform
        self.rank, self.world = rank, world
        self.epoch, self.offset = epoch, offset
        self.chunk_rows = store.params["chunk_rows"]
        self.block = max(1, shuffle_chunks)
        # (shard, chunk, rows) for every chunk of the store
        self.units = [(s, c, min(self.chunk_rows, entry["rows"] - c * self.chunk_rows))
                      for s, entry in enumerate(store.shards)
                      for c in range(-(-entry["rows"] // self.chunk_rows))]
        self.rows_per_epoch = sum(u[2] for u in self.units)
        if self.rows_per_epoch < batch_rows * world:
            raise DistillError(f"store {store.root} has {self.rows_per_epoch} rows, fewer than one global batch "
                               f"of {batch_rows * world}; lower the batch size")
        self._plan_epoch = -1
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        fields = tuple(fields or store.index["arrays"])
        self.reader = ChunkReader(str(store.root), store.index, fields, check)
        self.pool = None
        if workers > 0:
            from multiprocessing import resource_tracker

            with held_back():  # the pool's queues start it; it must outlive a pre-emption warning
                resource_tracker.ensure_running()
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                               initargs=(str(store.root), store.index, fields, check))
        self.prefetch = max(1, prefetch)
        self._pending: dict[tuple[int, int], object] = {}  # (epoch, ordered unit) -> future or arrays

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "shuffle_chunks": self.block}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
        self.reader.close()

    # -- the order ------------------------------------------------------------------------------
    # An epoch orders the chunks by a permutation drawn from (seed, epoch) and cuts that order
    # into blocks of ``shuffle_chunks`` chunks; the rows of each block are permuted together, so
    # a batch mixes rows from up to that many places in the corpus (a corpus stored in source
    # order would otherwise give batches of one document). Memory: about two blocks of chunks.
    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit order, first epoch row of each block)."""
        if self._plan_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
            sizes = np.array([self.units[u][2] for u in order])
            block_sizes = np.add.reduceat(sizes, np.arange(0, len(sizes), self.block))
            self._plan_cache = (order, np.concatenate([[0], np.cumsum(block_sizes)[:-1]]))
            self._plan_epoch = epoch
        return self._plan_cache

    def _block_rows(self, epoch: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(ordered unit index, row within that chunk) of every row of block ``b``, in epoch order."""
        key = (epoch, b)
        if key not in self._blocks:
            order, _ = self._plan(epoch)
            first = b * self.block
            members = range(first, min(first + self.block, len(order)))
            unit = np.concatenate([np.full(self.units[order[i]][2], i) for i in members])
            local = np.concatenate([np.arange(self.units[order[i]][2]) for i in members])
            perm = np.random.default_rng([self.seed, epoch, b]).permutation(len(unit))
            self._blocks[key] = (unit[perm], local[perm])
        return self._blocks[key]

    def _pieces(self, epoch: int, offset: int, count: int):
        """[(epoch, ordered unit indices, rows within their chunks)] covering ``count`` rows from ``offset``."""
        pieces = []
        while count:
            _, block_starts = self._plan(epoch)
            b = int(np.searchsorted(block_starts, offset, side="right") - 1)
            unit, local = self._block_rows(epoch, b)
            within = offset - block_starts[b]
            take = min(count, len(unit) - within)
            pieces.append((epoch, unit[within:within + take], local[within:within + take]))
            count -= take
            offset += take
            if offset == self.rows_per_epoch:
                epoch, offset = epoch + 1, 0
        return pieces

    def _advance(self, epoch: int, offset: int, count: int) -> tuple[int, int]:
        offset += count
        while offset >= self.rows_per_epoch:
            epoch, offset = epoch + 1, offset - self.rows_per_epoch
        return epoch, offset

    # -- reading --------------------------------------------------------------------------------
    def _request(self, epoch: int, i: int) -> None:
        key = (epoch, i)
        if key in self._pending:
            return
        shard, chunk, _ = self.units[self._plan(epoch)[0][i]]
        if self.pool is None:
            self._pending[key] = self.reader.read(shard, chunk)
        else:
            self._pending[key] = self.pool.submit(_worker_read, shard, chunk)

    def _get(self, epoch: int, i: int) -> dict[str, np.ndarray]:
        self._request(epoch, i)
        value = self._pending[(epoch, i)]
        if isinstance(value, cf.Future):
            value = value.result()
            self._pending[(epoch, i)] = value
        return value

    def _my_span(self, epoch: int, offset: int) -> tuple[int, int, int]:
        """Where this rank's rows of the global batch starting at (epoch, offset) begin."""
        e, o = self._advance(epoch, offset, self.rank * self.batch_rows)
        return e, o, self.batch_rows

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        global_rows = self.batch_rows * self.world
        # Ask for the chunks of the next few batches first, so workers decode ahead.
        e, o = self.epoch, self.offset
        for _ in range(self.prefetch):
            for pe, units, _ in self._pieces(*self._my_span(e, o)):
                for i in np.unique(units):
                    self._request(pe, int(i))
            e, o = self._advance(e, o, global_rows)
        pieces = self._pieces(*self._my_span(self.epoch, self.offset))
        out: dict[str, np.ndarray] = {}
        at = 0
        for pe, units, local in pieces:
            for i in np.unique(units):
                where = np.nonzero(units == i)[0]
                for k, v in self._get(pe, int(i)).items():
                    if k not in out:
                        out[k] = np.empty((self.batch_rows, *v.shape[1:]), v.dtype)
                    out[k][at + where] = v[local[where]]
            at += len(units)
        self.epoch, self.offset = self._advance(self.epoch, self.offset, global_rows)
        # Drop chunks and block plans that lie wholly behind the position.
        current = self._current_block()
        for key in [k for k in self._pending if (k[0], k[1] // self.block) < current]:
            del self._pending[key]
        for key in [k for k in self._blocks if k < current]:
            del self._blocks[key]
        if self.transform is not None:
            out = self.transform(out)
        return {k: torch.from_numpy(_as_torch(v)) for k, v in out.items()}

    def _current_block(self) -> tuple[int, int]:
        _, block_starts = self._plan(self.epoch)
        return (self.epoch, int(np.searchsorted(block_starts, self.offset, side="right") - 1))


def _as_torch(array: np.ndarray) -> np.ndarray:
    """Token ids become int64 (what embeddings and gathers take); floats keep their type."""
    return array.astype(np.int64) if array.dtype.kind in "ui" else array


def sequential(store: Store, batch_rows: int, max_rows: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The store's rows in order (evaluation), at most ``max_rows`` of them."""
    left = store.rows if max_rows is None else min(max_rows, store.rows)
    for i in range(len(store.shards)):
        data = store.read_shard(i)
        rows = next(iter(data.values())).shape[0]
        for start in range(0, rows, batch_rows):
            if left <= 0:
                return
            stop = min(start + batch_rows, rows, start + left)
            left -= stop - start
            yield {k: torch.from_numpy(_as_torch(v[start:stop])) for k, v in data.items()}

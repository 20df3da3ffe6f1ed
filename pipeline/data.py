"""Deterministic, resumable batches of rows from a store.

Each epoch visits every row once: shards in a shuffled order, rows shuffled within each shard, both
drawn from an RNG seeded by ``(seed, epoch)`` alone. Reading shard by shard keeps memory at one or
two decoded shards and reads whole compressed chunks. The data position is ``(epoch, offset)`` —
the next sample of that epoch's order — which is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from pipeline.store import Store


class Batches:
    """Yield dicts of ``[batch_rows, ...]`` tensors (every array of the store) forever, in order."""

    def __init__(self, store: Store, batch_rows: int, seed: int, epoch: int = 0, offset: int = 0):
        self.store = store
        self.batch_rows = batch_rows
        self.seed = seed
        self.epoch, self.offset = epoch, offset
        self._order_epoch = -1
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            shard_ids, row_ids = [], []
            for shard in rng.permutation(len(self.store.shards)):
                rows = self.store.shards[shard]["rows"]
                shard_ids.append(np.full(rows, shard, dtype=np.int64))
                row_ids.append(rng.permutation(rows))
            self._shards, self._rows = np.concatenate(shard_ids), np.concatenate(row_ids)
            self._order_epoch = epoch
        return self._shards, self._rows

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._cache:
            if len(self._cache) >= 2:  # a batch spans at most two shards
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = self.store.read_shard(i)
        return self._cache[i]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        parts: list[dict[str, np.ndarray]] = []
        need = self.batch_rows
        while need:
            shards, rows = self._order(self.epoch)
            take = min(need, len(rows) - self.offset)
            sel_shards = shards[self.offset:self.offset + take]
            sel_rows = rows[self.offset:self.offset + take]
            for shard in np.unique(sel_shards):
                mask = sel_shards == shard
                data = self._shard(int(shard))
                parts.append({k: v[sel_rows[mask]] for k, v in data.items()})
            need -= take
            self.offset += take
            if self.offset == len(rows):
                self.epoch, self.offset = self.epoch + 1, 0
        return {k: torch.from_numpy(np.concatenate([p[k] for p in parts]).astype(_torch_dtype(parts[0][k])))
                for k in parts[0]}


def _torch_dtype(array: np.ndarray) -> np.dtype:
    """Token ids become int64 (what embeddings take); floats keep their type."""
    return np.dtype(np.int64) if array.dtype.kind in "ui" else array.dtype


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
            yield {k: torch.from_numpy(v[start:stop].astype(_torch_dtype(v))) for k, v in data.items()}

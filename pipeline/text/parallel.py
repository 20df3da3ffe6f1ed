"""Tokenizing batches of documents in ``--workers`` processes, results in the order given.

:class:`BatchEncoder` maps batches of texts to token ids. With one worker it calls the tokenizer in
this process (the fast tokenizer's ``encode_batch``, as prepare always has). With N it hands
batches to N worker processes, each holding its own copy of the tokenizer (the fast tokenizer's
JSON, so nothing of transformers is imported there) and tokenizing single-threaded
(``TOKENIZERS_PARALLELISM=false``: N processes on N cores, not N × cores threads), and gives the
results back in submission order; at most ``2N`` batches are in flight, so memory stays bounded by
them whatever the corpus size. Each worker returns a batch as two arrays (the documents' lengths and
their ids end to end), which cost little to send between processes compared with lists of ints.

Ids are the same whichever process computes them, so ``--workers`` never changes a store.
Workers start from a fork server that has imported this module alone: a second or so, not the
seconds a fresh interpreter importing torch would take.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

Batch = TypeVar("Batch")

_worker_encode: Callable[[list[str]], list[list[int]]] | None = None


def _fast_backend(tokenizer: Any):
    return tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else None


def encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """texts → token ids without special tokens, in one call of the fast tokenizer where there is one."""
    backend = _fast_backend(tokenizer)

    def encode(texts: list[str]) -> list[list[int]]:
        if backend is not None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]

    return encode


def _init_worker(fast_json: str | None, tokenizer: Any) -> None:
    global _worker_encode
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    if fast_json is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(fast_json)
        _worker_encode = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    else:
        _worker_encode = encoder(tokenizer)


def _encode_packed(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """In a worker: (lengths [D] int64, ids end to end [Σ lengths] uint32)."""
    encoded = _worker_encode(texts)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.uint32, count=int(lengths.sum()))
    return lengths, flat


def _unpack(lengths: np.ndarray, flat: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


class BatchEncoder:
    """``map(batches, texts_of)``: each batch with the token ids of ``texts_of(batch)``, in order."""

    def __init__(self, tokenizer: Any, workers: int = 1):
        self.workers = workers
        self.encode = encoder(tokenizer)
        self.pool = None
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            backend = _fast_backend(tokenizer)
            payload = (backend.to_str(), None) if backend is not None else (None, tokenizer)
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=payload)

    def map(self, batches: Iterator[Batch], texts_of: Callable[[Batch], list[str]]
            ) -> Iterator[tuple[Batch, list[list[int]] | list[np.ndarray]]]:
        if self.pool is None:
            for batch in batches:
                yield batch, self.encode(texts_of(batch))
            return
        in_flight: collections.deque = collections.deque()
        for batch in batches:
            in_flight.append((batch, self.pool.submit(_encode_packed, texts_of(batch))))
            if len(in_flight) >= 2 * self.workers:
                done, future = in_flight.popleft()
                yield done, _unpack(*future.result())
        while in_flight:
            done, future = in_flight.popleft()
            yield done, _unpack(*future.result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> "BatchEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

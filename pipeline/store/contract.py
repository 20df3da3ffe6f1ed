"""The store contract (format version 4, which seals the index; docs/FORMAT.md is the public description).

A store is a directory holding shards and an ``index.json``. Each shard is written under a temp
name and renamed into place; ``index.json`` is written last, atomically, and is the commit marker:
no index, no store. Every shard holds the same named arrays, sequence-major (rows first). The index
records the store's parameters and, per shard, its name, rows, bytes on disk and a content hash
(sha256 over the arrays' names, dtypes, shapes and C-order bytes, independent of the backend and
its compression) and, since format version 2, a CRC-32 of every chunk of every array. Every read
checks what it decodes against those CRCs (:class:`ShardReader`), so a flipped byte on disk stops a
run with one line naming the shard and chunk instead of training on it; opening a store checks
that every shard file is there with the size the index records.

Since format version 4 the index checks itself: it carries ``index_sha256``, the sha256 of its own
canonical body (:func:`index_digest`), and so does every partial index. Opening a store
(:func:`open_store`) refuses, in one line, an index whose digest does not match, whose bytes are not
what distill writes, that has an unknown or missing key, or whose parameters contradict the arrays
they describe (:func:`check_params`: draws, k and the grid's length against the shapes, the cache
temperature in the grid, rows and chunking against the shard list); each read checks that a chunk's
draw counts add up to N and that a top-k's mass, re-tempered to every grid temperature, is 1. Versions 1-3 carry no digest and are still read, with one warning that
the index is unchecked; a version-2/3 entry without its checksums is refused.

Kinds: ``tokens`` (stage 0: ``input_ids``, and for task examples ``loss_mask``; for sequences a
sampling policy wrote also ``behaviour_logprob``, the log-prob it gave each sampled token), and the
stage-one kinds, which copy those arrays: ``topk``, ``sampled`` and ``target`` (the teacher's
log-prob of each next token at the cache temperature alone, ``target_logprob``: what a
policy-gradient objective needs, about 4 bytes per token).

Backends: ``zarr`` (a zarr v3 group per shard, one sharding-codec shard per array, zstd) and
``arrow`` (an Arrow IPC file per shard, zstd; an array of shape ``[N, *S]`` is a column of
fixed-size lists of ``prod(S)`` values with ``S`` in the field metadata under ``shape``). Each
backend has one reader (:class:`ShardReader`), for whole shards and for the chunks the loader reads. It
decodes no more than the index declares (a zarr chunk into exactly its rows' bytes, an Arrow batch
only after its metadata says it holds the chunk's rows and no buffer decodes to more) and opens only
regular files of the store's own (:func:`store_file`: no link, FIFO or device), so a store from
someone else cannot exhaust memory, hang a read or be read through a link.

A store built in place by parallel jobs (stage one) has one partial index per job
(``index.part-JJJJJ-of-NNNNN.json``: params, backend, arrays and the job's finished shards);
:func:`merge_partial_indexes` writes ``index.json`` once they cover every shard. A tokens store
that ``distill prepare`` tasks fill has partial indexes too, recording stream pieces instead of
shards (``pieces``); ``stages.prepare.merge_tokens`` cuts the rows from them.
:func:`existing_store` is the one policy for an output directory that already holds something.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import DistillError
from pipeline.io import atomic_write_text, dir_bytes
from pipeline.store import arrow_ipc

# 4: index.json (and each partial index) carries index_sha256, a sha256 of its own canonical body, and
# every top-level key and shard-entry key is known; the loss_mask array needs no version of its own any
# more (a distill that predates 4 refuses every version-4 store). 4 is two bits from each of 1, 2 and 3
# (as an integer and as the ASCII digit), so no single flipped bit makes a version-4 index claim an
# older, unchecked version; and an older version may not carry index_sha256, so a flip elsewhere
# cannot either.
FORMAT_VERSION = 4
# 2: per-chunk CRC-32s in each shard's index entry; 3: version 2 plus a loss_mask array. Indexes of
# these versions carry no digest: they are still read, with one warning that the index is unchecked.
LEGACY_VERSIONS = (1, 2, 3)
READABLE_VERSIONS = (*LEGACY_VERSIONS, FORMAT_VERSION)
DIGEST = "index_sha256"
# the top-level keys of an index: always there, and the facts a stage may add (nothing else)
INDEX_KEYS = frozenset({"format_version", "kind", "backend", "codec", "params", "arrays", "rows", "bytes", "shards"})
INDEX_FACTS = frozenset({"documents", "tokens", "target_tokens", "dropped_tokens", "skipped_lines", "loss_tokens",
                         "padding_tokens", "skipped_inputs", "mixture"})
ENTRY_KEYS_V1 = frozenset({"name", "rows", "bytes", "sha256"})
ENTRY_KEYS = ENTRY_KEYS_V1 | {"chunk_rows", "crc32"}
PARTIAL_KEYS = frozenset({"params", "backend", "arrays", "shards"})
INDEX = "index.json"
KINDS = ("tokens", "topk", "sampled", "target")
# Arrays a tokens store may hold beside input_ids and that stage one copies row for row: the loss
# mask of task examples and, for sequences a sampling policy wrote (distill generate, then prepare
# --format ids), the log-prob that policy gave each sampled token (position t: token t+1's).
COPIED_ARRAYS = {"loss_mask": "uint8", "behaviour_logprob": "float32"}
BACKENDS = ("zarr", "arrow")
SUFFIX = {"zarr": ".zarr", "arrow": ".arrow"}
ZSTD_LEVEL = 3


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every id of a vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def chunk_checksums(arrays: dict[str, np.ndarray], chunk_rows: int) -> dict[str, list[int]]:
    """CRC-32 (zlib) of the C-order bytes of each ``chunk_rows`` rows of each array: what every read
    of a chunk is checked against. Computed from the arrays, so it is the same for both backends."""
    out = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        out[name] = [zlib.crc32(array[lo:lo + chunk_rows]) for lo in range(0, array.shape[0], chunk_rows)]
    return out


def shard_name(index: int, backend: str) -> str:
    return f"shard-{index:05d}{SUFFIX[backend]}"


# --------------------------------------------------------------------------------------------
# backends: write a finished shard under a temp path, read one back


def _write_zarr(path: Path, arrays: dict[str, np.ndarray], chunk_rows: int) -> None:
    import zarr
    from zarr.codecs import ZstdCodec

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, array in arrays.items():
        rows = max(array.shape[0], 1)
        chunk = min(chunk_rows, rows)
        shard_rows = math.ceil(rows / chunk) * chunk  # one sharding-codec shard: one file per array
        target = group.create_array(
            name,
            shape=array.shape,
            dtype=array.dtype,
            chunks=(chunk, *array.shape[1:]),
            shards=(shard_rows, *array.shape[1:]),
            compressors=ZstdCodec(level=ZSTD_LEVEL),
            fill_value=0,
        )
        target[...] = array


def _write_arrow(path: Path, arrays: dict[str, np.ndarray], chunk_rows: int) -> None:
    import pyarrow as pa

    fields, columns = [], []
    for name, array in arrays.items():
        inner = array.shape[1:]
        width = int(np.prod(inner)) if inner else 1
        values = pa.array(np.ascontiguousarray(array).reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, width) if inner else values
        fields.append(pa.field(name, column.type, nullable=False, metadata={"shape": json.dumps(list(inner))}))
        columns.append(column)
    table = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=ZSTD_LEVEL))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=chunk_rows)


WRITERS = {"zarr": _write_zarr, "arrow": _write_arrow}


# Reading a shard: what a shard's files may be and decode to is what the index declares. Every file is
# opened through store_file (a regular file of the store's own, never a link, FIFO or device), every
# zarr chunk is decoded into exactly the bytes its rows make, and every Arrow record batch's decoded
# buffer lengths are checked against its rows before pyarrow allocates them (docs/RELIABILITY.md,
# "Stores from someone else").

ZARR_META_LIMIT = 1 << 20  # an array's zarr.json is about 1 KB; a larger one is not a writer's
ZARR_EMPTY = 2 ** 64 - 1  # a sharding index entry (offset and length) for a chunk that was never written


class _Refused(ValueError):
    """A shard that claims more than its index declares, or is laid out otherwise than a writer lays
    it out: ``str`` is the problem, for :meth:`ShardReader._guard`'s one line."""


def zstd_bound(size: int) -> int:
    """The most bytes zstd stores ``size`` bytes in (``ZSTD_COMPRESSBOUND``): a chunk stored in more
    is not one zstd made."""
    return size + (size >> 8) + (((128 << 10) - size) >> 11 if size < 128 << 10 else 0)


def _zarr_chunk_rows(meta: Any, rows: int, chunk_rows: int, spec: dict[str, Any]) -> int:
    """The rows of each inner chunk of an array's ``zarr.json``, which must be what :func:`_write_zarr`
    writes for the index's rows, chunk_rows, dtype and shape: any other codec (gzip, blosc: decoders
    this reader does not bound), chunk or shard shape, dtype or fill would decide how much a chunk
    decodes to instead of the index."""
    chunk = min(chunk_rows, rows)
    shape = list(spec["shape"])
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    wanted = {
        "zarr_format": 3, "node_type": "array", "shape": [rows, *shape], "data_type": spec["dtype"],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [-(-rows // chunk) * chunk, *shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
    }
    if not isinstance(meta, dict):
        raise _Refused("is not a JSON object")
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise _Refused(f"has {key} {_short(meta.get(key))}, the index makes it {_short(value)}")
    if meta.get("fill_value") not in (0, 0.0) or isinstance(meta.get("fill_value"), bool):
        raise _Refused(f"has fill_value {_short(meta.get('fill_value'))}, a writer's is 0")
    if meta.get("storage_transformers", []) != []:
        raise _Refused("has storage_transformers, which a writer never adds")
    codecs = meta.get("codecs")
    sharding = codecs[0].get("configuration") if isinstance(codecs, list) and len(codecs) == 1 and \
        isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed" else None
    inner = sharding.get("codecs") if isinstance(sharding, dict) else None
    if not (isinstance(inner, list) and len(inner) == 2 and inner[0] in (little, {"name": "bytes"})
            and isinstance(inner[1], dict) and inner[1].get("name") == "zstd"
            and sharding.get("index_codecs") == [little, {"name": "crc32c"}]
            and sharding.get("index_location") == "end"):
        raise _Refused(f"has codecs {_short(codecs)}, not a sharding codec of zstd chunks as a writer writes")
    if sharding.get("chunk_shape") != [chunk, *shape]:
        raise _Refused(f"has chunk_shape {_short(sharding.get('chunk_shape'))}, the index makes it {[chunk, *shape]}")
    return chunk


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _ZarrArray:
    """One array of a zarr shard (one sharding-codec shard file), read without zarr: the shard's own
    index of chunk offsets is read once, then each chunk's stored bytes (no more than zstd makes of the
    chunk's rows) are decompressed into exactly the bytes the index's rows × dtype × shape make."""

    def __init__(self, root: Path, shard: str, name: str, spec: dict[str, Any], rows: int, chunk_rows: int):
        self.name = name
        meta = read_store_json(root, shard, name, "zarr.json", limit=ZARR_META_LIMIT)
        try:
            self.chunk = _zarr_chunk_rows(meta, rows, chunk_rows, spec)
        except _Refused as e:
            raise _Refused(f"{name}/zarr.json {e}") from None
        self.dtype, self.shape, self.rows = np.dtype(spec["dtype"]), tuple(spec["shape"]), rows
        self.chunk_bytes = self.chunk * math.prod(self.shape) * self.dtype.itemsize
        chunks = -(-rows // self.chunk)
        # one shard spans every row, so its key is c/0/…/0; no file at all is a shard of empty chunks
        self.fd = store_file(root, shard, name, "c", *["0"] * (1 + len(self.shape)), missing_ok=True)
        self.offsets = np.full((chunks, 2), ZARR_EMPTY, np.uint64)
        try:
            self._read_shard_index(name, chunks)
        except BaseException:
            self.close()
            raise

    def _read_shard_index(self, name: str, chunks: int) -> None:
        if self.fd is not None:
            size, table_bytes = os.fstat(self.fd).st_size, 16 * chunks + 4
            if size < table_bytes:
                raise _Refused(f"{name}'s shard file has {size} bytes, less than its index of {chunks} chunks")
            table = os.pread(self.fd, table_bytes, size - table_bytes)
            import google_crc32c  # what zarr checks the shard index with (a dependency of zarr)

            if google_crc32c.value(table[:-4]) != int.from_bytes(table[-4:], "little"):
                raise _Refused(f"{name}'s shard index fails its crc32c")
            self.offsets = np.frombuffer(table[:-4], "<u8").reshape(chunks, 2)
            self.data_end = size - table_bytes

    def _chunk(self, c: int) -> np.ndarray:
        """Inner chunk ``c``, all ``self.chunk`` rows (the last one padded with the fill, as written)."""
        offset, stored = (int(v) for v in self.offsets[c])
        if offset == stored == ZARR_EMPTY:
            return np.zeros((self.chunk, *self.shape), self.dtype)
        most = zstd_bound(self.chunk_bytes)
        if stored > most:
            raise _Refused(f"stores {stored} bytes of {self.name}, past zstd's bound of {most} for the "
                           f"{self.chunk_bytes} bytes its rows decode to")
        if offset + stored > self.data_end:
            raise _Refused(f"lies past the end of {self.name}'s shard data")
        raw = os.pread(self.fd, stored, offset)
        try:  # bounded: pyarrow decompresses into exactly chunk_bytes, refusing a frame that makes more or less
            decoded = _zstd().decompress(raw, decompressed_size=self.chunk_bytes)
        except (OSError, ValueError) as e:
            raise _Refused(f"does not decode to the {self.chunk_bytes} bytes of {self.name} its rows make "
                           f"({str(e).splitlines()[0][:80]})") from None
        return np.frombuffer(decoded, self.dtype.newbyteorder("<")).reshape(self.chunk, *self.shape)

    def read(self, lo: int, hi: int) -> np.ndarray:
        first, last = lo // self.chunk, -(-hi // self.chunk)
        if last - first == 1:
            base = first * self.chunk
            return self._chunk(first)[lo - base:hi - base]
        out = np.empty((hi - lo, *self.shape), self.dtype)
        for c in range(first, last):
            base = c * self.chunk
            a, b = max(lo, base), min(hi, base + self.chunk)
            try:
                out[a - lo:b - lo] = self._chunk(c)[a - base:b - base]
            except _Refused as e:  # a whole-shard read names the chunk, as a chunk read does
                raise _Refused(f"chunk {c} {e}") from None
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@functools.cache
def _zstd():
    import pyarrow as pa

    return pa.Codec("zstd")


class _ZarrShard:
    """A zarr shard opened for reading: the index's arrays (or ``fields``), each checked against the
    index as it opens; chunk ``c`` is rows ``[c·chunk_rows, (c+1)·chunk_rows)``."""

    def __init__(self, root: Path, index: dict[str, Any], entry: dict[str, Any], chunk_rows: int,
                 fields: tuple[str, ...] | None):
        self.rows, self.arrays = entry["rows"], {}
        try:
            for name in fields or index["arrays"]:
                if name not in index["arrays"]:
                    raise _Refused(f"is asked for an array '{name}' the index does not list")
                self.arrays[name] = _ZarrArray(root, entry["name"], name, index["arrays"][name], self.rows, chunk_rows)
        except BaseException:
            self.close()
            raise

    def read_all(self) -> dict[str, np.ndarray]:
        return {name: array.read(0, self.rows) for name, array in self.arrays.items()}

    def read_chunk(self, chunk: int, chunk_rows: int) -> dict[str, np.ndarray]:
        lo = chunk * chunk_rows
        if not 0 <= lo < self.rows:
            raise _Refused(f"has no chunk {chunk}")
        return {name: array.read(lo, min(lo + chunk_rows, self.rows)) for name, array in self.arrays.items()}

    def close(self) -> None:
        for array in self.arrays.values():
            array.close()


class _ArrowShard:
    """An Arrow IPC shard opened for reading; chunk ``c`` is record batch ``c``. The file's footer and
    schema are checked as it opens, each batch's metadata (:mod:`pipeline.store.arrow_ipc`) before
    pyarrow decodes it: its rows are the index's, and no buffer decodes to more than they make."""

    def __init__(self, root: Path, index: dict[str, Any], entry: dict[str, Any], chunk_rows: int,
                 fields: tuple[str, ...] | None):
        import pyarrow as pa

        os.close(store_file(root, entry["name"]))  # a regular file of the store's own, before it is mapped
        self.source = pa.memory_map(str(root / entry["name"]), "r")
        try:
            self.data = memoryview(self.source.read_buffer())  # the mapping itself: nothing is copied
            self.blocks = arrow_ipc.record_batch_blocks(self.data)
            self.rows, self.chunk_rows = entry["rows"], chunk_rows
            if len(self.blocks) != -(-self.rows // chunk_rows):
                raise _Refused(f"holds {len(self.blocks)} record batches, its {self.rows} rows in chunks of "
                               f"{chunk_rows} make {-(-self.rows // chunk_rows)}")
            self.file = pa.ipc.open_file(self.source)
            self.layout = _arrow_layout(self.file.schema, index["arrays"])
            self.fields = list(fields) if fields else None
            self.checked: set[int] = set()
        except BaseException:
            self.close()
            raise

    def _check(self, chunk: int) -> None:
        if chunk not in self.checked:
            rows = min(self.chunk_rows, self.rows - chunk * self.chunk_rows)
            nodes, caps = [], []
            # pyarrow's writer may keep up to Arrow's 64-byte padding of a sliced buffer (a small column is
            # written whole in each batch), never more: measured over 40,360 batches of every dtype and width
            padded = lambda size: -(-size // 64) * 64  # noqa: E731
            for name, width, itemsize in self.layout:
                if width is not None:
                    nodes += [rows, rows * width]
                    caps += [(f"{name} validity", padded(-(-rows // 8))),
                             (f"{name} validity", padded(-(-rows * width // 8))), (name, padded(rows * width * itemsize))]
                else:
                    nodes.append(rows)
                    caps += [(f"{name} validity", padded(-(-rows // 8))), (name, padded(rows * itemsize))]
            arrow_ipc.check_batch(arrow_ipc.read_batch(self.data, self.blocks[chunk]), rows, nodes, caps)
            self.checked.add(chunk)

    def read_all(self) -> dict[str, np.ndarray]:
        for chunk in range(len(self.blocks)):
            try:
                self._check(chunk)
            except arrow_ipc.IpcError as e:
                raise _Refused(f"chunk {chunk} {e}") from None
        table = self.file.read_all()
        return _arrow_arrays(table.select(self.fields) if self.fields else table)

    def read_chunk(self, chunk: int, chunk_rows: int) -> dict[str, np.ndarray]:
        if not 0 <= chunk < len(self.blocks):
            raise _Refused(f"has no chunk {chunk}")
        self._check(chunk)
        batch = self.file.get_batch(chunk)
        return _arrow_arrays(batch.select(self.fields) if self.fields else batch)

    def close(self) -> None:
        self.data = None
        self.source.close()


def _arrow_layout(schema, arrays: dict[str, Any]) -> list[tuple[str, int | None, int]]:
    """Each field of an IPC file's schema as ``(name, list width or None, itemsize)``: the index's
    arrays, each a column of its dtype (a fixed-size list of ``prod(shape)`` of them, ``shape`` being
    the index's per-row shape, also in the field's metadata), nothing else."""
    import pyarrow as pa

    names = [field.name for field in schema]
    if sorted(names) != sorted(arrays):
        raise _Refused(f"holds arrays {_short(names)}, the index lists {_short(sorted(arrays))}")
    layout = []
    for field in schema:
        spec = arrays[field.name]
        value = pa.from_numpy_dtype(np.dtype(spec["dtype"]))
        inner = list(spec["shape"])  # per row
        width = math.prod(inner) if inner else None
        shape = json.loads(field.metadata[b"shape"]) if field.metadata and b"shape" in field.metadata else None
        kind = field.type
        ok = (shape or []) == inner and (
            (width is None and kind == value) or
            (width is not None and pa.types.is_fixed_size_list(kind) and kind.list_size == width
             and kind.value_type == value))
        if not ok:
            raise _Refused(f"holds {field.name} as {kind} of shape {shape}, the index says {spec['dtype']}{spec['shape']}")
        layout.append((field.name, width, value.bit_width // 8))
    return layout


def _arrow_arrays(data) -> dict[str, np.ndarray]:
    """A table or record batch → arrays ``[N, *S]`` (``S`` from each field's ``shape`` metadata)."""
    out = {}
    for field in data.schema:
        inner = tuple(json.loads(field.metadata[b"shape"])) if field.metadata else ()
        column = data.column(field.name)
        if hasattr(column, "combine_chunks"):  # a table's column is chunked
            column = column.combine_chunks()
        values = column.flatten() if inner else column
        out[field.name] = values.to_numpy(zero_copy_only=False).reshape(data.num_rows, *inner)
    return out


OPENERS = {"zarr": _ZarrShard, "arrow": _ArrowShard}


def read_shard_file(path: Path, backend: str) -> dict[str, np.ndarray]:
    """Every array of one shard file, with no index, read the way a plain zarr or pyarrow user reads
    it: nothing bounds the decode, so this is for files this process wrote (the tests' and stage
    one's own checks); a store from elsewhere is read through :class:`ShardReader`."""
    if backend == "zarr":
        import zarr

        group = zarr.open_group(str(path), mode="r")
        return {name: np.asarray(array[...]) for name, array in group.arrays()}
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        return _arrow_arrays(pa.ipc.open_file(source).read_all())


READERS = {backend: functools.partial(read_shard_file, backend=backend) for backend in BACKENDS}


class ShardReader:
    """Shard ``shard`` of a committed store, opened once and read whole or a chunk at a time.

    The one place a shard's bytes are decoded, and every decoded chunk is checked against the CRC-32s
    and the dtypes and shapes the index records: a missing file, a decoder error or a mismatch
    becomes a one-line error naming the shard and chunk. Plain data (root, index, shard number), so
    a loader worker process can build its own. ``check=False`` skips the CRCs (the loader benchmark
    measures what they cost)."""

    def __init__(self, root: Path, index: dict[str, Any], shard: int, fields: tuple[str, ...] | None = None,
                 check: bool = True):
        self.root, self.index = Path(root), index
        self.entry = index["shards"][shard]
        self.name = self.entry["name"]
        self.chunk_rows = self.entry.get("chunk_rows") or index["params"]["chunk_rows"]
        self.check = check  # check=False also skips the counts and the teacher's mass
        self.sums = self.entry.get("crc32") if check else None
        if check and self.sums is None:
            unchecked_warning(self.root, index)
        params = index["params"]
        # what every position's counts add up to: N draws (a sampled store), M (a hybrid one's tail)
        self.draws = {"sample_counts": params.get("samples"), "tail_sample_counts": params.get("tail_samples")}
        self.grid = params.get("temperature_grid")
        self.temperature = params.get("temperature")
        path = safe_child(self.root, self.name)
        if not os.path.lexists(path):  # a dangling link is not missing: store_file refuses it as a link
            raise DistillError(f"store {self.root}: shard {self.name} is missing; {repair_hint(self.root, index)}")
        self._shard = self._guard(None, OPENERS[index["backend"]], self.root, index, self.entry, self.chunk_rows,
                                  fields)

    def read_all(self) -> dict[str, np.ndarray]:
        arrays = self._guard(None, self._shard.read_all)
        for c in range(-(-self.entry["rows"] // self.chunk_rows)):
            lo = c * self.chunk_rows
            self._check(c, {k: v[lo:lo + self.chunk_rows] for k, v in arrays.items()})
        return arrays

    def read_chunk(self, chunk: int, chunk_rows: int | None = None) -> dict[str, np.ndarray]:
        if chunk_rows not in (None, self.chunk_rows):
            raise ValueError(f"chunk_rows {chunk_rows} is not the store's {self.chunk_rows}")
        arrays = self._guard(chunk, self._shard.read_chunk, chunk, self.chunk_rows)
        self._check(chunk, arrays)
        return arrays

    def close(self) -> None:
        self._shard.close()

    check_seconds = 0.0  # time spent in the checks by this process (the loader benchmark reads it)

    def _check(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        started = time.perf_counter()
        self._check_arrays(chunk, arrays)
        ShardReader.check_seconds += time.perf_counter() - started

    def _check_arrays(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        lo = chunk * self.chunk_rows
        rows = min(self.chunk_rows, self.entry["rows"] - lo)
        for name, array in arrays.items():
            spec = self.index["arrays"].get(name)
            problem = None
            if spec is None:
                problem = f"holds an array '{name}' the index does not list"
            elif array.dtype != np.dtype(spec["dtype"]) or array.shape != (rows, *spec["shape"]):
                problem = (f"decodes {name} as {array.dtype}{list(array.shape)}, the index says "
                           f"{spec['dtype']}{[rows, *spec['shape']]}")
            elif self.sums is not None and zlib.crc32(np.ascontiguousarray(array)) != self.sums[name][chunk]:
                problem = f"fails its checksum in {name}"
            elif self.check and self.draws.get(name) is not None:
                problem = self._count_problem(name, array, self.draws[name])
            if problem:
                self._refuse(chunk, problem)
        # every array of the chunk is as written; do the index's temperatures describe them? They are the
        # whole store's, so the chunk's first row tells as well as all would, at 1/chunk_rows of the cost
        if self.check and {"topk_logprobs", "logsumexp", "tail_logmass"} <= set(arrays):
            problem = self._mass_problem(*(arrays[k][:1] for k in ("topk_logprobs", "logsumexp", "tail_logmass")))
            if problem:
                self._refuse(chunk, problem)

    def _refuse(self, chunk: int, problem: str) -> None:
        lo = chunk * self.chunk_rows
        rows = min(self.chunk_rows, self.entry["rows"] - lo)
        why = "the file is corrupt" if problem.startswith(("holds an", "decodes", "fails")) else \
            "the file or the index is corrupt"
        raise DistillError(f"store {self.root}: shard {self.name} chunk {chunk} (rows {lo}-{lo + rows - 1}) "
                           f"{problem}: {why}; {repair_hint(self.root, self.index)}")

    # How far from 1 a good store's mass may lie, per unit of the re-tempering factor T/T_g (≥ 1): float16
    # log-probs' rounding grows with it. Measured on the shipped teacher (top-64, grid 0.5-4): 0.0016 at
    # factor 2, 0.0075 at factor 4; a wrong temperature or grid value misses by 0.1-0.7.
    MASS_TOLERANCE = 0.01

    def _mass_problem(self, topk_logprobs: np.ndarray, logsumexp: np.ndarray, tail_logmass: np.ndarray) -> str | None:
        """At every grid temperature the kept probabilities, re-tempered from the cache temperature,
        plus the tail mass make 1 (``[rows, L, k]``, ``[rows, L, G]``, ``[rows, L, G]``): else the
        index's temperature or grid is not the one the log-probs were stored with."""
        if self.grid is None or self.temperature not in self.grid:
            return None
        cache = self.grid.index(self.temperature)
        # float32 is enough here: |z/T| ≲ 100 keeps the exponents to ~1e-5, far inside the tolerance
        logits_over_t = topk_logprobs.astype(np.float32) + logsumexp[..., cache, None]
        for g, t_g in enumerate(self.grid):
            kept = np.exp(logits_over_t * np.float32(self.temperature / t_g) - logsumexp[..., g, None]).sum(-1)
            total = kept + np.exp(tail_logmass[..., g])
            bad = ~(np.abs(total - 1.0) <= self.MASS_TOLERANCE * max(1.0, self.temperature / t_g))
            if bad.any():
                r, t = (int(i) for i in np.argwhere(bad)[0])
                return (f"holds a teacher distribution whose mass at T = {t_g:g} is {total[r, t]:.3g} at row {r} "
                        f"position {t}, not 1: the index's temperature {self.temperature:g} or grid "
                        f"({', '.join(f'{x:g}' for x in self.grid)}) is not what the log-probs were stored with")
        return None

    def _count_problem(self, name: str, counts: np.ndarray, draws: int) -> str | None:
        """Counts ``[rows, L, S]`` must add up to the draws at every position (a hybrid tail's also to 0,
        where the tail is empty): else the index's N is not the one the draws were made with."""
        sums = counts.sum(axis=-1, dtype=np.int64)
        bad = (sums != draws) & ((sums != 0) | (name == "sample_counts"))
        if not bad.any():
            return None
        r, t = (int(i) for i in np.argwhere(bad)[0])
        param = "samples" if name == "sample_counts" else "tail_samples"
        return (f"holds {name} that add up to {int(sums[r, t])} at row {r} position {t}, the index says "
                f"{param} = {draws}")

    def _guard(self, chunk: int | None, fn, *args):
        where = f" chunk {chunk}" if chunk is not None else ""
        try:
            return fn(*args)
        except DistillError:  # a file that is not the store's own (store_file) says so itself
            raise
        except (_Refused, arrow_ipc.IpcError) as e:  # claims more than the index declares, or another layout
            raise DistillError(f"store {self.root}: shard {self.name}{where} {e}: the file is corrupt or not what a "
                               f"writer writes; {repair_hint(self.root, self.index)}") from None
        except Exception as e:  # any decoder error means the bytes on disk are not what was written
            raise DistillError(f"store {self.root}: shard {self.name}{where} is corrupt ({type(e).__name__}); "
                               f"{repair_hint(self.root, self.index)}") from None


def repair_hint(root: Path, index: dict[str, Any]) -> str:
    """What to do about a bad shard: a stage-one store is repaired shard by shard, a tokens store rebuilt."""
    if index.get("kind") == "tokens":
        return "rebuild the tokens store (distill prepare ... --overwrite)"
    return (f"run 'distill inspect {root} --verify --repair', then rerun the stage-one command "
            "(or the array tasks that own the bad shards) to recompute them")


_warned: set[str] = set()


def unchecked_warning(root: Path, index: dict[str, Any]) -> None:
    """Once per store: a version-1 store has no chunk checksums, so its reads cannot be checked."""
    if str(root) not in _warned:
        _warned.add(str(root))
        print(f"distill: store {root} is format version {index.get('format_version')}: its chunks carry no "
              f"checksums, so reads are not checked; 'distill inspect {root} --verify' checks its content hashes, "
              "rebuilding the store adds checksums", file=sys.stderr)


_warned_unsealed: set[str] = set()


def unsealed_warning(root: Path, index: dict[str, Any]) -> None:
    """Once per store: an index older than version 4 carries no digest of its own, so an edit or a
    flipped bit in it is caught only where it contradicts the data (:func:`check_params`)."""
    if str(root) not in _warned_unsealed:
        _warned_unsealed.add(str(root))
        print(f"distill: store {root} is format version {index['format_version']}: its {INDEX} carries no "
              f"{DIGEST}, so the index itself is unchecked; {index_hint(root, index['kind'])} to add one",
              file=sys.stderr)


def write_shard(root: Path, name: str, arrays: dict[str, np.ndarray], backend: str,
                chunk_rows: int = 256) -> dict[str, Any]:
    """Write one immutable shard into ``root`` (temp name, then rename); return its index entry."""
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1:
        raise ValueError(f"arrays of one shard must have the same number of rows, got {sorted(rows)}")
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        WRITERS[backend](tmp, arrays, chunk_rows)
        _fsync_tree(tmp)  # bytes on disk before the shard gets its final name (a crash never shows a torn one)
    except BaseException:
        _remove(tmp)  # a failed write (a full disk) leaves nothing behind
        raise
    if final.exists():  # a half-finished earlier run of the same job: the new shard replaces it
        _remove(final)
    os.replace(tmp, final)
    return {"name": name, "rows": rows.pop(), "bytes": dir_bytes(final), "sha256": content_hash(arrays),
            "chunk_rows": chunk_rows, "crc32": chunk_checksums(arrays, chunk_rows)}


def _fsync_tree(path: Path) -> None:
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        with open(file, "rb+") as f:
            os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):  # a link is removed itself, never what it points to
        path.unlink()


def index_digest(body: dict[str, Any]) -> str:
    """sha256 of an index's canonical body: everything but ``index_sha256``, as
    ``json.dumps(..., sort_keys=True, separators=(",", ":"))`` (ASCII) encodes it. A plain reader
    checks an index with these few lines (docs/FORMAT.md)."""
    canonical = json.dumps({k: v for k, v in body.items() if k != DIGEST}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def sealed_text(body: dict[str, Any]) -> str:
    """The bytes distill writes for an index or partial index: the body with its digest, indented."""
    return json.dumps({**body, DIGEST: index_digest(body)}, indent=2, sort_keys=True) + "\n"


def write_index(root: Path, index: dict[str, Any]) -> None:
    """Commit a store: ``index.json`` (sealed with its digest) written last, atomically."""
    atomic_write_text(root / INDEX, sealed_text(index))


def read_sealed(path: Path, what: str, hint: str | Callable[[], str]) -> tuple[dict[str, Any], bool]:
    """An index file's body and whether it carries a digest. A file that is not UTF-8 JSON of an
    object, whose digest does not match its body, or that is not byte for byte what distill writes
    for that body (an edit, a flipped bit that still parses) is one line naming ``what`` and ``hint``
    (a callable is asked only when there is something to say)."""

    def refuse(problem: str) -> DistillError:
        return DistillError(f"{what} {problem}; {hint() if callable(hint) else hint}")

    try:
        text = read_store_file(path.parent, path.name, limit=INDEX_LIMIT).decode("utf-8")  # no link, FIFO or device
        body = json.loads(text)
    except UnicodeDecodeError:
        raise refuse("is not UTF-8 (damaged)") from None
    except (json.JSONDecodeError, RecursionError):
        raise refuse("does not parse") from None
    if not isinstance(body, dict):
        raise refuse("does not hold a JSON object (damaged)")
    if DIGEST not in body:
        return body, False
    if not isinstance(body[DIGEST], str) or body[DIGEST] != index_digest(body):
        raise refuse(f"does not match its {DIGEST} (edited or damaged since it was written)")
    if text != sealed_text(body):
        raise refuse("is not byte for byte as distill wrote it (edited or damaged)")
    return body, True


def index_hint(root: Path, kind: Any = None) -> str:
    """How to get a good index back: a stage-one store's from its partial indexes, else a rerun."""
    if kind == "tokens":
        return "rebuild the tokens store (distill prepare ... --overwrite)"
    if root.is_dir() and any(PARTIAL_NAME.match(p.name) for p in root.glob(PARTIAL_GLOB)):
        return f"rewrite it from the partial indexes with 'distill merge {root}'"
    return "rerun the stage-one jobs that wrote the store (or distill prepare for a tokens store) with --overwrite"


def new_index(kind: str, backend: str, params: dict[str, Any], shards: list[dict[str, Any]],
              arrays: dict[str, dict[str, Any]], **facts: Any) -> dict[str, Any]:
    """The index of a complete store. ``params`` are what decide the content (a rerun with other
    params is refused); ``arrays`` maps each array to its dtype and per-row shape; ``facts`` are
    measured extras (token counts)."""
    if kind not in KINDS:
        raise ValueError(f"unknown store kind {kind}")
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "backend": backend,
        "codec": f"zstd-{ZSTD_LEVEL}",
        "params": params,
        "arrays": arrays,
        "rows": sum(s["rows"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        **facts,
    }


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class Store:
    """A committed store: its index and random access to its shards."""

    root: Path
    index: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.index["kind"]

    @property
    def params(self) -> dict[str, Any]:
        return self.index["params"]

    @property
    def rows(self) -> int:
        return self.index["rows"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.index["shards"]

    def shard_path(self, i: int) -> Path:
        return safe_child(self.root, self.shards[i]["name"])

    def read_shard(self, i: int, verify: bool = False) -> dict[str, np.ndarray]:
        """Every array of shard ``i``, each chunk checked; ``verify`` also checks the content hash."""
        entry = self.shards[i]
        reader = ShardReader(self.root, self.index, i)
        try:
            arrays = reader.read_all()
        finally:
            reader.close()
        if verify and content_hash(arrays) != entry["sha256"]:
            raise DistillError(f"store {self.root}: shard {entry['name']} fails its content hash; "
                               f"{repair_hint(self.root, self.index)}")
        return arrays

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Global rows ``[start, stop)`` across shard boundaries."""
        parts, offset = [], 0
        for i, entry in enumerate(self.shards):
            lo, hi = max(start, offset), min(stop, offset + entry["rows"])
            if lo < hi:
                data = self.read_shard(i)
                parts.append({k: v[lo - offset:hi - offset] for k, v in data.items()})
            offset += entry["rows"]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def check_files(self) -> None:
        """Every shard the index names is there with the size it records (cheap: one stat per file;
        contents are checked chunk by chunk as they are read)."""
        for i, entry in enumerate(self.shards):
            path = self.shard_path(i)
            if not os.path.lexists(path):
                raise DistillError(f"store {self.root}: shard {entry['name']} is missing; "
                                   f"{repair_hint(self.root, self.index)}")
            size = shard_bytes(self.root, entry["name"])  # also refuses a link, FIFO or device anywhere in it
            if size != entry["bytes"]:
                raise DistillError(f"store {self.root}: shard {entry['name']} has {size} bytes on disk, the index "
                                   f"records {entry['bytes']} (truncated or changed); {repair_hint(self.root, self.index)}")

    def bad_shards(self) -> dict[str, str]:
        """Every shard that is missing, of another size than recorded, fails a chunk's checksum or its
        content hash, or does not decode: ``{name: why}`` (reads the whole store)."""
        bad = {}
        for i, entry in enumerate(self.shards):
            try:
                Store(self.root, {**self.index, "shards": [entry]}).check_files()
                self.read_shard(i, verify=True)
            except DistillError as e:
                why = str(e).replace(f"store {self.root}: shard {entry['name']} ", "").split("; ")[0]
                bad[entry["name"]] = why.replace(f"store {self.root}: {entry['name']}/", "").replace(f"store {self.root}: ", "")
        return bad

    def verify(self) -> None:
        """Raise one line naming every bad shard (see :meth:`bad_shards`)."""
        bad = self.bad_shards()
        if bad:
            shown = "; ".join(f"{name} {why}" for name, why in list(bad.items())[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise DistillError(f"store {self.root}: {len(bad)} of {len(self.shards)} shards are bad ({shown}{more}); "
                               f"{repair_hint(self.root, self.index)}")


def safe_child(root: Path, name: str) -> Path:
    """``root / name`` for a plain entry name; an index may never point outside its store."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name
            or any(ord(c) < 32 for c in name)):  # a control character would break the one-line message too
        raise DistillError(f"store {root}: index names shard {name!r}, which is not a plain file name; "
                           "the index is corrupt or hostile: do not use this store; rebuild it from its source")
    return root / name


# What lstat says a store's entry is, where it is not what a writer leaves (a regular file or directory).
_NOT_OWN = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))
INDEX_LIMIT = 1 << 30  # bytes of an index or partial index: ~80 million chunk checksums, far past any store


def _not_own(root: Path, relative: str, mode: int, wanted: str) -> DistillError:
    what = next((name for test, name in _NOT_OWN if test(mode)), "not a regular file")
    return DistillError(f"store {root}: {relative} is {what}, not a {wanted}; a store holds only its own regular files "
                        "and directories: do not use it as it is (replace a link with a copy of what it points to, "
                        "or rebuild the store from its source)")


def store_file(root: Path, *parts: str, missing_ok: bool = False) -> int | None:
    """A read-only file descriptor for ``root/parts…``, opened only if it is what a writer leaves:
    every part a plain name, every directory on the way a real directory and the file a regular file
    (``lstat``: a link is refused, not followed, so nothing outside the store is read through one),
    then opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked again (``fstat``), so a FIFO swapped in
    meanwhile never blocks. The one way a reader opens a file of a store; ``None`` for a file that is
    not there where ``missing_ok``. Anything else is one line naming the file."""
    root, path = Path(root), Path(root)
    for i, part in enumerate(parts):
        safe_child(root, part)
        path = path / part
        relative = "/".join(parts[:i + 1])
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            if missing_ok:
                return None
            raise DistillError(f"store {root}: {relative} is missing; the store is incomplete or damaged: "
                               "rebuild it from its source") from None
        wanted_dir = i < len(parts) - 1
        if not (stat.S_ISDIR(mode) if wanted_dir else stat.S_ISREG(mode)):
            raise _not_own(root, relative, mode, "directory" if wanted_dir else "regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_own(root, "/".join(parts), mode, "regular file")
    return fd


def read_store_file(root: Path, *parts: str, limit: int) -> bytes:
    """The bytes of ``root/parts…`` (:func:`store_file`), refused unread where there are more than ``limit``."""
    fd = store_file(root, *parts)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise DistillError(f"store {root}: {'/'.join(parts)} has {size} bytes, more than the {limit} such a file "
                               "may have; the store is damaged or not one distill wrote: rebuild it from its source")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit)  # bounded even if it grew since fstat
    finally:
        os.close(fd)


def read_store_json(root: Path, *parts: str, limit: int) -> Any:
    try:
        return json.loads(read_store_file(root, *parts, limit=limit))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _Refused(f"{'/'.join(parts[1:])} does not parse") from None


def shard_bytes(root: Path, name: str) -> int:
    """A shard's bytes on disk, every entry under it looked at with ``lstat``: one that is not a real
    directory or regular file (a link, wherever it points; a FIFO; a device) is refused, naming it."""
    path = safe_child(root, name)
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode):
        return os.lstat(path).st_size
    if not stat.S_ISDIR(mode):
        raise _not_own(root, name, mode, "regular file or directory")
    total, pending = 0, [(path, name)]
    while pending:
        directory, relative = pending.pop()
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append((Path(entry.path), f"{relative}/{entry.name}"))
                elif stat.S_ISREG(mode):
                    total += entry.stat(follow_symlinks=False).st_size
                else:
                    raise _not_own(root, f"{relative}/{entry.name}", mode, "regular file or directory")
    return total


def open_store(path: str | os.PathLike, kind: str | None = None, check: bool = True) -> Store:
    """A committed store, its index checked (its digest, its keys, its shard list, and its parameters
    against the arrays they describe: :func:`check_index`); ``check`` also checks every shard file's
    presence and size."""
    root = Path(path)
    index_path = root / INDEX
    if not root.is_dir():
        raise DistillError(f"store {root} does not exist; run the stage that writes it first")
    if not os.path.lexists(index_path):
        raise DistillError(f"store {root} has no {INDEX} (unfinished or not a store); rerun the stage that writes it")
    index, sealed = read_sealed(index_path, f"store {root}: {INDEX}", lambda: index_hint(root))
    check_index(root, index, sealed)
    if kind is not None and index["kind"] != kind:
        raise DistillError(f"store {root} is a '{index['kind']}' store, expected a '{kind}' store; "
                           "pass the path of one (distill inspect STORE tells a store's kind)")
    if not sealed:
        unsealed_warning(root, index)
    store = Store(root, index)
    if check:
        store.check_files()
    return store


def check_index(root: Path, index: dict[str, Any], sealed: bool) -> None:
    """Everything about an index that can be checked without reading a shard, in the order that gives
    the most useful line: its version (and that a version-4 index has its digest, an older one none),
    its keys (none unknown, none missing), its shard list, then its parameters against its arrays."""
    version = index.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise DistillError(f"store {root} has format version {version}, this distill reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade distill or rebuild the store")
    hint = f"the index is damaged: {index_hint(root, index.get('kind'))}"
    if version >= FORMAT_VERSION and not sealed:
        raise DistillError(f"store {root}: {INDEX} is format version {version} but has no {DIGEST}; {hint}")
    if version < FORMAT_VERSION and sealed:
        raise DistillError(f"store {root}: {INDEX} says format version {version}, which has no {DIGEST}, "
                           f"but it carries one; {hint}")
    keys = set(index) - {DIGEST}
    unknown, missing = sorted(keys - INDEX_KEYS - INDEX_FACTS), sorted(INDEX_KEYS - keys)
    if unknown or missing:
        what = "; ".join(([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
                         + ([f"no {', '.join(missing)}"] if missing else []))
        raise DistillError(f"store {root}: {INDEX} has {what}; {hint}")
    if index["kind"] not in KINDS:
        raise DistillError(f"store {root}: unknown store kind {index['kind']!r}; {hint}")
    if index["backend"] not in BACKENDS:
        raise DistillError(f"store {root}: unknown backend {index['backend']!r}; {hint}")
    _check_entries(root, index)
    check_params(root, index)


def _is_int(value: Any, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _check_entries(root: Path, index: dict[str, Any]) -> None:
    """The index's shard list is one the writers could have written: plain, distinct names whose
    rows add up to the store's, each entry with exactly its version's keys (a version ≥ 2 entry
    without its checksums is refused, not read unchecked)."""
    hint = f"the index is corrupt: {index_hint(root, index.get('kind'))}"
    try:
        names = [entry["name"] for entry in index["shards"]]
        rows = sum(int(entry["rows"]) for entry in index["shards"])
        total = int(index["rows"])
        index["arrays"], index["params"]
    except (KeyError, TypeError, ValueError):
        raise DistillError(f"store {root}: {INDEX} lacks shard names, rows, arrays or params; "
                           "rerun the stage that writes it") from None
    for name in names:
        if not isinstance(name, str):
            raise DistillError(f"store {root}: {INDEX} names a shard {name!r}, not a file name; {hint}")
        safe_child(root, name)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DistillError(f"store {root}: {INDEX} lists shard {twice[0]} more than once; "
                           "the index is corrupt: rerun the stage that writes it")
    if rows != total:
        raise DistillError(f"store {root}: {INDEX}'s shards hold {rows} rows, it says {total}; "
                           "the index is corrupt: rerun the stage that writes it")
    arrays = index["arrays"]
    if not isinstance(arrays, dict) or not arrays or not isinstance(index["params"], dict):
        raise DistillError(f"store {root}: {INDEX}'s arrays or params are not what a writer writes; {hint}")
    version = index["format_version"]
    wanted = ENTRY_KEYS if version >= 2 else ENTRY_KEYS_V1
    for entry in index["shards"]:
        where = f"store {root}: {INDEX}'s entry of shard {entry['name']}"
        if set(entry) != wanted:
            what = sorted(set(entry) ^ wanted)
            raise DistillError(f"{where} has or lacks {', '.join(what)} (format version {version} entries hold "
                               f"{', '.join(sorted(wanted))}); {hint}")
        if not (_is_int(entry["rows"], 1) and _is_int(entry["bytes"]) and isinstance(entry["sha256"], str)):
            raise DistillError(f"{where} has rows {entry['rows']!r}, bytes {entry['bytes']!r}; {hint}")
        if version < 2:
            continue
        chunk_rows, sums = entry["chunk_rows"], entry["crc32"]
        if not _is_int(chunk_rows, 1):
            raise DistillError(f"{where} has chunk_rows {chunk_rows!r}; {hint}")
        chunks = -(-entry["rows"] // chunk_rows)
        if not isinstance(sums, dict) or set(sums) != set(arrays):
            raise DistillError(f"{where} has checksums of {sorted(sums) if isinstance(sums, dict) else sums!r}, "
                               f"the index's arrays are {sorted(arrays)}; {hint}")
        for name, crcs in sums.items():
            if (not isinstance(crcs, list) or len(crcs) != chunks
                    or not all(_is_int(c) and c < 2 ** 32 for c in crcs)):
                raise DistillError(f"{where} has {len(crcs) if isinstance(crcs, list) else crcs!r} checksums of "
                                   f"{name}, its {entry['rows']} rows make {chunks} chunks of {chunk_rows}; {hint}")
    if not _is_int(index["bytes"]) or index["bytes"] != sum(e["bytes"] for e in index["shards"]):
        raise DistillError(f"store {root}: {INDEX} says bytes {index['bytes']!r}, its shards' add up to "
                           f"{sum(e['bytes'] for e in index['shards'])}; {hint}")


def _mismatch(root: Path, param: str, value: Any, data: str, expected: Any, hint: str) -> DistillError:
    return DistillError(f"store {root}: {INDEX} says {param} = {value!r}, but {data} gives {expected!r}; {hint}")


def check_params(root: Path, index: dict[str, Any]) -> None:
    """The parameters agree with the arrays they describe: draws, k and the temperature grid's length
    with the arrays' shapes, seq_len and the vocabulary with every array, rows and chunking with the
    shard list, the cache temperature with the grid. One line naming the parameter and both values.
    (What the data cannot tell, such as which temperature or seed drew a sample, a version-4 index's
    digest guards.)"""
    hint = f"the index does not describe its data: {index_hint(root, index['kind'])}"
    _check_array_specs(root, index["arrays"], hint)
    _check_layout(root, index, hint)
    _check_copied(root, index["arrays"], hint)
    if index["kind"] == "tokens":
        seq_len = index["params"]["seq_len"]
        if "stride" in index["params"] and index["params"]["stride"] != seq_len - 1:
            raise _mismatch(root, "stride", index["params"]["stride"], "seq_len - 1", seq_len - 1, hint)
        if "target_tokens" in index and index["target_tokens"] != index["rows"] * (seq_len - 1):
            raise _mismatch(root, "target_tokens", index["target_tokens"], "rows x (seq_len - 1)",
                            index["rows"] * (seq_len - 1), hint)
    else:
        _check_stage_one(root, index, hint)


def _need(root: Path, params: dict[str, Any], name: str, hint: str, check=lambda v: _is_int(v, 1)) -> Any:
    """``params[name]``, which must pass ``check``: else one line naming it and its value."""
    value = params.get(name)
    if not check(value):
        raise DistillError(f"store {root}: {INDEX}'s params have {name} = {value!r}; {hint}")
    return value


def _check_array_specs(root: Path, arrays: dict[str, Any], hint: str) -> None:
    """Each array is described by a numpy dtype name and a per-row shape of positive whole numbers."""
    for name, spec in arrays.items():
        try:
            ok = (set(spec) == {"dtype", "shape"} and isinstance(spec["dtype"], str)
                  and np.dtype(spec["dtype"]).name == spec["dtype"] and isinstance(spec["shape"], list)
                  and all(_is_int(n, 1) for n in spec["shape"]))
        except TypeError:
            ok = False
        if not ok:
            raise DistillError(f"store {root}: {INDEX} describes array {name} as {spec!r}; {hint}")


def _check_copied(root: Path, arrays: dict[str, Any], hint: str) -> None:
    """The per-position arrays a tokens store hands on to stage one (:data:`COPIED_ARRAYS`): one value
    per position, of their dtype; a behaviour log-prob means nothing without the mask of the
    positions it is given at."""
    for name, dtype in COPIED_ARRAYS.items():
        spec = arrays.get(name)
        if spec is not None and (spec["dtype"] != dtype or len(spec["shape"]) != 1):
            raise DistillError(f"store {root}: {INDEX} describes {name} as {spec['dtype']}{spec['shape']}, "
                               f"it is {dtype} [seq_len]; {hint}")
    if "behaviour_logprob" in arrays and "loss_mask" not in arrays:
        raise DistillError(f"store {root}: {INDEX} lists behaviour_logprob without a loss_mask; {hint}")


def stage_one_kind(arrays: dict[str, Any]) -> str:
    """A stage-one store's kind as its arrays tell it (a merge or repair that has no index to ask):
    draws make it ``sampled``, a top-k ``topk``, the target log-prob alone ``target``."""
    if "sample_ids" in arrays:
        return "sampled"
    return "topk" if "topk_ids" in arrays or "logsumexp" in arrays else "target"


def _check_layout(root: Path, index: dict[str, Any], hint: str) -> None:
    """seq_len against every array, chunk_rows and rows_per_shard against the shard list, the
    vocabulary against the id arrays' dtypes."""
    kind, params, arrays, shards = index["kind"], index["params"], index["arrays"], index["shards"]
    seq_len = _need(root, params, "seq_len", hint)
    for name, spec in arrays.items():
        if spec["shape"][0] != seq_len:
            raise _mismatch(root, "seq_len", seq_len, f"array {name}'s shape {spec['shape']}", spec["shape"][0], hint)
    chunk_rows = params.get("chunk_rows")
    if index["format_version"] >= 2 or chunk_rows is not None:
        _need(root, params, "chunk_rows", hint)
        for entry in shards:
            if entry.get("chunk_rows", chunk_rows) != chunk_rows:
                raise _mismatch(root, "chunk_rows", chunk_rows, f"shard {entry['name']}'s entry",
                                entry["chunk_rows"], hint)
    if "rows_per_shard" in params or kind != "tokens":
        per_shard = _need(root, params, "rows_per_shard", hint)
        for j, entry in enumerate(shards):
            full = j < len(shards) - 1
            if entry["rows"] > per_shard or (full and entry["rows"] != per_shard):
                raise _mismatch(root, "rows_per_shard", per_shard, f"shard {entry['name']}'s rows",
                                entry["rows"], hint)
            if entry["name"] != shard_name(j, index["backend"]):
                raise DistillError(f"store {root}: {INDEX} lists shard {entry['name']} as shard {j}; {hint}")
    if "vocab_size" in params or kind != "tokens":
        vocab = _need(root, params, "vocab_size", hint)
        for name in ("input_ids", "topk_ids", "sample_ids", "tail_sample_ids"):
            if name in arrays and arrays[name]["dtype"] != token_dtype(vocab).name:
                raise _mismatch(root, "vocab_size", vocab, f"the dtype of {name}", arrays[name]["dtype"], hint)


def _check_stage_one(root: Path, index: dict[str, Any], hint: str) -> None:
    """A stage-one store: its rows and facts, its grid and cache temperature, which arrays it holds
    (they follow from kind and params) and their widths and dtypes (from top_k, N and the grid)."""
    kind, params, arrays = index["kind"], index["params"], index["arrays"]
    seq_len = params["seq_len"]
    rows = _need(root, params, "rows", hint)
    if rows != index["rows"]:
        raise _mismatch(root, "params.rows", rows, "the shard list", index["rows"], hint)
    for fact, per_row in (("tokens", seq_len), ("target_tokens", seq_len - 1)):
        if fact in index and index[fact] != rows * per_row:
            raise _mismatch(root, fact, index[fact], f"rows x {per_row}", rows * per_row, hint)
    grid = _need(root, params, "temperature_grid", hint, lambda v: isinstance(v, list) and v and all(
        type(t) in (int, float) and t > 0 for t in v))
    if grid != sorted(set(grid)):
        raise DistillError(f"store {root}: {INDEX}'s temperature_grid {grid} is not sorted and distinct; {hint}")
    temperature = _need(root, params, "temperature", hint, lambda v: type(v) in (int, float) and v > 0)
    if temperature not in grid:
        raise DistillError(f"store {root}: {INDEX}'s cache temperature {temperature:g} is not in its temperature_grid "
                           f"({', '.join(f'{t:g}' for t in grid)}); {hint}")
    logprob_dtype = params.get("logprob_dtype", "float16")
    expected = {name: None for name in ("input_ids", *COPIED_ARRAYS) if name in arrays}
    if kind == "target":  # the teacher's log-prob of each next token at T, nothing to re-temper or draw
        if grid != [temperature]:
            raise DistillError(f"store {root}: {INDEX}'s temperature_grid ({', '.join(f'{t:g}' for t in grid)}) is "
                               f"not the cache temperature {temperature:g} alone, as a target store's is; {hint}")
        odd = sorted(k for k in ("top_k", "samples", "tail_samples") if k in params)
        if odd:
            raise DistillError(f"store {root}: {INDEX}'s params have {', '.join(odd)}, which a target store "
                               f"does not draw or keep; {hint}")
        expected["target_logprob"] = None
        spec = arrays.get("target_logprob")
        if spec is not None and (spec["dtype"] != "float32" or len(spec["shape"]) != 1):
            raise DistillError(f"store {root}: {INDEX} describes target_logprob as {spec['dtype']}{spec['shape']}, "
                               f"a target store's is float32 [seq_len]; {hint}")
        if set(arrays) != set(expected):
            raise DistillError(f"store {root}: {INDEX}'s params call for arrays {', '.join(sorted(expected))}; "
                               f"its arrays differ in {', '.join(sorted(set(arrays) ^ set(expected)))}; {hint}")
        return
    if kind == "topk":
        top_k = _need(root, params, "top_k", hint)
        expected |= {"topk_ids": top_k, "topk_logprobs": top_k}
    draws, prefix = None, None
    if kind == "sampled":
        draws, prefix = _need(root, params, "samples", hint), "sample"
    elif "tail_samples" in params:
        draws, prefix = _need(root, params, "tail_samples", hint), "tail_sample"
    if draws is not None:
        with_logprobs = _need(root, params, "sample_logprobs", hint, lambda v: type(v) is bool)
        _need(root, params, "seed", hint, lambda v: _is_int(v))
        expected |= {f"{prefix}_ids": draws, f"{prefix}_counts": draws}
        if with_logprobs:
            expected[f"{prefix}_logprobs"] = draws
        counts = arrays.get(f"{prefix}_counts")
        if counts is not None and counts["dtype"] != ("uint8" if draws < 256 else "uint16"):
            raise _mismatch(root, f"{prefix}s", draws, f"the dtype of {prefix}_counts", counts["dtype"], hint)
    expected |= {"logsumexp": len(grid), "target_logprob": None}
    if kind == "topk":
        expected["tail_logmass"] = len(grid)
    if set(arrays) != set(expected):
        odd = sorted(set(arrays) ^ set(expected))
        raise DistillError(f"store {root}: {INDEX}'s params call for arrays {', '.join(sorted(expected))}; "
                           f"its arrays differ in {', '.join(odd)}; {hint}")
    params_of = {"topk_ids": "top_k", "topk_logprobs": "top_k", "logsumexp": "temperature_grid (length)",
                 "tail_logmass": "temperature_grid (length)"}
    for name, width in expected.items():
        spec = arrays.get(name)
        actual = spec["shape"][1] if spec is not None and len(spec["shape"]) > 1 else None
        if width is not None and actual != width:
            param = params_of.get(name, "samples" if prefix == "sample" else "tail_samples")
            value = grid if param.startswith("temperature_grid") else params.get(param)
            raise _mismatch(root, param, value, f"array {name}'s shape {arrays[name]['shape']}", actual, hint)
    for name in ("topk_logprobs", f"{prefix}_logprobs"):
        if name in arrays and arrays[name]["dtype"] != logprob_dtype:
            raise _mismatch(root, "logprob_dtype", logprob_dtype, f"the dtype of {name}", arrays[name]["dtype"], hint)


def param_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------------------
# building a store in place: what is already there, partial indexes of parallel jobs, merge

PARTIAL_INDEX = "index.part-{:05d}-of-{:05d}.json"
PARTIAL_GLOB = "index.part-*.json"


def partial_index_path(root: Path, job: int, jobs: int) -> Path:
    """Where job ``job`` of ``jobs`` records the shards it has finished."""
    return root / PARTIAL_INDEX.format(job, jobs)


def read_partial_index(path: Path) -> dict[str, Any]:
    """A partial index (``params``, ``backend``, ``arrays``, ``shards``), or ``{}`` where there is none.
    Its digest is checked (one written before version 4 has none and is read as it is); a damaged or
    edited one is one line saying how to get it back."""
    if not path.is_file():
        return {}
    hint = (f"delete it and rerun job {int(m.group(1))} of {int(m.group(2))} (it recomputes that job's shards)"
            if (m := PARTIAL_NAME.match(path.name)) else "delete it and rerun the stage-one job that wrote it")
    body, _ = read_sealed(path, f"partial index {path}", hint)
    keys = set(body) - {DIGEST}
    if keys not in (PARTIAL_KEYS, PARTIAL_KEYS | {"pieces"}) or not isinstance(body["shards"], list) or not isinstance(body["params"], dict):
        what = ", ".join(sorted(keys ^ PARTIAL_KEYS)) or "shards or params"
        raise DistillError(f"partial index {path} is damaged (keys: {what}); {hint}")
    return body


def write_partial_index(path: Path, params: dict[str, Any], backend: str, arrays: dict[str, Any],
                        shards: list[dict[str, Any]], pieces: dict[str, Any] | None = None) -> None:
    """Record a job's finished shards, atomically and sealed with a digest (called after each shard
    is renamed into place). A prepare task records its stream ``pieces`` instead (no shards; see
    ``stages/prepare.py``): the units of the corpus, the plan's digest, the ones it owns and the ones
    done, each with its file's name, bytes, sha256 and counts."""
    body = {"params": params, "backend": backend, "arrays": arrays,
            "shards": sorted(shards, key=lambda e: e["name"])}
    if pieces is not None:
        body["pieces"] = pieces
    atomic_write_text(path, sealed_text(body))


def _found(out: Path, kind: str, backend: str) -> dict[str, Any] | None:
    """What already lies in ``out`` (which :func:`outdir.claim` found to hold nothing but what a store
    writes), as ``kind``/``backend``/params to compare; None for nothing to compare."""
    if (out / INDEX).exists():
        store = open_store(out, check=False)
        return {"kind": store.kind, "backend": store.index["backend"], **store.params}
    if out.is_dir():
        for path in sorted(out.glob(PARTIAL_GLOB)):
            body = read_partial_index(path)
            if body:
                return {"kind": kind, "backend": body.get("backend"), **body["params"]}
    return None


def existing_store(out: Path, kind: str, backend: str, params: dict[str, Any], overwrite: bool) -> str:
    """The policy for a stage's ``--out`` that may already hold something, in one place:

    - ``"done"``: a complete ``kind`` store with this backend and these params is there; nothing to do;
    - ``"write"``: nothing there, or unfinished work of the same params to continue;
    - ``"replace"``: another store (or a damaged one) is there and ``overwrite`` says to replace it;
    - otherwise a one-line error saying what differs (nothing is touched).

    Anything in ``out`` that a store does not hold (:data:`outdir.STORE`) is refused first, with or
    without ``overwrite``: ``--overwrite`` replaces a store, never a directory of someone's files.
    """
    from pipeline.outdir import STORE, claim

    claim(out, STORE, overwrite)
    try:
        found = _found(out, kind, backend)
    except DistillError:
        if not overwrite:
            raise
        return "replace"
    if found is None:
        return "write"
    wanted = {"kind": kind, "backend": backend, **params}
    if found == wanted:
        return "done" if (out / INDEX).exists() else "write"
    if not overwrite:
        what = "; ".join(param_differences(found, wanted))
        raise DistillError(f"{out} already holds a store built differently ({what}); "
                           "pass --overwrite to replace it or choose another --out")
    return "replace"


def _open_lock(path: Path) -> int:
    """A descriptor of the lock file at ``path``, created if missing: never through a link
    (``O_NOFOLLOW``), and only a regular file of this user with one name, so that the truncate and
    write that follow cannot reach a file someone planted the lock's name on."""
    import errno
    import stat

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        what = {errno.ELOOP: "is a symbolic link", errno.EISDIR: "is a directory"}.get(e.errno, f"cannot be opened "
                                                                                               f"({e.strerror})")
        raise DistillError(f"lock {path} {what}: distill did not write it; check what it is and remove it, "
                           "then rerun") from None
    st = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
               else f"belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})" if st.st_uid != os.getuid()
               else f"has {st.st_nlink} names (a hard link to another file)" if st.st_nlink != 1 else None)
    if problem is not None:
        os.close(fd)
        raise DistillError(f"lock {path} {problem}: distill did not write it; check what it is and remove it, "
                           "then rerun")
    return fd


class JobLock:
    """Job ``job`` of ``jobs`` holds ``.lock.part-JJJJJ-of-NNNNN`` in the store (an exclusive
    ``flock``) while it writes, so a second process started for the same job (a resubmitted array
    task while the first still runs) stops at once instead of racing it for the same shards. The
    kernel drops the lock when the holder dies, so a killed job never leaves a stale one. (On a
    network filesystem this needs working ``flock``: NFSv4, Lustre mounted with ``flock``.)"""

    def __init__(self, root: Path, job: int, jobs: int):
        import fcntl
        import socket
        import time

        self.path = Path(root) / f".lock.part-{job:05d}-of-{jobs:05d}"
        self.fd = _open_lock(self.path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise DistillError(f"{root}: job {job} of {jobs} is already being written by {holder}; wait for it to "
                               "finish (or stop it) before rerunning this job") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())

    def remove_stale_temps(self, names: list[str]) -> int:
        """Delete what killed earlier runs of this job left under temp names (``.NAME.tmp-PID…``) for
        the files it owns: safe only while the lock is held. Returns how many were removed (a link
        among them is unlinked, never followed)."""
        from pipeline.outdir import remove_entry

        stale = [p for name in names for p in self.path.parent.glob(f".{name}.tmp-*")]
        for path in stale:
            remove_entry(path)
        return len(stale)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def merge_partial_indexes(root: Path, kind: str | None = None) -> Path:
    """Check that the partial indexes in ``root`` cover every shard exactly, then write ``index.json``.
    ``kind`` defaults to what the arrays say (:func:`stage_one_kind`)."""
    if not root.is_dir():
        raise DistillError(f"{root} does not exist; run distill teacher first")
    paths = sorted(root.glob(PARTIAL_GLOB))
    parts = [read_partial_index(p) for p in paths]  # each one's digest checked
    unsealed = [p.name for p, body in zip(paths, parts) if body and DIGEST not in body]
    if unsealed:
        print(f"distill: {root}: {len(unsealed)} partial index(es) ({', '.join(unsealed[:3])}) were written before "
              f"format version {FORMAT_VERSION} and carry no {DIGEST}: merged unchecked", file=sys.stderr)
    parts = [p for p in parts if p]
    if not parts:
        if (root / INDEX).exists():
            return root
        raise DistillError(f"{root} holds no partial indexes; run distill teacher first")
    if any("pieces" in p for p in parts):
        raise DistillError(f"{root} is a tokens store that distill prepare tasks are filling; seal it with "
                           f"distill merge {root}")
    params, backend, arrays = parts[0]["params"], parts[0]["backend"], parts[0]["arrays"]
    for part in parts[1:]:
        if part["params"] != params or part["backend"] != backend:
            what = "; ".join(param_differences(params, part["params"])) or "backend"
            raise DistillError(f"{root}: partial indexes were written with different parameters ({what}); "
                               "rerun the odd jobs with the same options")
    entries: dict[str, dict] = {}
    for part in parts:
        for entry in part["shards"]:
            safe_child(root, entry["name"])
            if entry["name"] in entries and entries[entry["name"]]["sha256"] != entry["sha256"]:
                raise DistillError(f"{root}: shard {entry['name']} recorded twice with different content")
            entries[entry["name"]] = entry
    n_total = math.ceil(params["rows"] / params["rows_per_shard"])
    names = [shard_name(j, backend) for j in range(n_total)]
    missing = [n for n in names if n not in entries or not (root / n).exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DistillError(f"{root}: {len(missing)} of {n_total} shards are not finished ({shown}); "
                           "rerun the jobs that own them")
    shards = [entries[n] for n in names]
    rows = sum(s["rows"] for s in shards)
    kind = kind or stage_one_kind(arrays)
    index = new_index(kind, backend, params, shards, arrays=arrays,
                      tokens=rows * params["seq_len"], target_tokens=rows * (params["seq_len"] - 1))
    check_index(root, index, sealed=True)  # what the partial indexes say must describe their shards
    write_index(root, index)
    print(f"{root}: merged {n_total} shards into {INDEX}")
    return root


# --------------------------------------------------------------------------------------------
# repair: forget bad shards so that a rerun of stage one recomputes just those

PARTIAL_NAME = re.compile(r"^index\.part-(\d{5})-of-(\d{5})\.json$")


@dataclass
class Repair:
    checked: int  # shards verified
    bad: dict[str, str]  # name -> why
    owners: dict[str, tuple[int, int]]  # bad name -> (job, jobs) that recomputes it
    complete: bool  # index.json stands and lists only good shards


def repair(root: str | os.PathLike) -> Repair:
    """Verify every shard a stage-one store records (in ``index.json`` and the partial indexes); drop
    the records of bad or missing ones from both, and their files, so that rerunning the same
    stage-one command (or only the array tasks that own them) recomputes just those shards.

    Order keeps every moment consistent: good shards the index holds are first recorded in partial
    indexes, then bad ones leave the partial indexes, then ``index.json`` goes (a store with bad
    shards is no longer complete), and only then are the bad files deleted."""
    root = Path(root)
    if not root.is_dir():
        raise DistillError(f"store {root} does not exist; check the path")
    index, broken = None, False
    if (root / INDEX).exists():
        try:
            index, sealed = read_sealed(root / INDEX, INDEX, "")
            check_index(root, index, sealed)
        except DistillError:
            index, broken = None, True  # rebuilt by merge from the partial indexes
    parts = {p: read_partial_index(p) for p in sorted(root.glob(PARTIAL_GLOB)) if PARTIAL_NAME.match(p.name)}
    parts = {p: body for p, body in parts.items() if body}
    if index is None and any("pieces" in body for body in parts.values()):
        raise DistillError(f"{root} is a tokens store that distill prepare tasks are filling, not a store yet: "
                           f"rerun the tasks, then distill merge {root}")
    if index is not None and index.get("kind") == "tokens":
        bad = Store(root, index).bad_shards()
        if bad:
            raise DistillError(f"store {root}: {len(bad)} bad shards ({', '.join(bad)}); a tokens store is not "
                               "repaired shard by shard: rebuild it (distill prepare ... --overwrite)")
        return Repair(len(index["shards"]), {}, {}, True)
    if index is None and not parts:
        raise DistillError(f"{root} has neither a readable {INDEX} nor partial indexes; it is not a stage-one store: "
                           "rerun the stage that writes it")
    template = index or next(iter(parts.values()))
    base = {"kind": (index or {}).get("kind", stage_one_kind(template["arrays"])),
            "backend": template["backend"], "params": template["params"], "arrays": template["arrays"]}
    entries = {e["name"]: e for body in [*parts.values(), index or {"shards": []}] for e in body["shards"]}
    for name in entries:
        safe_child(root, name)
    bad = Store(root, {**base, "shards": list(entries.values())}).bad_shards()
    jobs = _jobs(parts)
    owners = {name: (_shard_number(name) % jobs, jobs) for name in bad}
    if not bad:
        if broken:  # every shard is good but the index is not: merge writes it again
            (root / INDEX).unlink()
        return Repair(len(entries), {}, {}, index is not None)
    # 1. every good shard of the index is recorded by the job that owns it
    recorded = {e["name"] for body in parts.values() for e in body["shards"]}
    for entry in (index or {"shards": []})["shards"]:
        if entry["name"] not in recorded and entry["name"] not in bad:
            path = partial_index_path(root, _shard_number(entry["name"]) % jobs, jobs)
            body = parts.get(path) or {"params": base["params"], "backend": base["backend"],
                                       "arrays": base["arrays"], "shards": []}
            parts[path] = {**body, "shards": [*body["shards"], entry]}
    # 2. bad shards leave the partial indexes
    for path, body in parts.items():
        write_partial_index(path, body["params"], body["backend"], body["arrays"],
                            [e for e in body["shards"] if e["name"] not in bad])
    # 3. the store is no longer complete; 4. the bad files go
    if (root / INDEX).exists():
        (root / INDEX).unlink()
    for name in bad:
        _remove(root / name)
    return Repair(len(entries), bad, owners, False)


def _shard_number(name: str) -> int:
    return int(name.split("-")[1].split(".")[0])


def _jobs(parts: dict[Path, dict]) -> int:
    """How many jobs fill the store, from the partial indexes' names (1 where there are none)."""
    counts = {int(PARTIAL_NAME.match(p.name).group(2)) for p in parts}
    return max(counts) if counts else 1

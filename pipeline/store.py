"""The store contract (format version 1; docs/FORMAT.md is the public description).

A store is a directory holding shards and an ``index.json``. Each shard is written under a temp
name and renamed into place; ``index.json`` is written last, atomically, and is the commit marker:
no index, no store. Every shard holds the same named arrays, sequence-major (rows first). The index
records the store's parameters and, per shard, its name, rows, bytes on disk and a content hash
(sha256 over the arrays' names, dtypes, shapes and C-order bytes, independent of the backend and
its compression).

Backends: ``zarr`` (a zarr v3 group per shard, one sharding-codec shard per array, zstd) and
``arrow`` (an Arrow IPC file per shard, zstd; an array of shape ``[N, *S]`` is a column of
fixed-size lists of ``prod(S)`` values with ``S`` in the field metadata under ``shape``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DistillError
from pipeline.io import atomic_write_text, dir_bytes

FORMAT_VERSION = 1
INDEX = "index.json"
KINDS = ("tokens", "topk", "sampled")
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


def _read_zarr(path: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(array[...]) for name, array in group.arrays()}


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


def _read_arrow(path: Path) -> dict[str, np.ndarray]:
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    out = {}
    for field in table.schema:
        inner = tuple(json.loads(field.metadata[b"shape"])) if field.metadata else ()
        column = table.column(field.name).combine_chunks()
        values = column.flatten() if inner else column
        out[field.name] = values.to_numpy(zero_copy_only=False).reshape(len(table), *inner)
    return out


WRITERS = {"zarr": _write_zarr, "arrow": _write_arrow}
READERS = {"zarr": _read_zarr, "arrow": _read_arrow}


def write_shard(root: Path, name: str, arrays: dict[str, np.ndarray], backend: str,
                chunk_rows: int = 256) -> dict[str, Any]:
    """Write one immutable shard into ``root`` (temp name, then rename); return its index entry."""
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1:
        raise ValueError(f"arrays of one shard must have the same number of rows, got {sorted(rows)}")
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    _remove(tmp)
    WRITERS[backend](tmp, arrays, chunk_rows)
    _fsync_tree(tmp)  # bytes on disk before the shard gets its final name (a crash never shows a torn one)
    if final.exists():  # a half-finished earlier run of the same job: the new shard replaces it
        _remove(final)
    os.replace(tmp, final)
    return {"name": name, "rows": rows.pop(), "bytes": dir_bytes(final), "sha256": content_hash(arrays)}


def _fsync_tree(path: Path) -> None:
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        with open(file, "rb+") as f:
            os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_index(root: Path, index: dict[str, Any]) -> None:
    """Commit a store: ``index.json`` written last, atomically."""
    atomic_write_text(root / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")


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
        entry = self.shards[i]
        path = self.shard_path(i)
        if not path.exists():
            raise DistillError(f"store {self.root}: shard {entry['name']} is missing; rebuild the store")
        try:
            arrays = READERS[self.index["backend"]](path)
        except Exception as e:  # any decoder error means the bytes on disk are not what was written
            raise DistillError(f"store {self.root}: shard {entry['name']} is corrupt ({type(e).__name__}); "
                               "rebuild the store") from None
        rows = {a.shape[0] for a in arrays.values()}
        if rows != {entry["rows"]}:
            raise DistillError(f"store {self.root}: shard {entry['name']} has {sorted(rows)} rows, "
                               f"index says {entry['rows']}; rebuild the store")
        if verify and content_hash(arrays) != entry["sha256"]:
            raise DistillError(f"store {self.root}: shard {entry['name']} fails its content hash; rebuild the store")
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
        """Every shard the index names is present (cheap; contents are checked as they are read)."""
        for i, entry in enumerate(self.shards):
            if not self.shard_path(i).exists():
                raise DistillError(f"store {self.root}: shard {entry['name']} is missing; rebuild the store "
                                   "(or rerun the stage-one job that owns it)")

    def verify(self) -> None:
        for i in range(len(self.shards)):
            self.read_shard(i, verify=True)


def safe_child(root: Path, name: str) -> Path:
    """``root / name`` for a plain entry name; an index may never point outside its store."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise DistillError(f"store {root}: index names shard '{name}', which is not a plain file name; "
                           "the index is corrupt or hostile")
    return root / name


def open_store(path: str | os.PathLike, kind: str | None = None) -> Store:
    root = Path(path)
    index_path = root / INDEX
    if not root.is_dir():
        raise DistillError(f"store {root} does not exist; run the stage that writes it first")
    if not index_path.is_file():
        raise DistillError(f"store {root} has no {INDEX} (unfinished or not a store); rerun the stage that writes it")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError:
        raise DistillError(f"store {root}: {INDEX} does not parse; rerun the stage that writes it") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise DistillError(f"store {root} has format version {index.get('format_version')}, "
                           f"this distill reads {FORMAT_VERSION}; rebuild the store")
    if kind is not None and index.get("kind") != kind:
        raise DistillError(f"store {root} is a '{index.get('kind')}' store, expected '{kind}'")
    if index.get("backend") not in BACKENDS:
        raise DistillError(f"store {root}: unknown backend {index.get('backend')!r}")
    for entry in index.get("shards", []):
        safe_child(root, entry["name"])
    return Store(root, index)


def param_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]

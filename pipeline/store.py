"""The store contract (format version 1; docs/FORMAT.md is the public description).

A store is a directory holding shards and an ``index.json``. Each shard is written under a temp
name and renamed into place; ``index.json`` is written last, atomically, and is the commit marker:
no index, no store. Every shard holds the same named arrays, sequence-major (rows first). The index
records the store's parameters and, per shard, its name, rows, bytes on disk and a content hash
(sha256 over the arrays' names, dtypes, shapes and C-order bytes, independent of the backend and
its compression).

Backends: ``zarr`` (a zarr v3 group per shard, one sharding-codec shard per array, zstd) and
``arrow`` (an Arrow IPC file per shard, zstd; an array of shape ``[N, *S]`` is a column of
fixed-size lists of ``prod(S)`` values with ``S`` in the field metadata under ``shape``). Each
backend has one reader (:class:`ShardReader`), for whole shards and for the chunks the loader reads.

A store built in place by parallel jobs (stage one) has one partial index per job
(``index.part-JJJJJ-of-NNNNN.json``: params, backend, arrays and the job's finished shards);
:func:`merge_partial_indexes` writes ``index.json`` once they cover every shard.
:func:`existing_store` is the one policy for an output directory that already holds something.
"""

from __future__ import annotations

import functools
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


class _ZarrShard:
    """A zarr shard opened for reading; chunk ``c`` is rows ``[c·chunk_rows, (c+1)·chunk_rows)``."""

    def __init__(self, path: Path, fields: tuple[str, ...] | None):
        import zarr

        group = zarr.open_group(str(path), mode="r")
        names = fields or [name for name, _ in group.arrays()]
        self.arrays = {name: group[name] for name in names}

    def read_all(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(array[...]) for name, array in self.arrays.items()}

    def read_chunk(self, chunk: int, chunk_rows: int) -> dict[str, np.ndarray]:
        lo = chunk * chunk_rows
        return {name: np.asarray(array[lo:lo + chunk_rows]) for name, array in self.arrays.items()}

    def close(self) -> None:
        pass


class _ArrowShard:
    """An Arrow IPC shard opened for reading; chunk ``c`` is record batch ``c``."""

    def __init__(self, path: Path, fields: tuple[str, ...] | None):
        import pyarrow as pa

        self.source = pa.memory_map(str(path), "r")
        self.file = pa.ipc.open_file(self.source)
        self.fields = list(fields) if fields else None

    def read_all(self) -> dict[str, np.ndarray]:
        table = self.file.read_all()
        return _arrow_arrays(table.select(self.fields) if self.fields else table)

    def read_chunk(self, chunk: int, chunk_rows: int) -> dict[str, np.ndarray]:
        batch = self.file.get_batch(chunk)
        return _arrow_arrays(batch.select(self.fields) if self.fields else batch)

    def close(self) -> None:
        self.source.close()


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
    """Every array of one shard file, with no index (what a plain reader sees)."""
    shard = OPENERS[backend](Path(path), None)
    try:
        return shard.read_all()
    finally:
        shard.close()


READERS = {backend: functools.partial(read_shard_file, backend=backend) for backend in BACKENDS}


class ShardReader:
    """One shard of a committed store, opened once and read whole or a chunk at a time.

    The one place a shard's bytes are decoded: a missing file or any decoder error becomes a
    one-line error naming the shard. Plain data (root, entry, backend), so a loader worker process
    can build its own."""

    def __init__(self, root: Path, entry: dict[str, Any], backend: str, fields: tuple[str, ...] | None = None):
        self.root, self.name = Path(root), entry["name"]
        path = safe_child(self.root, self.name)
        if not path.exists():
            raise DistillError(f"store {self.root}: shard {self.name} is missing; rebuild the store")
        self._shard = self._guard(OPENERS[backend], path, fields)

    def read_all(self) -> dict[str, np.ndarray]:
        return self._guard(self._shard.read_all)

    def read_chunk(self, chunk: int, chunk_rows: int) -> dict[str, np.ndarray]:
        return self._guard(self._shard.read_chunk, chunk, chunk_rows)

    def close(self) -> None:
        self._shard.close()

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # any decoder error means the bytes on disk are not what was written
            raise DistillError(f"store {self.root}: shard {self.name} is corrupt ({type(e).__name__}); "
                               "rebuild the store") from None


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
        reader = ShardReader(self.root, entry, self.index["backend"])
        try:
            arrays = reader.read_all()
        finally:
            reader.close()
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


# --------------------------------------------------------------------------------------------
# building a store in place: what is already there, partial indexes of parallel jobs, merge

PARTIAL_INDEX = "index.part-{:05d}-of-{:05d}.json"
PARTIAL_GLOB = "index.part-*.json"


def partial_index_path(root: Path, job: int, jobs: int) -> Path:
    """Where job ``job`` of ``jobs`` records the shards it has finished."""
    return root / PARTIAL_INDEX.format(job, jobs)


def read_partial_index(path: Path) -> dict[str, Any]:
    """A partial index (``params``, ``backend``, ``arrays``, ``shards``), or ``{}`` where there is none
    or it does not parse (a job killed before its first record)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_partial_index(path: Path, params: dict[str, Any], backend: str, arrays: dict[str, Any],
                        shards: list[dict[str, Any]]) -> None:
    """Record a job's finished shards, atomically (called after each shard is renamed into place)."""
    body = {"params": params, "backend": backend, "arrays": arrays,
            "shards": sorted(shards, key=lambda e: e["name"])}
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True) + "\n")


def _found(out: Path, kind: str, backend: str) -> dict[str, Any] | None:
    """What already lies in ``out``, as ``kind``/``backend``/params to compare; None for nothing."""
    if (out / INDEX).exists():
        store = open_store(out)
        return {"kind": store.kind, "backend": store.index["backend"], **store.params}
    if out.is_dir():
        for path in sorted(out.glob(PARTIAL_GLOB)):
            body = read_partial_index(path)
            if body:
                return {"kind": kind, "backend": body.get("backend"), **body["params"]}
        if any(p for p in out.iterdir() if not p.name.startswith((".", "config.part-"))):
            raise DistillError(f"{out} exists and is not an empty directory or a store; "
                               "choose another --out or pass --overwrite")
    return None


def existing_store(out: Path, kind: str, backend: str, params: dict[str, Any], overwrite: bool) -> str:
    """The policy for a stage's ``--out`` that may already hold something, in one place:

    - ``"done"``: a complete ``kind`` store with this backend and these params is there; nothing to do;
    - ``"write"``: nothing there, or unfinished work of the same params to continue;
    - ``"replace"``: something else is there and ``overwrite`` says to replace it;
    - otherwise a one-line error saying what differs (nothing is touched).
    """
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


def merge_partial_indexes(root: Path, kind: str | None = None) -> Path:
    """Check that the partial indexes in ``root`` cover every shard exactly, then write ``index.json``.
    ``kind`` defaults to what the arrays say: ``sampled`` where they hold ``sample_ids``, else ``topk``."""
    if not root.is_dir():
        raise DistillError(f"{root} does not exist; run distill teacher first")
    parts = [read_partial_index(p) for p in sorted(root.glob(PARTIAL_GLOB))]
    parts = [p for p in parts if p]
    if not parts:
        if (root / INDEX).exists():
            return root
        raise DistillError(f"{root} holds no partial indexes; run distill teacher first")
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
    kind = kind or ("sampled" if "sample_ids" in arrays else "topk")
    index = new_index(kind, backend, params, shards, arrays=arrays,
                      tokens=rows * params["seq_len"], target_tokens=rows * (params["seq_len"] - 1))
    write_index(root, index)
    print(f"{root}: merged {n_total} shards into {INDEX}")
    return root

import json
import re

import numpy as np
import pytest
import pyarrow as pa
import zarr

from pipeline.errors import DistillError
from pipeline.store import contract as store
from tests.conftest import reseal_index


def arrays(rows=37, seq=9, k=3):
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, 8192, (rows, seq)).astype(np.uint16),
        "topk_logprobs": rng.standard_normal((rows, seq, k)).astype(np.float16),
    }


PARAMS = {"seq_len": 9, "chunk_rows": 8}


def write_store(root, backend, data):
    root.mkdir()
    entry = store.write_shard(root, store.shard_name(0, backend), data, backend, chunk_rows=8)
    index = store.new_index("tokens", backend, PARAMS, [entry],
                            arrays={k: {"dtype": v.dtype.name, "shape": list(v.shape[1:])} for k, v in data.items()})
    store.write_index(root, index)
    return store.open_store(root)


@pytest.mark.parametrize("backend", store.BACKENDS)
def test_round_trip(tmp_path, backend):
    data = arrays()
    s = write_store(tmp_path / "s", backend, data)
    back = s.read_shard(0, verify=True)
    for name, array in data.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    for key in ("format_version", "kind", "backend", "codec", "params", "arrays", "rows", "bytes", "shards"):
        assert key in index
    assert index["rows"] == 37
    entry = index["shards"][0]
    assert entry["rows"] == 37 and entry["bytes"] > 0 and entry["sha256"] == store.content_hash(data)
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]  # no temp names left


def test_backends_hash_the_same_content(tmp_path):
    data = arrays()
    hashes = {b: write_store(tmp_path / b, b, data).shards[0]["sha256"] for b in store.BACKENDS}
    assert hashes["zarr"] == hashes["arrow"]


def test_plain_readers(tmp_path):
    data = arrays()
    write_store(tmp_path / "zarr", "zarr", data)
    write_store(tmp_path / "arrow", "arrow", data)
    group = zarr.open_group(str(tmp_path / "zarr" / "shard-00000.zarr"), mode="r")
    np.testing.assert_array_equal(group["input_ids"][:], data["input_ids"])
    with pa.memory_map(str(tmp_path / "arrow" / "shard-00000.arrow")) as f:
        table = pa.ipc.open_file(f).read_all()
    shape = json.loads(table.schema.field("topk_logprobs").metadata[b"shape"])
    flat = table.column("topk_logprobs").combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(flat.reshape(len(table), *shape), data["topk_logprobs"])


@pytest.mark.parametrize("backend", store.BACKENDS)
def test_corruption_is_caught(tmp_path, backend):
    data = arrays()
    s = write_store(tmp_path / "s", backend, data)
    entry = dict(s.shards[0])
    # Same bytes on disk, but the index records another content hash: --verify must notice.
    s.index["shards"][0] = {**entry, "sha256": "0" * 64}
    with pytest.raises(DistillError, match="content hash"):
        s.read_shard(0, verify=True)
    s.index["shards"][0] = entry
    path = s.shard_path(0)
    target = path if path.is_file() else next(p for p in sorted(path.rglob("*")) if p.is_file() and p.name == "0")
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 16] = b"\xff" * 16
    target.write_bytes(bytes(raw))
    with pytest.raises(DistillError, match="shard-00000"):
        s.read_shard(0, verify=True)


def test_missing_shard_and_missing_index(tmp_path):
    s = write_store(tmp_path / "s", "arrow", arrays())
    s.shard_path(0).unlink()
    with pytest.raises(DistillError, match="shard-00000.arrow is missing"):
        s.read_shard(0)
    (tmp_path / "t").mkdir()
    with pytest.raises(DistillError, match="no index.json"):
        store.open_store(tmp_path / "t")


@pytest.mark.parametrize("name", ["../evil.arrow", "/etc/passwd", "..", "a/b.arrow"])
def test_index_cannot_point_outside_the_store(tmp_path, name):
    """Even an index sealed with a matching digest (a hostile one) cannot name a file outside."""
    write_store(tmp_path / "s", "arrow", arrays())
    reseal_index(tmp_path / "s" / "index.json", lambda index: index["shards"][0].update(name=name))
    with pytest.raises(DistillError, match="not a plain file name"):
        store.open_store(tmp_path / "s")


def test_token_dtype_is_narrowest():
    assert store.token_dtype(256) == np.uint8
    assert store.token_dtype(8192) == np.uint16
    assert store.token_dtype(65536) == np.uint16
    assert store.token_dtype(65537) == np.uint32
    assert store.token_dtype(151936) == np.uint32


@pytest.mark.parametrize("backend", store.BACKENDS)
def test_chunks_read_back_the_whole_shard(tmp_path, backend):
    """The loader's chunk reads and the whole-shard read go through one reader and agree."""
    data = arrays()
    s = write_store(tmp_path / "s", backend, data)
    reader = store.ShardReader(s.root, s.index, 0, fields=("topk_logprobs",))
    chunks = [reader.read_chunk(c, 8) for c in range(5)]  # 37 rows in chunks of 8
    reader.close()
    assert all(list(c) == ["topk_logprobs"] for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c["topk_logprobs"] for c in chunks]), data["topk_logprobs"])


def test_existing_store_policy(tmp_path):
    data = arrays()
    s = write_store(tmp_path / "s", "zarr", data)
    assert store.existing_store(tmp_path / "new", "tokens", "zarr", PARAMS, False) == "write"
    assert store.existing_store(s.root, "tokens", "zarr", PARAMS, False) == "done"
    with pytest.raises(DistillError, match="seq_len: 9 vs 10.*--overwrite"):
        store.existing_store(s.root, "tokens", "zarr", {**PARAMS, "seq_len": 10}, False)
    with pytest.raises(DistillError, match="backend: 'zarr' vs 'arrow'"):
        store.existing_store(s.root, "tokens", "arrow", PARAMS, False)
    assert store.existing_store(s.root, "tokens", "zarr", {**PARAMS, "seq_len": 10}, True) == "replace"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for overwrite in (False, True):  # someone's files are never replaced, and --overwrite is not suggested for them
        with pytest.raises(DistillError, match=r"holds notes.txt, which distill did not write; (?!.*pass --overwrite)"):
            store.existing_store(tmp_path / "other", "tokens", "zarr", PARAMS, overwrite)
    # unfinished work of the same parameters is continued, not refused
    part = store.partial_index_path(tmp_path / "part", 0, 2)
    part.parent.mkdir()
    store.write_partial_index(part, PARAMS, "zarr", {}, [])
    assert store.existing_store(tmp_path / "part", "tokens", "zarr", PARAMS, False) == "write"


@pytest.mark.parametrize("backend", store.BACKENDS)
def test_chunk_checksums_are_the_decoded_bytes_and_version_1_stores_still_read(tmp_path, backend, capsys):
    data = arrays()
    s = write_store(tmp_path / "s", backend, data)
    entry = s.shards[0]
    assert entry["chunk_rows"] == 8 and len(entry["crc32"]["input_ids"]) == 5  # 37 rows in chunks of 8
    import zlib
    assert entry["crc32"]["topk_logprobs"][4] == zlib.crc32(data["topk_logprobs"][32:].tobytes())
    # A version-1 index (no checksums) is read as before, with one warning that reads are unchecked.
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    index["format_version"] = 1
    del index[store.DIGEST]  # version 1 had none
    for e in index["shards"]:
        del e["crc32"], e["chunk_rows"]
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    old = store.open_store(tmp_path / "s")
    for _ in range(2):
        back = old.read_shard(0, verify=True)
    np.testing.assert_array_equal(back["topk_logprobs"], data["topk_logprobs"])
    assert capsys.readouterr().err.count("reads are not checked") == 1
    index["format_version"] = 5
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DistillError, match="format version 5, this distill reads 1, 2, 3, 4; upgrade distill"):
        store.open_store(tmp_path / "s")


def onpolicy_arrays(rows=10, seq=6):
    """A row of what ``prepare --format ids`` stores for sampled completions, plus a stage-one target."""
    rng = np.random.default_rng(1)
    mask = (rng.random((rows, seq)) < 0.5).astype(np.uint8)
    return {
        "input_ids": rng.integers(0, 8192, (rows, seq)).astype(np.uint16),
        "loss_mask": mask,
        "behaviour_logprob": np.where(mask, -rng.random((rows, seq)), 0.0).astype(np.float32),
        "target_logprob": -rng.random((rows, seq)).astype(np.float32),
    }


TARGET_PARAMS = {"seq_len": 6, "chunk_rows": 4, "rows": 10, "rows_per_shard": 10, "vocab_size": 8192,
                 "temperature": 1.0, "temperature_grid": [1.0]}


def write_kind(root, kind, data, params, backend="zarr"):
    root.mkdir()
    entry = store.write_shard(root, store.shard_name(0, backend), data, backend, chunk_rows=params["chunk_rows"])
    specs = {k: {"dtype": v.dtype.name, "shape": list(v.shape[1:])} for k, v in data.items()}
    store.write_index(root, store.new_index(kind, backend, params, [entry], arrays=specs))
    return root


@pytest.mark.parametrize("backend", store.BACKENDS)
def test_a_target_store_opens_and_every_chunk_reads(tmp_path, backend):
    data = onpolicy_arrays()
    s = store.open_store(write_kind(tmp_path / "s", "target", data, TARGET_PARAMS, backend), kind="target")
    reader = store.ShardReader(s.root, s.index, 0)
    chunks = [reader.read_chunk(c) for c in range(3)]  # the per-chunk checks (counts, mass) do not apply
    reader.close()
    for name, array in data.items():
        np.testing.assert_array_equal(np.concatenate([c[name] for c in chunks]), array)
    # a tokens store carrying the behaviour log-prob beside its loss mask opens too
    tokens = {k: data[k] for k in ("input_ids", "loss_mask", "behaviour_logprob")}
    store.open_store(write_kind(tmp_path / "t", "tokens", tokens, {"seq_len": 6, "chunk_rows": 4}), kind="tokens")


@pytest.mark.parametrize("edit,message", [
    (lambda b: b["params"].update(temperature_grid=[1.0, 2.0]), "is not the cache temperature 1 alone"),
    (lambda b: b["params"].update(top_k=4), "params have top_k, which a target store"),
    (lambda b: b["arrays"].pop("target_logprob") and [s["crc32"].pop("target_logprob") for s in b["shards"]],
     "arrays differ in target_logprob"),
    (lambda b: b["arrays"]["behaviour_logprob"].update(dtype="float16"), "behaviour_logprob as float16[6], it is "
                                                                          "float32 [seq_len]"),
    (lambda b: b["arrays"]["target_logprob"].update(dtype="float16"), "target_logprob as float16[6]"),
    (lambda b: b.update(kind="topk"), "params have top_k = None"),
])
def test_a_target_store_that_contradicts_its_arrays_is_refused(tmp_path, edit, message):
    root = write_kind(tmp_path / "s", "target", onpolicy_arrays(), TARGET_PARAMS)
    reseal_index(root / "index.json", edit)
    with pytest.raises(DistillError, match=re.escape(message)) as e:
        store.open_store(root)
    assert "\n" not in str(e.value)


def test_a_behaviour_logprob_without_its_mask_is_refused(tmp_path):
    data = onpolicy_arrays()
    del data["loss_mask"], data["target_logprob"]
    with pytest.raises(DistillError, match="behaviour_logprob without a loss_mask"):
        store.open_store(write_kind(tmp_path / "t", "tokens", data, {"seq_len": 6, "chunk_rows": 4}))


def test_merge_names_a_target_store_by_its_arrays(tmp_path):
    data = onpolicy_arrays()
    root = tmp_path / "s"
    root.mkdir()
    entry = store.write_shard(root, store.shard_name(0, "zarr"), data, "zarr", chunk_rows=4)
    specs = {k: {"dtype": v.dtype.name, "shape": list(v.shape[1:])} for k, v in data.items()}
    store.write_partial_index(store.partial_index_path(root, 0, 1), TARGET_PARAMS, "zarr", specs, [entry])
    store.merge_partial_indexes(root)
    assert store.open_store(root).kind == "target"
    assert store.stage_one_kind({"sample_ids": 0, "logsumexp": 0}) == "sampled"
    assert store.stage_one_kind({"topk_ids": 0, "logsumexp": 0}) == "topk"

"""A store from someone else: decoding it may not exhaust memory or hang, and it is read through no link.

A hostile store's index is resealed by whoever built it, so its digest proves nothing here; what
bounds a read is what the index declares each chunk decodes to (rows × the arrays' per-row bytes).
The memory cases decode in a subprocess and measure its peak RSS growth (``ru_maxrss``) across the
read: a bomb of ``DISTILL_TEST_BOMB_MIB`` (default 1024 MiB, a 32 KiB zstd chunk) would take at least
that much to decode. Set it lower (400) to watch the old reader fail without straining the machine.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow as pa
import pytest
from numcodecs.zstd import Zstd

from pipeline.errors import DistillError
from pipeline.store import contract as store
from tests.conftest import reseal_index

REPO = Path(__file__).resolve().parents[3]
BOMB = int(os.environ.get("DISTILL_TEST_BOMB_MIB", "1024")) * 2 ** 20
GROWTH_LIMIT_MIB = 64  # what a refused read may cost: a few chunks and the decoder's state, not the bomb
SEQ = 9


def honest(root: Path, backend: str, rows: int = 37, seq: int = SEQ) -> Path:
    """A tokens store of one shard: input_ids [rows, seq] uint16 in chunks of 8 rows."""
    data = {"input_ids": np.random.default_rng(0).integers(0, 8192, (rows, seq)).astype(np.uint16)}
    root.mkdir(parents=True)
    entry = store.write_shard(root, store.shard_name(0, backend), data, backend, chunk_rows=8)
    index = store.new_index("tokens", backend, {"seq_len": seq, "chunk_rows": 8}, [entry],
                            arrays={"input_ids": {"dtype": "uint16", "shape": [seq]}})
    store.write_index(root, index)
    return root


def reseal_bytes(root: Path) -> None:
    """What whoever tampered with a shard does next: record its new size and reseal the index."""
    size = sum(p.stat().st_size for p in (root / "shard-00000.zarr").rglob("*") if p.is_file()) \
        if (root / "shard-00000.zarr").is_dir() else (root / "shard-00000.arrow").stat().st_size

    def edit(index):
        index["shards"][0]["bytes"] = size
        index["bytes"] = size

    reseal_index(root / "index.json", edit)


PROBE = """
import json, resource, sys
import pyarrow, zarr  # imported before the baseline: the growth measured is the read's alone
from pipeline.errors import DistillError
from pipeline.store import contract as store
root, how = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    s = store.open_store(root, check=False)
    if how == "chunk":
        store.ShardReader(s.root, s.index, 0).read_chunk(0)
    else:
        s.verify()
    error = None
except DistillError as e:
    error = str(e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"error": error, "growth_mib": (after - before) / 1024}))
"""


def probe(root: Path, how: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(root), how], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_refused_within_bound(result: dict, name: str) -> None:
    print(f"peak RSS growth {result['growth_mib']:.1f} MiB: {result['error']}")  # the numbers RELIABILITY quotes (-s)
    error = result["error"]
    assert error is not None and "\n" not in error and name in error, result
    assert result["growth_mib"] < GROWTH_LIMIT_MIB, result


# --------------------------------------------------------------------------------------------
# zarr: a chunk replaced by a zstd bomb


def zstd_bomb(streamed: bool) -> bytes:
    """``BOMB`` zero bytes, zstd-compressed to tens of KiB: one frame that records its size, or (as a
    streaming compressor writes it) one that does not, which a decoder can only grow into."""
    if not streamed:
        return Zstd(level=3).encode(np.zeros(BOMB, np.uint8))
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as f:
        block = bytes(2 ** 20)
        for _ in range(BOMB // len(block)):
            f.write(block)
    return sink.getvalue().to_pybytes()


def replace_zarr_chunk(shard_file: Path, chunk: int, payload: bytes) -> None:
    """Rewrite a sharding-codec shard file with chunk ``chunk`` replaced by ``payload`` (offsets and the
    index's crc32c made consistent again, as a tool that crafts one would)."""
    raw = shard_file.read_bytes()
    n = 5  # 40 shard rows / 8 rows per chunk
    index = np.frombuffer(raw[-(16 * n + 4):-4], "<u8").reshape(n, 2)
    chunks = [payload if c == chunk else raw[off:off + size] for c, (off, size) in enumerate(index)]
    body, offsets = b"", []
    for piece in chunks:
        offsets += [len(body), len(piece)]
        body += piece
    table = np.array(offsets, "<u8").tobytes()
    shard_file.write_bytes(body + table + struct.pack("<I", google_crc32c.value(table)))


@pytest.mark.parametrize("seq", [SEQ, 8192], ids=["stored-bytes-bound", "decoder-bound"])
@pytest.mark.parametrize("streamed", [False, True], ids=["frame-with-size", "frame-without-size"])
@pytest.mark.parametrize("how", ["chunk", "verify"])
def test_a_zarr_zstd_bomb_is_refused_before_it_is_decoded(tmp_path, seq, streamed, how):
    """Chunks of 144 bytes: the bomb's ~32 KiB are more than zstd ever stores 144 bytes in, refused
    unread. Chunks of 128 KiB (8 rows of 8192 positions): the bomb fits in what zstd may store them
    in, so it is the decoder, given room for exactly 128 KiB, that stops it."""
    root = honest(tmp_path / "s", "zarr", seq=seq)
    bomb = zstd_bomb(streamed)
    assert len(bomb) < 2 ** 16 <= BOMB // 2 ** 14  # KiBs on disk, far more decoded
    replace_zarr_chunk(root / "shard-00000.zarr" / "input_ids" / "c" / "0" / "0", 0, bomb)
    reseal_bytes(root)
    result = probe(root, how)
    assert_refused_within_bound(result, "shard-00000.zarr")
    assert ("past zstd's bound" if seq == SEQ else "does not decode to the 131072 bytes") in result["error"]


def test_a_zarr_chunk_larger_than_zstd_can_make_it_is_refused(tmp_path):
    """A chunk's stored bytes are bounded too: no more than zstd's worst case for the declared size."""
    root = honest(tmp_path / "s", "zarr")
    replace_zarr_chunk(root / "shard-00000.zarr" / "input_ids" / "c" / "0" / "0", 1, bytes(64 * 2 ** 10))
    reseal_bytes(root)
    s = store.open_store(root)
    with pytest.raises(DistillError, match=r"shard-00000.zarr chunk 1 stores 65536 bytes .*past zstd's bound") as caught:
        store.ShardReader(s.root, s.index, 0).read_chunk(1)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("edit,message", [
    (lambda meta: meta["codecs"][0]["configuration"]["codecs"].__setitem__(1, {"name": "gzip", "configuration": {"level": 1}}),
     "codecs"),
    (lambda meta: meta["codecs"][0]["configuration"].__setitem__("chunk_shape", [2 ** 20, SEQ]), "chunk_shape"),
    (lambda meta: meta.__setitem__("shape", [2 ** 40, SEQ]), "shape"),
    (lambda meta: meta.__setitem__("data_type", "float64"), "data_type"),
])
def test_zarr_metadata_other_than_the_writers_is_refused(tmp_path, edit, message):
    """Another codec (gzip, blosc: decoders this reader does not bound), or chunks, a shape or a dtype
    other than the index's, would size a decode by what the file says: refused before any chunk."""
    root = honest(tmp_path / "s", "zarr")
    meta_path = root / "shard-00000.zarr" / "input_ids" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    reseal_bytes(root)
    s = store.open_store(root)
    with pytest.raises(DistillError, match=rf"shard-00000.zarr .*input_ids/zarr.json.*{message}") as caught:
        s.read_shard(0)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------
# arrow: record batches whose bodies claim or hold far more than the index declares


def write_ipc(path: Path, rows: int, compression: str, chunk_rows: int) -> None:
    values = pa.array(np.zeros(rows * SEQ, np.uint16))
    column = pa.FixedSizeListArray.from_arrays(values, SEQ)
    field = pa.field("input_ids", column.type, nullable=False, metadata={"shape": json.dumps([SEQ])})
    table = pa.Table.from_arrays([column], schema=pa.schema([field]))
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=chunk_rows)


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
@pytest.mark.parametrize("how", ["chunk", "verify"])
def test_an_arrow_batch_of_more_rows_than_the_index_declares_is_refused_before_it_is_decoded(tmp_path, compression,
                                                                                              how):
    root = honest(tmp_path / "s", "arrow")
    write_ipc(root / "shard-00000.arrow", BOMB // (2 * SEQ), compression, chunk_rows=BOMB)  # one batch of ~BOMB bytes
    reseal_bytes(root)
    assert_refused_within_bound(probe(root, how), "shard-00000.arrow")


def test_an_arrow_buffer_that_decodes_to_more_than_its_rows_need_is_refused(tmp_path):
    """The batch says 8 rows, as the index does, but its values buffer's declared (and real) decoded
    length is ~BOMB bytes: pyarrow would allocate and decode all of it for 144 bytes of values."""
    root = honest(tmp_path / "s", "arrow", rows=8)
    path = root / "shard-00000.arrow"
    rows = BOMB // (2 * SEQ)
    write_ipc(path, rows, "zstd", chunk_rows=rows)
    raw = path.read_bytes()
    # the batch's length and its two field nodes' lengths, each an int64 in the batch's metadata
    assert raw.count(struct.pack("<q", rows)) == 2 and raw.count(struct.pack("<q", rows * SEQ)) == 1
    raw = raw.replace(struct.pack("<q", rows), struct.pack("<q", 8)).replace(struct.pack("<q", rows * SEQ),
                                                                               struct.pack("<q", 8 * SEQ))
    path.write_bytes(raw)
    reseal_bytes(root)
    result = probe(root, "chunk")
    assert_refused_within_bound(result, "shard-00000.arrow")
    assert "decodes to" in result["error"], result


def test_an_arrow_buffer_claiming_a_huge_decoded_length_is_refused(tmp_path):
    """A compressed buffer's 8-byte prefix is the length pyarrow allocates: 2^40 is refused unread."""
    root = honest(tmp_path / "s", "arrow", rows=8)
    path = root / "shard-00000.arrow"
    raw = bytearray(path.read_bytes())
    honest_length = struct.pack("<q", 8 * SEQ * 2)
    assert raw.count(honest_length) >= 1
    at = raw.index(honest_length, 8)
    raw[at:at + 8] = struct.pack("<q", 2 ** 40)
    path.write_bytes(bytes(raw))
    s = store.open_store(root)
    with pytest.raises(DistillError, match="shard-00000.arrow chunk 0 .*decodes to 1099511627776 bytes") as caught:
        s.read_shard(0)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------
# links, FIFOs and devices inside a store


def relink(path: Path, target: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.symlink_to(target)


def link_cases():
    def chunk_to_dev_zero(root, other):
        relink(root / "shard-00000.zarr/input_ids/c/0/0", Path("/dev/zero"))
        return "shard-00000.zarr/input_ids/c/0/0"

    def arrow_to_dev_zero(root, other):
        relink(root / "shard-00000.arrow", Path("/dev/zero"))
        return "shard-00000.arrow"

    def shard_dir_to_another_store(root, other):
        relink(root / "shard-00000.zarr", other / "shard-00000.zarr")
        return "shard-00000.zarr"

    def shard_file_outside(root, other):
        relink(root / "shard-00000.arrow", other / "shard-00000.arrow")
        return "shard-00000.arrow"

    def zarr_json_outside(root, other):
        relink(root / "shard-00000.zarr/input_ids/zarr.json", other / "shard-00000.zarr/input_ids/zarr.json")
        return "shard-00000.zarr/input_ids/zarr.json"

    def chunk_dir_outside(root, other):
        relink(root / "shard-00000.zarr/input_ids/c", other / "shard-00000.zarr/input_ids/c")
        return "shard-00000.zarr/input_ids/c"

    def relative_link_inside(root, other):  # even a link to a file of the same store: a writer makes none
        shutil.copy(root / "shard-00000.arrow", root / "copy.arrow")
        relink(root / "shard-00000.arrow", Path("copy.arrow"))
        return "shard-00000.arrow"

    return [("zarr", chunk_to_dev_zero), ("arrow", arrow_to_dev_zero), ("zarr", shard_dir_to_another_store),
            ("arrow", shard_file_outside), ("zarr", zarr_json_outside), ("zarr", chunk_dir_outside),
            ("arrow", relative_link_inside)]


@pytest.mark.parametrize("backend,make", link_cases(), ids=lambda c: getattr(c, "__name__", c))
def test_a_link_inside_a_store_is_refused_naming_it(tmp_path, backend, make):
    other = honest(tmp_path / "other", backend)  # the same content: only the link is wrong
    root = honest(tmp_path / "s", backend)
    name = make(root, other)
    shard, _, inside = name.partition("/")
    for read, named in ((lambda: store.open_store(root), name),  # opening checks every file of every shard
                        (lambda: store.open_store(root, check=False).read_shard(0), name),  # so does each read
                        (lambda: store.open_store(root, check=False).verify(), f"{shard} {inside}".strip())):
        with pytest.raises(DistillError) as caught:
            read()
        line = str(caught.value)
        assert "\n" not in line and named in line and "link" in line, line


@pytest.mark.parametrize("backend", store.BACKENDS)
def test_an_index_that_is_a_link_is_refused(tmp_path, backend):
    other = honest(tmp_path / "other", backend)
    root = honest(tmp_path / "s", backend)
    relink(root / "index.json", other / "index.json")
    with pytest.raises(DistillError, match=r"index.json is a symbolic link") as caught:
        store.open_store(root)
    assert "\n" not in str(caught.value)


def test_a_store_reached_through_a_linked_root_still_reads(tmp_path):
    """The store's own directory may be a link (runs/x -> /scratch/x): only what lies inside may not."""
    root = honest(tmp_path / "s", "zarr")
    (tmp_path / "alias").symlink_to(root)
    store.open_store(tmp_path / "alias").verify()


FIFO_PROBE = """
import sys
from pipeline.errors import DistillError
from pipeline.store import contract as store
try:
    store.open_store(sys.argv[1], check=sys.argv[2] == "open").read_shard(0)
    print("read")
except DistillError as e:
    print(e)
"""


@pytest.mark.parametrize("backend,name", [("zarr", "shard-00000.zarr/input_ids/c/0/0"),
                                          ("zarr", "shard-00000.zarr/input_ids/zarr.json"),
                                          ("arrow", "shard-00000.arrow")])
@pytest.mark.parametrize("how", ["open", "read"])
def test_a_fifo_in_a_store_is_refused_without_hanging(tmp_path, backend, name, how):
    root = honest(tmp_path / "s", backend)
    (root / name).unlink()
    os.mkfifo(root / name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", FIFO_PROBE, str(root), how], capture_output=True, text=True,
                              env=env, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a store with a FIFO at {name} hung")
    line = done.stdout.strip()
    assert done.returncode == 0 and "\n" not in line and name in line and "FIFO" in line, (line, done.stderr[-2000:])


def test_a_partial_index_that_is_a_link_is_refused(tmp_path):
    root = honest(tmp_path / "s", "arrow")
    outside = tmp_path / "elsewhere.json"
    store.write_partial_index(outside, {"seq_len": SEQ}, "arrow", {}, [])
    (root / "index.part-00000-of-00001.json").symlink_to(outside)
    with pytest.raises(DistillError, match=r"index.part-00000-of-00001.json is a symbolic link"):
        store.read_partial_index(root / "index.part-00000-of-00001.json")

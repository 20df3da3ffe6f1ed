"""Byte flips, truncations, deleted and duplicated shards, a broken index: every one is refused with
one line before a step uses it, or shown not to change what a reader decodes.

The stores are real ones (prepare and stage one over ordinary text), both backends, three kinds.
Each flip changes one byte of one file of one shard at a seeded random offset, reads every chunk
the way stage two's loader does and every shard the way stage one and eval do, then puts the byte
back. The counts this prints are the ones docs/RELIABILITY.md quotes.
"""

import json
import random
import shutil

import numpy as np
import pytest

from pipeline.errors import DistillError
from pipeline.store.contract import open_store
from pipeline.train.loader import ChunkReader
from tests.conftest import TOKENIZER, make_teacher, one_line_error, reseal_index, run_cli, tree_digest, write_corpus

pytestmark = pytest.mark.faults

FLIPS = 144  # 24 per store: 6 stores (tokens, topk, sampled × zarr, arrow)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("flips")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:10])
    make_teacher(root / "teacher")
    built = {}
    for backend in ("zarr", "arrow"):
        tokens = root / f"tokens-{backend}"
        result = run_cli("prepare", "--input", corpus, "--out", tokens, "--tokenizer", TOKENIZER, "--seq-len", "32",
                         "--rows-per-shard", "24", "--chunk-rows", "8", "--backend", backend)
        assert result.exit_code == 0, result.output
        built[("tokens", backend)] = tokens
        for kind in ("topk", "sampled"):
            out = root / f"{kind}-{backend}"
            result = run_cli("teacher", "--tokens-store", tokens, "--teacher", root / "teacher", "--out", out,
                             "--kind", kind, "--top-k", "8", "--samples", "8", "--rows-per-shard", "12",
                             "--chunk-rows", "4", "--max-rows", "36", "--backend", backend)
            assert result.exit_code == 0, result.output
            built[(kind, backend)] = out
    return built


def read_everything(root):
    """What the readers decode: every chunk as the loader reads it, then every shard whole (stage
    one reading tokens, eval). Raises DistillError where a check fails."""
    store = open_store(root)
    reader = ChunkReader(str(root), store.index)
    chunks = {}
    for s, entry in enumerate(store.shards):
        for c in range(-(-entry["rows"] // store.params["chunk_rows"])):
            chunks[(s, c)] = reader.read(s, c)
    shards = [store.read_shard(i) for i in range(len(store.shards))]
    return chunks, shards


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)


def shard_files(root):
    store = open_store(root)
    files = []
    for i in range(len(store.shards)):
        path = store.shard_path(i)
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return files


def test_every_byte_flip_is_refused_or_harmless(stores):
    rng = random.Random(13)
    outcomes = {"refused": 0, "unchanged": 0}
    by_store = {}
    # what each intact store decodes, read once: every flipped byte is put back before the next flip
    intact = {key: read_everything(root) for key, root in stores.items()}
    for n in range(FLIPS):
        key = list(stores)[n % len(stores)]
        root = stores[key]
        want_chunks, want_shards = intact[key]
        path = rng.choice(shard_files(root))
        raw = bytearray(path.read_bytes())
        offset = rng.randrange(len(raw))
        original = raw[offset]
        raw[offset] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(raw))
        try:
            got_chunks, got_shards = read_everything(root)
        except DistillError as e:
            assert "\n" not in str(e) and path.relative_to(root).parts[0] in str(e), str(e)
            outcome = "refused"
        else:  # read without complaint: then it must be exactly what was written
            assert want_chunks.keys() == got_chunks.keys()
            assert all(same(want_chunks[k], got_chunks[k]) for k in want_chunks), (path, offset)
            assert all(same(a, b) for a, b in zip(want_shards, got_shards)), (path, offset)
            outcome = "unchanged"
        finally:
            raw[offset] = original
            path.write_bytes(bytes(raw))
        outcomes[outcome] += 1
        by_store.setdefault(key, {"refused": 0, "unchanged": 0})[outcome] += 1
    print(f"\n{FLIPS} byte flips: {outcomes}; by store: {by_store}")
    assert sum(outcomes.values()) == FLIPS
    assert outcomes["refused"] >= FLIPS // 2  # most bytes of a compressed file matter
    for key, root in stores.items():  # every byte was put back
        chunks, shards = read_everything(root)
        assert all(same(intact[key][0][c], chunks[c]) for c in chunks) and all(map(same, intact[key][1], shards))


def first_changing_flip(root, rng):
    """A byte flip in an array's data that a decoder accepts but that changes the decoded values:
    the case that used to train silently. Returns (path, offset, value)."""
    store = open_store(root)
    want, _ = read_everything(root)
    for _ in range(500):
        path = rng.choice([p for p in shard_files(root) if p.name != "zarr.json"])
        raw = bytearray(path.read_bytes())
        offset, value = rng.randrange(len(raw)), rng.randrange(1, 256)
        raw[offset] ^= value
        saved = path.read_bytes()
        path.write_bytes(bytes(raw))
        try:
            unchecked = ChunkReader(str(root), store.index, check=False)
            changed = any(not same(want[s, c], unchecked.read(s, c)) for s, c in want)
        except DistillError:  # the decoder itself noticed; not the case we are after
            changed = False
        path.write_bytes(saved)
        if changed:
            return path, offset, value
    raise AssertionError("no silently-decoding flip found")


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_stage_two_refuses_a_flip_the_decoder_accepts(stores, tmp_path, backend, tiny_model_config):
    """The acceptance case of #13: a flipped byte that zstd decodes without complaint into other
    values stops `distill student` with one line naming the shard and chunk; no model is saved."""
    root = tmp_path / "store"
    shutil.copytree(stores[("topk", backend)], root)
    path, offset, value = first_changing_flip(root, random.Random(backend))
    raw = bytearray(path.read_bytes())
    raw[offset] ^= value
    path.write_bytes(bytes(raw))
    before = tree_digest(root)
    out = tmp_path / "run"
    result = run_cli("student", "--train-store", root, "--model", tiny_model_config, "--out", out,
                     "--max-steps", "20", "--micro-batch-size", "4", "--alpha", "0.5", "--temperature", "1",
                     "--checkpoint-every", "0", "--eval-every", "0")
    line = one_line_error(result)
    assert path.relative_to(root).parts[0] in line and " chunk " in line and "--repair" in line, line
    assert not (out / "model").exists()
    assert tree_digest(root) == before  # the store is left as it was for inspection


@pytest.mark.parametrize("kind", ["tokens", "topk"])
def test_truncated_deleted_duplicated_and_unparsable(stores, tmp_path, kind):
    """Structural damage is refused when the store is opened, before any chunk is read."""
    for backend in ("zarr", "arrow"):
        src = stores[(kind, backend)]
        cases = {}

        def damage(name, fn):
            root = tmp_path / f"{kind}-{backend}-{name}"
            shutil.copytree(src, root)
            fn(root)
            with pytest.raises(DistillError) as caught:
                read_everything(root)
            cases[name] = str(caught.value)

        def truncate(root):
            path = shard_files(root)[-1]
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

        def delete_chunk_file(root):  # zarr would read a missing chunk file as zeros
            path = max(shard_files(root), key=lambda p: p.stat().st_size)
            path.unlink()

        def delete_shard(root):
            path = open_store(root).shard_path(1)
            shutil.rmtree(path) if path.is_dir() else path.unlink()

        def list_twice(root):
            reseal_index(root / "index.json", lambda index: index["shards"].__setitem__(1, dict(index["shards"][0])))

        def unparsable(root):
            (root / "index.json").write_text((root / "index.json").read_text()[:-30])

        for name, fn in [("truncated", truncate), ("chunk file deleted", delete_chunk_file),
                         ("shard deleted", delete_shard), ("listed twice", list_twice),
                         ("index does not parse", unparsable)]:
            damage(name, fn)
        assert "bytes on disk" in cases["truncated"]
        assert ("bytes on disk" if backend == "zarr" else "is missing") in cases["chunk file deleted"]
        assert "is missing" in cases["shard deleted"]
        assert "more than once" in cases["listed twice"]
        assert "does not parse" in cases["index does not parse"]
        assert all("\n" not in why for why in cases.values())

"""The index trusts nothing, itself included (#21 parts 1-2): every bit of a real store's index.json
flipped one at a time, and every numeric parameter edited by one step, is refused by ``open_store`` —
what stage two, stage one, eval and inspect call first — with one line (a DistillError); never
another exception, never acceptance.

The stores are real ones: the tiny teacher over real text, each stage-one kind (topk, sampled and
the hybrid: top-k plus tail draws) on both backends. Two kinds of edit:

- as a careless user makes it: the value changed and the file saved, its digest left as it was;
  refused by the digest (index_sha256);
- resealed: the same edit with the digest recomputed (a tool that rewrites indexes, or a store
  older than version 4, which has none): refused wherever the edited parameter contradicts the
  arrays it describes (shapes, the shard list, the grid); the rest only the digest can catch, and
  the test prints which those are.

The counts printed are the ones docs/RELIABILITY.md quotes (``pytest -s -m faults tests/faults/test_index_flips.py``).
"""

import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import pytest

from pipeline.errors import DistillError
from pipeline.store import contract as store_lib
from pipeline.store.contract import open_store
from pipeline.train.loader import ChunkReader
from tests.conftest import TOKENIZER, make_teacher, one_line_error, reseal_index, run_cli, write_corpus

pytestmark = pytest.mark.faults

KINDS = {
    "topk": ("--kind", "topk", "--top-k", "4"),
    "sampled": ("--kind", "sampled", "--samples", "6", "--sample-logprobs"),
    "hybrid": ("--kind", "topk", "--top-k", "4", "--tail-samples", "5", "--sample-logprobs"),
    "target": ("--kind", "target"),
}
BACKENDS = ("zarr", "arrow")
FAST_STEP = 7  # the default suite flips every 7th bit of one store


@pytest.fixture(scope="module")
def stores(tmp_path_factory, heldout_docs):
    """``stores(kind, backend)``: a stage-one store of 8 rows of 16 tokens in 2 shards of 2 chunks,
    built on first use (the tokens store and the teacher once per module)."""
    root = tmp_path_factory.mktemp("index-flips")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:6])
    make_teacher(root / "teacher")
    built = {}

    def get(kind, backend):
        tokens = root / f"tokens-{backend}"
        if not tokens.exists():
            result = run_cli("prepare", "--input", corpus, "--out", tokens, "--tokenizer", TOKENIZER, "--seq-len", "16",
                             "--rows-per-shard", "8", "--chunk-rows", "4", "--backend", backend)
            assert result.exit_code == 0, result.output
        if (kind, backend) not in built:
            out = root / f"{kind}-{backend}"
            result = run_cli("teacher", "--tokens-store", tokens, "--teacher", root / "teacher", "--out", out,
                             *KINDS[kind], "--samples", "6", "--rows-per-shard", "4", "--chunk-rows", "2",
                             "--max-rows", "8", "--backend", backend)
            assert result.exit_code == 0, result.output
            built[(kind, backend)] = out
        return built[(kind, backend)]

    return get


def flip_bits(root, step=1, first=0):
    """Flip bit ``first``, ``first + step``, … of ``root/index.json`` one at a time (in place, one
    byte written and put back), opening the store after each. Returns (flips, refused, why): ``why``
    counts the refusals by their reason. Any other exception propagates (and fails the test)."""
    path = root / "index.json"
    raw = path.read_bytes()
    open_store(root)  # the store is good before
    refused, accepted, why = 0, [], Counter()
    flips = range(first, len(raw) * 8, step)
    fd = os.open(path, os.O_RDWR)
    try:
        for bit in flips:
            at = bit // 8
            os.pwrite(fd, bytes([raw[at] ^ (1 << bit % 8)]), at)
            try:
                open_store(root)
            except DistillError as e:
                line = str(e)
                assert "\n" not in line and f"{root}" in line and "index.json" in line, line
                refused += 1
                why[line.split("index.json", 1)[1].split(";")[0].strip()[:40]] += 1
            else:
                accepted.append((bit, chr(raw[at])))
            finally:
                os.pwrite(fd, raw[at:at + 1], at)
    finally:
        os.close(fd)
    assert path.read_bytes() == raw
    assert not accepted, f"flips accepted (bit, byte): {accepted[:10]}"
    return len(flips), refused, why


def one_step_edits(index):
    """(label, edit) for every numeric parameter and count of the index moved by one step: ints ±1,
    the cache temperature to each other grid value and ±0.5, each grid value ±0.5, the grid one
    longer or shorter, a flag flipped; and the index's row, byte and token counts and shard 0's
    entry ±1."""
    params = index["params"]
    edits = []

    def param(key, value):
        edits.append((f"params.{key}: {params[key]!r} -> {value!r}", lambda b: b["params"].update({key: value})))

    for key, value in sorted(params.items()):
        if type(value) is bool:
            param(key, not value)
        elif type(value) is int:
            param(key, value - 1)
            param(key, value + 1)
    grid, temperature = params["temperature_grid"], params["temperature"]
    for value in [*(t for t in grid if t != temperature), temperature - 0.5, temperature + 0.5]:
        param("temperature", value)
    for g, t in enumerate(grid):
        for value in (t - 0.5, t + 0.5):
            param("temperature_grid", sorted({*grid[:g], value, *grid[g + 1:]}))
    param("temperature_grid", [*grid, grid[-1] + 1.0])
    param("temperature_grid", grid[:-1] if grid[-1] != temperature else grid[1:])
    for key in ("rows", "bytes", "tokens", "target_tokens"):
        for step in (-1, 1):
            edits.append((f"{key}: {index[key]} -> {index[key] + step}",
                          lambda b, key=key, step=step: b.update({key: b[key] + step})))
    for key in ("rows", "bytes", "chunk_rows"):
        for step in (-1, 1):
            edits.append((f"shards[0].{key} {step:+d}",
                          lambda b, key=key, step=step: b["shards"][0].update({key: b["shards"][0][key] + step})))
    return edits


# Parameters the data pins down: a resealed edit of these must still be refused (by check_params
# or the shard list on open, or by the per-chunk checks on read). The others — seed, the teacher's
# vocabulary, vocab_size within its dtype and, in a sampled store (no top-k mass to check), a cache
# temperature moved to another grid value or a grid value that is not the cache temperature — the
# data cannot tell, and only the digest guards them.
DATA_BOUND = ("samples", "tail_samples", "top_k", "seq_len", "rows", "rows_per_shard", "chunk_rows",
              "sample_logprobs", "bytes", "tokens", "target_tokens", "shards[0]")


def data_bound(label, index):
    key = label.split(":")[0].split(" ")[0].removeprefix("params.")
    if key in ("temperature", "temperature_grid") and "topk_logprobs" in index["arrays"]:
        return True  # a top-k's mass re-tempered to each grid value is 1 only at the true temperatures
    if key == "temperature":  # off the grid is refused; onto another grid value only by the digest
        return float(label.split("-> ")[1]) not in index["params"]["temperature_grid"]
    if key == "temperature_grid":  # the cache temperature leaves it, or its length changes
        new = json.loads(label.split("-> ")[1])
        return index["params"]["temperature"] not in new or len(new) != len(index["params"]["temperature_grid"])
    return key.startswith(DATA_BOUND)


def edit_and_open(root, label, edit, reseal):
    """Apply ``edit`` to the index (keeping its old digest unless ``reseal``), open the store (and,
    resealed, read every chunk), put the index back. Returns the refusal's line, or None where the
    store opened and read."""
    path = root / "index.json"
    raw = path.read_bytes()
    try:
        if reseal:
            reseal_index(path, edit)
        else:
            body = json.loads(raw)
            edit(body)
            path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        try:
            opened = open_store(root)
            if reseal:  # then read every chunk, as stage two's loader does
                reader = ChunkReader(str(root), opened.index)
                for s, entry in enumerate(opened.shards):
                    for c in range(-(-entry["rows"] // entry["chunk_rows"])):
                        reader.read(s, c)
        except DistillError as e:
            assert "\n" not in str(e) and str(root) in str(e), str(e)
            return str(e)
        return None
    finally:
        path.write_bytes(raw)


def check_param_edits(root):
    """Every one-step edit refused as saved (digest) and, where the data pins it, resealed.
    Returns counts for the report."""
    index = json.loads((root / "index.json").read_text())
    edits = one_step_edits(index)
    saved = [label for label, edit in edits if edit_and_open(root, label, edit, reseal=False) is None]
    assert not saved, f"edits accepted with the old digest: {saved}"
    resealed = {label: edit_and_open(root, label, edit, reseal=True) for label, edit in edits}
    missed = [label for label, why in resealed.items() if why is None and data_bound(label, index)]
    assert not missed, f"resealed edits of data-bound parameters accepted: {missed}"
    for label, why in resealed.items():  # a parameter's refusal names it and both values
        key = label.split(":")[0].removeprefix("params.")
        if why is not None and label.startswith("params.") and key in ("samples", "tail_samples", "top_k"):
            old, new = label.split(": ")[1].split(" -> ")
            assert f"{key} = {new}" in why and f"gives {old}" in why, why
    digest_only = sorted(label for label, why in resealed.items() if why is None)
    return len(edits), len(edits) - len(saved), sum(why is not None for why in resealed.values()), digest_only


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_bit_of_every_index_is_refused(stores, kind):
    """The exhaustive version: every bit of index.json, each kind, both backends; and every one-step
    parameter edit."""
    for backend in BACKENDS:
        root = stores(kind, backend)
        flips, refused, why = flip_bits(root)
        print(f"\n{kind}/{backend}: {flips} bit flips of index.json ({flips // 8} bytes), {refused} refused "
              f"with one line, 0 accepted; by reason: {dict(why.most_common())}")
        assert refused == flips
        tried, as_saved, resealed, digest_only = check_param_edits(root)
        print(f"{kind}/{backend}: {tried} one-step parameter edits: {as_saved} refused as saved (digest), "
              f"{resealed} refused resealed (checked against the data); only the digest catches: {digest_only}")
        assert as_saved == tried


def test_a_slice_of_bit_flips_and_every_parameter_edit(stores):
    """The default suite's slice: every 7th bit of a hybrid zarr store's index.json (offset so that
    each bit position of a byte is hit) and every one-step parameter edit of it."""
    root = stores("hybrid", "zarr")
    flips, refused, why = flip_bits(root, FAST_STEP, first=3)
    bits = (root / "index.json").stat().st_size * 8
    print(f"\nhybrid/zarr: {flips} of the {bits} bit flips tried (every {FAST_STEP}th), {refused} refused: {dict(why)}")
    assert refused == flips > 3000
    assert set(why) >= {"does not parse", "does not match its index_sha256 (edited or damaged since it was written)"[:40]}
    tried, as_saved, resealed, digest_only = check_param_edits(root)
    print(f"hybrid/zarr: {tried} parameter edits, {as_saved} refused as saved, {resealed} resealed; "
          f"digest only: {digest_only}")
    assert as_saved == tried > 40 and resealed >= tried - len(digest_only)


def test_a_target_store_refuses_flips_and_every_parameter_edit(stores):
    """The target kind (#25): its grid is the cache temperature alone, so a grid made longer, shorter or
    moved is refused against the data even resealed, as are the shapes and the shard list."""
    root = stores("target", "arrow")
    flips, refused, _ = flip_bits(root, 13, first=5)
    assert refused == flips > 1000
    tried, as_saved, resealed, digest_only = check_param_edits(root)
    print(f"\ntarget/arrow: {tried} parameter edits, {as_saved} refused as saved, {resealed} resealed; "
          f"digest only: {digest_only}")
    assert as_saved == tried > 20
    assert not [label for label in digest_only if "temperature" in label]


def test_flipped_digest_key_and_version_cannot_pass_for_an_older_store(stores, tmp_path, capsys):
    """The flips that would make a version-4 index look like an older, unchecked one: each bit of
    "format_version": 4 and of the key "index_sha256". And a store written before version 4 (no
    digest) still opens, with one warning, while a version-2 entry without its checksums is refused."""
    root = tmp_path / "s"
    shutil.copytree(stores("sampled", "arrow"), root)
    path = root / "index.json"
    raw = path.read_bytes()
    for needle in (b'"format_version": 4', b'"index_sha256"'):
        at = raw.index(needle)
        for bit in range(at * 8, (at + len(needle)) * 8):
            flipped = bytearray(raw)
            flipped[bit // 8] ^= 1 << bit % 8
            path.write_bytes(bytes(flipped))
            with pytest.raises(DistillError, match="index.json"):
                open_store(root)
    path.write_bytes(raw)

    # as today's code before version 4 wrote it: version 2, no digest
    old = json.loads(raw)
    del old["index_sha256"]
    old["format_version"] = 2
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    capsys.readouterr()
    for _ in range(2):
        assert open_store(root).index["format_version"] == 2
    err = capsys.readouterr().err
    assert err.count("the index itself is unchecked") == 1 and len(err.strip().splitlines()) == 1, err
    # ... with a (matching) digest it never had: not a version-2 index
    reseal_index(path, lambda body: None)
    with pytest.raises(DistillError, match="says format version 2, which has no index_sha256, but it carries one"):
        open_store(root)
    # an entry without its checksums (the key flipped): refused, not read unchecked
    entry = old["shards"][1]
    entry["crc33"] = entry.pop("crc32")
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    with pytest.raises(DistillError, match=r"shard-00001.arrow has or lacks crc32, crc33 \(format version 2 entries"):
        open_store(root)
    # and the same edit of samples is refused by the arrays' shapes even without a digest
    entry["crc32"] = entry.pop("crc33")
    old["params"]["samples"] = 7
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    with pytest.raises(DistillError, match=r"says samples = 7, but array sample_\w+'s shape \[16, 6\] gives 6"):
        open_store(root)


@pytest.mark.parametrize("kind,array", [("sampled", "sample_counts"), ("hybrid", "tail_sample_counts")])
def test_counts_that_do_not_add_up_to_the_draws_are_refused_per_chunk(stores, tmp_path, kind, array):
    """A count flipped in a shard whose checksums were made after the flip (what a version-1 store,
    which has none, reads): the chunk that holds it is refused when read, naming the sum and N."""
    root = tmp_path / "s"
    shutil.copytree(stores(kind, "zarr"), root)
    store = open_store(root)
    data = store.read_shard(1)
    r, t = 1, 5
    s = int(np.flatnonzero(data[array][r, t])[0])
    data[array][r, t, s] += 1  # chunk 0 of shard 1 (rows 0-1)
    draws = store.params["samples" if kind == "sampled" else "tail_samples"]
    entry = store_lib.write_shard(root, store.shards[1]["name"], data, "zarr", store.params["chunk_rows"])

    def put(index):
        index["shards"][1] = entry
        index["bytes"] = sum(e["bytes"] for e in index["shards"])

    reseal_index(root / "index.json", put)
    reader = ChunkReader(str(root), open_store(root).index)
    reader.read(0, 0), reader.read(1, 1)  # the other chunks read
    with pytest.raises(DistillError) as caught:
        reader.read(1, 0)
    assert str(caught.value).startswith(f"store {root}: shard shard-00001.zarr chunk 0 (rows 0-1) holds {array} that "
                                        f"add up to {draws + 1} at row {r} position {t}, the index says "
                                        f"{'samples' if kind == 'sampled' else 'tail_samples'} = {draws}")


def test_stage_two_refuses_an_edited_index_before_any_step(stores, tmp_path, tiny_model_config):
    """`distill student` on a store whose index.json was edited (samples 6 -> 7, saved by hand) exits
    2 with one line naming the file and how to rebuild it, before a step: no model, no metrics."""
    root = tmp_path / "store"
    shutil.copytree(stores("sampled", "zarr"), root)
    index = json.loads((root / "index.json").read_text())
    index["params"]["samples"] = 7
    (root / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    out = tmp_path / "run"
    result = run_cli("student", "--train-store", root, "--model", tiny_model_config, "--out", out,
                     "--max-steps", "2", "--micro-batch-size", "2", "--alpha", "0.5", "--temperature", "1",
                     "--checkpoint-every", "0", "--eval-every", "0", "--device", "cpu")
    line = one_line_error(result)
    assert f"store {root}: index.json does not match its index_sha256" in line and "distill merge" in line, line
    assert not (out / "model").exists() and not (out / "metrics.jsonl").exists()
    # a temperature the grid lacks: one line naming the store, the temperature and the grid
    shutil.copytree(stores("topk", "arrow"), tmp_path / "topk")
    result = run_cli("student", "--train-store", tmp_path / "topk", "--model", tiny_model_config, "--out", out,
                     "--max-steps", "2", "--micro-batch-size", "2", "--temperature", "3", "--device", "cpu")
    line = one_line_error(result)
    assert f"store {tmp_path / 'topk'}: --temperature 3 is not in the store's grid (1, 2)" in line, line


def test_the_edits_of_the_issue_on_a_store_without_a_digest(stores, tmp_path):
    """#21's edits, on stores as written before version 4 (version 2, no digest, so only the data can
    contradict them): each refused with one line naming the parameter or temperature, on open or at
    the first chunk stage two reads."""

    def legacy(kind, edit):
        root = tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(stores(kind, "zarr"), root)
        body = json.loads((root / "index.json").read_text())
        del body["index_sha256"]
        body["format_version"] = 2
        edit(body)
        (root / "index.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        with pytest.raises(DistillError) as caught:
            store = open_store(root)
            ChunkReader(str(root), store.index).read(0, 0)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert re.search(r"says samples = 7, but array sample_\w+'s shape \[16, 6\] gives 6",
                     legacy("sampled", lambda b: b["params"].update(samples=7)))
    assert re.search(r"says top_k = 5, but array topk_\w+'s shape \[16, 4\] gives 4",
                     legacy("topk", lambda b: b["params"].update(top_k=5)))
    assert re.search(r"says tail_samples = 6, but array tail_sample_\w+'s shape \[16, 5\] gives 5",
                     legacy("hybrid", lambda b: b["params"].update(tail_samples=6)))
    for kind in ("topk", "hybrid"):
        why = legacy(kind, lambda b: b["params"].update(temperature_grid=[1.0, 3.0]))
        assert "mass at T = 3 is" in why and "temperature 1 or grid (1, 3) is not what the log-probs" in why, why
        why = legacy(kind, lambda b: b["params"].update(temperature=2.0))
        assert "temperature 2 or grid (1, 2) is not what the log-probs were stored with" in why, why
    why = legacy("sampled", lambda b: b["params"].update(temperature=3.0))
    assert "cache temperature 3 is not in its temperature_grid (1, 2)" in why, why
    why = legacy("sampled", lambda b: b["shards"][0].pop("crc32"))
    assert "shard-00000.zarr has or lacks crc32" in why, why


def test_merge_checks_each_partial_index_and_seals_an_old_store(stores, tmp_path):
    """`distill merge` refuses a partial index that fails its digest (one line naming it and the job
    to rerun); one written before version 4 (no digest) is merged with a warning, and the index it
    writes is a sealed version-4 one: how an older stage-one store gets its digest."""
    root = tmp_path / "s"
    shutil.copytree(stores("topk", "arrow"), root)
    want = json.loads((root / "index.json").read_text())
    part = root / "index.part-00000-of-00001.json"
    raw = part.read_text()
    at = raw.index('"rows": 4')
    part.write_text(raw[:at] + '"rows": 5' + raw[at + len('"rows": 4'):])
    line = one_line_error(run_cli("merge", root))
    assert f"partial index {part} does not match its index_sha256" in line and "rerun job 0 of 1" in line, line

    old = json.loads(raw)
    del old["index_sha256"]
    part.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    body = json.loads((root / "index.json").read_text())
    del body["index_sha256"]
    body["format_version"] = 2
    (root / "index.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    result = run_cli("merge", root)
    assert result.exit_code == 0 and "merged unchecked" in result.output, result.output
    assert json.loads((root / "index.json").read_text()) == want  # sealed again, version 4

"""Stage one under faults: SIGKILL at random moments, two processes for one job, two merges at once,
and repair of a damaged store. After each, the store must end equal (shard by shard, content hash
and chunk checksums) to one written without faults, and no reader may ever see an index that
lists a missing or partial shard."""

import json
import random
import shutil
import threading
import time

import pytest

from pipeline.errors import DistillError
from pipeline.store import contract as store_lib
from pipeline.store.contract import content_hash, open_store, read_partial_index
from tests.conftest import TOKENIZER, make_teacher, one_line_error, run_cli, spawn, tree_digest, write_corpus

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, heldout_docs):
    root = tmp_path_factory.mktemp("stage1-faults")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:12])
    result = run_cli("prepare", "--input", corpus, "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--rows-per-shard", "40")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    result = run_cli(*teacher_args(root, root / "reference"))
    assert result.exit_code == 0, result.output
    return root


def teacher_args(inputs, out, *extra):
    """48 rows in 12 shards of 4: enough moments to land a kill in."""
    return ["teacher", "--tokens-store", inputs / "tokens", "--teacher", inputs / "teacher", "--out", out,
            "--kind", "topk", "--top-k", "8", "--tail-samples", "4", "--max-rows", "48", "--rows-per-shard", "4",
            "--chunk-rows", "2", "--batch-size", "2", *map(str, extra)]


def shard_records(root):
    return [(e["name"], e["sha256"], e["crc32"]) for e in json.loads((root / "index.json").read_text())["shards"]]


class Watcher(threading.Thread):
    """Reads every store under ``base`` the way a reader (or `distill merge`) would, as often as it
    can, while jobs write them: every shard an index or partial index lists must be there, whole."""

    def __init__(self, base):
        super().__init__(daemon=True)
        self.base, self.stop, self.problems, self.looks = base, threading.Event(), [], 0

    def run(self):
        while not self.stop.is_set():
            for root in sorted(self.base.iterdir()):
                self.look(root)
            time.sleep(0.01)

    def look(self, root):
        self.looks += 1
        if (root / "index.json").exists():
            try:
                open_store(root).verify()
            except (DistillError, json.JSONDecodeError) as e:
                self.problems.append(f"index.json: {e}")
        for path in sorted(root.glob("index.part-*.json")):
            body = read_partial_index(path)  # {} where it does not parse: must not happen (atomic writes)
            if path.exists() and not body:
                self.problems.append(f"{path.name} does not parse")
            for entry in body.get("shards", []):
                try:
                    arrays = store_lib.read_shard_file(root / entry["name"], body["backend"])
                except Exception as e:
                    self.problems.append(f"{path.name} lists {entry['name']}, unreadable ({type(e).__name__})")
                    continue
                if content_hash(arrays) != entry["sha256"]:
                    self.problems.append(f"{path.name} lists {entry['name']}, which is partial")


def recorded(out):
    return len(read_partial_index(out / "index.part-00000-of-00001.json").get("shards", []))


def kill_at_random_moments(inputs, base, kills, seed, fresh=False):
    """SIGKILL chains of stage-one runs at ``kills`` random moments (during start-up, while computing,
    while a shard is being written or recorded): each run continues the store the previous one left;
    once a store is complete the next kill starts a new one; ``fresh``: each run a new interpreter
    (conftest.spawn), whose seconds of imports the start-up moments were drawn for. Returns the
    watcher, the moments and the stores written."""
    rng = random.Random(seed)
    base.mkdir()
    watcher = Watcher(base)
    watcher.start()
    moments, stores = [], [base / "store-0"]
    for _ in range(kills):
        out = stores[-1]
        if recorded(out) >= 11:  # too little left to land a kill in: finish it later, start another
            out = base / f"store-{len(stores)}"
            stores.append(out)
        process = spawn(teacher_args(inputs, out), fresh=fresh)
        if rng.random() < 0.25:  # somewhere in start-up or the first shards
            target, delay = recorded(out), rng.uniform(1.0, 5.0)
        else:
            target, delay = rng.randrange(recorded(out) + 1, 12), rng.uniform(0.0, 0.1)
        lock = out / ".lock.part-00000-of-00001"
        started = time.time()
        while process.poll() is None and time.time() - started < 120 and delay < 1.0:
            # this run is past its start-up (it holds the job's lock) and has recorded `target` shards
            holder = lock.read_text() if lock.exists() else ""
            if holder.startswith(f"pid {process.pid} ") and recorded(out) >= target:
                break
            time.sleep(0.002)
        time.sleep(delay)
        process.kill()
        process.communicate(timeout=60)
        moments.append((target, round(delay, 3), process.returncode))
        watcher.look(out)
    for out in stores:
        final = spawn(teacher_args(inputs, out))
        output, _ = final.communicate(timeout=300)
        assert final.returncode == 0, output
    watcher.stop.set()
    watcher.join()
    return watcher, moments, stores


@pytest.mark.parametrize("kills", [pytest.param(2, id="2-kills"), pytest.param(12, id="12-kills", marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(inputs, tmp_path, kills):
    # the 12-kill run starts each run as a new interpreter, as a cluster does (its moments' delays are
    # drawn for that start-up); the 2-kill one forks them (conftest.spawn) to keep make test short
    watcher, moments, stores = kill_at_random_moments(inputs, tmp_path / "killed", kills, seed=kills, fresh=kills > 2)
    print(f"\n{kills} kills (shards recorded before the kill, extra delay s, exit): {moments}; "
          f"{len(stores)} stores; reader looks: {watcher.looks}")
    assert sum(rc == -9 for *_, rc in moments) >= kills - 1  # (a run may finish before its moment comes)
    assert watcher.problems == []
    for out in stores:
        assert shard_records(out) == shard_records(inputs / "reference")
        open_store(out).verify()
        assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # no temp files left behind


def test_a_second_process_for_the_same_job_stops_at_once(inputs, tmp_path):
    out = tmp_path / "store"
    first = spawn(teacher_args(inputs, out, "--rows-per-shard", "2"))
    part = out / "index.part-00000-of-00001.json"
    started = time.time()
    while not read_partial_index(part).get("shards") and first.poll() is None and time.time() - started < 120:
        time.sleep(0.01)
    assert first.poll() is None, "the first job ended before the second started"
    result = run_cli(*teacher_args(inputs, out, "--rows-per-shard", "2"))
    assert "is already being written by pid" in one_line_error(result)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    open_store(out).verify()  # the first job finished a whole store; nothing torn
    # Another job of the same array is not blocked by this one's lock.
    other = tmp_path / "two-jobs"
    for job in (0, 1):
        assert run_cli(*teacher_args(inputs, other, "--num-shards", 2, "--shard-index", job)).exit_code == 0
    assert shard_records(other) == shard_records(inputs / "reference")


def test_two_merges_at_once_give_one_valid_index(inputs, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(inputs / "reference", out)
    want = (out / "index.json").read_text()
    (out / "index.json").unlink()
    merges = [spawn(["merge", out]) for _ in range(2)]
    for merge in merges:
        output, _ = merge.communicate(timeout=120)
        assert merge.returncode == 0, output
    assert (out / "index.json").read_text() == want
    # and many more, as threads of one process, to press on the rename
    (out / "index.json").unlink()
    errors = []

    def merge():
        try:
            store_lib.merge_partial_indexes(out, "topk")
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=merge) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and (out / "index.json").read_text() == want
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_repair_forgets_bad_shards_and_a_rerun_of_their_jobs_restores_the_store(inputs, tmp_path):
    out = tmp_path / "store"
    for job in (0, 1):
        assert run_cli(*teacher_args(inputs, out, "--num-shards", 2, "--shard-index", job)).exit_code == 0
    want = shard_records(out)
    # one shard of job 1 rots (a flipped byte in its data), one shard of job 0 is deleted
    rotten = out / "shard-00003.zarr" / "topk_logprobs" / "c" / "0" / "0" / "0"
    raw = bytearray(rotten.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    rotten.write_bytes(bytes(raw))
    shutil.rmtree(out / "shard-00006.zarr")

    line = one_line_error(run_cli("inspect", out, "--verify"))
    assert "2 of 12 shards are bad" in line and "shard-00003.zarr" in line and "shard-00006.zarr" in line

    result = run_cli("inspect", out, "--verify", "--repair")
    assert result.exit_code == 0, result.output
    assert "bad shard shard-00003.zarr" in result.output and "bad shard shard-00006.zarr" in result.output
    assert "--shard-index 0, 1 of --num-shards 2" in result.output
    assert not (out / "index.json").exists() and not (out / "shard-00003.zarr").exists()
    parts = [read_partial_index(p) for p in sorted(out.glob("index.part-*.json"))]
    assert sorted(e["name"] for p in parts for e in p["shards"]) == sorted(
        n for n, *_ in want if n not in ("shard-00003.zarr", "shard-00006.zarr"))
    assert "unfinished" in one_line_error(run_cli("student", "--train-store", out, "--model", "x", "--out",
                                                  tmp_path / "run"))

    for job in (0, 1):  # rerun the array: each job recomputes only its missing shard
        result = run_cli(*teacher_args(inputs, out, "--num-shards", 2, "--shard-index", job))
        assert result.exit_code == 0 and "(1 written now" in result.output, result.output
    assert shard_records(out) == want
    assert run_cli("inspect", out, "--verify").exit_code == 0
    result = run_cli("inspect", out, "--verify", "--repair")
    assert result.exit_code == 0 and "nothing to repair (the store is complete)" in result.output


def test_repair_of_a_tokens_store_says_to_rebuild_it_and_changes_nothing(inputs, tmp_path):
    tokens = tmp_path / "tokens"
    shutil.copytree(inputs / "tokens", tokens)
    shard = next(p for p in sorted(tokens.rglob("*")) if p.is_file() and p.name == "0")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    before = tree_digest(tokens)
    line = one_line_error(run_cli("inspect", tokens, "--verify", "--repair"))
    assert "not repaired shard by shard" in line and "distill prepare" in line
    assert tree_digest(tokens) == before

"""``distill status``: numbers read back from stores and runs written by the stages (or planted where
only their shape matters), with planted modification times for rates and ETAs, stub squeue/sacct,
and a directory renamed under the reader."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import DistillError
from pipeline.store import contract as store_lib
from stages.status import _parse_states, describe
from tests.conftest import ROOT, TOKENIZER, make_teacher, one_line_error, run_cli, write_tiny_model_config

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tokens store (262 rows of 32), and a stage-one store of 4 shards of 12 rows filled by job 0 of 3
    (shards 0 and 3; jobs 1 and 2 each owe one)."""
    import gzip

    root = tmp_path_factory.mktemp("status")
    with gzip.open(ROOT / "data" / "corpus" / "heldout.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(12), f)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = run_cli("prepare", "--input", root / "corpus.jsonl", "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--rows-per-shard", "40")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out", root / "half",
                     "--kind", "topk", "--top-k", "4", "--rows-per-shard", "12", "--max-rows", "48",
                     "--num-shards", "3", "--shard-index", "0")
    assert result.exit_code == 0 and "not merged yet" in result.output, result.output
    return root


@pytest.fixture
def half(built, tmp_path):
    """A copy of the half-filled store with planted times: job 0 started at T0, its shards landed at
    T0 + 100 and T0 + 160."""
    store = tmp_path / "half"
    shutil.copytree(built / "half", store)
    os.utime(store / "config.part-00000.json", (T0, T0))
    os.utime(store / "shard-00000.zarr", (T0 + 100, T0 + 100))
    os.utime(store / "shard-00003.zarr", (T0 + 160, T0 + 160))
    return store


def test_half_filled_store_counts_rate_and_eta(half):
    report = describe(half, now=T0 + 200)
    assert report["kind"] == "stage-one" and report["store_kind"] == "topk" and report["jobs"] == 3
    assert report["shards"] == {"total": 4, "done": 2, "in_flight": 0, "missing": 2}
    assert report["rows"] == {"done": 24, "total": 48}
    assert report["tokens"] == {"done": 24 * 32, "total": 48 * 32}
    # tokens after the first shard over the span from the first shard to the last: 12 × 32 / 60 s
    assert report["tokens_per_s"] == pytest.approx(12 * 32 / 60, abs=0.05)
    tasks = {t["task"]: t for t in report["tasks"]}
    assert (tasks[0]["shards"], tasks[0]["done"], tasks[0]["missing"]) == (2, 2, 0)
    assert tasks[0]["seconds_per_shard"] == pytest.approx(60.0)  # two shards since the job started: their gap
    assert tasks[0]["last_shard_age_s"] == pytest.approx(40.0)
    assert tasks[0]["eta_s"] == 0.0
    for task in (1, 2):  # no rate of their own: one shard each × job 0's 60 s
        assert (tasks[task]["done"], tasks[task]["missing"], tasks[task]["eta_s"]) == (0, 1, pytest.approx(60.0))
    assert report["eta_s"] == pytest.approx(60.0)
    assert report["state"] == "idle" and not any(t["in_flight"] for t in tasks.values())


def test_one_shard_since_start_rates_from_the_job_start(half):
    """A rerun (its config part rewritten at T0 + 130) has written one shard since: start to shard."""
    os.utime(half / "config.part-00000.json", (T0 + 130, T0 + 130))
    tasks = describe(half, now=T0 + 200)["tasks"]
    assert tasks[0]["seconds_per_shard"] == pytest.approx(30.0)
    assert tasks[1]["eta_s"] == pytest.approx(30.0)


def test_held_lock_and_temp_shard_are_in_flight_and_the_holder_is_not_disturbed(half):
    import fcntl

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(half / '.lock.part-00001-of-00003')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, b'pid 1 on elsewhere since now')\n"
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (half / ".shard-00002.zarr.tmp-4242").mkdir()
        report = describe(half, now=T0 + 200)
        tasks = {t["task"]: t for t in report["tasks"]}
        assert tasks[1]["lock_held"] and tasks[1]["in_flight"] and tasks[1]["holder"] == "pid 1 on elsewhere since now"
        assert tasks[2]["writing"] == ["shard-00002.zarr"] and tasks[2]["in_flight"] and not tasks[2]["lock_held"]
        assert report["shards"]["in_flight"] == 1 and report["state"] == "running"
        # the holder still holds it: an exclusive lock is still refused, and the holder is alive
        fd = os.open(half / ".lock.part-00001-of-00003", os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    # released with its holder; status left no lock of its own behind: a job takes it at once
    assert not {t["task"]: t for t in describe(half)["tasks"]}[1]["lock_held"]
    store_lib.JobLock(half, 1, 3).release()


def test_cli_text_and_json(half):
    result = run_cli("status", half, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) == {"path", "kind", "state", "store_kind", "backend", "jobs", "shards", "rows", "tokens",
                           "rows_per_shard", "tokens_per_s", "eta_s", "tasks"}
    assert set(report["tasks"][0]) == {"task", "shards", "done", "missing", "in_flight", "lock_held", "holder",
                                       "writing", "seconds_per_shard", "last_shard_age_s", "eta_s"}
    text = run_cli("status", half)
    assert text.exit_code == 0
    assert "2 of 4 shards done, 0 being written, 2 missing (3 jobs)" in text.output
    assert "tokens 768 of 1,536" in text.output and "task 1: 0/1 shards, not running" in text.output
    assert "tasks 1, 2 owe shards" in text.output


def test_inspect_on_an_unfinished_store_points_to_status(half):
    line = one_line_error(run_cli("inspect", half))
    assert f"distill status {half}" in line and "no index.json yet" in line


def test_all_shards_recorded_is_ready_to_merge_then_complete(built, tmp_path):
    store = tmp_path / "full"
    shutil.copytree(built / "half", store)
    for task in (1, 2):
        result = run_cli("teacher", "--tokens-store", built / "tokens", "--teacher", built / "teacher", "--out", store,
                         "--kind", "topk", "--top-k", "4", "--rows-per-shard", "12", "--max-rows", "48",
                         "--num-shards", "3", "--shard-index", str(task))
        assert result.exit_code == 0, result.output
    # the last job merges: complete
    report = describe(store)
    assert report == {"path": str(store), "kind": "store", "state": "complete", "store_kind": "topk",
                      "backend": "zarr", "rows": 48, "shards": 4, "tokens": 48 * 32, "bytes": report["bytes"]}
    (store / "index.json").unlink()
    assert describe(store)["state"] == "ready to merge"
    assert "distill merge" in run_cli("status", store).output


def test_store_written_concurrently_never_crashes(half):
    """A writer renames a shard away and back, rewrites the partial index with and without it and adds
    and removes temp names while status reads: every read is whole, none fails."""
    part = half / "index.part-00000-of-00003.json"
    body = json.loads(part.read_text())
    without = [e for e in body["shards"] if e["name"] != "shard-00003.zarr"]
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            os.replace(half / "shard-00003.zarr", half / ".shard-00003.zarr.tmp-77")
            store_lib.write_partial_index(part, body["params"], body["backend"], body["arrays"], without)
            (half / f".index.part-00000-of-00003.json.tmp-{i}").write_text("{")
            os.replace(half / ".shard-00003.zarr.tmp-77", half / "shard-00003.zarr")
            store_lib.write_partial_index(part, body["params"], body["backend"], body["arrays"], body["shards"])
            (half / f".index.part-00000-of-00003.json.tmp-{i}").unlink()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = set()
        deadline = time.time() + 3
        while time.time() < deadline:
            report = describe(half)
            assert report["kind"] == "stage-one" and report["shards"]["total"] == 4
            seen.add(report["shards"]["done"])
        assert seen <= {1, 2} and seen
    finally:
        stop.set()
        thread.join()


def test_hostile_entries_are_one_line(half, tmp_path):
    lock = half / ".lock.part-00002-of-00003"
    os.mkfifo(lock)
    assert "a FIFO" in one_line_error(run_cli("status", half))  # never opened for reading: no hang
    lock.unlink()
    part = half / "index.part-00000-of-00003.json"
    os.replace(part, tmp_path / "elsewhere.json")
    part.symlink_to(tmp_path / "elsewhere.json")
    assert "symbolic link" in one_line_error(run_cli("status", half))


def test_unknown_and_missing_paths_are_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    line = one_line_error(run_cli("status", tmp_path))
    assert "holds nothing distill status knows" in line and "slurm.json" in line and "round-RRR" in line
    assert "does not exist" in one_line_error(run_cli("status", tmp_path / "nope"))
    assert "not a directory" in one_line_error(run_cli("status", tmp_path / "notes.txt"))


def test_tokens_store_being_prepared(built, tmp_path):
    """What prepare has in .OUT.tmp-PID/: shards, rows and tokens from their zarr.json, a rate."""
    tmp = tmp_path / f".tokens.tmp-{os.getpid()}"
    tmp.mkdir()
    for i, t in ((0, T0), (1, T0 + 30), (2, T0 + 60)):
        shutil.copytree(built / "tokens" / f"shard-0000{i}.zarr", tmp / f"shard-0000{i}.zarr")
        os.utime(tmp / f"shard-0000{i}.zarr", (t, t))
    (tmp / ".shard-00003.zarr.tmp-1").mkdir()
    report = describe(tmp_path / "tokens", now=T0 + 90)
    assert report["kind"] == "tokens-prepare" and report["state"] == "running" and report["writer_alive"] is True
    assert (report["shards"], report["rows"], report["tokens"], report["writing"]) == (3, 120, 120 * 32, 1)
    assert report["tokens_per_s"] == pytest.approx(80 * 32 / 60, abs=0.05)
    assert report["last_shard_age_s"] == pytest.approx(30.0)
    assert "distill status" in one_line_error(run_cli("inspect", tmp_path / "tokens"))


# ---------------------------------------------------------------------- stage two


def test_student_run_finished_then_damaged_checkpoint(built, tmp_path):
    out = tmp_path / "run"
    result = run_cli("student", "--train-store", built / "tokens", "--model", write_tiny_model_config(tmp_path / "t.json"),
                     "--out", out, "--max-steps", "3", "--micro-batch-size", "4", "--log-every", "1",
                     "--checkpoint-every", "2", "--eval-every", "0", "--warmup-steps", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = describe(out)
    assert report["kind"] == "student" and report["state"] == "finished"
    assert (report["step"], report["max_steps"]) == (3, 3)
    assert report["loss"] == records[-1]["loss"] and report["tokens"] == 3 * 4 * 31
    assert report["checkpoint"] == {"path": str(out / "checkpoints" / "step-00000003"), "step": 3}
    assert report["final"]["step"] == 3
    # the newest checkpoint damaged, the run not finished: the newest intact one is named, and why not the other
    shutil.rmtree(out / "model")
    state = out / "checkpoints" / "step-00000003" / "state.pt"
    data = bytearray(state.read_bytes())
    data[-100] ^= 0xFF
    state.write_bytes(bytes(data))
    report = describe(out)
    assert report["state"] == "in progress" and report["checkpoint"]["step"] == 2
    assert [d["path"] for d in report["damaged_checkpoints"]] == [str(state.parent)]
    assert "sha256" in report["damaged_checkpoints"][0]["problem"]


def test_student_eta_preempted_and_torn_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"stage": "TrainConfig", "config": {"max_steps": 100}}))
    lines = [{"step": 10, "loss": 3.5, "tokens": 1000, "tokens_per_s": 2000.0, "step_s": 0.5},
             {"step": 20, "tokens": 2000, "heldout_loss": 3.25},
             {"step": 20, "loss": 3.0, "tokens": 2000, "tokens_per_s": 1000.0, "step_s": 1.5}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 21, "lo')
    os.utime(out / "metrics.jsonl", (T0, T0))
    report = describe(out, now=T0 + 12)
    assert (report["state"], report["step"], report["max_steps"], report["loss"]) == ("in progress", 20, 100, 3.0)
    assert report["heldout_loss"] == 3.25 and report["tokens_per_s"] == 1000.0
    assert report["eta_s"] == pytest.approx(80 * 1.0)  # 80 steps left × the mean logged step time
    assert report["last_log_age_s"] == pytest.approx(12.0)
    (out / "preempted.json").write_text(json.dumps({"step": 20, "signal": "SIGUSR1", "checkpoint": None,
                                                    "time": "2026-01-01T00:00:00+00:00"}))
    report = describe(out)
    assert report["state"] == "preempted" and report["preempted"]["signal"] == "SIGUSR1" and report["eta_s"] is None
    assert "pre-empted by SIGUSR1 at step 20" in run_cli("status", out).output


# ---------------------------------------------------------------------- rounds


def planted_rounds(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"stage": "RoundsConfig", "config": {"rounds": 2,
                                                                                      "objective": "reverse-kl"}}))
    (root / "round-000").mkdir()
    (root / "round-000" / "round.json").write_text(json.dumps({"round": 0, "reverse_kl_per_token": 0.75,
                                                               "reverse_kl_stderr": 0.01, "teacher_tokens_total": 0}))
    d = root / "round-001"
    (d / "steps").mkdir(parents=True)
    for step in ("generate-student", "prepare", "teacher", "student", "heldout-generate", "heldout-prepare",
                 "heldout-teacher"):
        (d / "steps" / f"{step}.json").write_text("{}")
    (d / "prompts.json").write_text("{}")
    (d / "gen-student").mkdir()
    (d / "gen-student" / "summary.json").write_text("{}")
    (d / "tokens").mkdir()
    (d / "tokens" / "index.json").write_text("{}")
    return root


def test_rounds_round_by_round(tmp_path, half):
    root = planted_rounds(tmp_path / "rounds")
    shutil.copytree(half, root / "round-001" / "store")  # its stage one half done
    report = describe(root)
    assert (report["kind"], report["state"], report["rounds_planned"], report["rounds_finished"]) == (
        "rounds", "in progress", 3, 1)
    r0, r1, r2 = report["rounds"]
    assert r0["state"] == "finished" and r0["reverse_kl_per_token"] == 0.75
    assert r1["state"] == "in progress" and r1["step"] == "teacher"
    assert r1["steps_done"] == ["prompts", "generate-student", "prepare"]
    assert r1["detail"]["kind"] == "stage-one" and r1["detail"]["shards"]["done"] == 2
    assert r2["state"] == "not started"
    text = run_cli("status", root).output
    assert "1 of 3 rounds finished" in text and "round 1: in progress, at step teacher" in text


# ---------------------------------------------------------------------- slurm


def planted_slurm(tmp_path: Path, half: Path) -> Path:
    out = tmp_path / "slurm"
    (out / "config").mkdir(parents=True)
    (out / "slurm.json").write_text(json.dumps({"teacher": {"out": str(half)}}))
    (out / "jobs.json").write_text(json.dumps({"jobs": {"teacher": "100", "merge": "101", "student": "102",
                                                        "eval": "103"}, "array": None, "submitted": "2026-01-01T00:00:00"}))
    (out / "config" / "teacher.yaml").write_text(f"out: {half}\n")
    (out / "config" / "student.yaml").write_text(f"out: {tmp_path / 'student'}\n")
    (out / "config" / "eval-0.yaml").write_text(f"out: {tmp_path / 'eval.json'}\n")
    (out / "1-teacher.sbatch").write_text(f"#!/bin/bash\nset -euo pipefail\ncd {tmp_path}\n")
    return out


SACCT = """100_0|COMPLETED
100_0.batch|COMPLETED
100_1|RUNNING
100_[2-3,5]|PENDING
101|PENDING
102|PENDING
"""
SQUEUE = """100_1|RUNNING
100_[2-3,5]|PENDING
101|PENDING
102|PENDING
"""


def stub_bin(tmp_path: Path, **outputs: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in outputs.items():
        (tmp_path / f"{name}.out").write_text(text)
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / (name + ".args")}\ncat {tmp_path / (name + ".out")}\n')
        stub.chmod(0o755)
    return bin_dir


def test_parse_states_counts_array_tasks():
    assert _parse_states(SACCT) == {"100": {"COMPLETED": 1, "RUNNING": 1, "PENDING": 3}, "101": {"PENDING": 1},
                                    "102": {"PENDING": 1}}
    assert _parse_states("7|CANCELLED by 1000\n") == {"7": {"CANCELLED": 1}}


def test_slurm_out_with_squeue_and_sacct(tmp_path, half, monkeypatch):
    out = planted_slurm(tmp_path, half)
    monkeypatch.setenv("PATH", f"{stub_bin(tmp_path, sacct=SACCT, squeue=SQUEUE)}:/usr/bin:/bin")
    report = describe(out)
    assert report["kind"] == "slurm" and report["source"] == "sacct+squeue"
    jobs = {j["name"]: j for j in report["jobs"]}
    assert jobs["teacher"]["id"] == "100" and jobs["teacher"]["state"] == "RUNNING"
    assert jobs["teacher"]["tasks"] == {"COMPLETED": 1, "RUNNING": 1, "PENDING": 3}
    assert jobs["merge"]["state"] == "PENDING" and jobs["merge"]["done_on_disk"] is False
    assert jobs["eval"]["state"] == "no queue record; not done on disk"
    assert report["stages"]["teacher"]["shards"]["done"] == 2 and report["stages"]["student"] is None
    assert "--jobs=100,101,102,103" in (tmp_path / "sacct.args").read_text()
    assert "--parsable2" in (tmp_path / "sacct.args").read_text()
    text = run_cli("status", out).output
    assert "1 completed, 3 pending, 1 running" in text and "2 of 4 shards done" in text


def test_slurm_out_without_slurm_reads_the_disk(tmp_path, half, monkeypatch):
    out = planted_slurm(tmp_path, half)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    report = describe(out)
    assert report["source"] == "disk"
    jobs = {j["name"]: j for j in report["jobs"]}
    assert jobs["teacher"]["done_on_disk"] is False and jobs["teacher"]["state"] == "no queue record; not done on disk"
    # the rest of the store recorded: the teacher job is done on disk, merge not yet
    (tmp_path / "eval.json").write_text("{}")
    shutil.copytree(half / "shard-00000.zarr", half / "shard-00001.zarr")
    shutil.copytree(half / "shard-00000.zarr", half / "shard-00002.zarr")
    body = json.loads((half / "index.part-00000-of-00003.json").read_text())
    for task in (1, 2):
        entry = {**body["shards"][0], "name": f"shard-0000{task}.zarr"}
        store_lib.write_partial_index(half / f"index.part-0000{task}-of-00003.json", body["params"], body["backend"],
                                      body["arrays"], [entry])
    jobs = {j["name"]: j for j in describe(out)["jobs"]}
    assert jobs["teacher"]["state"] == "DONE (on disk)" and jobs["merge"]["done_on_disk"] is False
    assert jobs["eval"]["state"] == "DONE (on disk)"


def test_squeue_that_refuses_a_finished_job_id_is_asked_for_the_users_jobs(tmp_path, half, monkeypatch):
    """An older squeue exits 1 ("Invalid job id specified") when --jobs names a job it forgot: then
    ``squeue --me``, keeping only this OUT's jobs."""
    out = planted_slurm(tmp_path, half)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text('#!/bin/sh\ncase "$*" in *--jobs=*) echo "Invalid job id specified" >&2; exit 1;; '
                                    'esac\nprintf "100_1|RUNNING\\n999|RUNNING\\n101|PENDING\\n"\n')
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    report = describe(out)
    assert report["source"] == "squeue"
    jobs = {j["name"]: j for j in report["jobs"]}
    assert jobs["teacher"]["tasks"] == {"RUNNING": 1} and jobs["merge"]["state"] == "PENDING"
    assert jobs["student"]["tasks"] is None and "999" not in json.dumps(report)


def test_slurm_out_with_processes_per_array_task_names_each_owners_task(tmp_path, half, monkeypatch):
    """The half-filled store's 3 owners are one array task of 3 processes (jobs.teacher.procs_per_node: 3):
    the report says which array task and process each owner is, and what to resubmit."""
    out = planted_slurm(tmp_path, half)
    (out / "slurm.json").write_text(json.dumps({"jobs": {"teacher": {"array": "1%1", "procs_per_node": 3}},
                                                "teacher": {"out": str(half)}}))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    report = describe(out)
    assert report["stage_one_layout"] == {"array_tasks": 1, "nodes": 1, "procs_per_node": 3, "owners": 3}
    tasks = report["stages"]["teacher"]["tasks"]
    assert [(t["task"], t["array_task"], t["process"]) for t in tasks] == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]
    text = run_cli("status", out).output
    assert "stage one: 1 array task × 1 node × 3 processes = 3 shard owners" in text, text
    assert "task 1 (array task 0, process 1): 0/1 shards, not running" in text, text
    assert "owners 1, 2 owe shards: distill slurm --resubmit" in text, text
    # a slurm.json of one process per task, or one not as distill slurm writes it: no layout, no annotation
    for raw in ({"jobs": {"teacher": {"array": 3}}}, {"jobs": {"teacher": {"procs_per_node": "x"}}}, {"jobs": 5}):
        (out / "slurm.json").write_text(json.dumps(raw))
        report = describe(out)
        assert report["stage_one_layout"] is None and "array_task" not in report["stages"]["teacher"]["tasks"][0]


def test_status_while_a_real_stage_one_job_writes(built, tmp_path):
    """A stage-one process writing 16 shards of 2 rows while status reads it over and over: every read
    succeeds, shards done never go down, the job is seen running by its lock, and the end is complete."""
    from tests.conftest import spawn

    store = tmp_path / "live"
    job = spawn(["teacher", "--tokens-store", built / "tokens", "--teacher", built / "teacher", "--out", store,
                 "--kind", "topk", "--top-k", "4", "--rows-per-shard", "2", "--max-rows", "32", "--batch-size", "1"])
    reports = []
    try:
        while job.poll() is None:
            if store.exists() and any(store.iterdir()):
                try:
                    reports.append(describe(store))
                except DistillError as e:  # only before the job has recorded what the store is
                    assert "says how many jobs" in str(e) or "holds nothing" in str(e), e
            time.sleep(0.01)
    finally:
        output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    stage_one = [r for r in reports if r["kind"] == "stage-one"]
    assert stage_one and any(r["state"] == "running" and r["tasks"][0]["lock_held"] for r in stage_one)
    done = [r["shards"]["done"] for r in stage_one]
    assert done == sorted(done) and all(r["shards"]["total"] in (16, None) for r in stage_one)
    assert describe(store)["state"] == "complete"

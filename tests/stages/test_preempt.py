"""Pre-emption (pipeline/preempt.py), with the real signals a batch system sends, to real processes.

Stage two: SIGUSR1 or SIGTERM, to any one rank, stops every rank after the same whole step with a
checkpoint there, ``OUT/preempted.json`` and exit status 75; ``--resume auto`` then ends with the
same weights, bit for bit, and the same metrics log as a run never stopped. Stage one: the job
finishes (or abandons) the shard in hand, records what it wrote, exits 75, and the rerun completes
the same store. From the first instruction: a signal while distill is still importing torch is not
lost — the run exits 75 with preempted.json, or, for a stage that had not begun, having written nothing.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.preempt import EXIT_PREEMPTED
from pipeline.store.contract import READERS, JobLock, content_hash, open_store
from pipeline.train.metrics import MACHINE_SCALARS
from tests.conftest import (ROOT, TOKENIZER, make_teacher, run_cli, run_env, spawn, spawn_ranks, write_corpus,
                            write_tiny_model_config)

STEPS = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory, heldout_docs):
    """A tokens store (32-token rows) and a small held-out one, a tiny teacher, a sampled store of
    the first 160 rows, a tiny student."""
    root = tmp_path_factory.mktemp("preempt")
    for name, docs in (("tokens", heldout_docs[:10]), ("heldout", heldout_docs[10:12])):
        write_corpus(root / f"{name}.jsonl", docs)
        result = run_cli("prepare", "--input", root / f"{name}.jsonl", "--out", root / name, "--tokenizer",
                         TOKENIZER, "--seq-len", "32", "--rows-per-shard", "64", "--chunk-rows", "8")
        assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    result = run_cli(*teacher_args(root, root / "store", 160, "--rows-per-shard", "40"))
    assert result.exit_code == 0, result.output
    write_tiny_model_config(root / "tiny.json")
    return root


def teacher_args(data, out, rows, *extra):
    return ["teacher", "--tokens-store", data / "tokens", "--teacher", data / "teacher", "--out", out,
            "--samples", "8", "--chunk-rows", "2", "--max-rows", str(rows), *map(str, extra)]


def student_args(data, out, steps=STEPS, *extra):
    return ["student", "--train-store", data / "store", "--eval-store", data / "heldout", "--model", data / "tiny.json",
            "--out", out, "--max-steps", str(steps), "--micro-batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
            "--log-every", "1", "--eval-every", "5", "--eval-rows", "16", "--checkpoint-every", "3",
            "--resume", "auto", *map(str, extra)]


# ---------------------------------------------------------------------- processes


def finished(process: subprocess.Popen, timeout: float = 120) -> str:
    """The process's output once it has ended; on a hang, its whole tree is killed and the test fails."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *descendants(process.pid)]:
            with_pid(pid, signal.SIGKILL)
        output = process.communicate()[0]
        pytest.fail(f"still running after {timeout} s (a rank left the others waiting?)\n{output[-3000:]}")


def ran(args, ranks: bool = False, **launch) -> str:
    """``distill ARGS`` run to its end (``launch``: as :func:`spawn` takes it; ``ranks``: two ranks
    forked as torchrun's workers, :func:`spawn_ranks`), which must be a success."""
    process = spawn_ranks(args) if ranks else spawn(args, **launch)
    output = finished(process)
    assert process.returncode == 0, output
    return output


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (torchrun starts each worker in a session of its own,
    so process groups do not find them; a batch system finds them as this does)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def deaf_to(pid: int, sig: int) -> bool:
    """Whether ``sig`` neither stops nor reaches process ``pid`` (ignored or blocked: /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(re.search(rf"{field}:\s*(\w+)", status).group(1), 16) for field in ("SigIgn", "SigBlk")]
    return any(mask & (1 << (sig - 1)) for mask in masks)


def with_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def signal_when(process: subprocess.Popen, ready, send) -> None:
    """Call ``send()`` (which signals) once ``ready()`` is true; fails if the run ended first."""
    deadline = time.time() + 120
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be signalled:\n" + finished(process)[-3000:]
    send()


# ---------------------------------------------------------------------- what a stopped run leaves


def stopped_at(out: Path, output: str, sig: signal.Signals, torchrun: bool = False) -> int:
    """The step a pre-empted run stopped at, after checking what it left: preempted.json, a complete
    checkpoint at that step, no model, and one line that says so; no error, and no traceback but
    torchrun's own (it fails when a worker exits non-zero)."""
    marker = json.loads((out / "preempted.json").read_text())
    step = marker["step"]
    ckpt = out / "checkpoints" / f"step-{step:08d}"
    assert marker["signal"] == sig.name and marker["checkpoint"] == str(ckpt) and marker["time"]
    assert (ckpt / "state.pt").is_file() and not (out / "model").exists()
    lines = [line for line in output.splitlines() if "distill: " in line]
    assert [line[line.index("distill: "):] for line in lines] == [
        f"distill: preempted by {sig.name} at step {step}; checkpoint {ckpt}; rerun with --resume auto to continue"]
    assert "error:" not in output and output.count("Traceback (most recent call last)") == int(torchrun), output
    return step


def resumed(args, out: Path, step: int, **launch) -> None:
    output = ran(args, **launch)
    assert f"resumed from {out / 'checkpoints' / f'step-{step:08d}'} at step {step}" in output
    assert not (out / "preempted.json").exists()


def assert_same_run(out: Path, reference: Path) -> None:
    """Bit-identical weights and the same metrics log (less the timings) as the uninterrupted run."""
    want, got = load_file(reference / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name

    def log(run):
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if k not in MACHINE_SCALARS} for r in records]

    assert log(out) == log(reference)


@pytest.fixture(scope="module")
def reference(data):
    """An uninterrupted one-process run."""
    ran(student_args(data, data / "reference"))
    return data / "reference"


# ---------------------------------------------------------------------- stage two, one process


@pytest.mark.parametrize("sig", [signal.SIGUSR1, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGUSR1", "SIGTERM"])
def test_signal_stops_after_a_whole_step_and_resume_equals_uninterrupted(data, reference, sig):
    """The signal goes to every process of the run, as SLURM sends it: the trainer and its loader's
    reader process (--workers 1), which must live on until the trainer has stopped."""
    out = data / f"one-{sig.name}"
    args = student_args(data, out, STEPS, "--workers", "1")
    k = random.Random(sig.name).choice([3, 6, 9])  # the checkpoint that exists when the signal is sent
    process = spawn(args)

    def everyone():
        helpers = descendants(process.pid)  # the reader, multiprocessing's resource tracker
        assert len(helpers) >= 2 and all(deaf_to(pid, sig) for pid in helpers), helpers
        for pid in [process.pid, *helpers]:
            with_pid(pid, sig)

    signal_when(process, (out / "checkpoints" / f"step-{k:08d}").exists, everyone)
    output = finished(process)
    assert process.returncode == EXIT_PREEMPTED, output
    step = stopped_at(out, output, sig)
    assert k < step < STEPS  # the flag is read at step k+1's all-reduce at the earliest
    resumed(args, out, step)
    assert_same_run(out, reference)


def test_signal_in_setup_or_final_evaluation_ends_cleanly_and_handlers_come_back(data, monkeypatch):
    """In-process: a signal while the run is set up (no step run yet; then a resumed one), and one
    during the final evaluation (after the last checkpoint). Each exits 75 and leaves what its rerun
    needs; the reruns end as a run never stopped; the process's own handlers are back after each."""
    from stages import student

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    steps = 6

    def signal_in(name, sig, when=lambda *a, **k: True):
        original = getattr(student, name)

        def wrapper(*args, **kwargs):
            if when(*args, **kwargs):
                os.kill(os.getpid(), sig)
            return original(*args, **kwargs)

        monkeypatch.setattr(student, name, wrapper)

    def run(out, expect):
        result = run_cli(*student_args(data, out, steps))
        monkeypatch.undo()
        assert result.exit_code == expect, result.output
        assert {sig: signal.getsignal(sig) for sig in before} == before
        return result.output

    # During setup of a fresh run: no step, no checkpoint; the rerun starts over.
    signal_in("_optimizer", signal.SIGTERM)
    output = run(data / "setup", EXIT_PREEMPTED)
    assert "distill: preempted by SIGTERM at step 0; no step had run, so no checkpoint; rerun with --resume auto " \
           "to start" in output
    marker = json.loads((data / "setup" / "preempted.json").read_text())
    assert marker["step"] == 0 and marker["checkpoint"] is None and not (data / "setup" / "checkpoints").exists()
    run(data / "setup", 0)
    assert not (data / "setup" / "preempted.json").exists()

    # During the final evaluation: the checkpoint at the last step is written, no model.
    out = data / "final"
    signal_in("evaluate", signal.SIGUSR1, lambda *args, **kwargs: args[3] == 0)  # max_rows 0: the final one
    assert stopped_at(out, run(out, EXIT_PREEMPTED), signal.SIGUSR1) == steps
    # During setup of the resumed run: it stops where it resumed, with the checkpoint it resumed from.
    signal_in("_optimizer", signal.SIGUSR1)
    assert stopped_at(out, run(out, EXIT_PREEMPTED), signal.SIGUSR1) == steps
    assert "already trained" not in run(out, 0) and not (out / "preempted.json").exists()
    assert_same_run(out, data / "setup")


# ---------------------------------------------------------------------- stage two, two processes


@pytest.fixture(scope="module")
def reference2(data):
    """An uninterrupted two-process run (gloo; ranks forked with torchrun's environment: what is
    compared here is the numbers, torchrun's own part is in the tests that signal it)."""
    ran(student_args(data, data / "reference2"), ranks=True)
    return data / "reference2"


def workers(torchrun: int) -> dict[int, int]:
    """{rank: pid} of the trainers under a torchrun process."""
    return {rank: pid for pid in descendants(torchrun) if (rank := rank_of(pid)) is not None}


def both_left_with_75(output: str) -> None:
    """torchrun itself fails (a worker exited non-zero); its report names each worker's status."""
    assert len(re.findall(r"exitcode +: 75 \(pid", output)) == 2, output


def test_one_signalled_rank_stops_every_rank_at_the_same_step(data, reference2):
    """SIGUSR1 to rank 1 alone (not the rank that writes): rank 0 learns of it through the step's
    all-reduce, both leave with 75 after the same step, and the resumed pair equals an unstopped pair.
    (The reference and the resumed pair fork their ranks; a requeued torchrun resuming is
    tests/slurm/test_slurm.py's pre-empted student.)"""
    out = data / "two"
    process = spawn(student_args(data, out), torchrun=True)
    k = random.Random("two").choice([3, 6, 9])
    signal_when(process, (out / "checkpoints" / f"step-{k:08d}").exists,
                lambda: with_pid(workers(process.pid)[1], signal.SIGUSR1))
    output = finished(process)
    assert process.returncode not in (0, EXIT_PREEMPTED), output
    both_left_with_75(output)
    step = stopped_at(out, output, signal.SIGUSR1, torchrun=True)
    assert k < step < STEPS
    resumed(student_args(data, out), out, step, ranks=True)  # the requeued pair: what it computes
    assert_same_run(out, reference2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_every_process_signalled_as_slurm_does(data, reference2, sig):
    """As the sbatch line launches it — ``bash -c 'trap "" USR1; exec torchrun …'`` — with the signal
    sent to every process of the step, torchrun included, as SLURM does (``--signal=USR1@…``; SIGTERM
    on scancel, which torchrun also forwards to its workers). torchrun does not die of SIGUSR1 (it
    inherited the trap); the workers take it anyway, stop together, and the requeued run continues."""
    out = data / f"slurm-{sig.name}"
    process = spawn(student_args(data, out), torchrun=True, shell='trap "" USR1; exec')

    def everyone():
        assert deaf_to(process.pid, signal.SIGUSR1), "torchrun should have inherited SIGUSR1 ignored (the trap)"
        for pid in [process.pid, *descendants(process.pid)]:
            with_pid(pid, sig)

    signal_when(process, (out / "checkpoints" / "step-00000006").exists, everyone)
    output = finished(process)
    assert process.returncode not in (0, -signal.SIGUSR1), output
    if sig == signal.SIGUSR1:
        both_left_with_75(output)
    else:  # torchrun stops on SIGTERM itself, forwarding it, and then reports no worker's status
        assert "got signal: 15" in output, output
    step = stopped_at(out, output, sig, torchrun=True)
    resumed(student_args(data, out), out, step, torchrun=True, shell='trap "" USR1; exec')
    assert_same_run(out, reference2)


# ---------------------------------------------------------------------- from the first instruction


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``sig`` (/proc/PID/status, SigCgt)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"SigCgt:\s*(\w+)", status).group(1), 16) & (1 << (sig - 1)))


def torch_loaded(pid: int) -> bool:
    """Whether torch's shared library is mapped into process ``pid``: its import has begun."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def signalled_while_starting(launcher: str, args, sig: signal.Signals) -> tuple[int, str]:
    """Start ``distill ARGS`` (the console script, or ``python -m stages.cli``) and send ``sig`` 50 ms
    after, or as soon after as it has a handler for it: polled, so a loaded machine that starts Python
    slowly does not make the signal come before any distill code has run. It must come before torch
    is imported (a handler installed only when the run begins would fail here). (status, output)."""
    env = run_env()
    command = [str(Path(sys.executable).with_name("distill"))] if launcher == "distill" else \
        [sys.executable, "-m", "stages.cli"]
    process = subprocess.Popen(command + [str(a) for a in args], env=env, cwd=ROOT, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.05)
    deadline = time.time() + 60
    while not catches(process.pid, sig):
        assert process.poll() is None and time.time() < deadline, "distill never caught the signal"
        time.sleep(0.001)
    assert not torch_loaded(process.pid), "distill caught the signal only once torch was being imported"
    process.send_signal(sig)
    output = finished(process)
    return process.returncode, output


@pytest.mark.parametrize("launcher,sig", [("distill", signal.SIGUSR1), ("python -m stages.cli", signal.SIGTERM)])
def test_a_signal_while_stage_two_imports_torch_is_a_requeue(data, launcher, sig):
    """Stage two signalled while it imports: the early handler records the signal, the run takes it
    over and stops at its first safe point (after setup, before step 1): exit 75, preempted.json at
    step 0, no checkpoint, one line. The requeued run then starts and finishes."""
    out = data / f"early-{sig.name}"
    status, output = signalled_while_starting(launcher, student_args(data, out, 3), sig)
    assert status == EXIT_PREEMPTED, output
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["step"] == 0 and marker["signal"] == sig.name and marker["checkpoint"] is None
    assert not (out / "checkpoints").exists() and not (out / "model").exists()
    lines = [line for line in output.splitlines() if "distill: " in line]
    assert lines == [f"distill: preempted by {sig.name} at step 0; no step had run, so no checkpoint; rerun with "
                     "--resume auto to start"], output
    assert "Traceback" not in output and "error:" not in output
    requeued = run_cli(*student_args(data, out, 3))  # in this process: what is tested is the signalled start
    assert requeued.exit_code == 0, requeued.output
    assert (out / "model" / "model.safetensors").is_file() and not (out / "preempted.json").exists()


def test_the_early_handler_hands_over_to_the_run_and_then_to_what_was_there():
    """In-process: a signal recorded by catch_early() is the run's once its Preemption begins; when the
    run ends, the handlers from before catch_early() are back (not the early one, which would swallow
    a later signal); for a stage without its own handling, start_stage() puts them back at once."""
    from pipeline import preempt

    before = {sig: signal.getsignal(sig) for sig in preempt.SIGNALS}
    try:
        preempt.catch_early()
        assert all(signal.getsignal(sig) is not before[sig] for sig in preempt.SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)
        with preempt.Preemption() as preemption:
            assert preemption.agreed() == "SIGUSR1"
        assert {sig: signal.getsignal(sig) for sig in before} == before

        preempt.catch_early()
        preempt.start_stage(lambda config: None, "report")  # nothing came: the stage runs, as before
        assert {sig: signal.getsignal(sig) for sig in before} == before
        with preempt.Preemption() as preemption:  # a later run finds nothing left over
            assert preemption.agreed() is None
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_signal_before_a_stage_without_its_own_handler_begins_writes_nothing(data, tmp_path):
    """``distill generate`` (which has no pre-emption handling of its own) signalled while it imports:
    it exits 75 before it begins, with one line, and its --out does not exist."""
    out = tmp_path / "generated"
    status, output = signalled_while_starting(
        "distill", ["generate", "--unconditional", "2", "--teacher", data / "teacher", "--tokenizer", TOKENIZER,
                    "--max-new-tokens", "4", "--out", out], signal.SIGTERM)
    assert status == EXIT_PREEMPTED, output
    assert [line for line in output.splitlines() if line.strip()] == [
        "distill: preempted by SIGTERM before generate began; nothing was written; rerun the same command"], output
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- stage one


def shard_hashes(path: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in open_store(path).shards}


@pytest.mark.parametrize("mode", ["finish", "abandon"])
def test_stage_one_stops_at_a_whole_shard_and_the_rerun_completes_the_same_store(data, monkeypatch, tmp_path, mode):
    """In-process, the signal sent from inside the teacher's second batch of shard 1 (batches of one
    row, one chunk each), so the moment is exact: ``finish`` completes and records shard 1 and starts
    no other, ``abandon`` drops it at its next batch. Exit 75, one line, the lock released, only
    recorded shards on disk; the rerun completes a store equal to an uninterrupted one."""
    from stages import teacher

    args = ("--rows-per-shard", "4", "--batch-size", "1", "--on-preempt", mode)
    assert run_cli(*teacher_args(data, tmp_path / "ref", 24, *args)).exit_code == 0
    want = shard_hashes(tmp_path / "ref")
    original, calls = teacher.sparse_teacher, []

    def sparse_teacher(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(*a, **k)

    monkeypatch.setattr(teacher, "sparse_teacher", sparse_teacher)
    out = tmp_path / "s"
    result = run_cli(*teacher_args(data, out, 24, *args))
    monkeypatch.undo()
    assert result.exit_code == EXIT_PREEMPTED, result.output
    assert len(calls) == (8 if mode == "finish" else 6)  # shard 1 to its end, or not one batch more
    done = ["shard-00000.zarr", "shard-00001.zarr"] if mode == "finish" else ["shard-00000.zarr"]
    abandoned = ", shard-00001.zarr abandoned" if mode == "abandon" else ""
    assert f"distill: preempted by SIGUSR1; job 0/1 has {len(done)} of its 6 shards written and recorded " \
           f"(up to {done[-1]}){abandoned}; rerun the same command to continue" in result.output
    assert "error:" not in result.output
    assert_only_whole_shards(out, want, done)
    assert run_cli(*teacher_args(data, out, 24, *args)).exit_code == 0
    assert shard_hashes(out) == want


def assert_only_whole_shards(out: Path, want: dict[str, str], done: list[str]) -> None:
    """The shards ``done`` are recorded in the job's partial index with the uninterrupted store's
    hashes, hash so on disk, and are all there is (no temp); no index.json; the job's lock is free."""
    recorded = {e["name"]: e["sha256"] for e in json.loads((out / "index.part-00000-of-00001.json").read_text())["shards"]}
    assert sorted(recorded) == done == sorted(p.name for p in out.iterdir() if "shard-" in p.name)
    for name, sha in recorded.items():
        assert sha == want[name] == content_hash(READERS["zarr"](out / name))
    assert not (out / "index.json").exists()
    JobLock(out, 0, 1).release()  # raises if still held


@pytest.mark.slow
def test_stage_one_process_signalled_mid_run(data):
    """The same from outside: SIGUSR1 to a running ``distill teacher`` once two shards are recorded."""
    out = data / "s1"
    args = teacher_args(data, out, 80, "--rows-per-shard", "4")
    ran(teacher_args(data, data / "s1-ref", 80, "--rows-per-shard", "4"))
    want = shard_hashes(data / "s1-ref")

    part = out / "index.part-00000-of-00001.json"
    process = spawn(args)
    signal_when(process, lambda: part.exists() and len(json.loads(part.read_text())["shards"]) >= 2,
                lambda: process.send_signal(signal.SIGUSR1))
    output = finished(process)
    assert process.returncode == EXIT_PREEMPTED, output
    done = sorted(e["name"] for e in json.loads(part.read_text())["shards"])
    assert 2 <= len(done) < len(want)
    lines = [line[line.index("distill: "):] for line in output.splitlines() if "distill: " in line]
    assert lines == [f"distill: preempted by SIGUSR1; job 0/1 has {len(done)} of its {len(want)} shards written "
                     f"and recorded (up to {done[-1]}); rerun the same command to continue"], output
    assert "error:" not in output and "Traceback" not in output
    assert_only_whole_shards(out, want, done)
    ran(args)
    assert shard_hashes(out) == want

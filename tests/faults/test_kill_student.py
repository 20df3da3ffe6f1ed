"""SIGKILL stage two at random moments (issue #13, part 3): ``--resume auto`` ends with the weights of an
uninterrupted run, bit for bit, whatever the moments.

Each chain of runs shares one OUT: a run is killed (SIGKILL, as a pre-empting scheduler does) at a
moment drawn from a seeded RNG, rerun with ``--resume auto``, maybe killed again, until a run
finishes. Moments are of six kinds (``KINDS``), so that they land all over a run: a delay drawn
uniformly over the uninterrupted run's duration or over its start-up, a random time after a random
step logs, the instant a checkpoint's temp directory appears (mid-write), a random time into the
final evaluation, the instant the final model's temp directory appears. While runs go, a watcher
checks that every directory under a final checkpoint (or model) name is complete; after each kill
every checkpoint loads; each chain ends with the uninterrupted run's weights, metrics and log, and
nothing left over. A damaged newest checkpoint (a flipped byte, a truncated file; issue #21) is
passed over for the one before it, with one line, and the run still ends bit for bit as an
uninterrupted one.
"""

import json
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.train import checkpoint
from tests.conftest import kill_when, one_line_error, run_cli, spawn, tree_digest, write_tiny_model_config

pytestmark = pytest.mark.faults

STEPS, EVERY = 12, 2  # checkpoints at steps 2, 4, …, 10 in the loop and 12 in the finish
# moments: uniform over the whole run or over its start-up, a random time after a random step's log
# line, the instant a checkpoint's temp directory appears, a random time into the final evaluation,
# the instant the final model's temp directory appears
KINDS = {"timed": 2, "start-up": 2, "step": 3, "checkpoint-write": 2, "finish": 2, "final-save": 1}
# the instants last milliseconds: a poll that comes too late kills just after, and the kind is tried again
AIMED = {"checkpoint-write": "checkpoint write", "final-save": "final save"}


def student_args(root, model, out, *extra):
    return ["student", "--train-store", root / "train", "--eval-store", root / "heldout", "--model", model,
            "--out", out, "--max-steps", str(STEPS), "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
            "--eval-rows", "32", "--eval-every", "4", "--log-every", "1", "--checkpoint-every", str(EVERY),
            "--resume", "auto", *extra]


def ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


@pytest.fixture(scope="module")
def student_stores(module_student_stores):
    """The tokens stores, shared by the module: every test reads them and writes under a name of its own."""
    return module_student_stores


def measured_run(student_stores, out: Path, fresh: bool = False) -> dict:
    """An uninterrupted run into ``out``, and how long its parts take (seconds): start-up (to the
    metrics log), a step, the final evaluation (last checkpoint to the model's temp directory) and all
    of it; ``fresh``: launched as a new interpreter (conftest.spawn)."""
    tiny_model_config = write_tiny_model_config(student_stores / "tiny.json")
    events = {"log": out / "metrics.jsonl", "last checkpoint": out / "checkpoints" / ckpt_name(STEPS),
              "saving": out / ".model.tmp", "done": out / "metrics.json"}
    process = spawn(student_args(student_stores, tiny_model_config, out), fresh=fresh)
    started, seen = time.perf_counter(), {}
    while process.poll() is None:
        seen |= {event: time.perf_counter() - started for event, path in events.items()
                 if event not in seen and path.exists()}
        time.sleep(0.001)
    total = time.perf_counter() - started
    output, _ = process.communicate()
    assert process.returncode == 0 and seen.keys() == events.keys(), output
    return {"out": out, "model": tiny_model_config, "total": total, "start-up": seen["log"],
            "step": (seen["last checkpoint"] - seen["log"]) / STEPS, "evaluation": seen["saving"] - seen["last checkpoint"],
            "fresh": fresh}


@pytest.fixture(scope="module")
def reference(student_stores):
    """The uninterrupted run (forked from the tests' fork server, as the runs it is compared with). One
    per module: every test compares with it and none writes to it."""
    return measured_run(student_stores, student_stores / "reference")


class Watcher(threading.Thread):
    """Checks, over and over while runs go, that a directory under a final name is complete."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out, self.stop, self.violations, self.looks = out, threading.Event(), [], 0

    def run(self):
        while not self.stop.is_set():
            dirs = [*(self.out / "checkpoints").glob("step-*"), self.out / "model"]
            for path in dirs:
                needed = ("state.pt", "config.json", checkpoint.MANIFEST) if path.name.startswith("step-") else (
                    "model.safetensors", "config.json")
                # the same directory under its name before and after the look (not renamed into place or
                # aside meanwhile: a look that began before a rename saw a name with nothing under it yet)
                before = inode(path)
                missing = [n for n in needed if not (path / n).is_file()]
                if missing and before is not None and inode(path) == before:
                    self.violations.append(f"{path.name} without {', '.join(missing)}")
            self.looks += 1
            time.sleep(0.001)


def inode(path: Path):
    """The inode of the directory under ``path`` now, or None when there is none."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino if path.is_dir() else None


def metrics_inode(out: Path):
    try:
        return (out / "metrics.jsonl").stat().st_ino
    except FileNotFoundError:
        return None


def logged_step(out: Path, stale_inode) -> int:
    """The last step this run logged (0 until it has rewritten the log: a resumed run first drops the
    lines logged past its checkpoint, writing a new file)."""
    try:
        if metrics_inode(out) == stale_inode:
            return 0
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]).get("step", 0)
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def moment(kind: str, rng: random.Random, ref: dict, out: Path, pid: int, resumed_at: int):
    """(when ready() first holds, wait this many seconds, then SIGKILL) for a moment of ``kind``."""
    ckpts, stale = out / "checkpoints", metrics_inode(out)
    later = [s for s in range(EVERY, STEPS + 1, EVERY) if s > resumed_at]
    if kind == "start-up":
        return (lambda: True), rng.uniform(0, ref["start-up"])
    if kind == "step" and resumed_at < STEPS - 1:
        step = rng.randint(resumed_at + 1, STEPS - 1)
        return (lambda: logged_step(out, stale) >= step), rng.uniform(0, ref["step"])
    if kind == "checkpoint-write" and later:
        step = rng.choice(later)
        tmp, final = ckpts / f".{ckpt_name(step)}.tmp-{pid}", ckpts / ckpt_name(step)
        return (lambda: tmp.exists() or final.exists()), 0.0
    if kind == "finish" and resumed_at < STEPS:  # most likely in the final evaluation
        return (ckpts / ckpt_name(STEPS)).exists, rng.uniform(0, 0.9 * ref["evaluation"])
    if kind == "final-save":
        tmp, final = out / ".model.tmp", out / "model"
        return (lambda: tmp.exists() or final.exists()), 0.0
    return (lambda: True), rng.uniform(0, ref["total"])


def run_until(process, ready, delay: float) -> bool:
    """SIGKILL ``process`` ``delay`` s after ``ready()`` first holds. True if it was killed, False if it
    finished first (then it must have succeeded)."""
    deadline = time.time() + 180
    while process.poll() is None and not ready():
        assert time.time() < deadline, "the run neither got ready nor ended"
        time.sleep(0.0005)
    end = time.perf_counter() + delay
    while process.poll() is None and time.perf_counter() < end:
        time.sleep(0.0005)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=60)
    assert process.returncode in (0, -signal.SIGKILL), output
    return process.returncode == -signal.SIGKILL


def phase(out: Path, pid: int, stale_inode) -> str:
    """Where the killed run was, from what it left."""
    ckpts = out / "checkpoints"
    if list(ckpts.glob(f".step-*.tmp-{pid}")):
        return "checkpoint write"
    if metrics_inode(out) in (None, stale_inode):
        return "start-up"  # not as far as its metrics log
    if (out / "metrics.json").exists():
        return "exit"  # everything written
    if (out / ".model.tmp").exists():
        return "final save"
    return "finish" if (ckpts / ckpt_name(STEPS)).exists() else "training"


def check_after_kill(out: Path):
    """Every checkpoint under its final name matches its manifest, loads and is the step it is named
    for; the log parses."""
    for path in (out / "checkpoints").glob("step-*"):
        assert checkpoint.problem(path) is None, path
        try:
            state, _ = checkpoint.load(path)
        except Exception as e:
            pytest.fail(f"{path.name}, under its final name, does not load: {e!r}")
        assert state["step"] == int(path.name[5:]), path
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            json.loads(line)


def kill_and_resume(root: Path, ref: dict, kinds: list[str], chains: list[int], seed: int,
                    extra: tuple[str, ...] = ()) -> Counter:
    """Kill runs at moments of ``kinds`` (in order), resuming each time, in chains of about the given
    numbers of kills (each chain one OUT, run to the end after its kills; a moment that comes after
    its run ended leaves the rest to the next chain; an aimed moment that missed its instant is tried
    again, up to three times in all); check each chain's end. Returns where the kills landed."""
    rng, landed, queue, retries = random.Random(seed), Counter(), list(kinds), 3
    for c in range(len(chains) + 6):
        if not queue:
            return landed
        length, out = min(chains[c] if c < len(chains) else 1, len(queue)), root / f"seed{seed}-chain{c}"
        watcher = Watcher(out)
        watcher.start()
        for kill in range(length + 1):
            latest = checkpoint.complete(out / "checkpoints")
            resumed_at = int(latest[-1].name[5:]) if latest else 0
            stale = metrics_inode(out)
            process = spawn(student_args(root, ref["model"], out, *extra), fresh=ref["fresh"])
            if kill == length:  # the chain's last run goes to the end
                assert not run_until(process, lambda: False, 0.0)
                break
            if not run_until(process, *moment(queue[0], rng, ref, out, process.pid, resumed_at)):
                break  # it ended before the moment came
            where, kind = phase(out, process.pid, stale), queue.pop(0)
            landed[where] += 1
            print(f"chain {c}: {kind} moment after resuming at step {resumed_at}: killed in {where}")
            if kind in AIMED and where != AIMED[kind] and retries:
                queue.append(kind)
                retries -= 1
            check_after_kill(out)
        watcher.stop.set()
        watcher.join()
        assert not watcher.violations and watcher.looks > 100, (watcher.violations[:5], watcher.looks)
        check_end(out, ref["out"])
    assert not queue, f"{len(queue)} moments never came"
    return landed


def check_end(out: Path, reference: Path):
    """The chain's end equals the uninterrupted run: weights bit for bit, metrics, the log (one final
    line), and nothing left behind by the killed runs."""
    assert (out / "model" / "model.safetensors").read_bytes() == (reference / "model" / "model.safetensors").read_bytes()
    assert json.loads((out / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())

    def log(run):
        return [(r["step"], r.get("loss"), r.get("heldout_loss"), r.get("final"))
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert log(out) == log(reference)
    assert sum(1 for entry in log(out) if entry[3]) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [ckpt_name(STEPS - EVERY), ckpt_name(STEPS)]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_two_kills_mid_checkpoint_and_mid_final_save(student_stores, reference):
    """The fast case (make test): one chain, killed while writing a checkpoint, then while saving the model."""
    landed = kill_and_resume(student_stores, reference, ["checkpoint-write", "final-save"], [2], seed=0)
    assert landed["checkpoint write"] >= 1 and landed["final save"] >= 1, landed


def test_two_kills_of_a_sharded_checkpoint_run(student_stores, reference):
    """The same with --fsdp on one process: checkpoints written through torch.distributed.checkpoint
    (DCP shards beside state.pt, sealed by the manifest) are as atomic, and the chain ends with the
    uninterrupted (unsharded) run's weights bit for bit."""
    landed = kill_and_resume(student_stores, reference, ["checkpoint-write", "final-save"], [2], seed=1,
                             extra=("--fsdp",))
    assert landed["checkpoint write"] >= 1 and landed["final save"] >= 1, landed
    out = next(student_stores.glob("seed1-chain*"))
    assert all(checkpoint.sharded(path) for path in checkpoint.complete(out / "checkpoints"))


@pytest.mark.slow
def test_twelve_random_kills(student_stores):
    """Twelve moments of all six kinds, in seeded random order, in chains of one to three kills. Every
    run a new interpreter, as on a cluster: the moments land in every phase of a real process's life,
    its imports and its interpreter's end included (a forked run has neither to land in)."""
    reference = measured_run(student_stores, student_stores / "reference-fresh", fresh=True)
    rng = random.Random(13)
    kinds = [kind for kind, n in KINDS.items() for _ in range(n)]
    rng.shuffle(kinds)
    landed = kill_and_resume(student_stores, reference, kinds, [3, 1, 2, 3, 1, 2], seed=13)
    assert sum(landed.values()) >= 12
    assert {"start-up", "training", "checkpoint write", "finish", "final save"} <= set(landed), landed


class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs, no handler catches it."""


@pytest.mark.parametrize("when", ["pruning an old checkpoint", "replacing the same step's checkpoint"])
def test_a_kill_while_a_checkpoint_is_deleted_leaves_none_half_deleted(tmp_path, monkeypatch, when):
    """The two deletes the random moments seldom hit (microseconds each), made to die halfway: the
    directory being deleted is by then renamed aside, so every ``step-*`` is whole; the next save
    removes what was left."""
    import shutil

    import torch

    root, state = tmp_path / "checkpoints", {"w": torch.arange(1000.0)}
    step = 3 if when.startswith("pruning") else 2  # step 1 is pruned, or step 2 written again
    checkpoint.save(root, 1, state, {"n": 1})
    checkpoint.save(root, 2, state, {"n": 2})

    def dies_halfway(path, *args, **kwargs):
        next(p for p in sorted(Path(path).iterdir())).unlink()
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", dies_halfway)
    with pytest.raises(Killed):
        checkpoint.save(root, step, state, {"n": 3})
    monkeypatch.undo()
    for path in root.glob("step-*"):
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "state.pt"], path
        checkpoint.load(path)
    assert checkpoint.complete(root)[-1].name == ckpt_name(step)
    checkpoint.save(root, 4, state, {"n": 4})
    assert sorted(p.name for p in root.iterdir()) == [ckpt_name(step), ckpt_name(4)]


# ---------------------------------------------------------------------- damaged checkpoints


def largest_tensor_bytes(state_pt: Path) -> tuple[int, int]:
    """(offset, length) in ``state.pt`` of the largest tensor's bytes. torch.save writes an
    uncompressed zip, one record per storage; the student's largest are its embedding and that
    matrix's two AdamW moments."""
    import struct
    import zipfile

    with zipfile.ZipFile(state_pt) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    header = state_pt.read_bytes()[record.header_offset:record.header_offset + 30]
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return record.header_offset + 30 + name_length + extra_length, record.file_size


def damage(path: Path, how: str, rng: random.Random) -> str:
    """Damage the checkpoint at ``path`` as ``how`` says; the problem :func:`checkpoint.problem` names."""
    import torch

    state_pt = path / "state.pt"
    data = bytearray(state_pt.read_bytes())
    if how == "flipped byte":  # in a tensor's data: torch.load takes it without complaint
        start, length = largest_tensor_bytes(state_pt)
        data[start + rng.randrange(length)] ^= 1 << rng.randrange(8)
        state_pt.write_bytes(bytes(data))
        torch.load(state_pt, weights_only=True)  # only the manifest can tell
        return f"state.pt does not match its sha256 in {checkpoint.MANIFEST} (the bytes changed since it was written)"
    if how == "truncated":  # as a file cut short by a full disk, outside the rename that guards it
        state_pt.write_bytes(bytes(data[:len(data) // 2]))
        return f"state.pt is {len(data) // 2} bytes, its manifest says {len(data)} (truncated or overwritten)"
    raise ValueError(how)


def killed_after_checkpoints(root: Path, ref: dict, out: Path) -> tuple[Path, Path]:
    """A run SIGKILLed once its step-6 checkpoint is written: the newest checkpoint and the one before."""
    process = spawn(student_args(root, ref["model"], out))
    kill_when(process, (out / "checkpoints" / ckpt_name(6)).exists)
    previous, newest = checkpoint.complete(out / "checkpoints")[-2:]
    return previous, newest


# the truncated case and the pre-manifest one run in make test-faults only (make test keeps its time)
@pytest.mark.parametrize("how", ["flipped byte", pytest.param("truncated", marks=pytest.mark.slow)])
def test_a_damaged_newest_checkpoint_is_passed_over_and_the_run_ends_as_uninterrupted(student_stores, reference,
                                                                                       how):
    """The newest checkpoint of a killed run is damaged: ``--resume PATH`` to it is refused in one line,
    changing nothing; ``--resume auto`` says in one line which checkpoint it passes over and why,
    resumes from the one before, and ends with the uninterrupted run's weights, metrics and log."""
    out = student_stores / f"damaged-{how.replace(' ', '-')}"
    previous, newest = killed_after_checkpoints(student_stores, reference, out)
    why = damage(newest, how, random.Random(how))
    assert checkpoint.problem(newest) == why and checkpoint.problem(previous) is None

    before = tree_digest(out)
    explicit = [str(a) for a in student_args(student_stores, reference["model"], out)[:-1]] + [str(newest)]
    line = one_line_error(run_cli(*explicit))
    assert line == (f"error: --resume {newest}: the checkpoint is damaged ({why}); pass an earlier step-NNNNNNNN "
                    "directory, or --resume auto to take the newest intact one")
    assert tree_digest(out) == before

    process = spawn(student_args(student_stores, reference["model"], out))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    warnings = [line for line in output.splitlines() if "checkpoint" in line and "warning" in line]
    assert warnings == [f"warning: skipping damaged checkpoint {newest} ({why}); resuming from {previous.name} "
                        "instead"], output
    assert f"resumed from {previous} at step {int(previous.name[5:])}" in output
    check_end(out, reference["out"])


@pytest.mark.slow
def test_a_checkpoint_from_before_manifests_loads_with_one_warning(student_stores, reference):
    """A checkpoint without ``manifest.json`` (written before checkpoints carried checksums) is resumed
    from, unchecked, with one line saying so; the run ends as an uninterrupted one."""
    out = student_stores / "no-manifest"
    previous, newest = killed_after_checkpoints(student_stores, reference, out)
    for path in (previous, newest):
        (path / checkpoint.MANIFEST).unlink()
    process = spawn(student_args(student_stores, reference["model"], out))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    warnings = [line for line in output.splitlines() if "checkpoint" in line and "warning" in line]
    assert warnings == [f"warning: checkpoint {newest} has no manifest.json (written before checkpoints carried "
                        "checksums): loading it unchecked"], output
    assert f"resumed from {newest} at step {int(newest.name[5:])}" in output
    check_end(out, reference["out"])

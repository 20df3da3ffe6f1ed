"""Full disk (issue #13, part 3): a small tmpfs the test mounts itself, filled with a filler file so
that space runs out part-way through stage one's shards and stage two's checkpoint or final save.

Each case: one line ``error: no space left on device writing PATH (… free of …); …`` and exit 2;
everything written before the failure intact (shards verify against a reference run, the earlier
checkpoint equals the uninterrupted run's); nothing half-written under a final name; then, with
the filler deleted, the same command completes and equals a run written elsewhere."""

import errno
import json
import math
import os
import subprocess

import pytest
import torch

from pipeline.store import contract as store_lib
from pipeline.train import checkpoint
from tests.conftest import make_teacher, one_line_error, run_cli

pytestmark = pytest.mark.faults

PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs charges whole pages


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(size)`` mounts a tmpfs of ``size`` bytes under tmp_path; unmounted afterwards."""
    mounts = []

    def mount(size: int):
        path = tmp_path / f"fs{len(mounts)}"
        path.mkdir()
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                    capture_output=True, text=True)
            refused = (result.stderr.strip() or f"exit status {result.returncode}") if result.returncode else ""
        except FileNotFoundError:
            refused = "no mount command"
        if refused:
            pytest.skip(f"mounting a tmpfs is not permitted here ({refused}); the full-disk tests need root "
                        "or CAP_SYS_ADMIN")
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def free_bytes(path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(fs, leave: int):
    """A filler file that leaves ``leave`` bytes (rounded to pages) free on ``fs``."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free_bytes(fs) - math.ceil(leave / PAGE) * PAGE)
    assert abs(free_bytes(fs) - leave) <= PAGE
    return filler


def pages(path) -> int:
    """Bytes a file or directory tree takes on a tmpfs."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(math.ceil(p.stat().st_size / PAGE) * PAGE for p in files)


def assert_disk_full_line(result, where) -> str:
    """The one line, naming ``where`` (or a file in it)."""
    line = one_line_error(result)
    assert line.startswith((f"error: no space left on device writing {where} (",
                            f"error: no space left on device writing {where}/")), line
    assert " free of " in line and "; free space there" in line and ", then rerun " in line, line
    return line


# ---------------------------------------------------------------------------------- stage one


@pytest.fixture
def stage_one(student_stores):
    """A tokens store (the first 64 rows are used) and a small teacher, on the ordinary disk."""
    make_teacher(student_stores / "teacher")
    return student_stores


def teacher_args(root, out, kind, backend):
    return ["teacher", "--tokens-store", root / "train", "--teacher", root / "teacher", "--out", out,
            "--kind", kind, "--backend", backend, "--top-k", "16", "--samples", "32", "--max-rows", "64",
            "--rows-per-shard", "8", "--chunk-rows", "4", "--batch-size", "8"]


STAGE_ONE_CASES = [("topk", "zarr"), pytest.param("sampled", "zarr", marks=pytest.mark.slow),
                   pytest.param("topk", "arrow", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind,backend", STAGE_ONE_CASES)
def test_stage_one_full_disk_keeps_finished_shards_and_a_rerun_completes(stage_one, small_fs, kind, backend):
    reference = stage_one / "reference"
    result = run_cli(*teacher_args(stage_one, reference, kind, backend))
    assert result.exit_code == 0, result.output
    want = {s["name"]: s["sha256"] for s in store_lib.open_store(reference).shards}
    assert len(want) == 8
    names = sorted(want)

    # Room for the resolved config, the partial index (one page, and its temp copy while it is
    # rewritten), the metrics log and three and a half shards: the fourth shard's write fails.
    fs = small_fs(8 << 20)
    store = fs / "store"
    leave = pages(reference / "config.part-00000.json") + 2 * PAGE + sum(pages(reference / n) for n in names[:3])
    leave += pages(reference / "metrics.jsonl")  # the job's metrics log, a record per shard
    leave += pages(reference / names[3]) // 2
    filler = fill(fs, leave)
    args = teacher_args(stage_one, store, kind, backend)
    line = assert_disk_full_line(run_cli(*args), store)  # the writer thread's failure, as one line
    assert line.startswith(f"error: no space left on device writing {store} ("), line  # no file to name
    assert line.endswith("or choose another --out, then rerun the same command: what was finished is kept"), line

    # The three shards written before the failure are recorded, complete and equal to the reference's;
    # the fourth is not visible at all; there is no index.json. The failed write removed its temp
    # (it would hold the very space that ran out) and the writer thread wrote nothing after it, so the
    # only hidden file is the job's lock.
    part = json.loads((store / "index.part-00000-of-00001.json").read_text())
    assert [e["name"] for e in part["shards"]] == names[:3]
    assert all(e["sha256"] == want[e["name"]] for e in part["shards"])
    visible = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
    assert visible == ["config.part-00000.json", "index.part-00000-of-00001.json", "metrics.jsonl", *names[:3]]
    for name in names[:3]:
        assert store_lib.content_hash(store_lib.READERS[backend](store / name)) == want[name], name
    hidden = sorted(p.name for p in store.iterdir() if p.name.startswith("."))
    assert hidden == [".lock.part-00000-of-00001"], hidden

    # Space again: the same command finishes the store, and it equals the reference run's.
    filler.unlink()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert {s["name"]: s["sha256"] for s in store_lib.open_store(store).shards} == want
    verified = run_cli("inspect", store, "--verify")
    assert verified.exit_code == 0, verified.output


def test_disk_quota_and_other_write_errors(stage_one, tmp_path, monkeypatch):
    """EDQUOT reads like ENOSPC; any other OSError is not disguised as a user error."""
    def quota(*_args, **_kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(store_lib, "write_shard", quota)
    line = one_line_error(run_cli(*teacher_args(stage_one, tmp_path / "q", "topk", "zarr")))
    assert line.startswith(f"error: disk quota exceeded writing {tmp_path / 'q'} ("), line

    def broken(*_args, **_kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store_lib, "write_shard", broken)
    result = run_cli(*teacher_args(stage_one, tmp_path / "io", "topk", "zarr"))
    assert result.exit_code == 1 and isinstance(result.exception, OSError) and result.exception.errno == errno.EIO


# ---------------------------------------------------------------------------------- stage two


def student_args(root, model, out, checkpoint_every, *extra):
    return ["student", "--train-store", root / "train", "--eval-store", root / "heldout", "--model", model,
            "--out", out, "--max-steps", "6", "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
            "--eval-rows", "32", "--eval-every", "2", "--log-every", "1", "--checkpoint-every", str(checkpoint_every),
            "--resume", "auto", *map(str, extra)]


def assert_same(a, b, where="state"):
    """Equal nested checkpoint states: tensors bit for bit, everything else by value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def metric_lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(out):
    return [(r["step"], r.get("loss"), r.get("heldout_loss"), r.get("final")) for r in metric_lines(out)]


@pytest.mark.parametrize("where", ["checkpoint", pytest.param("final-save", marks=pytest.mark.slow)])
def test_stage_two_full_disk_keeps_the_last_checkpoint_and_resume_completes(student_stores, tiny_model_config,
                                                                           small_fs, where):
    # Uninterrupted, on the ordinary disk, every checkpoint kept to compare with.
    every = 2 if where == "checkpoint" else 0
    reference = student_stores / "reference"
    result = run_cli(*student_args(student_stores, tiny_model_config, reference, every, "--keep-checkpoints", "10"))
    assert result.exit_code == 0, result.output
    steps = [p.name for p in checkpoint.complete(reference / "checkpoints")]
    ckpt = pages(reference / "checkpoints" / steps[0])
    weights = reference / "model" / "model.safetensors"

    fs = small_fs(16 << 20)
    out = fs / "run"
    slack = pages(reference / "config.json") + 2 * pages(reference / "metrics.jsonl") + 4 * PAGE
    if where == "checkpoint":  # room for the first checkpoint and half the second
        leave, first, failing = slack + ckpt + ckpt // 2, "step-00000002", out / "checkpoints" / "step-00000004"
    else:  # room for the one checkpoint at the end and half the model's weights
        leave, first, failing = slack + ckpt + pages(weights) // 2, "step-00000006", out / "model"
    filler = fill(fs, leave)
    args = student_args(student_stores, tiny_model_config, out, every)
    line = assert_disk_full_line(run_cli(*args), failing)
    assert line.endswith("; free space there, then rerun with --resume auto: training continues from the newest "
                         "complete checkpoint"), line

    # The earlier checkpoint is intact and equals the uninterrupted run's; nothing partial is left.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [first]
    saved, _ = checkpoint.load(out / "checkpoints" / first)
    want, _ = checkpoint.load(reference / "checkpoints" / first)
    assert_same(saved, want)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]

    # Space again: --resume auto ends with the uninterrupted run's weights, byte for byte.
    filler.unlink()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert f"resumed from {out / 'checkpoints' / first}" in result.output
    assert (out / "model" / "model.safetensors").read_bytes() == weights.read_bytes()
    assert curve(out) == curve(reference)
    assert sum(1 for r in metric_lines(out) if r.get("final")) == 1
    assert not [p for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]


def test_an_atomic_write_that_finds_the_disk_full_keeps_the_old_file(small_fs):
    """Indexes, configs and metrics are written by atomic_write_*: the old file stays, no temp is left,
    and the error names the file (a write on a full disk names none by itself)."""
    from pipeline.io import atomic_write_text, disk_full_message

    fs = small_fs(1 << 20)
    path = fs / "index.json"
    atomic_write_text(path, "old\n")
    fill(fs, PAGE)
    with pytest.raises(OSError) as caught:
        atomic_write_text(path, "x" * (4 * PAGE))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == "old\n" and sorted(p.name for p in fs.iterdir()) == ["filler", "index.json"]
    message = disk_full_message(caught.value, None)
    assert message.startswith(f"no space left on device writing {path} (4.0 KiB free of 1.0 MiB); "), message

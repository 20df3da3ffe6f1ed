"""``distill status PATH``: where a long run stands, from what it has written so far (issue #33).

One command for whatever distill writes a run into:

- a stage-one store being filled by an array of jobs: shards done, in flight and missing by task,
  tokens, a rate and an ETA, from the partial indexes and the shards' modification times;
- a tokens store being prepared (``.OUT.tmp-PID/`` beside OUT): shards and tokens written so far;
- a finished store (``index.json``): its kind, rows and tokens (``distill inspect`` says more);
- a student run: step of max, loss, tokens/s, the newest intact checkpoint, pre-empted or finished;
- a ``distill rounds`` OUT: round by round, the step each unfinished round is at;
- a ``distill slurm`` OUT: each job's state from ``squeue``/``sacct`` where they are on PATH, else
  from what each stage has left on disk.

It only reads: no file is written and no lock is taken (a lock is probed without ever being held
against a job: ``/proc/locks`` first, see :func:`lock_holder`). The directory may be written while it
is read — files appear, are renamed, are replaced — so a read that meets a file gone since the listing
starts over (a few times) instead of failing, and every file of a store is opened as
:mod:`pipeline.store.contract` opens it: no link followed, no FIFO opened, no read beyond a bound.

The ``--json`` report's keys are documented in docs/STATUS.md; rates and ETAs are estimates from
modification times (``docs/STATUS.md`` says how each is computed).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import check, option
from pipeline.errors import DistillError
from pipeline.store import contract as store_lib

JSON_LIMIT = 64 << 20  # a config, metrics.json, round.json or jobs.json: far above any distill writes
METRICS_TAIL = 1 << 20  # the end of metrics.jsonl that is read: thousands of lines
RETRIES = 5  # reads that meet a directory changing under them start over this many times
SLURM_TIMEOUT_S = 20
TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(-[0-9a-f]+)?$")  # .NAME.tmp-PID[-RANDOM]: a write in flight
LOCK = re.compile(r"^\.lock\.part-(\d{5})-of-(\d{5})$")
CONFIG_PART = re.compile(r"^config\.part-(\d{5})\.json$")
SHARD = re.compile(r"^shard-(\d{5})\.(zarr|arrow)$")
WHAT_DISTILL_WRITES = ("a store (index.json, or index.part-*.json while stage one fills it; a tokens store being "
                       "prepared is .NAME.tmp-PID/ beside it), a student run (config.json, metrics.jsonl, "
                       "checkpoints/), a `distill rounds` OUT (round-RRR/) or a `distill slurm` OUT (slurm.json)")


@dataclass(frozen=True)
class StatusConfig:
    path: str = option("", "A store, a student run directory, a `distill rounds` OUT or a `distill slurm` OUT.")
    json: bool = option(False, "Print the status as JSON (keys: docs/STATUS.md).")

    def __post_init__(self):
        check([] if self.path else ["no path given"], "status")


class _Changed(Exception):
    """A file listed a moment ago is gone or replaced: the directory is being written; read it again."""


def status(config: StatusConfig) -> dict[str, Any]:
    report = describe(Path(config.path))
    if config.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print("\n".join(lines(report)))
    return report


def describe(path: Path, now: float | None = None) -> dict[str, Any]:
    """The status of whatever ``path`` is, read again from the start where it changed under the read."""
    for attempt in range(RETRIES):
        try:
            return _describe(path, time.time() if now is None else now)
        except (_Changed, FileNotFoundError, NotADirectoryError):
            time.sleep(0.02 * (attempt + 1))
    raise DistillError(f"{path} changed under every one of {RETRIES} reads; run distill status again")


def _describe(path: Path, now: float) -> dict[str, Any]:
    temps = preparing_dirs(path)
    if not path.exists() and not os.path.lexists(path):
        if temps:
            return preparing_status(path, temps, now)
        raise DistillError(f"{path} does not exist; distill status reads {WHAT_DISTILL_WRITES}")
    if not path.is_dir():
        raise DistillError(f"{path} is not a directory; distill status reads {WHAT_DISTILL_WRITES}")
    names = set(os.listdir(path))
    if store_lib.INDEX in names:
        report = complete_store_status(path)
        if temps:  # prepare --overwrite builds the new store beside the old one
            report["rewriting"] = preparing_status(path, temps, now)
        return report
    if any(store_lib.PARTIAL_NAME.match(n) or LOCK.match(n) or CONFIG_PART.match(n) for n in names):
        return stage_one_status(path, now)
    if "slurm.json" in names:
        return slurm_status(path, now)
    saved = _read_json(path, "config.json", missing_ok=True) if "config.json" in names else None
    stage = saved.get("stage") if isinstance(saved, dict) else None
    if stage == "RoundsConfig" or any(re.match(r"^round-\d{3}$", n) for n in names):
        return rounds_status(path, now)
    if stage == "TrainConfig" or {"metrics.jsonl", "checkpoints"} & names:
        return student_status(path, now)
    if temps:
        return preparing_status(path, temps, now)
    raise DistillError(f"{path} holds nothing distill status knows; it reads {WHAT_DISTILL_WRITES}")


# ---------------------------------------------------------------------- reading, tolerant and bounded


def _read_json(root: Path, *parts: str, missing_ok: bool = False, limit: int = JSON_LIMIT) -> Any:
    """A JSON file of ``root`` as a store's files are read (no link, no FIFO, bounded); ``None`` where
    it is missing and ``missing_ok``. A file that does not parse is one line naming it."""
    fd = store_lib.store_file(root, *parts, missing_ok=True)
    if fd is None:
        if missing_ok:
            return None
        raise _Changed()
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise DistillError(f"{root / Path(*parts)} has {size} bytes, more than {limit}; it is not what distill "
                               "writes there")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit)
    finally:
        os.close(fd)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise DistillError(f"{root / Path(*parts)} does not parse as JSON; it was damaged or not written by "
                           "distill") from None


def _mtime(path: Path) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return None


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(now - then, 0.0), 1)


def preparing_dirs(path: Path) -> list[Path]:
    """``prepare``'s temp directories for ``path`` (``.NAME.tmp-PID``), real directories only."""
    parent = path.parent
    if not parent.is_dir():
        return []
    found = []
    for entry in os.scandir(parent):
        m = TEMP.match(entry.name)
        if m and m.group("name") == path.name and entry.is_dir(follow_symlinks=False):
            found.append(Path(entry.path))
    return sorted(found)


# ---------------------------------------------------------------------- stores


def complete_store_status(path: Path) -> dict[str, Any]:
    store = store_lib.open_store(path, check=False)  # its index checked; the shards are inspect --verify's
    seq_len = store.params["seq_len"]
    return {"path": str(path), "kind": "store", "state": "complete", "store_kind": store.kind,
            "backend": store.index["backend"], "rows": store.rows, "shards": len(store.shards),
            "tokens": store.rows * seq_len, "bytes": store.index["bytes"]}


def lock_holder(root: Path, name: str) -> tuple[bool, str | None]:
    """Whether a job holds the lock file ``root/name`` (its exclusive ``flock``), and the holder its
    text names. Never holds the lock against a job: the kernel's table (``/proc/locks``, matched by
    device and inode) answers for this host, and where the holder's text names another host (a network
    filesystem) a shared ``flock`` probe, released at once, asks the filesystem."""
    fd = store_lib.store_file(root, name, missing_ok=True)  # no link followed, a FIFO never blocks
    if fd is None:
        raise _Changed()
    try:
        text = os.read(fd, 200).decode(errors="replace").strip()
        st = os.fstat(fd)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        listed = _proc_locks()
        if listed is not None and key in listed:
            return True, text or None
        host = text.split(" on ", 1)[1].split(" since ")[0] if " on " in text else None
        if listed is not None and host in (None, socket.gethostname()):
            return False, text or None
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True, text or None
            return False, text or None  # flock unsupported here: say not held rather than guess
        return False, text or None  # closing the descriptor below drops the shared lock at once
    finally:
        os.close(fd)


def _proc_locks() -> set[str] | None:
    """``MAJ:MIN:INODE`` of every file with a FLOCK on this host, or None where the table is not readable."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            return {fields[5] for line in f if len(fields := line.split()) > 5 and fields[1] == "FLOCK"}
    except OSError:
        return None


def stage_one_status(root: Path, now: float) -> dict[str, Any]:
    """A stage-one store being filled: every task's shards from its partial index, its config part,
    its lock and its temp names."""
    names = sorted(os.listdir(root))
    parts, jobs_seen = {}, set()
    for name in names:
        if m := store_lib.PARTIAL_NAME.match(name):
            body = store_lib.read_partial_index(root / name)  # its digest checked; a damaged one is one line
            if not body:
                raise _Changed()
            parts[int(m.group(1))] = body
            jobs_seen.add(int(m.group(2)))
    configs = {int(m.group(1)): _read_json(root, name, missing_ok=True)
               for name in names if (m := CONFIG_PART.match(name))}
    configs = {task: body for task, body in configs.items() if isinstance(body, dict)}
    locks = {int(m.group(1)): name for name in names if (m := LOCK.match(name))}
    jobs_seen |= {int(LOCK.match(name).group(2)) for name in locks.values()}
    for body in configs.values():
        if isinstance(body.get("config"), dict) and isinstance(body["config"].get("num_shards"), int):
            jobs_seen.add(body["config"]["num_shards"])
    if not jobs_seen:
        raise DistillError(f"{root}: no partial index, job config or lock says how many jobs fill this store; "
                           "it is not a stage-one store distill is writing")
    jobs = max(jobs_seen)
    params = next((b["params"] for b in parts.values()), None)
    if params is None:
        params = next((b["params"] for b in configs.values() if isinstance(b.get("params"), dict)), None)
    backend = next((b["backend"] for b in parts.values()), None)
    if backend is None:
        backend = next((b["config"].get("backend") for b in configs.values() if isinstance(b.get("config"), dict)),
                       "zarr")
    kind = next((store_lib.stage_one_kind(b["arrays"]) for b in parts.values()), None)
    if kind is None:
        kind = next((b["config"].get("kind") for b in configs.values() if isinstance(b.get("config"), dict)), None)
    total = None
    if isinstance(params, dict) and _int(params.get("rows")) is not None and _int(params.get("rows_per_shard")):
        total = math.ceil(params["rows"] / params["rows_per_shard"])
    seq_len = _int((params or {}).get("seq_len"))
    rows_per_shard = _int((params or {}).get("rows_per_shard"))

    temps: dict[str, list[str]] = {}
    for name in names:
        if (m := TEMP.match(name)) and SHARD.match(m.group("name")):
            temps.setdefault(m.group("name"), []).append(name)
    recorded: dict[int, tuple[dict, float]] = {}  # shard number → (entry, mtime of its file)
    for body in parts.values():
        for entry in body["shards"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            m = SHARD.match(entry["name"])
            if not m:
                continue
            store_lib.safe_child(root, entry["name"])
            mtime = _mtime(root / entry["name"])
            if mtime is not None:  # recorded and there; a recorded shard since removed (repair) is missing
                recorded[int(m.group(1))] = (entry, mtime)

    tasks = []
    for task in range(jobs):
        owned = list(range(task, total, jobs)) if total is not None else sorted(j for j in recorded if j % jobs == task)
        done = [j for j in owned if j in recorded]
        in_flight_names = sorted(n for n in temps if int(SHARD.match(n).group(1)) % jobs == task)
        held, holder = lock_holder(root, locks[task]) if task in locks else (False, None)
        started = _mtime(root / f"config.part-{task:05d}.json")
        mtimes = sorted(recorded[j][1] for j in done)
        since = [t for t in mtimes if started is None or t >= started]
        per_shard = None
        if len(since) >= 2:
            per_shard = (since[-1] - since[0]) / (len(since) - 1)
        elif len(since) == 1 and started is not None and since[0] > started:
            per_shard = since[0] - started
        tasks.append({"task": task, "shards": len(owned) if total is not None else None, "done": len(done),
                      "missing": len(owned) - len(done) if total is not None else None,
                      "in_flight": held or bool(in_flight_names), "lock_held": held, "holder": holder,
                      "writing": in_flight_names,
                      "seconds_per_shard": None if per_shard is None else round(per_shard, 3),
                      "last_shard_age_s": _age(now, mtimes[-1] if mtimes else None), "eta_s": None})
    known = [t["seconds_per_shard"] for t in tasks if t["seconds_per_shard"]]
    mean = sum(known) / len(known) if known else None
    for t in tasks:
        if t["missing"] and (t["seconds_per_shard"] or mean):
            t["eta_s"] = round(t["missing"] * (t["seconds_per_shard"] or mean), 1)
        elif t["missing"] == 0:
            t["eta_s"] = 0.0

    done_rows = sum(entry["rows"] for entry, _ in recorded.values() if _int(entry.get("rows")) is not None)
    tokens_done = done_rows * seq_len if seq_len else None
    rate = None
    if len(recorded) >= 2 and seq_len:
        by_time = sorted(recorded.values(), key=lambda e: e[1])
        span = by_time[-1][1] - by_time[0][1]
        if span > 0:
            rate = round(sum(_int(e.get("rows")) or 0 for e, _ in by_time[1:]) * seq_len / span, 1)
    missing = None if total is None else total - len([j for j in recorded if j < total])
    etas = [t["eta_s"] for t in tasks if t["eta_s"] is not None]
    in_flight = sum(t["in_flight"] for t in tasks)
    if missing == 0:
        state = "ready to merge"
    elif in_flight:
        state = "running"
    else:
        state = "idle"
    return {"path": str(root), "kind": "stage-one", "state": state, "store_kind": kind, "backend": backend,
            "jobs": jobs,
            "shards": {"total": total, "done": len([j for j in recorded if total is None or j < total]),
                       "in_flight": len(temps), "missing": missing},
            "rows": {"done": done_rows, "total": _int((params or {}).get("rows"))},
            "tokens": {"done": tokens_done,
                       "total": params["rows"] * seq_len if seq_len and _int(params.get("rows")) is not None else None},
            "rows_per_shard": rows_per_shard,
            "tokens_per_s": rate, "eta_s": max(etas) if etas and len(etas) == len(tasks) else None,
            "tasks": tasks}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def preparing_status(path: Path, temps: list[Path], now: float) -> dict[str, Any]:
    """A tokens store that ``distill prepare`` is writing: its shards so far, in its temp directory."""
    tmp = temps[-1]
    pid = int(TEMP.match(tmp.name).group("pid"))
    shards, rows, bytes_, mtimes, writing, seq_len = 0, 0, 0, [], 0, 0
    rows_known = True
    for entry in sorted(os.scandir(tmp), key=lambda e: e.name):
        if (m := TEMP.match(entry.name)) and SHARD.match(m.group("name")):
            writing += 1
            continue
        m = SHARD.match(entry.name)
        if not m:
            continue
        shards += 1
        bytes_ += store_lib.shard_bytes(tmp, entry.name)
        mtimes.append(entry.stat(follow_symlinks=False).st_mtime)
        meta = _read_json(tmp, entry.name, "input_ids", "zarr.json", missing_ok=True,
                          limit=store_lib.ZARR_META_LIMIT) if m.group(2) == "zarr" else None
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if isinstance(shape, list) and len(shape) == 2 and all(_int(s) for s in shape):
            rows += shape[0]
            seq_len = shape[1]
        else:
            rows_known = False
    tokens = rows * seq_len if rows_known and shards else (0 if not shards else None)
    rate = None
    if rows_known and len(mtimes) >= 2 and max(mtimes) > min(mtimes):
        rate = round((rows - rows / shards) * seq_len / (max(mtimes) - min(mtimes)), 1)
    alive = _pid_alive(pid)
    return {"path": str(path), "kind": "tokens-prepare", "state": "running" if alive is not False else "stopped",
            "temp_dir": str(tmp), "writer_pid": pid, "writer_alive": alive, "shards": shards, "writing": writing,
            "rows": rows if rows_known else None, "tokens": tokens, "bytes": bytes_, "tokens_per_s": rate,
            "last_shard_age_s": _age(now, max(mtimes) if mtimes else _mtime(tmp))}


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` lives on this host (None: cannot tell; a temp dir on a shared filesystem
    may be another host's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


# ---------------------------------------------------------------------- stage two


def metrics_tail(root: Path) -> list[dict[str, Any]]:
    """The records of the last :data:`METRICS_TAIL` bytes of ``metrics.jsonl`` (a torn last line — the
    trainer appends as it goes — and the first, cut line of the window are left out)."""
    fd = store_lib.store_file(root, "metrics.jsonl", missing_ok=True)
    if fd is None:
        return []
    try:
        size = os.fstat(fd).st_size
        start = max(size - METRICS_TAIL, 0)
        data = os.pread(fd, METRICS_TAIL, start)
    finally:
        os.close(fd)
    text = data.decode("utf-8", errors="replace").split("\n")
    if start > 0:
        text = text[1:]
    records = []
    for line in text:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def student_status(root: Path, now: float) -> dict[str, Any]:
    from pipeline.train import checkpoint

    saved = _read_json(root, "config.json", missing_ok=True)
    config = saved.get("config") if isinstance(saved, dict) and isinstance(saved.get("config"), dict) else {}
    max_steps = _int(config.get("max_steps"))
    records = metrics_tail(root)
    train = [r for r in records if isinstance(r.get("loss"), (int, float)) and _int(r.get("step")) is not None]
    last = train[-1] if train else {}
    heldout = next((r for r in reversed(records) if "heldout_loss" in r), None)
    ckpt_dir = root / "checkpoints"
    intact, damaged = None, []
    for path in reversed(checkpoint.complete(ckpt_dir)):
        if (why := checkpoint.problem(path)) is None:
            intact = path
            break
        damaged.append({"path": str(path), "problem": why})
    writing_ckpt = bool(ckpt_dir.is_dir() and any(TEMP.match(n) for n in os.listdir(ckpt_dir)))
    preempted = _read_json(root, "preempted.json", missing_ok=True)
    final = _read_json(root, "metrics.json", missing_ok=True)
    finished = isinstance(final, dict) and (root / "model").is_dir()
    step = _int(last.get("step"))
    if finished:
        state = "finished"
    elif isinstance(preempted, dict):
        state = "preempted"
    elif not train and intact is None:
        state = "starting"
    else:
        state = "in progress"
    step_s = [r["step_s"] for r in train[-20:] if isinstance(r.get("step_s"), (int, float))]
    eta = None
    if state == "in progress" and step is not None and max_steps and step_s:
        eta = round((max_steps - step) * sum(step_s) / len(step_s), 1)
    report = {"path": str(root), "kind": "student", "state": state, "step": step, "max_steps": max_steps,
              "loss": last.get("loss"), "lr": last.get("lr"), "tokens": last.get("tokens"),
              "tokens_per_s": last.get("tokens_per_s"),
              "heldout_loss": heldout.get("heldout_loss") if heldout else None,
              "heldout_step": heldout.get("step") if heldout else None,
              "last_log_age_s": _age(now, _mtime(root / "metrics.jsonl")), "eta_s": eta,
              "checkpoint": None, "damaged_checkpoints": damaged, "writing_checkpoint": writing_ckpt,
              "preempted": preempted if isinstance(preempted, dict) else None,
              "final": final if finished else None}
    if intact is not None:
        report["checkpoint"] = {"path": str(intact), "step": int(checkpoint.PATTERN.match(intact.name).group(1))}
    return report


# ---------------------------------------------------------------------- rounds


# each step of a round and the file that says it is done (stages/rounds.py, steps())
ROUND_STEP_DONE = {"prompts": ("prompts.json",), "generate-student": ("gen-student", "summary.json"),
                   "generate-teacher": ("gen-teacher", "summary.json"), "prepare": ("tokens", "index.json"),
                   "teacher": ("store", "index.json"), "student": ("student", "metrics.json"),
                   "heldout-generate": ("eval", "gen", "summary.json"),
                   "heldout-prepare": ("eval", "tokens", "index.json"),
                   "heldout-teacher": ("eval", "store", "index.json"), "eval": ("eval", "tasks.json"),
                   "finish": ("round.json",)}
ROUND_STEP_DIR = {"prepare": "tokens", "teacher": "store", "student": "student", "heldout-prepare": "eval/tokens",
                  "heldout-teacher": "eval/store"}


def _round_step_done(d: Path, step: str) -> bool:
    done = os.path.lexists(d.joinpath(*ROUND_STEP_DONE[step]))
    if step == "student":
        done = done and (d / "student" / "model").is_dir()
    return done


def round_steps(d: Path, r: int) -> list[str]:
    """The steps of round ``r`` in order: those whose configs ``distill rounds`` saved (``steps/``), plus
    its own prompts and finish."""
    saved = {p[:-5] for p in os.listdir(d / "steps") if p.endswith(".json")} if (d / "steps").is_dir() else set()
    order = [s for s in ROUND_STEP_DONE if s in saved or s == "finish" or (s == "prompts" and r > 0)]
    return order


def rounds_status(root: Path, now: float) -> dict[str, Any]:
    saved = _read_json(root, "config.json", missing_ok=True)
    config = saved.get("config") if isinstance(saved, dict) and isinstance(saved.get("config"), dict) else {}
    planned = _int(config.get("rounds"))
    found = sorted(int(n[6:]) for n in os.listdir(root) if re.match(r"^round-\d{3}$", n))
    last = max([*found, *([planned] if planned is not None else [])], default=-1)
    rounds = []
    for r in range(last + 1):
        d = root / f"round-{r:03d}"
        entry: dict[str, Any] = {"round": r, "state": "not started", "step": None, "steps_done": [], "detail": None}
        result = _read_json(d, "round.json", missing_ok=True) if d.is_dir() else None
        if isinstance(result, dict):
            entry["state"] = "finished"
            for key in ("reverse_kl_per_token", "reverse_kl_stderr", "teacher_tokens_total", "teacher_scored_total",
                        "seconds"):
                entry[key] = result.get(key)
        elif d.is_dir():
            steps = round_steps(d, r)
            entry["steps_done"] = [s for s in steps if _round_step_done(d, s)]
            pending = [s for s in steps if s not in entry["steps_done"]]
            entry["state"] = "in progress" if entry["steps_done"] or pending else "not started"
            entry["step"] = pending[0] if pending else None
            sub = d / ROUND_STEP_DIR[entry["step"]] if entry["step"] in ROUND_STEP_DIR else None
            if sub is not None and (sub.exists() or preparing_dirs(sub)):
                try:
                    entry["detail"] = _describe(sub, now)
                except DistillError:
                    entry["detail"] = None  # nothing of the step's own written yet
        rounds.append(entry)
    finished = sum(e["state"] == "finished" for e in rounds)
    state = "finished" if rounds and finished == len(rounds) else "in progress" if finished or any(
        e["state"] != "not started" for e in rounds) else "not started"
    return {"path": str(root), "kind": "rounds", "state": state, "objective": config.get("objective"),
            "rounds_planned": None if planned is None else planned + 1, "rounds_finished": finished,
            "rounds": rounds}


# ---------------------------------------------------------------------- slurm


def _parse_states(text: str, id_column: int = 0, state_column: int = 1) -> dict[str, dict[str, int]]:
    """``--parsable2``-style lines (``|``-separated) → per job id, how many of its tasks are in each
    state (an array's tasks ``ID_N`` and pending ranges ``ID_[N-M]`` counted by task; job steps
    ``ID.batch`` left out)."""
    states: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) <= max(id_column, state_column) or not fields[id_column]:
            continue
        job_id, state = fields[id_column], fields[state_column].split()[0] if fields[state_column].split() else ""
        if "." in job_id or not state:
            continue
        base, _, task = job_id.partition("_")
        count = 1
        if task.startswith("[") and task.endswith("]"):
            count = 0
            for piece in task[1:-1].split("%")[0].split(","):
                lo, _, hi = piece.partition("-")
                if lo.isdigit() and (not hi or hi.isdigit()):
                    count += int(hi or lo) - int(lo) + 1
        states.setdefault(base, {})
        states[base][state] = states[base].get(state, 0) + count
    return states


def _run_slurm(args: list[str]) -> str | None:
    """A squeue/sacct call's output, or None when it is not on PATH, fails or hangs."""
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def queue_states(ids: list[str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Each job's task states: ``sacct`` (every state, finished ones too) overlaid by ``squeue`` (what
    is queued or running now); and which of the two answered."""
    states: dict[str, dict[str, int]] = {}
    sources = []
    if not ids:
        return states, sources
    joined = ",".join(ids)
    acct = _run_slurm(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={joined}",
                       "--format=JobID,State"])
    if acct is not None:
        sources.append("sacct")
        states.update(_parse_states(acct))
    queue = _run_slurm(["squeue", "--noheader", f"--jobs={joined}", "--format=%i|%T"])
    if queue is None and shutil.which("squeue"):  # older squeue refuses --jobs naming a job it no longer knows
        queue = _run_slurm(["squeue", "--noheader", "--me", "--format=%i|%T"])
    if queue is not None:
        sources.append("squeue")
        live = {job_id: counts for job_id, counts in _parse_states(queue).items() if job_id in ids}
        for job_id, counts in live.items():
            if job_id in states:  # an array: tasks squeue shows are live; the ones it does not are sacct's
                merged = {s: n for s, n in states[job_id].items() if s not in ("PENDING", "RUNNING")}
                states[job_id] = {**merged, **counts}
            else:
                states[job_id] = counts
    return states, sources


def _summary_state(counts: dict[str, int] | None) -> str | None:
    if not counts:
        return None
    for state in ("RUNNING", "REQUEUED", "PENDING", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                  "CANCELLED"):
        if counts.get(state):
            return state
    return "COMPLETED" if set(counts) == {"COMPLETED"} else next(iter(counts))


def _workdir(out: Path) -> Path:
    """The directory the jobs run in: the ``cd`` line every script of the OUT starts with."""
    for script in sorted(out.glob("*.sbatch")) + sorted(out.glob("round-*/*.sbatch")):
        fd = store_lib.store_file(script.parent, script.name, missing_ok=True)
        if fd is None:
            continue
        try:
            text = os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")
        finally:
            os.close(fd)
        for line in text.splitlines():
            if line.startswith("cd "):
                try:
                    return Path(shlex.split(line)[1])
                except (ValueError, IndexError):
                    break
    return Path.cwd()


def _yaml(out: Path, name: str) -> dict[str, Any]:
    import yaml

    fd = store_lib.store_file(out / "config", name, missing_ok=True) if (out / "config").is_dir() else None
    if fd is None:
        return {}
    try:
        text = os.pread(fd, JSON_LIMIT, 0).decode("utf-8", errors="replace")
    finally:
        os.close(fd)
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError:
        raise DistillError(f"{out / 'config' / name} does not parse as YAML; it was damaged") from None
    return body if isinstance(body, dict) else {}


def _on_disk(workdir: Path, where: Any, now: float) -> dict[str, Any] | None:
    if not isinstance(where, str) or not where:
        return None
    path = Path(where) if Path(where).is_absolute() else workdir / where
    try:
        return _describe(path, now)
    except DistillError:
        return None


def slurm_status(out: Path, now: float) -> dict[str, Any]:
    raw = _read_json(out, "slurm.json")
    record = _read_json(out, "jobs.json", missing_ok=True)
    jobs = record.get("jobs") if isinstance(record, dict) and isinstance(record.get("jobs"), dict) else {}
    jobs = {str(name): str(job_id) for name, job_id in jobs.items() if re.fullmatch(r"\d+", str(job_id))}
    states, sources = queue_states(list(jobs.values()))
    workdir = _workdir(out)
    report: dict[str, Any] = {"path": str(out), "kind": "slurm", "submitted": record.get("submitted") if isinstance(
        record, dict) else None, "source": "+".join(sources) or "disk", "workdir": str(workdir), "jobs": [],
        "stage_one_layout": stage_one_layout(raw)}
    if isinstance(raw, dict) and raw.get("rounds"):
        rounds_out = _yaml(out, "rounds.yaml").get("out")
        rounds = _on_disk(workdir, rounds_out, now)
        report["stages"] = {"rounds": rounds}
        by_round = {e["round"]: e for e in (rounds or {}).get("rounds", [])}
        rounds_dir = Path(rounds_out) if isinstance(rounds_out, str) else None
        if rounds_dir is not None and not rounds_dir.is_absolute():
            rounds_dir = workdir / rounds_dir
        names = jobs or {p.parent.name + "/" + p.stem: None for p in sorted(out.glob("round-*/*.sbatch"))}
        for name in names:
            r, step = int(name[6:9]), name.split("/", 1)[1].split("-", 1)[1]
            entry = by_round.get(r, {})
            done = None
            if entry.get("state") == "finished":
                done = True
            elif rounds_dir is not None:
                done = _round_job_done(rounds_dir / f"round-{r:03d}", step)
            report["jobs"].append(_job(name, jobs.get(name), states, done))
        return report
    teacher, student = _yaml(out, "teacher.yaml"), _yaml(out, "student.yaml")
    store = _on_disk(workdir, teacher.get("out"), now)
    run = _on_disk(workdir, student.get("out"), now)
    evals = [_yaml(out, p.name) for p in sorted((out / "config").glob("eval-*.yaml"))] if (out / "config").is_dir() else []
    report["stages"] = {"teacher": store, "student": run}
    layout = report["stage_one_layout"]
    if layout and store and store["kind"] == "stage-one":  # a task's owners are its processes
        per_task = layout["nodes"] * layout["procs_per_node"]
        for task in store["tasks"]:
            task["array_task"], task["process"] = divmod(task["task"], per_task)
        store["slurm_out"] = str(out)
    eval_outs = [e.get("out") for e in evals if isinstance(e.get("out"), str)]
    disk = {"teacher": None if store is None else store["state"] in ("ready to merge", "complete"),
            "merge": None if store is None else store["state"] == "complete",
            "student": None if run is None else run["state"] == "finished",
            "eval": bool(eval_outs) and all((Path(e) if Path(e).is_absolute() else workdir / e).exists()
                                            for e in eval_outs)}
    for name in jobs or {k: None for k in ("teacher", "merge", "student", "eval")}:
        report["jobs"].append(_job(name, jobs.get(name), states, disk.get(name)))
    return report


def stage_one_layout(raw: Any) -> dict[str, int] | None:
    """Stage one's array tasks × nodes × processes a node, from slurm.json, where each task runs several
    processes (shard owners: owner g is process g mod n of array task g div n); None where a task runs
    one, or where slurm.json does not say it as `distill slurm` writes it."""
    jobs = raw.get("jobs") if isinstance(raw, dict) else None
    teacher = jobs.get("teacher") if isinstance(jobs, dict) else None
    if not isinstance(teacher, dict):
        return None
    array = teacher.get("array", 1)
    if isinstance(array, str) and (m := re.fullmatch(r"([0-9]+)%[0-9]+", array)):
        array = int(m.group(1))  # 'N%M': N tasks, M at once
    counts = [array, teacher.get("nodes", 1), teacher.get("procs_per_node", 1)]
    if not all(_int(n) for n in counts) or counts[1] * counts[2] == 1:
        return None
    array, nodes, procs = counts
    return {"array_tasks": array, "nodes": nodes, "procs_per_node": procs, "owners": array * nodes * procs}


def _round_job_done(d: Path, step: str) -> bool | None:
    if step in ("generate", "heldout-generate"):
        steps = [s for s in ("generate-student", "generate-teacher") if (d / "steps" / f"{s}.json").exists()] \
            if step == "generate" else ["heldout-generate"]
        return bool(steps) and all(_round_step_done(d, s) for s in steps)
    step = {"merge": "teacher", "heldout-merge": "heldout-teacher"}.get(step, step)
    return _round_step_done(d, step) if step in ROUND_STEP_DONE else None


def _job(name: str, job_id: str | None, states: dict[str, dict[str, int]], done: bool | None) -> dict[str, Any]:
    counts = states.get(job_id) if job_id else None
    state = _summary_state(counts)
    if state is None:
        state = "DONE (on disk)" if done else "not submitted" if job_id is None else "no queue record; not done on disk"
    return {"name": name, "id": job_id, "state": state, "tasks": counts, "done_on_disk": done}


# ---------------------------------------------------------------------- what a person reads


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _rate(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f} tok/s"


def lines(report: dict[str, Any], indent: str = "") -> list[str]:
    kind, path = report["kind"], report["path"]
    out = []
    if kind == "store":
        out.append(f"{path}: complete {report['store_kind']} store, {report['shards']} shards, {report['rows']} rows, "
                   f"{report['tokens']:,} tokens, {report['bytes']:,} bytes (distill inspect {path} says more)")
        if report.get("rewriting"):
            out += lines(report["rewriting"], indent + "  ")
    elif kind == "stage-one":
        s, t = report["shards"], report["tokens"]
        of = f" of {s['total']}" if s["total"] is not None else ""
        out.append(f"{path}: stage-one {report['store_kind'] or ''} store, {report['state']}: {s['done']}{of} shards "
                   f"done, {s['in_flight']} being written, {s['missing'] if s['missing'] is not None else '?'} missing "
                   f"({report['jobs']} job{'s' if report['jobs'] > 1 else ''})")
        total = f" of {t['total']:,}" if t["total"] is not None else ""
        out.append(f"  tokens {t['done'] if t['done'] is None else format(t['done'], ',')}{total}; "
                   f"{_rate(report['tokens_per_s'])}; ETA {_duration(report['eta_s'])}"
                   + (" (every task running at once)" if report["jobs"] > 1 and report["eta_s"] else ""))
        for task in report["tasks"]:
            flight = "running" if task["in_flight"] else "not running"
            owner = f" (array task {task['array_task']}, process {task['process']})" if "array_task" in task else ""
            owned = task["shards"] if task["shards"] is not None else "?"
            out.append(f"  task {task['task']}{owner}: {task['done']}/{owned} "
                       f"shards, {flight}" + (f" ({task['holder']})" if task["lock_held"] and task["holder"] else "")
                       + (f", {_duration(task['seconds_per_shard'])}/shard" if task["seconds_per_shard"] else "")
                       + (f", last shard {_duration(task['last_shard_age_s'])} ago"
                          if task["last_shard_age_s"] is not None else "")
                       + (f", ETA {_duration(task['eta_s'])}" if task["missing"] else ""))
        if report["state"] == "ready to merge":
            out.append(f"  every shard is written: distill merge {path}")
        elif report["state"] == "idle":
            idle = [t for t in report["tasks"] if t["missing"] and not t["in_flight"]]
            if report.get("slurm_out"):
                arrays = sorted({t["array_task"] for t in idle})
                out.append(f"  nothing is running; owners {', '.join(str(t['task']) for t in idle)} owe shards: "
                           f"distill slurm --resubmit {report['slurm_out']} submits array task(s) "
                           f"{', '.join(map(str, arrays))} again")
            else:
                out.append(f"  nothing is running; tasks {', '.join(str(t['task']) for t in idle)} owe shards: "
                           "rerun them (same command)")
    elif kind == "tokens-prepare":
        alive = {True: "running", False: "not running", None: "on another host?"}[report["writer_alive"]]
        tokens = "?" if report["tokens"] is None else f"{report['tokens']:,}"
        out.append(f"{path}: tokens store being prepared in {report['temp_dir']} (pid {report['writer_pid']}, {alive}): "
                   f"{report['shards']} shards, {tokens} tokens, {report['bytes']:,} bytes; {_rate(report['tokens_per_s'])}; "
                   f"last shard {_duration(report['last_shard_age_s'])} ago (no ETA: the corpus's size in tokens is "
                   "known only at the end)")
    elif kind == "student":
        step = f"step {report['step'] if report['step'] is not None else '?'} of {report['max_steps'] or '?'}"
        loss = f", loss {report['loss']:.4f}" if isinstance(report["loss"], (int, float)) else ""
        held = f", held-out {report['heldout_loss']:.4f}" if isinstance(report["heldout_loss"], (int, float)) else ""
        out.append(f"{path}: student {report['state']}: {step}{loss}{held}, {_rate(report['tokens_per_s'])}, "
                   f"last log {_duration(report['last_log_age_s'])} ago"
                   + (f", ETA {_duration(report['eta_s'])}" if report["eta_s"] is not None else ""))
        ckpt = report["checkpoint"]
        out.append("  last intact checkpoint: " + (f"{ckpt['path']} (step {ckpt['step']})" if ckpt else "none")
                   + ("; a checkpoint is being written" if report["writing_checkpoint"] else ""))
        for bad in report["damaged_checkpoints"]:
            out.append(f"  damaged checkpoint {bad['path']}: {bad['problem']}")
        if report["preempted"]:
            p = report["preempted"]
            out.append(f"  pre-empted by {p.get('signal')} at step {p.get('step')} ({p.get('time')}): rerun with "
                       "--resume auto (a requeued job does)")
        if report["final"]:
            out.append(f"  finished: {path}/model")
    elif kind == "rounds":
        planned = report["rounds_planned"] if report["rounds_planned"] is not None else "?"
        out.append(f"{path}: rounds ({report['objective']}), {report['state']}: {report['rounds_finished']} of "
                   f"{planned} rounds finished")
        for e in report["rounds"]:
            if e["state"] == "finished":
                kl = e.get("reverse_kl_per_token")
                out.append(f"  round {e['round']}: finished, reverse KL "
                           f"{kl:.4f} nats/token" if isinstance(kl, (int, float)) else f"  round {e['round']}: finished")
                if isinstance(e.get("teacher_tokens_total"), int):
                    out[-1] += f", teacher tokens so far {e['teacher_tokens_total']:,}"
            else:
                out.append(f"  round {e['round']}: {e['state']}" + (f", at step {e['step']}" if e["step"] else "")
                           + (f" ({len(e['steps_done'])} steps done)" if e["steps_done"] else ""))
                if e["detail"]:
                    out += lines(e["detail"], indent + "    ")
    elif kind == "slurm":
        out.append(f"{path}: distill slurm jobs (states from {report['source']}"
                   + (f"; submitted {report['submitted']}" if report["submitted"] else "") + ")")
        if layout := report.get("stage_one_layout"):
            n = layout["nodes"] * layout["procs_per_node"]
            out.append(f"  stage one: {layout['array_tasks']} array task{'s' if layout['array_tasks'] > 1 else ''} × "
                       f"{layout['nodes']} node{'s' if layout['nodes'] > 1 else ''} × {layout['procs_per_node']} "
                       f"process{'es' if layout['procs_per_node'] > 1 else ''} = {layout['owners']} shard owners "
                       f"(owner g: process g mod {n} of array task g div {n})")
        for job in report["jobs"]:
            tasks = (" (" + ", ".join(f"{n} {s.lower()}" for s, n in sorted(job["tasks"].items())) + ")"
                     if job["tasks"] and sum(job["tasks"].values()) > 1 else "")
            out.append(f"  {job['name']:<28} {job['id'] or '-':>10}  {job['state']}{tasks}")
        for name, stage in report.get("stages", {}).items():
            if stage:
                out += lines(stage, indent + "  ")
    return [indent + line for line in out]

"""Output directories: what each stage writes into ``--out``, and the one policy for what is there already.

Before a stage writes into OUT (and again just before ``--overwrite`` deletes anything) it checks
what OUT holds against the stage's :class:`Layout`, the names that stage writes:

- nothing: OUT is missing or an empty directory;
- ours: every entry is a name the stage writes (or a temp name of one: ``.NAME.tmp[-PID[-HEX]]``,
  ``.NAME.old-PID``), of the type it writes it as (a regular file or a directory: distill never
  writes a symbolic link, so a link is never ours), and OUT holds a JSON file distill wrote (a
  resolved config, an index or a progress index: :func:`_written_by_distill`), so that a
  directory of someone else's ``tokenizer.json`` or ``config.json`` is not taken for ours;
- foreign: anything else. A dotfile (``.git``) is an entry like any other.

Foreign content is refused in one line naming it, with or without ``--overwrite``: distill never
writes into, nor deletes from, a directory holding what it did not write, and never suggests
``--overwrite`` for it. ``--overwrite`` deletes only what the layout names (:func:`clear`): each
entry is renamed aside to a temp name first and then removed without following a link.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import DistillError

JOB = r"\d{5,}-of-\d{5,}"  # job JJJJJ of NNNNN, as every per-job name spells it
LOCK = rf"\.lock\.part-{JOB}"  # contract.JobLock: held while a job writes (a regular file)
TEMP = r"\.(?:{names})\.(?:tmp(?:-\d+(?:-[0-9a-f]+)?)?|old-\d+)"  # pipeline.io's temp and aside names
SHOWN = 3  # entries a message names before "and N more"


@dataclass(frozen=True)
class Layout:
    """The entries a stage writes in a directory: regexes matched against whole names."""

    what: str  # what such a directory is, for messages ("a store", "a training run", ...)
    files: tuple[str, ...]  # regular files
    dirs: dict[str, Layout | None] = field(default_factory=dict)  # directories: their own layout, or None (written whole)
    locks: tuple[str, ...] = ()  # regular files that alone do not make the directory ours (a lock)

    def match(self, name: str, patterns) -> str | None:
        return next((p for p in patterns if re.fullmatch(p, name)), None)

    def is_temp(self, name: str) -> bool:
        names = "|".join(f"(?:{p})" for p in (*self.files, *self.dirs))
        return re.fullmatch(TEMP.format(names=names), name) is not None


# what a stage's tracker writes (pipeline/train/tracking.py): metrics.jsonl (metrics.part-JJJJJ.jsonl for a
# stage-one array job), the W&B run's id, tensorboard/ (a directory per array job inside) and W&B's wandb/
TRACKING_FILES = (r"metrics(?:\.part-\d{5,})?\.jsonl", r"wandb-run-id(?:\.part-\d{5,})?")
TRACKING_DIRS = {"tensorboard": None, "wandb": None}
# distill prepare (stages/prepare.py: shards, config.json, index.json, renamed in whole; an array task's
# piece-UUUUUU.arrow, config.part-JJJJJ.json and partial index until `distill merge`) and stage one
# (stages/teacher.py and contract.py: shards, config.part-JJJJJ.json, index.part-JJJJJ-of-NNNNN.json, the
# job lock, index.json from merge). A shard is a directory (zarr) or a file (arrow).
STORE = Layout("a store", files=(r"index\.json", rf"index\.part-{JOB}\.json", r"config\.json", r"config\.part-\d{5,}\.json",
                                 r"shard-\d{5,}\.arrow", r"piece-\d{6,}\.arrow", *TRACKING_FILES),
               dirs={r"shard-\d{5,}\.zarr": None, **TRACKING_DIRS}, locks=(LOCK,))
# distill student / train (stages/student.py): config.json, metrics.jsonl, metrics.json, preempted.json,
# model/ (save_pretrained, renamed in whole) and checkpoints/step-NNNNNNNN (pipeline/train/checkpoint.py).
RUN = Layout("a training run", files=(r"config\.json", r"metrics\.json", r"preempted\.json", *TRACKING_FILES),
             dirs={"model": None, "checkpoints": Layout("checkpoints", files=(), dirs={r"step-\d{8}": None}),
                   **TRACKING_DIRS})
# distill generate (stages/generate.py): generated.jsonl, summary.json, config.job-JJJJJ-of-NNNNN.json and
# parts/ (its parts, its progress indexes and the job locks).
GENERATED = Layout("generated records", files=(r"generated\.jsonl", r"summary\.json", rf"config\.job-{JOB}\.json"),
                   dirs={"parts": Layout("parts", files=(rf"job-{JOB}\.part-\d{{5,}}", rf"index\.job-{JOB}\.json"),
                                         locks=(LOCK,))})
# distill tokenizer (stages/tokenizer.py, pipeline/text/tokenizer.py): what save_pretrained writes for a
# fast tokenizer (special_tokens_map.json and added_tokens.json by transformers before 5) and distill_config.json.
TOKENIZER = Layout("a tokenizer", files=(r"tokenizer\.json", r"tokenizer_config\.json", r"special_tokens_map\.json",
                                         r"added_tokens\.json", r"chat_template\.jinja", r"distill_config\.json"))


@dataclass
class _Scan:
    foreign: list[str] = field(default_factory=list)  # entries distill did not write, relative to OUT
    ours: list[str] = field(default_factory=list)  # entries named by the layout, besides temps and locks
    marked: bool = False  # a JSON file distill wrote is among them


def claim(out: Path, layout: Layout, overwrite: bool = False) -> bool:
    """Refuse, in one line, an OUT that holds anything ``layout`` does not name (nothing is touched);
    True when OUT holds something of ours (beyond temps and locks), False when it is missing or empty."""
    out = Path(out)
    if not out.is_dir():
        if os.path.lexists(out):
            raise DistillError(f"{out} is {_kind(out)}, not a directory; choose another --out")
        return False
    scan = _scan(out, layout, "")
    foreign = scan.foreign + ([] if scan.marked else scan.ours)  # nothing vouches that these are ours
    if foreign:
        foreign.sort(key=lambda name: (name.startswith("."), name))
        last = foreign[-1] if len(foreign) <= SHOWN else f"{len(foreign) - SHOWN + 1} more"
        shown = " and ".join(filter(None, [", ".join(foreign[:min(len(foreign) - 1, SHOWN - 1)]), last]))
        rule = (f"--overwrite replaces only {layout.what} distill wrote, nothing else" if overwrite else
                f"distill writes only into an empty directory or into {layout.what} it wrote")
        raise DistillError(f"{out} holds {shown}, which distill did not write; {rule}: choose another --out or "
                           "move those away")
    return bool(scan.ours)


def clear(out: Path, layout: Layout, keep: tuple[Path, ...] = ()) -> None:
    """``--overwrite``: delete what ``layout`` names in ``out`` but ``keep`` (the lock this job holds),
    after checking once more that nothing else is there. Each entry is renamed aside (``.NAME.old-PID``)
    before it is removed, so a crash leaves the old entry or none under its name; nothing is
    followed through a link."""
    claim(out, layout, overwrite=True)
    _clear(Path(out), layout, {Path(k) for k in keep})


def _clear(root: Path, layout: Layout, keep: set[Path]) -> None:
    for path in sorted(root.iterdir()):
        if path in keep:
            continue
        inner = next((layout.dirs[p] for p in layout.dirs if re.fullmatch(p, path.name)), None)
        if inner is not None and any(path in k.parents for k in keep):
            _clear(path, inner, keep)
        elif layout.is_temp(path.name):
            remove_entry(path)
        else:
            aside = path.with_name(f".{path.name}.old-{os.getpid()}")
            remove_entry(aside)
            os.replace(path, aside)
            remove_entry(aside)


def remove_entry(path: Path) -> None:
    """Remove ``path`` itself: a link is unlinked (never what it points at), a directory removed with
    its content (``shutil.rmtree`` does not follow the links inside it), a vanished one ignored."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _scan(root: Path, layout: Layout, prefix: str) -> _Scan:
    scan = _Scan()
    for name in sorted(os.listdir(root)):
        path, shown = root / name, prefix + (name if name.isprintable() else ascii(name))
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:  # a temp another job renamed meanwhile
            continue
        is_file, is_dir = stat.S_ISREG(mode), stat.S_ISDIR(mode)
        if not (is_file or is_dir):
            scan.foreign.append(f"{shown} ({_kind(path)})")
        elif layout.is_temp(name) or (is_file and layout.match(name, layout.locks)):
            continue  # what a killed or running job leaves; not a sign of anything else
        elif is_file and layout.match(name, layout.files):
            scan.ours.append(shown)
            scan.marked = scan.marked or (name.endswith(".json") and _written_by_distill(path))
        elif is_dir and (pattern := layout.match(name, layout.dirs)) is not None:
            inner = layout.dirs[pattern]
            if inner is None:
                scan.ours.append(shown)
                continue
            sub = _scan(path, inner, shown + "/")
            scan.foreign += sub.foreign
            scan.marked = scan.marked or sub.marked
            if sub.ours:
                scan.ours.append(shown)
        else:
            scan.foreign.append(shown)
    return scan


def _written_by_distill(path: Path) -> bool:
    """A JSON object as distill writes them: a resolved config (``stage``, ``config``) or an index,
    partial index, progress index or summary (``params``)."""
    try:
        with open(path, "rb") as f:
            body = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and (isinstance(body.get("config"), dict) and str(body.get("stage", "")).endswith("Config")
                                       or isinstance(body.get("params"), dict))


def _kind(path: Path) -> str:
    mode = os.lstat(path).st_mode
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a file" if stat.S_ISREG(mode)
            else "a directory" if stat.S_ISDIR(mode) else "not a regular file")

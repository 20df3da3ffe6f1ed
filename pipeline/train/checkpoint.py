"""Training checkpoints that resume rather than restart.

A checkpoint is a directory ``step-NNNNNNNN`` holding ``state.pt`` (model, optimizer, scheduler,
step, RNG state, data position), ``config.json`` and, written last, ``manifest.json``: the size and
sha256 of each of the other files. It is written under a temp name and renamed, so a directory with
the final name is complete; ``latest`` ignores anything else. Old checkpoints are renamed aside
before they are deleted, a failed write removes its temp directory, and temp directories that a
killed run left are removed by the next save. States are loaded with
``torch.load(weights_only=True)``: a checkpoint cannot run code.

A sharded checkpoint (``--fsdp``, written by ``pipeline/train/distributed.py``) keeps model and
optimizer out of ``state.pt``: every process writes its own shards with
``torch.distributed.checkpoint`` (``__RANK_N.distcp`` and ``.metadata`` beside ``state.pt``) into the
same temp directory, and one process seals it with the manifest, which then lists those files too
and says ``"weights": "dcp"`` (the ``.metadata`` must be among its files).

The manifest is checked before a checkpoint is loaded: ``torch.load`` refuses a truncated file but
loads a flipped byte in a tensor's data without complaint. ``--resume auto`` skips a newest
checkpoint that fails the check (one line says which and why) and resumes from the newest intact
one; ``--resume PATH`` refuses a damaged one. A checkpoint written before manifests existed loads
unchecked, with one warning line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import DistillError
from pipeline.io import file_sha256, remove_dir, remove_leftovers, removed_if_failed, replace_dir, write_synced
from pipeline.store.contract import safe_child

PATTERN = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
FILES = ("state.pt", "config.json")  # what a checkpoint holds besides its manifest
DCP_METADATA = ".metadata"  # a sharded checkpoint's index of its shards (torch.distributed.checkpoint)


def save(root: Path, step: int, state: dict[str, Any], config: dict[str, Any], keep: int = 2) -> Path:
    tmp = temp_dir(root, step, os.getpid())
    with removed_if_failed(tmp):  # a failed write (a full disk) leaves no temp behind
        return seal(root, tmp, step, state, config, keep)


def temp_dir(root: Path, step: int, pid: int) -> Path:
    """A fresh temp directory for the checkpoint of ``step`` (``pid``: the writing process's, or with
    several writers the first one's), after removing what killed runs left."""
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root, r"step-\d{8}")  # what killed runs left: partial writes hold disk space
    tmp = root / f".step-{step:08d}.tmp-{pid}"
    tmp.mkdir()
    return tmp


def seal(root: Path, tmp: Path, step: int, state: dict[str, Any], config: dict[str, Any], keep: int = 2,
         shards: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``state.pt`` and ``config.json`` into ``tmp``, then the manifest of them and of ``shards``
    (files other processes already wrote there, name → bytes and sha256; a sharded checkpoint's DCP
    files), and rename ``tmp`` to ``step-NNNNNNNN``; keep the newest ``keep`` checkpoints."""
    import torch  # here, not at the top: `distill status` reads checkpoints' manifests without torch

    final = root / f"step-{step:08d}"
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    # the bytes are on disk before the directory gets its final name
    write_synced(tmp / "state.pt", lambda f: torch.save(state, f))
    write_synced(tmp / "config.json", lambda f: f.write(text.encode()))
    # hashed as read back, so the manifest vouches for the bytes on disk, not for what was meant
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in FILES}
    manifest = {"version": MANIFEST_VERSION, "step": step, "files": {**(shards or {}), **files}}
    if shards is not None:
        manifest["weights"] = "dcp"
    write_synced(tmp / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()))
    replace_dir(tmp, final)  # a rerun's last checkpoint replaces the same step's: never half of one
    for old in complete(root)[:-keep] if keep > 0 else []:
        remove_dir(old)
    return final


def complete(root: Path) -> list[Path]:
    """Checkpoints under ``root`` by name (renamed into place whole, so holding a state or at least
    the manifest that lists one), oldest first. Their bytes are not checked here: :func:`problem`
    does that."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name)
             and ((p / "state.pt").is_file() or (p / MANIFEST).is_file())]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def problem(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` against its manifest (a missing, truncated or
    changed file), or None if every file is as written. A checkpoint without a manifest (written
    before checkpoints carried one) has none to check: None; :func:`unchecked` tells it apart."""
    if not (path / MANIFEST).is_file():
        return None if (path / "state.pt").is_file() else "state.pt is missing"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
        needed = FILES + ((DCP_METADATA,) if manifest.get("weights") == "dcp" else ())
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} does not parse"
    for name in needed:
        if name not in listed:
            return f"{MANIFEST} does not list {name}"
    for name, (size, sha256) in sorted(listed.items()):
        try:  # a name read off disk: a plain file name in the checkpoint, as a store's shard names
            file = safe_child(path, name)
        except DistillError:
            return f"{MANIFEST} lists {name!r}, which is not a file name in the checkpoint (damaged or hostile)"
        if not file.is_file():
            return f"{name} is missing"
        if (actual := file.stat().st_size) != size:
            return f"{name} is {actual} bytes, its manifest says {size} (truncated or overwritten)"
        if file_sha256(file) != sha256:
            return f"{name} does not match its sha256 in {MANIFEST} (the bytes changed since it was written)"
    return None


def unchecked(path: Path) -> bool:
    """A checkpoint from before manifests: nothing vouches for its bytes."""
    return not (path / MANIFEST).is_file()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve(root: Path, resume: str, say: Callable[[str], None] = _stderr) -> Path | None:
    """The checkpoint to resume from, its files checked against its manifest: ``auto`` = the newest
    intact one under ``root`` (or none), ``never``, or a path (refused if damaged). ``say`` gets one
    line when ``auto`` passes over damaged checkpoints, and one when the chosen one has no manifest."""
    if resume == "never":
        return None
    if resume == "auto":
        skipped, chosen = [], None
        for path in reversed(complete(root)):
            if (why := problem(path)) is None:
                chosen = path
                break
            skipped.append(f"{path} ({why})")
        if skipped:
            instead = f"resuming from {chosen.name} instead" if chosen else "no intact checkpoint is left, starting from step 0"
            say(f"warning: skipping damaged checkpoint{'s' if len(skipped) > 1 else ''} {'; '.join(skipped)}; {instead}")
    else:
        chosen = Path(resume)
        if not (chosen / "state.pt").is_file() and not (chosen / MANIFEST).is_file():
            raise DistillError(f"--resume {resume}: no checkpoint there (expected {chosen}/state.pt); "
                               "pass --resume auto or a step-NNNNNNNN directory")
        if (why := problem(chosen)) is not None:
            raise DistillError(f"--resume {resume}: the checkpoint is damaged ({why}); pass an earlier "
                               "step-NNNNNNNN directory, or --resume auto to take the newest intact one")
    if chosen is not None and unchecked(chosen):
        say(f"warning: checkpoint {chosen} has no {MANIFEST} (written before checkpoints carried checksums): "
            "loading it unchecked")
    return chosen


def load(path: Path, verified: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """State and config of the checkpoint at ``path``; its files are checked against its manifest
    first unless ``verified`` (:func:`resolve` returned it, having checked them)."""
    if not verified and (why := problem(path)) is not None:
        raise DistillError(f"checkpoint {path} is damaged ({why}); resume from an earlier one")
    import torch

    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        config = json.loads((path / "config.json").read_text())
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, FileNotFoundError) as e:  # an unchecked one's damage
        reason = " ".join(str(e).split())[:200]
        raise DistillError(f"checkpoint {path} does not load ({type(e).__name__}: {reason}); "
                           "resume from an earlier one") from None
    return state, config


def sharded(path: Path) -> bool:
    """Whether the checkpoint at ``path`` holds its model and optimizer as DCP shards beside
    ``state.pt`` (its manifest says ``"weights": "dcp"``) rather than in it."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("weights") == "dcp"
    except (FileNotFoundError, ValueError, AttributeError):
        return False

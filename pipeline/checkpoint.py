"""Training checkpoints that resume rather than restart.

A checkpoint is a directory ``step-NNNNNNNN`` holding ``state.pt`` (model, optimizer, scheduler,
step, RNG state, data position) and ``config.json``. It is written under a temp name and renamed,
so a directory with the final name is complete; ``latest`` ignores anything else. Old checkpoints
are renamed aside before they are deleted, a failed write removes its temp directory, and temp
directories that a killed run left are removed by the next save. States are
loaded with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import DistillError
from pipeline.io import remove_dir, remove_leftovers, removed_if_failed, replace_dir, write_synced

PATTERN = re.compile(r"^step-(\d{8})$")


def save(root: Path, step: int, state: dict[str, Any], config: dict[str, Any], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root, r"step-\d{8}")  # what killed runs left: partial writes hold disk space
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    tmp.mkdir()
    with removed_if_failed(tmp):  # a failed write (a full disk) leaves no temp behind
        # the bytes are on disk before the directory gets its final name
        write_synced(tmp / "state.pt", lambda f: torch.save(state, f))
        write_synced(tmp / "config.json", lambda f: f.write(text.encode()))
        replace_dir(tmp, final)  # a rerun's last checkpoint replaces the same step's: never half of one
    for old in complete(root)[:-keep] if keep > 0 else []:
        remove_dir(old)
    return final


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def resolve(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` = newest complete one (or none), ``never``, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise DistillError(f"--resume {resume}: no checkpoint there (expected {path}/state.pt); "
                           "pass --resume auto or a step-NNNNNNNN directory")
    return path


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    config = json.loads((path / "config.json").read_text())
    return state, config

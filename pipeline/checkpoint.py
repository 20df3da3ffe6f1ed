"""Training checkpoints that resume rather than restart.

A checkpoint is a directory ``step-NNNNNNNN`` holding ``state.pt`` (model, optimizer, scheduler,
step, RNG state, data position) and ``config.json``. It is written under a temp name and renamed,
so a directory with the final name is complete; ``latest`` ignores anything else. States are
loaded with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import DistillError

PATTERN = re.compile(r"^step-(\d{8})$")


def save(root: Path, step: int, state: dict[str, Any], config: dict[str, Any], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the directory gets its final name
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
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

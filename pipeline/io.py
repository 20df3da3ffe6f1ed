"""Small filesystem helpers that keep what is already written intact: write to a temp name, rename;
delete by renaming aside first."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_synced(tmp, lambda f: f.write(data))
    os.replace(tmp, path)


def write_synced(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file with ``write(f)`` and fsync it: its bytes are on disk before anything renames it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    removed only after the new one is in place, so a crash leaves one complete version under a name."""
    final = Path(final)
    if final.exists():
        old = _aside(final)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def remove_dir(path: Path) -> None:
    """Delete a directory without ever showing a half-deleted one under its name: renamed aside, then removed."""
    old = _aside(Path(path))
    os.replace(path, old)
    shutil.rmtree(old)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def remove_leftovers(parent: Path, name: str) -> None:
    """Remove what a killed process left beside ``parent / name``: ``.NAME.tmp[-PID]`` (a write it had
    not finished) and ``.NAME.old-PID`` (a version it had moved aside). ``name`` is a regex."""
    pattern = re.compile(rf"^\.{name}\.(tmp(-\d+)?|old-\d+)$")
    for path in Path(parent).iterdir() if Path(parent).is_dir() else ():
        if pattern.match(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

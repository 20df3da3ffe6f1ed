"""Small filesystem helpers that keep what is already written intact: write to a temp name, rename;
delete by renaming aside first; and the one message for a full disk."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from pipeline.errors import DistillError

# A write that ran out of room, by errno. torch.save raises a RuntimeError from the OSError, and
# safetensors and pyarrow put the errno in their message only, so os.strerror's text is matched too.
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
RERUN = "free space there or choose another --out, then rerun the same command: what was finished is kept"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` with ``write(f)`` (which may stream) under a temp name, fsync, rename: readers
    see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and a random part: two writers of one file (two `distill merge` at once, on two hosts) never
    # share a temp name, so the last rename wins with a whole file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with removed_if_failed(tmp):  # a failed write leaves the old file and no temp beside it
            write_synced(tmp, write)
            os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)  # name what was being written (a write on a full disk names nothing)
        raise


def write_synced(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file with ``write(f)`` and fsync it: its bytes are on disk before anything renames it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def removed_if_failed(tmp: Path) -> Iterator[Path]:
    """Write under the temp path ``tmp`` (a file or a directory) in this block; if it fails (a full
    disk), what it had written is removed and the error passes on."""
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def real_out(path: str | os.PathLike) -> Path:
    """An output path with a symbolic link in its last part replaced by what it points to
    (``runs/store -> /scratch/store``): a directory built beside it and renamed into place then lands
    where the user keeps the data, not in place of the link."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    removed only after the new one is in place, so a crash leaves one complete version under a name.
    ``final`` must not be a link (callers pass :func:`real_out`)."""
    final = Path(final)
    if final.is_symlink():  # a caller's mistake, not the user's: real_out first
        raise ValueError(f"replace_dir: {final} is a symbolic link; resolve it with real_out")
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
    pattern = re.compile(rf"^\.{name}\.(tmp(-\d+(-[0-9a-f]+)?)?|old-\d+)$")
    for path in Path(parent).iterdir() if Path(parent).is_dir() else ():
        if pattern.match(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def disk_full(error: BaseException) -> str | None:
    """"no space left on device" / "disk quota exceeded" when ``error``, or an error it was raised
    from, is a write that found the disk full; else None. A DistillError is never one (it is already
    the message)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen and not isinstance(error, DistillError):
        seen.add(id(error))
        for code, reason in DISK_FULL.items():
            if (isinstance(error, OSError) and error.errno == code) or os.strerror(code) in str(error):
                return reason
        error = error.__cause__ or error.__context__
    return None


def disk_full_message(error: BaseException, path: Path | str | None, todo: str = RERUN) -> str:
    """The one line for a write that found the disk full: what, where (the file the error names, else
    ``path``), how full that filesystem is now, what to do."""
    where = getattr(error, "filename", None) or path
    return f"{disk_full(error)} writing {where or 'the output'}{_space(where)}; {todo}"


@contextlib.contextmanager
def disk_full_is_an_error(path: Path | str | None, todo: str = RERUN) -> Iterator[None]:
    """Turn a write that found the disk full into a DistillError (one line, exit 2); other errors pass."""
    try:
        yield
    except Exception as e:
        if disk_full(e) is None:
            raise
        raise DistillError(disk_full_message(e, path, todo)) from None


def _space(where: Path | str | None) -> str:
    """`` (F free of S)`` for the filesystem holding ``where``, or nothing."""
    path = Path(where) if where else None
    while path is not None and not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except (OSError, TypeError):
        return ""
    return f" ({_size(stat.f_bavail * stat.f_frsize)} free of {_size(stat.f_blocks * stat.f_frsize)})"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


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

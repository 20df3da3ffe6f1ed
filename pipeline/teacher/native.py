"""The fused CPU kernels of stage one (``sparse_teacher.c``): built on first use, cached, loaded with ctypes.

On a CPU, stage one's reductions with torch operations cost a third of a small teacher's forward
pass: ``torch.topk`` copies every row into (value, index) pairs, and each temperature's exp and
sums stream a ``[positions, V]`` buffer through memory. The kernel does top-k (with a
block-maximum prefilter), then exp and the tail sum of every grid temperature, in two passes over
each row while it is in cache. Rows run on torch's own OpenMP pool where the build has OpenMP
(linked by soname, it shares the libgomp torch loaded); otherwise they are split across
``torch.get_num_threads()`` Python threads (ctypes releases the GIL).

The shared library is compiled with the system C compiler (``$CC``, else ``cc``) into
``$DISTILL_CACHE/native`` (default ``~/.cache/distill/native``) under a name hashed from the source,
compiler, flags and CPU, written to a temporary name and renamed, so concurrent jobs never load half a
file. Loading a library runs its constructors, so the directory must be this user's alone (created
0700; owner, mode and links checked, and the file's too), else the fallback ``$TMPDIR/distill-native-<uid>``
under the same checks, else no kernel: a name anyone can predict in a shared ``/tmp`` is never trusted.
This module is the binding alone: it builds and loads, and knows nothing of the torch paths. Each
caller brings the check of the function it uses (:func:`load`): :mod:`pipeline.teacher.topk` and
:mod:`pipeline.teacher.sampling` check the kernel once against their torch path on random logits, so the
choice between the kernel and torch lives with them. Where there is no compiler, the build fails or
the check disagrees, stage one says why once and uses torch operations. ``DISTILL_NATIVE=0`` turns
the kernel off.

The same library holds the sampled-token kernel (:func:`sample_rows`, used by
:mod:`pipeline.teacher.sampling`): per row, inverse-CDF draws in float64 in one walk over the row, on
uniforms computed by Python, so that it and the torch path draw the same ids.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sparse_teacher.c")
FLAGS = ("-O3", "-std=c11", "-ffp-contract=fast", "-fPIC", "-shared", "-fno-math-errno")  # c11 alone turns FMA off
# Tried in order: the first that compiles, loads and passes the check is used.
VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())


@functools.cache
def load(check: Callable[[Kernel], str] | None = None) -> tuple[Kernel | None, str]:
    """(the first build of :data:`VARIANTS` that compiles, loads and passes ``check``, "") or (None, why
    not). ``check(kernel)`` returns "" or what differs; the caller brings it (its torch path is the
    reference), so this binding knows nothing of the torch paths. Cached per check."""
    if os.environ.get("DISTILL_NATIVE", "1") == "0":
        return None, "DISTILL_NATIVE=0"
    errors = []
    for extra in VARIANTS:
        kernel, error = build(FLAGS + extra)
        if kernel is not None and check is not None and (mismatch := check(kernel)):
            kernel, error = None, f"{kernel.path} disagrees with torch ({mismatch})"
        if kernel is not None:
            return kernel, ""
        errors.append(error)
    return None, "; ".join(dict.fromkeys(errors))


@dataclass(frozen=True)
class Kernel:
    function: object  # the ctypes function sparse_teacher_rows
    sample: object  # the ctypes function sample_rows
    openmp: bool  # splits rows itself; else the caller splits them across Python threads
    path: Path


def build(flags: tuple[str, ...]) -> tuple[Kernel | None, str]:
    """The kernel compiled with ``flags`` (cached) and loaded: (kernel, "") or (None, why)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None, "no C compiler found (set CC or install gcc)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {compiler} does not run: {e}"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(),
                                      platform.machine().encode(), _cpu_id().encode()])).hexdigest()[:16]
    directory, error = _cache_dir()
    if directory is None:
        return None, error
    path = directory / f"sparse_teacher-{key}.so"
    if os.path.lexists(path) and _own_file(path):
        try:  # not a file this user wrote: never loaded; compiled afresh in its place
            path.unlink()
        except OSError as e:
            return None, f"refusing to load {_own_file(path)}, and cannot remove it ({e.strerror})"
    if not os.path.lexists(path):
        error = _compile(compiler, flags, path)
        if error:
            return None, error
    if error := _own_file(path):
        return None, f"refusing to load {error}"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"cannot load {path}: {e}"
    function = library.sparse_teacher_rows
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    sample = library.sample_rows
    sample.restype = ctypes.c_int64
    sample.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int64]
    return Kernel(function, sample, bool(library.sparse_teacher_openmp()), path), ""


def _cache_dir() -> tuple[Path | None, str]:
    """Where compiled kernels live: ``$DISTILL_CACHE/native`` (default ``~/.cache/distill/native``),
    else ``$TMPDIR/distill-native-<uid>``; each used only when :func:`_private_dir` finds it ours.
    (None, why) when neither is: the caller then uses torch operations rather than load a library
    another user could have put there."""
    root = os.environ.get("DISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distill")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    problems = []
    for path in (Path(root) / "native", Path(tempfile.gettempdir()) / f"distill-native-{uid}"):
        problem = _private_dir(path)
        if not problem:
            return path, ""
        problems.append(problem)
    return None, "no private directory for the compiled kernel (" + "; ".join(problems) + ")"


def _private_dir(path: Path) -> str:
    """"" when ``path`` is a directory only this user can write (created 0700 when missing), inside a
    parent that no other user can swap it out of; else what is wrong with it. The library loaded from
    it runs its constructors in this process, so a directory another user controls is never used."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        info, parent = os.lstat(path), os.stat(path.parent)
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory" + (" (a symbolic link)" if stat.S_ISLNK(info.st_mode) else "")
    uid = os.getuid() if hasattr(os, "getuid") else info.st_uid
    if info.st_uid != uid:
        return f"{path} belongs to uid {info.st_uid}, not to this user ({uid})"
    if info.st_mode & 0o022:  # ours, made under a lax umask: close it (each library in it is checked too)
        try:
            os.chmod(path, 0o700)
        except OSError as e:
            return f"{path} is writable by other users and cannot be closed ({e.strerror})"
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        return f"{path.parent} is writable by every user without the sticky bit, so {path.name} can be replaced"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return ""


def _own_file(path: Path) -> str:
    """"" when ``path`` is a regular file of this user's that no one else can write; else what it is."""
    info = os.lstat(path)
    uid = os.getuid() if hasattr(os, "getuid") else info.st_uid
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_uid != uid or info.st_mode & 0o022:
        return f"{path} belongs to uid {info.st_uid} or is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return ""


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> str:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp), "-lm"],
                                capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{compiler} failed: {e}"
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (result.stderr.strip().splitlines() or ["no message"])[0]
        return f"{compiler} {' '.join(flags)} failed: {first}"
    os.chmod(tmp, 0o755)  # whatever the umask: a library others could write is never loaded (_own_file)
    os.replace(tmp, path)
    return ""


def _call(kernel: Kernel, logits: torch.Tensor, k: int, inverse_temperatures: torch.Tensor,
          out: tuple[torch.Tensor, ...], rows: slice, threads: int) -> int:
    ids, values, lse, tail = (t[rows] for t in out)
    block = logits[rows]
    return kernel.function(block.data_ptr(), block.shape[0], block.shape[1], block.stride(0), k,
                           inverse_temperatures.data_ptr(), inverse_temperatures.numel(),
                           ids.data_ptr(), values.data_ptr(), lse.data_ptr(), tail.data_ptr(), threads)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="sparse-teacher")


def _run(kernel: Kernel, logits: torch.Tensor, k: int, grid: tuple[float, ...], threads: int):
    rows = logits.shape[0]
    inverse_temperatures = torch.tensor([1.0 / t for t in grid], dtype=torch.float64)
    out = (torch.empty(rows, k, dtype=torch.int64), torch.empty(rows, k, dtype=torch.float32),
           torch.empty(rows, len(grid), dtype=torch.float32), torch.empty(rows, len(grid), dtype=torch.float32))
    if kernel.openmp:
        bad = [_call(kernel, logits, k, inverse_temperatures, out, slice(0, rows), threads)]
    else:
        parts = max(1, min(threads, rows // 16))
        bounds = [rows * i // parts for i in range(parts + 1)]
        slices = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        bad = list(_pool().map(lambda s: _call(kernel, logits, k, inverse_temperatures, out, s, 1), slices))
    if any(b < 0 for b in bad):
        raise MemoryError("sparse_teacher kernel could not allocate its row buffers")
    return (*out, sum(bad))


def describe() -> str:
    """Which build loads, for logs: its file and whether it threads with OpenMP."""
    kernel, why = load()
    return f"unavailable ({why})" if kernel is None else f"{kernel.path} ({'OpenMP' if kernel.openmp else 'Python threads'})"


def available() -> bool:
    return load()[0] is not None


def unavailable_reason() -> str:
    return load()[1]


def sparse_rows(logits: torch.Tensor, k: int, grid: tuple[float, ...], threads: int = 0,
                kernel: Kernel | None = None):
    """Top-k, log-sum-exp and tail log-mass of ``logits [P, V]`` (float32, CPU, unit column stride)
    at each grid temperature. Returns ``topk_ids [P, k]`` int64, ``top_values [P, k]`` (raw logits,
    largest first), ``logsumexp [P, G]``, ``tail_logmass [P, G]`` float32 and the number of rows
    holding NaN or +inf (or only −inf). Rows are split across ``threads`` (default: torch's). ``kernel``:
    a build from :func:`load` (default: the first that loads)."""
    kernel, why = (kernel, "") if kernel is not None else load()
    if kernel is None:
        raise RuntimeError(f"the fused sparse_teacher kernel is unavailable: {why}")
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1:
        logits = logits.float().cpu().contiguous()
    return _run(kernel, logits, k, grid, threads or torch.get_num_threads())


def _run_sample(kernel: Kernel, logits: torch.Tensor, inverse_temperature: float, draws: torch.Tensor,
                exclude: torch.Tensor | None, threads: int):
    rows, n = draws.shape
    ids = torch.empty(rows, n, dtype=torch.int64)
    counts = torch.empty(rows, n, dtype=torch.int32)
    k = 0 if exclude is None else exclude.shape[1]

    def call(part: slice, part_threads: int) -> int:
        block = logits[part]
        return kernel.sample(block.data_ptr(), block.shape[0], block.shape[1], block.stride(0), inverse_temperature,
                             draws[part].data_ptr(), n, None if exclude is None else exclude[part].data_ptr(), k,
                             ids[part].data_ptr(), counts[part].data_ptr(), part_threads)

    if kernel.openmp:
        bad = [call(slice(0, rows), threads)]
    else:
        parts = max(1, min(threads, rows // 16))
        bounds = [rows * i // parts for i in range(parts + 1)]
        bad = list(_pool().map(lambda s: call(s, 1), [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]))
    if any(b < 0 for b in bad):
        raise MemoryError("sample_rows kernel could not allocate its row buffers")
    return ids, counts, sum(bad)


def sample_rows(logits: torch.Tensor, inverse_temperature: float, draws: torch.Tensor,
                exclude: torch.Tensor | None = None, threads: int = 0, kernel: Kernel | None = None):
    """Sampled-token draws from ``logits [P, V]`` (read as float32, CPU) at ``1/T =
    inverse_temperature``, on the uniforms ``draws [P, n]`` float64 in (0, 1), restricted to the ids
    not in ``exclude [P, k]`` int64 where given. Returns ``sample_ids [P, n]`` int64 and
    ``sample_counts [P, n]`` int32 (distinct ids ascending, then id 0 count 0; a row with no residual
    mass has all counts 0), and the number of rows holding NaN or +inf. Rows are split across
    ``threads`` (default: torch's). ``kernel``: a build from :func:`load` (default: the first that loads)."""
    kernel, why = (kernel, "") if kernel is not None else load()
    if kernel is None:
        raise RuntimeError(f"the fused sparse_teacher kernel is unavailable: {why}")
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1:
        logits = logits.float().cpu().contiguous()
    draws = draws.to(dtype=torch.float64, device="cpu").contiguous()
    if exclude is not None:
        exclude = exclude.to(dtype=torch.int64, device="cpu").contiguous()
    return _run_sample(kernel, logits, inverse_temperature, draws, exclude, threads or torch.get_num_threads())


if __name__ == "__main__":  # python -m pipeline.teacher.native: build now and say which path stage one takes
    print("fused kernel:", describe())
    sys.exit(0 if available() else 1)

"""The fused CPU kernels of stage one (``sparse_teacher.c``): built on first use, cached, loaded with ctypes.

On a CPU, stage one's reductions with torch operations cost a third of a small teacher's forward
pass: ``torch.topk`` copies every row into (value, index) pairs, and each temperature's exp and
sums stream a ``[positions, V]`` buffer through memory. The kernel does top-k (with a
block-maximum prefilter), then exp and the tail sum of every grid temperature, in two passes over
each row while it is in cache. Rows run on torch's own OpenMP pool where the build has OpenMP
(linked by soname, it shares the libgomp torch loaded); otherwise they are split across
``torch.get_num_threads()`` Python threads (ctypes releases the GIL).

The shared library is compiled with the system C compiler (``$CC``, else ``cc``) into
``$DISTILL_CACHE`` (default ``~/.cache/distill``) under a name hashed from the source, compiler,
flags and CPU, written to a temporary name and renamed, so concurrent jobs never load half a file.
After loading, the kernel is checked once against the torch path on random logits. Where there is
no compiler, the build fails or the check disagrees, stage one says why once and uses torch
operations. ``DISTILL_NATIVE=0`` turns the kernel off.

The same library holds the sampled-token kernel (:func:`sample_rows`, used by
:mod:`pipeline.sampling`): per row, inverse-CDF draws in float64 in one walk over the row, on
uniforms computed by Python, so that it and the torch path draw the same ids. The load-time check
covers both functions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sparse_teacher.c")
FLAGS = ("-O3", "-std=c11", "-ffp-contract=fast", "-fPIC", "-shared", "-fno-math-errno")  # c11 alone turns FMA off
# Tried in order: the first that compiles, loads and passes the check is used.
VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())


@functools.lru_cache(maxsize=1)
def _library() -> tuple[object | None, str]:
    """(the kernel function, "") or (None, why not)."""
    if os.environ.get("DISTILL_NATIVE", "1") == "0":
        return None, "DISTILL_NATIVE=0"
    errors = []
    for extra in VARIANTS:
        kernel, error = build(FLAGS + extra)
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
    """The kernel compiled with ``flags`` (cached), loaded and checked: (kernel, "") or (None, why)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None, "no C compiler found (set CC or install gcc)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {compiler} does not run: {e}"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(),
                                      platform.machine().encode(), _cpu_id().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"sparse_teacher-{key}.so"
    if not path.exists():
        error = _compile(compiler, flags, path)
        if error:
            return None, error
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
    kernel = Kernel(function, sample, bool(library.sparse_teacher_openmp()), path)
    mismatch = _self_check(kernel) or _self_check_sampling(kernel)
    if mismatch:
        return None, f"{path} disagrees with torch ({mismatch})"
    return kernel, ""


def _cache_dir() -> Path:
    root = os.environ.get("DISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distill")
    path = Path(root) / "native"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"distill-native-{os.getuid() if hasattr(os, 'getuid') else 0}"
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def _self_check(kernel: Kernel) -> str:
    from pipeline.topk import torch_sparse_teacher

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 1000, generator=generator) * 4
    logits[3, :] = 1.5  # all tied
    logits[5, 100:] = float("-inf")
    grid = (1.0, 2.0, 0.5)
    ids, values, lse, tail, bad = _run(kernel, logits, 64, grid, threads=2)
    reference = torch_sparse_teacher(logits, 64, grid)
    if bad:
        return f"{bad} finite rows reported as non-finite"
    if not torch.equal(values, reference["top_values"]):
        return "top-k values differ"
    if not torch.equal(ids[torch.arange(37) != 3], reference["topk_ids"][torch.arange(37) != 3]):
        return "top-k ids differ"
    if not torch.allclose(lse, reference["logsumexp"], rtol=1e-5, atol=1e-5):
        return "log-sum-exp differs"
    finite = torch.isfinite(reference["tail_logmass"])
    if not torch.equal(finite, torch.isfinite(tail)) or not torch.allclose(
            tail[finite], reference["tail_logmass"][finite], rtol=1e-4, atol=1e-4):
        return "tail mass differs"
    return ""


def _self_check_sampling(kernel: Kernel) -> str:
    from pipeline.sampling import torch_sample_teacher, uniforms

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 1000, generator=generator) * 4
    logits[5, 100:] = float("-inf")
    logits[6, :] = 1.5  # all tied
    exclude = torch.topk(logits, 8, dim=-1).indices
    exclude[7] = torch.arange(992, 1000)
    logits[7, :992] = float("-inf")  # nothing outside the excluded ids
    draws = uniforms(torch.arange(37, dtype=torch.int64) * 7919, 50)
    for temperature, excluded in ((1.0, None), (0.7, exclude), (2.0, exclude)):
        ids, counts, bad = _run_sample(kernel, logits, 1.0 / temperature, draws, excluded, threads=2)
        reference = torch_sample_teacher(logits, 1.0 / temperature, draws, excluded)
        if bad:
            return f"sampling: {bad} finite rows reported as non-finite"
        if not (torch.equal(ids, reference["sample_ids"]) and torch.equal(counts, reference["sample_counts"])):
            return f"sampled ids or counts differ at T = {temperature}"
    return ""


def describe() -> str:
    """Which build is in use, for logs: its file and whether it threads with OpenMP."""
    kernel, why = _library()
    return f"unavailable ({why})" if kernel is None else f"{kernel.path} ({'OpenMP' if kernel.openmp else 'Python threads'})"


def available() -> bool:
    return _library()[0] is not None


def unavailable_reason() -> str:
    return _library()[1]


def sparse_rows(logits: torch.Tensor, k: int, grid: tuple[float, ...], threads: int = 0):
    """Top-k, log-sum-exp and tail log-mass of ``logits [P, V]`` (float32, CPU, unit column stride)
    at each grid temperature. Returns ``topk_ids [P, k]`` int64, ``top_values [P, k]`` (raw logits,
    largest first), ``logsumexp [P, G]``, ``tail_logmass [P, G]`` float32 and the number of rows
    holding NaN or +inf (or only −inf). Rows are split across ``threads`` (default: torch's)."""
    kernel, why = _library()
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
                exclude: torch.Tensor | None = None, threads: int = 0):
    """Sampled-token draws from ``logits [P, V]`` (read as float32, CPU) at ``1/T =
    inverse_temperature``, on the uniforms ``draws [P, n]`` float64 in (0, 1), restricted to the ids
    not in ``exclude [P, k]`` int64 where given. Returns ``sample_ids [P, n]`` int64 and
    ``sample_counts [P, n]`` int32 (distinct ids ascending, then id 0 count 0; a row with no residual
    mass has all counts 0), and the number of rows holding NaN or +inf. Rows are split across
    ``threads`` (default: torch's)."""
    kernel, why = _library()
    if kernel is None:
        raise RuntimeError(f"the fused sparse_teacher kernel is unavailable: {why}")
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1:
        logits = logits.float().cpu().contiguous()
    draws = draws.to(dtype=torch.float64, device="cpu").contiguous()
    if exclude is not None:
        exclude = exclude.to(dtype=torch.int64, device="cpu").contiguous()
    return _run_sample(kernel, logits, inverse_temperature, draws, exclude, threads or torch.get_num_threads())


if __name__ == "__main__":  # python -m pipeline.native: build now and say which path stage one takes
    print("fused kernel:", describe())
    sys.exit(0 if available() else 1)

"""A fork server for the tests' ``distill`` subprocesses: one Python process a pytest worker starts
once, which imports torch, transformers and the project (about 5 s of CPU that every fresh
``python -m stages.cli`` pays) and then forks a child for each run. The child does what a fresh
``python -m stages.cli ARGS`` does from there on, in a session of its own, with the caller's
environment, working directory and output pipe: ``stages.cli`` runs as ``__main__`` (so
``catch_early`` and the whole CLI run as they do in a fresh interpreter), exit status, uncaught
exceptions, ``atexit`` and signals as Python's own. Only the imports are warm.

What a fresh interpreter alone can show stays on real launches (:func:`tests.conftest.spawn` with
``fresh=True``, torchrun, batch scripts): a signal while torch is being imported, the console
script, a launcher's signal handling. A run whose environment differs from the server's in a
variable read at import time (torch's, Hugging Face's, Triton's, threads) is launched fresh too.

The server must stay single-threaded (a fork copies only the forking thread): it checks
``/proc/self/task`` before each fork and refuses, and the caller then launches fresh.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# environment variables a library reads when it is imported: a run that sets one differently from
# the server's environment is launched fresh
IMPORT_TIME = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "TRITON", "OMP_", "MKL_", "CUDA",
               "TOKENIZERS", "PYTHON", "LD_", "NUMEXPR", "OPENBLAS")

# (and every module in stages/ but the CLI itself, which each child runs as __main__, as `python -m` does)
PRELOAD = ("torch", "numpy", "transformers", "transformers.modeling_utils", "transformers.models.llama.modeling_llama",
           "transformers.models.gemma2.modeling_gemma2", "tokenizers", "zarr", "typer", "rich", "tqdm",
           "pipeline.preempt")

# ... except these, which torch sets in the process's environment once it compiles (an in-process
# test's torch.compile) and reads only then
SET_AT_RUNTIME = frozenset({"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"})

MESSAGE = 1 << 20


# ---------------------------------------------------------------------- the server


def _readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` can be read within ``timeout`` s (None: wait for ever); poll, not select, which
    refuses descriptors past 1023."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _exit_code(e: SystemExit) -> int:
    """What Python's own exit makes of ``SystemExit(code)``."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def _child(request: dict, out: int, ready: int) -> None:
    """Become ``python -m stages.cli ARGS`` in the caller's session, directory and environment (then
    say so on ``ready``: the caller gets the pid once that is done, as Popen returns after exec); never
    returns."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.write(ready, b"1")
        os.close(ready)
        if "numpy" in sys.modules:  # a fresh interpreter seeds numpy's global generator from the OS
            sys.modules["numpy"].random.seed()
        import runpy

        sys.argv = ["-m", *request["args"]]
        try:
            runpy.run_module("stages.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except KeyboardInterrupt:  # as Python does: die of SIGINT
            threading._shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - anything at all: the child must not return into the server
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code)


def serve(sock: socket.socket) -> None:
    """Fork a child per request; report each child's wait status when it ends; exit when the caller goes."""
    import gc

    import pkgutil

    import stages

    for name in PRELOAD:
        __import__(name)
    for stage in pkgutil.iter_modules(stages.__path__):
        if stage.name not in ("cli", "entry"):
            __import__(f"stages.{stage.name}")
    gc.collect()
    gc.freeze()  # the collector would otherwise walk (and so copy) every preloaded page in each child
    children: set[int] = set()
    sock.send(json.dumps({"ready": True, "threads": _threads()}).encode())
    while True:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            sock.send(json.dumps({"exit": pid, "status": status}).encode())
        if not _readable(sock.fileno(), 0.01):
            continue
        data, fds, _, _ = socket.recv_fds(sock, MESSAGE, 1)
        if not data:
            return
        request = json.loads(data)
        if _threads() != 1:
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"refused": f"{_threads()} threads"}).encode())
            continue
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            sock.close()
            os.close(ready_read)
            _child(request, fds[0], ready_write)
        os.close(fds[0])
        os.close(ready_write)
        os.read(ready_read, 1)  # empty if the child failed before: its exit is reported as any other
        os.close(ready_read)
        children.add(pid)
        sock.send(json.dumps({"pid": pid}).encode())


# ---------------------------------------------------------------------- the caller's side


class ForkedProcess:
    """The parts of :class:`subprocess.Popen` the tests use, for a child of the server: ``pid``,
    ``stdout`` (text), ``poll``, ``wait``, ``communicate``, ``send_signal``, ``kill``, ``terminate``,
    ``returncode`` (negative for a signal, as Popen's)."""

    def __init__(self, server: "Server", pid: int, stdout, args: list[str]):
        self.server, self.pid, self.stdout, self.args = server, pid, stdout, args
        self.returncode: int | None = None
        self._output: list[bytes] = []

    def poll(self) -> int | None:
        if self.returncode is None:
            status = self.server.status(self.pid, timeout=0)
            if status is not None:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            status = self.server.status(self.pid, timeout=timeout)
            if status is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def communicate(self, input=None, timeout: float | None = None):
        assert input is None, "the tests' runs read nothing"
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.stdout is not None and not self.stdout.closed:
            fd = self.stdout.fileno()
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not _readable(fd, left):
                    raise subprocess.TimeoutExpired(self.args, timeout, output=self._text())
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                self._output.append(chunk)
            self.stdout.close()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        return self._text(), None

    def _text(self) -> str:
        return b"".join(self._output).decode(errors="replace")

    def drain(self) -> None:
        """Read what the run has written so far (a rank left unread would block on a full pipe)."""
        if self.stdout is not None and not self.stdout.closed:
            fd = self.stdout.fileno()
            while _readable(fd, 0):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.stdout.close()
                    break
                self._output.append(chunk)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def rank_env(env: dict[str, str], rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun (torch.distributed.run, one node, ``--nproc_per_node world``) puts in a worker's
    environment, with the rendezvous on rank 0's own store (no agent to host one)."""
    return env | {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank), "ROLE_NAME": "default",
        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "PYTHONUNBUFFERED": "1"}


RANK_VARIABLES = frozenset(rank_env({}, 0, 1, 0))


class ForkedRanks:
    """A run of ``world`` ranks forked from the server, as torchrun's workers (Popen's parts the
    tests use): ``returncode`` is the first failed rank's, else 0; a rank that fails ends the others
    (SIGKILL), as torchrun's agent does; ``communicate`` gives every rank's output, rank by rank."""

    def __init__(self, ranks: list[ForkedProcess]):
        self.ranks = ranks
        self.pid = ranks[0].pid
        self.returncode: int | None = None

    def _settle(self) -> None:
        codes = [r.poll() for r in self.ranks]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for rank, code in zip(self.ranks, codes):
                if code is None:
                    rank.kill()
            self.returncode = failed[0]
        elif all(c == 0 for c in codes):
            self.returncode = 0

    def poll(self) -> int | None:
        if self.returncode is None:
            self._settle()
        return self.returncode

    def communicate(self, input=None, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("ranks", timeout)
            for rank in self.ranks:
                rank.drain()
            time.sleep(0.02)
        outputs = [rank.communicate(timeout=60)[0] for rank in self.ranks]
        self._settle()
        return "".join(outputs), None

    def wait(self, timeout: float | None = None) -> int:
        self.communicate(timeout=timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        for rank in self.ranks:
            rank.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Server:
    """The caller's handle on one fork server (one a pytest worker, started on first use)."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.env = dict(env)
        self.lock = threading.Lock()
        self.statuses: dict[int, int] = {}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import socket, sys; from tests.forkserver import serve; "
             "serve(socket.socket(fileno=int(sys.argv[1])))", str(theirs.fileno())],
            env=self.env, cwd=root, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.sock = ours
        ready = self._receive(timeout=300)
        if not ready or not ready.get("ready"):
            raise RuntimeError(f"the fork server did not start: {ready}")
        self.usable = ready["threads"] == 1

    def _receive(self, timeout: float | None) -> dict | None:
        """One message from the server (exit reports are kept in ``statuses``); None on timeout."""
        if not _readable(self.sock.fileno(), timeout):
            return None
        data = self.sock.recv(MESSAGE)
        if not data:
            raise RuntimeError("the fork server ended")
        message = json.loads(data)
        if "exit" in message:
            self.statuses[message["exit"]] = message["status"]
        return message

    def launchable(self, env: dict[str, str], runtime: frozenset[str] = frozenset()) -> bool:
        """Whether a run in ``env`` may be forked: no import-time variable differs from the server's
        (``runtime``: names read only once the run is under way, such as torchrun's)."""
        if not self.usable or self.process.poll() is not None:
            return False
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)} - runtime - SET_AT_RUNTIME
        return not any(k.upper().startswith(IMPORT_TIME) for k in changed)

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path) -> ForkedProcess | None:
        """Fork ``python -m stages.cli ARGS``; None where the server refuses (then launch fresh)."""
        read, write = os.pipe()
        with self.lock:
            try:
                request = json.dumps({"args": args, "env": env, "cwd": str(cwd)}).encode()
                socket.send_fds(self.sock, [request], [write])
            finally:
                os.close(write)
            while True:
                message = self._receive(timeout=60)
                if message is None:
                    os.close(read)
                    raise RuntimeError("the fork server did not answer in 60 s")
                if "pid" in message:
                    return ForkedProcess(self, message["pid"], os.fdopen(read, "r", errors="replace"), args)
                if "refused" in message:
                    os.close(read)
                    self.usable = False
                    return None

    def status(self, pid: int, timeout: float | None) -> int | None:
        """``pid``'s wait status once it has ended, waiting up to ``timeout`` s (None: for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while pid not in self.statuses:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    # one look without waiting, so that poll() sees a report already sent
                    if self._receive(timeout=0) is None:
                        return None
                    continue
                self._receive(timeout=left)
            return self.statuses[pid]

    def close(self) -> None:
        self.sock.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

"""Pre-emption: stop at a clean point when the batch system says the job is about to be killed.

A cluster warns before it kills: SLURM sends ``SIGUSR1`` (``#SBATCH --signal=USR1@120``) a while
before the time limit or a pre-emption, and ``SIGTERM`` on ``scancel`` (KillWait, 30 s by
default, before ``SIGKILL``). :class:`Preemption` handles both for the length of a run: its handler
only records which signal came (a Python handler runs between bytecodes of the main thread, so this
is all it may safely do), and the stage looks at it where stopping leaves whole results — stage two
after an optimizer step, stage one after (or, on request, instead of) a shard. The stage then writes
what a rerun needs and leaves with :data:`EXIT_PREEMPTED` and one line on stderr: not an error, the
job is to be run again.

The handler is installed explicitly, whatever the process inherited: a worker that ``torchrun``
started after ``trap "" USR1`` (so that torchrun itself ignores the warning) starts with SIGUSR1
ignored and must still take it. The previous handlers come back when the run ends, so a run inside a
longer-lived process (the tests) leaves that process as it found it.

From the first instruction: importing torch and transformers and loading a model take seconds to
minutes, and a signal then, with its default action, would end the process — a lost job instead of a
requeued one. So the CLI's entry points (the ``distill`` script, ``python -m stages.cli``) call
:func:`catch_early` before importing anything heavy. Its handler, like :class:`Preemption`'s, only
records. There is still one mechanism: a stage that takes the signals (:func:`takes_signals`; stage
one and stage two) gets what was recorded when its :class:`Preemption` is entered and honours it at
its first safe point (stage two: right after setup, writing ``preempted.json``); for any other stage
:func:`start_stage` puts the process's own handlers back as it starts, and a signal recorded before
then ends the process with :data:`EXIT_PREEMPTED` before the stage has written anything.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterable, Sequence

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again later
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_before_early: dict[int, object] | None = None  # the handlers catch_early() replaced, until a stage takes over
_early_received: set[int] = set()


def _record_early(signum, frame) -> None:
    _early_received.add(signum)


def catch_early() -> None:
    """Record :data:`SIGNALS` from now on instead of dying of them (the CLI's first instruction)."""
    global _before_early
    if _before_early is not None or threading.current_thread() is not threading.main_thread():
        return
    before = {}
    for sig in SIGNALS:
        previous = signal.getsignal(sig)
        signal.signal(sig, _record_early)  # a USR1 ignored under `trap "" USR1` is taken too, as Preemption does
        before[sig] = signal.SIG_DFL if previous is None else previous
    _before_early = before


def _take_early() -> tuple[set[int], dict[int, object]]:
    """(signals recorded since :func:`catch_early`, the handlers it replaced); the early part ends."""
    global _before_early
    before, _before_early = _before_early or {}, None
    received = set(_early_received)
    _early_received.clear()
    return received, before


def takes_signals(run):
    """Mark a stage function that handles :data:`SIGNALS` itself (it runs inside a :class:`Preemption`)."""
    run.takes_preemption_signals = True
    return run


def start_stage(run, name: str) -> None:
    """The CLI, as it starts the stage function ``run`` (command ``name``). A stage that takes the
    signals finds any that came early when its :class:`Preemption` begins. For any other, the
    handlers from before :func:`catch_early` come back, and a signal that came early (and that they
    would not have ignored) ends the process now with :data:`EXIT_PREEMPTED`: the stage has not
    begun, so nothing is written."""
    if _before_early is None or getattr(run, "takes_preemption_signals", False):
        return
    for sig, handler in _before_early.items():  # first: a signal from here on meets the process's own handler
        signal.signal(sig, handler)
    received, before = _take_early()
    pending = [sig for sig in SIGNALS if sig in received and before.get(sig) is not signal.SIG_IGN]
    if pending:
        leave(f"distill: preempted by {signal.Signals(pending[0]).name} before {name} began; nothing was written; "
              "rerun the same command")


class Preemption:
    """``with Preemption() as preemption:`` handles :data:`SIGNALS` until the block ends.

    ``flags()`` is one number per signal (1 where this process got it) for a stage to all-reduce
    with what it all-reduces anyway, so that every rank stops after the same step even when only
    one was signalled; :func:`signal_name` reads the sums. Outside the block (or off the main
    thread, where Python cannot install handlers) nothing is ever received."""

    def __init__(self, signals: Sequence[signal.Signals] = SIGNALS):
        self.signals = tuple(signals)
        self.received: set[int] = set()
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received.add(signum)  # one atomic step: the interrupted code goes on untouched

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous = signal.getsignal(sig)  # SIG_IGN under `trap "" USR1`: replaced all the same
                signal.signal(sig, self._handle)
                self._previous[sig] = signal.SIG_DFL if previous is None else previous  # None: set outside Python
            # after ours is in place, so none falls between: what came since the process started, and
            # the handlers from before catch_early() to put back at the end
            received, before = _take_early()
            self.received |= received & set(self.signals)
            self._previous |= {sig: handler for sig, handler in before.items() if sig in self._previous}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def flags(self) -> list[float]:
        """1.0 for each of ``signals`` this process has received, else 0.0 (in ``signals`` order)."""
        return [1.0 if sig in self.received else 0.0 for sig in self.signals]

    def signal_name(self, counts: Iterable[float]) -> str | None:
        """The first signal with a non-zero count in (summed) :meth:`flags`, as ``SIGUSR1``; None if none."""
        for sig, count in zip(self.signals, counts):
            if float(count) > 0:
                return signal.Signals(sig).name
        return None

    def agreed(self, world: int = 1) -> str | None:
        """Whether any rank was signalled (a collective when ``world > 1``: every rank calls it at
        the same point); the signal's name or None."""
        if world == 1:
            return self.signal_name(self.flags())
        import torch
        import torch.distributed as dist

        counts = torch.tensor(self.flags(), dtype=torch.float64)
        dist.all_reduce(counts)
        return self.signal_name(counts.tolist())


@contextlib.contextmanager
def held_back():
    """The pre-emption signals blocked in this thread for the block; they arrive when it ends. A
    process started inside inherits the mask (across exec), so a helper process that never unblocks
    them — multiprocessing's resource tracker, which ignores SIGTERM but not SIGUSR1 — outlives the
    warning that a batch system sends to every process of the job."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave(line: str | None, world: int = 1):
    """Print ``line`` (if any) on stderr and end the process with :data:`EXIT_PREEMPTED`.

    One process: ``SystemExit``, so ``finally`` blocks and context managers run (the handlers are
    restored; an in-process caller gets the status). Under torchrun (``world > 1``, after the ranks'
    last barrier) ``os._exit``: torchrun sends SIGTERM to every worker as soon as one has exited,
    and a worker still tearing down its interpreter then would die of it instead of reporting 75."""
    if line:
        print(line, file=sys.stderr, flush=True)
    if world > 1:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)
    raise SystemExit(EXIT_PREEMPTED)

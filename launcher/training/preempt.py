"""Preemption: a signal asks for a checkpoint at the next optimizer step, agreed by all ranks.

The handler only sets a flag. The training loop adds the flag into the all-reduce it already does
for every micro-batch, so all ranks see the request at the same step, finish that optimizer step,
save one checkpoint together and exit with PREEMPTED_EXIT; the SLURM script then requeues the job.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys

# EX_TEMPFAIL: "try again later" — the run stopped early on purpose and can be resumed.
PREEMPTED_EXIT = 75


class Preemption:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.requested = False
        self.signal_name: str | None = None
        # srun delivers a signal to every process of the step, so forked DataLoader workers, which
        # inherit this handler, get it too; only the rank that installed it acts and reports.
        self._pid = os.getpid()
        self._signals = signals
        for sig in signals:
            signal.signal(sig, self._handle)
        # Python puts SIG_DFL back while it shuts down, so a repeated notice arriving after the ranks
        # have saved and returned would still kill them (exit 138 instead of 75). Done is done: ignore.
        atexit.register(self._ignore)

    def _ignore(self) -> None:
        if os.getpid() == self._pid:
            for sig in self._signals:
                signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            print(f"[preempt] {self.signal_name} received: checkpoint at the next optimizer step", file=sys.stderr,
                  flush=True)
        self.requested = True

    @contextlib.contextmanager
    def deferred(self):
        """Hold the signals back (they stay pending, then reach the handler) while child processes run.

        The signal mask survives fork and exec, so a compiler that DeepSpeed starts here (its JIT op,
        ~1 min when cold) is not killed by a notice that srun sends to every process of the step.
        """
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

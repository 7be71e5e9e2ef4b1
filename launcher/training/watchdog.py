"""A rank that stops making progress ends the whole job within a bound, and the job says which rank it was.

A rank stuck in I/O (a dead NFS mount, a stalled data read), stopped (SIGSTOP, a debugger) or wedged
otherwise does not die, so nothing ends the job: its peers wait in their next collective until the
collective timeout (COLLECTIVE_TIMEOUT_S, 1800 s, kept that long for rank 0's corpus validation at start)
and then fail with an error that names no rank. Meanwhile the allocation burns.

Each rank runs one daemon thread. The training loop calls `beat` after every micro-batch (three attribute
writes, no I/O); the thread publishes the rank's progress (a beat count, where it is, a wall-clock time)
to the job's rendezvous store (TCP to MASTER_ADDR:MASTER_PORT, no shared file system involved) every
`period_s`. When its own rank has made no progress for longer than the budget, the thread reads every
rank's record and names the ones that stopped: no record for `3 × period_s` (the process is stopped,
dead or unreachable) or fewer beats than the others (stuck while they wait for it). It prints that with
where this rank's main thread waits, rank 0 adds it to metrics.jsonl, and the rank exits with
HANG_EXIT. Every waiting rank does so; the launcher (deepspeed, torchrun) then stops the others, srun
ends the step after its `--wait` (slurm/train_48k.sbatch: 60 s), and the batch script does not requeue.

The budget is `train.step_timeout_s` (default 300 s: two orders of magnitude above a slow micro-batch,
a sixth of the collective timeout) between micro-batches once the run is warm. Phases that may
legitimately take long without a beat get `train.slow_phase_timeout_s` (default 1500 s, still below the
collective timeout so that the named verdict comes first): the start after the data set-up (checking the
checkpoints, building the engine, loading a checkpoint), the first optimizer step after a (re)start
(compilation, autotuning, allocator warm-up), checkpoint saves, validation and the whole epoch end
(where the next epoch's loader also starts). A data-loading stall longer than the step budget is a
hang like any other: the stalled rank is the one named, and its message shows it waiting for data.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

HANG_EXIT = 1
_KEY = "mf2_watchdog/rank{}"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep  # the repository


class Watchdog:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, step_timeout_s: float,
                 slow_timeout_s: float, record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.rank, self.world = rank, world_size
        self.addr, self.port = master_addr, master_port
        self.step_timeout_s, self.slow_timeout_s = step_timeout_s, slow_timeout_s
        self.period_s = min(30.0, max(1.0, step_timeout_s / 10))
        self.record = record
        self.beats = 0
        self.where = "start"
        self.step = 0
        self.slow_phase = True
        self.last = time.monotonic()
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mf2-watchdog", daemon=True)

    # ---- called by the training loop (main thread): no I/O, no locks ----
    def beat(self, where: str, step: int) -> None:
        """Progress: the budget's clock starts again."""
        self.where, self.step = where, step
        self.beats += 1
        self.last = time.monotonic()

    def slow(self, where: str, step: int) -> None:
        """Progress, and the slow budget until `fast`: a phase that may take long without beats begins."""
        self.slow_phase = True
        self.beat(where, step)

    def fast(self) -> None:
        """Back to the step budget (an optimizer step finished)."""
        self.slow_phase = False
        self.last = time.monotonic()

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ---- the thread ----
    def _budget(self) -> tuple[float, str]:
        if self.slow_phase:
            return self.slow_timeout_s, "train.slow_phase_timeout_s"
        return self.step_timeout_s, "train.step_timeout_s"

    def _run(self) -> None:
        store = None
        while True:
            try:
                if store is None:
                    store = self._connect()
                store.set(_KEY.format(self.rank), json.dumps(self._state()))
            except Exception:  # the store's host may be the stalled one: the verdict then says so
                store = None
            if self._stop.wait(self.period_s):
                return
            stalled_s = time.monotonic() - self.last
            budget, key = self._budget()
            if stalled_s > budget:
                self._end_job(store, stalled_s, budget, key)
                return

    def _connect(self):
        import torch.distributed as dist

        return dist.TCPStore(self.addr, self.port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=self._store_timeout_s()))

    def _state(self) -> dict[str, Any]:
        return {"time": time.time(), "beats": self.beats, "where": self.where, "step": self.step,
                "host": socket.gethostname(), "pid": os.getpid()}

    def _peers(self, store) -> dict[int, dict[str, Any]] | None:
        """Every rank's last record; None when the store does not answer.

        A store whose host process is stopped (SIGSTOP, a wedged node) still accepts the connection and the request,
        and never replies: TCPStore.get then blocks far past its own timeout (torch 2.x: over 100 s with a 5 s
        timeout). So the query runs in a thread of its own, and the verdict does not wait for it beyond that timeout.
        """
        answer: list[dict[int, dict[str, Any]] | None] = [None]

        def query() -> None:
            try:
                client = store or self._connect()
                keys = [_KEY.format(r) for r in range(self.world)]
                answer[0] = {r: json.loads(client.get(k)) for r, k in enumerate(keys) if client.check([k])}
            except Exception:
                pass

        thread = threading.Thread(target=query, name="mf2-watchdog-peers", daemon=True)
        thread.start()
        thread.join(self._store_timeout_s() + 1.0)
        return answer[0]

    def _store_timeout_s(self) -> float:
        return max(5.0, self.period_s)

    def verdict(self, peers: dict[int, dict[str, Any]] | None) -> tuple[list[int], str]:
        """(ranks that stopped making progress, why), from every rank's last published record."""
        if peers is None:
            return [0], (f"the job's rendezvous store at {self.addr}:{self.port} does not answer; under the deepspeed "
                         "launcher or srun rank 0 hosts it, so rank 0 (or its node) has most likely stopped")
        now = time.time()
        peers[self.rank] = self._state()
        stale_after = 3 * self.period_s
        stale = {r: s for r, s in peers.items() if now - s["time"] > stale_after}
        missing = [r for r in range(self.world) if r not in peers]
        fresh = {r: s for r, s in peers.items() if r not in stale}
        ahead = max((s["beats"] for s in fresh.values()), default=0)
        behind = {r: s for r, s in fresh.items() if s["beats"] < ahead}
        reasons = []
        for r, s in sorted(stale.items()):
            reasons.append(f"rank {r} (host {s['host']}, pid {s['pid']}) stopped making progress: no heartbeat for "
                           f"{now - s['time']:.0f} s, last at {s['where']} step {s['step']}; it is stopped, dead or "
                           "unreachable")
        for r, s in sorted(behind.items()):
            reasons.append(f"rank {r} (host {s['host']}, pid {s['pid']}) stopped making progress at {s['where']} "
                           f"step {s['step']} ({ahead - s['beats']} beat(s) behind the others, which wait for it)")
        for r in missing:
            reasons.append(f"rank {r} stopped making progress before it ever reported")
        culprits = sorted([*stale, *behind, *missing])
        if not culprits:
            return [], ("no single rank is behind: every rank waits at the same point (a deadlock, or a stall that "
                        "all share, such as the file system or the network)")
        return culprits, "; ".join(reasons)

    def _main_thread_at(self) -> str:
        frame = sys._current_frames().get(self._main)
        if frame is None:
            return "unknown"
        stack = traceback.extract_stack(frame)
        where = f"{stack[-1].name} ({os.path.basename(stack[-1].filename)}:{stack[-1].lineno})"
        # The innermost frame of this project says what the rank was doing (waiting for data, in a collective...).
        ours = [f for f in stack if f.filename.startswith(_ROOT)]
        if ours and ours[-1] is not stack[-1]:
            where += f", called from {os.path.relpath(ours[-1].filename, _ROOT)}:{ours[-1].lineno} {ours[-1].name}"
        return where

    def _end_job(self, store, stalled_s: float, budget: float, key: str) -> None:
        culprits, why = self.verdict(self._peers(store))
        message = (f"[watchdog] rank {self.rank}: no progress for {stalled_s:.0f} s at {self.where} step {self.step} "
                   f"(limit {key} = {budget:g} s; its main thread is in {self._main_thread_at()}). {why}. Ending "
                   f"this rank with exit {HANG_EXIT} so that the job ends now, not at the collective timeout.")
        print(message, file=sys.stderr, flush=True)
        if self.record is not None:
            done = threading.Event()

            def write() -> None:
                try:
                    self.record({"kind": "hang", "rank": self.rank, "culprits": culprits, "stalled_s": stalled_s,
                                 "where": self.where, "step": self.step, "message": message})
                finally:
                    done.set()

            # The run directory may be the stalled file system: never wait on it for long.
            threading.Thread(target=write, daemon=True).start()
            done.wait(5.0)
        sys.stdout.flush()
        os._exit(HANG_EXIT)

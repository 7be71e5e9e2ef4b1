"""What rank 0 shows and records: a rich progress bar, the reference's log line, JSONL, TensorBoard.

Every other rank gets a `NullMetrics`, so the training loop never branches on the rank to log. `TrainLog`
decides when a training record is due (`train.log_interval_steps`) and what it holds.
"""

from __future__ import annotations

import errno
import json
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.training.state import Counters, StepResult


class NullMetrics:
    def start_epoch(self, epoch: int, total_micro: int, done_micro: int = 0) -> None: ...
    def micro(self) -> None: ...
    def seconds_per_batch(self) -> float:
        return math.nan
    def log(self, record: dict[str, Any], line: str | None = None) -> None: ...
    def print(self, text: str) -> None: ...
    def close(self) -> None: ...


def _warn(text: str) -> None:
    """A warning on stderr that cannot itself stop training (stderr may be a file on the disk that is full)."""
    try:
        print(f"[metrics] {text}", file=sys.stderr, flush=True)
    except OSError:
        pass


class RecordFile:
    """metrics.jsonl, appended one whole line at a time.

    A write that fails (a full disk or quota, a network file system away) must not end a run that could still save
    its next checkpoint, nor leave a torn line: the records stay in memory, in order, the part of a line already
    written included, and go out with the next write that succeeds. Beyond MAX_HELD held records, new ones are
    counted and dropped. One warning when writing stops and one when it works again.
    """

    MAX_HELD = 100_000  # about 30 MB of records

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "ab", buffering=0)  # unbuffered: a partial write is known to the byte
        self.held: deque[bytes] = deque()
        self.dropped = 0
        self.failing: OSError | None = None
        self.lock = threading.Lock()  # the watchdog's thread writes its verdict while the main thread may log

    def write(self, line: str) -> None:
        with self.lock:
            if len(self.held) >= self.MAX_HELD:
                self.dropped += 1
            else:
                self.held.append(line.encode())
            self._flush()

    def _flush(self) -> bool:
        """Write what is held; False if some of it still could not be written."""
        held_before = len(self.held)
        while self.held:
            try:
                n = self.file.write(self.held[0])
                if not n:
                    raise OSError(errno.ENOSPC, "no byte written")
            except OSError as e:
                self._failed(e)
                return False
            if n < len(self.held[0]):
                self.held[0] = self.held[0][n:]
            else:
                self.held.popleft()
        if self.failing is not None:
            _warn(f"{self.path}: writing again; {held_before} held records written"
                  + (f", {self.dropped} beyond {self.MAX_HELD} were lost" if self.dropped else ""))
            self.failing, self.dropped = None, 0
        return True

    def _failed(self, error: OSError) -> None:
        if self.failing is None:
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            _warn(f"{self.path}: a write failed{' (the disk or a quota is full)' if full else ''}: {error}. Training "
                  f"goes on; records are held in memory (up to {self.MAX_HELD}) and written once space returns.")
        self.failing = error

    def close(self) -> None:
        with self.lock:
            if not self._flush():
                _warn(f"{self.path}: {len(self.held) + self.dropped} records could not be written: {self.failing}")
            self.file.close()


class Metrics(NullMetrics):
    def __init__(self, run_dir: Path, max_epoch: int, progress_bar: bool = True) -> None:
        from rich.console import Console

        self.console = Console(stderr=False, highlight=False)
        self.max_epoch = max_epoch
        self.jsonl = RecordFile(run_dir / "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; stay usable without it
            self.tb = None
        # A live bar only on a terminal; in logs (SLURM, CI) the interval lines carry the same numbers.
        self.progress = None
        if progress_bar and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=self.console,
            )
            self.progress.start()
        self.task = None
        self.epoch_t0 = time.perf_counter()
        self.epoch_batches = 0

    def start_epoch(self, epoch: int, total_micro: int, done_micro: int = 0) -> None:
        self.epoch_t0 = time.perf_counter()
        self.epoch_batches = 0
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=total_micro, completed=done_micro,
                                               epoch=f"{epoch + 1}/{self.max_epoch}", stats="")

    def micro(self) -> None:
        self.epoch_batches += 1
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)

    def seconds_per_batch(self) -> float:
        """Running average since the epoch started, as the reference prints it."""
        return (time.perf_counter() - self.epoch_t0) / max(1, self.epoch_batches)

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        record = {"time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        # The sample ledger's records (launcher/training/ledger.py) are evidence for the JSONL, not curves.
        if self.tb is not None and "step" in record and record.get("kind") not in ("samples", "attempt"):
            try:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key not in ("step", "time", "epoch"):
                        self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])
            except OSError as e:  # its writer thread's failure (a full disk), raised here
                self._tensorboard_off(e)
        if line:
            self.print(line)
        if self.progress is not None and self.task is not None and record.get("kind") == "train":
            self.progress.update(self.task, stats=(
                f"loss {record['loss']:.4f} | {record['s_per_batch']:.3f}s/batch | "
                f"{record['samples_per_s']:.1f} samples/s | {record['audio_s_per_s_per_gpu']:.1f} audio-s/s/GPU | "
                f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | wait {100 * record['data_wait_share']:.1f}%"
                f"{flop_text(record)}"
            ))

    def print(self, text: str) -> None:
        try:
            if self.progress is not None:
                self.progress.console.print(text)
            else:
                print(text, flush=True)
        except OSError:  # stdout redirected to a file on a full disk: the line is in metrics.jsonl as a record
            pass

    def _tensorboard_off(self, error: OSError) -> None:
        _warn(f"TensorBoard stops for the rest of this run (metrics.jsonl keeps every record): {error}")
        tb, self.tb = self.tb, None
        try:
            tb.close()
        except OSError:
            pass

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError as e:
                self._tensorboard_off(e)
        self.jsonl.close()


def flop_text(record: dict[str, Any]) -> str:
    """The FLOP rate of a train record for a log line: ` | <rate> TFLOP/s`, and `, MFU <share>%` where the peak is
    known."""
    if "tflops" not in record:
        return ""
    return f" | {record['tflops']:.3g} TFLOP/s" + (f", MFU {record['mfu']:.1%}" if "mfu" in record else "")


@dataclass
class _Interval:
    """Counters between two log lines: the logged loss is the mean over all of its micro-batches."""

    t0: float = field(default_factory=time.perf_counter)
    wait_s: float = 0.0
    steps: int = 0  # optimizer steps, skipped ones included (their FLOPs were computed)
    micro_batches: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    tally: list[float] = field(default_factory=list)  # the steps' StepTotals.tally, summed


@dataclass(frozen=True)
class Position:
    """Where in the run a training record is made."""

    epoch: int  # 0-based
    step: int  # optimizer steps so far (the engine's count)
    micro_batch: int  # micro-batches of this epoch consumed on each rank
    micro_batches_per_epoch: int


class TrainLog:
    """The training record and log line of every `train.log_interval_steps`-th optimizer step (and the first).

    Rank 0 writes them to `sink` (Metrics); the other ranks' sink (NullMetrics) drops them. With a `tally` (dynamic
    mixing) the record also says what the interval's mixtures were (launcher/training/mixing.py MixTally.record);
    with a `flop_rate` (launcher/training/mfu.py) this GPU's TFLOP/s over the interval, and its MFU where the peak is
    known."""

    def __init__(self, sink: NullMetrics, interval_steps: int, max_epoch: int, micro_batch: int, world_size: int,
                 segment_seconds: float, device, tally=None, flop_rate=None) -> None:
        self.sink, self.tally, self.flop_rate = sink, tally, flop_rate
        self.interval_steps, self.max_epoch = interval_steps, max_epoch
        self.micro_batch, self.world_size, self.segment_seconds = micro_batch, world_size, segment_seconds
        self.device = device
        self.interval = _Interval()

    def start_epoch(self, epoch: int, micro_batches_per_epoch: int, done: int) -> None:
        self.sink.start_epoch(epoch, micro_batches_per_epoch, done)
        self.interval = _Interval()

    def micro(self) -> None:
        self.sink.micro()

    def print(self, text: str) -> None:
        self.sink.print(text)

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        self.sink.log(record, line)

    def close(self) -> None:
        self.sink.close()

    def add_step(self, result: StepResult, micro_batches: int, wait_s: float) -> None:
        i = self.interval
        i.steps += 1
        i.micro_batches += micro_batches
        i.wait_s += wait_s
        i.loss_sum += result.totals.loss_sum
        i.loss_n += result.totals.finite
        if result.totals.tally:
            i.tally = [a + b for a, b in zip(i.tally, result.totals.tally)] if i.tally else list(result.totals.tally)

    def maybe_log(self, at: Position, result: StepResult, grad_norm: float | None, counters: Counters) -> None:
        """Log when `at.step` is due; the interval starts again after a log."""
        if not (at.step == 1 or at.step % self.interval_steps == 0):
            return
        i = self.interval
        loss = i.loss_sum / i.loss_n if i.loss_n else float("nan")
        elapsed = max(1e-9, time.perf_counter() - i.t0)
        n = max(1, i.micro_batches)
        lr = 0.0 if result.skipped else result.lr
        spb = self.sink.seconds_per_batch()
        record = {
            "kind": "train", "epoch": at.epoch + 1, "step": at.step, "samples_seen": counters.samples_seen,
            "loss": loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "s_per_batch": spb, "samples_per_s": n * self.micro_batch * self.world_size / elapsed,
            "audio_s_per_s_per_gpu": n * self.micro_batch * self.segment_seconds / elapsed,
            "data_wait_share": i.wait_s / elapsed, "skipped_steps": counters.skipped_steps,
        }
        if self.device.type == "cuda":
            import torch

            # The CUDA allocator's high-water mark since the start (rank 0's GPU): what launcher/plan/memory.py
            # estimates.
            record["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.tally is not None and i.tally:
            record.update(self.tally.record(i.tally))
        if self.flop_rate is not None:
            record.update(self.flop_rate.record(i.steps, elapsed))
        line = (f"Train Epoch: {at.epoch + 1}/{self.max_epoch} Step: {at.micro_batch}/{at.micro_batches_per_epoch} | "
                f"{spb:.3f}s/batch | lr {lr:.4e} || Mask_Loss {loss:.4f}{flop_text(record)}")
        self.sink.log(record, line)
        self.interval = _Interval()

"""What rank 0 shows and records: a rich progress bar, the reference's log line, JSONL, TensorBoard.

Every other rank gets a `NullMetrics`, so the training loop never branches on the rank to log.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class NullMetrics:
    def start_epoch(self, epoch: int, total_micro: int, done_micro: int = 0) -> None: ...
    def micro(self, loss: float | None, data_wait_s: float, step_s: float) -> None: ...
    def log(self, record: dict[str, Any], line: str | None = None) -> None: ...
    def print(self, text: str) -> None: ...
    def close(self) -> None: ...


class Metrics(NullMetrics):
    def __init__(self, run_dir: Path, max_epoch: int, progress_bar: bool = True) -> None:
        from rich.console import Console

        self.console = Console(stderr=False, highlight=False)
        self.max_epoch = max_epoch
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
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

    def start_epoch(self, epoch: int, total_micro: int, done_micro: int = 0) -> None:
        self.epoch_t0 = time.perf_counter()
        self.epoch_batches = 0
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=total_micro, completed=done_micro,
                                               epoch=f"{epoch + 1}/{self.max_epoch}", stats="")

    def micro(self, loss: float | None, data_wait_s: float, step_s: float) -> None:
        self.epoch_batches += 1
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)

    def seconds_per_batch(self) -> float:
        """Running average since the epoch started, as the reference prints it."""
        return (time.perf_counter() - self.epoch_t0) / max(1, self.epoch_batches)

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        record = {"time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])
        if line:
            self.print(line)
        if self.progress is not None and self.task is not None and record.get("kind") == "train":
            self.progress.update(self.task, stats=(
                f"loss {record['loss']:.4f} | {record['s_per_batch']:.3f}s/batch | "
                f"{record['samples_per_s']:.1f} samples/s | {record['audio_s_per_s_per_gpu']:.1f} audio-s/s/GPU | "
                f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | wait {100 * record['data_wait_share']:.1f}%"
            ))

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()

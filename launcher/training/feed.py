"""The training data as optimizer steps: each item `steps()` yields is an iterator over the K micro-batches of one step.

The sampler (data/sampler.py CursorSampler) holds the run's position as a cursor over consumed samples; the loop
reports each micro-batch it has consumed (`consumed()`, after its backward), so a checkpoint's cursor never
counts what the loader has only prefetched. Epochs are whole optimizer steps (the sampler's epoch quantum is
the global batch), so a step never spans two epochs.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

from data.loader import Prefetching


class FeedError(RuntimeError):
    """The loader and the sampler disagree on how many micro-batches an epoch holds (a bug, not a user error)."""


class DataFeed:
    def __init__(self, loader: Iterable, sampler, accumulation_steps: int) -> None:
        self.loader, self.sampler, self.accumulation_steps = loader, sampler, accumulation_steps
        self._pass: Iterator | None = None  # this epoch's loading
        self._upcoming: Iterator | None = None  # the next epoch's, started while this one ends
        self._wait_s = 0.0  # time spent waiting for data since take_wait_s() last asked

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def epoch_done(self) -> bool:
        return self.sampler.epoch_done

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def micro_batches_done(self) -> int:
        """Micro-batches of this epoch each rank has consumed."""
        return self.sampler.cursor // self.sampler.step_samples

    def steps(self, stop: Callable[[], bool]) -> Iterator[Iterator[Any]]:
        """The rest of this epoch, a step at a time, from the cursor on, until the epoch ends or `stop()` says so."""
        t0 = time.perf_counter()
        self._pass, self._upcoming = self._upcoming or iter(self.loader), None
        self._wait_s += time.perf_counter() - t0
        while not stop() and not self.sampler.epoch_done:
            yield self._micro_batches()
        if self.sampler.epoch_done and not stop():
            # Run the pass to its end, as a for loop would: its loading threads and workers finish the epoch.
            if next(self._pass, None) is not None:
                raise FeedError(f"the loader yields more micro-batches than the sampler's epoch of "
                                f"{self.sampler.batches_per_epoch}")
        _close(self._pass)  # left before its end: stop its loading
        self._pass = None

    def _micro_batches(self) -> Iterator[Any]:
        for _ in range(self.accumulation_steps):
            t0 = time.perf_counter()
            batch = next(self._pass, None)
            self._wait_s += time.perf_counter() - t0
            if batch is None:
                raise FeedError(f"the loader ran out {self.micro_batches_done} micro-batches into an epoch of "
                                f"{self.sampler.batches_per_epoch}, inside an optimizer step")
            yield batch

    def consumed(self) -> None:
        """One micro-batch has been trained on, on every rank."""
        self.sampler.advance(1)

    def take_wait_s(self) -> float:
        """Seconds spent waiting for data since the last call."""
        wait, self._wait_s = self._wait_s, 0.0
        return wait

    def next_epoch(self, prefetch: bool) -> None:
        """Move to the next epoch's start; with `prefetch`, its loading starts now (its first batches are then read
        while this epoch ends: validation, checkpoint)."""
        self.sampler.set_epoch(self.epoch + 1)
        if prefetch:
            self._upcoming = iter(self.loader)

    def close(self) -> None:
        """Stop the loading threads of a pass left early and of a next epoch that will not run."""
        _close(self._pass)
        _close(self._upcoming)
        self._pass = self._upcoming = None

    def release(self) -> None:
        """Drop the loader: its worker processes (persistent ones included) shut down with it."""
        self.close()
        self.loader = ()


def _close(loading: Iterator | None) -> None:
    # A ThreadPrefetcher's pass has a thread to stop; a DataLoader's iterator is shut down with its DataLoader.
    if isinstance(loading, Prefetching):
        loading.close()

"""The DataLoader around a CropDataset and one of the batch samplers."""

from __future__ import annotations

import functools
import os
import queue
import random
import sys
import threading
import warnings
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (0: unchanged). Linux only; elsewhere a no-op.

    Loading runs beside the training loop on the same cores. Where cores are oversubscribed (2 ranks on
    2 cores, or many workers per GPU), the scheduler then runs the loop whenever it is runnable and the
    loading in the gaps; where cores are spare, nice changes nothing. On Linux a thread's nice value is its
    own (POSIX would apply it to the whole process, hence the platform check); raising it needs no privilege.
    """
    if nice and sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError as e:  # a sandbox may refuse it: a scheduling hint is not worth failing a run for
            # (Python's default warning filter shows this once, not once per thread or worker.)
            warnings.warn(f"could not lower the loading priority by {nice}: {e}", RuntimeWarning, stacklevel=2)


def _init_worker(nice: int, worker_id: int) -> None:
    # Crops do not depend on worker RNG (see CropDataset), but anything else random in a worker should be
    # reproducible too; torch already seeded itself from the loader's generator. One thread per worker: the
    # workers are the parallelism, and N workers x M torch threads would oversubscribe the cores.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)
    lower_priority(nice)


def collate(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack each field of the items along a new batch dimension.

    In a worker, torch's default collate: it stacks straight into shared memory (one copy fewer on the way to
    the training process), with the worker's single thread. In the training process (``num_workers=0``),
    numpy's single-threaded stack: torch.stack there runs on the trainer's intra-op threads, and when those
    compete for busy cores it stalls (measured 30 ms for four 4 s crops on 2 shared cores, against 0.1 ms).
    """
    if get_worker_info() is not None:
        return tuple(default_collate(items))
    return tuple(torch.from_numpy(np.stack([item[k].numpy() for item in items])) for k in range(len(items[0])))


def build_loader(
    dataset: Dataset,
    batch_sampler: Iterable,
    num_workers: int = 4,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
    seed: int | None = None,
    nice: int = 0,
    thread_prefetch: int = 0,
) -> DataLoader | ThreadPrefetcher:
    """A DataLoader yielding ``(noisy (B, L), clean (B, L))`` float32 (plus ``weight (B,)`` with EvalSampler).

    ``num_workers=0`` reads in the training process (``persistent_workers``/``prefetch_factor`` do not apply
    then and are ignored). ``pin_memory`` applies only where CUDA is available (pinned host memory is for
    host-to-GPU copies). Worker seeds derive from ``seed`` (default: the dataset's seed) and the sampler's rank,
    so they are the same on every run. Workers run ``nice`` levels below the calling process (see
    ``lower_priority``). With ``thread_prefetch`` > 0 the loader comes wrapped in a ``ThreadPrefetcher`` of
    that depth, whose thread runs at the same ``nice``.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    base = seed if seed is not None else int(getattr(dataset, "seed", 0))
    generator = torch.Generator()
    generator.manual_seed(base * 1_000_003 + int(getattr(batch_sampler, "rank", 0)))
    extra = {}
    if num_workers > 0:
        extra = dict(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                     worker_init_fn=functools.partial(_init_worker, nice))
    loader = DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        collate_fn=collate,
        generator=generator,
        **extra,
    )
    return ThreadPrefetcher(loader, thread_prefetch, nice=nice) if thread_prefetch else loader


class ThreadPrefetcher:
    """Iterates ``loader`` in a background thread of this process, keeping up to ``depth`` batches ready.

    The training loop then takes a ready batch from a queue instead of waiting in ``next()``: with
    ``num_workers=0`` the reading, cropping and collating move off the loop's path; with workers, the
    hand-over (receiving each batch's shared-memory tensors from the worker) does. The thread mostly waits in
    C code that releases the GIL (file reads, numpy, torch), so it costs the loop little. With ``nice`` the
    thread runs at a lower CPU priority than the loop (see ``lower_priority``).

    Each ``iter()`` creates the loader's iterator in the caller's thread, so a sampler snapshots its position
    there, and starts reading at once: an iterator made before it is needed (the next epoch's, during
    validation) has its first batches ready when the loop starts. Leaving the loop early (``break``, an
    exception) or dropping the iterator stops and joins the thread; ``close()`` does so explicitly. Errors
    raised while loading are re-raised in the loop, with their original traceback.
    """

    def __init__(self, loader: Iterable, depth: int = 2, nice: int = 0) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.depth, self.nice = loader, depth, nice

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> "Prefetching":
        return Prefetching(iter(self.loader), self.depth, self.nice)


_END = object()


class Prefetching:
    """One pass of a ThreadPrefetcher: its thread starts at creation and stops at the end of the pass, on
    ``close()`` or when the iterator is dropped (the thread holds no reference to it)."""

    def __init__(self, source: Iterator[Any], depth: int, nice: int) -> None:
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()  # set by close(): the pass is over for both threads
        self._thread = threading.Thread(target=_produce, args=(source, self._ready, self._stop, nice),
                                        name="batch-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> "Prefetching":
        return self

    def __next__(self) -> Any:
        if self._stop.is_set():
            raise StopIteration
        item = self._ready.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and wait for it (it finishes the batch it is reading; a read stuck longer than
        ``timeout`` is left to the daemon thread)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.close()


def _produce(source: Iterator[Any], ready: queue.Queue, stop: threading.Event, nice: int) -> None:
    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        lower_priority(nice)
        for item in source:
            if not put(item):
                return
        put(_END)
    except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
        put(e)

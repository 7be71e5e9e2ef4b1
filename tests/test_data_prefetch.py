"""ThreadPrefetcher: same batches in the same order, bounded read-ahead, errors and early exits, priority."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from data import CropDataset, CursorSampler, PairIndex, ThreadPrefetcher, build_loader

RATE = 48000


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batch-prefetch"]


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(11)
    lines = []
    for k in range(10):
        x = rng.uniform(-0.3, 0.3, int(RATE * rng.uniform(0.6, 1.5))).astype(np.float32)
        sf.write(tmp_path / f"n{k}.wav", x, RATE, subtype="PCM_16")
        sf.write(tmp_path / f"c{k}.wav", x / 3, RATE, subtype="PCM_16")
        lines.append(f"n{k}.wav c{k}.wav\n")
    (tmp_path / "pairs.lst").write_text("".join(lines))
    return CropDataset(PairIndex.from_lists([tmp_path / "pairs.lst"]), segment_seconds=0.5, seed=5)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_batches_in_the_same_order_and_resume_at_the_sampler_cursor(corpus, workers):
    def run(prefetch: bool, consume_first: int | None = None) -> list[tuple[torch.Tensor, ...]]:
        sampler = CursorSampler(len(corpus), micro_batch_size=2, rank=0, world_size=1, seed=9)
        sampler.set_epoch(3)
        loader = build_loader(corpus, sampler, num_workers=workers, persistent_workers=False)
        batches = ThreadPrefetcher(loader, depth=2) if prefetch else loader
        got = []
        for batch in batches:
            got.append(batch)
            sampler.advance(1)
            if consume_first is not None and len(got) == consume_first:
                break
        if consume_first is not None:
            # The thread read ahead, but the cursor counts what the loop consumed: a new pass goes on from there.
            got += list(batches)
        return got

    plain, ahead, resumed = run(False), run(True), run(True, consume_first=2)
    assert len(plain) == 5
    for a, b, c in zip(plain, ahead, resumed, strict=True):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c, strict=True))
    assert not prefetch_threads()


def counting(n: int, produced: list[int]):
    """0..n-1, noting in `produced` what the prefetch thread has taken so far."""
    for i in range(n):
        produced.append(i)
        yield i


def test_reads_at_most_depth_batches_ahead():
    produced: list[int] = []
    it = iter(ThreadPrefetcher(counting(100, produced), depth=3))
    assert next(it) == 0
    time.sleep(0.3)
    # One handed out, three queued, one more held by the thread while it waits for room.
    assert len(produced) <= 1 + 3 + 1
    it.close()
    assert not prefetch_threads()


def test_an_iterator_starts_reading_when_made_and_stops_when_dropped_unused():
    produced: list[int] = []
    it = iter(ThreadPrefetcher(counting(10, produced), depth=2))  # e.g. the next epoch's, made before validation
    deadline = time.time() + 5
    while len(produced) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert produced[:2] == [0, 1] and prefetch_threads()
    del it
    assert not prefetch_threads()


def test_an_error_while_loading_reaches_the_loop_with_its_traceback():
    def source():
        yield 1
        raise KeyError("pairs.lst:7: n7.wav: cannot open")

    it = iter(ThreadPrefetcher(source()))
    assert next(it) == 1
    with pytest.raises(KeyError, match="pairs.lst:7") as info:
        next(it)
    assert any(frame.name == "source" for frame in info.traceback)
    assert not prefetch_threads()


def test_leaving_the_loop_early_stops_the_thread_even_while_it_waits_for_room():
    def endless():
        while True:
            yield torch.zeros(4)

    for _ in range(3):
        for k, _batch in enumerate(ThreadPrefetcher(endless(), depth=1)):
            if k == 2:
                break
    deadline = time.time() + 5
    while prefetch_threads() and time.time() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ThreadPrefetcher([], depth=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_loading_runs_below_the_loop_priority_and_the_loop_keeps_its_own():
    seen = []

    def source():
        for i in range(3):
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            yield i

    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert list(ThreadPrefetcher(source(), nice=5)) == [0, 1, 2]
    assert seen == [min(19, own + 5)] * 3
    assert os.getpriority(os.PRIO_PROCESS, 0) == own  # only the loading thread was lowered



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_a_refused_priority_change_warns_instead_of_failing_the_run(monkeypatch):
    import data.loader as loader

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(loader.os, "setpriority", refuse)
    with pytest.warns(RuntimeWarning, match="could not lower the loading priority by 5"):
        assert list(ThreadPrefetcher(iter([1, 2]), nice=5)) == [1, 2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_workers_run_below_the_loop_priority(corpus):
    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            return (torch.tensor(float(os.getpriority(os.PRIO_PROCESS, 0))),)

    own = os.getpriority(os.PRIO_PROCESS, 0)
    (levels,), = list(build_loader(Probe(), [[0, 1, 2, 3]], num_workers=1, persistent_workers=False, nice=7))
    assert levels.tolist() == [float(min(19, own + 7))] * 4

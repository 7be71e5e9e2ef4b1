"""Which files share a batch and which rank enhances it: only files whose outputs cannot change by being batched
together (equal frame counts, or equal window counts), spread over the ranks by audio length.

So the numbers do not depend on the batch size or the number of ranks. Every rank computes the same assignment
from the same list, so nothing is sent.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Sequence

SAMPLE_RATE_HZ = 48000  # the model's rate (model.features.SAMPLE_RATE_HZ; not imported here to keep start-up light)


@dataclass(frozen=True)
class Item:
    """One pair to enhance and score. `row` is its place in the output; `samples` (at 48 kHz) plans batches."""

    row: int
    noisy: str
    clean: str
    samples: int
    out: str | None = None  # where its enhanced WAV goes


def batch_key(samples: int) -> tuple[str, int]:
    """Files with one key can share a batch without changing any output: ("short", -1) for files under one 40 ms
    frame (not enhanced), ("one", frames) for one-pass files, ("windows", count) for windowed ones. Zero-padding
    below one hop leaves the frames alone; windows past a file's end are cut away."""
    from model.features import HOP, N_FFT
    from model.inference import ONE_PASS_MAX_SECONDS, STRIDE_SECONDS, WINDOW_SECONDS

    if samples < N_FFT:
        return ("short", -1)
    if samples <= ONE_PASS_MAX_SECONDS * SAMPLE_RATE_HZ:
        return ("one", 1 + (samples - N_FFT) // HOP)
    window, stride = int(WINDOW_SECONDS * SAMPLE_RATE_HZ), int(STRIDE_SECONDS * SAMPLE_RATE_HZ)
    return ("windows", max(1, math.ceil((samples - (window - stride) // 2) / stride)))


def plan_batches(samples: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions into `samples` grouped into batches of one key (see batch_key), at most `batch_size` files, or
    for windowed files at most `batch_size` windows (at least one file). In key order, then list order."""
    by_key: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for position, n in enumerate(samples):
        by_key[batch_key(n)].append(position)
    batches = []
    for key in sorted(by_key):
        members = by_key[key]
        size = max(1, batch_size // key[1]) if key[0] == "windows" else batch_size
        batches += [members[k:k + size] for k in range(0, len(members), size)]
    return batches


def assign_batches(batches: Sequence[Sequence[int]], samples: Sequence[int], world_size: int) -> list[list[int]]:
    """Batch numbers per rank: the longest first, each to the least loaded rank (audio samples as the cost).
    Every rank computes the same answer from the same list, so nothing is sent."""
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(range(len(batches)), key=lambda b: (-len(batches[b]) * max(samples[p] for p in batches[b]), b))
    for b in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(b)
        load[rank] += len(batches[b]) * max(samples[p] for p in batches[b])
    return [sorted(share) for share in shares]

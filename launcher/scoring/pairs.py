"""The pairs an evaluation scores: list files read and validated like training data, bad lines reported or (with
skip_bad) kept as rows that say why, and where each enhanced WAV goes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from launcher.scoring.audio import enhanced_paths
from launcher.scoring.batches import SAMPLE_RATE_HZ, Item
from launcher.scoring.results import EvaluateError


@dataclass(frozen=True)
class PairOptions:
    resample: bool = False  # files at other rates are resampled to 48 kHz (else refused)
    skip_bad: bool = False  # bad lines become rows with a note (else the evaluation is refused)
    cache_dir: str | None = None  # the audio header cache (default: beside the list)
    enhanced_dir: str | None = None  # where enhanced WAVs go (None: not written)


@dataclass(frozen=True)
class Pairs:
    index: Any  # data.PairIndex of every line of the lists
    items: list[Item]  # what to enhance and score, rows in list order
    skipped: list[dict]  # the rows of bad lines skipped with skip_bad


def read_pairs(lists: list[str], options: PairOptions, rank: int, world_size: int) -> Pairs:
    """All ranks: the lists' pairs (rank 0 validates first, the others then read its header cache); EvaluateError
    naming every bad line, or an enhanced WAV that would overwrite an input."""
    index, kept, report = _validated(lists, options, rank, world_size)
    bad = {(p.list_id, p.line_no): f"{p.path}: {p.reason}" for p in report.problems} if options.skip_bad else {}
    items, skipped = _items(index, options.enhanced_dir, bad, kept)
    return Pairs(index, items, skipped)


def _items(index, out_dir: str | None, bad: dict[tuple[int, int], str], kept) -> tuple[list[Item], list[dict]]:
    """Items to evaluate (rows in list order) and the rows of bad lines skipped with --skip_bad."""
    import numpy as np

    noisy = [index.pair(i) for i in range(len(index))]
    outs = enhanced_paths([n for n, _ in noisy], out_dir) if out_dir else [None] * len(noisy)
    if out_dir:
        inputs = {os.path.realpath(p) for pair in noisy for p in pair}
        clash = next((o for o in outs if os.path.realpath(o) in inputs), None)
        if clash:
            raise EvaluateError(f"--enhanced_dir {out_dir} would overwrite the input file {clash}; choose another folder")
    durations = kept.durations
    items, skipped, k = [], [], 0
    for i, (n, c) in enumerate(noisy):
        reason = bad.get((index.list_id(i), index.line_number(i)))
        if reason is not None:
            skipped.append({"row": i, "noisy": n, "clean": c, "enhanced": "", "notes": f"skipped: {reason}"})
            continue
        seconds = float(durations[k])
        k += 1
        samples = int(round(seconds * SAMPLE_RATE_HZ)) if np.isfinite(seconds) else 0
        items.append(Item(i, n, c, samples, outs[i]))
    return items, skipped


def _validated(lists: list[str], options: PairOptions, rank: int, world_size: int):
    """The parsed lists and their validation (rank 0 first: the others then read its header cache)."""
    import torch.distributed as dist

    from data import DataError, PairIndex
    from data.validation import validate  # not `from data`: importing data.validate (the CLI) shadows it

    def run():
        index = PairIndex.from_lists(lists, strict=False)
        kept, report = validate(index, sample_rate_hz=SAMPLE_RATE_HZ, resample=options.resample,
                                skip_bad=options.skip_bad, cache_dir=options.cache_dir)
        return index, kept, report

    result, error = None, None
    if rank == 0:
        try:
            result = run()
        except DataError as e:
            error = str(e)
    if world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
        if error is None and rank != 0:
            result = run()
    if error is not None:
        raise EvaluateError(error)
    return result

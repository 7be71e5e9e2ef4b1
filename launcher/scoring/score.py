"""Enhancement and scoring: the model enhances one planned batch while worker processes score the previous ones.

Each file is enhanced as `model.enhance` does (no level normalisation, one pass up to 20 s, 4 s windows every
3 s beyond). The metrics are CPU work: `metric_workers` processes per rank compute them (and write the WAVs)
while the model enhances the next batch, and a background thread reads the next batch's noisy files.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from launcher.scoring.audio import read_audio, write_wav
from launcher.scoring.batches import SAMPLE_RATE_HZ, Item, batch_key

DECIMALS = 6  # metric values are rounded once, where computed: the CSV and the means then never depend on
# the last bits that numpy's alignment-dependent sums leave (STOI varied in the 16th digit between two calls)


def enhance_files(model, waveforms: list, batch_size: int, device) -> list:
    """Enhanced waveforms (numpy) for one planned batch; None for files under one frame. Files of one key are
    zero-padded to the longest and enhanced together (`model.enhance`), then cut back to their length."""
    import numpy as np
    import torch

    from model import enhance

    out: list = [None] * len(waveforms)
    by_key: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for k, w in enumerate(waveforms):
        if w is not None:
            by_key[batch_key(len(w))].append(k)
    for key, members in sorted(by_key.items()):
        if key[0] == "short":
            continue
        longest = max(len(waveforms[k]) for k in members)
        batch = np.zeros((len(members), longest), dtype=np.float32)
        for row, k in enumerate(members):
            batch[row, :len(waveforms[k])] = waveforms[k]
        enhanced = enhance(model, torch.from_numpy(batch).to(device), windows_per_batch=batch_size).cpu().numpy()
        for row, k in enumerate(members):
            out[k] = enhanced[row, :len(waveforms[k])].copy()
    return out


def _init_metric_worker() -> None:
    # One thread each: the workers are the parallelism (and N workers x all-core pools would thrash).
    import torch

    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # only a performance hint
        pass


def score_job(job: dict) -> dict:
    """One pair's metrics (and its enhanced WAV): a row without its paths. Never raises: a failure is a note."""
    from model.metrics import METRIC_GROUPS, NOISY_SUFFIX, pair_metrics

    notes = [job["note"]] if job.get("note") else []
    row: dict[str, Any] = {"row": job["row"], "enhanced": ""}
    columns = [n + s for g in job["groups"] for n in METRIC_GROUPS[g]
               for s in ("", NOISY_SUFFIX) if s == "" or job["with_noisy"]]
    values: dict[str, float | None] = {}  # with no noisy audio (its note says why), nothing to score
    try:
        if job["noisy"] is not None:
            if job["out"] and job["enhanced"] is not None:
                write_wav(job["out"], job["enhanced"])
                row["enhanced"] = job["out"]
            clean = read_audio(job["clean"], job["resample"])
            values, why = pair_metrics(job["enhanced"], job["noisy"], clean, SAMPLE_RATE_HZ, job["groups"],
                                       enhanced_missing=job.get("enhanced_missing"), with_noisy=job["with_noisy"])
            if why:
                notes.append(why)
    except Exception as e:  # a clean file that fails to read: one row says so
        values = {c: None for c in columns}
        notes += [job["enhanced_missing"]] if job.get("enhanced_missing") else []
        notes.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": "))
    for column in columns:
        value = values.get(column)
        row[column] = None if value is None else round(value, DECIMALS)
    row["notes"] = "; ".join(notes)
    return row


class MetricPool:
    """`metric_workers` spawned processes (spawn: the parent may hold CUDA and process-group threads), or the
    calling process itself with 0. At most `max_pending` jobs wait: a model faster than its metrics then waits
    instead of filling the memory with enhanced audio."""

    def __init__(self, workers: int, max_pending: int) -> None:
        import multiprocessing

        self.executor = None if workers == 0 else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_metric_worker)
        self.pending: collections.deque[Future] = collections.deque()
        self.max_pending = max_pending
        self.done: list[dict] = []

    def submit(self, job: dict) -> None:
        if self.executor is None:
            self.done.append(score_job(job))
            return
        while len(self.pending) >= self.max_pending:
            self.done.append(self.pending.popleft().result())
        self.pending.append(self.executor.submit(score_job, job))
        while self.pending and self.pending[0].done():
            self.done.append(self.pending.popleft().result())

    def finish(self) -> list[dict]:
        while self.pending:
            self.done.append(self.pending.popleft().result())
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        return self.done


def enhance_and_score(model, items: Sequence[Item], batches: Iterable[Sequence[int]], *, device, batch_size: int,
                      metric_workers: int, groups: Sequence[str], with_noisy: bool = True, resample: bool = False,
                      progress: Callable[[int], None] | None = None) -> list[dict]:
    """Rows (without paths) of the given batches of `items`. A background thread reads the next batch's noisy
    files while the model enhances this one; the metric pool scores finished files meanwhile."""
    batches = [list(b) for b in batches]
    pool = MetricPool(metric_workers, max_pending=4 * max(1, metric_workers) + batch_size)
    reader = ThreadPoolExecutor(1)

    def read(batch: list[int]) -> list:
        out = []
        for position in batch:
            try:
                out.append(read_audio(items[position].noisy, resample))
            except Exception as e:  # noqa: BLE001 - becomes this pair's note
                out.append(e)
        return out

    done = 0
    try:
        upcoming = reader.submit(read, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            audio = upcoming.result()
            upcoming = reader.submit(read, batches[b + 1]) if b + 1 < len(batches) else None
            waveforms = [None if isinstance(a, Exception) else a for a in audio]
            enhanced = enhance_files(model, waveforms, batch_size, device)
            for position, a, e in zip(batch, audio, enhanced):
                item = items[position]
                job = {"row": item.row, "clean": item.clean, "groups": tuple(groups), "with_noisy": with_noisy,
                       "resample": resample, "out": item.out, "enhanced": e, "noisy": a}
                if isinstance(a, Exception):
                    job.update(noisy=None, enhanced=None, note=f"noisy file: {a}")
                elif e is None:
                    job["enhanced_missing"] = f"shorter than one 40 ms frame ({len(a)} samples): not enhanced"
                if job["noisy"] is None:
                    pool.done.append(score_job(job))  # nothing to compute
                else:
                    pool.submit(job)
            done += len(batch)
            if progress is not None:
                progress(done)
        return pool.finish()
    finally:
        reader.shutdown(wait=True)
        if pool.executor is not None:
            pool.executor.shutdown(wait=True, cancel_futures=True)


def default_metric_workers(local_world_size: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # what SLURM or a cgroup lets this process use
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_world_size) - 1))

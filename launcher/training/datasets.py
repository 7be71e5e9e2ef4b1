"""The training and validation data of a run: lists validated once (rank 0 reports every bad line), crops of
pre-mixed pairs or mixtures made on the fly (launcher/training/mixing.py), the resumable sampler and the loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from data import CropDataset, CursorSampler, DataError, EvalSampler, build_loader
from data.validation import validate  # not `from data`: importing data.validate (the CLI) shadows it
from launcher.config import ConfigError, DataSection, MixingSection
from launcher.training.errors import TrainingAborted
from launcher.training.mixing import mixing_sets


@dataclass(frozen=True)
class TrainingData:
    loader: Any  # the training batches (DataLoader, or its ThreadPrefetcher)
    sampler: Any  # data.CursorSampler: the run's position in the data
    valid_loader: Any | None  # None without data.valid_list or validation mixtures
    mixing: Any | None  # launcher/training/mixing.py MixingRun of a mixing recipe, else None


def _checked(check: Callable[[], tuple[Any, Any]], what: str, rank: int, device, log) -> Any:
    """`check()` (a list validation: (result, report)) on every rank, rank 0 first: it reads every header once (and
    caches them); the others then hit the cache. A bad corpus stops every rank here, before training, with rank 0
    printing the whole report."""
    verdict = torch.zeros(1, device=device)
    result = None
    if rank == 0:
        try:
            result, report = check()
            for note in report.notes:  # e.g. a read-only corpus folder: the header cache moved
                log.print(f"[data] {note}")
            if report.num_bad:
                log.print(f"[data] {what}: skipped {report.num_bad} bad line(s) (skip_bad)")
        except DataError as e:
            log.print(f"error: {e}")
            verdict += 1
    dist.all_reduce(verdict)
    if verdict.item():
        raise TrainingAborted(f"{what}: bad data (rank 0 printed the report)")
    if rank != 0:
        result, _ = check()
    return result


def build_data(d: DataSection, m: MixingSection, seed: int, micro_batch: int, global_batch: int, rank: int,
               world_size: int, run_dir: Path, device, log) -> TrainingData:
    if not d.train_list and not m.enabled:
        raise ConfigError("data.train_list is not set: give a list file of `noisy clean [seconds]` lines")
    # Where the header cache goes when the corpus folder is read-only: the user's cache (kept across runs),
    # else the run directory (every rank can write it).
    fallback = [Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mossformer2-launcher",
                run_dir / "cache"]

    def loader(dataset, sampler):
        return build_loader(dataset, sampler, num_workers=d.num_workers, pin_memory=d.pin_memory,
                            persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor,
                            nice=d.loader_nice, thread_prefetch=d.thread_prefetch)

    def checked(check, what):
        return _checked(check, what, rank, device, log)

    def crops(list_path: str, random_crop: bool):
        index = checked(lambda: validate([list_path], sample_rate_hz=d.sample_rate_hz, resample=d.resample,
                                         skip_bad=d.skip_bad, cache_dir=d.cache_dir, fallback_cache_dirs=fallback),
                        list_path)
        return CropDataset(index, segment_seconds=d.segment_seconds, sample_rate_hz=d.sample_rate_hz,
                           normalize=d.normalize, resample=d.resample, seed=seed, random_crop=random_crop)

    mixing = None
    if m.enabled:
        sets = mixing_sets(d, m, seed, checked, crops, fallback, log)
        train_set, valid_set, mixing = sets.train, sets.valid, sets.run
    else:
        train_set = crops(d.train_list, True)
        valid_set = crops(d.valid_list, False) if d.valid_list else None
    if len(train_set) < global_batch:
        what = f"{len(train_set)} samples per epoch (mixing)" if m.enabled else f"{len(train_set)} usable pairs"
        raise TrainingAborted(f"{d.train_list or 'mixing.clean_lists'}: {what} cannot fill one optimizer step of "
                              f"{global_batch} samples")
    sampler = CursorSampler(len(train_set), micro_batch, rank, world_size, seed=seed, epoch_quantum=global_batch)
    train_loader = loader(train_set, sampler)
    valid_loader = None
    if valid_set is not None:
        valid_loader = loader(valid_set, EvalSampler(len(valid_set), micro_batch, rank, world_size))
    return TrainingData(train_loader, sampler, valid_loader, mixing)

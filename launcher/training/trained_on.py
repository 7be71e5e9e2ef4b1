"""What a run trains on, read from its list files before any process group (no audio file is opened): the samples
per epoch the plan counts steps with, the card's "trained on" row, and for dynamic mixing the record of settings and
list digests that a resumed checkpoint must match (data/mix_lists.py `mixing_record`).

Torch-free (numpy, through the list indexes), like the rest of what `launcher/train.py --dry_run` runs. Checked lists
(launcher/training/mixing.py) give the same record when nothing is skipped; with `data.skip_bad` only checking knows
which lines are left out, so the comparison here leaves those out and the trainer's, after checking, is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.checkpoint.marker import CheckpointError, read_marker, resolve_resume
from launcher.config import Config, ConfigError, DataSection, MixingSection

TRAINED_ON = "trained on"  # the card row's label


@dataclass(frozen=True)
class TrainedOn:
    dataset_size: int | None  # samples per epoch (pre-mixed pairs + mixtures); None when a list is not there yet
    rows: tuple[tuple[str, str], ...]  # the card's rows
    mixing_record: dict[str, Any] | None  # of the lists as parsed; None without mixing or without its lists


def mixing_list_paths(m: MixingSection) -> list[tuple[str, str]]:
    """(key, path) of every list file dynamic mixing reads, training and validation."""
    keys = ("clean_lists", "clean_pair_lists", "noise_lists", "rir_lists", "valid_clean_lists", "valid_clean_pair_lists",
            "valid_noise_lists", "valid_rir_lists")
    return [(f"mixing.{key}", path) for key in keys for path in getattr(m, key)]


def read_trained_on(cfg: Config) -> TrainedOn:
    """What the lists say, parsed strictly unless `data.skip_bad` (a malformed line is a DataError naming it)."""
    from data import PairIndex

    d, m = cfg.data, cfg.mixing
    strict = not d.skip_bad
    if not m.enabled:
        if not (d.train_list and Path(d.train_list).is_file()):
            return TrainedOn(None, (), None)
        pairs = PairIndex.from_lists([d.train_list], strict=strict)
        text = f"pre-mixed {len(pairs)} pairs / {_hours(pairs)} ({d.train_list})"
        return TrainedOn(len(pairs), ((TRAINED_ON, text),), None)
    if any(not Path(path).is_file() for _, path in mixing_list_paths(m)) or (
            m.premixed_share and not Path(d.train_list).is_file()):
        return TrainedOn(None, (), None)  # launch.py refuses the run naming the list; a dry run shows the plan
    return _dynamic(cfg, strict)


def _dynamic(cfg: Config, strict: bool) -> TrainedOn:
    from data import PairIndex, corpus_summary, epoch_layout, load_mixing_lists

    d, m = cfg.data, cfg.mixing
    corpus = load_mixing_lists(m, "train", strict=strict)
    valid = load_mixing_lists(m, "valid", strict=strict) if m.valid_enabled else None
    premixed = PairIndex.from_lists([d.train_list], strict=strict) if m.premixed_share else None
    k_pre, k_mix = epoch_layout(m.samples_per_epoch or corpus.num_clean, len(premixed) if premixed else 0,
                                m.premixed_share)
    summary = corpus_summary(m, corpus.stats(), mixtures_per_epoch=k_mix, premixed_per_epoch=k_pre,
                             premixed_pairs=len(premixed) if premixed else 0,
                             premixed_seconds=_seconds(premixed) if premixed else math.nan)
    record = run_record(m, d, cfg.train.seed, corpus, valid, premixed)
    return TrainedOn(k_pre + k_mix, ((TRAINED_ON, summary["line"]),), record)


def run_record(m: MixingSection, d: DataSection, seed: int, corpus, valid, premixed) -> dict[str, Any]:
    """The mixing record of a run: settings, and the digests of every list it reads (training, validation, the
    pre-mixed pairs' PairIndex), each under its role; `valid` and `premixed` may be None."""
    from data.mix_lists import index_digests, list_digests, mixing_record

    digests = list_digests(corpus)
    if valid is not None:
        digests += [{**r, "role": f"valid {r['role']}"} for r in list_digests(valid)]
    if premixed is not None:
        digests += index_digests("pre-mixed pairs", premixed)
    return mixing_record(m, digests, seed=seed, sample_rate_hz=d.sample_rate_hz, segment_seconds=d.segment_seconds)


def mixing_changes(saved: dict[str, Any] | None, current: dict[str, Any] | None, *, kept: bool = True) -> list[str]:
    """How a checkpoint's mixing record (None: it trained on pre-mixed pairs only) differs from this run's."""
    from data import compare_records

    if saved is None and current is None:
        return []
    if saved is None:
        return ["the checkpoint trained on pre-mixed pairs only; this run mixes (mixing.clean_lists/clean_pair_lists)"]
    if current is None:
        return [f"the checkpoint trained with dynamic mixing (record {saved.get('digest', '?')[:12]}); this run has "
                "no mixing.clean_lists/clean_pair_lists"]
    return compare_records(saved, current, kept=kept)


def check_resume(cfg: Config, trained: TrainedOn, resume: str | None) -> None:
    """Before any process group: refuse (ConfigError) to continue a checkpoint whose mixing differs from this run's,
    unless `mixing.allow_changed_lists` (the trainer then records the changes when it loads the checkpoint)."""
    if not resume or (cfg.mixing.enabled and trained.mixing_record is None):
        return  # no checkpoint, or lists not there yet (launch.py refuses the run)
    ckpt_dir = Path(cfg.train.run_dir) / "checkpoints"
    try:
        target = resolve_resume(resume, ckpt_dir)
        marker = read_marker(*target) if target is not None else None
    except (CheckpointError, OSError, ValueError) as e:
        raise ConfigError(f"--resume {resume}: cannot read the checkpoint's marker: {e}") from None
    if marker is None:
        return
    changes = mixing_changes(marker.get("state", {}).get("mixing"), trained.mixing_record, kept=not cfg.data.skip_bad)
    if changes and not cfg.mixing.allow_changed_lists:
        raise ConfigError(refusal(changes, target[0] / target[1]))


def refusal(changes: list[str], checkpoint: Path | None = None) -> str:
    which = f"checkpoint {checkpoint}" if checkpoint else "the checkpoint"
    return (f"--resume: {which} was trained on other data than this run would mix:\n"
            + "".join(f"  - {c}\n" for c in changes)
            + "Resuming would not continue its mixtures. Restore the lists and settings, start a new run directory, "
              "or set mixing.allow_changed_lists=true to continue on the new data.")


def _seconds(index) -> float:
    import numpy as np

    return float(np.sum(index.durations, dtype=np.float64))  # NaN when a line has no duration


def _hours(index) -> str:
    seconds = _seconds(index)
    return "? h (durations not in the list)" if math.isnan(seconds) else f"{seconds / 3600:.2f} h"

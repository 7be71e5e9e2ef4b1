"""Dynamic mixing in a run (data/mixing.py makes the mixtures): the datasets, the record every checkpoint carries and
a resume compares, and the per-step tally of what the mixtures were.

- Datasets: the training set is a MixingDataset (or, with `mixing.premixed_share`, a JoinedDataset that also draws
  that share of each epoch from `data.train_list`), keyed (sample index, epoch) like the pre-mixed crops, so the
  sampler's exactness across world sizes and resumes carries over to the mixtures. Validation mixes
  `mixing.valid_clean_lists` the same way every epoch (fixed mixtures, comparable losses), else crops
  `data.valid_list`.
- Record: settings and list digests (launcher/training/trained_on.py `run_record`), written to the run directory's
  mixing.json and metrics.jsonl, and saved in every checkpoint's marker as `state.mixing`; loading a checkpoint
  whose record differs is refused on every rank alike unless `mixing.allow_changed_lists`.
- Tally: per optimizer step, how many samples carry each flag of data/mixing.py and the mean power of the inputs
  and targets, summed on the device into the step's one all-reduce, logged per interval.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from launcher.checkpoint.marker import ResumeRefused
from launcher.config import DataSection, MixingSection
from launcher.training.trained_on import mixing_changes, refusal, run_record

Check = Callable[[Callable[[], tuple[Any, Any]], str], Any]  # (check, what) -> its result, rank 0 first


class MixTally:
    """What one micro-batch of mixtures was, as a vector the step window sums and all-reduces: one count per flag,
    then the summed mean power of the inputs and of the targets, then the number of samples."""

    def __init__(self, device) -> None:
        from data.mixing import FLAG_NAMES

        self.names = tuple(FLAG_NAMES.values())
        self.bits = torch.tensor(list(FLAG_NAMES), dtype=torch.int64, device=device)

    @property
    def size(self) -> int:
        return len(self.names) + 3

    def of(self, noisy: torch.Tensor, clean: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """On the device, without a host sync: the loop calls this per micro-batch."""
        counts = (flags.to(self.bits.device)[:, None] & self.bits).ne(0).sum(0).double()
        power = torch.stack([noisy.double().square().mean(1).sum(), clean.double().square().mean(1).sum()])
        return torch.cat([counts, power, power.new_tensor([noisy.shape[0]])])

    def record(self, sums: list[float]) -> dict[str, Any]:
        """The train record's `mix_*` keys for the sums of an interval (all ranks): flag counts, and the inputs'
        and targets' level (10·log10 of their mean power, dBFS) — also a fingerprint of which mixtures were used."""
        k = len(self.names)
        out: dict[str, Any] = {f"mix_{name}": round(n) for name, n in zip(self.names, sums[:k])}
        samples = sums[k + 2]
        for i, name in enumerate(("noisy", "clean")):
            power = sums[k + i] / samples if samples else 0.0
            out[f"mix_{name}_dbfs"] = 10 * math.log10(power) if power > 0 else -math.inf
        out["mix_samples"] = round(samples)
        return out


class MixingRun:
    """The run's mixing record, a checkpoint state (`state.mixing` of every marker): saving stores the record,
    loading compares the checkpoint's with it."""

    def __init__(self, record: dict[str, Any], summary: dict[str, Any], allow_changed: bool, log) -> None:
        self.record, self.summary, self.allow_changed, self.log = record, summary, allow_changed, log

    def state_dict(self) -> dict[str, Any]:
        return self.record

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """Every rank holds the same record (the same checked lists), so every rank decides alike."""
        changes = mixing_changes(saved, self.record)
        if changes and not self.allow_changed:
            raise ResumeRefused(refusal(changes))
        if changes:
            self.log.print("[mixing] resuming on changed data (mixing.allow_changed_lists): " + "; ".join(changes))
            self.log.log({"kind": "resume_mixing_changed", "changes": changes, "digest": self.record["digest"],
                          "checkpoint_digest": (saved or {}).get("digest")})

    def write(self, run_dir: Path, rank: int) -> None:
        """mixing.json in the run directory and the `mixing` record of metrics.jsonl (rank 0), and the summary line."""
        # Hours a list does not give are NaN in the summary; null keeps the files standard JSON.
        summary = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in self.summary.items()}
        self.log.print(f"[data] {summary['line']}")
        self.log.log({"kind": "mixing", **self.record, "summary": summary})
        if rank == 0:
            (run_dir / "mixing.json").write_text(json.dumps({**self.record, "summary": summary}, indent=1))


@dataclass(frozen=True)
class MixingSets:
    train: Any  # MixingDataset or JoinedDataset
    valid: Any | None  # fixed MixingDataset, CropDataset of data.valid_list, or None
    run: MixingRun


def mixing_sets(d: DataSection, m: MixingSection, seed: int, checked: Check, crops: Callable[[str, bool], Any],
                fallback: list[Path], log) -> MixingSets:
    """The datasets of a mixing recipe. `checked(check, what)` runs a list check rank 0 first (datasets.py);
    `crops(list_path, random_crop)` is the pre-mixed CropDataset of a checked pair list; `fallback`: where the
    header cache goes when the corpus folder is read-only."""
    from data import MixingDataset, corpus_summary, mixing_training_set, validate_mixing

    def check(split: str) -> Callable[[], tuple[Any, Any]]:
        return lambda: validate_mixing(m, split, sample_rate_hz=d.sample_rate_hz, resample=d.resample,
                                       skip_bad=d.skip_bad, cache_dir=d.cache_dir, fallback_cache_dirs=fallback)

    corpus = checked(check("train"), "mixing lists (train)")
    premixed = crops(d.train_list, True) if m.premixed_share else None
    train, k_pre, k_mix = mixing_training_set(m, corpus, premixed=premixed, segment_seconds=d.segment_seconds,
                                              sample_rate_hz=d.sample_rate_hz, seed=seed, resample=d.resample,
                                              return_flags=True)
    valid_corpus = checked(check("valid"), "mixing lists (valid)") if m.valid_enabled else None
    if valid_corpus is not None:
        valid = MixingDataset(valid_corpus, m, segment_seconds=d.segment_seconds, sample_rate_hz=d.sample_rate_hz,
                              seed=seed, fixed=True, num_samples=valid_corpus.num_clean, resample=d.resample)
    else:
        valid = crops(d.valid_list, False) if d.valid_list else None
    pairs = premixed.index if premixed is not None else None
    summary = corpus_summary(m, corpus.stats(), mixtures_per_epoch=k_mix, premixed_per_epoch=k_pre,
                             premixed_pairs=len(pairs) if pairs is not None else 0,
                             premixed_seconds=float(pairs.durations.sum(dtype="float64")) if pairs is not None
                             else math.nan)
    run = MixingRun(run_record(m, d, seed, corpus, valid_corpus, pairs), summary, m.allow_changed_lists, log)
    return MixingSets(train, valid, run)

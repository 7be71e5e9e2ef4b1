"""The settings of dynamic mixing (the recipe's proposed ``mixing:`` section), checked on construction.

Imports neither torch nor numpy, so the dry run can check a recipe's mixing section in no time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import DataError

TARGETS = ("dry", "early", "reverberant")
SHORT_NOISE = ("repeat", "pad")
PEAK_POLICIES = ("scale", "clip")
CHOICES = {"short_noise": SHORT_NOISE, "target": TARGETS, "peak_policy": PEAK_POLICIES}

# The valid interval of every numeric setting (each end of a [low, high] pair, each weight): (low, high, low
# open, high open), None where unbounded. The checks below and the recipe's ranges (launcher/config/sections.py)
# both read this table, so the two never disagree.
LIMITS: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "noise_weights": (0.0, None, True, False),
    "noise_sources": (1, 16, False, False),
    "source_level_db": (None, 0.0, False, False),
    "snr_db": (-30.0, 60.0, False, False),
    "speech_level_dbfs": (-80.0, 0.0, False, False),
    "crossfade_ms": (0.0, 1000.0, False, False),
    "rir_probability": (0.0, 1.0, False, False),
    "rir_max_seconds": (0.0, 60.0, True, False),
    "early_ms": (0.0, 1000.0, False, False),
    "max_peak": (0.0, 1.0, True, False),
    "silence_dbfs": (-200.0, 0.0, False, False),
    "samples_per_epoch": (0, None, False, False),
    "premixed_share": (0.0, 1.0, False, True),
}


@dataclass(frozen=True)
class MixingConfig:
    """How each training pair is made from clean speech, noise and (optionally) a room impulse response.

    Mixing is on when ``clean_lists`` or ``clean_pair_lists`` name a list. Per mixture, every draw below is a
    pure function of (seed, epoch, sample index) (see :class:`data.mixing.MixingDataset`):

    - clean speech: ``clean_lists`` (``path [seconds]`` a line) and/or ``clean_pair_lists`` (the clean column
      of ``noisy clean [seconds]`` pair lists); a crop of the segment length, zero-padded when shorter.
    - room: with probability ``rir_probability`` one impulse response of ``rir_lists`` (cut to
      ``rir_max_seconds`` after its direct path) reverberates the speech; the target is then ``dry`` (the
      direct-path sound: the clean delayed by the direct path's delay and scaled by its tap, so it is exactly
      a component of the mixture), ``early`` (direct path plus the first ``early_ms``) or ``reverberant``.
    - level: the speech as it sounds in the mixture is set to an active level (the reference's -25 dBFS
      rule) drawn uniformly from ``speech_level_dbfs``; the target gets the same gain.
    - noise: ``noise_sources`` (an inclusive integer range) sources, each from a noise list picked by
      ``noise_weights`` (equal when empty), each at a level relative to the first drawn from
      ``source_level_db``; a noise file shorter than the crop is looped from a random point with
      ``crossfade_ms`` equal-power crossfades at the joins (``short_noise: repeat``) or placed once at a
      random position, silence elsewhere (``pad``). A source crop quieter than ``silence_dbfs`` is drawn
      again (another file and place, 4 tries), then dropped and counted.
    - SNR: the sum of the sources is scaled so that speech energy / noise energy over the crop equals an SNR
      drawn uniformly from ``snr_db`` (torchaudio.functional.add_noise).
    - silent clean crop (RMS below ``silence_dbfs``): no SNR exists; the pair becomes noise alone at the
      level the speech would have had minus the SNR, with an all-zero target, and is counted.
    - full scale: when the mixture or the target peaks above ``max_peak``, ``peak_policy: scale`` lowers
      mixture, target and noise by the same gain (SNR and the target's consistency kept), ``clip`` clips the
      mixture only (a saturated recording; the target is scaled if it alone exceeds); both are counted.
    - ``renormalize``: afterwards scale noisy and clean each to -25 dBFS as CropDataset(normalize=True)
      does to pre-mixed pairs (the reference's convention; keeps one convention when both are mixed).

    ``samples_per_epoch`` mixtures make an epoch (0: one per clean file); ``premixed_share`` of an epoch's
    samples are pre-mixed pairs of ``data.train_list`` instead. ``valid_clean_lists`` /
    ``valid_clean_pair_lists`` make fixed validation mixtures (the same every epoch) with
    ``valid_noise_lists`` and ``valid_rir_lists`` (empty: the training ones); with none, validation uses
    ``data.valid_list``. A resume whose lists or mixing settings differ from the checkpoint's is refused
    unless ``allow_changed_lists``.
    """

    clean_lists: tuple[str, ...] = ()
    clean_pair_lists: tuple[str, ...] = ()
    noise_lists: tuple[str, ...] = ()
    noise_weights: tuple[float, ...] = ()
    noise_sources: tuple[int, int] = (1, 1)
    source_level_db: tuple[float, float] = (-10.0, 0.0)
    snr_db: tuple[float, float] = (0.0, 15.0)
    speech_level_dbfs: tuple[float, float] = (-25.0, -25.0)
    short_noise: str = "repeat"
    crossfade_ms: float = 20.0
    rir_lists: tuple[str, ...] = ()
    rir_probability: float = 1.0
    rir_max_seconds: float = 1.5
    target: str = "dry"
    early_ms: float = 50.0
    peak_policy: str = "scale"
    max_peak: float = 0.99
    silence_dbfs: float = -60.0
    renormalize: bool = False
    samples_per_epoch: int = 0
    premixed_share: float = 0.0
    valid_clean_lists: tuple[str, ...] = ()
    valid_clean_pair_lists: tuple[str, ...] = ()
    valid_noise_lists: tuple[str, ...] = ()
    valid_rir_lists: tuple[str, ...] = ()
    allow_changed_lists: bool = False

    def __post_init__(self) -> None:
        # YAML gives lists; tuples keep the frozen config hashable. Types are checked, values never changed.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        problems = _check(self)
        if problems:
            raise DataError("mixing settings: " + ("\n  " if len(problems) > 1 else "") + "\n  ".join(problems))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str = "mixing") -> "MixingConfig":
        """From a recipe section; an unknown key is an error that lists the valid ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            raise DataError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
        return cls(**dict(mapping))

    @property
    def enabled(self) -> bool:
        return bool(self.clean_lists or self.clean_pair_lists)

    @property
    def valid_enabled(self) -> bool:
        return bool(self.valid_clean_lists or self.valid_clean_pair_lists)

    def lists(self, split: str) -> dict[str, tuple[str, ...]]:
        """The list files of ``split`` ("train" or "valid") by role: clean, clean_pairs, noise, rir."""
        if split == "train":
            return {"clean": self.clean_lists, "clean_pairs": self.clean_pair_lists, "noise": self.noise_lists,
                    "rir": self.rir_lists}
        if split == "valid":
            return {"clean": self.valid_clean_lists, "clean_pairs": self.valid_clean_pair_lists,
                    "noise": self.valid_noise_lists or self.noise_lists, "rir": self.valid_rir_lists or self.rir_lists}
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")

    def weights(self) -> tuple[float, ...]:
        """The noise lists' probabilities (normalised weights; equal when none are given)."""
        raw = self.noise_weights or (1.0,) * len(self.noise_lists)
        total = sum(raw)
        return tuple(w / total for w in raw)

    def training_settings(self) -> dict[str, Any]:
        """Every setting but the list paths that changes the training mixtures (what a resume must keep), as
        plain JSON values; the lists are compared by content (:func:`data.mix_lists.list_digests`)."""
        skip = {"allow_changed_lists", "clean_lists", "clean_pair_lists", "noise_lists", "rir_lists", "valid_clean_lists",
                "valid_clean_pair_lists", "valid_noise_lists", "valid_rir_lists"}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in skip}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range(cfg: MixingConfig, name: str, integer: bool = False, low: float | None = None, high: float | None = None) -> list[str]:
    value = getattr(cfg, name)
    kind = "integers" if integer else "numbers"
    if not (isinstance(value, tuple) and len(value) == 2 and all(_number(v) for v in value)
            and (not integer or all(isinstance(v, int) for v in value))):
        return [f"mixing.{name}: {value!r} is not a [low, high] pair of finite {kind}"]
    lo, hi = value
    out = []
    if lo > hi:
        out.append(f"mixing.{name}: [{lo}, {hi}] has low above high; write [{hi}, {lo}]")
    if low is not None and lo < low:
        out.append(f"mixing.{name}: low {lo} is below {low}")
    if high is not None and hi > high:
        out.append(f"mixing.{name}: high {hi} is above {high}")
    return out


def _check(cfg: MixingConfig) -> list[str]:
    out: list[str] = []
    for name in ("clean_lists", "clean_pair_lists", "noise_lists", "rir_lists", "valid_clean_lists",
                 "valid_clean_pair_lists", "valid_noise_lists", "valid_rir_lists"):
        value = getattr(cfg, name)
        if not (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)):
            out.append(f"mixing.{name}: {value!r} is not a list of list-file paths")
    if out:
        return out
    if cfg.enabled and not cfg.noise_lists:
        out.append("mixing.noise_lists: empty, but clean speech is given; name at least one noise list")
    if not cfg.enabled:
        given = [n for n in ("noise_lists", "rir_lists", "valid_clean_lists", "valid_clean_pair_lists") if getattr(cfg, n)]
        if given:
            out.append(f"mixing.{given[0]} is set but mixing is off (no mixing.clean_lists or mixing.clean_pair_lists)")
    if cfg.valid_enabled is False and (cfg.valid_noise_lists or cfg.valid_rir_lists):
        out.append("mixing.valid_noise_lists/valid_rir_lists are set but no valid_clean_lists or valid_clean_pair_lists")
    w = cfg.noise_weights
    if not (isinstance(w, tuple) and all(_number(v) for v in w)):
        out.append(f"mixing.noise_weights: {w!r} is not a list of numbers")
    elif w and len(w) != len(cfg.noise_lists):
        out.append(f"mixing.noise_weights: {len(w)} weight(s) for {len(cfg.noise_lists)} noise list(s); give one per list or none (equal)")
    elif any(v <= 0 for v in w):
        out.append(f"mixing.noise_weights: {list(w)}: every weight must be > 0 (remove a list instead of weighting it 0)")
    for name in ("noise_sources", "source_level_db", "snr_db", "speech_level_dbfs"):
        low, high, _, _ = LIMITS[name]
        out += _range(cfg, name, integer=name == "noise_sources", low=low, high=high)
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            out.append(f"mixing.{name}: {getattr(cfg, name)!r} is not one of {', '.join(choices)}")
    for name in ("crossfade_ms", "rir_probability", "rir_max_seconds", "early_ms", "max_peak", "silence_dbfs"):
        low, high, open_low, _ = LIMITS[name]
        value = getattr(cfg, name)
        if not _number(value) or value > high or value < low or (open_low and value == low):
            out.append(f"mixing.{name}: {value!r} is not a number in {'(' if open_low else '['}{low:g}, {high:g}]")
    share = cfg.premixed_share
    if not _number(share) or not 0.0 <= share < 1.0:
        out.append(f"mixing.premixed_share: {share!r} is not a number in [0, 1) (the share of pre-mixed pairs per epoch)")
    if cfg.rir_lists == () and cfg.target != "dry":
        out.append(f"mixing.target: {cfg.target!r} needs mixing.rir_lists (without RIRs the target is the clean speech)")
    if not (isinstance(cfg.samples_per_epoch, int) and not isinstance(cfg.samples_per_epoch, bool) and cfg.samples_per_epoch >= 0):
        out.append(f"mixing.samples_per_epoch: {cfg.samples_per_epoch!r} is not an integer >= 0 (0: one mixture per clean file)")
    for name in ("renormalize", "allow_changed_lists"):
        if not isinstance(getattr(cfg, name), bool):
            out.append(f"mixing.{name}: {getattr(cfg, name)!r} is not true or false")
    return out


def epoch_layout(mixtures_per_epoch: int, premixed_pairs: int, premixed_share: float) -> tuple[int, int]:
    """(pre-mixed pairs, mixtures) per epoch for ``premixed_share`` of pre-mixed pairs.

    The pre-mixed count is ``round(share / (1 - share) · mixtures)``; it may not exceed the pairs there are
    (a pair twice in an epoch would be the same crop twice). Pure.
    """
    if premixed_share == 0:
        return 0, mixtures_per_epoch
    if not 0 < premixed_share < 1:
        raise DataError(f"mixing.premixed_share must be in [0, 1), got {premixed_share}")
    count = round(premixed_share / (1 - premixed_share) * mixtures_per_epoch)
    if count < 1:
        raise DataError(f"mixing.premixed_share {premixed_share} of {mixtures_per_epoch} mixtures per epoch is less than "
                        "one pre-mixed pair; raise the share or set it to 0")
    if count > premixed_pairs:
        most = premixed_pairs / (premixed_pairs + mixtures_per_epoch)
        raise DataError(
            f"mixing.premixed_share {premixed_share} with {mixtures_per_epoch} mixtures per epoch asks for {count} "
            f"pre-mixed pairs per epoch, but data.train_list has {premixed_pairs}; the largest share without repeating "
            f"a pair is {math.floor(most * 1000) / 1000}, or lower mixing.samples_per_epoch"
        )
    return count, mixtures_per_epoch

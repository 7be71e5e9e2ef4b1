"""Dynamic mixing: each noisy/clean training pair made on the fly from clean speech, noise and room impulse
responses, as a pure function of (seed, epoch, sample index).

Nothing here reads RNG state: every random choice of a mixture is a hash of (seed, epoch, sample index,
what is being drawn, which source) — splitmix64, as for the crops of :class:`data.CropDataset` — so the same
key gives the same mixture in any process: any rank, world size, number of loader workers, and after any
resume. Plug it into :class:`data.CursorSampler` (keys ``(sample_index, epoch)``) like a CropDataset; with
``fixed=True`` (validation) the epoch is ignored and every epoch sees the same mixtures.

Signal work is torchaudio's: ``functional.add_noise`` (the SNR), ``functional.fftconvolve`` (reverberation),
``functional.resample`` (files at other rates, through :func:`data.audio.read_window`) and
``transforms.Fade`` (equal-power crossfades where a short noise is looped). Only the crop windows are read
(seek + read), as CropDataset does; impulse responses and noise files shorter than a crop are read whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset
from torchaudio.transforms import Fade

from .audio import _MASK64, _mix64, fast_fft_length, frames_at, level_gain, normalize_level, rms_dbfs
from .dataset import CropDataset, _open, _read
from .errors import DataError
from .index import FileIndex
from .mix_lists import MixingCorpus
from .mixing_config import MixingConfig, epoch_layout

# Per-sample flags (an int bitmask; ``flag_counts`` names them). The trainer sums them per logging interval.
SILENT_CLEAN = 1  # the clean crop was silent: noise alone, all-zero target
NOISE_DROPPED = 2  # a noise source was silent in every try and left out
NO_NOISE = 4  # every source was dropped: noisy equals the speech
PEAK_SCALED = 8  # mixture and target lowered together to max_peak
CLIPPED = 16  # peak_policy clip: the mixture was clipped at max_peak
REVERBERANT = 32  # an impulse response was applied
PREMIXED = 64  # a pre-mixed pair (JoinedDataset), not a mixture
FLAG_NAMES = {SILENT_CLEAN: "silent_clean", NOISE_DROPPED: "noise_dropped", NO_NOISE: "no_noise",
              PEAK_SCALED: "peak_scaled", CLIPPED: "clipped", REVERBERANT: "reverberant", PREMIXED: "premixed"}

_NOISE_TRIES = 4  # per source: a silent crop is drawn again (other file and place) this many times in all

# What is drawn: the stream ids of the hash. New draws get new ids; existing ones never change meaning.
_CLEAN_OFFSET, _RIR_APPLY, _RIR_PICK, _SNR, _LEVEL, _NUM_SOURCES = 1, 2, 3, 4, 5, 6
_SOURCE_LIST, _SOURCE_FILE, _SOURCE_OFFSET, _SOURCE_LEVEL = 7, 8, 9, 10


class Draws:
    """Counter-based random numbers of one mixture: ``(seed, epoch, sample_index)`` -> values, no state.

    ``epoch=None`` is the fixed (validation) stream. Each draw is named by a stream id and a counter
    (source number, try), so adding a draw elsewhere never shifts the others.
    """

    __slots__ = ("_key",)

    def __init__(self, seed: int, epoch: int | None, sample_index: int) -> None:
        tag = _MASK64 if epoch is None else epoch & (_MASK64 >> 1)
        self._key = _mix64(_mix64(_mix64(seed & _MASK64) ^ tag) ^ (sample_index & _MASK64))

    def bits(self, stream: int, k: int = 0) -> int:
        return _mix64(_mix64(self._key ^ stream) ^ (k & _MASK64))

    def uniform(self, stream: int, low: float = 0.0, high: float = 1.0, k: int = 0) -> float:
        """Uniform in [low, high) (exactly ``low`` when they are equal)."""
        if low == high:
            return float(low)
        return low + (high - low) * ((self.bits(stream, k) >> 11) * 2.0**-53)

    def below(self, stream: int, n: int, k: int = 0) -> int:
        """Uniform integer in [0, n)."""
        if n <= 0:
            raise ValueError(f"below({n}): need n >= 1")
        return self.bits(stream, k) % n


@dataclass
class Mixture:
    """One mixture and how it was made (``MixingDataset.mix``). Arrays are float32 of the segment length.

    ``noisy`` and ``clean`` are what training gets. ``speech`` (the speech as it sounds in the mixture:
    reverberant when an impulse response was applied) and ``noise`` (the scaled sum of the sources) are the
    components before clipping and renormalisation: ``noisy == speech + noise`` then, and
    ``10·log10(Σspeech² / Σnoise²) == snr_db`` unless the clean crop was silent or every source dropped.
    ``valid_samples`` is the crop's real length (the rest is zero padding).
    """

    noisy: np.ndarray
    clean: np.ndarray
    speech: np.ndarray
    noise: np.ndarray
    snr_db: float
    speech_level_dbfs: float
    flags: int
    valid_samples: int
    clean_where: str
    noise_where: tuple[str, ...]
    rir_where: str | None
    peak_gain: float  # common gain of the peak policy (1.0: none)
    clipped_samples: int
    noisy_gain: float  # renormalisation gains (1.0 without renormalize)
    clean_gain: float


def flag_counts(flags: torch.Tensor | np.ndarray | Sequence[int]) -> dict[str, int]:
    """How many samples carry each flag, by name (every name present, zeros included)."""
    values = np.asarray(flags.cpu() if isinstance(flags, torch.Tensor) else flags, dtype=np.int64).ravel()
    return {name: int(np.count_nonzero(values & bit)) for bit, name in FLAG_NAMES.items()}


class MixingDataset(Dataset):
    """Mixtures of ``segment_seconds`` at ``sample_rate_hz``: ``dataset[(sample_index, epoch)] -> (noisy, clean)``.

    Keys as :class:`CropDataset`'s: ``(i, epoch)``, ``(i, epoch, weight)`` from :class:`data.EvalSampler`
    (then ``(noisy, clean, weight)``), or a bare int ``i`` for ``(i, 0)``. With ``return_flags`` each item
    ends with an int64 scalar of the flags above.

    Index space: ``num_samples`` mixtures per epoch (default: one per clean file). Sample ``i`` of epoch
    ``e`` uses clean file ``(i + e·num_samples) mod C`` (``C`` clean files): each file once per epoch when
    ``num_samples == C``; a window moving through the files when fewer; files several times per epoch with
    different draws when more. All draws hash ``(seed, e, i)``, never the clean file, so two samples on the
    same file differ. ``fixed=True`` uses epoch 0's files and the fixed stream for every epoch.

    How one mixture is made, in order (see :class:`data.mixing_config.MixingConfig` for the settings):
    the clean crop (offset uniform over the file; with an impulse response also the samples before it, so
    the reverberation entering the window is the file's own) → reverberation and target → the speech's
    active level set to the drawn level (target the same gain) → noise sources summed at their relative
    levels → ``add_noise`` at the drawn SNR over the crop's real samples → peak policy → renormalisation →
    zero padding. See :class:`Mixture` for what is recorded.

    Read errors are DataErrors naming ``list:line: path``; a file at another rate is refused unless
    ``resample``.
    """

    def __init__(
        self,
        corpus: MixingCorpus,
        config: MixingConfig,
        segment_seconds: float = 4.0,
        sample_rate_hz: int = 48000,
        seed: int = 777,
        fixed: bool = False,
        num_samples: int | None = None,
        resample: bool = False,
        return_flags: bool = False,
    ) -> None:
        if corpus.num_clean == 0:
            raise DataError("mixing: no clean files to mix")
        if not corpus.noises or any(len(n) == 0 for n in corpus.noises):
            raise DataError("mixing: every noise list needs at least one file")
        if len(corpus.noises) != len(config.weights()):
            raise DataError(f"mixing: {len(corpus.noises)} noise lists in the corpus, {len(config.weights())} in the settings")
        if not segment_seconds > 0:
            raise DataError(f"segment_seconds must be > 0, got {segment_seconds}")
        if not (isinstance(sample_rate_hz, int) and sample_rate_hz > 0):
            raise DataError(f"sample_rate_hz must be a positive integer, got {sample_rate_hz!r}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.corpus = corpus
        self.config = config
        self.segment_seconds = float(segment_seconds)
        self.sample_rate_hz = sample_rate_hz
        self.segment_samples = int(round(segment_seconds * sample_rate_hz))
        self.seed = seed
        self.fixed = fixed
        self.num_clean = corpus.num_clean
        count = num_samples if num_samples is not None else (config.samples_per_epoch or self.num_clean)
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise DataError(f"num_samples must be a positive integer, got {count!r}")
        self.num_samples = count
        self.resample = resample
        self.return_flags = return_flags
        self._clean_offsets = np.cumsum([0] + [len(c) for c in corpus.clean])
        self._cumulative_weights = np.cumsum(config.weights())
        self._rirs = corpus.rirs if (corpus.rirs is not None and len(corpus.rirs) and config.rir_probability > 0) else None
        self._crossfade = int(round(config.crossfade_ms * sample_rate_hz / 1000))
        self._early = int(round(config.early_ms * sample_rate_hz / 1000))
        self._rir_max = int(round(config.rir_max_seconds * sample_rate_hz))
        self._silence_rms = 10.0 ** (config.silence_dbfs / 20.0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, ...]:
        weight = None
        if isinstance(key, (tuple, list)):
            if len(key) == 3:
                weight = float(key[2])
            elif len(key) != 2:
                raise TypeError(f"key must be (sample_index, epoch) or (sample_index, epoch, weight), got {key!r}")
            i, epoch = int(key[0]), int(key[1])
        else:
            i, epoch = int(key), 0
        m = self.mix(i, epoch)
        out: tuple[torch.Tensor, ...] = (torch.from_numpy(m.noisy), torch.from_numpy(m.clean))
        if weight is not None:
            out += (torch.tensor(weight, dtype=torch.float32),)
        if self.return_flags:
            out += (torch.tensor(m.flags, dtype=torch.int64),)
        return out

    def clean_file(self, i: int, epoch: int) -> tuple[FileIndex, int]:
        """(index, entry) of the clean file that sample ``i`` of ``epoch`` mixes."""
        e = 0 if self.fixed else epoch
        c = (i + e * self.num_samples) % self.num_clean
        part = int(np.searchsorted(self._clean_offsets, c, side="right")) - 1
        return self.corpus.clean[part], c - int(self._clean_offsets[part])

    def mix(self, i: int, epoch: int) -> Mixture:
        """The mixture of sample ``i`` in ``epoch``, with its components and what was drawn."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} mixtures per epoch")
        cfg = self.config
        d = Draws(self.seed, None if self.fixed else epoch, i)
        rir, direct, rir_where = self._room(d)
        x, take, clean_where = self._clean_crop(d, i, epoch, pre=rir.numel() - 1 if rir is not None else 0)
        dry = x[x.numel() - take :]
        speech, target = self._reverberate(x, rir, direct, take) if rir is not None else (dry, dry)
        level = d.uniform(_LEVEL, *cfg.speech_level_dbfs)
        snr = d.uniform(_SNR, *cfg.snr_db)
        noise, noise_where, dropped = self._noise(d, take)
        silent = rms_dbfs(dry.numpy()) < cfg.silence_dbfs
        noisy, speech, target, noise, flags = _at_snr(speech, target, noise, level, snr, silent)
        flags |= (REVERBERANT if rir is not None else 0) | (NOISE_DROPPED if dropped else 0)
        noisy, target, speech, noise, peak_gain, clipped, peak_flags = self._full_scale(noisy, target, speech, noise)
        noisy_np, target_np = noisy.numpy(), target.numpy()
        noisy_gain = clean_gain = 1.0
        if cfg.renormalize:
            noisy_gain, noisy_np = level_gain(noisy_np), normalize_level(noisy_np)
            if not silent:  # an all-zero target stays zero
                clean_gain, target_np = level_gain(target_np), normalize_level(target_np)
        L = self.segment_samples
        return Mixture(
            noisy=_pad(noisy_np, L), clean=_pad(target_np, L), speech=_pad(speech.numpy(), L), noise=_pad(noise.numpy(), L),
            snr_db=snr, speech_level_dbfs=level, flags=flags | peak_flags, valid_samples=take, clean_where=clean_where,
            noise_where=noise_where, rir_where=rir_where, peak_gain=peak_gain, clipped_samples=clipped,
            noisy_gain=noisy_gain, clean_gain=clean_gain,
        )

    def _room(self, d: Draws) -> tuple[torch.Tensor | None, int, str | None]:
        """(impulse response, its direct-path index, list:line: path), or (None, 0, None) for a dry mixture."""
        if self._rirs is None or d.uniform(_RIR_APPLY) >= self.config.rir_probability:
            return None, 0, None
        entry = d.below(_RIR_PICK, len(self._rirs))
        h, direct = self._read_rir(entry)
        return h, direct, f"{self._rirs.where(entry)}: {self._rirs.path(entry)}"

    def _clean_crop(self, d: Draws, i: int, epoch: int, pre: int) -> tuple[torch.Tensor, int, str]:
        """(``pre`` samples before the crop, then the crop; its real length; list:line: path).

        The samples before the crop are the file's own where it has them (the reverberation entering the
        window), silence before the file's start.
        """
        index, entry = self.clean_file(i, epoch)
        path, where = index.path(entry), index.where(entry)
        L = self.segment_samples
        with _open(path, where) as f:
            n = self._frames(f, path, where)
            if n <= 0:
                raise DataError(f"{where}: {path}: empty file (0 frames)")
            take = min(n, L)
            start = d.below(_CLEAN_OFFSET, n - L + 1) if n > L else 0
            avail = min(start, pre)
            x = torch.from_numpy(_read(f, start - avail, avail + take, self.sample_rate_hz, path, where))
        if avail < pre:
            x = torch.nn.functional.pad(x, (pre - avail, 0))
        return x, take, f"{where}: {path}"

    def _full_scale(self, noisy: torch.Tensor, target: torch.Tensor, speech: torch.Tensor, noise: torch.Tensor) -> tuple:
        """The peak policy: (noisy, target, speech, noise, common gain, clipped samples, flags)."""
        cfg = self.config
        flags, gain, clipped = 0, 1.0, 0
        if noisy.numel() == 0:
            return noisy, target, speech, noise, gain, clipped, flags
        # The target is never clipped: when it alone exceeds, both policies lower everything together.
        over = max(float(target.abs().max()), float(noisy.abs().max()) if cfg.peak_policy == "scale" else 0.0)
        if over > cfg.max_peak:
            gain = cfg.max_peak / over
            noisy, target, speech, noise = noisy * gain, target * gain, speech * gain, noise * gain
            flags |= PEAK_SCALED
        if cfg.peak_policy == "clip":
            clipped = int((noisy.abs() > cfg.max_peak).sum())
            if clipped:
                noisy = noisy.clamp(-cfg.max_peak, cfg.max_peak)
                flags |= CLIPPED
        return noisy, target, speech, noise, gain, clipped, flags

    def _frames(self, f: sf.SoundFile, path: str, where: str) -> int:
        if f.samplerate != self.sample_rate_hz and not self.resample:
            raise DataError(f"{where}: {path}: sample rate {f.samplerate} Hz, expected {self.sample_rate_hz} Hz; "
                            "convert the file or enable resampling (data.resample)")
        return frames_at(f.frames, f.samplerate, self.sample_rate_hz)

    def _read_whole(self, index: FileIndex, entry: int) -> torch.Tensor:
        path, where = index.path(entry), index.where(entry)
        with _open(path, where) as f:
            n = self._frames(f, path, where)
            if n <= 0:
                raise DataError(f"{where}: {path}: empty file (0 frames)")
            return torch.from_numpy(_read(f, 0, n, self.sample_rate_hz, path, where))

    def _read_rir(self, entry: int) -> tuple[torch.Tensor, int]:
        """The impulse response cut to rir_max_seconds after its direct path (the largest tap), and that index."""
        h = self._read_whole(self._rirs, entry)
        direct = int(h.abs().argmax())
        if float(h[direct].abs()) == 0.0 or not bool(torch.isfinite(h).all()):
            raise DataError(f"{self._rirs.where(entry)}: {self._rirs.path(entry)}: impulse response without energy or "
                            "with non-finite samples (validate the lists first)")
        return h[: direct + self._rir_max], direct

    def _reverberate(self, x: torch.Tensor, h: torch.Tensor, direct: int, take: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(speech in the mixture, target): full reverberation, and the dry, early or reverberant target.

        ``x`` holds ``len(h) - 1`` samples before the crop. The convolution's length is padded up to a fast FFT
        size (:func:`conv_length`; zeros at the end change nothing inside the window we keep).
        """
        pre = h.numel() - 1
        full = x.numel() + h.numel() - 1
        xp = torch.nn.functional.pad(x, (0, conv_length(full) - full))
        target_kind = self.config.target
        if target_kind == "early":
            early = torch.zeros_like(h)
            early[: direct + self._early + 1] = h[: direct + self._early + 1]
            y = AF.fftconvolve(xp[None], torch.stack([h, early]))
            return y[0, pre : pre + take], y[1, pre : pre + take]
        y = AF.fftconvolve(xp, h)
        speech = y[pre : pre + take]
        if target_kind == "reverberant":
            return speech, speech
        # The direct-path sound: the tap at the direct path times the clean, delayed by its index.
        return speech, h[direct] * x[pre - direct : pre - direct + take]

    def _noise(self, d: Draws, take: int) -> tuple[torch.Tensor | None, tuple[str, ...], int]:
        """(sum of the sources at their relative levels, or None when all were dropped; their list:line; dropped)."""
        cfg = self.config
        low, high = cfg.noise_sources
        count = low + d.below(_NUM_SOURCES, high - low + 1)
        total: torch.Tensor | None = None
        wheres: list[str] = []
        dropped = 0
        for k in range(count):
            u = d.uniform(_SOURCE_LIST, k=k)
            index = self.corpus.noises[min(int(np.searchsorted(self._cumulative_weights, u, side="right")),
                                           len(self.corpus.noises) - 1)]
            for attempt in range(_NOISE_TRIES):
                key = k * _NOISE_TRIES + attempt
                entry = d.below(_SOURCE_FILE, len(index), key)
                piece = self._noise_piece(index, entry, take, d, key)
                level = _rms(piece)
                if level >= self._silence_rms:
                    break
            else:
                dropped += 1
                continue
            wheres.append(f"{index.where(entry)}: {index.path(entry)}")
            relative_db = 0.0 if total is None else d.uniform(_SOURCE_LEVEL, *cfg.source_level_db, k=k)
            piece = piece * (10.0 ** (relative_db / 20.0) / level)
            total = piece if total is None else total + piece
        return total, tuple(wheres), dropped

    def _noise_piece(self, index: FileIndex, entry: int, need: int, d: Draws, key: int) -> torch.Tensor:
        """``need`` samples of a noise file: a window of a long one, a short one looped (or padded)."""
        path, where = index.path(entry), index.where(entry)
        with _open(path, where) as f:
            n = self._frames(f, path, where)
            if n <= 0:
                raise DataError(f"{where}: {path}: empty file (0 frames)")
            if n >= need:
                start = d.below(_SOURCE_OFFSET, n - need + 1, key)
                return torch.from_numpy(_read(f, start, need, self.sample_rate_hz, path, where))
            x = torch.from_numpy(_read(f, 0, n, self.sample_rate_hz, path, where))
        if self.config.short_noise == "pad":
            out = torch.zeros(need)
            at = d.below(_SOURCE_OFFSET, need - n + 1, key)
            out[at : at + n] = x
            return out
        return loop_with_crossfade(x, d.below(_SOURCE_OFFSET, n, key), need, self._crossfade)


def _at_snr(speech: torch.Tensor, target: torch.Tensor, noise: torch.Tensor | None, level_dbfs: float, snr_db: float,
            silent: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(noisy, speech, target, noise, flags): the speech set to ``level_dbfs`` (target alike), the noise added
    at ``snr_db`` by torchaudio's add_noise; ``noisy == speech + noise``.

    A silent clean crop has no SNR: the pair becomes the noise alone at the level the speech would have had
    minus the SNR, with an all-zero target. Without noise (every source dropped) noisy is the speech.
    """
    take = speech.numel()
    flags = 0
    if silent:
        flags |= SILENT_CLEAN
        speech, target = torch.zeros(take), torch.zeros(take)
        if noise is not None:
            noise = noise * (10.0 ** ((level_dbfs - snr_db) / 20.0) / _rms(noise))
    else:
        gain = level_gain(speech.numpy(), level_dbfs)
        speech, target = speech * gain, target * gain
    if noise is None:
        return speech.clone(), speech, target, torch.zeros(take), flags | NO_NOISE
    if silent:
        return noise.clone(), speech, target, noise, flags
    noisy = AF.add_noise(speech[None], noise[None], torch.tensor([snr_db], dtype=torch.float32))[0]
    return noisy, speech, target, noisy - speech, flags


def loop_with_crossfade(x: torch.Tensor, start: int, need: int, crossfade: int) -> torch.Tensor:
    """``need`` samples of ``x`` played from ``start`` and looped, each join an equal-power crossfade.

    Over a join the outgoing copy fades out and the next fades in over up to ``crossfade`` samples
    (torchaudio's quarter-sine fades: their squares sum to one, so uncorrelated noise keeps its level
    through the join instead of dipping by 3 dB as with linear fades). A fade never takes more than half a
    piece.
    """
    n = x.numel()
    c = min(crossfade, n // 2)
    first = x[start:]
    c1 = min(c, first.numel() // 2)
    out = torch.zeros(need + 2 * n)
    out[: first.numel()] = Fade(fade_out_len=c1, fade_shape="quarter_sine")(first)
    pos = first.numel()
    piece = Fade(fade_in_len=c1, fade_out_len=c, fade_shape="quarter_sine")(x)
    out[pos - c1 : pos - c1 + n] += piece
    pos += n - c1
    if pos < need:
        middle = Fade(fade_in_len=c, fade_out_len=c, fade_shape="quarter_sine")(x)
        while pos < need:
            out[pos - c : pos - c + n] += middle
            pos += n - c
    return out[:need]


def conv_length(n: int) -> int:
    """The FFT length used for a convolution of ``n`` output samples: the smallest even 2^a·3^b·5^c >= n.

    fftconvolve transforms at exactly ``len(x) + len(h) - 1``, which for some impulse-response lengths is a
    prime or has a large prime factor: several times slower (bench/bench_mixing.py measures it). Even, since
    a real FFT of even length is done as a complex one of half the length.
    """
    return 2 * fast_fft_length(-(-n // 2))


def _rms(x: torch.Tensor) -> float:
    return math.sqrt(float(torch.dot(x, x)) / x.numel()) if x.numel() else 0.0


def _pad(x: np.ndarray, length: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape[0] == length:
        return np.ascontiguousarray(x)
    out = np.zeros(length, dtype=np.float32)
    out[: x.shape[0]] = x
    return out


class JoinedDataset(Dataset):
    """One index space over datasets that each give a fixed number of samples per epoch.

    ``parts`` is ``[(dataset, per_epoch), ...]``; sample ``j`` of the joined space falls in part ``p`` when
    ``start_p <= j < start_p + per_epoch_p`` and maps to that dataset's item
    ``(j - start_p + epoch·per_epoch_p) mod len(dataset)``: when a part gives fewer samples per epoch than it
    has, successive epochs move on through it. A pure function of (j, epoch), so a CursorSampler over
    ``len(joined)`` samples keeps every guarantee (world size, workers, resume). The share of each part is
    exact per epoch; within a micro-batch it varies around it (the sampler shuffles the whole space).

    With ``return_flags`` every item ends with an int64 flags scalar: a MixingDataset part must return its
    flags too; a CropDataset part's items get ``PREMIXED``.
    """

    def __init__(self, parts: Sequence[tuple[Dataset, int]], return_flags: bool = False) -> None:
        if not parts:
            raise DataError("JoinedDataset needs at least one part")
        for dataset, per_epoch in parts:
            if isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch <= 0:
                raise DataError(f"samples per epoch must be positive integers, got {per_epoch!r}")
            if per_epoch > len(dataset):
                raise DataError(f"a part gives {per_epoch} samples per epoch but holds {len(dataset)}: items would repeat")
            if return_flags and isinstance(dataset, MixingDataset) and not dataset.return_flags:
                raise DataError("JoinedDataset(return_flags=True) needs MixingDataset(return_flags=True) parts")
            if return_flags and not isinstance(dataset, (MixingDataset, CropDataset)):
                raise DataError(f"JoinedDataset(return_flags=True) takes MixingDataset and CropDataset parts, got {type(dataset).__name__}")
        self.parts = [(dataset, per_epoch) for dataset, per_epoch in parts]
        self.starts = np.cumsum([0] + [per_epoch for _, per_epoch in parts])
        self.return_flags = return_flags

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, j: int, epoch: int) -> tuple[int, int]:
        """(part, item) of joined sample ``j`` in ``epoch``."""
        if not 0 <= j < len(self):
            raise IndexError(f"sample {j} out of range for {len(self)} samples per epoch")
        p = int(np.searchsorted(self.starts, j, side="right")) - 1
        dataset, per_epoch = self.parts[p]
        return p, (j - int(self.starts[p]) + epoch * per_epoch) % len(dataset)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(key, (tuple, list)):
            j, epoch, rest = int(key[0]), int(key[1]), tuple(key[2:])
        else:
            j, epoch, rest = int(key), 0, ()
        p, item = self.locate(j, epoch)
        dataset = self.parts[p][0]
        out = dataset[(item, epoch, *rest)]
        if self.return_flags and isinstance(dataset, CropDataset):
            out = (*out, torch.tensor(PREMIXED, dtype=torch.int64))
        return out


def mixing_training_set(config: MixingConfig, corpus: MixingCorpus, *, premixed: CropDataset | None = None,
                        segment_seconds: float = 4.0, sample_rate_hz: int = 48000, seed: int = 777,
                        resample: bool = False, return_flags: bool = True) -> tuple[Dataset, int, int]:
    """The training dataset of a mixing recipe: (dataset, pre-mixed pairs per epoch, mixtures per epoch).

    Without ``premixed`` (or with ``config.premixed_share`` 0) the MixingDataset itself; otherwise a
    JoinedDataset of ``premixed`` (CropDataset over data.train_list) and the mixtures, laid out by
    :func:`epoch_layout`. Its length is the CursorSampler's ``num_samples``.
    """
    mix = MixingDataset(corpus, config, segment_seconds=segment_seconds, sample_rate_hz=sample_rate_hz, seed=seed,
                        resample=resample, return_flags=return_flags)
    if premixed is None or config.premixed_share == 0:
        return mix, 0, len(mix)
    count, mixtures = epoch_layout(len(mix), len(premixed), config.premixed_share)
    return JoinedDataset([(premixed, count), (mix, mixtures)], return_flags=return_flags), count, mixtures

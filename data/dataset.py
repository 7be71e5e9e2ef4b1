"""Fixed-length noisy/clean crops, read straight from the files."""

from __future__ import annotations

from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from .audio import crop_offset, describe_error, frames_at, normalize_level, read_window
from .errors import DataError
from .index import PairIndex


class CropDataset(Dataset):
    """Crops of ``segment_seconds`` at the same window of noisy and clean, as float32 tensors of shape (L,).

    ``L = round(segment_seconds * sample_rate_hz)`` (192000 for the recipe's 4 s at 48 kHz).

    Keys: ``dataset[(sample_index, epoch)] -> (noisy, clean)``; the samplers of :mod:`data.sampler` yield these.
    A key ``(sample_index, epoch, weight)`` (from :class:`data.EvalSampler`) returns ``(noisy, clean, weight)``
    with ``weight`` a float32 scalar tensor. A bare int ``i`` means ``(i, 0)``.

    Crop window. Pairs at least L long get the window ``[o, o+L)`` with ``o`` uniform in ``[0, n-L]``, ``n``
    the pair's length (the shorter of noisy and clean, in samples at ``sample_rate_hz``); ``o`` is a hash of
    (seed, epoch, sample_index) (:func:`data.audio.crop_offset`), never worker RNG state, so a resumed run reads
    exactly the same crops. With ``random_crop=False`` (validation) ``o`` depends on (seed, sample_index) only:
    each pair is cut at the same place every epoch, so validation losses compare across epochs, and the place
    is spread over the file rather than always at its start (where recordings are often silent). Shorter pairs
    are read whole and zero-padded at the end.

    Only the window is read (soundfile seek + read); multi-channel files give their first channel.

    Level: with ``normalize=True`` noisy and clean are each scaled to -25 dBFS as the reference does
    (:func:`data.audio.normalize_level`), computed over the crop's real samples before zero-padding. The
    reference normalises the whole file before cropping; reading only the crop makes that impossible without
    decoding every file, so here the gain comes from the crop itself (the same result for pairs shorter than
    L). ``normalize=False`` returns the samples as stored.

    Sample rate: a file at another rate is a DataError naming it and its rate, unless ``resample=True``; then
    the window is located in the file's own rate and resampled (torchaudio) to exactly L samples. Any failure
    to read is a DataError naming the file and its ``list:line``.
    """

    def __init__(
        self,
        index: PairIndex,
        segment_seconds: float = 4.0,
        sample_rate_hz: int = 48000,
        normalize: bool = True,
        resample: bool = False,
        seed: int = 777,
        random_crop: bool = True,
    ) -> None:
        if len(index) == 0:
            raise DataError("the index holds no pairs: nothing to train on")
        if not segment_seconds > 0:
            raise DataError(f"segment_seconds must be > 0, got {segment_seconds}")
        if not (isinstance(sample_rate_hz, int) and sample_rate_hz > 0):
            raise DataError(f"sample_rate_hz must be a positive integer, got {sample_rate_hz!r}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.index = index
        self.segment_seconds = float(segment_seconds)
        self.sample_rate_hz = sample_rate_hz
        self.segment_samples = int(round(segment_seconds * sample_rate_hz))
        self.normalize = normalize
        self.resample = resample
        self.seed = seed
        self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.index)

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
        noisy, clean = self.read_pair(i, epoch)
        if weight is None:
            return torch.from_numpy(noisy), torch.from_numpy(clean)
        return torch.from_numpy(noisy), torch.from_numpy(clean), torch.tensor(weight, dtype=torch.float32)

    def read_pair(self, i: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The (noisy, clean) crop of pair ``i`` in ``epoch`` as float32 numpy arrays of length L."""
        where = self.index.where(i)
        noisy_path, clean_path = self.index.pair(i)
        L = self.segment_samples
        with _open(noisy_path, where) as fn, _open(clean_path, where) as fc:
            n = min(self._length(fn, noisy_path, where), self._length(fc, clean_path, where))
            if n <= 0:
                raise DataError(f"{where}: {noisy_path}: empty pair (noisy {fn.frames} frames, clean {fc.frames} frames)")
            take = min(n, L)
            start = crop_offset(self.seed, epoch if self.random_crop else None, i, n - L) if n > L else 0
            noisy = _read(fn, start, take, self.sample_rate_hz, noisy_path, where)
            clean = _read(fc, start, take, self.sample_rate_hz, clean_path, where)
        if self.normalize:
            noisy, clean = normalize_level(noisy), normalize_level(clean)
        if take < L:
            noisy, clean = _pad(noisy, L), _pad(clean, L)
        return noisy, clean

    def _length(self, f: sf.SoundFile, path: str, where: str) -> int:
        if f.samplerate != self.sample_rate_hz and not self.resample:
            raise DataError(
                f"{where}: {path}: sample rate {f.samplerate} Hz, expected {self.sample_rate_hz} Hz; "
                "convert the file or enable resampling (resample=True)"
            )
        return frames_at(f.frames, f.samplerate, self.sample_rate_hz)


def _open(path: str, where: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(path)
    except Exception as exc:  # libsndfile's errors, permissions, ...: all name the file
        reason = describe_error(exc, path)
        raise DataError(f"{where}: {path}: {reason if reason == 'file not found' else 'cannot open: ' + reason}") from None


def _read(f: sf.SoundFile, start: int, count: int, rate: int, path: str, where: str) -> np.ndarray:
    try:
        return read_window(f, start, count, rate)
    except DataError as exc:
        raise DataError(f"{where}: {path}: {exc}") from None
    except Exception as exc:
        raise DataError(f"{where}: {path}: cannot read frames {start}..{start + count}: {describe_error(exc, path)}") from None


def _pad(x: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.float32)
    out[: x.shape[0]] = x
    return out

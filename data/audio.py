"""Reading windows of audio files, level normalisation and the deterministic crop offset."""

from __future__ import annotations

import math
import os

import numpy as np
import soundfile as sf

from .errors import DataError

TARGET_DBFS = -25.0
_TARGET_RMS = 10.0 ** (TARGET_DBFS / 20.0)
_EPS = 1e-6  # the reference's guard in both divisions

_MASK64 = (1 << 64) - 1
_RESAMPLE_MARGIN = 64  # file frames; torchaudio's default kernel reaches about 6.3 input frames (x ratio when downsampling)


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fixed, version-independent hash (numpy's streams may change between releases)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def crop_offset(seed: int, epoch: int | None, sample_index: int, span: int) -> int:
    """A uniform offset in ``[0, span]`` that depends only on (seed, epoch, sample_index).

    ``epoch=None`` is the fixed validation crop: the same for every epoch. Nothing here reads RNG state, so a
    resumed run, any worker, any world size reads exactly the same crops.
    """
    if span <= 0:
        return 0
    tag = _MASK64 if epoch is None else epoch & (_MASK64 >> 1)
    h = _mix64(_mix64(_mix64(seed & _MASK64) ^ tag) ^ (sample_index & _MASK64))
    return h % (span + 1)


def normalize_level(x: np.ndarray) -> np.ndarray:
    """Scale to -25 dBFS the way the reference does: RMS first, then RMS of the "active" samples.

    Step 1 scales the RMS to -25 dBFS; step 2 rescales so that the RMS over the samples whose power exceeds
    the mean power is -25 dBFS (speech pauses do not dilute the level), each gain guarded by the reference's
    ``+1e-6``. Unlike the reference, an all-zero input (or one of constant power) does not become NaN: it
    gets step 1 only. Sums of squares use BLAS dot products (float32 in, as the crop is).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return x.copy()
    return x * np.float32(level_gain(x, TARGET_DBFS))


def level_gain(x: np.ndarray, target_dbfs: float = TARGET_DBFS) -> float:
    """The gain that :func:`normalize_level`'s rule applies to bring ``x`` to ``target_dbfs`` (active level).

    1.0 for an empty input. Dynamic mixing sets speech to a drawn level with it, so a mixture's speech and a
    pre-mixed pair's clean side are measured alike.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return 1.0
    target_rms = _TARGET_RMS if target_dbfs == TARGET_DBFS else 10.0 ** (target_dbfs / 20.0)
    rms = math.sqrt(float(np.dot(x, x)) / x.size)
    gain = target_rms / (rms + _EPS)
    active = x[np.abs(x) > rms]  # power above the mean power; scaling by gain does not change the set
    if active.size:
        active_rms = gain * math.sqrt(float(np.dot(active, active)) / active.size)
        gain *= target_rms / (active_rms + _EPS)
    return gain


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level in dB relative to full scale (a full-scale square wave is 0 dBFS); -inf for silence."""
    x = np.asarray(x, dtype=np.float32)
    energy = float(np.dot(x, x)) if x.size else 0.0
    return 10.0 * math.log10(energy / x.size) if energy > 0 else -math.inf


def fast_fft_length(n: int) -> int:
    """The smallest 2^a·3^b·5^c >= n: FFTs of awkward (e.g. prime) lengths are many times slower."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p2 = p35 * (1 << max(0, (-(-n // p35) - 1).bit_length()))
            best = min(best, p2)
            p35 *= 3
        p5 *= 5
    return best


def describe_error(exc: BaseException, path: str) -> str:
    """A short reason for a failed open/read, without repeating the path (messages name it already)."""
    if isinstance(exc, FileNotFoundError) or not os.path.exists(path):
        return "file not found"
    if isinstance(exc, PermissionError) or not os.access(path, os.R_OK):
        return "permission denied"
    if os.path.isdir(path):
        return "is a folder, not an audio file"
    text = getattr(exc, "error_string", None) or str(exc).replace(f"'{path}'", "").replace(path, "").strip(" :")
    return text.rstrip(".") or type(exc).__name__


def frames_at(frames: int, file_rate_hz: int, sample_rate_hz: int) -> int:
    """Whole samples at ``sample_rate_hz`` covered by ``frames`` at ``file_rate_hz``."""
    return frames * sample_rate_hz // file_rate_hz


def read_window(f: sf.SoundFile, start: int, count: int, sample_rate_hz: int) -> np.ndarray:
    """``count`` samples at ``sample_rate_hz`` from sample ``start`` (both counted in the target rate).

    Only that window is read (seek + read; the rest of the file is never decoded); first channel only. When
    the file's rate differs, the window is located in the file's own rate with a margin of
    ``_RESAMPLE_MARGIN`` frames each side (so the resampling filter sees real neighbours, not zeros), read,
    resampled with torchaudio and cut to exactly ``count`` samples. The read starts on a frame whose time is a
    whole number of target samples, so the crop equals the same slice of the whole file resampled (to float
    rounding); a sample or two missing at the very end of a file, from rounding, is zero-filled.
    """
    rate = f.samplerate
    if rate == sample_rate_hz:
        f.seek(start)
        x = f.read(count, dtype="float32", always_2d=True)[:, 0]
        if x.shape[0] != count:
            raise DataError(f"file ended early: read {x.shape[0]} of {count} frames at {start} (header says {f.frames}); truncated file?")
        return np.ascontiguousarray(x)
    import torch
    import torchaudio.functional as AF

    g = math.gcd(rate, sample_rate_hz)
    period = rate // g  # file frames per whole number (sample_rate_hz // g) of target samples
    first = max(0, start * rate // sample_rate_hz - _RESAMPLE_MARGIN) // period * period
    last = min(f.frames, -(-(start + count) * rate // sample_rate_hz) + _RESAMPLE_MARGIN)
    f.seek(first)
    x = f.read(last - first, dtype="float32", always_2d=True)[:, 0]
    y = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), rate, sample_rate_hz).numpy()
    skip = start - first // period * (sample_rate_hz // g)
    y = y[skip : skip + count]
    if y.shape[0] == count:
        return np.ascontiguousarray(y)
    out = np.zeros(count, dtype=np.float32)
    out[: y.shape[0]] = y
    return out

"""Audio in and out for evaluation: whole files at 48 kHz, 16-bit WAVs written atomically, and where they go."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from launcher.scoring.batches import SAMPLE_RATE_HZ

if TYPE_CHECKING:
    import numpy as np


def read_audio(path: str, resample: bool) -> np.ndarray:
    """A whole file's first channel at 48 kHz, float32 numpy; data.audio reads and, if asked, resamples."""
    import soundfile as sf

    from data import DataError
    from data.audio import describe_error, frames_at, read_window

    try:
        with sf.SoundFile(path) as f:
            if f.samplerate != SAMPLE_RATE_HZ and not resample:
                raise DataError(f"{path}: sample rate {f.samplerate} Hz, expected {SAMPLE_RATE_HZ} Hz (pass --resample)")
            return read_window(f, 0, frames_at(f.frames, f.samplerate, SAMPLE_RATE_HZ), SAMPLE_RATE_HZ)
    except DataError:
        raise
    except Exception as e:  # libsndfile's errors: all name the file
        raise DataError(f"{path}: cannot read: {describe_error(e, path)}") from None


def write_wav(path: str, waveform: np.ndarray) -> None:
    """16-bit PCM at 48 kHz, written beside and renamed into place (a rank never leaves half a file)."""
    import numpy as np
    import soundfile as sf

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.wav"
    sf.write(tmp, np.clip(waveform, -1.0, 1.0), SAMPLE_RATE_HZ, subtype="PCM_16")
    os.replace(tmp, path)


def enhanced_paths(noisy_paths: Sequence[str], enhanced_dir: str) -> list[str]:
    """Where each pair's enhanced WAV goes: the noisy file's path below the noisy files' common folder, under
    `enhanced_dir` (plain names when they share one folder; subfolders keep equal names apart otherwise)."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in noisy_paths]
    common = os.path.commonpath(folders) if folders else ""
    return [os.path.join(enhanced_dir, os.path.relpath(os.path.abspath(p), common)) for p in noisy_paths]

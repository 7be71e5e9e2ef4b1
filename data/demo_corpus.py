"""A small synthetic 48 kHz noisy/clean corpus, deterministic from a seed, written in seconds.

Clean "speech" is a source-filter model: a sawtooth glottal source whose pitch follows a phrase contour
(declination, per-syllable targets, slight vibrato), shaped by three formants that glide from vowel to vowel,
in syllables of 90-280 ms with short gaps, pauses of 0.15-0.5 s between phrases, and noise-burst fricatives at
some syllable onsets. Noise is coloured (spectral slope between white and brown), often amplitude-modulated,
sometimes with mains hum or impulsive bursts, and is mixed offline at an SNR drawn from 0-15 dB over the
whole file (like the reference recipe's data). A mask model can learn this in a few hundred steps because
speech is harmonic and slowly varying while the noise is broadband and only partly predictable; its SNR gain
is measurable because the clean references are exact.

With ``use_espeak=True`` (and ``espeak-ng`` installed) the clean signal is synthesised speech instead:
closer to real speech but dependent on the espeak-ng version, hence off by default.

Every file depends only on (seed, split, file number), so the corpus is the same on every machine and a
corpus with more files extends a smaller one.

For dynamic mixing the same folder also gets clean lists (the pairs' clean files), noise files of their own
and synthetic room impulse responses, with their lists (:func:`make_mixing_material`); the pairs and their
lists are byte for byte what they are without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from .audio import fast_fft_length
from .errors import DataError

SAMPLE_RATE_HZ = 48000
_FORMAT_VERSION = 1
_MANIFEST = "demo_corpus.json"
_N_FFT = 1024
_HOP = 512  # formants move slowly: 10.7 ms frames are plenty, and half the work of hop 256
_VOWELS = np.array(  # F1, F2, F3 in Hz (adult male averages; scaled per speaker)
    [[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480], [570, 840, 2410], [660, 1720, 2410], [490, 1350, 1690]],
    dtype=np.float64,
)
_FORMANT_BANDWIDTHS = np.array([90.0, 110.0, 170.0])
_FORMANT_GAINS = np.array([1.0, 0.6, 0.3])


def _overlap_add_filter(x: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Filter ``x`` with a time-varying magnitude response ``gains`` (frames x bins), by STFT overlap-add."""
    n = x.size
    window = np.hanning(_N_FFT + 1)[:-1].astype(np.float32)
    ratio = _N_FFT // _HOP
    padded = np.pad(x.astype(np.float32), (_N_FFT, _N_FFT + _HOP))
    num = 1 + (padded.size - _N_FFT) // _HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP][:num]
    spec = np.fft.rfft(frames * window, axis=1)
    spec *= gains
    out_frames = (np.fft.irfft(spec, n=_N_FFT, axis=1) * window).reshape(num, ratio, _HOP)
    out = np.zeros((num + ratio - 1, _HOP), dtype=np.float32)
    norm = np.zeros((num + ratio - 1, _HOP), dtype=np.float32)
    w2 = (window * window).reshape(ratio, _HOP)
    for r in range(ratio):
        out[r : r + num] += out_frames[:, r]
        norm[r : r + num] += w2[r]
    y = (out / np.maximum(norm, 1e-8)).ravel()
    return y[_N_FFT : _N_FFT + n].astype(np.float64)


def _coloured(rng: np.random.Generator, num_samples: int, gain_of_hz) -> np.ndarray:
    """Gaussian noise shaped by ``gain_of_hz(freqs)``, unit standard deviation."""
    size = fast_fft_length(num_samples)
    spectrum = np.fft.rfft(rng.standard_normal(size))
    spectrum *= gain_of_hz(np.fft.rfftfreq(size, 1.0 / SAMPLE_RATE_HZ))
    x = np.fft.irfft(spectrum, n=size)[:num_samples]
    return x / (x.std() + 1e-12)


def _frame_times(n: int) -> np.ndarray:
    padded = n + 2 * _N_FFT + _HOP
    num = 1 + (padded - _N_FFT) // _HOP
    return (np.arange(num) * _HOP + _N_FFT / 2 - _N_FFT) / SAMPLE_RATE_HZ


def _taper(length: int, ramp: int) -> np.ndarray:
    w = np.ones(length)
    ramp = max(1, min(ramp, length // 2))
    edge = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
    w[:ramp] = edge
    w[length - ramp :] = edge[::-1]
    return w


def synth_speech(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """Speech-like signal: harmonic syllables with moving formants, fricative onsets and pauses."""
    sr = SAMPLE_RATE_HZ
    seconds = num_samples / sr
    voiced = np.zeros(num_samples)
    fricative = np.zeros(num_samples)
    centres, f0_targets, vowels = [], [], []
    speaker = rng.uniform(0.9, 1.25)  # formant scale: larger for shorter vocal tracts
    base_f0 = rng.uniform(90.0, 240.0)
    pos = rng.uniform(0.05, 0.25)
    while pos < seconds - 0.2:
        phrase_start = pos
        for _ in range(int(rng.integers(2, 7))):
            dur = rng.uniform(0.09, 0.28)
            if pos + dur > seconds - 0.05:
                break
            if rng.random() < 0.4:  # fricative onset, then the vowel
                fdur = rng.uniform(0.04, 0.12)
                a, b = int(pos * sr), int(min(pos + fdur, seconds) * sr)
                fricative[a:b] += _taper(b - a, int(0.01 * sr)) * rng.uniform(0.2, 0.5)
                pos += fdur * 0.8
            a, b = int(pos * sr), int(min(pos + dur, seconds) * sr)
            voiced[a:b] += _taper(b - a, int(0.02 * sr)) * rng.uniform(0.6, 1.0)
            centres.append(pos + dur / 2)
            declination = 1.0 - 0.15 * (pos - phrase_start)
            f0_targets.append(base_f0 * declination * 2.0 ** rng.uniform(-0.25, 0.25))
            vowels.append(int(rng.integers(len(_VOWELS))))
            pos += dur + rng.uniform(0.0, 0.06)
        pos += rng.uniform(0.15, 0.5)
    if not centres:  # too short for a phrase: one syllable over the middle
        a, b = num_samples // 4, 3 * num_samples // 4
        voiced[a:b] = _taper(b - a, int(0.02 * sr))
        centres, f0_targets, vowels = [seconds / 2], [base_f0], [0]

    t = np.arange(num_samples) / sr
    f0 = np.interp(t, centres, f0_targets) * (1.0 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))
    phase = np.cumsum(f0 / sr)
    source = 2.0 * (phase % 1.0) - 1.0

    frame_t = _frame_times(num_samples)
    freqs = np.fft.rfftfreq(_N_FFT, 1.0 / sr).astype(np.float32)
    gains = np.zeros((frame_t.size, freqs.size), dtype=np.float32)
    for k in range(3):
        track = np.interp(frame_t, centres, _VOWELS[vowels, k] * speaker).astype(np.float32)
        gains += np.float32(_FORMANT_GAINS[k]) / (1.0 + np.square((freqs[None, :] - track[:, None]) / np.float32(_FORMANT_BANDWIDTHS[k])))
    speech = _overlap_add_filter(source * voiced, gains)
    # Fricatives: a fixed band of noise (one FFT), gated in time.
    centre = rng.uniform(3500.0, 6500.0)
    speech += _coloured(rng, num_samples, lambda f: 1.0 / (1.0 + ((f - centre) / 2000.0) ** 2)) * fricative * 0.05
    return speech


def synth_noise(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """Coloured noise, often modulated, sometimes with hum or impulsive bursts."""
    sr = SAMPLE_RATE_HZ
    slope = rng.uniform(0.0, 2.0)  # 0 white, 1 pink, 2 brown (power ~ 1/f^slope)
    noise = _coloured(rng, num_samples, lambda f: (np.maximum(f, 20.0) / 1000.0) ** (-slope / 2))
    t = np.arange(num_samples) / sr
    if rng.random() < 0.6:  # slow level changes: a smoothed random walk between 0.2 and 1.5
        knots = np.linspace(0, t[-1], max(3, int(t[-1] * rng.uniform(1, 4))))
        noise *= np.interp(t, knots, rng.uniform(0.2, 1.5, knots.size))
    if rng.random() < 0.3:  # mains hum with harmonics
        mains = rng.choice([50.0, 60.0])
        hum = sum(np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 6))
        noise += hum * rng.uniform(0.3, 1.0)
    if rng.random() < 0.3:  # impulsive bursts (knocks, clicks)
        for _ in range(int(rng.integers(1, 5))):
            a = int(rng.integers(0, max(1, num_samples - sr // 10)))
            length = int(rng.uniform(0.01, 0.08) * sr)
            decay = np.exp(-np.arange(length) / (length / 5))
            noise[a : a + length] += rng.standard_normal(length)[: num_samples - a] * decay[: num_samples - a] * rng.uniform(2, 6)
    return noise


def _espeak_speech(rng: np.random.Generator, num_samples: int, workdir: str) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    words = "the quick brown fox jumps over a lazy dog while seven bright birds sing near old quiet water".split()
    text = " ".join(rng.choice(words, size=int(rng.integers(4, 9))))
    path = os.path.join(workdir, "espeak.wav")
    subprocess.run(
        ["espeak-ng", "-v", "en", "-s", str(int(rng.integers(140, 190))), "-p", str(int(rng.integers(30, 70))), "-w", path, text],
        check=True,
        capture_output=True,
    )
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    y = AF.resample(torch.from_numpy(np.ascontiguousarray(x[:, 0])), rate, SAMPLE_RATE_HZ).numpy().astype(np.float64)
    out = np.zeros(num_samples)
    out[: min(num_samples, y.size)] = y[:num_samples]
    return out


def make_pair(seed: int, split: int, number: int, seconds: float, use_espeak: bool = False, workdir: str | None = None):
    """(noisy, clean, snr_db) of one file, float64 in [-1, 1), from (seed, split, number) alone."""
    rng = np.random.default_rng([seed, split, number])
    num_samples = int(round(seconds * rng.uniform(0.8, 1.2) * SAMPLE_RATE_HZ))
    if use_espeak:
        clean = _espeak_speech(rng, num_samples, workdir or tempfile.gettempdir())
    else:
        clean = synth_speech(rng, num_samples)
    noise = synth_noise(rng, num_samples)
    snr_db = rng.uniform(0.0, 15.0)
    p_clean = np.mean(clean**2)
    noise *= np.sqrt(p_clean / (np.mean(noise**2) * 10 ** (snr_db / 10)))
    noisy = clean + noise
    level = 10 ** (rng.uniform(-35.0, -18.0) / 20) / (np.sqrt(np.mean(noisy**2)) + 1e-12)
    level = min(level, 0.95 / (np.abs(noisy).max() + 1e-12))
    return noisy * level, clean * level, snr_db


def _write_pair(task: tuple) -> tuple[str, str, int, str, int, int]:
    out, seed, split_id, split, k, seconds, use_espeak = task
    with tempfile.TemporaryDirectory() as work:
        noisy, clean, _ = make_pair(seed, split_id, k, seconds, use_espeak, work)
    rel_noisy, rel_clean = f"{split}/noisy/{k:04d}.wav", f"{split}/clean/{k:04d}.wav"
    sf.write(os.path.join(out, rel_noisy), noisy, SAMPLE_RATE_HZ, subtype="PCM_16")
    sf.write(os.path.join(out, rel_clean), clean, SAMPLE_RATE_HZ, subtype="PCM_16")
    sizes = os.path.getsize(os.path.join(out, rel_noisy)), os.path.getsize(os.path.join(out, rel_clean))
    return split, rel_noisy, sizes[0], rel_clean, sizes[1], noisy.size


def _params(seed: int, num_train: int, num_valid: int, seconds: float, use_espeak: bool) -> dict:
    return {"version": _FORMAT_VERSION, "seed": seed, "num_train": num_train, "num_valid": num_valid, "seconds": seconds,
            "use_espeak": use_espeak, "sample_rate_hz": SAMPLE_RATE_HZ}


def _is_complete(out: Path, params: dict) -> bool:
    try:
        manifest = json.loads((out / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params:
        return False
    for name, (_, digest) in manifest.get("lists", {}).items():
        try:
            if hashlib.sha256((out / name).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in manifest.get("files", {}).items())


def make_demo_corpus(
    out_dir: str | os.PathLike[str],
    seed: int = 777,
    num_train: int = 200,
    num_valid: int = 20,
    seconds: float = 2.5,
    use_espeak: bool = False,
    num_workers: int | None = None,
    mixing: bool = True,
) -> dict[str, Path]:
    """Write (or find already written) the demo corpus; returns ``{"train": train.lst, "valid": valid.lst, "dir": out}``
    and, with ``mixing``, the lists for dynamic mixing under the keys of :data:`MIXING_LISTS`.

    Layout: ``train/noisy/0000.wav``, ``train/clean/0000.wav``, ..., ``valid/...``, and list files with
    relative paths and durations. 48 kHz mono 16-bit WAV; durations uniform in 0.8-1.2 x ``seconds``. Skips
    all work when ``out_dir`` already holds this exact corpus (same parameters, files present, lists intact).
    Files are written by ``num_workers`` processes (default: one per CPU); the result does not depend on it.

    With ``mixing`` (the default) the folder also gets what dynamic mixing needs (see
    :func:`make_mixing_material`): clean lists naming the pairs' clean files, noise files and synthetic room
    impulse responses with their lists. The pairs and their lists are the same bytes either way.
    """
    if num_train < 1 or num_valid < 1:
        raise DataError(f"num_train and num_valid must be >= 1, got {num_train} and {num_valid}")
    if not seconds > 0:
        raise DataError(f"seconds must be > 0, got {seconds}")
    if use_espeak and shutil.which("espeak-ng") is None:
        raise DataError("use_espeak=True needs the espeak-ng program, which is not installed; leave it off for synthetic speech")
    out = Path(out_dir)
    result = {"train": out / "train.lst", "valid": out / "valid.lst", "dir": out}
    params = _params(seed, num_train, num_valid, float(seconds), use_espeak)
    if not _is_complete(out, params):
        _make_pairs(out, params, num_workers)
    if mixing:
        result.update(make_mixing_material(out, seed))
    return result


def _make_pairs(out: Path, params: dict, num_workers: int | None) -> None:
    seed, num_train, num_valid = params["seed"], params["num_train"], params["num_valid"]
    seconds, use_espeak = params["seconds"], params["use_espeak"]
    (out / _MANIFEST).unlink(missing_ok=True)
    tasks = [(str(out), seed, split_id, split, k, float(seconds), use_espeak)
             for split_id, (split, count) in enumerate((("train", num_train), ("valid", num_valid))) for k in range(count)]
    for split in ("train", "valid"):
        for sub in ("noisy", "clean"):
            (out / split / sub).mkdir(parents=True, exist_ok=True)
    workers = max(1, min(num_workers if num_workers is not None else (os.cpu_count() or 1), len(tasks) // 8))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            written = list(pool.map(_write_pair, tasks, chunksize=8))
    else:
        written = [_write_pair(t) for t in tasks]
    files: dict[str, int] = {}
    lists: dict[str, list] = {}
    for split in ("train", "valid"):
        lines = []
        for w_split, rel_noisy, size_noisy, rel_clean, size_clean, num_samples in written:
            if w_split == split:
                files[rel_noisy], files[rel_clean] = size_noisy, size_clean
                lines.append(f"{rel_noisy} {rel_clean} {num_samples / SAMPLE_RATE_HZ:.6f}\n")
        text = f"# demo corpus: {split}, seed {seed}; noisy clean duration_seconds\n" + "".join(lines)
        (out / f"{split}.lst").write_text(text)
        lists[f"{split}.lst"] = [len(text.encode()), hashlib.sha256(text.encode()).hexdigest()]
    _remove_stale(out, files)
    manifest = {"params": params, "files": files, "lists": lists}
    tmp = out / f".{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out / _MANIFEST)


def _remove_stale(out: Path, keep: dict[str, int]) -> None:
    """Delete WAVs of an earlier, larger corpus in the same folder (the lists no longer name them)."""
    for split in ("train", "valid"):
        for sub in ("noisy", "clean"):
            folder = out / split / sub
            for path in folder.glob("*.wav"):
                if f"{split}/{sub}/{path.name}" not in keep:
                    path.unlink()


_MIX_MANIFEST = "demo_mixing.json"
_MIX_VERSION = 1
MIXING_LISTS = ("clean_train", "clean_valid", "noise_train", "noise_valid", "rir_train", "rir_valid")


def synth_rir(rng: np.random.Generator) -> np.ndarray:
    """A synthetic room impulse response: a direct path (the largest tap), early reflections, a diffuse tail.

    The tail is Gaussian noise decaying by 60 dB over a reverberation time of 0.15-0.7 s, grown in over its
    first 5 ms, its energy a direct-to-reverberant ratio of 0-10 dB below the direct path's. Peak 0.3-0.9.
    """
    sr = SAMPLE_RATE_HZ
    rt60 = rng.uniform(0.15, 0.7)
    delay = int(rng.uniform(0.001, 0.008) * sr)
    n = delay + int(min(1.2 * rt60, 1.0) * sr)
    h = np.zeros(n)
    t = np.arange(n - delay) / sr
    tail = rng.standard_normal(n - delay) * np.exp(-6.908 * t / rt60) * np.minimum(1.0, t / 0.005)
    tail *= np.sqrt(1.0 / (np.sum(tail**2) * 10 ** (rng.uniform(0.0, 10.0) / 10)))
    h[delay:] = tail
    for _ in range(int(rng.integers(4, 11))):
        h[delay + int(rng.uniform(0.002, 0.04) * sr)] += rng.uniform(-0.5, 0.5)
    h[delay] = 1.0  # the direct path, above every reflection
    return h * (rng.uniform(0.3, 0.9) / np.abs(h).max())


def _mix_noise(rng: np.random.Generator) -> np.ndarray:
    """A noise file for mixing: 3-6 s, or (3 in 10) 0.3-0.9 s so that short noise gets looped; -35 to -20 dBFS."""
    seconds = rng.uniform(0.3, 0.9) if rng.random() < 0.3 else rng.uniform(3.0, 6.0)
    x = synth_noise(rng, int(round(seconds * SAMPLE_RATE_HZ)))
    x *= 10 ** (rng.uniform(-35.0, -20.0) / 20) / (np.sqrt(np.mean(x**2)) + 1e-12)
    return x * min(1.0, 0.9 / (np.abs(x).max() + 1e-12))


def make_mixing_material(out_dir: str | os.PathLike[str], seed: int = 777) -> dict[str, Path]:
    """Lists for dynamic mixing beside a demo corpus already in ``out_dir``; returns them by name.

    ``clean_train.lst`` / ``clean_valid.lst`` name the pairs' clean files (``path seconds``, from train.lst and
    valid.lst); ``noise/{train,valid}/NNNN.wav`` are coloured noises as in the pairs but from their own
    streams (seed, 2 or 3, number), some shorter than a second; ``rir/{train,valid}/NNNN.wav`` are synthetic
    impulse responses (24-bit WAV; streams 4 and 5). Counts follow the corpus: max(4, train/8) and
    max(2, valid/4) noises, max(4, train/12) and max(2, valid/5) responses. Deterministic; skipped when the
    folder already holds exactly this material (its manifest, sizes and list digests agree).
    """
    out = Path(out_dir)
    pair_lists = {split: (out / f"{split}.lst").read_text() for split in ("train", "valid")}
    num = {split: sum(1 for line in text.splitlines() if line and not line.startswith("#")) for split, text in pair_lists.items()}
    counts = {("noise", "train"): max(4, num["train"] // 8), ("noise", "valid"): max(2, num["valid"] // 4),
              ("rir", "train"): max(4, num["train"] // 12), ("rir", "valid"): max(2, num["valid"] // 5)}
    params = {"version": _MIX_VERSION, "seed": seed, "counts": {f"{k[0]}_{k[1]}": v for k, v in counts.items()},
              "pair_lists": {s: hashlib.sha256(t.encode()).hexdigest() for s, t in pair_lists.items()}}
    result = {name: out / f"{name}.lst" for name in MIXING_LISTS}
    if _mixing_complete(out, params):
        return result
    (out / _MIX_MANIFEST).unlink(missing_ok=True)
    files: dict[str, int] = {}
    texts: dict[str, str] = {}
    for split, text in pair_lists.items():
        lines = [f"{fields[1]} {fields[2]}\n" for fields in (line.split() for line in text.splitlines())
                 if fields and not fields[0].startswith("#")]
        texts[f"clean_{split}"] = f"# demo corpus: clean speech ({split}), seed {seed}; path duration_seconds\n" + "".join(lines)
    streams = {("noise", "train"): 2, ("noise", "valid"): 3, ("rir", "train"): 4, ("rir", "valid"): 5}
    for (kind, split), count in counts.items():
        folder = out / kind / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for k in range(count):
            rng = np.random.default_rng([seed, streams[kind, split], k])
            rel = f"{kind}/{split}/{k:04d}.wav"
            if kind == "noise":
                x = _mix_noise(rng)
                sf.write(out / rel, x, SAMPLE_RATE_HZ, subtype="PCM_16")
            else:
                x = synth_rir(rng)
                # 24-bit, not float: libsndfile stamps float WAVs with the time of writing (PEAK chunk).
                sf.write(out / rel, x, SAMPLE_RATE_HZ, subtype="PCM_24")
            files[rel] = (out / rel).stat().st_size
            lines.append(f"{rel} {x.size / SAMPLE_RATE_HZ:.6f}\n")
        for stale in folder.glob("*.wav"):
            if f"{kind}/{split}/{stale.name}" not in files:
                stale.unlink()
        texts[f"{kind}_{split}"] = f"# demo corpus: {kind} ({split}), seed {seed}; path duration_seconds\n" + "".join(lines)
    digests = {}
    for name, text in texts.items():
        (out / f"{name}.lst").write_text(text)
        digests[f"{name}.lst"] = [len(text.encode()), hashlib.sha256(text.encode()).hexdigest()]
    tmp = out / f".{_MIX_MANIFEST}.tmp"
    tmp.write_text(json.dumps({"params": params, "files": files, "lists": digests}, indent=1, sort_keys=True))
    os.replace(tmp, out / _MIX_MANIFEST)
    return result


def _mixing_complete(out: Path, params: dict) -> bool:
    try:
        manifest = json.loads((out / _MIX_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params:
        return False
    for name, (_, digest) in manifest.get("lists", {}).items():
        try:
            if hashlib.sha256((out / name).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in manifest.get("files", {}).items())

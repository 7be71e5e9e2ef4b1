"""Input features and the STFT, batched on the waveform's device.

Both follow the reference recipe: waveforms in [-1, 1] are scaled by 32768 (int16 full scale) first, so
the fbank's log floor and the loss's 1e-6 epsilons sit where the reference put them. ``stft`` applies that
scale and ``istft`` removes it, so ``istft(stft(x), L) ~= x``.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor

SAMPLE_RATE_HZ = 48000
N_FFT = 1920  # 40 ms
HOP = 384  # 8 ms
NUM_MELS = 60
FEATURE_DIM = 3 * NUM_MELS  # log-mel, delta, delta-delta
N_BINS = N_FFT // 2 + 1  # 961
WAV_SCALE = 32768.0

# Kaldi fbank settings the reference uses (torchaudio.compliance.kaldi.fbank defaults otherwise).
_FBANK_FFT = 2048  # the 1920-sample frame zero-padded to a power of two
_PREEMPHASIS = 0.97
_LOW_FREQ_HZ = 20.0
_DELTA_WIN = 5


def num_frames(num_samples: int) -> int:
    """Frames of fbank and STFT alike (Kaldi snip_edges, STFT center=False); 0 if shorter than a frame."""
    return 0 if num_samples < N_FFT else 1 + (num_samples - N_FFT) // HOP


def _check_waveform(waveform: Tensor) -> Tensor:
    if waveform.dim() != 2:
        raise ValueError(f"expected a waveform batch shaped (batch, samples), got {tuple(waveform.shape)}")
    if waveform.shape[-1] < N_FFT:
        raise ValueError(f"waveform has {waveform.shape[-1]} samples; at least one {N_FFT}-sample frame "
                         f"({1000 * N_FFT // SAMPLE_RATE_HZ} ms at {SAMPLE_RATE_HZ} Hz) is needed")
    if not waveform.is_floating_point():
        raise TypeError(f"expected a floating-point waveform in [-1, 1], got {waveform.dtype}")
    return waveform


_MEL_CACHE: dict[tuple[torch.device, torch.dtype], Tensor] = {}


# Under torch.compile the cache lookup below would be traced, and its first insertion (a dict that changed) would
# fail the compiled step's guard and recompile it: the compiler calls this once while tracing and keeps the
# matrix as a constant of the graph instead.
@torch.compiler.assume_constant_result
def _mel_matrix(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1025, 60) triangular mel filters, as torchaudio's Kaldi fbank builds them."""
    key = (device, dtype)
    if key not in _MEL_CACHE:
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
            NUM_MELS, _FBANK_FFT, float(SAMPLE_RATE_HZ), _LOW_FREQ_HZ, 0.0, 100.0, -500.0, 1.0)
        banks = torch.nn.functional.pad(banks, (0, 1))  # the Nyquist bin gets no weight
        _MEL_CACHE[key] = banks.t().contiguous().to(device=device, dtype=dtype)
    return _MEL_CACHE[key]


def compute_features(waveform: Tensor, dither: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Kaldi log-mel fbank + deltas + delta-deltas: waveform (B, L) in [-1, 1] at 48 kHz -> (B, T, 180),
    float32 (float64 for a float64 waveform); cast to the model's dtype yourself.

    Per sample this equals the reference's ``torchaudio.compliance.kaldi.fbank(x * 32768, dither=...,
    frame_length=40, frame_shift=8, num_mel_bins=60, sample_frequency=48000, window_type='hamming')``
    followed by ``torchaudio.functional.compute_deltas`` twice, but runs batched on the waveform's device.
    ``dither`` (1.0 in training, as the reference) adds Gaussian noise of that standard deviation, in int16
    units, to every frame; 0.0 makes the features deterministic.
    """
    waveform = _check_waveform(waveform)
    dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    frames = (waveform.to(dtype) * WAV_SCALE).unfold(-1, N_FFT, HOP)  # (B, T, 1920), a view
    if dither != 0.0:
        noise = torch.randn(frames.shape, generator=generator, device=frames.device, dtype=dtype)
        frames = frames + noise * dither
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove the DC offset per frame
    previous = torch.cat((frames[..., :1], frames[..., :-1]), dim=-1)
    frames = frames - _PREEMPHASIS * previous
    frames = frames * torch.hamming_window(N_FFT, periodic=False, alpha=0.54, beta=0.46,
                                           device=frames.device, dtype=dtype)
    power = torch.fft.rfft(frames, n=_FBANK_FFT).abs().pow(2.0)  # (B, T, 1025)
    mel = torch.matmul(power, _mel_matrix(power.device, dtype))
    log_mel = torch.clamp(mel, min=torch.finfo(torch.float32).eps).log()  # Kaldi's floor, float32 epsilon
    log_mel = log_mel.transpose(1, 2)  # compute_deltas works on (..., freq, time)
    delta = torchaudio.functional.compute_deltas(log_mel, win_length=_DELTA_WIN)
    delta2 = torchaudio.functional.compute_deltas(delta, win_length=_DELTA_WIN)
    return torch.cat((log_mel, delta, delta2), dim=1).transpose(1, 2).contiguous()


def _window(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.hamming_window(N_FFT, periodic=False, device=device, dtype=dtype)


def stft(waveform: Tensor) -> Tensor:
    """Complex STFT of waveform x 32768: (B, L) -> (B, 961, T); non-periodic Hamming, no centering, so
    frame t covers samples [384 t, 384 t + 1920) and matches fbank frame t."""
    waveform = _check_waveform(waveform)
    x = waveform.float() * WAV_SCALE if waveform.dtype != torch.float64 else waveform * WAV_SCALE
    return torch.stft(x, N_FFT, HOP, N_FFT, window=_window(x.device, x.dtype), center=False,
                      return_complex=True)


def istft(spec: Tensor, length: int) -> Tensor:
    """Inverse of ``stft`` (overlap-add, divided by 32768): (B, 961, T) -> (B, length). Samples after the
    last full frame are zero, as in the reference's inference."""
    real_dtype = torch.float64 if spec.dtype == torch.complex128 else torch.float32
    window = _window(spec.device, real_dtype)
    y = torch.istft(spec, N_FFT, HOP, N_FFT, window=window, center=False) / WAV_SCALE
    covered = y.shape[-1]  # N_FFT + HOP * (T - 1)
    return y[..., :length] if covered >= length else torch.nn.functional.pad(y, (0, length - covered))

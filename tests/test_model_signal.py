"""Features, STFT, the mask loss and SI-SNR, against torchaudio's Kaldi fbank and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from model import (FEATURE_DIM, HOP, N_BINS, N_FFT, apply_mask, compute_features, istft, mask_loss, num_frames,
                   si_snr, stft, target_mask)


def noise(*shape: int, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def kaldi_reference(x: torch.Tensor) -> torch.Tensor:
    """What the reference's data loader computes for one waveform (with dither off)."""
    fb = torchaudio.compliance.kaldi.fbank(x.unsqueeze(0) * 32768, dither=0.0, frame_length=40, frame_shift=8,
                                           num_mel_bins=60, sample_frequency=48000, window_type="hamming")
    delta = torchaudio.functional.compute_deltas(fb.t())
    delta2 = torchaudio.functional.compute_deltas(delta)
    return torch.cat((fb, delta.t(), delta2.t()), dim=1)


def test_num_frames():
    assert num_frames(192000) == 496  # a 4 s crop
    assert num_frames(48000) == 121
    assert num_frames(1920) == 1 and num_frames(1919) == 0
    assert num_frames(1920 + 383) == 1 and num_frames(1920 + 384) == 2


def test_features_match_torchaudio_kaldi_fbank_per_sample():
    x = noise(3, 48000 + 1000)
    x[1] *= 0.01  # a quiet one
    feats = compute_features(x, dither=0.0)
    assert feats.shape == (3, num_frames(49000), FEATURE_DIM) and feats.dtype == torch.float32
    for b in range(3):
        ref = kaldi_reference(x[b])
        assert torch.allclose(feats[b], ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_features_without_dither_are_deterministic_and_finite_on_silence():
    x = noise(2, 30000)
    assert torch.equal(compute_features(x, dither=0.0), compute_features(x, dither=0.0))
    silent = compute_features(torch.zeros(2, 30000), dither=0.0)
    assert torch.isfinite(silent).all()
    assert torch.allclose(silent[..., :60], torch.tensor(np.log(np.finfo(np.float32).eps), dtype=torch.float32))
    assert silent[..., 60:].abs().max() < 1e-5  # deltas of a constant


def test_dither_is_random_unless_seeded():
    x = noise(2, 30000)
    assert not torch.equal(compute_features(x), compute_features(x))
    seeded = [compute_features(x, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*seeded)
    assert torch.isfinite(compute_features(torch.zeros(1, 30000))).all()


def test_stft_matches_a_numpy_hamming_dft_and_inverts():
    x = noise(2, 1920 + 3 * HOP + 100)
    spec = stft(x)
    assert spec.shape == (2, N_BINS, 4) and spec.is_complex()
    frame = x[1, 2 * HOP:2 * HOP + N_FFT].double().numpy() * 32768 * np.hamming(N_FFT)  # non-periodic
    assert np.allclose(spec[1, :, 2].numpy(), np.fft.rfft(frame), rtol=1e-4, atol=1e-2)
    y = istft(spec, x.shape[-1])
    covered = N_FFT + 3 * HOP
    assert y.shape == x.shape
    assert torch.allclose(y[:, :covered], x[:, :covered], atol=1e-5)
    assert (y[:, covered:] == 0).all()  # after the last full frame, as in the reference


def test_mask_loss_on_a_hand_computed_case():
    noisy = noise(2, N_FFT + HOP)  # 2 frames each
    clean = noisy / 2  # in phase, a quarter of the power: the target mask is 1/4 wherever |Y|^2 >> 1e-6
    target = target_mask(noisy, clean)
    assert target.shape == (2, 2, N_BINS)
    assert torch.allclose(target, torch.full_like(target, 0.25), atol=1e-4)
    assert mask_loss(target, noisy, clean) == 0
    # A constant error e gives 0.5 * e^2 * sum(W) / (B * T), W = |Y| / (max over frequency |Y| + 1e-6):
    # compute W with numpy's DFT, independently of our STFT.
    frames = np.stack([noisy[b, t * HOP:t * HOP + N_FFT].double().numpy() for b in range(2) for t in range(2)])
    magnitude = np.abs(np.fft.rfft(frames * 32768 * np.hamming(N_FFT), axis=-1))
    weight_sum = (magnitude / (magnitude.max(axis=-1, keepdims=True) + 1e-6)).sum()
    expected = 0.5 * 0.3 ** 2 * weight_sum / (2 * 2)
    assert mask_loss(target + 0.3, noisy, clean).item() == pytest.approx(expected, rel=1e-4)
    # Opposite phase: cos = -1, the target is clamped to 0.
    assert target_mask(noisy, -clean).abs().max() < 1e-6


def test_mask_loss_is_fp32_whatever_the_mask_dtype():
    noisy, clean = noise(2, 10000), noise(2, 10000, seed=1)
    mask = torch.rand(2, num_frames(10000), N_BINS)
    loss = mask_loss(mask.bfloat16(), noisy, clean)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(mask_loss(mask.bfloat16().float(), noisy, clean).item(), rel=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        mask_loss(mask[:, :-1], noisy, clean)


def test_apply_mask_of_ones_reconstructs_the_noisy_signal():
    noisy = noise(2, 20000)
    frames = num_frames(20000)
    enhanced = apply_mask(torch.ones(2, frames, N_BINS), noisy)
    covered = N_FFT + (frames - 1) * HOP
    assert enhanced.shape == noisy.shape
    assert torch.allclose(enhanced[:, :covered], noisy[:, :covered], atol=1e-5)
    assert apply_mask(torch.zeros(2, frames, N_BINS), noisy).abs().max() == 0


def test_si_snr():
    reference = noise(3, 16000)
    assert (si_snr(reference, reference) > 50).all()
    assert (si_snr(0.3 * reference + 0.01, reference) > 50).all()  # scale and offset do not count
    # Orthogonal noise of a tenth of the power: 10 dB.
    other = noise(3, 16000, seed=5)
    other = other - other.mean(-1, keepdim=True)
    centred = reference - reference.mean(-1, keepdim=True)
    other = other - (other * centred).sum(-1, keepdim=True) / centred.square().sum(-1, keepdim=True) * centred
    other = other * (centred.norm(dim=-1, keepdim=True) / other.norm(dim=-1, keepdim=True)) / 10 ** 0.5
    assert torch.allclose(si_snr(centred + other, reference), torch.full((3,), 10.0), atol=1e-3)
    assert si_snr(reference, reference).shape == (3,)

"""The reference's training loss (phase-sensitive mask MSE), mask application and SI-SNR.

Everything here runs in fp32 (fp64 for fp64 inputs) whatever the mask's dtype, on the inputs' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .features import N_BINS, istft, num_frames, stft

_EPS = 1e-6  # the reference's EPS in both the loss and SI-SNR


def _real_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype in (torch.float64, torch.complex128) for t in tensors) else torch.float32


def _check_pair(noisy: Tensor, clean: Tensor) -> None:
    if noisy.shape != clean.shape or noisy.dim() != 2:
        raise ValueError(f"noisy and clean must both be (batch, samples) and of one shape, got "
                         f"{tuple(noisy.shape)} and {tuple(clean.shape)}")


def _targets(noisy: Tensor, clean: Tensor) -> tuple[Tensor, Tensor]:
    """(target mask, loss weight), both (B, T, 961)."""
    _check_pair(noisy, clean)
    return _targets_from_spectra(stft(noisy), stft(clean))


def _targets_from_spectra(noisy_spec: Tensor, clean_spec: Tensor) -> tuple[Tensor, Tensor]:
    # Magnitudes and unit phasors exactly as the reference forms them (including where EPS enters).
    noisy_abs = torch.sqrt(noisy_spec.real ** 2 + noisy_spec.imag ** 2)
    clean_abs = torch.sqrt(clean_spec.real ** 2 + clean_spec.imag ** 2)
    cos_phase = (noisy_spec.real / (noisy_abs + _EPS)) * (clean_spec.real / (clean_abs + _EPS)) + \
                (noisy_spec.imag / (noisy_abs + _EPS)) * (clean_spec.imag / (clean_abs + _EPS))
    target = (clean_abs ** 2 / (noisy_abs ** 2 + _EPS) * cos_phase).clamp(0.0, 1.0)
    weight = noisy_abs / (noisy_abs.amax(dim=1, keepdim=True) + _EPS)  # per frame, over frequency
    return target.transpose(1, 2), weight.transpose(1, 2)


def target_mask(noisy: Tensor, clean: Tensor) -> Tensor:
    """Phase-sensitive target M = clamp(|S|^2 / (|Y|^2 + 1e-6) * cos(angle Y - angle S), 0, 1): (B, T, 961)."""
    return _targets(noisy, clean)[0]


def mask_loss(mask_pred: Tensor, noisy: Tensor, clean: Tensor) -> Tensor:
    """The reference's "l2" phase-sensitive mask loss: 0.5 * sum((M_hat - M)^2 * W) / (B * T), where
    W = |Y| / (max over frequency of |Y| + 1e-6). mask_pred (B, T, 961); noisy, clean (B, L) in [-1, 1]."""
    target, weight = _targets(noisy, clean)
    error = _mask_error(mask_pred, target, noisy)
    batch, frames = target.shape[0], target.shape[1]
    return 0.5 * torch.sum(error.square() * weight) / (batch * frames)


def _mask_error(mask_pred: Tensor, target: Tensor, noisy: Tensor) -> Tensor:
    if mask_pred.shape != target.shape:
        raise ValueError(f"mask shaped {tuple(mask_pred.shape)} does not match the {target.shape[1]} frames x "
                         f"{target.shape[2]} bins of {noisy.shape[-1]}-sample waveforms")
    return mask_pred.to(_real_dtype(target)) - target


def validation_metrics(mask: Tensor, noisy: Tensor, clean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per batch item, (B,) each: the mask loss (``mask_loss`` of that item alone), the SI-SNR of the enhanced
    signal (``apply_mask``) and the SI-SNR of the noisy input against the clean one, in dB. One STFT of the
    noisy and one of the clean waveform serve the loss and the enhancement alike.

    On a GPU the batch goes through at once. On the CPU it goes item by item: there torch's batched STFT and
    the elementwise target math over a batch's spectra, which outgrow the caches, cost more per item than one
    item at a time (bench/bench_hot_path.py)."""
    _check_pair(noisy, clean)
    expected = (noisy.shape[0], num_frames(noisy.shape[-1]), N_BINS)
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask shaped {tuple(mask.shape)} does not match the {expected[1]} frames x {expected[2]} "
                         f"bins of {noisy.shape[0]} {noisy.shape[-1]}-sample waveforms")
    if noisy.device.type != "cpu":
        return _validation_metrics(mask, noisy, clean)
    items = [_validation_metrics(mask[i:i + 1], noisy[i:i + 1], clean[i:i + 1]) for i in range(noisy.shape[0])]
    return tuple(torch.cat(column) for column in zip(*items))


def _validation_metrics(mask: Tensor, noisy: Tensor, clean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    noisy_spec, clean_spec = stft(noisy), stft(clean)
    target, weight = _targets_from_spectra(noisy_spec, clean_spec)
    error = mask.to(_real_dtype(target)) - target
    loss = 0.5 * (error.square() * weight).sum(dim=(1, 2)) / target.shape[1]
    enhanced = istft(noisy_spec * mask.transpose(1, 2).to(noisy_spec.real.dtype), noisy.shape[-1])
    return loss, si_snr(enhanced, clean), si_snr(noisy, clean)


def apply_mask(mask: Tensor, noisy: Tensor) -> Tensor:
    """Enhanced waveform (B, L): mask (B, T, 961) times the noisy STFT (noisy phase kept), inverse STFT.
    Samples after the last full frame come out zero, as in the reference."""
    if noisy.dim() != 2 or mask.dim() != 3 or mask.shape[0] != noisy.shape[0] \
            or mask.shape[1] != num_frames(noisy.shape[-1]):
        raise ValueError(f"mask shaped {tuple(mask.shape)} does not fit noisy waveforms shaped {tuple(noisy.shape)} "
                         f"({num_frames(noisy.shape[-1])} frames each)")
    spec = stft(noisy)
    return istft(spec * mask.transpose(1, 2).to(spec.real.dtype), noisy.shape[-1])


def si_snr(estimate: Tensor, reference: Tensor) -> Tensor:
    """Scale-invariant SNR in dB per batch item, (B, L) x (B, L) -> (B,); the reference's cal_SISNR."""
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate and reference shapes differ: {tuple(estimate.shape)} vs {tuple(reference.shape)}")
    dtype = _real_dtype(estimate, reference)
    estimate, reference = estimate.to(dtype), reference.to(dtype)
    reference = reference - reference.mean(dim=-1, keepdim=True)
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    reference_energy = reference.square().sum(dim=-1, keepdim=True) + _EPS
    projection = (reference * estimate).sum(dim=-1, keepdim=True) * reference / reference_energy
    noise = estimate - projection
    ratio = projection.square().sum(dim=-1) / (noise.square().sum(dim=-1) + _EPS)
    return 10.0 * torch.log10(ratio + _EPS)

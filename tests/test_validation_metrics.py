"""model.validation_metrics: the batched per-item loss and SI-SNRs that launcher/train.py's validation reports,
equal to the per-item mask_loss, apply_mask and si_snr calls it replaces (two STFTs per batch, not 2B + 1)."""

from __future__ import annotations

import pytest
import torch

from model import apply_mask, mask_loss, num_frames, si_snr, validation_metrics
from model.loss import _validation_metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_the_per_item_calls(dtype):
    gen = torch.Generator().manual_seed(0)
    samples = 48000 + 1234  # a tail after the last full frame: enhanced samples there are zero
    clean = (torch.randn(5, samples, generator=gen) * 0.1).to(dtype)
    noisy = clean + (torch.randn(5, samples, generator=gen) * 0.05).to(dtype)
    noisy[3] = 0.0  # a silent item: every epsilon path
    mask = torch.rand(5, num_frames(samples), 961, generator=gen).to(dtype) * 1.2
    loss, snr, snr_in = validation_metrics(mask, noisy, clean)
    expected_loss = torch.stack([mask_loss(mask[i:i + 1], noisy[i:i + 1], clean[i:i + 1]) for i in range(5)])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert loss.shape == snr.shape == snr_in.shape == (5,)
    torch.testing.assert_close(loss, expected_loss, **tol)
    torch.testing.assert_close(snr, si_snr(apply_mask(mask, noisy), clean), **tol)
    torch.testing.assert_close(snr_in, si_snr(noisy, clean), **tol)
    # the batch mean is the batch loss
    torch.testing.assert_close(loss.mean(), mask_loss(mask, noisy, clean), **tol)
    # what a GPU runs: the whole batch at once (the CPU goes item by item)
    for batched, per_item in zip(_validation_metrics(mask, noisy, clean), (loss, snr, snr_in)):
        torch.testing.assert_close(batched, per_item, **tol)


def test_refuses_what_mask_loss_refuses():
    noisy = torch.zeros(2, 48000)
    with pytest.raises(ValueError, match="does not match"):
        validation_metrics(torch.zeros(2, 10, 961), noisy, noisy)
    with pytest.raises(ValueError, match="does not match"):
        validation_metrics(torch.zeros(3, num_frames(48000), 961), noisy, noisy)
    with pytest.raises(ValueError, match="one shape"):
        validation_metrics(torch.zeros(2, num_frames(48000), 961), noisy, noisy[:1])

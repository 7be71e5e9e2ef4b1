"""model/flops.py: the FLOPs of a training micro-batch, counted on the meta device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import build_model, compute_features, mask_loss
from model.flops import flop_counter_mode, training_flops


def test_a_depthwise_convolution_counts_one_product_per_tap_in_forward_and_both_gradients() -> None:
    """2 FLOPs per multiply-add: forward, input gradient and weight gradient each B * T * C * K products. torch's own
    formula counts the weight gradient C times over (pytorch/pytorch#183405)."""
    batch, channels, frames, kernel = 2, 48, 30, 5
    x = torch.randn(batch, channels, 1, frames, requires_grad=True)
    w = torch.randn(channels, 1, 1, kernel, requires_grad=True)
    counter = flop_counter_mode()
    with counter:
        F.conv2d(x, w, padding=(0, kernel // 2), groups=channels).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * batch * frames * channels * kernel


def test_the_meta_count_is_the_count_of_a_real_step_on_the_same_path() -> None:
    """The tiny preset at 1 s takes the plain convolution path on the CPU too: counting a real step (computed)
    gives the same number as the meta device (shapes only)."""
    torch.manual_seed(0)
    model = build_model("tiny").train()
    noisy = torch.randn(2, 48000) * 0.1
    counter = flop_counter_mode()
    with counter:
        mask_loss(model(compute_features(noisy)), noisy, noisy * 0.5).backward()
    assert training_flops("tiny", 2, 48000) == counter.get_total_flops() > 0


def test_the_count_grows_with_the_batch_and_the_full_model_costs_a_quarter_teraflop_per_4_s_crop() -> None:
    one = training_flops("tiny", 1, 48000)
    assert training_flops("tiny", 3, 48000) == 3 * one
    # The recorded figure for the MFU (BENCHMARKS.md §10): 0.2423 TFLOP per 4 s sample, forward and backward.
    assert training_flops("mossformer2_se_48k", 1, 4 * 48000) == 242_328_321_408
    with pytest.raises(ValueError, match="positive"):
        training_flops("tiny", 0, 48000)

"""FLOPs of one training micro-batch, for model FLOPs utilisation (MFU).

Counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over features, mask network and loss, forward
and backward, with the model and the waveforms on the meta device, where only shapes exist: nothing is computed
or allocated, so the full model's count takes seconds on a CPU and needs no GPU. On the meta device the model takes
the path it takes on a GPU (plain depthwise convolutions, not the CPU's own backward), so the count is the GPU's.

What is counted is what MFU conventionally counts (Chowdhery et al. 2022, PaLM, appendix B): the matrix products
and convolutions, two FLOPs per multiply-add; elementwise work, FFTs and the optimizer step are left out. Dropout
and dither change no shape, so the count does not depend on the seed.

torch's formula for a convolution's weight gradient drops the groups (pytorch/pytorch#183405): for a depthwise
convolution it counts a dense channels x channels product. The model's 144 depthwise convolutions would then
count 3.85 TFLOP of 4.33 for the full model at 2 x 4 s; ``_convolution_backward_flops`` divides that term by
the groups.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils import flop_counter

from .config import MossFormer2Config
from .features import compute_features
from .loss import mask_loss
from .network import build_model


def _convolution_backward_flops(grad_out, x, weight, bias, stride, padding, dilation, transposed, output_padding,
                                groups, output_mask, out_val=None, **kwargs) -> int:
    """torch's count for the input gradient, and its count for the weight gradient divided by the groups."""
    args = (grad_out, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = flop_counter.conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_val)
    grad_weight = flop_counter.conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_val)
    return grad_input + grad_weight // groups


# Receives the operator's own arguments (FlopCounterMode would otherwise pass shapes): torch's formula, called
# above, takes the arguments and turns them into shapes itself.
_convolution_backward_flops._get_raw = True  # type: ignore[attr-defined]


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A FlopCounterMode that counts grouped convolutions' weight gradients per group."""
    return flop_counter.FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _convolution_backward_flops})


def training_flops(preset_or_config: "str | MossFormer2Config | Mapping[str, Any]", batch: int,
                   num_samples: int) -> int:
    """Matrix-product and convolution FLOPs of one training micro-batch of ``batch`` crops of ``num_samples``
    samples: fbank features -> mask network (train mode) -> mask loss -> backward. Per rank; times the
    accumulation steps for an optimizer step."""
    if batch < 1 or num_samples < 1:
        raise ValueError(f"batch and num_samples must be positive, got {batch} and {num_samples}")
    with torch.device("meta"):
        model = build_model(preset_or_config).train()
        noisy = torch.zeros(batch, num_samples)
        clean = torch.zeros(batch, num_samples)
    counter = flop_counter_mode()
    with counter:
        loss = mask_loss(model(compute_features(noisy, dither=1.0)), noisy, clean)
        loss.backward()
    return int(counter.get_total_flops())


__all__ = ["flop_counter_mode", "training_flops"]

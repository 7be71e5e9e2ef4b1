"""Model FLOPs utilisation: the model's FLOPs per optimizer step, counted once at the start, against the time the
steps took and the GPU's datasheet peak.

The count is model/flops.py's (matrix products and convolutions of features, mask network and loss, forward and
backward, two FLOPs per multiply-add; the convention of Chowdhery et al. 2022, PaLM, appendix B) for one rank's
micro-batch, times the accumulation steps. Every train record of metrics.jsonl gets `tflops`, this GPU's achieved
rate over the record's interval, and on a GPU whose peak is in PEAK_TFLOPS `mfu`, that rate over the peak. On the
CPU and on GPUs not in the table there is no peak, so no `mfu`: a guessed peak would make a number that looks
measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model.flops import training_flops

# Dense datasheet peaks in TFLOP/s (NVIDIA's tables print the sparse rate for the tensor-core formats: half of it),
# by a fragment of torch.cuda.get_device_name(); the longest fragment in the name wins ("NVIDIA H100 PCIe" is the
# PCIe card, "NVIDIA H100 80GB HBM3" the SXM one). fp16 has the bf16 rate on all of them.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM (HBM3)
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM and PCIe alike
}


def peak_kind(precision: str, allow_tf32: bool) -> str:
    """Which peak a run's matrix products can reach: bf16 (and fp16) engines run them on the 16-bit tensor cores;
    fp32 ones on TF32 tensor cores when cuda.allow_tf32 lets them, else on the fp32 units."""
    if precision in ("bf16", "fp16"):
        return "bf16"
    return "tf32" if allow_tf32 else "fp32"


def peak_tflops(device_name: str | None, kind: str) -> float | None:
    """The dense peak of the GPU named `device_name` for `kind`; None for the CPU (None) or a GPU not in the table."""
    if not device_name:
        return None
    name = device_name.lower()
    known = [fragment for fragment in PEAK_TFLOPS if fragment.lower() in name]
    return PEAK_TFLOPS[max(known, key=len)][kind] if known else None


@dataclass(frozen=True)
class FlopRate:
    """FLOPs per optimizer step of one rank, and its GPU's peak (None: unknown, no MFU)."""

    flops_per_step: int
    peak_tflops: float | None = None

    def record(self, steps: int, seconds: float) -> dict[str, float]:
        """`tflops` (and `mfu`) of `steps` optimizer steps that took `seconds` on this rank."""
        tflops = self.flops_per_step * steps / max(seconds, 1e-9) / 1e12
        return {"tflops": tflops} if self.peak_tflops is None else {"tflops": tflops, "mfu": tflops / self.peak_tflops}


def flop_rate(preset: str, micro_batch: int, accumulation_steps: int, segment_samples: int, precision: str,
              allow_tf32: bool, device) -> tuple[FlopRate, dict[str, Any]]:
    """The run's FlopRate and its `flops` record: the count (seconds on the meta device, nothing allocated), the
    device and the peak chosen for the engine's `precision` ("fp32", "bf16", "fp16")."""
    per_micro_batch = training_flops(preset, micro_batch, segment_samples)
    # cuda.allow_tf32 means nothing on the CPU, which has no peak here: no kind either.
    kind = peak_kind(precision, allow_tf32) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    rate = FlopRate(per_micro_batch * accumulation_steps, peak_tflops(name, kind) if kind else None)
    record = {"kind": "flops", "flops_per_micro_batch": per_micro_batch, "flops_per_step": rate.flops_per_step,
              "micro_batch": micro_batch, "accumulation_steps": accumulation_steps, "device": name or device.type,
              "precision": precision, "peak_kind": kind, "peak_tflops": rate.peak_tflops}
    return rate, record

"""Speed settings of a CUDA rank, applied once at device set-up (launcher/training/setup.py) and recorded in the run.

By default fp32 matrix products and convolutions run on TF32 tensor cores and cuDNN autotunes its
convolution algorithms: PyTorch's defaults are strict fp32 matmuls (about 67 instead of about 495 TFLOP/s
of an H100's dense peak) and no autotuning. `cuda.allow_tf32=false` / `cuda.cudnn_benchmark=false` turn
them off. bf16 (ds_configs/bf16.json) is the recommended GPU precision; TF32 speeds up what still runs in
fp32 (the fp32 presets, and the fp32 features and loss around a bf16 model).
"""

from __future__ import annotations

from typing import Any

from launcher.config.sections import CudaSection


def apply_device_settings(section: CudaSection, device_type: str) -> dict[str, Any]:
    """Set torch.backends' TF32 and cuDNN autotuning flags on a CUDA rank; return what was set, for the run
    record. On any other device nothing is changed (the flags concern CUDA only)."""
    import torch

    record: dict[str, Any] = {"device": device_type, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device_type != "cuda":
        record["cuda_settings"] = f"not applied ({device_type})"
        return record
    # The fp32_precision API (torch >= 2.9): reading the legacy allow_tf32 flags after setting these raises,
    # so nothing here touches the legacy ones.
    precision = "tf32" if section.allow_tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cudnn.benchmark = section.cudnn_benchmark
    record["cuda_settings"] = {"matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
                               "cudnn_conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
                               "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
    return record

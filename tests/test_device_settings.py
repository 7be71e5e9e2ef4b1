"""CUDA speed settings: TF32 and cuDNN autotuning on by default, a config switch for each, applied to
torch.backends by launcher/dist/device.py (flags that can be set without a GPU)."""

from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError, CudaSection, load_config
from launcher.dist.device import apply_device_settings


@pytest.fixture
def backends():
    """Restore torch.backends' flags after each test."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark)
    yield
    (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
     torch.backends.cudnn.benchmark) = saved


def test_fast_by_default_and_switchable_from_the_command_line() -> None:
    assert load_config(None, []).cuda == CudaSection(allow_tf32=True, cudnn_benchmark=True)
    cfg = load_config(None, ["cuda.allow_tf32=false", "cuda.cudnn_benchmark=no"])
    assert cfg.cuda == CudaSection(allow_tf32=False, cudnn_benchmark=False)


@pytest.mark.parametrize("override, message", [
    ("cuda.allow_tf32=maybe", "cuda.allow_tf32: expected true/false, got 'maybe'"),
    ("cuda.cudnn_benchmark=2", "cuda.cudnn_benchmark: expected true/false"),
    ("cuda.tf32=true", "valid keys of 'cuda': allow_tf32, cudnn_benchmark"),
])
def test_bad_values_are_refused_naming_the_key(override, message) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_the_section_refuses_non_booleans_built_directly() -> None:
    with pytest.raises(ConfigError, match="cuda.allow_tf32 must be true or false, got 1"):
        CudaSection(allow_tf32=1)


def test_a_recipe_can_turn_them_off(tmp_path) -> None:
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("cuda:\n  allow_tf32: false\n")
    assert load_config(recipe, []).cuda == CudaSection(allow_tf32=False, cudnn_benchmark=True)


@pytest.mark.parametrize("section, precision", [(CudaSection(), "tf32"),
                                                (CudaSection(allow_tf32=False, cudnn_benchmark=False), "ieee")])
def test_on_cuda_the_switches_reach_torch_backends(backends, section, precision) -> None:
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.cudnn.benchmark = not section.cudnn_benchmark
    record = apply_device_settings(section, "cuda")
    assert torch.backends.cuda.matmul.fp32_precision == precision
    assert torch.backends.cudnn.conv.fp32_precision == precision
    assert torch.backends.cudnn.benchmark is section.cudnn_benchmark
    assert record["cuda_settings"] == {"matmul_fp32_precision": precision, "cudnn_conv_fp32_precision": precision,
                                       "cudnn_benchmark": section.cudnn_benchmark}


def test_on_the_cpu_nothing_changes_and_the_record_says_so(backends) -> None:
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.cudnn.benchmark = False
    record = apply_device_settings(CudaSection(), "cpu")
    assert torch.backends.cuda.matmul.fp32_precision == "none" and torch.backends.cudnn.benchmark is False
    assert record["cuda_settings"] == "not applied (cpu)" and record["torch"] == torch.__version__

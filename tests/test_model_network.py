"""The MossFormer2 network: presets, the reference's parameter layout, shapes, gradients, dtypes, and
numerical equality with the reference implementation (through a golden fixture)."""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import (FEATURE_DIM, N_BINS, PRESETS, MossFormer2Config, build_model, compute_features,
                   count_trainable_parameters, mask_loss, num_frames)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "data" / "mossformer2_golden.pt"

# Trainable parameters per preset. The full one is ClearerVoice's MossFormer2_SE_48K.
PARAMETER_COUNTS = {"mossformer2_se_48k": 55_262_154, "small": 4_015_746, "tiny": 178_674}

# sha256 of "key shape dtype" lines of the reference TestNet's state_dict, in order (929 entries), computed
# from clearvoice 0.1.2 with rotary-embedding-torch 0.9.1. Equal digests mean reference checkpoints load
# strictly and our exports load in ClearerVoice.
REFERENCE_STATE_DIGEST = "4eeecbef6ae57c3c0df97f0aed078bfd30d606dbb4a57b65251430f7e6ddc4d4"
REFERENCE_STATE_ENTRIES = 929


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return build_model("mossformer2_se_48k").eval()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def fbank(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))


def test_presets_have_their_parameter_counts():
    assert set(PRESETS) == set(PARAMETER_COUNTS)
    for name, count in PARAMETER_COUNTS.items():
        assert count_trainable_parameters(build_model(name)) == count, name


def test_full_preset_is_the_default_and_has_the_reference_state_layout(full_model):
    assert build_model().config == PRESETS["mossformer2_se_48k"] == MossFormer2Config()
    state = full_model.state_dict()
    lines = "\n".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in state.items())
    assert len(state) == REFERENCE_STATE_ENTRIES
    assert hashlib.sha256(lines.encode()).hexdigest() == REFERENCE_STATE_DIGEST
    assert all(k.startswith("mossformer.") for k in state)
    # The rotary module is shared by all 24 layers, as in the reference: 24 keys, one frozen tensor.
    rotary = [k for k in state if k.endswith("rotary_pos_emb.freqs")]
    assert len(rotary) == 24 and state[rotary[0]].shape == (16,)
    assert not full_model.mossformer.mdl.intra_mdl.mossformerM.layers[0].rotary_pos_emb.freqs.requires_grad


def test_build_model_accepts_names_configs_and_dicts():
    config = MossFormer2Config(model_dim=32, num_layers=1, query_key_dim=16, rotary_dim=16, fsmn_inner_dim=16)
    assert build_model(config).config == config
    assert build_model(config.to_dict()).config == config
    with pytest.raises(ValueError, match=r"valid presets: \['mossformer2_se_48k', 'small', 'tiny'\]"):
        build_model("large")
    with pytest.raises(ValueError, match="unknown MossFormer2Config field.*'depth'"):
        build_model({"depth": 3})
    with pytest.raises(ValueError, match="rotary_dim"):
        MossFormer2Config(query_key_dim=16, rotary_dim=32)


@pytest.mark.parametrize("samples", [1920, 1920 + 383, 48000, 48000 * 2 + 77])
def test_mask_shape_follows_the_frames_of_the_waveform(tiny, samples):
    feats = compute_features(torch.randn(2, samples) * 0.1, dither=0.0)
    assert feats.shape == (2, num_frames(samples), FEATURE_DIM)
    mask = tiny.eval()(feats)
    assert mask.shape == (2, num_frames(samples), N_BINS)
    assert torch.isfinite(mask).all() and (mask >= 0).all()


def test_full_preset_over_one_attention_group(full_model):
    with torch.no_grad():
        mask = full_model(fbank(1, 300))  # 300 frames: two groups of 256, the second padded
    assert mask.shape == (1, 300, N_BINS) and torch.isfinite(mask).all()


def test_bad_input_is_rejected_clearly(tiny):
    with pytest.raises(ValueError, match=r"\(batch, frames >= 1, 180\)"):
        tiny(torch.randn(2, 10, 179))
    with pytest.raises(ValueError, match=r"\(batch, frames >= 1, 180\)"):
        tiny(torch.randn(10, 180))
    with pytest.raises(ValueError, match="at least one 1920-sample frame"):
        compute_features(torch.randn(1, 1919))


def test_every_parameter_receives_a_gradient(tiny):
    tiny.train()
    noisy, clean = torch.randn(2, 48000) * 0.1, torch.randn(2, 48000) * 0.05
    loss = mask_loss(tiny(compute_features(noisy)), noisy, clean)
    loss.backward()
    trainable = [(name, p) for name, p in tiny.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(tiny.parameters())) - 1  # all but the frozen rotary frequencies
    for name, p in trainable:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_time_convolution_backward_is_exact():
    """Our CPU backward for the depthwise time convolution: gradcheck, and equal to autograd through
    a plain Conv1d at a size where the model uses it."""
    from model.network import _CpuTimeConv, depthwise_time_conv_residual

    for batch, frames, channels, kernel in [(2, 9, 3, 5), (1, 4, 2, 7), (3, 1, 2, 3), (2, 20, 4, 39)]:
        x = torch.randn(batch, frames, channels, dtype=torch.float64, requires_grad=True)
        taps = torch.randn(channels, 1, 1, kernel, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_CpuTimeConv.apply, (x, taps))
    x = torch.randn(2, 300, 256, requires_grad=True)
    weight = torch.randn(256, 1, 17, requires_grad=True)
    grad = torch.randn(2, 300, 256)
    ours = torch.autograd.grad(depthwise_time_conv_residual(x, weight), (x, weight), grad)
    plain = x + torch.nn.functional.conv1d(x.transpose(1, 2), weight, padding=8, groups=256).transpose(1, 2)
    expected = torch.autograd.grad(plain, (x, weight), grad)
    for a, b in zip(ours, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_the_compiled_weight_gradient_sums_what_the_eager_loop_sums():
    """Under torch.compile the time convolution's weight gradient is one expression over shifted windows: the same
    sums as the per-tap loop, also where the kernel is longer than the sequence."""
    from model.network import _time_conv_weight_grad, _time_conv_weight_grad_fused

    for batch, frames, channels, kernel in [(2, 9, 3, 5), (1, 4, 2, 7), (3, 1, 2, 3), (2, 20, 4, 39), (2, 300, 64, 17)]:
        x = torch.randn(batch, frames, channels, dtype=torch.float64)
        grad = torch.randn(batch, frames, channels, dtype=torch.float64)
        loop = _time_conv_weight_grad(x, grad, kernel)
        assert loop.shape == (channels, kernel)
        assert torch.allclose(_time_conv_weight_grad_fused(x, grad, kernel), loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_with_low_precision_parameters(tiny, dtype):
    x = fbank(2, 130)
    reference = tiny.eval()(x)
    tiny.to(dtype).train()
    mask = tiny(x.to(dtype))
    assert mask.dtype == dtype and torch.isfinite(mask).all()
    if dtype == torch.bfloat16:  # fp16 training needs loss scaling; on CPU fp16 matmuls also overflow
        mask.float().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in tiny.parameters() if p.requires_grad)
    tiny.eval()
    with torch.no_grad():
        assert (tiny(x.to(dtype)).float() - reference).abs().mean() < 0.05


def test_runs_under_autocast(tiny):
    x = fbank(2, 130)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = tiny(x)
    assert mask.dtype == torch.bfloat16
    mask.float().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in tiny.parameters() if p.requires_grad)


def test_equals_the_reference_implementation():
    """bench/bench_model.py --write-golden stored a small config's weights (perturbed off their init), an
    input and the mask computed by the reference (clearvoice 0.1.2) in eval mode; ours must match."""
    golden = torch.load(GOLDEN, map_location="cpu", weights_only=True)
    model = build_model(golden["config"]).eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    with torch.no_grad():
        mask = model(golden["fbank"])
    assert (mask - golden["reference_mask"]).abs().max() < 1e-5


def test_model_package_imports_neither_deepspeed_nor_launcher():
    for path in (ROOT / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] not in ("deepspeed", "launcher"), f"{path} imports {name}"
    code = ("import sys, model, model.inference, model.checkpoint, model.compile, model.flops; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'launcher')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_identity_taps_are_buffers_not_rebuilt_per_forward(tiny):
    """The residual's identity is folded into each depthwise convolution's centre tap from a non-persistent
    buffer: no per-call zeros/select/fill kernels (4 per call, 576 per forward of the full model), no new
    state-dict keys, and it follows the module's dtype."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count[str(func)] += 1
            return func(*args, **(kwargs or {}))

    tiny.eval()
    with torch.no_grad(), Ops() as ops:
        tiny(fbank(1, 40))
    assert ops.count["aten.zeros.default"] == 0 and ops.count["aten.select.int"] == 0, ops.count
    taps = [b for name, b in tiny.named_buffers() if name.endswith("identity_tap")]
    assert len(taps) == 12 and not any(k.endswith("identity_tap") for k in tiny.state_dict())
    assert all(t.sum() == 1 and t[t.numel() // 2] == 1 for t in taps)
    assert all(t.dtype == torch.bfloat16 for name, t in tiny.bfloat16().named_buffers() if name.endswith("identity_tap"))

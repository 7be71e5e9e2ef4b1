"""Checkpoints in the reference format, long-file enhancement and the enhance command line."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model import (SAMPLE_RATE_HZ, CheckpointError, apply_mask, build_model, compute_features, enhance,
                   export_reference_checkpoint, load_reference_checkpoint)
from model.inference import main as enhance_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():  # trained-looking weights: the output head's biases are not all zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture
def exported(tiny, tmp_path) -> Path:
    path = tmp_path / "tiny.pt"
    export_reference_checkpoint(tiny, path)
    return path


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_is_a_reference_checkpoint_that_loads_back(tiny, exported):
    checkpoint = torch.load(exported, weights_only=True)  # how ClearerVoice (torch >= 2.6) reads it
    assert list(checkpoint["model"]) == list(tiny.state_dict())
    assert all(k.startswith("mossformer.") for k in checkpoint["model"])
    assert checkpoint["mossformer2_config"] == tiny.config.to_dict()
    fresh = build_model("tiny")
    load_reference_checkpoint(fresh, exported)
    assert same_weights(fresh, tiny)


def test_ddp_prefix_and_bare_state_dicts_load(tiny, tmp_path):
    state = tiny.state_dict()
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 3, "step": 10}, tmp_path / "ddp.pt")
    torch.save(state, tmp_path / "bare.pt")
    for name in ("ddp.pt", "bare.pt"):
        fresh = build_model("tiny")
        load_reference_checkpoint(fresh, tmp_path / name)
        assert same_weights(fresh, tiny), name


def test_low_precision_models_export_fp32(tiny, tmp_path):
    export_reference_checkpoint(tiny.to(torch.bfloat16), tmp_path / "bf16.pt")
    state = torch.load(tmp_path / "bf16.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_mismatches_are_listed(tiny, exported, tmp_path):
    with pytest.raises(CheckpointError, match=r"\(preset 'small'\): 152 missing keys: .*; 79 shape mismatches: "
                                              r"mossformer\.conv1d_encoder\.weight is \(64, 180, 1\) in the "
                                              r"checkpoint, \(256, 180, 1\) in the model, ") as error:
        load_reference_checkpoint(build_model("small"), exported)
    assert str(error.value).startswith(f"{exported} does not fit the model") and "\n" not in str(error.value)
    state = tiny.state_dict()
    dropped = next(iter(state))
    torch.save({"model": {**{k: v for k, v in state.items() if k != dropped}, "mossformer.extra": torch.zeros(1)}},
               tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as error:
        load_reference_checkpoint(build_model("tiny"), tmp_path / "odd.pt")
    assert f"1 missing keys: {dropped}" in str(error.value)
    assert "1 unexpected keys: mossformer.extra" in str(error.value)


def test_unreadable_checkpoints_raise_naming_the_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"epoch": 1}, tmp_path / "noweights.pt")
    cases = {"missing.pt": "no such checkpoint file", "junk.pt": "not a loadable PyTorch checkpoint",
             "noweights.pt": "no weights found"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as error:
            load_reference_checkpoint(build_model("tiny"), tmp_path / name)
        assert str(tmp_path / name) in str(error.value)


def reference_windowing(model, waveform: torch.Tensor) -> torch.Tensor:
    """The reference's long-file loop (decode_one_audio_mossformer2_se_48k), its padding included, with
    our single-pass enhancement per window."""
    window, stride = 4 * SAMPLE_RATE_HZ, 3 * SAMPLE_RATE_HZ
    give_up = (window - stride) // 2
    t = waveform.numel()
    if (t - window) % stride != 0:
        waveform = torch.cat((waveform, torch.zeros(t - (t - window) // stride * stride)))
    outputs = torch.zeros(waveform.numel())
    current = 0
    while current + window <= waveform.numel():
        segment = enhance(model, waveform[current:current + window])
        if current == 0:
            outputs[:window - give_up] = segment[:-give_up]
        else:
            outputs[current + give_up:current + window - give_up] = segment[give_up:-give_up]
        current += stride
    return outputs[:t]


@pytest.mark.parametrize("seconds", [21.3, 22.0])
def test_long_inputs_are_windowed_like_the_reference(tiny, seconds):
    length = int(seconds * SAMPLE_RATE_HZ)
    x = torch.randn(length, generator=torch.Generator().manual_seed(1)) * 0.1
    enhanced = enhance(tiny, x)
    assert enhanced.shape == x.shape and torch.isfinite(enhanced).all()
    expected = reference_windowing(tiny, x)
    tail = SAMPLE_RATE_HZ // 2
    assert torch.allclose(enhanced[:-tail], expected[:-tail], atol=1e-5)
    if (length - 4 * SAMPLE_RATE_HZ) % (3 * SAMPLE_RATE_HZ) == 0:
        # The reference leaves the last 0.5 s silent when (length - 4 s) is a multiple of 3 s; we do not.
        assert expected[-tail:].abs().max() == 0 and enhanced[-tail:].abs().max() > 0
    else:
        assert torch.allclose(enhanced[-tail:], expected[-tail:], atol=1e-5)
    batched = enhance(tiny, torch.stack((x, 0.5 * x)))
    assert torch.allclose(batched[0], enhanced, atol=1e-5)


def test_short_inputs_take_one_pass(tiny):
    x = torch.randn(2, 3 * SAMPLE_RATE_HZ + 123, generator=torch.Generator().manual_seed(2)) * 0.1
    tiny.train()
    enhanced = enhance(tiny, x)
    assert tiny.training  # restored
    with torch.no_grad():
        expected = apply_mask(tiny.eval()(compute_features(x, dither=0.0)), x)
    assert torch.allclose(enhanced, expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least 1920"):
        enhance(tiny, torch.zeros(1000))


def write_wav(path: Path, seconds: float, rate: int = SAMPLE_RATE_HZ, channels: int = 1) -> Path:
    audio = np.random.default_rng(0).normal(0, 0.1, (int(seconds * rate), channels)).astype(np.float32)
    sf.write(path, audio, rate)
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    code = enhance_main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_enhances_a_file(exported, tmp_path, capsys):
    noisy = write_wav(tmp_path / "in.wav", 0.5, channels=2)
    code, err = run_cli(capsys, noisy, tmp_path / "out.wav", "--checkpoint", exported)
    assert code == 0, err
    audio, rate = sf.read(tmp_path / "out.wav")
    assert rate == SAMPLE_RATE_HZ and audio.shape == (SAMPLE_RATE_HZ // 2,)


def test_cli_resamples_only_when_asked(exported, tmp_path, capsys):
    noisy = write_wav(tmp_path / "in16k.wav", 0.5, rate=16000)
    code, err = run_cli(capsys, noisy, tmp_path / "out.wav", "--checkpoint", exported)
    assert code == 2 and err.count("\n") == 1
    assert f"{noisy}: sample rate is 16000 Hz" in err and "--resample" in err
    code, err = run_cli(capsys, noisy, tmp_path / "out.wav", "--checkpoint", exported, "--resample")
    assert code == 0, err
    assert sf.info(str(tmp_path / "out.wav")).frames == math.ceil(0.5 * SAMPLE_RATE_HZ)


def test_cli_rejects_bad_inputs_with_one_line(exported, tmp_path, capsys):
    good = write_wav(tmp_path / "good.wav", 0.3)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), dtype=np.float32), SAMPLE_RATE_HZ)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    cases = [
        ((empty, "--checkpoint", exported), f"{empty}: the audio file is empty"),
        ((text, "--checkpoint", exported), f"{text}: not a readable audio file"),
        ((tmp_path / "nope.wav", "--checkpoint", exported), "nope.wav: no such file"),
        ((good, "--checkpoint", tmp_path / "none.pt"), "none.pt: no such checkpoint file"),
        ((good, "--checkpoint", junk), f"{junk}: not a loadable PyTorch checkpoint"),
        ((good, "--checkpoint", exported, "--preset", "small"), f"{exported} does not fit the model"),
    ]
    for args, message in cases:
        code, err = run_cli(capsys, args[0], tmp_path / "out.wav", *args[1:])
        assert code == 2, (args, err)
        assert err.startswith("error: ") and message in err, (args, err)
        assert "Traceback" not in err


def test_cli_as_a_module_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "model.enhance", str(tmp_path / "missing.wav"),
                             str(tmp_path / "out.wav"), "--checkpoint", str(tmp_path / "none.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing.wav'}: no such file"

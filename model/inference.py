"""Speech enhancement with a trained MossFormer2: ``enhance()`` and the command line behind

    python -m model.enhance IN.wav OUT.wav --checkpoint CKPT [--preset NAME] [--resample] [--device cpu|cuda]

CKPT is a ClearerVoice MossFormer2_SE_48K checkpoint or one written by ``export_reference_checkpoint``.
The output is 16-bit PCM at 48 kHz.

Long inputs are windowed as in the reference's inference: over 20 s, 4 s windows every 3 s; each window
keeps its middle 3 s (the first window also keeps its first 0.5 s), so the kept parts tile the signal
with no cross-fade. Unlike the reference we pad so that the last window's kept part reaches the end of the
file (the reference leaves the last 0.5 s silent when the length minus 4 s is a multiple of 3 s), and we
use no dither (the reference's inference dithers, so its output varies from run to run).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, config_from_checkpoint, load_state_dict_strict, read_checkpoint, \
    state_dict_from_checkpoint
from .config import DEFAULT_PRESET, PRESETS, resolve_config
from .features import N_FFT, SAMPLE_RATE_HZ, compute_features
from .loss import apply_mask
from .network import build_model

ONE_PASS_MAX_SECONDS = 20.0
WINDOW_SECONDS = 4.0
STRIDE_SECONDS = 3.0


def _enhance_batch(model: nn.Module, waveforms: Tensor, batch_size: int) -> Tensor:
    param = next(model.parameters())
    outputs = []
    for chunk in waveforms.split(batch_size):
        chunk = chunk.to(param.device)
        features = compute_features(chunk, dither=0.0).to(param.dtype)
        outputs.append(apply_mask(model(features).float(), chunk.float()))
    return torch.cat(outputs)


def _enhance_windowed(model: nn.Module, waveforms: Tensor, window: int, stride: int, windows_per_batch: int
                      ) -> Tensor:
    batch, length = waveforms.shape
    give_up = (window - stride) // 2  # dropped at each window edge (0.5 s by default)
    # Enough windows for the kept parts, [k * stride + give_up, (k + 1) * stride + give_up), to pass the end.
    num_windows = max(1, math.ceil((length - give_up) / stride))
    padded = torch.nn.functional.pad(waveforms, (0, (num_windows - 1) * stride + window - length))
    windows = padded.unfold(-1, window, stride)  # (B, K, window), a view: only kept parts are stored
    per_step = max(1, windows_per_batch // batch)
    pieces = []
    for start in range(0, num_windows, per_step):
        chunk = windows[:, start:start + per_step]
        count = chunk.shape[1]
        enhanced = _enhance_batch(model, chunk.reshape(batch * count, window), batch * count)
        enhanced = enhanced.view(batch, count, window).to(waveforms.device)
        if start == 0:
            pieces.append(enhanced[:, 0, :give_up])
        pieces.append(enhanced[:, :, give_up:give_up + stride].reshape(batch, count * stride))
    return torch.cat(pieces, dim=-1)[:, :length]


def enhance(model: nn.Module, waveform: Tensor, *, one_pass_max_seconds: float = ONE_PASS_MAX_SECONDS,
            window_seconds: float = WINDOW_SECONDS, stride_seconds: float = STRIDE_SECONDS,
            windows_per_batch: int = 4) -> Tensor:
    """Enhance 48 kHz audio in [-1, 1]: (L,) or (B, L) -> the same shape, float32, on the input's device.

    Runs in eval mode without gradients on the model's device and dtype, features without dither.
    Inputs longer than ``one_pass_max_seconds`` go through windows (see the module docstring), up to
    ``windows_per_batch`` windows per forward pass.
    """
    if waveform.dim() not in (1, 2):
        raise ValueError(f"expected a waveform shaped (samples,) or (batch, samples), got {tuple(waveform.shape)}")
    if waveform.shape[-1] < N_FFT:
        raise ValueError(f"waveform has {waveform.shape[-1]} samples; at least {N_FFT} "
                         f"({1000 * N_FFT // SAMPLE_RATE_HZ} ms at {SAMPLE_RATE_HZ} Hz) are needed")
    window = int(round(window_seconds * SAMPLE_RATE_HZ))
    stride = int(round(stride_seconds * SAMPLE_RATE_HZ))
    if not N_FFT <= window or not 0 < stride <= window:
        raise ValueError(f"need {N_FFT / SAMPLE_RATE_HZ} s <= window and 0 < stride <= window, got "
                         f"window {window_seconds} s, stride {stride_seconds} s")
    batch = waveform.reshape(-1, waveform.shape[-1]).float()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if batch.shape[-1] > one_pass_max_seconds * SAMPLE_RATE_HZ:
                enhanced = _enhance_windowed(model, batch, window, stride, windows_per_batch)
            else:
                enhanced = _enhance_batch(model, batch, windows_per_batch)
    finally:
        model.train(was_training)
    return enhanced.to(waveform.device).reshape(waveform.shape)


class _UserError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


def _read_audio(path: str, resample: bool) -> Tensor:
    import soundfile

    if not os.path.isfile(path):
        raise _UserError(f"{path}: no such file")
    try:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise _UserError(f"{path}: not a readable audio file ({str(error).strip() or type(error).__name__})") from None
    if audio.shape[0] == 0:
        raise _UserError(f"{path}: the audio file is empty (0 samples)")
    waveform = torch.from_numpy(audio[:, 0].copy())  # first channel, as the reference's data loader
    if rate != SAMPLE_RATE_HZ:
        if not resample:
            raise _UserError(f"{path}: sample rate is {rate} Hz; the model needs {SAMPLE_RATE_HZ} Hz "
                             f"(pass --resample to convert)")
        import torchaudio

        waveform = torchaudio.functional.resample(waveform, rate, SAMPLE_RATE_HZ)
    if waveform.numel() < N_FFT:
        raise _UserError(f"{path}: {waveform.numel()} samples at {SAMPLE_RATE_HZ} Hz is shorter than one "
                         f"{N_FFT}-sample (40 ms) frame")
    return waveform


def _load_model(path: str, preset: str | None, device: torch.device) -> nn.Module:
    checkpoint = read_checkpoint(path)
    config = resolve_config(preset) if preset else (config_from_checkpoint(checkpoint) or PRESETS[DEFAULT_PRESET])
    model = build_model(config)
    load_state_dict_strict(model, state_dict_from_checkpoint(checkpoint, path), path)
    return model.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.enhance", description="Enhance one audio file.")
    parser.add_argument("input", help="noisy audio file (48 kHz, or any rate with --resample)")
    parser.add_argument("output", help="where to write the enhanced 48 kHz 16-bit WAV")
    parser.add_argument("--checkpoint", required=True, help="ClearerVoice checkpoint or our export")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model size; default: the config stored in the checkpoint, else "
                             f"{DEFAULT_PRESET}")
    parser.add_argument("--resample", action="store_true", help=f"resample input to {SAMPLE_RATE_HZ} Hz")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise _UserError("--device cuda: no CUDA device is available")
        waveform = _read_audio(args.input, args.resample)
        model = _load_model(args.checkpoint, args.preset, torch.device(args.device))
        enhanced = enhance(model, waveform.to(args.device)).cpu()
        _write_audio(args.output, enhanced)
    except (_UserError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({enhanced.numel() / SAMPLE_RATE_HZ:.2f} s at {SAMPLE_RATE_HZ} Hz)")
    return 0


def _write_audio(path: str, waveform: Tensor) -> None:
    import soundfile

    try:
        soundfile.write(path, waveform.clamp(-1.0, 1.0).numpy(), SAMPLE_RATE_HZ, subtype="PCM_16")
    except Exception as error:
        raise _UserError(f"{path}: cannot write the output ({str(error).strip() or type(error).__name__})") from None


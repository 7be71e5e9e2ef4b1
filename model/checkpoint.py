"""Reference-format (ClearerVoice) checkpoints: load them strictly, write ours in that format.

A ClearerVoice checkpoint is a ``torch.save``d dict whose ``model`` entry is the state dict of its TestNet
wrapper: keys ``mossformer.<...>``, or ``module.mossformer.<...>`` when saved from DDP. Our model has the
same keys. ClearerVoice reads only ``model`` (see its ``SpeechModel._load_model``) and ignores any other
entry, so exports may carry our config alongside.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .config import PRESETS, MossFormer2Config

CONFIG_KEY = "mossformer2_config"
_KEY_PREFIX = "mossformer."
_DDP_PREFIX = "module."
_SHOW = 5  # keys listed per kind of mismatch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` on CPU, with errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({first_line})") from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    return dict(checkpoint)


def state_dict_from_checkpoint(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Tensor]:
    """The weights in a checkpoint dict: its ``model`` entry, or the dict itself if it is a bare state dict;
    a leading ``module.`` (DDP) is removed."""
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state = checkpoint["model"]
    elif checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        state = checkpoint
    else:
        raise CheckpointError(f"{source}: no weights found: expected a 'model' entry or a bare state dict, "
                              f"found keys {sorted(map(str, checkpoint))[:_SHOW]}")
    if state and all(key.startswith(_DDP_PREFIX) for key in state):
        state = {key[len(_DDP_PREFIX):]: value for key, value in state.items()}
    return dict(state)


def config_from_checkpoint(checkpoint: Mapping[str, Any]) -> MossFormer2Config | None:
    """The config an export of ours carries, if any (reference checkpoints carry none)."""
    fields = checkpoint.get(CONFIG_KEY)
    return MossFormer2Config.from_dict(fields) if isinstance(fields, Mapping) else None


def _mismatch_report(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} is {tuple(state[key].shape)} in the checkpoint, {tuple(expected[key].shape)} in the model"
              for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    report = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            report.append(f"{len(items)} {title}: " + ", ".join(items[:_SHOW]) + more)
    return report


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, MossFormer2Config):
        return type(model).__name__
    for name, preset in PRESETS.items():
        if preset == config:
            return f"preset {name!r}"
    default = MossFormer2Config()
    return "config " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if getattr(default, k) != v)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch raises CheckpointError listing the missing
    and unexpected keys and the shape mismatches (one line)."""
    problems = _mismatch_report(model, state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({_describe(model)}): " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_reference_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a ClearerVoice MossFormer2_SE_48K checkpoint (or our export, or a bare state dict) strictly."""
    load_state_dict_strict(model, state_dict_from_checkpoint(read_checkpoint(path), os.fspath(path)),
                           os.fspath(path))


def export_reference_checkpoint(model: nn.Module, path: str | os.PathLike,
                                config: MossFormer2Config | None = None) -> None:
    """Write ``{'model': state dict, 'mossformer2_config': config fields}``, loadable by ClearerVoice (for the
    full preset) and by ``load_reference_checkpoint``. Weights are saved as fp32 on CPU."""
    state = model.state_dict()
    if state and all(key.startswith(_DDP_PREFIX) for key in state):
        state = {key[len(_DDP_PREFIX):]: value for key, value in state.items()}
    if not state or not all(key.startswith(_KEY_PREFIX) for key in state):
        raise ValueError(f"expected a MossFormer2 model whose state-dict keys start with {_KEY_PREFIX!r}")
    config = config if config is not None else getattr(model, "config", None)
    checkpoint: dict[str, Any] = {
        "model": {key: (value.detach().float() if value.is_floating_point() else value.detach()).cpu().clone()
                  for key, value in state.items()},
    }
    if config is not None:
        checkpoint[CONFIG_KEY] = config.to_dict()
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    torch.save(checkpoint, path)

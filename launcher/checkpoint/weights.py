"""Weights in: read and check the weights a training starts from (`train.init_from`) or an evaluation scores.

Accepted sources, one resolver for both (`read_weights`):
- a file: a ClearerVoice checkpoint (`{'model': state_dict}`, keys `mossformer.` or `module.mossformer.`), a bare
  state dict, or a `python -m launcher.export` file (which also carries the model config);
- a ClearerVoice checkpoint folder (as its model download or its training leaves it): the file its
  `last_best_checkpoint` (else `last_checkpoint`) pointer names;
- a run directory, its `checkpoints/` folder or one `stepNNNNNNNN` tag of it, at any ZeRO stage: the run's best
  checkpoint, else its newest complete one, consolidated by launcher/checkpoint/export.py.

`prepare_init` runs on every rank of a training before the process group (a bad file stops every rank with one
line and exit 2); launcher/training/init_from.py then puts the weights into the engine and confirms them.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from launcher.checkpoint.export import ExportError, consolidated_state_dict
from launcher.checkpoint.marker import CheckpointError, read_marker, resolve_resume, run_checkpoint
from launcher.config import Config, ConfigError

_SHOW = 5  # keys named per kind of mismatch
POINTERS = ("last_best_checkpoint", "last_checkpoint")  # ClearerVoice's pointer files
_DDP_PREFIX = "module."


class InitError(ConfigError):
    """Weights that cannot start this run; the message names the source and what is wrong."""


@dataclass
class Weights:
    """Tensors read from a source, and what is known about the model they belong to."""

    state: dict[str, Any]
    source: str  # for messages: the path, and for a run which checkpoint
    kind: str  # "ClearerVoice-format checkpoint" (bare state dicts too), "launcher.export file", "run checkpoint"
    preset: str | None = None  # a run's preset
    config: Any = None  # an export's MossFormer2Config
    prefix_removed: bool = False


@dataclass
class InitPlan:
    """What `train.init_from` does in this run: load `state` (matched to the model), or nothing and why."""

    source: str
    skipped: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    summary: str = ""


def names(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def read_weights(path: str | os.PathLike) -> Weights:
    """The weights at `path` (see the module docstring), on the CPU, or InitError naming what is wrong."""
    from model.checkpoint import CheckpointError, config_from_checkpoint, read_checkpoint, state_dict_from_checkpoint

    where = Path(path)
    if where.is_dir() and run_checkpoint(where) is None:
        # ClearerVoice's layout (its released checkpoint folders and its training's checkpoint_dir): a pointer file
        # naming the .pt beside it, best first.
        pointer = next((where / name for name in POINTERS if (where / name).is_file()), None)
        if pointer is None:
            raise InitError(f"{where}: a folder without a checkpoint (expected a run directory, its checkpoints/ "
                            f"folder, a stepNNNNNNNN tag holding COMPLETE.json, or a ClearerVoice checkpoint folder "
                            f"with a {' or '.join(POINTERS)} file)")
        named = pointer.read_text().strip().splitlines()[0].strip() if pointer.read_text().strip() else ""
        if not named:
            raise InitError(f"{pointer}: empty; it should name the checkpoint file beside it")
        where = where / named
    found = run_checkpoint(where) if where.is_dir() else None
    if found is not None:
        ckpt_dir, tag, which = found
        try:
            state = consolidated_state_dict(ckpt_dir, tag)
        except (ExportError, OSError, RuntimeError, ValueError, KeyError) as e:
            raise InitError(f"{ckpt_dir / tag}: cannot consolidate the checkpoint's weights: {e}") from None
        marker = read_marker(ckpt_dir, tag)
        return Weights(dict(state), f"{ckpt_dir / tag} ({which}, step {marker.get('step')}, "
                       f"ZeRO {marker.get('zero_stage')})", "run checkpoint", preset=marker.get("preset"))
    if not where.is_file():
        raise InitError(f"{where}: no such file" + ("" if where.exists() else " or directory"))
    try:
        checkpoint = read_checkpoint(where)
        raw = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
        state = state_dict_from_checkpoint(checkpoint, str(where))
        config = config_from_checkpoint(checkpoint)
    except CheckpointError as e:
        hint = ("; a DeepSpeed model-states file: pass its run directory instead" if "model_states" in where.name
                else "")
        raise InitError(f"{e}{hint}") from None
    except ValueError as e:  # a stored config that is not ours
        raise InitError(f"{where}: {e}") from None
    prefixed = bool(raw) and all(str(k).startswith(_DDP_PREFIX) for k in raw)
    kind = "launcher.export file" if config is not None else "ClearerVoice-format checkpoint"
    return Weights(state, str(where), kind, config=config, prefix_removed=prefixed)


@functools.lru_cache(maxsize=8)
def expected_shapes(preset_or_config: Any) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model and its shape, from a model built on the meta device (no memory)."""
    import torch

    from model import build_model

    with torch.device("meta"):
        model = build_model(preset_or_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def source_preset(weights: Weights) -> str | None:
    """The preset the weights belong to: a run's, the one an export's config equals, else (ClearerVoice files carry
    no config) the one sharing the most tensors with them with no shape mismatch; None if none fits."""
    from model import PRESETS

    if weights.preset:
        return weights.preset
    if weights.config is not None:
        return next((name for name, config in PRESETS.items() if config == weights.config), None)
    best, best_shared = None, 0
    for name in PRESETS:
        expected = expected_shapes(name)
        shared = [k for k in weights.state if k in expected]
        if all(tuple(weights.state[k].shape) == expected[k] for k in shared) and len(shared) > best_shared:
            best, best_shared = name, len(shared)
    return best


def match(weights: Weights, expected: Mapping[str, tuple[int, ...]], strict: bool, model_name: str) -> InitPlan:
    """Check keys and shapes against the model's: shapes always strictly, a missing key unless `strict` is False."""
    state = weights.state
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)} in the file, {expected[k]} in the model"
              for k in expected if k in state and tuple(state[k].shape) != expected[k]]

    def hint() -> str:
        name = source_preset(weights)
        return f" (the file holds a {name!r} model: set model.preset={name})" if name and name != model_name else ""

    if shapes:
        raise InitError(f"{weights.source}: {len(shapes)} shape mismatch(es) with the {model_name!r} model{hint()}: "
                        + names(shapes))
    if len(missing) == len(expected):
        raise InitError(f"{weights.source}: none of the model's tensors are in the file (its keys look like "
                        f"{names(sorted(state))}); is it a MossFormer2 checkpoint?")
    if missing and strict:
        raise InitError(f"{weights.source}: {len(missing)} of the {model_name!r} model's {len(expected)} tensors are "
                        f"missing from the file{hint()}: {names(missing)}; pass train.init_strict=false to keep "
                        "their fresh initialisation")
    loaded = {k: v for k, v in state.items() if k in expected}
    values = sum(v.numel() for v in loaded.values())
    summary = (f"{len(loaded)} of {len(expected)} tensors ({values:,} values) from {weights.source}, "
               f"a {weights.kind}" + (", 'module.' prefix removed" if weights.prefix_removed else ""))
    if missing:
        summary += f"; {len(missing)} missing, left at their fresh initialisation: {names(missing)}"
    if unexpected:
        summary += f"; {len(unexpected)} unexpected, ignored: {names(unexpected)}"
    return InitPlan(weights.source, None, loaded, missing, unexpected, summary)


def prepare_init(cfg: Config, resume: str | None) -> InitPlan | None:
    """What `train.init_from` will do in this run (None when unset); InitError when the weights cannot start it.

    Runs before the process group, on every rank. A run that resumes (`--resume PATH`, or `--resume auto` with a
    complete checkpoint in its run directory) ignores init_from, so that a requeued fine-tune continues instead
    of starting over.
    """
    source = cfg.train.init_from
    if not source:
        return None
    if resume:
        try:
            target = resolve_resume(resume, Path(cfg.train.run_dir) / "checkpoints")
        except CheckpointError:
            target = (Path(resume), "")  # Trainer reports the bad path; resuming was asked for either way
        if target is not None:
            where = target[0] / target[1] if target[1] else target[0]
            return InitPlan(source, skipped=f"resuming from {where}: train.init_from={source} is ignored "
                                            "(it only starts a run)")
    weights = read_weights(source)
    return match(weights, expected_shapes(cfg.model.preset), cfg.train.init_strict, cfg.model.preset)


def _digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over (key, fp32 bytes) in key order: equal digests mean equal weights."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_digest(state: Mapping[str, Any]) -> str:
    """The digest `confirm_after_initialize` records, of a state dict (e.g. a checkpoint file's)."""
    return _digest(state)

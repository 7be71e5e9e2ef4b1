"""Start a training from existing weights (`train.init_from`), and read weights for evaluation.

Accepted sources, one resolver for both (`read_weights`):
- a file: a ClearerVoice checkpoint (`{'model': state_dict}`, keys `mossformer.` or `module.mossformer.`), a bare
  state dict, or a `python -m launcher.export` file (which also carries the model config);
- a ClearerVoice checkpoint folder (as its model download or its training leaves it): the file its
  `last_best_checkpoint` (else `last_checkpoint`) pointer names;
- a run directory, its `checkpoints/` folder or one `stepNNNNNNNN` tag of it, at any ZeRO stage: the run's best
  checkpoint, else its newest complete one, consolidated by launcher/export.py.

Order in a training run: `prepare_init` runs on every rank before the process group (a bad file stops every rank
with one line and exit 2), `load_before_initialize` fills the freshly built module, and `confirm_after_initialize`
reads the weights back out of the engine (gathered from the partitions at ZeRO-3), compares every tensor with the
file, and, with bf16/fp16, puts the file's fp32 values into the optimizer's fp32 master weights (which DeepSpeed
would otherwise copy from the rounded 16-bit module). Only the weights change: the optimizer starts fresh and
the learning rate is the recipe's.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _run_checkpoint(path: Path) -> tuple[Path, str, str] | None:
    """(checkpoints folder, tag, which) for a tag folder, a checkpoints folder or a run directory; None otherwise.
    A run's best checkpoint (as recorded by its newest complete one) wins over its newest."""
    from launcher.checkpoint import MARKER, complete_tags, read_marker

    if (path / MARKER).is_file():
        return path.parent, path.name, "the checkpoint named"
    for ckpt_dir in (path, path / "checkpoints"):
        tags = complete_tags(ckpt_dir)
        if tags:
            best = (read_marker(ckpt_dir, tags[-1]).get("state") or {}).get("best_tag")
            return (ckpt_dir, best, "best checkpoint") if best in tags else (ckpt_dir, tags[-1],
                                                                             "newest complete checkpoint")
    return None


def read_weights(path: str | os.PathLike) -> Weights:
    """The weights at `path` (see the module docstring), on the CPU, or InitError naming what is wrong."""
    from model.checkpoint import CheckpointError, config_from_checkpoint, read_checkpoint, state_dict_from_checkpoint

    where = Path(path)
    if where.is_dir() and _run_checkpoint(where) is None:
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
    found = _run_checkpoint(where) if where.is_dir() else None
    if found is not None:
        ckpt_dir, tag, which = found
        from launcher import export
        from launcher.checkpoint import read_marker

        try:
            state = export.consolidated_state_dict(ckpt_dir, tag)
        except (export.ExportError, OSError, RuntimeError, ValueError, KeyError) as e:
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
                        + _names(shapes))
    if len(missing) == len(expected):
        raise InitError(f"{weights.source}: none of the model's tensors are in the file (its keys look like "
                        f"{_names(sorted(state))}); is it a MossFormer2 checkpoint?")
    if missing and strict:
        raise InitError(f"{weights.source}: {len(missing)} of the {model_name!r} model's {len(expected)} tensors are "
                        f"missing from the file{hint()}: {_names(missing)}; pass train.init_strict=false to keep "
                        "their fresh initialisation")
    loaded = {k: v for k, v in state.items() if k in expected}
    values = sum(v.numel() for v in loaded.values())
    summary = (f"{len(loaded)} of {len(expected)} tensors ({values:,} values) from {weights.source}, "
               f"a {weights.kind}" + (", 'module.' prefix removed" if weights.prefix_removed else ""))
    if missing:
        summary += f"; {len(missing)} missing, left at their fresh initialisation: {_names(missing)}"
    if unexpected:
        summary += f"; {len(unexpected)} unexpected, ignored: {_names(unexpected)}"
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
        from launcher.checkpoint import CheckpointError, resolve_resume

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


def load_before_initialize(model, plan: InitPlan | None, log) -> None:
    """Copy the weights into the freshly built module. Before deepspeed.initialize: at ZeRO-3 the engine then
    broadcasts rank 0's tensors and partitions them (and at ZeRO 0-2 broadcasts them), so they reach every rank."""
    if plan is None:
        return
    if plan.skipped:
        log.print(f"[init_from] {plan.skipped}")
        return
    model.load_state_dict(plan.state, strict=False)
    log.print(f"[init_from] loaded {plan.summary}")


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


def _set_fp32_masters(engine, params: Mapping[str, Any], state: Mapping[str, Any], zero_stage: int) -> dict[str, Any]:
    """Set the optimizer's fp32 master weights of a bf16/fp16 engine to the file's values; returns them as read
    back (empty when the optimizer keeps none that can be reached)."""
    import torch
    from torch._utils import _unflatten_dense_tensors

    optimizer = engine.optimizer
    masters: dict[str, Any] = {}
    # ZeRO-0 with bf16/fp16 goes through DeepSpeed's FP16 optimizers, which keep fp32 copies of each group's
    # 16-bit parameters, in group order: one tensor per parameter (FP16_UnfusedOptimizer, with a torch optimizer)
    # or one flat tensor per group without padding (FP16_Optimizer, with a fused Adam; unflattening gives views).
    groups = getattr(optimizer, "fp16_groups", None) if zero_stage == 0 else None
    copies = getattr(optimizer, "fp32_groups", None)
    if groups is not None and copies is None and hasattr(optimizer, "fp32_groups_flat"):
        copies = [_unflatten_dense_tensors(flat.data, group) for group, flat in zip(groups, optimizer.fp32_groups_flat)]
    if groups is not None and copies is not None:
        names = {}
        for name, p in params.items():
            names.setdefault(id(p), name)
        for group, fp32_group in zip(groups, copies):
            for p, copy in zip(group, fp32_group):
                name = names.get(id(p))
                if name in state:
                    copy.data.copy_(state[name].to(dtype=torch.float32).view_as(copy))
                    masters[name] = copy.detach().cpu().clone()
        return masters
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    # ZeRO 1-3 (and BF16_Optimizer): DeepSpeed's public fragment API (stage 3 partitions, 1/2 flat fragments).
    for name, p in params.items():
        if name in state and p.requires_grad:
            value = state[name].to(device=p.device, dtype=torch.float32)
            if zero_stage == 3:
                _set_zero3_master(p, value)
            else:
                safe_set_full_fp32_param(p, value)
    for name, p in params.items():  # a collective per tensor, in one order on every rank
        if name in state and p.requires_grad:
            value = safe_get_full_fp32_param(p)
            if value is not None:
                masters[name] = value.detach().float().cpu()
    return masters


def _set_zero3_master(param, value) -> None:
    """What DeepSpeed's stage-3 `set_full_hp_param` does, for a padded last partition too: in 0.19.8 it narrows
    past the end of the value when the parameter's size is not a multiple of the world size (a one-element
    parameter on 2 ranks fails). Each rank copies its own slice; the padding is left as it was."""
    optimizer = param._z3_optimizer
    partition, group = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    piece = value.flatten()[start:start + partition.numel()]
    partition.data[:piece.numel()].copy_(piece)
    if optimizer._swappable_optimizer_subgroup(group):
        optimizer._optimizer_states_and_gradient_swap_out(group)


def confirm_after_initialize(engine, plan: InitPlan | None, zero_stage: int, log) -> None:
    """Read the weights back out of the engine and compare them with the file, on every rank.

    Module tensors are gathered from the partitions at ZeRO-3; with bf16/fp16 the optimizer's fp32 master copies
    are first set to the file's fp32 values (DeepSpeed builds them from the rounded 16-bit module) and read back
    too. Logs one `init` record with the digest of what the engine now holds; a difference stops the run.
    """
    if plan is None or plan.skipped:
        return
    import deepspeed
    import torch
    import torch.distributed as dist

    state = plan.state
    # Shared tensors (one rotary module serves every layer) appear under each of their state-dict keys.
    params = dict(engine.module.named_parameters(remove_duplicate=False))
    mixed = engine.bfloat16_enabled() or engine.fp16_enabled()
    masters: dict[str, Any] = {}
    if mixed:
        masters = _set_fp32_masters(engine, params, state, zero_stage)
    differ: list[str] = []
    held: dict[str, Any] = {}
    with deepspeed.zero.GatheredParameters(list(dict(engine.module.named_parameters()).values()),
                                           enabled=zero_stage == 3):
        for name, tensor in [*params.items(), *engine.module.named_buffers(remove_duplicate=False)]:
            if name not in state:
                continue
            value = tensor.detach().cpu()
            if not torch.equal(value, state[name].to(value.dtype)):
                differ.append(name)
            held[name] = masters.get(name, value)
    differ += [name for name, value in masters.items() if not torch.equal(value, state[name].float())]
    verdict = torch.tensor([float(bool(differ))], device=next(iter(params.values())).device)
    dist.all_reduce(verdict)  # every rank stops, or none
    if verdict.item():
        raise InitError(f"init_from {plan.source}: after deepspeed.initialize the engine's weights differ from the "
                        f"file on {int(verdict.item())} of {dist.get_world_size()} rank(s) ({len(set(differ))} "
                        f"tensor(s) here: {_names(sorted(set(differ)))})")
    no_masters = mixed and not masters  # an optimizer of a kind this module does not know
    log.log({"kind": "init", "source": plan.source, "tensors": len(held), "missing": plan.missing,
             "unexpected": plan.unexpected, "sha256": _digest(held), "zero_stage": zero_stage,
             "fp32_masters_from_file": bool(masters)},
            f"[init_from] confirmed after deepspeed.initialize (ZeRO {zero_stage}): {len(held)} tensors equal to "
            "the file" + (", fp32 master weights set from the file" if masters else "")
            + ("; this optimizer exposes no fp32 masters: they start from the 16-bit weights" if no_masters else ""))

"""`train.init_from` on the engine side: the checked weights (launcher/checkpoint/weights.py) into the module before
deepspeed.initialize, then read back out of the engine and compared with the file.

`confirm_after_initialize` gathers the module's tensors from the partitions at ZeRO-3 and, with bf16/fp16, puts
the file's fp32 values into the optimizer's fp32 master weights (which DeepSpeed would otherwise copy from the
rounded 16-bit module). Only the weights change: the optimizer starts fresh and the learning rate is the recipe's.
"""

from __future__ import annotations

from typing import Any, Mapping

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from torch._utils import _unflatten_dense_tensors

from launcher.checkpoint.weights import InitError, InitPlan, names, state_digest


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


def _set_fp32_masters(engine, params: Mapping[str, Any], state: Mapping[str, Any], zero_stage: int) -> dict[str, Any]:
    """Set the optimizer's fp32 master weights of a bf16/fp16 engine to the file's values; returns them as read
    back (empty when the optimizer keeps none that can be reached)."""
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
                        f"tensor(s) here: {names(sorted(set(differ)))})")
    no_masters = mixed and not masters  # an optimizer of a kind this module does not know
    log.log({"kind": "init", "source": plan.source, "tensors": len(held), "missing": plan.missing,
             "unexpected": plan.unexpected, "sha256": state_digest(held), "zero_stage": zero_stage,
             "fp32_masters_from_file": bool(masters)},
            f"[init_from] confirmed after deepspeed.initialize (ZeRO {zero_stage}): {len(held)} tensors equal to "
            "the file" + (", fp32 master weights set from the file" if masters else "")
            + ("; this optimizer exposes no fp32 masters: they start from the 16-bit weights" if no_masters else ""))

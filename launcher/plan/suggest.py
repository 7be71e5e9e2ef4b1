"""`--suggest`: the largest micro-batch whose memory estimate fits one GPU, with the plan's global batch and LR.

The suggestion is re-planned through plan_from_args/make_plan exactly as the printed command would plan it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import dataclass
from typing import Any

from launcher.config import Config
from launcher.plan.ds_config import DEFAULT_PRESET, load_preset, preset_files, preset_micro_batch
from launcher.plan.memory import (GIB, MemoryEstimate, engine_settings, estimate, estimate_for, fmt_bytes,
                                  largest_fitting_micro_batch)
from launcher.plan.request import plan_from_args
from launcher.plan.rules import Plan, PlanError


@dataclass(frozen=True)
class Suggestion:
    """The largest micro-batch that fits one GPU with the plan's global batch, re-planned by make_plan."""

    gpu_memory_gb: float
    headroom: float
    budget_bytes: int
    memory_limit: int  # the largest micro-batch the memory allows, ignoring the global batch
    plan: Plan  # the re-planned suggestion
    ds_spec: str
    ds_config: dict[str, Any]
    memory: MemoryEstimate
    bound_by: str  # "memory", "global batch" or "divisibility"
    reason: str
    command: str

    def to_dict(self) -> dict[str, Any]:
        return {"gpu_memory_gb": self.gpu_memory_gb, "headroom": self.headroom, "budget_bytes": self.budget_bytes,
                "memory_limit_micro_batch": self.memory_limit, "micro_batch": self.plan.micro_batch,
                "gradient_accumulation_steps": self.plan.accumulation_steps,
                "train_batch_size": self.plan.global_batch, "lr": self.plan.peak_lr,
                "ds_config_spec": self.ds_spec, "bound_by": self.bound_by, "reason": self.reason,
                "command": self.command, "memory": self.memory.to_dict(), "plan": self.plan.to_dict()}


def _without_micro_batch(spec: str) -> str:
    """`spec` with each preset that only names a micro-batch (bs4.json) replaced by what it extends."""
    parts = []
    for part in spec.split("+"):
        part = part.strip()
        if preset_micro_batch(load_preset(part)) is None:
            parts.append(part)
            continue
        own_path = preset_files(part)[-1]
        own = json.loads(own_path.read_text())
        rest = set(own) - {"extends", "_comment", "train_micro_batch_size_per_gpu"}
        extends = own.get("extends", [])
        extends = [extends] if isinstance(extends, str) else list(extends)
        if rest or not extends:
            raise PlanError(
                f"--suggest: {part} names train_micro_batch_size_per_gpu and other settings ({', '.join(sorted(rest))}); "
                f"give a --ds_config without a micro-batch so that the micro-batch can change",
                rule="preset agrees with the plan")
        parts += [os.path.relpath(own_path.parent / e) for e in extends]
    new = "+".join(dict.fromkeys(parts))
    want = {k: v for k, v in load_preset(spec).items() if k != "train_micro_batch_size_per_gpu"}
    if load_preset(new) != want:
        raise PlanError(f"--suggest: cannot drop the micro-batch from {spec} without changing other settings; "
                        f"give a --ds_config without train_micro_batch_size_per_gpu", rule="preset agrees with the plan")
    return new


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nothing_fits(args: argparse.Namespace, preset: str, plan: Plan, ds_config: dict[str, Any], budget: int
                  ) -> PlanError:
    stage, precision = engine_settings(ds_config)
    w, seconds = plan.world_size, plan.segment_seconds
    one = estimate(preset, stage, precision, w, 1, seconds, ds_config)
    fits = [f"ZeRO {st} {pr} ({fmt_bytes(e.total)})" for st in (0, 1, 2, 3) for pr in ("fp32", "bf16")
            if (e := estimate(preset, st, pr, w, 1, seconds, ds_config)).total <= budget]
    return PlanError(
        f"--suggest: not even micro-batch 1 fits {args.gpu_memory_gb:g} GiB ({fmt_bytes(budget)} after "
        f"{args.memory_headroom:.0%} headroom) at ZeRO {stage}, {precision}, {w} GPUs, "
        f"{seconds:g} s crops: it needs {fmt_bytes(one.total)}.\n"
        f"Rule: model states + reduce buckets + activations of one micro-batch must fit one GPU.\n"
        + (f"Valid choices at micro-batch 1: {'; '.join(fits)}" if fits else
           "Valid choices: shorter crops (data.segment_seconds), more GPUs, or a smaller model"),
        rule="fits GPU memory")


def _bound(preset: str, plan: Plan, ds_config: dict[str, Any], budget: int, limit: int, best: int) -> tuple[str, str]:
    """(what stops a larger micro-batch, why, in words)."""
    stage, precision = engine_settings(ds_config)
    w, g = plan.world_size, plan.global_batch
    per_gpu = g // w
    if best == per_gpu:
        room = (f"memory would allow micro-batch {limit}, but a larger one changes the global batch (and the LR): "
                f"pass --global_batch for that" if limit > per_gpu else "memory allows no more either")
        return "global batch", f"accumulation is already 1: {g} samples per update / {w} GPUs = {per_gpu} per GPU; {room}"
    if best == limit:
        nxt = estimate(preset, stage, precision, w, limit + 1, plan.segment_seconds, ds_config)
        return "memory", f"micro-batch {limit + 1} would need {fmt_bytes(nxt.total)} > {fmt_bytes(budget)}"
    up = min(d for d in _divisors(per_gpu) if d > best)
    nxt = estimate(preset, stage, precision, w, up, plan.segment_seconds, ds_config)
    return "divisibility", (f"memory allows micro-batch {limit}, but it must divide the {per_gpu} samples per GPU per "
                            f"update ({g} / {w} GPUs); the next divisor, {up}, would need {fmt_bytes(nxt.total)} > "
                            f"{fmt_bytes(budget)}")


def _command(args: argparse.Namespace, spec: str, best: int, g: int) -> str:
    flags = [f"--ds_config {spec}"] + ([f"--config {args.config}"] if args.config else [])
    flags += [f"--set {x}" for x in args.set] if getattr(args, "set", None) else []
    flags += [f"--{name} {getattr(args, key)}" for name, key in (("num_nodes", "num_nodes"), ("num_gpus", "num_gpus"))
              if getattr(args, key) is not None]
    flags += [f"--batch_size {best}", f"--global_batch {g}"] + ([f"--lr_rule {args.lr_rule}"] if args.lr_rule else [])
    return "python -m launcher.plan " + " ".join(flags)


def suggest(args: argparse.Namespace, cfg: Config, plan: Plan, ds_config: dict[str, Any]) -> Suggestion:
    """The largest micro-batch whose memory estimate fits the GPU, with the accumulation that keeps the
    plan's global batch. The result is re-planned through plan_from_args/make_plan exactly as the printed
    command would plan it, so it is a feasible plan with the same global batch and LR."""
    if not args.gpu_memory_gb > 0:
        raise PlanError(f"--gpu_memory_gb must be positive, got {args.gpu_memory_gb:g}", rule="range")
    if not 0 <= args.memory_headroom < 1:
        raise PlanError(f"--memory_headroom must be in [0, 1), got {args.memory_headroom:g}", rule="range")
    preset = cfg.model.preset
    budget = int(args.gpu_memory_gb * GIB * (1 - args.memory_headroom))
    stage, precision = engine_settings(ds_config)
    g = plan.global_batch
    limit = largest_fitting_micro_batch(preset, stage, precision, plan.world_size, plan.segment_seconds, budget,
                                        ds_config)
    if limit == 0:
        raise _nothing_fits(args, preset, plan, ds_config, budget)
    best = max(d for d in _divisors(g // plan.world_size) if d <= limit)  # it must divide the samples per GPU
    spec = args.ds_config or DEFAULT_PRESET
    if preset_micro_batch(load_preset(spec)) not in (None, best):
        spec = _without_micro_batch(spec)
    new_args = copy.copy(args)
    new_args.ds_config, new_args.batch_size = spec, best
    new_args.accu_grad = new_args.effec_batch_size = new_args.gradient_accumulation_steps = None
    new_args.global_batch = g
    new_plan, new_ds = plan_from_args(new_args, cfg, None, None, dataset_size=args.dataset_size)
    if (new_plan.global_batch, new_plan.micro_batch, new_plan.peak_lr) != (g, best, plan.peak_lr):
        raise PlanError(f"--suggest: re-planning gave {new_plan.headline} at lr {new_plan.peak_lr:g}, not "
                        f"micro-batch {best} at global batch {g} and lr {plan.peak_lr:g} (a bug)", rule="suggest")
    bound, reason = _bound(preset, plan, ds_config, budget, limit, best)
    return Suggestion(args.gpu_memory_gb, args.memory_headroom, budget, limit, new_plan, spec, new_ds,
                      estimate_for(new_plan, new_ds, preset), bound, reason, _command(args, spec, best, g))


def print_suggestion(s: Suggestion, file: Any = None) -> None:
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from launcher.plan.card import memory_rows

    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="cyan", no_wrap=True)
    rows.add_column()
    rows.add_row("GPU memory", f"{s.gpu_memory_gb:g} GiB, {s.headroom:.0%} kept free → budget {fmt_bytes(s.budget_bytes)}")
    rows.add_row("bound by", f"{s.bound_by}: {s.reason}")
    rows.add_row("learning rate", s.plan.lr_derivation + " (unchanged)")
    rows.add_row("command", "below (the same --ds_config and batch flags work for launcher/train.py)")
    head = Text(f"suggested: {s.plan.headline}", style="bold")
    console = Console(file=file, highlight=False, soft_wrap=False)
    console.print(Panel(Group(head, Text(""), rows, Text(""), memory_rows(s.memory)),
                        title="largest micro-batch that fits", title_align="left", expand=False))
    console.print(s.command, soft_wrap=True)  # whole, to copy


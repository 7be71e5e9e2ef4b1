"""Resolution: the recipe, the DeepSpeed preset, the command line and a checkpoint's marker into one PlanRequest,
then the plan and the rendered DeepSpeed config.

Shared by the dry run (launcher/plan/cli.py) and training (launcher/training/launch.py): both call
`add_plan_arguments(parser)` and `plan_from_args(args, cfg, num_nodes, gpus_per_node, dataset_size)`, training
with the world it runs in and, when it resumes, the checkpoint's `checkpoint_hold`. Neither torch nor
deepspeed is imported.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.checkpoint.marker import CheckpointError, read_marker, resolve_resume
from launcher.config import (ACCUMULATION_KEYS, HOLDS, LR_RULES, WARMUP_AUTO, BatchSection, Config, ConfigError,
                             load_config_with_origins, parse_override)
from launcher.plan.compiled import check_compile
from launcher.plan.ds_config import DEFAULT_PRESET, load_preset, preset_micro_batch, render
from launcher.plan.rules import AccumSpec, Origins, Plan, PlanError, PlanRequest, ResumeHold, make_plan


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The world and batch/LR flags shared by the dry run and launcher/train.py.

    Each overrides the recipe. --ds_config is left to the caller (the dry run defaults it to
    ds_configs/base.json, training requires it).
    """
    g = parser.add_argument_group("batch and learning rate (see launcher/plan/rules.py)")
    g.add_argument("--num_nodes", type=int, metavar="N", help="nodes to plan for (default: the recipe's)")
    g.add_argument("--num_gpus", type=int, metavar="G", help="GPUs per node to plan for (default: the recipe's)")
    g.add_argument("--batch_size", type=int, metavar="B",
                   help="per-GPU micro-batch (default: the preset's, else the recipe's)")
    g.add_argument("--accu_grad", type=int, choices=(0, 1), help="the reference's accumulation switch")
    g.add_argument("--effec_batch_size", type=int, metavar="E",
                   help="samples per GPU per optimizer update (a multiple of B; implies --accu_grad 1)")
    g.add_argument("--gradient_accumulation_steps", type=int, metavar="K", help="micro-batches per GPU per update")
    g.add_argument("--global_batch", type=int, metavar="S", help="samples per update over all GPUs")
    g.add_argument("--lr_rule", choices=LR_RULES, help="how the LR follows the global batch (default: the recipe's)")
    g.add_argument("--hold", choices=HOLDS,
                   help="what to keep of the recipe's batch when the micro-batch or the world differs from the "
                        "recipe's: its accumulation (the global batch and LR follow) or its global batch "
                        "(default: the recipe's, else accumulation); a resumed run always keeps its checkpoint's")
    g.add_argument("--warmup_samples", type=_warmup_value, metavar="N|auto",
                   help="LR warmup in samples; 0 switches it off; auto (the default) ramps from base_lr whenever "
                        "the plan raises the LR above it")


def _warmup_value(text: str) -> int | str:
    if text == WARMUP_AUTO:
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or {WARMUP_AUTO!r}, got {text!r}")
    return value


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*(getattr(args, "set", None) or ()), *(getattr(args, "overrides", None) or ())]


@dataclass(frozen=True)
class _Layers:
    """Which layer set each recipe key: the recipe file (or one it extends), the command line, or the defaults."""

    args: argparse.Namespace
    recipe: Config  # the recipe alone, without the command line's overrides
    recipe_name: str
    recipe_origins: dict[tuple[str, str], str]
    origins: dict[tuple[str, str], str]  # with the overrides
    cli_keys: frozenset[tuple[str, str]]  # (section, key) set by a SECTION.KEY=VALUE override

    @classmethod
    def read(cls, args: argparse.Namespace) -> _Layers:
        path = getattr(args, "config", None)
        recipe, recipe_origins = load_config_with_origins(path)
        _, origins = load_config_with_origins(path, _overrides(args))
        cli_keys = frozenset(parse_override(text)[:2] for text in _overrides(args))
        return cls(args, recipe, f"recipe {path}" if path else "built-in defaults", recipe_origins, origins, cli_keys)

    def flag(self, name: str) -> Any:
        return getattr(self.args, name, None)

    def origin(self, section: str, key: str, flag: str | None = None) -> str:
        if flag is not None and self.flag(flag) is not None:
            return f"command line --{flag} {self.flag(flag)}"
        if (section, key) in self.cli_keys:
            return self.origins[(section, key)]
        if (section, key) in self.recipe_origins:
            return f"recipe {self.recipe_origins[(section, key)]}"
        return "built-in default"

    def cli_batch_value(self, batch: BatchSection, key: str) -> int | None:
        """A batch key as the command line gives it (its flag, else its override), None if it does not."""
        if self.flag(key) is not None:
            return self.flag(key)
        return getattr(batch, key) if ("batch", key) in self.cli_keys else None


def _world(layers: _Layers, batch: BatchSection) -> tuple[int, int, str]:
    """(nodes, GPUs per node, where they came from) when the caller has no world: the flags, else the recipe's."""
    nodes = layers.flag("num_nodes") if layers.flag("num_nodes") is not None else batch.recipe_num_nodes
    gpus = layers.flag("num_gpus") if layers.flag("num_gpus") is not None else batch.recipe_gpus_per_node
    flags = [f"--{f} {layers.flag(f)}" for f in ("num_nodes", "num_gpus") if layers.flag(f) is not None]
    recipe_world = ", ".join(dict.fromkeys(layers.origin("batch", key) for key, flag in
                                           (("recipe_num_nodes", "num_nodes"), ("recipe_gpus_per_node", "num_gpus"))
                                           if layers.flag(flag) is None))
    source = "; ".join(([f"command line {' '.join(flags)}"] if flags else [])
                       + ([f"{recipe_world} (the recipe's world)"] if recipe_world else []))
    return nodes, gpus, source


def _micro_batch(layers: _Layers, batch: BatchSection, spec: str, promised: int | None) -> tuple[int, str, int | None]:
    """(micro-batch, where it came from, the command line's micro-batch or None).

    --batch_size (or the override batch.batch_size), else the preset's train_micro_batch_size_per_gpu
    (bs12.json → 12), else the recipe's batch.batch_size. A preset's micro-batch that the command line
    contradicts is an error; the recipe's is replaced.
    """
    cli_batch, cli_name = layers.flag("batch_size"), "--batch_size"
    if cli_batch is None and ("batch", "batch_size") in layers.cli_keys:
        cli_batch, cli_name = batch.batch_size, "the override batch.batch_size"
    if cli_batch is not None and promised is not None and cli_batch != promised:
        raise PlanError(
            f"{spec} promises train_micro_batch_size_per_gpu {promised} but {cli_name} says {cli_batch}.\n"
            f"Rule: one source of truth per number: a preset that names a micro-batch fixes it.\n"
            f"Valid choices: drop {cli_name}, or use a preset without a micro-batch "
            f"(ds_configs/base.json) with {cli_name} {cli_batch}.",
            rule="preset agrees with the plan",
        )
    recipe_batch = layers.recipe.batch.batch_size
    if cli_batch is not None:
        return cli_batch, layers.origin("batch", "batch_size", "batch_size"), cli_batch
    if promised is not None:
        replaces = f" (replaces batch_size {recipe_batch} of {layers.recipe_name})" if recipe_batch != promised else ""
        return promised, f"preset {spec}{replaces}", None
    return batch.batch_size, layers.origin("batch", "batch_size"), None


def _request(layers: _Layers, cfg: Config, micro: int, micro_source: str, world: tuple[int, int, str],
             dataset_size: int | None, resume: ResumeHold | None) -> PlanRequest:
    b, r, args = cfg.batch, layers.recipe.batch, layers.args
    if layers.flag("warmup_samples") is not None:
        warmup, warmup_cli = args.warmup_samples, True
    else:
        warmup, warmup_cli = cfg.optim.warmup_samples, ("optim", "warmup_samples") in layers.cli_keys
    num_nodes, gpus_per_node, world_source = world
    return PlanRequest(
        batch_size=micro,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        recipe_accum=AccumSpec(r.accu_grad, r.effec_batch_size, r.gradient_accumulation_steps, r.global_batch),
        cli_accum=AccumSpec(*(layers.cli_batch_value(b, key) for key in ACCUMULATION_KEYS)),
        recipe_batch_size=r.batch_size,
        recipe_num_nodes=b.recipe_num_nodes,
        recipe_gpus_per_node=b.recipe_gpus_per_node,
        hold=layers.flag("hold") or b.hold,
        base_lr=cfg.optim.base_lr,
        reference_batch=cfg.optim.reference_batch,
        lr_rule=layers.flag("lr_rule") or cfg.optim.lr_rule,
        warmup_samples=warmup,
        warmup_from_command_line=warmup_cli,
        adam_beta2=cfg.optim.betas[1],
        segment_seconds=cfg.data.segment_seconds,
        dataset_size=dataset_size,
        resume=resume,
        recipe_name=layers.recipe_name,
        origins=Origins(batch_size=micro_source, world=world_source, hold=layers.origin("batch", "hold", "hold"),
                        lr=layers.origin("optim", "base_lr"),
                        warmup=layers.origin("optim", "warmup_samples", "warmup_samples")),
    )


def plan_from_args(args: argparse.Namespace, cfg: Config, num_nodes: int | None, gpus_per_node: int | None,
                   dataset_size: int | None = None, *, world_source: str = "the launcher",
                   resume: ResumeHold | None = None) -> tuple[Plan, dict[str, Any]]:
    """The plan and the rendered DeepSpeed config for the parsed flags, the recipe and a world.

    num_nodes/gpus_per_node None: --num_nodes/--num_gpus if given, else the recipe's world; else
    `world_source` says where the caller's world came from. `resume`: the checkpoint this run continues.

    Explicit values are the command line's (flags and SECTION.KEY=VALUE overrides); the recipe, the
    preset and the world are inherited (see launcher/plan/rules.py): the recipe's accumulation is read at
    its own batch_size (effec_batch_size 8 at batch_size 4: 2 micro-batches, kept at 12).
    """
    layers = _Layers.read(args)
    world = ((num_nodes, gpus_per_node, world_source) if num_nodes is not None or gpus_per_node is not None
             else _world(layers, cfg.batch))
    spec = layers.flag("ds_config") or DEFAULT_PRESET
    preset = load_preset(spec)
    check_compile(cfg.train.compile, preset, spec, layers.origin("train", "compile"))
    promised = preset_micro_batch(preset)
    micro, micro_source, cli_batch = _micro_batch(layers, cfg.batch, spec, promised)
    try:
        plan = make_plan(_request(layers, cfg, micro, micro_source, world, dataset_size, resume))
    except PlanError as e:
        if promised is None or cli_batch is not None or "batch_size" not in e.suggestions:
            raise
        raise PlanError(
            f"{e}\n  (batch_size {promised} comes from {spec}; for another batch_size pick a preset without "
            f"a micro-batch, e.g. ds_configs/base.json, and pass --batch_size)",
            rule=e.rule, suggestions=e.suggestions,
        ) from None
    optim = {"betas": tuple(cfg.optim.betas), "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}
    return plan, render(preset, plan, optim=optim, source=spec)


def resume_hold(marker: dict[str, Any], where: str) -> ResumeHold:
    """What a checkpoint's COMPLETE.json marker (launcher/checkpoint/marker.py) fixes for the run that resumes it."""
    plan = marker.get("plan") if isinstance(marker, dict) else None
    if not isinstance(plan, dict):
        raise PlanError(f"{where}: its marker has no plan; cannot tell its global batch and LR", rule="resume marker")
    try:
        peak, base = plan["peak_lr"], plan["base_lr"]
        hold = ResumeHold(
            source=where,
            global_batch=marker["global_batch"],
            peak_lr=peak,
            base_lr=base,
            reference_batch=plan["reference_batch"],
            lr_rule=plan["lr_rule"],
            lr_derivation=plan.get("lr_derivation", ""),
            warmup_samples=plan.get("warmup_samples", 0),
            # Markers written before warmups started from base_lr ramped from 0.
            warmup_from_lr=plan.get("warmup_from_lr", 0.0),
        )
    except KeyError as e:
        raise PlanError(f"{where}: its marker lacks {e.args[0]!r}; cannot tell its global batch and LR",
                        rule="resume marker") from None
    if hold.global_batch != plan.get("global_batch", hold.global_batch):
        raise PlanError(f"{where}: its marker says global_batch {hold.global_batch} but its plan says "
                        f"{plan['global_batch']}", rule="resume marker")
    return hold


def checkpoint_hold(resume: str | None, ckpt_dir: Path) -> ResumeHold | None:
    """The global batch, LR and warmup of the checkpoint `--resume` continues, read from its marker; None if none.

    Cheap (only the marker is read), so it runs before any process group; a bad --resume is a ConfigError.
    """
    if not resume:
        return None
    try:
        target = resolve_resume(resume, ckpt_dir)
        if target is None:
            return None
        marker = read_marker(*target)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume {resume}: cannot read the checkpoint's marker: {e}") from None
    return resume_hold(marker, f"checkpoint {target[0] / target[1]}")

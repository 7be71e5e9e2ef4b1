"""The dry run: resolve recipe + DeepSpeed preset + command line into a plan, print it, start nothing.

    python -m launcher.plan --ds_config ds_configs/bs12.json --config recipes/train_48k.yaml \\
        --num_nodes 1 --num_gpus 4 --effec_batch_size 24 [--json]
    python -m launcher.plan --ds_config ds_configs/bs4.json --config recipes/train_48k.yaml \\
        --suggest --gpu_memory_gb 80   # the largest micro-batch that fits, same global batch and LR

The batch flags are shared with the training entry point: it calls `add_plan_arguments(parser)`
and `plan_from_args(args, cfg, num_nodes, gpus_per_node, dataset_size)` with the world it runs in.
Neither torch nor deepspeed is imported, so this answers in a fraction of a second.
Bad input: exit status 2, the message on stderr, nothing on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from launcher.config import (ACCUMULATION_KEYS, Config, ConfigError, load_config, load_config_with_origins,
                             parse_override)
from launcher.ds_config import DEFAULT_PRESET, load_preset, preset_files, preset_micro_batch, render
from launcher.memory import (GIB, MemoryEstimateError, MemoryEstimate, engine_settings, estimate, estimate_for,
                             fmt_bytes, largest_fitting_micro_batch)
from launcher.plan import (HOLDS, LR_RULES, WARMUP_AUTO, AccumSpec, Origins, Plan, PlanError, PlanRequest, ResumeHold,
                           make_plan)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The world and batch/LR flags shared by the dry run and launcher/train.py.

    Each overrides the recipe. --ds_config is left to the caller (the dry run defaults it to
    ds_configs/base.json, training requires it).
    """
    g = parser.add_argument_group("batch and learning rate (see launcher/plan.py)")
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


def _cli_set_keys(args: argparse.Namespace) -> set[tuple[str, str]]:
    keys = set()
    for text in _overrides(args):
        section, key, _ = parse_override(text)
        keys.add((section, key))
    return keys


def plan_from_args(args: argparse.Namespace, cfg: Config, num_nodes: int | None, gpus_per_node: int | None,
                   dataset_size: int | None = None, *, world_source: str = "the launcher",
                   resume: ResumeHold | None = None) -> tuple[Plan, dict[str, Any]]:
    """The plan and the rendered DeepSpeed config for the parsed flags, the recipe and a world.

    num_nodes/gpus_per_node None: --num_nodes/--num_gpus if given, else the recipe's world; else
    `world_source` says where the caller's world came from. `resume`: the checkpoint this run continues.

    Explicit values are the command line's (flags and SECTION.KEY=VALUE overrides); the recipe, the
    preset and the world are inherited (see launcher/plan.py). The micro-batch comes from --batch_size
    (or the override batch.batch_size), else from the preset's train_micro_batch_size_per_gpu
    (bs12.json → 12), else from the recipe's batch.batch_size. A preset's micro-batch that the command
    line contradicts is an error; the recipe's is replaced, and its accumulation read at its own
    batch_size (effec_batch_size 8 at batch_size 4: 2 micro-batches, kept at 12).
    """
    recipe_path = getattr(args, "config", None)
    recipe_name = f"recipe {recipe_path}" if recipe_path else "built-in defaults"
    recipe_cfg, recipe_origins = load_config_with_origins(recipe_path)
    _, origins = load_config_with_origins(recipe_path, _overrides(args))
    cli_keys = _cli_set_keys(args)

    def origin(section: str, key: str, flag: str | None = None) -> str:
        if flag is not None and getattr(args, flag, None) is not None:
            return f"command line --{flag} {getattr(args, flag)}"
        if (section, key) in cli_keys:
            return origins[(section, key)]
        if (section, key) in recipe_origins:
            return f"recipe {recipe_origins[(section, key)]}"
        return "built-in default"

    b = cfg.batch
    if num_nodes is None and gpus_per_node is None:
        num_nodes = args.num_nodes if getattr(args, "num_nodes", None) is not None else b.recipe_num_nodes
        gpus_per_node = args.num_gpus if getattr(args, "num_gpus", None) is not None else b.recipe_gpus_per_node
        flags = [f"--{f} {getattr(args, f)}" for f in ("num_nodes", "num_gpus") if getattr(args, f, None) is not None]
        recipe_world = ", ".join(dict.fromkeys(origin("batch", key) for key, flag in
                                               (("recipe_num_nodes", "num_nodes"), ("recipe_gpus_per_node", "num_gpus"))
                                               if getattr(args, flag, None) is None))
        world_source = "; ".join(([f"command line {' '.join(flags)}"] if flags else [])
                                 + ([f"{recipe_world} (the recipe's world)"] if recipe_world else []))
    spec = getattr(args, "ds_config", None) or DEFAULT_PRESET
    preset = load_preset(spec)
    promised = preset_micro_batch(preset)
    cli_batch, cli_name = args.batch_size, "--batch_size"
    if cli_batch is None and ("batch", "batch_size") in cli_keys:
        cli_batch, cli_name = b.batch_size, "the override batch.batch_size"
    if cli_batch is not None and promised is not None and cli_batch != promised:
        raise PlanError(
            f"{spec} promises train_micro_batch_size_per_gpu {promised} but {cli_name} says {cli_batch}.\n"
            f"Rule: one source of truth per number: a preset that names a micro-batch fixes it.\n"
            f"Valid choices: drop {cli_name}, or use a preset without a micro-batch "
            f"(ds_configs/base.json) with {cli_name} {cli_batch}.",
            rule="preset agrees with the plan",
        )
    recipe_batch = recipe_cfg.batch.batch_size
    if cli_batch is not None:
        micro, micro_source = cli_batch, origin("batch", "batch_size", "batch_size")
    elif promised is not None:
        micro = promised
        micro_source = f"preset {spec}" + (
            f" (replaces batch_size {recipe_batch} of {recipe_name})" if recipe_batch != promised else "")
    else:
        micro, micro_source = b.batch_size, origin("batch", "batch_size")

    def cli_value(key: str) -> int | None:
        flag = getattr(args, key, None)
        if flag is not None:
            return flag
        return getattr(b, key) if ("batch", key) in cli_keys else None

    if getattr(args, "warmup_samples", None) is not None:
        warmup, warmup_cli = args.warmup_samples, True
    else:
        warmup, warmup_cli = cfg.optim.warmup_samples, ("optim", "warmup_samples") in cli_keys
    r = recipe_cfg.batch
    req = PlanRequest(
        batch_size=micro,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        recipe_accum=AccumSpec(r.accu_grad, r.effec_batch_size, r.gradient_accumulation_steps, r.global_batch),
        cli_accum=AccumSpec(*(cli_value(key) for key in ACCUMULATION_KEYS)),
        recipe_batch_size=recipe_batch,
        recipe_num_nodes=b.recipe_num_nodes,
        recipe_gpus_per_node=b.recipe_gpus_per_node,
        hold=args.hold or b.hold,
        base_lr=cfg.optim.base_lr,
        reference_batch=cfg.optim.reference_batch,
        lr_rule=args.lr_rule or cfg.optim.lr_rule,
        warmup_samples=warmup,
        warmup_from_command_line=warmup_cli,
        adam_beta2=cfg.optim.betas[1],
        segment_seconds=cfg.data.segment_seconds,
        dataset_size=dataset_size,
        resume=resume,
        recipe_name=recipe_name,
        origins=Origins(batch_size=micro_source, world=world_source, hold=origin("batch", "hold", "hold"),
                        lr=origin("optim", "base_lr"), warmup=origin("optim", "warmup_samples", "warmup_samples")),
    )
    try:
        plan = make_plan(req)
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
    """What a checkpoint's COMPLETE.json marker (launcher/checkpoint.py) fixes for the run that resumes it."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.plan",
        description="Dry run: print the batch/LR plan and the rendered DeepSpeed config; start nothing.",
    )
    parser.add_argument("--config", metavar="YAML", help="the recipe (default: built-in reference defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe key (repeatable)")
    parser.add_argument("--ds_config", default=DEFAULT_PRESET, metavar="FILE[+FILE...]",
                        help="DeepSpeed preset(s), merged left to right, e.g. "
                             "ds_configs/bs12.json+ds_configs/zero3.json (default: %(default)s)")
    add_plan_arguments(parser)
    parser.add_argument("--dataset_size", type=int, metavar="N",
                        help="training examples per epoch, to show optimizer steps per epoch")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    m = parser.add_argument_group("memory (see launcher/memory.py)")
    m.add_argument("--suggest", action="store_true",
                   help="propose the largest micro-batch that fits --gpu_memory_gb, with the accumulation that "
                        "keeps this plan's global batch (and so its LR)")
    m.add_argument("--gpu_memory_gb", type=float, metavar="GB",
                   help="memory of one GPU in GiB as nvidia-smi shows it / 1024 (H100 80GB: 80, H200: 141)")
    m.add_argument("--memory_headroom", type=float, default=0.10, metavar="F",
                   help="fraction of the GPU kept free for the CUDA context, allocator fragmentation and backward "
                        "transients, which the estimate does not count (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suggest and args.gpu_memory_gb is None:
        parser.error("--suggest needs --gpu_memory_gb")
    try:
        cfg = load_config(args.config, args.set)
        plan, ds_config = plan_from_args(args, cfg, None, None, dataset_size=args.dataset_size)
        suggestion = suggest(args, cfg, plan, ds_config) if args.suggest else None
    except (PlanError, ConfigError, MemoryEstimateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {**plan.to_dict(), "ds_config_spec": args.ds_config, "recipe": args.config, "ds_config": ds_config}
        if suggestion is not None:
            out["suggestion"] = suggestion.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print_plan(plan, ds_config, ds_spec=args.ds_config, recipe=args.config, model_preset=cfg.model.preset)
        if suggestion is not None:
            print_suggestion(suggestion)
    return 0


def print_plan(plan: Plan, ds_config: dict[str, Any] | None = None, *, ds_spec: str | None = None,
               recipe: str | None = None, file: Any = None, model_preset: str | None = None) -> None:
    """The rich plan card on stdout (or `file`); with `model_preset`, its per-GPU memory estimate too."""
    from launcher.plan_card import print_card

    memory = None
    if model_preset is not None and ds_config is not None:
        try:
            memory = estimate_for(plan, ds_config, model_preset)
        except MemoryEstimateError:
            memory = None  # a preset without a parameter count: the card shows the plan alone
    print_card(plan, ds_spec, ds_config, recipe=recipe, file=file, memory=memory)


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
    w, g = plan.world_size, plan.global_batch
    per_gpu = g // w  # samples per GPU per update: micro-batch × accumulation
    limit = largest_fitting_micro_batch(preset, stage, precision, w, plan.segment_seconds, budget, ds_config)
    if limit == 0:
        one = estimate(preset, stage, precision, w, 1, plan.segment_seconds, ds_config)
        fits = []
        for st in (0, 1, 2, 3):
            for pr in ("fp32", "bf16"):
                e = estimate(preset, st, pr, w, 1, plan.segment_seconds, ds_config)
                if e.total <= budget:
                    fits.append(f"ZeRO {st} {pr} ({fmt_bytes(e.total)})")
        raise PlanError(
            f"--suggest: not even micro-batch 1 fits {args.gpu_memory_gb:g} GiB ({fmt_bytes(budget)} after "
            f"{args.memory_headroom:.0%} headroom) at ZeRO {stage}, {precision}, {w} GPUs, "
            f"{plan.segment_seconds:g} s crops: it needs {fmt_bytes(one.total)}.\n"
            f"Rule: model states + reduce buckets + activations of one micro-batch must fit one GPU.\n"
            + (f"Valid choices at micro-batch 1: {'; '.join(fits)}" if fits else
               "Valid choices: shorter crops (data.segment_seconds), more GPUs, or a smaller model"),
            rule="fits GPU memory")
    best = max(d for d in _divisors(per_gpu) if d <= limit)
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
    mem = estimate_for(new_plan, new_ds, preset)
    if best == per_gpu:
        bound = "global batch"
        room = (f"memory would allow micro-batch {limit}, but a larger one changes the global batch (and the LR): "
                f"pass --global_batch for that" if limit > per_gpu else "memory allows no more either")
        reason = f"accumulation is already 1: {g} samples per update / {w} GPUs = {per_gpu} per GPU; {room}"
    elif best == limit:
        nxt = estimate(preset, stage, precision, w, limit + 1, plan.segment_seconds, ds_config)
        bound = "memory"
        reason = f"micro-batch {limit + 1} would need {fmt_bytes(nxt.total)} > {fmt_bytes(budget)}"
    else:
        up = min(d for d in _divisors(per_gpu) if d > best)
        nxt = estimate(preset, stage, precision, w, up, plan.segment_seconds, ds_config)
        bound = "divisibility"
        reason = (f"memory allows micro-batch {limit}, but it must divide the {per_gpu} samples per GPU per "
                  f"update ({g} / {w} GPUs); the next divisor, {up}, would need {fmt_bytes(nxt.total)} > "
                  f"{fmt_bytes(budget)}")
    flags = [f"--ds_config {spec}"] + ([f"--config {args.config}"] if args.config else [])
    flags += [f"--set {x}" for x in args.set] if getattr(args, "set", None) else []
    if args.num_nodes is not None:
        flags.append(f"--num_nodes {args.num_nodes}")
    if args.num_gpus is not None:
        flags.append(f"--num_gpus {args.num_gpus}")
    flags += [f"--batch_size {best}", f"--global_batch {g}"]
    if args.lr_rule:
        flags.append(f"--lr_rule {args.lr_rule}")
    return Suggestion(args.gpu_memory_gb, args.memory_headroom, budget, limit, new_plan, spec, new_ds, mem, bound,
                      reason, "python -m launcher.plan " + " ".join(flags))


def print_suggestion(s: Suggestion, file: Any = None) -> None:
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from launcher.plan_card import memory_rows

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


if __name__ == "__main__":
    sys.exit(main())

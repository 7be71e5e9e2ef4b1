"""The dry run: resolve recipe + DeepSpeed preset + command line into a plan, print it, start nothing.

    python -m launcher.plan --ds_config ds_configs/bs12.json --config recipes/train_48k.yaml \\
        --num_nodes 1 --num_gpus 4 --effec_batch_size 24 [--json]

The batch flags are shared with the training entry point: it calls `add_plan_arguments(parser)`
and `plan_from_args(args, cfg, num_nodes, gpus_per_node, dataset_size)` with the world it runs in.
Neither torch nor deepspeed is imported, so this answers in a fraction of a second.
Bad input: exit status 2, the message on stderr, nothing on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from launcher.config import Config, ConfigError, load_config, parse_override
from launcher.ds_config import DEFAULT_PRESET, load_preset, preset_micro_batch, render
from launcher.plan import HOLDS, LR_RULES, AccumSpec, Plan, PlanError, PlanRequest, make_plan


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
                   help="what to keep when the world differs from the recipe's (default: the recipe's)")


def _cli_set_keys(args: argparse.Namespace) -> set[tuple[str, str]]:
    keys = set()
    for text in [*(getattr(args, "set", None) or ()), *(getattr(args, "overrides", None) or ())]:
        section, key, _ = parse_override(text)
        keys.add((section, key))
    return keys


def plan_from_args(args: argparse.Namespace, cfg: Config, num_nodes: int | None, gpus_per_node: int | None,
                   dataset_size: int | None = None) -> tuple[Plan, dict[str, Any]]:
    """The plan and the rendered DeepSpeed config for the parsed flags, the recipe and a world.

    num_nodes/gpus_per_node None: --num_nodes/--num_gpus if given, else the recipe's world.

    The micro-batch comes from --batch_size (or --set batch.batch_size), else from the preset's
    train_micro_batch_size_per_gpu (bs12.json → 12), else from the recipe's batch.batch_size.
    A preset's micro-batch that the command line contradicts is an error; the recipe's is replaced
    (the preset was chosen for this launch), and the plan's notes say so.
    """
    if num_nodes is None:
        num_nodes = args.num_nodes if getattr(args, "num_nodes", None) is not None else cfg.batch.recipe_num_nodes
    if gpus_per_node is None:
        gpus_per_node = (args.num_gpus if getattr(args, "num_gpus", None) is not None
                         else cfg.batch.recipe_gpus_per_node)
    spec = getattr(args, "ds_config", None) or DEFAULT_PRESET
    preset = load_preset(spec)
    promised = preset_micro_batch(preset)
    b = cfg.batch
    cli_batch, cli_name = args.batch_size, "--batch_size"
    if cli_batch is None and ("batch", "batch_size") in _cli_set_keys(args):
        cli_batch, cli_name = b.batch_size, "the override batch.batch_size"
    if cli_batch is not None and promised is not None and cli_batch != promised:
        raise PlanError(
            f"{spec} promises train_micro_batch_size_per_gpu {promised} but {cli_name} says {cli_batch}.\n"
            f"Rule: one source of truth per number: a preset that names a micro-batch fixes it.\n"
            f"Valid choices: drop {cli_name}, or use a preset without a micro-batch "
            f"(ds_configs/base.json) with {cli_name} {cli_batch}.",
            rule="preset agrees with the plan",
        )
    if cli_batch is not None:
        micro, note = cli_batch, f"micro-batch {cli_batch} from {cli_name}"
    elif promised is not None:
        micro = promised
        note = f"micro-batch {promised} from {spec}" + (
            f" (replaces the recipe's batch_size {b.batch_size})" if b.batch_size != promised else "")
    else:
        micro, note = b.batch_size, f"micro-batch {b.batch_size} from the recipe's batch.batch_size"

    req = PlanRequest(
        batch_size=micro,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        recipe_accum=AccumSpec(b.accu_grad, b.effec_batch_size, b.gradient_accumulation_steps, b.global_batch),
        cli_accum=AccumSpec(args.accu_grad, args.effec_batch_size, args.gradient_accumulation_steps,
                            args.global_batch),
        recipe_num_nodes=b.recipe_num_nodes,
        recipe_gpus_per_node=b.recipe_gpus_per_node,
        hold=args.hold or b.hold,
        base_lr=cfg.optim.base_lr,
        reference_batch=cfg.optim.reference_batch,
        lr_rule=args.lr_rule or cfg.optim.lr_rule,
        warmup_samples=cfg.optim.warmup_samples,
        segment_seconds=cfg.data.segment_seconds,
        dataset_size=dataset_size,
        notes=(note,),
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        plan, ds_config = plan_from_args(args, cfg, None, None, dataset_size=args.dataset_size)
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {**plan.to_dict(), "ds_config_spec": args.ds_config, "recipe": args.config, "ds_config": ds_config}
        print(json.dumps(out, indent=2))
    else:
        print_plan(plan, ds_config, ds_spec=args.ds_config, recipe=args.config)
    return 0


def print_plan(plan: Plan, ds_config: dict[str, Any] | None = None, *, ds_spec: str | None = None,
               recipe: str | None = None, file: Any = None) -> None:
    """The rich plan card on stdout (or `file`)."""
    from launcher.plan_card import print_card

    print_card(plan, ds_spec, ds_config, recipe=recipe, file=file)


if __name__ == "__main__":
    sys.exit(main())

"""The dry run: resolve recipe + DeepSpeed preset + command line into a plan, print it, start nothing.

    python -m launcher.plan --ds_config ds_configs/bs12.json --config recipes/train_48k.yaml \\
        --num_nodes 1 --num_gpus 4 --effec_batch_size 24 [--json]
    python -m launcher.plan --ds_config ds_configs/bs4.json --config recipes/train_48k.yaml \\
        --suggest --gpu_memory_gb 80   # the largest micro-batch that fits, same global batch and LR

Neither torch nor deepspeed is imported, so this answers in a fraction of a second.
Bad input: exit status 2, the message on stderr, nothing on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from launcher.config import Config, ConfigError, load_config
from launcher.plan.card import print_plan
from launcher.plan.ds_config import DEFAULT_PRESET
from launcher.plan.memory import MemoryEstimateError
from launcher.plan.request import add_plan_arguments, plan_from_args
from launcher.plan.rules import PlanError
from launcher.plan.suggest import print_suggestion, suggest


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
    m = parser.add_argument_group("memory (see launcher/plan/memory.py)")
    m.add_argument("--suggest", action="store_true",
                   help="propose the largest micro-batch that fits --gpu_memory_gb, with the accumulation that "
                        "keeps this plan's global batch (and so its LR)")
    m.add_argument("--gpu_memory_gb", type=float, metavar="GB",
                   help="memory of one GPU in GiB as nvidia-smi shows it / 1024 (H100 80GB: 80, H200: 141)")
    m.add_argument("--memory_headroom", type=float, default=0.10, metavar="F",
                   help="fraction of the GPU kept free for the CUDA context, allocator fragmentation and backward "
                        "transients, which the estimate does not count (default: %(default)s)")
    return parser


def mixing_rows(cfg: Config) -> list[tuple[str, str]]:
    """The card's "trained on" row for a mixing recipe, from its settings alone: the planner reads no list
    (launcher/train.py --dry_run does, and shows the hours, the mixtures per epoch and the steps per epoch)."""
    m = cfg.mixing
    if not m.enabled:
        return []
    clean, noise = len(m.clean_lists) + len(m.clean_pair_lists), len(m.noise_lists)
    rir = (f"RIR on {m.rir_probability:.0%} of mixtures ({m.target} target)" if m.rir_lists and m.rir_probability
           else "no RIR")
    premixed = f", {m.premixed_share:.0%} pre-mixed pairs of {cfg.data.train_list}" if m.premixed_share else ""
    return [("trained on", f"dynamic: {clean} clean × {noise} noise list(s), SNR {m.snr_db[0]:g} to {m.snr_db[1]:g} "
                           f"dB, {rir}{premixed}; launcher/train.py --dry_run reads the lists")]


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
        out = {**plan.to_dict(), "ds_config_spec": args.ds_config, "recipe": args.config, "ds_config": ds_config,
               "compile": cfg.train.compile}
        if suggestion is not None:
            out["suggestion"] = suggestion.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print_plan(plan, ds_config, ds_spec=args.ds_config, recipe=args.config, model_preset=cfg.model.preset,
                   data_rows=mixing_rows(cfg), compile_regions=cfg.train.compile)
        if suggestion is not None:
            print_suggestion(suggestion)
    return 0

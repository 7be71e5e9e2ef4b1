"""From a command line to a training run: resolve config → plan → (a dry run stops here) → the checks that need no
process group → train. Every input a user can get wrong is refused before any process group starts, by every rank
alike (rank 0 says why, exit 2); a run that fails later exits 1, a preempted one 75.

Only torch-free modules are imported at the top: `launcher/train.py --dry_run` (what slurm/train_48k.sbatch runs
to plan an allocation) answers without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.checkpoint.marker import AllRanksStop, CheckpointError
from launcher.checkpoint.weights import prepare_init
from launcher.config import Config, ConfigError, load_config, replace_section
from launcher.dist.env import DistEnv, EnvError, read_dist_env, refuse, world_source
from launcher.dist.group import rendezvous_env
from launcher.dist.preflight import PreflightError, check_world
from launcher.plan.card import print_plan
from launcher.plan.request import checkpoint_hold, plan_from_args
from launcher.plan.rules import Plan, PlanError
from launcher.training.errors import TrainingAborted
from launcher.training.trained_on import TrainedOn, check_resume, mixing_list_paths, read_trained_on


def resolve(args: argparse.Namespace, env: DistEnv) -> tuple[Config, Plan, dict, TrainedOn]:
    """Config, plan and what is trained on, for this world; raises ConfigError/PlanError/DataError/PreflightError/
    EnvError.

    With --resume and a checkpoint to continue, the plan holds that checkpoint's global batch and LR, and a
    mixing recipe must mix what the checkpoint mixed (or say mixing.allow_changed_lists).
    """
    cfg = load_config(args.config, list(args.overrides))
    if args.run_dir:
        cfg = replace_section(cfg, "train", run_dir=args.run_dir)
    # The lists' format only (no audio file is opened): the dry run stays fast on millions of lines.
    trained = read_trained_on(cfg)
    if env.source == "single" and args.dry_run:
        num_nodes, gpus = None, None  # the dry run's own --num_nodes/--num_gpus, or the recipe's world
    else:
        check_world(env, os.environ, args.num_nodes, args.num_gpus)
        num_nodes, gpus = env.num_nodes, env.local_world_size
    plan, ds_config = plan_from_args(args, cfg, num_nodes, gpus, dataset_size=trained.dataset_size,
                                     world_source=world_source(env),
                                     resume=checkpoint_hold(args.resume, Path(cfg.train.run_dir) / "checkpoints"))
    check_resume(cfg, trained, args.resume)  # after the plan's own reading of the checkpoint's marker
    return cfg, plan, ds_config, trained


def check_before_launch(cfg: Config, ds_config: dict, plan: Plan, ds_spec: str, recipe: str | None) -> None:
    """What a launch needs besides a plan, refused before any process group: the data lists, and DeepSpeed's own
    verdict on the rendered config at this world size. Raises ConfigError or PlanError."""
    from launcher.training.engine import validate_with_deepspeed

    d = cfg.data
    if not d.train_list and not cfg.mixing.enabled:
        where = f"recipe {recipe} sets none" if recipe else "the built-in defaults have none"
        raise ConfigError(
            f"data.train_list is not set ({where}): give a recipe (e.g. --config recipes/train_48k.yaml) or "
            "data.train_list=PATH, a list file of `noisy clean [seconds]` lines (python -m data.demo "
            "runs/demo_corpus writes a demo corpus), or mix pairs on the fly (mixing.clean_lists, see the README)")
    for key in ("train_list", "valid_list"):
        path = getattr(d, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"data.{key} {path}: no such file (a list file of `noisy clean [seconds]` lines)")
    missing = [f"{key} {path}" for key, path in mixing_list_paths(cfg.mixing) if not Path(path).is_file()]
    if missing:
        raise ConfigError(f"no such list file: {'; '.join(missing)}")
    validate_with_deepspeed(ds_config, plan.world_size, ds_spec)


def launch(args: argparse.Namespace) -> int:
    """The exit code of a training (or dry run) for the parsed command line."""
    from data import DataError

    try:
        env = read_dist_env(local_rank_arg=args.local_rank)
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfg, plan, ds_config, trained = resolve(args, env)
    except (ConfigError, PlanError, DataError, PreflightError, EnvError) as e:
        return refuse(env.rank, e)
    if env.rank == 0:
        print_plan(plan, ds_config, ds_spec=args.ds_config, recipe=args.config, model_preset=cfg.model.preset,
                   data_rows=trained.rows, compile_regions=cfg.train.compile)
    if args.dry_run:
        return 0
    try:
        check_before_launch(cfg, ds_config, plan, args.ds_config, args.config)
        env = rendezvous_env(env)
        init = prepare_init(cfg, args.resume)  # every rank, before the process group: a bad file stops all here
    except (ConfigError, PlanError, EnvError) as e:
        return refuse(env.rank, e)
    return train(cfg, plan, ds_config, env, args.resume, init)


def train(cfg: Config, plan: Plan, ds_config: dict, env: DistEnv, resume: str | None, init) -> int:
    """Build and run the trainer (launcher/training/setup.py); a failure after the start exits 1 on its rank."""
    from data import DataError
    from launcher.training.setup import RunSpec, build_trainer  # torch and DeepSpeed: only for a real run

    try:
        return build_trainer(RunSpec(cfg, plan, ds_config, env, resume, init)).train()
    except AllRanksStop as e:
        refuse(env.rank, e)  # a shared verdict (a refused --resume, a full disk): rank 0 says why, once
        return e.exit_code
    except (PreflightError, TrainingAborted, ConfigError, DataError, CheckpointError) as e:
        print(f"error (rank {env.rank}): {e}", file=sys.stderr, flush=True)
        return 1

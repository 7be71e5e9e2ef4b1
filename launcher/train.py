"""Train MossFormer2 48 kHz with DeepSpeed.

    deepspeed --num_gpus 2 launcher/train.py --ds_config ds_configs/bs12.json --config recipes/train_48k.yaml

Also under torchrun or srun (one task per rank). The order reads like the recipe:
resolve config → plan → (dry run stops here) → process group + preflight → data → model → engine
→ resume → loop. Everything a user can get wrong is refused before the process group starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `deepspeed launcher/train.py` puts launcher/ itself first on sys.path; the packages live one up.
_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402

from launcher.config import Config, ConfigError, dump_yaml, load_config, replace_section  # noqa: E402
from launcher.device_settings import apply_device_settings  # noqa: E402
from launcher.dist_env import DistEnv, EnvError, read_dist_env, refuse, release_shm_segment_name  # noqa: E402
from launcher.dry_run import add_plan_arguments, plan_from_args, print_plan, resume_hold  # noqa: E402
from launcher.plan import Plan, PlanError, ResumeHold  # noqa: E402
from launcher.preflight import PreflightError, check_head_reachable, check_run_dir, check_world  # noqa: E402

RENDEZVOUS_TIMEOUT_S = float(os.environ.get("MF2_RENDEZVOUS_TIMEOUT_S", "300"))
# Collectives may legitimately wait long (rank 0 validating a large corpus while the others wait).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("MF2_COLLECTIVE_TIMEOUT_S", "1800"))


class TrainingAborted(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed preset(s), e.g. ds_configs/bs12.json[+ds_configs/zero3.json]")
    p.add_argument("--config", default=None, help="YAML recipe (defaults < recipe < overrides)")
    p.add_argument("--dry_run", action="store_true", help="print the plan and exit before any process group starts")
    p.add_argument("--resume", default=None, help="auto (newest complete checkpoint of the run, if any) or a path")
    p.add_argument("--run_dir", default=None, help="shortcut for train.run_dir=…")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    add_plan_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="override any recipe key")
    return p.parse_intermixed_args(argv)  # overrides may come before and after options


def resolve(args: argparse.Namespace, env: DistEnv) -> tuple[Config, Plan, dict, int | None]:
    """Config and plan for this world; raises ConfigError/PlanError/DataError/PreflightError.

    With --resume and a checkpoint to continue, the plan holds that checkpoint's global batch and LR.
    """
    from data import PairIndex

    overrides = list(getattr(args, "set", None) or []) + list(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.run_dir:
        cfg = replace_section(cfg, "train", run_dir=args.run_dir)
    dataset_size = None
    if cfg.data.train_list and Path(cfg.data.train_list).is_file():
        # Format only (no file is opened): the dry run stays fast on millions of lines.
        dataset_size = len(PairIndex.from_lists([cfg.data.train_list], strict=not cfg.data.skip_bad))
    if env.source == "single" and args.dry_run:
        num_nodes, gpus = None, None  # the dry run's own --num_nodes/--num_gpus, or the recipe's world
    else:
        check_world(env, os.environ, args.num_nodes, args.num_gpus)
        num_nodes, gpus = env.num_nodes, env.local_world_size
    plan, ds_config = plan_from_args(args, cfg, num_nodes, gpus, dataset_size=dataset_size,
                                     world_source=_WORLD_SOURCES.get(env.source, "a single process"),
                                     resume=_checkpoint_hold(args.resume, Path(cfg.train.run_dir) / "checkpoints"))
    return cfg, plan, ds_config, dataset_size


_WORLD_SOURCES = {"torch": "the launcher (deepspeed or torchrun: WORLD_SIZE, LOCAL_WORLD_SIZE)",
                  "slurm": "the launcher (srun: SLURM_NTASKS, SLURM_NTASKS_PER_NODE)"}


def _checkpoint_hold(resume: str | None, ckpt_dir: Path) -> ResumeHold | None:
    """The global batch, LR and warmup of the checkpoint --resume continues, read from its marker; None if none."""
    if not resume:
        return None
    from launcher.checkpoint import CheckpointError, read_marker, resolve_resume

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


def check_before_launch(cfg: Config, ds_config: dict, plan: Plan, ds_spec: str, recipe: str | None) -> None:
    """What a launch needs besides a plan, refused before any process group: the data lists, and DeepSpeed's own
    verdict on the rendered config at this world size. Raises ConfigError or PlanError."""
    from launcher.ds_config import validate_with_deepspeed

    d = cfg.data
    if not d.train_list:
        where = f"recipe {recipe} sets none" if recipe else "the built-in defaults have none"
        raise ConfigError(
            f"data.train_list is not set ({where}): give a recipe (e.g. --config recipes/train_48k.yaml) or "
            "data.train_list=PATH, a list file of `noisy clean [seconds]` lines (python -m data.demo "
            "runs/demo_corpus writes a demo corpus)")
    for key in ("train_list", "valid_list"):
        path = getattr(d, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"data.{key} {path}: no such file (a list file of `noisy clean [seconds]` lines)")
    validate_with_deepspeed(ds_config, plan.world_size, ds_spec)




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        env = read_dist_env(local_rank_arg=args.local_rank)
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from data import DataError

    try:
        cfg, plan, ds_config, _ = resolve(args, env)
    except (ConfigError, PlanError, DataError, PreflightError, EnvError) as e:
        return refuse(env.rank, e)
    if env.rank == 0:
        print_plan(plan, ds_config, ds_spec=args.ds_config, recipe=args.config, model_preset=cfg.model.preset)
    if args.dry_run:
        return 0
    try:
        check_before_launch(cfg, ds_config, plan, args.ds_config, args.config)
    except (ConfigError, PlanError) as e:
        return refuse(env.rank, e)
    if env.source == "single":
        # DeepSpeed would fall back to MPI discovery and fail obscurely without a launcher.
        env = DistEnv(0, 0, 1, 1, 1, "127.0.0.1", int(os.environ.get("MASTER_PORT", "29500")), "single")
        os.environ.update(env.export())
    elif env.source == "slurm":
        # (issue 6, slurm) srun sets only SLURM_*: hand torch.distributed the env:// variables, else
        # deepspeed.init_distributed falls back to MPI discovery and dies without mpi4py.
        if not env.master_addr or not env.master_port:
            print("error: under srun, export MASTER_ADDR (the first host of the job) and MASTER_PORT "
                  "before launching (slurm/train_48k.sbatch does)", file=sys.stderr)
            return 2
        os.environ.update(env.export())
    from launcher.checkpoint import AllRanksStop, CheckpointError
    from launcher.init_weights import prepare_init

    try:
        init = prepare_init(cfg, args.resume)  # every rank, before the process group: a bad file stops all here
    except ConfigError as e:
        return refuse(env.rank, e)
    try:
        return Trainer(cfg, plan, ds_config, env, args.resume, init).run()
    except AllRanksStop as e:
        refuse(env.rank, e)  # a shared verdict (a refused --resume, a full disk): rank 0 says why, once
        return e.exit_code
    except (PreflightError, TrainingAborted, ConfigError, DataError, CheckpointError) as e:
        print(f"error (rank {env.rank}): {e}", file=sys.stderr, flush=True)
        return 1


class Trainer:
    """Holds the engine, data and counters of one run; `run()` is the loop."""

    def __init__(self, cfg: Config, plan: Plan, ds_config: dict, env: DistEnv, resume: str | None,
                 init=None) -> None:
        self.cfg, self.plan, self.ds_config, self.env, self.resume = cfg, plan, ds_config, env, resume
        self.init = init  # train.init_from, checked (launcher/init_weights.py)
        self.evaluation = None  # train.eval_interval_epochs (launcher/train_eval.py), built when first used
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ---- set-up ------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from launcher.preflight import check_rendezvous, select_device

        # First: a GPU job on the wrong accelerator, or a rank without its own GPU, stops here.
        self.device = select_device(self.env)
        if self.env.rank == 0:
            check_run_dir(self.run_dir, create=True)
        accel = get_accelerator()
        if accel.device_name() == "cpu":
            # DeepSpeed JIT-compiles its CPU comm op before it opens the rendezvous (~50 s the first
            # time, cached after): build it first so that the bounded wait below measures the network only.
            from deepspeed.comm.torch import build_shm_op

            with self.preempt.deferred():
                build_shm_op()
        check_head_reachable(self.env, RENDEZVOUS_TIMEOUT_S)
        backend = accel.communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        check_rendezvous(RENDEZVOUS_TIMEOUT_S)
        if accel.device_name() == "cpu":
            release_shm_segment_name(self.env.rank)
        if self.env.rank != 0:
            check_run_dir(self.run_dir, create=False)
        self.device_settings = apply_device_settings(self.cfg.cuda, self.device.type)

    def _build_data(self):
        import torch
        import torch.distributed as dist

        from data import CropDataset, CursorSampler, DataError, EvalSampler, build_loader
        from data.validation import validate  # not `from data`: importing data.validate (the CLI) shadows it

        d = self.cfg.data
        if not d.train_list:
            raise ConfigError("data.train_list is not set: give a list file of `noisy clean [seconds]` lines")

        # Where the header cache goes when the corpus folder is read-only: the user's cache (kept across runs),
        # else the run directory (every rank can write it).
        fallback = [Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mossformer2-launcher",
                    self.run_dir / "cache"]

        def checked(list_path: str):
            # Rank 0 reads every header once (and caches them); the others then hit the cache. A bad
            # corpus stops every rank here, before training, with rank 0 printing the whole report.
            verdict = torch.zeros(1, device=self.device)
            index = None
            if self.env.rank == 0:
                try:
                    index, report = validate([list_path], sample_rate_hz=d.sample_rate_hz, resample=d.resample,
                                             skip_bad=d.skip_bad, cache_dir=d.cache_dir, fallback_cache_dirs=fallback)
                    for note in report.notes:  # e.g. a read-only corpus folder: the header cache moved
                        self.metrics.print(f"[data] {note}")
                    if report.num_bad:
                        self.metrics.print(f"[data] {list_path}: skipped {report.num_bad} bad line(s) (skip_bad)")
                except DataError as e:
                    self.metrics.print(f"error: {e}")
                    verdict += 1
            dist.all_reduce(verdict)
            if verdict.item():
                raise TrainingAborted(f"{list_path}: bad data (rank 0 printed the report)")
            if self.env.rank != 0:
                index, _ = validate([list_path], sample_rate_hz=d.sample_rate_hz, resample=d.resample,
                                    skip_bad=d.skip_bad, cache_dir=d.cache_dir, fallback_cache_dirs=fallback)
            return index

        def loader(dataset, sampler):
            return build_loader(dataset, sampler, num_workers=d.num_workers, pin_memory=d.pin_memory,
                                persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor,
                                nice=d.loader_nice, thread_prefetch=d.thread_prefetch)

        common = dict(segment_seconds=d.segment_seconds, sample_rate_hz=d.sample_rate_hz, normalize=d.normalize,
                      resample=d.resample, seed=self.cfg.train.seed)
        train_set = CropDataset(checked(d.train_list), random_crop=True, **common)
        if len(train_set) < self.plan.global_batch:
            raise TrainingAborted(
                f"{d.train_list}: {len(train_set)} usable pairs cannot fill one optimizer step of "
                f"{self.plan.global_batch} samples"
            )
        self.sampler = CursorSampler(len(train_set), self.plan.micro_batch, self.env.rank, self.env.world_size,
                                     seed=self.cfg.train.seed, epoch_quantum=self.plan.global_batch)
        self.train_loader = loader(train_set, self.sampler)
        self.valid_loader = None
        if d.valid_list:
            valid_set = CropDataset(checked(d.valid_list), random_crop=False, **common)
            self.valid_sampler = EvalSampler(len(valid_set), self.plan.micro_batch, self.env.rank, self.env.world_size)
            self.valid_loader = loader(valid_set, self.valid_sampler)

    def _build_engine(self, load_universal: bool) -> None:
        import deepspeed
        import torch

        from launcher.init_weights import confirm_after_initialize, load_before_initialize
        from model import build_model

        # Identical initial weights on every rank (ZeRO-3 partitions what each rank built), then
        # per-rank streams for dropout and dither.
        torch.manual_seed(self.cfg.train.seed)
        model = build_model(self.cfg.model.preset)
        load_before_initialize(model, self.init, self.metrics)
        torch.manual_seed(self.cfg.train.seed + 1000 * (self.env.rank + 1))
        ds_config = dict(self.ds_config)
        if load_universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
        )
        self.input_dtype = (torch.bfloat16 if ds_config.get("bf16", {}).get("enabled")
                            else torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        confirm_after_initialize(self.engine, self.init, self.zero_stage, self.metrics)
        self.init = None  # the weights are in the engine now: free the file's copy

    def _record_run(self) -> None:
        """The run's record, written once by rank 0: config, plan, DeepSpeed config, code revision."""
        if self.env.rank != 0:
            return
        (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        (self.run_dir / "plan.json").write_text(self.plan.to_json())
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=1))
        (self.run_dir / "device.json").write_text(json.dumps(self.device_settings, indent=1))
        root = Path(__file__).resolve().parent.parent
        try:
            rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            rev = ""
        (self.run_dir / "revision.txt").write_text((rev or "unknown (not a git checkout)") + "\n")
        (self.run_dir / "command.txt").write_text(
            f"{' '.join(sys.argv)}\nhost {socket.gethostname()} world {self.env.world_size} "
            f"({self.env.num_nodes}×{self.env.local_world_size}) via {self.env.source}\n"
        )

    # ---- resume ------------------------------------------------------------------------------
    def _resume_target(self):
        """The verified checkpoint to continue from (None: a fresh start); see launcher/checkpoint.py."""
        from launcher.checkpoint import ResumeTargets, human_bytes, remove_incomplete

        if self.env.rank == 0:
            for name, size in remove_incomplete(self.ckpt_dir):
                self.metrics.print(f"[checkpoint] removed {self.ckpt_dir / name}: an interrupted save "
                                   f"({human_bytes(size)})")
        self.targets = ResumeTargets(self.resume, self.ckpt_dir, self.plan.global_batch, self._report_skipped)
        return self.targets.next()

    def _report_skipped(self, ckpt_dir: Path, tag: str, reason: str) -> None:
        self.metrics.print(f"WARNING [resume] skipping checkpoint {ckpt_dir / tag}: {reason}; trying the next newest")
        self.metrics.log({"kind": "resume_skipped", "checkpoint": str(ckpt_dir / tag), "tag": tag, "reason": reason})

    def _load(self, target) -> None:
        from launcher.checkpoint import restore_rng

        ckpt_dir, tag, marker = target
        while (error := self._load_tag(ckpt_dir, tag, marker)) is not None:
            # Verified files that still do not load (a format this DeepSpeed cannot read): the next one that suits
            # the engine as built (a universal checkpoint needs one configured for it), or ResumeRefused.
            self.targets.reject(ckpt_dir, tag, f"DeepSpeed cannot load it ({error})")
            ckpt_dir, tag, marker = self.targets.next(usable=self._same_engine)
        state = marker["state"]
        self.sampler.load_state_dict(state["sampler"])
        self.schedule.load_state_dict(state["schedule"])
        self.counters.update(state["counters"])
        self.best_tag = state.get("best_tag")
        same_world = marker["world_size"] == self.env.world_size
        rng_restored = same_world and restore_rng(ckpt_dir, tag, self.env.rank)
        self.metrics.print(
            f"[resume] {ckpt_dir / tag}: step {self.engine.global_steps}, epoch {self.sampler.epoch + 1}, "
            f"{self.sampler.cursor} samples into the epoch"
            + ("" if same_world else f"; world {marker['world_size']} → {self.env.world_size}"
               + (" via universal checkpoint" if self.load_universal else ""))
            + ("" if rng_restored else "; fresh RNG streams")
        )

    def _load_tag(self, ckpt_dir: Path, tag: str, marker: dict) -> str | None:
        """Load one tag on every rank; None, or why it failed on some rank (all ranks then agree)."""
        import torch.distributed as dist

        from launcher.checkpoint import CheckpointError, ensure_universal

        error, load_dir = None, ckpt_dir
        if self.load_universal:
            if self.env.rank == 0:
                try:
                    ensure_universal(ckpt_dir, tag, marker["zero_stage"])
                except CheckpointError as e:
                    error = str(e)
            box = [error]
            dist.broadcast_object_list(box, src=0)
            if box[0]:
                return box[0]
            load_dir = ckpt_dir / f"{tag}_universal"
        try:
            path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            error = None if path is not None else f"nothing found in {load_dir / tag}"
        except Exception as e:  # whatever DeepSpeed or torch raise for a file they cannot read
            error = f"{type(e).__name__}: {str(e).strip()[:300]}"
        errors = [None] * self.env.world_size
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def _same_engine(self, marker: dict) -> str | None:
        universal = marker["world_size"] != self.env.world_size and marker["zero_stage"] > 0
        return None if universal == self.load_universal else "it needs an engine built for another world size"

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        import torch.distributed as dist

        from launcher.checkpoint import MARKER, tag_for
        from launcher.faults import StepWindow, install_test_faults, optimizer_step
        from launcher.metrics import Metrics, NullMetrics
        from launcher.preempt import Preemption
        from launcher.schedule import LRSchedule
        from launcher.train_eval import maybe_evaluate
        from launcher.watchdog import Watchdog
        from model import compute_features, mask_loss

        preempt = self.preempt = Preemption()  # first: a notice during set-up still yields a checkpoint
        self._init_distributed()
        rank0 = self.env.rank == 0
        self.metrics = Metrics(self.run_dir, self.cfg.train.max_epoch, self.cfg.train.progress_bar) if rank0 else NullMetrics()
        self._record_run()
        target = self._resume_target()
        self.load_universal = bool(
            target and target[2]["world_size"] != self.env.world_size and target[2]["zero_stage"] > 0
        )
        self._build_data()
        self._build_engine(self.load_universal)
        plan, tcfg, scfg = self.plan, self.cfg.train, self.cfg.schedule
        steps_per_epoch = self.sampler.samples_per_epoch // plan.global_batch
        total_steps = tcfg.max_steps or steps_per_epoch * tcfg.max_epoch
        self.schedule = LRSchedule(
            peak_lr=plan.peak_lr, warmup_steps=plan.warmup_steps, kind=scfg.kind, total_steps=total_steps,
            warmup_from_lr=plan.warmup_from_lr,
            min_lr_ratio=scfg.min_lr_ratio, halve_after=scfg.halve_after, stop_after=scfg.stop_after, factor=scfg.factor,
        )
        self.counters = {"skipped_steps": 0, "nonfinite_steps": 0, "consecutive_bad": 0, "samples_seen": 0}
        self.best_tag = None
        if target is not None:
            self._load(target)
        install_test_faults(self.engine, self.env.rank)
        engine = self.engine
        world, micro = self.env.world_size, plan.micro_batch
        watchdog = self.watchdog = Watchdog(self.env.rank, world, self.env.master_addr, self.env.master_port,
                                            tcfg.step_timeout_s, tcfg.slow_phase_timeout_s, self.metrics.log).start()

        exit_code, stop, upcoming = 0, False, None
        while self.sampler.epoch < tcfg.max_epoch and not stop:
            epoch = self.sampler.epoch
            total_micro = self.sampler.batches_per_epoch
            self.metrics.start_epoch(epoch, total_micro, self.sampler.cursor // (micro * world))
            interval = self._new_interval()
            window = StepWindow(engine, self.device)
            t_ready = time.perf_counter()
            engine.train()
            batches, upcoming = upcoming if upcoming is not None else iter(self.train_loader), None
            for noisy, clean in batches:
                interval["wait"] += time.perf_counter() - t_ready
                noisy = noisy.to(self.device, non_blocking=True)
                clean = clean.to(self.device, non_blocking=True)
                feats = compute_features(noisy, dither=1.0).to(self.input_dtype)
                mask = engine(feats)
                loss = mask_loss(mask, noisy, clean)
                window.add(loss)  # kept on the device: no host sync per micro-batch
                engine.backward(loss)  # always; a non-finite loss costs its optimizer step (launcher/faults.py)
                self.sampler.advance(1)
                interval["micro"] += 1
                watchdog.beat("train", engine.global_steps + 1)
                self.metrics.micro(None, 0.0, 0.0)
                if not engine.is_gradient_accumulation_boundary():
                    engine.step()  # counts the micro-batch; DeepSpeed steps the optimizer only at the boundary
                    t_ready = time.perf_counter()
                    continue
                # One small all-reduce per optimizer step (the only sync point a plain DeepSpeed loop has besides
                # the gradients): the window's losses, their non-finite count and the stop votes.
                totals = window.reduce(stop_requested=preempt.requested)
                lr = self.schedule.lr(engine.global_steps)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
                skipped = optimizer_step(engine, totals)  # skipped alike on every rank: weights and Adam untouched
                exit_code, stop = self._end_step(epoch, totals, skipped, lr, interval)
                if stop:
                    break
                t_ready = time.perf_counter()
            else:
                # The epoch ran to its end: validate, apply the plateau rule, checkpoint the next epoch's start.
                watchdog.slow("epoch end", engine.global_steps)
                self.sampler.set_epoch(epoch + 1)
                if epoch + 1 < tcfg.max_epoch:
                    upcoming = iter(self.train_loader)  # its first batches load while we validate and save
                action = "continue"
                if self.valid_loader is not None:
                    val_loss = self._validate(epoch, engine.global_steps)
                    action = self.schedule.end_epoch(val_loss)
                self._save(best=action == "improved")
                maybe_evaluate(self, epoch)  # PESQ/STOI/DNSMOS of whole validation files, when due
                if action == "halve" and self.best_tag:
                    self._reload_best()
                if action == "stop":
                    self.metrics.print(f"[schedule] {scfg.stop_after} epochs without improvement: stopping")
                    stop = True
            # Stop the loading threads of a pass left early and of a next epoch that will not run (closing
            # a pass that ran to its end does nothing).
            for unused in (batches, upcoming if stop else None):
                if hasattr(unused, "close"):
                    unused.close()
        if exit_code == 0 and not (self.ckpt_dir / tag_for(engine.global_steps) / MARKER).is_file():
            self._save()
        fingerprints = self._fingerprints()  # a collective: every rank takes part
        self.metrics.log({"kind": "end", "step": engine.global_steps, "micro_steps": engine.micro_steps,
                          "samples_seen": self.counters["samples_seen"], "skipped_steps": self.counters["skipped_steps"],
                          "nonfinite_steps": self.counters["nonfinite_steps"], "exit_code": exit_code,
                          "param_fingerprints": fingerprints})
        self.metrics.close()
        dist.barrier()
        watchdog.stop()
        # Explicitly, as PyTorch asks (NCCL especially); the process then exits without finalization (see the
        # end of this file), where leftover gloo threads could abort it.
        dist.destroy_process_group()
        # Loader worker processes (persistent ones included) are shut down with their DataLoader: here, not at
        # exit (see the end of this file).
        self.train_loader = self.valid_loader = None
        gc.collect()
        return exit_code

    def _end_step(self, epoch: int, totals, skipped: str | None, lr: float, interval: dict) -> tuple[int, bool]:
        """After an optimizer step: count and log it, validate and checkpoint when due. (exit code, stop?)"""
        from launcher.faults import account_step
        from launcher.preempt import PREEMPTED_EXIT

        tcfg, step = self.cfg.train, self.engine.global_steps
        self.counters["samples_seen"] += self.plan.global_batch
        abort = account_step(self.counters, epoch, step, totals, skipped, tcfg.max_consecutive_nonfinite, self.metrics)
        if abort:
            raise TrainingAborted(f"{abort}; lower the LR (now {self.plan.peak_lr:g} peak), check the data for "
                                  "silent or corrupt files, or use fp32")
        interval["loss_sum"] += totals.loss_sum
        interval["loss_n"] += totals.finite
        self._fp32_grad_norm = totals.grad_norm  # DeepSpeed reports none for a plain fp32 optimizer
        if self._is_log_step(step):
            self._log_train(epoch, step, 0.0 if skipped else lr, interval, self.plan.micro_batch, self.env.world_size,
                            self.cfg.data.segment_seconds)
            interval.update(self._new_interval())
        self.watchdog.fast()
        if tcfg.valid_interval_steps and step % tcfg.valid_interval_steps == 0:
            self.watchdog.slow("validate", step)
            self._validate(epoch, step)
            self.engine.train()
        done = tcfg.max_steps is not None and step >= tcfg.max_steps
        if totals.stop_votes or done or (tcfg.save_interval_steps and step % tcfg.save_interval_steps == 0):
            self._save()
        if totals.stop_votes:
            self.metrics.print(f"[preempt] checkpoint saved at step {step}; exiting for requeue")
            return PREEMPTED_EXIT, True
        return 0, done

    def _is_log_step(self, step: int) -> bool:
        return step == 1 or step % self.cfg.train.log_interval_steps == 0

    def _fingerprints(self) -> list[list[float]]:
        """(sum, sum of squares) of every rank's full parameters: equal lists mean the ranks agree."""
        import deepspeed
        import torch
        import torch.distributed as dist

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.zero_stage == 3):
            local = torch.tensor([sum(p.detach().double().sum().item() for p in params),
                                  sum(p.detach().double().pow(2).sum().item() for p in params)], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        return [g.cpu().tolist() for g in gathered]

    @staticmethod
    def _new_interval() -> dict:
        """Counters between two log lines: the logged loss is the mean over all of its micro-batches."""
        return {"t": time.perf_counter(), "wait": 0.0, "micro": 0, "loss_sum": 0.0, "loss_n": 0}

    def _log_train(self, epoch, step, lr, interval, micro, world, segment_s) -> None:
        loss = interval["loss_sum"] / interval["loss_n"] if interval["loss_n"] else float("nan")
        elapsed = max(1e-9, time.perf_counter() - interval["t"])
        n = max(1, interval["micro"])
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = getattr(self, "_fp32_grad_norm", None)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        spb = self.metrics.seconds_per_batch() if hasattr(self.metrics, "seconds_per_batch") else elapsed / n
        record = {
            "kind": "train", "epoch": epoch + 1, "step": step, "samples_seen": self.counters["samples_seen"],
            "loss": loss, "lr": lr, "grad_norm": grad_norm, "s_per_batch": spb,
            "samples_per_s": n * micro * world / elapsed,
            "audio_s_per_s_per_gpu": n * micro * segment_s / elapsed,
            "data_wait_share": interval["wait"] / elapsed, "skipped_steps": self.counters["skipped_steps"],
        }
        if self.device.type == "cuda":
            import torch

            # The CUDA allocator's high-water mark since the start (rank 0's GPU): what launcher/memory.py estimates.
            record["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        i = self.sampler.cursor // (micro * world)
        line = (f"Train Epoch: {epoch + 1}/{self.cfg.train.max_epoch} Step: {i}/{self.sampler.batches_per_epoch} | "
                f"{spb:.3f}s/batch | lr {lr:.4e} || Mask_Loss {loss:.4f}")
        self.metrics.log(record, line)

    def _validate(self, epoch: int, step: int) -> float:
        """Mean mask loss and SI-SNR of the enhanced signal over the whole validation set, all ranks."""
        import torch
        import torch.distributed as dist

        from model import compute_features, validation_metrics

        if self.valid_loader is None:
            return float("nan")
        engine = self.engine
        engine.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for noisy, clean, weight in self.valid_loader:  # weight 0 marks EvalSampler's padding
                noisy, clean, weight = (t.to(self.device) for t in (noisy, clean, weight))
                feats = compute_features(noisy, dither=0.0).to(self.input_dtype)
                mask = engine(feats).float()
                per_sample, snr, snr_in = validation_metrics(mask, noisy, clean)
                sums += torch.stack([(per_sample * weight).sum(), (snr * weight).sum(), (snr_in * weight).sum(),
                                     weight.sum()]).double()
        dist.all_reduce(sums)
        val_loss, val_snr, in_snr = (sums[:3] / sums[3]).tolist()
        self.metrics.log({"kind": "valid", "epoch": epoch + 1, "step": step,
                          "samples_seen": self.counters["samples_seen"], "loss": val_loss, "si_snr_db": val_snr,
                          "si_snr_improvement_db": val_snr - in_snr},
                         f"Valid Epoch: {epoch + 1}/{self.cfg.train.max_epoch} Step: {step} | "
                         f"Mask_Loss {val_loss:.4f} | SI-SNR {val_snr:.2f} dB ({val_snr - in_snr:+.2f} dB over noisy)")
        return val_loss

    def _save(self, best: bool = False) -> str:
        import time as _time

        from launcher.checkpoint import save, tag_for

        tag = tag_for(self.engine.global_steps)
        if best:
            self.best_tag = tag
        state = {"sampler": self.sampler.state_dict(), "schedule": self.schedule.state_dict(),
                 "counters": dict(self.counters), "best_tag": self.best_tag}
        marker = {"step": self.engine.global_steps, "epoch": self.sampler.epoch, "world_size": self.env.world_size,
                  "zero_stage": self.zero_stage, "global_batch": self.plan.global_batch,
                  "preset": self.cfg.model.preset, "plan": self.plan.to_dict(), "state": state, "time": _time.time()}
        protect = {self.best_tag} if self.best_tag else set()
        self.watchdog.slow("save", self.engine.global_steps)
        # Tags that failed verification at resume count for nothing when keep_last prunes (they go), unless saved anew.
        self.targets.rejected.discard(tag)
        save(self.engine, self.ckpt_dir, {}, marker, self.cfg.train.keep_last, protect, self.targets.rejected)
        return tag

    def _reload_best(self) -> None:
        """The reference halves the LR after reloading the best weights and optimizer state."""
        engine = self.engine
        counters = (engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps)
        engine.load_checkpoint(str(self.ckpt_dir), tag=self.best_tag, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
        engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps = counters
        self.metrics.print(f"[schedule] reloaded best checkpoint {self.best_tag}; LR scale now {self.schedule.scale:g}")


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's finalization. Every file is closed and every rank has passed the final
    # barrier by now; what finalization would still do is destroy torch's and DeepSpeed's C++ objects in no
    # particular order, and gloo threads that outlive the Python objects they hold then abort the process
    # ("terminate called without an active exception", exit -6 after a successful run: 3 times in about 100
    # 2-rank CPU runs here, with an explicit destroy_process_group or without; pytorch/pytorch#38228 and
    # #190489 describe the mechanism). A -6 would also hide the preemption exit code 75 from SLURM.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

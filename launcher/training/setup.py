"""A run's set-up, in the order the recipe reads: process group → run record → the checkpoint to resume → data →
engine → schedule → resume → the Trainer. Everything a user can get wrong was refused before this
(launcher/training/launch.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.checkpoint.weights import InitPlan
from launcher.config import Config, CudaSection, dump_yaml
from launcher.dist.device import apply_device_settings
from launcher.dist.env import DistEnv
from launcher.dist.group import start_deepspeed_group
from launcher.dist.preflight import check_run_dir, select_device
from launcher.plan.ds_config import precision
from launcher.plan.rules import Plan
from launcher.training.checkpoints import Checkpoints, needs_universal, open_resume
from launcher.training.compiled import CompileWatch
from launcher.training.datasets import build_data
from launcher.training.engine import build_engine
from launcher.training.evaluation import EvaluationSchedule
from launcher.training.feed import DataFeed
from launcher.training.ledger import SampleLedger
from launcher.training.metrics import Metrics, NullMetrics, TrainLog
from launcher.training.mfu import FlopRate, flop_rate
from launcher.training.mixing import MixTally
from launcher.training.nonfinite import StepWindow
from launcher.training.preempt import Preemption
from launcher.training.schedule import LRSchedule
from launcher.training.state import Counters
from launcher.training.trainer import Trainer, TrainingParts
from launcher.training.validation import Validator
from launcher.training.watchdog import Watchdog


@dataclass(frozen=True)
class RunSpec:
    """What launch.py settled before any process group: the config, the plan and its DeepSpeed config, the world,
    what --resume asks for, and train.init_from's checked weights."""

    cfg: Config
    plan: Plan
    ds_config: dict[str, Any]
    env: DistEnv
    resume: str | None
    init: InitPlan | None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)


def start_process_group(env: DistEnv, run_dir: Path, cuda: CudaSection, preempt: Preemption
                        ) -> tuple[Any, dict[str, Any]]:
    """(this rank's torch.device, the device settings applied). A GPU job on the wrong accelerator, or a rank without
    its own GPU, stops first; rank 0 creates the run directory, the others check they can write it."""
    device = select_device(env)
    if env.rank == 0:
        check_run_dir(run_dir, create=True)
    start_deepspeed_group(env, preempt.deferred)
    if env.rank != 0:
        check_run_dir(run_dir, create=False)
    return device, apply_device_settings(cuda, device.type)


def write_run_record(spec: RunSpec, device_settings: dict[str, Any]) -> None:
    """The run's record, written once by rank 0: config, plan, DeepSpeed config, device, code revision, command."""
    if spec.env.rank != 0:
        return
    run_dir, env = spec.run_dir, spec.env
    (run_dir / "config.yaml").write_text(dump_yaml(spec.cfg))
    (run_dir / "plan.json").write_text(spec.plan.to_json())
    (run_dir / "ds_config.json").write_text(json.dumps(spec.ds_config, indent=1))
    (run_dir / "device.json").write_text(json.dumps(device_settings, indent=1))
    root = Path(__file__).resolve().parent.parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    (run_dir / "revision.txt").write_text((rev or "unknown (not a git checkout)") + "\n")
    (run_dir / "command.txt").write_text(f"{' '.join(sys.argv)}\nhost {socket.gethostname()} world {env.world_size} "
                                         f"({env.num_nodes}×{env.local_world_size}) via {env.source}\n")


def _flop_rate(spec: RunSpec, device) -> tuple[FlopRate, dict[str, Any]]:
    """FLOPs per optimizer step of one rank and its GPU's peak (launcher/training/mfu.py)."""
    cfg, plan = spec.cfg, spec.plan
    segment_samples = int(round(cfg.data.segment_seconds * cfg.data.sample_rate_hz))  # the crops' length (data/)
    return flop_rate(cfg.model.preset, plan.micro_batch, plan.accumulation_steps, segment_samples,
                     precision(spec.ds_config), cfg.cuda.allow_tf32, device)


def _schedule(plan: Plan, cfg: Config, steps_per_epoch: int) -> LRSchedule:
    s, t = cfg.schedule, cfg.train
    return LRSchedule(peak_lr=plan.peak_lr, warmup_steps=plan.warmup_steps, kind=s.kind,
                      total_steps=t.max_steps or steps_per_epoch * t.max_epoch, warmup_from_lr=plan.warmup_from_lr,
                      min_lr_ratio=s.min_lr_ratio, halve_after=s.halve_after, stop_after=s.stop_after, factor=s.factor)


def _checkpoints(spec: RunSpec, built, targets, states: dict[str, Any], ledger: SampleLedger, load_universal: bool,
                 watchdog: Watchdog, log: TrainLog, preempt: Preemption) -> Checkpoints:
    cfg, plan, env, t = spec.cfg, spec.plan, spec.env, spec.cfg.train
    facts = {"world_size": env.world_size, "zero_stage": built.zero_stage, "global_batch": plan.global_batch,
             "preset": cfg.model.preset, "plan": plan.to_dict(), "attempt": ledger.attempt}
    return Checkpoints(built.engine, spec.run_dir / "checkpoints", targets, states, facts, t.keep_last,
                       t.save_interval_steps, load_universal, env.rank, env.world_size, watchdog, log, preempt.deferred)


def build_trainer(spec: RunSpec) -> Trainer:
    cfg, plan, env, t = spec.cfg, spec.plan, spec.env, spec.cfg.train
    preempt = Preemption()  # first: a notice during set-up still yields a checkpoint
    device, device_settings = start_process_group(env, spec.run_dir, cfg.cuda, preempt)
    sink = Metrics(spec.run_dir, t.max_epoch, t.progress_bar) if env.rank == 0 else NullMetrics()
    tally = MixTally(device) if cfg.mixing.enabled else None
    rate, flops_record = _flop_rate(spec, device)
    log = TrainLog(sink, t.log_interval_steps, t.max_epoch, plan.micro_batch, env.world_size,
                   cfg.data.segment_seconds, device, tally, rate)
    write_run_record(spec, device_settings)
    log.log(flops_record)
    # Not under the watchdog: rank 0 may check the headers of a large corpus while the others wait for it (the
    # collective timeout bounds that). Every later stage is, within train.slow_phase_timeout_s, naming a stopped rank.
    data = build_data(cfg.data, cfg.mixing, t.seed, plan.micro_batch, plan.global_batch, env.rank, env.world_size,
                      spec.run_dir, device, log)
    if data.mixing is not None:
        data.mixing.write(spec.run_dir, env.rank)
    watchdog = Watchdog(env.rank, env.world_size, env.master_addr, env.master_port, t.step_timeout_s,
                        t.slow_phase_timeout_s, log.log).start()
    watchdog.slow("resume: checking the checkpoints", 0)
    targets = open_resume(spec.resume, spec.run_dir / "checkpoints", plan.global_batch, env.rank, log)
    target = targets.next()
    load_universal = bool(target and needs_universal(target[2], env.world_size))
    watchdog.slow("building the engine", 0)
    built = build_engine(cfg.model.preset, t.seed, spec.ds_config, env.rank, spec.init, load_universal, log,
                         regions=t.compile, device_type=device.type)
    schedule = _schedule(plan, cfg, data.sampler.samples_per_epoch // plan.global_batch)
    counters = Counters()
    states = {"sampler": data.sampler, "schedule": schedule, "counters": counters}
    if data.mixing is not None:
        states["mixing"] = data.mixing  # its record in every marker; loading a checkpoint compares it
    ledger = SampleLedger(data.sampler, plan.global_batch, env.rank, log)
    checkpoints = _checkpoints(spec, built, targets, states, ledger, load_universal, watchdog, log, preempt)
    if target is not None:
        watchdog.slow("resume: loading the checkpoint", 0)
        checkpoints.load(target)
    if os.environ.get("MF2_TEST_FAULT"):  # the tests' fault injection, never loaded otherwise
        from launcher.testing.faults import install

        install(built.engine, env.rank)
    ledger.start(built.engine.global_steps, checkpoints.resumed_from, env.world_size, plan.micro_batch,
                 plan.accumulation_steps)
    watchdog.slow("first step", built.engine.global_steps + 1)
    return Trainer(TrainingParts(
        plan=plan, train=t, device=device, built=built, feed=DataFeed(data.loader, data.sampler,
                                                                      plan.accumulation_steps),
        window=StepWindow(built.engine, device, tally), schedule=schedule, counters=counters, checkpoints=checkpoints,
        validator=Validator(built.engine, data.valid_loader, device, built.input_dtype, t.valid_interval_steps,
                            t.max_epoch, watchdog, log),
        evaluation=EvaluationSchedule(cfg.data, t, cfg.model.preset, plan.micro_batch, env.rank, env.world_size,
                                      device, log),
        log=log, watchdog=watchdog, preempt=preempt, ledger=ledger,
        compile_watch=CompileWatch(t.compile, t.slow_phase_timeout_s, log)))

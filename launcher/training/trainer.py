"""The training loop: epochs of optimizer steps, each the K micro-batches the data feed hands over.

    while the run goes on:                   start_epoch()
        for each optimizer step's micro-batches:
            result = train_step(micro_batches)   forward, backward, the step's one all-reduce, the optimizer step
            after_step(result)                   count, log, validate and save when due, stop when asked
        at the epoch's end:                  end_epoch()   validate, plateau rule, checkpoint, evaluate
    finish()

Each component decides when it acts (`log.maybe_log`, `validator.maybe_validate`, `checkpoints.maybe_save`); the
loop holds no interval arithmetic. launcher/training/setup.py builds the parts.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable

import torch.distributed as dist

from launcher.config import TrainSection
from launcher.plan.rules import Plan
from launcher.training.checkpoints import Checkpoints
from launcher.training.compiled import CompileWatch, compiled_graphs
from launcher.training.engine import Engine, param_fingerprints
from launcher.training.errors import TrainingAborted
from launcher.training.evaluation import EvaluationSchedule
from launcher.training.feed import DataFeed
from launcher.training.ledger import SampleLedger
from launcher.training.metrics import Position, TrainLog
from launcher.training.nonfinite import StepWindow, account_step, optimizer_step
from launcher.training.preempt import PREEMPTED_EXIT, Preemption
from launcher.training.schedule import LRSchedule
from launcher.training.state import Counters, StepResult
from launcher.training.validation import Validator
from launcher.training.watchdog import Watchdog


@dataclass(frozen=True)
class TrainingParts:
    """Everything the loop works with, built by launcher/training/setup.py."""

    plan: Plan
    train: TrainSection
    device: Any  # torch.device
    built: Engine
    feed: DataFeed
    window: StepWindow
    schedule: LRSchedule
    counters: Counters
    checkpoints: Checkpoints
    validator: Validator
    evaluation: EvaluationSchedule
    log: TrainLog
    watchdog: Watchdog
    preempt: Preemption
    compile_watch: CompileWatch
    ledger: SampleLedger


class Trainer:
    def __init__(self, parts: TrainingParts) -> None:
        self.plan, self.cfg, self.device = parts.plan, parts.train, parts.device
        self.engine, self.input_dtype, self.zero_stage = (parts.built.engine, parts.built.input_dtype,
                                                          parts.built.zero_stage)
        self.feed, self.window, self.schedule, self.counters = parts.feed, parts.window, parts.schedule, parts.counters
        self.checkpoints, self.validator, self.evaluation = parts.checkpoints, parts.validator, parts.evaluation
        self.log, self.watchdog, self.preempt = parts.log, parts.watchdog, parts.preempt
        # train.compile's features and loss (launcher/training/engine.py step_functions), eager when it is off.
        self.features, self.loss_fn = parts.built.features, parts.built.loss_fn
        self.compile_watch = parts.compile_watch
        self.ledger = parts.ledger
        self.exit_code: int | None = None  # set when the run stops before max_epoch: 0 done, 75 preempted

    @property
    def stopping(self) -> bool:
        return self.exit_code is not None

    def train(self) -> int:
        """Epochs until max_epoch, max_steps, the plateau rule or a preemption ends the run; the exit code."""
        while not self.stopping and self.feed.epoch < self.cfg.max_epoch:
            self.start_epoch()
            for micro_batches in self.feed.steps(stop=lambda: self.stopping):
                with self.notices_held_while_compiling():
                    result = self.train_step(micro_batches)
                self.after_step(result)
            if not self.stopping and self.feed.epoch_done:
                self.end_epoch()
        return self.finish()

    def notices_held_while_compiling(self) -> ContextManager:
        """The step that compiles (the first after a start, with train.compile on) runs g++ and inductor's compile
        workers, which a preemption notice sent to every process of the job step (srun) would kill, failing the
        compile and the run. The notice is held back from them (the signal mask survives fork and exec); the rank's
        handler still sets its flag, and the run stops for requeue at the step's end as it would otherwise."""
        return self.preempt.deferred() if self.compile_watch.compiles_next else contextlib.nullcontext()

    def start_epoch(self) -> None:
        self.log.start_epoch(self.feed.epoch, self.feed.micro_batches_per_epoch, self.feed.micro_batches_done)
        self.engine.train()

    def train_step(self, micro_batches: Iterable) -> StepResult:
        """Forward and backward of each micro-batch, then one optimizer step, skipped alike on every rank when a
        loss or the gradients are not finite (launcher/training/nonfinite.py)."""
        engine = self.engine
        for noisy, clean, *flags in micro_batches:  # flags: per sample, when the pairs are mixed on the fly
            noisy = noisy.to(self.device, non_blocking=True)
            clean = clean.to(self.device, non_blocking=True)
            mask = engine(self.features(noisy, dither=1.0).to(self.input_dtype))
            loss = self.loss_fn(mask, noisy, clean)
            self.window.add(loss)  # kept on the device: no host sync per micro-batch
            if flags:
                self.window.count(noisy, clean, *flags)
            engine.backward(loss)  # always; a non-finite loss costs its optimizer step
            self.feed.consumed()
            self.watchdog.beat("train", engine.global_steps + 1)
            self.log.micro()
            if not engine.is_gradient_accumulation_boundary():
                engine.step()  # counts the micro-batch; DeepSpeed steps the optimizer only at the boundary
        # One small all-reduce per optimizer step (the only sync point a plain DeepSpeed loop has besides the
        # gradients): the step's losses, their non-finite count and the stop votes.
        totals = self.window.reduce(stop_requested=self.preempt.requested)
        lr = self.schedule.lr(engine.global_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        return StepResult(totals, optimizer_step(engine, totals), lr)

    def after_step(self, result: StepResult) -> None:
        """Count and log the step, validate and checkpoint when due, stop at max_steps or on a preemption."""
        epoch, step = self.feed.epoch, self.engine.global_steps
        self.counters.samples_seen += self.plan.global_batch
        self.ledger.record_step(epoch, step, applied=result.skipped is None)
        abort = account_step(self.counters, epoch, step, result.totals, result.skipped,
                             self.cfg.max_consecutive_nonfinite, self.log)
        if abort:
            raise TrainingAborted(f"{abort}; lower the LR (now {self.plan.peak_lr:g} peak), check the data for "
                                  "silent or corrupt files, or use fp32")
        self.log.add_step(result, self.plan.accumulation_steps, self.feed.take_wait_s())
        # DeepSpeed reports no gradient norm for a plain fp32 optimizer: the step's all-reduce has it then.
        grad_norm = self.engine.get_global_grad_norm()
        self.log.maybe_log(Position(epoch, step, self.feed.micro_batches_done, self.feed.micro_batches_per_epoch),
                           result, result.totals.grad_norm if grad_norm is None else grad_norm, self.counters)
        self.watchdog.fast()
        self.compile_watch.after_step(step)
        self.validator.maybe_validate(epoch, step, self.counters.samples_seen)
        preempted = result.totals.stop_votes > 0
        done = self.cfg.max_steps is not None and step >= self.cfg.max_steps
        self.checkpoints.maybe_save(step, force=preempted or done)
        if preempted:
            self.log.print(f"[preempt] checkpoint saved at step {step}; exiting for requeue")
            self.exit_code = PREEMPTED_EXIT
        elif done:
            self.exit_code = 0

    def end_epoch(self) -> None:
        """Validate, apply the plateau rule, checkpoint the next epoch's start (the best one marked), evaluate."""
        epoch, step = self.feed.epoch, self.engine.global_steps
        self.watchdog.slow("epoch end", step)
        self.feed.next_epoch(prefetch=epoch + 1 < self.cfg.max_epoch)  # its first batches load while we validate
        action = "continue"
        if self.validator.enabled:
            action = self.schedule.end_epoch(self.validator.validate(epoch, step, self.counters.samples_seen))
        self.checkpoints.save(best=action == "improved")
        self.evaluation.maybe_evaluate(self.engine, self.zero_stage, epoch, self.counters.samples_seen)
        if action == "halve" and (tag := self.checkpoints.reload_best()):
            self.log.print(f"[schedule] reloaded best checkpoint {tag}; LR scale now {self.schedule.scale:g}")
        if action == "stop":
            self.log.print(f"[schedule] {self.schedule.stop_after} epochs without improvement: stopping")
            self.exit_code = 0

    def finish(self) -> int:
        """The last checkpoint, the `end` record, then every rank leaves the process group together."""
        self.feed.close()
        exit_code = self.exit_code or 0
        if exit_code == 0:
            self.checkpoints.save_unless_saved()
        fingerprints = param_fingerprints(self.engine, self.zero_stage, self.device)  # a collective
        self.log.log({"kind": "end", "step": self.engine.global_steps, "micro_steps": self.engine.micro_steps,
                           "samples_seen": self.counters.samples_seen, "skipped_steps": self.counters.skipped_steps,
                           "nonfinite_steps": self.counters.nonfinite_steps, "exit_code": exit_code,
                           "compiled_graphs": compiled_graphs(), "param_fingerprints": fingerprints})
        self.log.close()
        dist.barrier()
        self.watchdog.stop()
        # Explicitly, as PyTorch asks (NCCL especially); the process then exits without finalization (see the end
        # of launcher/train.py), where leftover gloo threads could abort it.
        dist.destroy_process_group()
        # Loader worker processes (persistent ones included) are shut down with their DataLoader: here, not at exit.
        self.feed.release()
        self.validator.release()
        gc.collect()
        return exit_code

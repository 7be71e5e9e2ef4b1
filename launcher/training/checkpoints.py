"""The run's checkpoints: which one a run continues from, when to save (`maybe_save`), what a checkpoint holds
besides DeepSpeed's files, loading it exactly, and reloading the best one for the plateau rule.

The store itself (files, checksums, marker, retention) is launcher/checkpoint/store.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from launcher.checkpoint.marker import MARKER, AllRanksStop, CheckpointError, human_bytes, tag_for
from launcher.checkpoint.resume import ResumeTargets
from launcher.checkpoint.store import ensure_universal, remark, remove_incomplete, restore_rng, save


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def open_resume(resume: str | None, ckpt_dir: Path, global_batch: int, rank: int, log) -> ResumeTargets:
    """The checkpoints `--resume` may continue from (rank 0 first removes interrupted saves)."""
    if rank == 0:
        for name, size in remove_incomplete(ckpt_dir):
            log.print(f"[checkpoint] removed {ckpt_dir / name}: an interrupted save ({human_bytes(size)})")

    def report_skipped(folder: Path, tag: str, reason: str) -> None:
        log.print(f"WARNING [resume] skipping checkpoint {folder / tag}: {reason}; trying the next newest")
        log.log({"kind": "resume_skipped", "checkpoint": str(folder / tag), "tag": tag, "reason": reason})

    return ResumeTargets(resume, ckpt_dir, global_batch, report_skipped)


def needs_universal(marker: dict[str, Any], world_size: int) -> bool:
    """A ZeRO checkpoint of another world size loads through DeepSpeed's universal format."""
    return marker["world_size"] != world_size and marker["zero_stage"] > 0


class Checkpoints:
    """Saves the engine with `states` (name → object with state_dict/load_state_dict: sampler, schedule, counters)
    and the run's facts in the marker; loads them back exactly."""

    def __init__(self, engine, ckpt_dir: Path, targets: ResumeTargets, states: dict[str, Stateful],
                 facts: dict[str, Any], keep_last: int, interval_steps: int | None, load_universal: bool,
                 rank: int, world_size: int, watchdog, log, deferred) -> None:
        self.engine, self.ckpt_dir, self.targets, self.states = engine, ckpt_dir, targets, states
        self.facts = facts  # world_size, zero_stage, global_batch, preset, plan: written into every marker
        self.keep_last, self.interval_steps, self.load_universal = keep_last, interval_steps, load_universal
        self.rank, self.world_size = rank, world_size
        self.watchdog, self.log = watchdog, log
        self.deferred = deferred  # the preemption's: holds its signals back while a child process runs
        self.best_tag: str | None = None
        self.saved_step: int | None = None  # the step this process last saved (its engine state unchanged since)
        self.resumed_from: dict[str, Any] | None = None  # {"tag", "attempt"} of the checkpoint loaded

    def maybe_save(self, step: int, force: bool) -> None:
        """After an optimizer step: save when forced (preemption, the last step) or every `save_interval_steps`."""
        if force or (self.interval_steps and step % self.interval_steps == 0):
            self.save()

    def save_unless_saved(self) -> None:
        """At the end of a run: a checkpoint of the last step, unless there is one."""
        if not (self.ckpt_dir / tag_for(self.engine.global_steps) / MARKER).is_file():
            self.save()

    def save(self, best: bool = False) -> str:
        tag = tag_for(self.engine.global_steps)
        if best:
            self.best_tag = tag
        state = {name: obj.state_dict() for name, obj in self.states.items()}
        state["best_tag"] = self.best_tag
        marker = {"step": self.engine.global_steps, "epoch": self.states["sampler"].epoch, **self.facts,
                  "state": state, "time": time.time()}
        protect = {self.best_tag} if self.best_tag else set()
        self.watchdog.slow("save", self.engine.global_steps)
        # Tags that failed verification at resume count for nothing when keep_last prunes (they go), unless saved anew.
        self.targets.rejected.discard(tag)
        if self.saved_step == self.engine.global_steps:  # the epoch's end after its last step's interval save
            remark(self.ckpt_dir, tag, marker, self.keep_last, protect, self.targets.rejected)
        else:
            save(self.engine, self.ckpt_dir, {}, marker, self.keep_last, protect, self.targets.rejected)
        self.saved_step = self.engine.global_steps
        return tag

    def load(self, target: tuple[Path, str, dict[str, Any]]) -> None:
        """Continue from `target` (from ResumeTargets.next()), or from the next one that loads."""
        ckpt_dir, tag, marker = target
        if os.environ.get("MF2_TEST_FAULT"):  # the tests' fault injection, never loaded otherwise
            from launcher.testing.faults import pause

            pause("resume:load", marker["step"], self.rank)
        while (error := self._load_tag(ckpt_dir, tag, marker)) is not None:
            # Verified files that still do not load (a format this DeepSpeed cannot read): the next one that suits
            # the engine as built (a universal checkpoint needs one configured for it), or ResumeRefused.
            self.targets.reject(ckpt_dir, tag, f"DeepSpeed cannot load it ({error})")
            ckpt_dir, tag, marker = self.targets.next(usable=self._same_engine)
        state = marker["state"]
        for name, obj in self.states.items():
            obj.load_state_dict(state.get(name))  # None: a state the checkpoint's run did not have (mixing)
        self.best_tag = state.get("best_tag")
        self.resumed_from = {"tag": tag, "attempt": marker.get("attempt")}
        same_world = marker["world_size"] == self.world_size
        rng_restored = same_world and restore_rng(ckpt_dir, tag, self.rank)
        sampler = self.states["sampler"]
        self.log.print(
            f"[resume] {ckpt_dir / tag}: step {self.engine.global_steps}, epoch {sampler.epoch + 1}, "
            f"{sampler.cursor} samples into the epoch"
            + ("" if same_world else f"; world {marker['world_size']} → {self.world_size}"
               + (" via universal checkpoint" if self.load_universal else ""))
            + ("" if rng_restored else "; fresh RNG streams")
        )

    def _load_tag(self, ckpt_dir: Path, tag: str, marker: dict) -> str | None:
        """Load one tag on every rank; None, or why it failed on some rank (all ranks then agree)."""
        error, load_dir = None, ckpt_dir
        if self.load_universal:
            stop = None
            if self.rank == 0:
                try:
                    ensure_universal(ckpt_dir, tag, marker["zero_stage"], self.deferred)
                except AllRanksStop as e:  # no space for the copy: not the checkpoint's fault, and not the next one's
                    stop = str(e)
                except CheckpointError as e:
                    error = str(e)
            box = [error, stop]
            dist.broadcast_object_list(box, src=0)
            if box[1]:
                raise AllRanksStop(box[1])
            if box[0]:
                return box[0]
            load_dir = ckpt_dir / f"{tag}_universal"
        try:
            path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            error = None if path is not None else f"nothing found in {load_dir / tag}"
        except Exception as e:  # whatever DeepSpeed or torch raise for a file they cannot read
            error = f"{type(e).__name__}: {str(e).strip()[:300]}"
        errors = [None] * self.world_size
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def _same_engine(self, marker: dict) -> str | None:
        return (None if needs_universal(marker, self.world_size) == self.load_universal
                else "it needs an engine built for another world size")

    def reload_best(self) -> str | None:
        """The reference halves the LR after reloading the best weights and optimizer state; the step counts stay.
        Returns the tag reloaded (None when there is no best yet)."""
        if not self.best_tag:
            return None
        engine = self.engine
        counters = (engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps)
        engine.load_checkpoint(str(self.ckpt_dir), tag=self.best_tag, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
        self.saved_step = None  # the weights changed: no checkpoint of this step holds them
        engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps = counters
        return self.best_tag

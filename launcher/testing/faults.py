"""Test-only fault injection, for tests/test_faults.py and the chaos storm: loaded by production code only when
MF2_TEST_FAULT is set.

MF2_TEST_FAULT holds comma-separated faults:
    nonfinite_grad@STEP@RANK   the first micro-batch of optimizer step STEP on RANK gets NaN gradients while
                               its loss stays finite (0 · sqrt(0) in the output's graph: finite forward, NaN backward)
    pause@POINT@STEP           every rank stops at POINT (save:before_write and save:before_marker of the save of
                               step STEP, resume:load before loading the checkpoint of step STEP; see `pause`)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def _faults(kind: str) -> list[list[str]]:
    spec = os.environ.get("MF2_TEST_FAULT", "")
    return [item.split("@")[1:] for item in spec.split(",") if item.split("@")[0] == kind]


def install(engine, rank: int) -> None:
    """Arm the nonfinite_grad faults of MF2_TEST_FAULT on this rank's engine (none: nothing is installed)."""
    targets = {int(step) for step, r in _faults("nonfinite_grad") if int(r) == rank}
    if not targets:
        return

    def poison(module, inputs, output):
        step = engine.global_steps + 1
        # Training forwards only: a validation between two steps (an epoch's end) runs without gradients and would
        # use the fault up, so that a run resumed after that validation would get it and the uninterrupted one not.
        first_micro_batch = engine.micro_steps % engine.gradient_accumulation_steps() == 0
        if step in targets and torch.is_grad_enabled() and first_micro_batch:
            targets.discard(step)
            return output + 0.0 * torch.sqrt(output.float().sum() * 0.0).to(output.dtype)
        return output

    engine.module.register_forward_hook(poison)


def pause(point: str, step: int, rank: int) -> None:
    """At a pause fault for (point, step): touch MF2_TEST_FAULT_DIR/paused.rankN, then wait for its `release`."""
    if not any(p == point and int(s) == step for p, s in _faults("pause")):
        return
    folder = Path(os.environ["MF2_TEST_FAULT_DIR"])
    (folder / f"paused.rank{rank}").touch()
    while not (folder / "release").exists():
        time.sleep(0.1)

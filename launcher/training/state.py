"""What the training loop counts, and what one optimizer step returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step, summed over its micro-batches and all ranks."""

    loss_sum: float  # of the finite losses
    finite: int
    nonfinite: int
    stop_votes: int
    grad_norm: float | None  # the global norm before clipping, where the loop computes it (plain optimizer)
    tally: tuple[float, ...] = ()  # the mixtures' facts summed over the step (launcher/training/mixing.py MixTally)


@dataclass
class Counters:
    """Saved in every checkpoint (`state.counters` of COMPLETE.json), so a resumed run continues the counts."""

    samples_seen: int = 0  # by the optimizer steps so far, skipped ones included
    skipped_steps: int = 0  # non-finite, or an fp16 loss-scale overflow
    nonfinite_steps: int = 0
    consecutive_bad: int = 0  # non-finite steps in a row up to now

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, int(state[f.name]))


@dataclass(frozen=True)
class StepResult:
    """One optimizer step as the loop saw it."""

    totals: StepTotals  # its micro-batches' losses and votes, summed over all ranks
    skipped: str | None  # why it was skipped on every rank (launcher/training/nonfinite.py), None if applied
    lr: float  # the LR it was given (the schedule's, also when skipped)

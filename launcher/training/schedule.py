"""The learning-rate schedule: the one source of truth for the LR of every optimizer step.

Warmup ramps the LR linearly from `warmup_from_lr` to the peak over `warmup_steps` optimizer steps,
followed by either the reference's plateau rule or a cosine decay. When the plan raised the LR above
base_lr (k > 1) the ramp starts from base_lr, Goyal et al.'s (2017) gradual warmup: base_lr is the LR
known to be stable at the reference batch, and a ramp from near 0 would spend the warmup's first steps
at LRs far below it, learning little, while a new run's loss is still high. Otherwise (an explicit
warmup at k <= 1) it starts from 0; the first step is then peak/warmup_steps, never 0.

The schedule's whole state is a small dict saved in every checkpoint, so a resumed run continues with
the same LR and the same count of bad epochs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class LRSchedule:
    peak_lr: float
    warmup_steps: int = 0
    warmup_from_lr: float = 0.0
    kind: str = "plateau"  # "plateau" | "cosine"
    total_steps: int | None = None  # cosine only
    min_lr_ratio: float = 0.0
    halve_after: int = 5
    stop_after: int = 10
    factor: float = 0.5
    # Mutable state.
    scale: float = 1.0
    bad_epochs: int = 0
    prev_val_loss: float | None = None
    best_val_loss: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("plateau", "cosine"):
            raise ValueError(f"schedule.kind {self.kind!r}: valid kinds are plateau, cosine")
        if self.kind == "cosine" and not self.total_steps:
            raise ValueError("schedule.kind cosine needs the total number of steps (train.max_steps or epochs)")
        if not 0 <= self.warmup_from_lr <= self.peak_lr:
            raise ValueError(f"warmup_from_lr {self.warmup_from_lr:g} must be in [0, peak_lr {self.peak_lr:g}]")

    def lr(self, step: int) -> float:
        """LR for the optimizer step that takes the step count from `step` to `step + 1`."""
        if step < self.warmup_steps:
            return self.warmup_from_lr + (self.peak_lr - self.warmup_from_lr) * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            assert self.total_steps is not None
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            ratio = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            return self.peak_lr * ratio
        return self.peak_lr * self.scale

    def end_epoch(self, val_loss: float) -> str:
        """Apply the reference's plateau rule to this epoch's validation loss.

        Returns "improved" (a new best: save it), "stop", "halve" (reload the best checkpoint; the LR is
        already scaled) or "continue".
        """
        improved_on_best = self.best_val_loss is None or val_loss < self.best_val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
        action = "improved" if improved_on_best else "continue"
        if self.kind == "plateau":
            if self.prev_val_loss is not None and val_loss >= self.prev_val_loss:
                self.bad_epochs += 1
            else:
                self.bad_epochs = 0
            if self.bad_epochs >= self.stop_after:
                action = "stop"
            elif self.bad_epochs == self.halve_after:
                self.scale *= self.factor
                action = "halve"
        self.prev_val_loss = val_loss
        return action

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ("scale", "bad_epochs", "prev_val_loss", "best_val_loss"):
            setattr(self, key, state[key])

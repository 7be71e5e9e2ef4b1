"""Non-finite losses and gradients, decided once per optimizer step, alike on every rank.

Each micro-batch always backpropagates (a second, zero-gradient forward would double activation
memory); its loss only feeds device-side sums, so the loop never waits for the device per micro-batch.
At the accumulation boundary the loop's one all-reduce per optimizer step (`StepWindow.reduce`) tells
every rank whether any micro-batch of any rank had a non-finite loss; such a step is skipped whole:

- `optimizer_step` runs DeepSpeed's step with the underlying torch optimizer's `step` disabled, so the
  weights, Adam's moments and its step count stay exactly as they were; DeepSpeed still zeroes the
  gradients and counts the step (the LR schedule, which follows `engine.global_steps`, moves on).
- Non-finite gradients with a finite loss: every optimizer DeepSpeed wraps around torch's (ZeRO 1–3,
  bf16, fp16) computes the global gradient norm for clipping anyway and skips a step whose norm is not
  finite (deepspeed 0.19.8: stage_1_and_2.py, stage3.py, bf16_optimizer.py, fp16/unfused_optimizer.py
  `is_invalid_grad_norm`); the loop reads that verdict from `engine.was_step_applied()`, which every
  rank computes from the same all-reduced norm (ZeRO 1–2 only while `zero_optimization.compute_grad_norm`
  and, for bf16, `bf16.check_grad_overflow` keep their default, true: turning either off is refused).
  A plain torch optimizer (ZeRO 0, fp32) gets no such check from DeepSpeed (a NaN there reaches the
  weights and Adam's moments), so `StepWindow.reduce` adds the norm of its gradients, which DeepSpeed's
  backward has all-reduced already, to the step's all-reduce.
- fp16: DeepSpeed's dynamic loss scaler owns gradient overflow (it halves the scale and skips the
  step, routinely at the start); such a step is counted as skipped but not as non-finite. A non-finite
  loss is handled as above in every precision.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.distributed as dist

from launcher.config import ConfigError
from launcher.training.state import Counters, StepTotals

LOSS, GRADIENT, LOSS_SCALE = "non-finite loss", "non-finite gradients", "fp16 loss-scale overflow"


class StepWindow:
    """Device-side sums over the micro-batches of one optimizer step; `reduce` is the step's one all-reduce.

    With a `tally` (dynamic mixing: launcher/training/mixing.py MixTally) the same all-reduce also sums what each
    micro-batch's mixtures were."""

    def __init__(self, engine, device: torch.device, tally=None) -> None:
        self.engine = engine
        self.world = dist.get_world_size()
        self.tally = tally
        # finite-loss sum, finite count, non-finite count, stop votes, share of the squared gradient norm; the tally
        self.sums = torch.zeros(5 + (tally.size if tally is not None else 0), dtype=torch.float64, device=device)
        self.plain_optimizer = engine.optimizer is engine.basic_optimizer
        _check_deepspeed_guards(engine.optimizer)

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self.sums[:3] += torch.stack((torch.where(finite, loss, 0.0), finite.double(), (~finite).double()))

    def count(self, noisy: torch.Tensor, clean: torch.Tensor, flags: torch.Tensor) -> None:
        """Add a micro-batch of mixtures to the tally (on the device: no host sync)."""
        self.sums[5:] += self.tally.of(noisy, clean, flags)

    def reduce(self, stop_requested: bool) -> StepTotals:
        self.sums[3] = float(stop_requested)
        if self.plain_optimizer:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads:
                # Identical on every rank (DeepSpeed's backward all-reduced them): each adds 1/world of it.
                self.sums[4] = torch.nn.utils.get_total_norm(grads).double().square() / self.world
        dist.all_reduce(self.sums)
        values = self.sums.tolist()
        loss_sum, finite, nonfinite, stop, norm_sq = values[:5]
        self.sums.zero_()
        grad_norm = (math.sqrt(norm_sq) if norm_sq >= 0 else math.nan) if self.plain_optimizer else None
        return StepTotals(loss_sum, round(finite), round(nonfinite), round(stop), grad_norm, tuple(values[5:]))


def _check_deepspeed_guards(optimizer) -> None:
    """Refuse the two DeepSpeed settings that would let ZeRO 1–2 apply a step whose gradient norm is not finite."""
    bf16 = getattr(optimizer, "dtype", None) == torch.bfloat16
    if getattr(optimizer, "compute_grad_norm", True) is False:
        setting = "zero_optimization.compute_grad_norm: false"
    elif bf16 and getattr(optimizer, "check_grad_overflow", True) is False:
        setting = "bf16.check_grad_overflow: false"
    else:
        return
    raise ConfigError(f"the DeepSpeed config sets {setting}: DeepSpeed would then apply optimizer steps whose "
                      "gradients are not finite, and NaN would reach the weights; remove that setting")


@contextlib.contextmanager
def _optimizer_update_disabled(engine) -> Iterator[None]:
    base = engine.basic_optimizer
    base.step = lambda *args, **kwargs: None  # an instance attribute shadows the class's step
    try:
        yield
    finally:
        del base.step


def optimizer_step(engine, totals: StepTotals) -> str | None:
    """engine.step() at an accumulation boundary; returns why the step was skipped, or None if it was applied.

    Decided from all-reduced numbers only, so every rank skips alike.
    """
    if totals.nonfinite or (totals.grad_norm is not None and not math.isfinite(totals.grad_norm)):
        with _optimizer_update_disabled(engine):
            engine.step()
        return LOSS if totals.nonfinite else GRADIENT
    engine.step()
    if engine.was_step_applied():
        return None
    return LOSS_SCALE if engine.fp16_enabled() else GRADIENT


def account_step(counters: Counters, epoch: int, step: int, totals: StepTotals, skipped: str | None,
                 max_consecutive: int, log) -> str | None:
    """Count, print and record a skipped step; returns why the run must stop (too many in a row), else None."""
    if skipped is None:
        counters.consecutive_bad = 0
        return None
    counters.skipped_steps += 1
    if skipped == LOSS_SCALE:
        return None  # routine for fp16: DeepSpeed prints the overflow and the new loss scale itself
    counters.nonfinite_steps += 1
    counters.consecutive_bad += 1
    in_row = counters.consecutive_bad
    micro = totals.finite + totals.nonfinite
    detail = (f"{totals.nonfinite} of the step's {micro} micro-batch losses" if skipped == LOSS
              else "the global gradient norm, with finite losses")
    log.print(f"[nonfinite] step {step}: {skipped} ({detail}); step skipped on every rank, weights and "
              f"optimizer state unchanged ({in_row} in a row, train.max_consecutive_nonfinite {max_consecutive})")
    log.log({"kind": "nonfinite", "epoch": epoch + 1, "step": step, "reason": skipped,
             "nonfinite_losses": totals.nonfinite, "micro_batches": micro, "consecutive": in_row})
    if in_row >= max_consecutive:
        return (f"{in_row} consecutive optimizer steps were skipped for a non-finite loss or gradients (the last: "
                f"step {step}, epoch {epoch + 1}, {skipped}); no checkpoint holds any of their effects")
    return None

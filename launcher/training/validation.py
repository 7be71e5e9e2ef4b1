"""Validation: the mean mask loss and SI-SNR of the enhanced signal over the whole validation set, on all ranks, at
the end of every epoch and every `train.valid_interval_steps` optimizer steps."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from model import compute_features, validation_metrics
from model.compile import eager


class Validator:
    def __init__(self, engine, loader, device, input_dtype, interval_steps: int | None, max_epoch: int, watchdog,
                 log) -> None:
        self.engine, self.loader, self.device, self.input_dtype = engine, loader, device, input_dtype
        self.interval_steps, self.max_epoch = interval_steps, max_epoch
        self.watchdog, self.log = watchdog, log

    def release(self) -> None:
        """Drop the loader: its worker processes (persistent ones included) shut down with it."""
        self.loader = None

    @property
    def enabled(self) -> bool:
        return self.loader is not None

    def maybe_validate(self, epoch: int, step: int, samples_seen: int) -> None:
        """After an optimizer step: validate when `train.valid_interval_steps` says so."""
        if self.interval_steps and step % self.interval_steps == 0:
            self.watchdog.slow("validate", step)
            self.validate(epoch, step, samples_seen)
            self.engine.train()

    def validate(self, epoch: int, step: int, samples_seen: int) -> float:
        """The mean mask loss (NaN without a validation list), logged with the SI-SNR and its gain over the input."""
        if self.loader is None:
            return math.nan
        self.engine.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        # Eagerly also where train.compile compiled the model: eval mode, no_grad and another batch size would each
        # compile another graph per region for a pass that runs once per epoch (model/compile.py).
        with torch.no_grad(), eager():
            for noisy, clean, weight in self.loader:  # weight 0 marks EvalSampler's padding
                noisy, clean, weight = (t.to(self.device) for t in (noisy, clean, weight))
                feats = compute_features(noisy, dither=0.0).to(self.input_dtype)
                mask = self.engine(feats).float()
                per_sample, snr, snr_in = validation_metrics(mask, noisy, clean)
                sums += torch.stack([(per_sample * weight).sum(), (snr * weight).sum(), (snr_in * weight).sum(),
                                     weight.sum()]).double()
        dist.all_reduce(sums)
        val_loss, val_snr, in_snr = (sums[:3] / sums[3]).tolist()
        self.log.log({"kind": "valid", "epoch": epoch + 1, "step": step, "samples_seen": samples_seen,
                      "loss": val_loss, "si_snr_db": val_snr, "si_snr_improvement_db": val_snr - in_snr},
                     f"Valid Epoch: {epoch + 1}/{self.max_epoch} Step: {step} | Mask_Loss {val_loss:.4f} | "
                     f"SI-SNR {val_snr:.2f} dB ({val_snr - in_snr:+.2f} dB over noisy)")
        return val_loss

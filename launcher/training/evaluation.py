"""PESQ, STOI, SI-SDR and DNSMOS of whole validation files during training (`train.eval_interval_epochs`).

At the end of every N-th epoch, `train.eval_max_pairs` pairs spread evenly over `data.valid_list` (the same ones
every time) are enhanced whole, as `python -m launcher.evaluate` does, and scored; rank 0 logs the means to
metrics.jsonl and TensorBoard as an `eval` record and prints one line with what it cost. The input's own scores
are computed at the first evaluation only (they do not change) and give the improvement columns.

Each rank copies the current weights into a plain model of its own (gathered from the partitions at ZeRO-3,
fp32 whatever the training precision) and evaluates its share of the batches with no collective at all: shares
of different sizes cannot leave a rank waiting in a ZeRO-3 parameter gather that another rank never joins. The
only collectives are the weight copy and the final gather of the rows, on every rank in the same order.
"""

from __future__ import annotations

import time

import deepspeed
import numpy as np
import torch

from data.validation import validate  # not `from data`: importing data.validate (the CLI) shadows it
from launcher.config import DataSection, TrainSection
from launcher.scoring.batches import SAMPLE_RATE_HZ, Item, assign_batches, plan_batches
from launcher.scoring.results import gather_rows, summarize
from launcher.scoring.score import enhance_and_score
from model import build_model
from model.metrics import NOISY_SUFFIX

GROUPS = ("pesq", "stoi", "si_sdr", "dnsmos")


class TrainingEvaluation:
    """The chosen pairs, this rank's batches of them and a plain model, kept for the run."""

    def __init__(self, d: DataSection, max_pairs: int, metric_workers: int, preset: str, batch_size: int,
                 rank: int, world_size: int, device) -> None:
        # The header cache written when the training validated this list makes this cheap.
        index, _ = validate([d.valid_list], sample_rate_hz=d.sample_rate_hz, resample=d.resample,
                            skip_bad=d.skip_bad, cache_dir=d.cache_dir)
        count = min(max_pairs, len(index))
        chosen = np.unique(np.linspace(0, len(index) - 1, count).round().astype(int))
        self.items = []
        for row, i in enumerate(chosen):
            noisy, clean = index.pair(int(i))
            self.items.append(Item(row, noisy, clean, int(round(float(index.durations[i]) * SAMPLE_RATE_HZ))))
        self.batch_size, self.metric_workers, self.resample = batch_size, metric_workers, d.resample
        self.world_size, self.device = world_size, device
        samples = [item.samples for item in self.items]
        batches = plan_batches(samples, self.batch_size)
        self.mine = [batches[b] for b in assign_batches(batches, samples, world_size)[rank]]
        self.model = build_model(preset).to(device).eval()
        self.noisy_scores: dict[int, dict] | None = None  # row -> the input's values, from the first evaluation

    def _copy_weights(self, engine, zero_stage: int) -> None:
        module = engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=zero_stage == 3):
            state = {k: v.detach() for k, v in module.named_parameters(remove_duplicate=False)}
            state.update({k: v.detach() for k, v in module.named_buffers(remove_duplicate=False)})
            keys = self.model.state_dict().keys()  # persistent buffers only (the rotary caches are not)
            state = {k: v for k, v in state.items() if k in keys}
            with torch.no_grad():
                self.model.load_state_dict(state, strict=True)

    def run(self, engine, zero_stage: int, epoch: int, samples_seen: int, log) -> None:
        t0 = time.perf_counter()
        self._copy_weights(engine, zero_stage)
        first = self.noisy_scores is None
        rows = enhance_and_score(self.model, self.items, self.mine, device=self.device, batch_size=self.batch_size,
                                 metric_workers=self.metric_workers, groups=GROUPS, with_noisy=first,
                                 resample=self.resample)
        merged = gather_rows(rows, self.world_size)
        seconds = time.perf_counter() - t0
        if merged is None:
            return
        if first:
            self.noisy_scores = {r["row"]: {k: v for k, v in r.items() if k.endswith(NOISY_SUFFIX)} for r in merged}
        for r in merged:
            r.update(self.noisy_scores.get(r["row"], {}))
        record = {"kind": "eval", "epoch": epoch + 1, "step": engine.global_steps, "samples_seen": samples_seen,
                  "pairs": len(merged), "seconds": seconds,
                  "pairs_with_notes": sum(1 for r in merged if r.get("notes"))}
        parts = []
        for name, s in summarize(merged, GROUPS).items():
            record[name], record[name + NOISY_SUFFIX], record[f"{name}_improvement"] = \
                s["enhanced"], s["noisy"], s["improvement"]
            if name in ("pesq_wb", "stoi", "si_sdr", "dnsmos_ovrl") and s["enhanced"] is not None:
                gain = s["improvement"]
                parts.append(f"{name} {s['enhanced']:.3f}" + ("" if gain is None else f" ({gain:+.3f})"))
        log.log(record, f"[eval] epoch {epoch + 1} step {record['step']}: {', '.join(parts)} (improvement over "
                        f"noisy) on {len(merged)} whole validation files in {seconds:.1f} s")


class EvaluationSchedule:
    """Evaluates at the end of every `train.eval_interval_epochs`-th epoch (all ranks), building its
    TrainingEvaluation on first use."""

    def __init__(self, d: DataSection, t: TrainSection, preset: str, batch_size: int, rank: int, world_size: int,
                 device, log) -> None:
        self.data, self.train, self.preset, self.batch_size = d, t, preset, batch_size
        self.rank, self.world_size, self.device, self.log = rank, world_size, device, log
        self.evaluation: TrainingEvaluation | None = None

    def maybe_evaluate(self, engine, zero_stage: int, epoch: int, samples_seen: int) -> None:
        interval = self.train.eval_interval_epochs
        if not interval or (epoch + 1) % interval:
            return
        if not self.data.valid_list:
            self.log.print("[eval] train.eval_interval_epochs is set but data.valid_list is not: nothing to evaluate")
            return
        if self.evaluation is None:
            self.evaluation = TrainingEvaluation(self.data, self.train.eval_max_pairs, self.train.eval_metric_workers,
                                                 self.preset, self.batch_size, self.rank, self.world_size, self.device)
        self.evaluation.run(engine, zero_stage, epoch, samples_seen, self.log)

"""The run's own record of which samples each optimizer step used (issue 21's evidence).

bench/chaos_proof.py proves from these records that a run interrupted, resumed and resized any number of times
trained on every sample of every epoch exactly once. Rank 0 writes to metrics.jsonl:

    {"kind": "attempt", "attempt": ID, "step": S0, "resumed_from": {"tag", "attempt"} | null, "world_size",
     "micro_batch", "accumulation_steps", "global_batch", "sampler": CursorSampler.state_dict()}
        once per process start, after resuming and before the first step;
    {"kind": "samples", "attempt": ID, "step": N, "epoch": E, "cursor": [c0, c1], "digest": HEX16, "applied": B}
        once per optimizer step: positions [c0, c1) of epoch E's permutation (1-based E, as the other records),
        the first 16 hex digits of the SHA-256 of those sample indices (little-endian int64, in position order),
        and whether the step changed the weights (a non-finite one did not).

ID is new at every process start; every checkpoint's marker records the ID that wrote it, and a resume names it,
so the records tell the steps a restart rolled back (and re-did) from the ones that count.

The indices come from rank 0's sampler state (every rank's shard is the same permutation, cut by the rule in
data/sampler.py), not from the batches the loader delivered; the per-step losses, equal bit for bit to an
uninterrupted run's on the same world, are the observational check that the data was the same.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import numpy as np


class SampleLedger:
    def __init__(self, sampler, global_batch: int, rank: int, log) -> None:
        self.attempt = uuid.uuid4().hex[:12]  # rank 0's is the one that counts: it alone writes records and markers
        self.sampler, self.global_batch, self.rank, self.log = sampler, global_batch, rank, log
        self._permutation: tuple[int, np.ndarray] | None = None  # (epoch, P_epoch), rank 0

    def start(self, step: int, resumed_from: dict[str, Any] | None, world_size: int, micro_batch: int,
              accumulation_steps: int) -> None:
        self.log.log({"kind": "attempt", "attempt": self.attempt, "step": step, "resumed_from": resumed_from,
                      "world_size": world_size, "micro_batch": micro_batch, "accumulation_steps": accumulation_steps,
                      "global_batch": self.global_batch, "sampler": self.sampler.state_dict()})

    def record_step(self, epoch: int, step: int, applied: bool) -> None:
        """After optimizer step `step` (the sampler's cursor is at its end): the positions it consumed."""
        if self.rank != 0:
            return
        end = self.sampler.cursor
        start = end - self.global_batch  # the cursor moves by micro x world per micro-step: one range per step
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, self.sampler.permutation(epoch))  # O(N) once per epoch, as each rank's rows
        indices = self._permutation[1][start:end].astype("<i8")
        self.log.log({"kind": "samples", "attempt": self.attempt, "step": step, "epoch": epoch + 1,
                      "cursor": [start, end], "digest": hashlib.sha256(indices.tobytes()).hexdigest()[:16],
                      "applied": applied})

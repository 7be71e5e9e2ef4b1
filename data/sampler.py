"""Batch samplers: a resumable training sampler driven by a global data cursor, and an eval sampler."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .errors import DataError

Key = tuple[int, int]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _quantum(micro_batch_size: int, world_size: int, epoch_quantum: int | None) -> int:
    micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
    world_size = _positive_int("world_size", world_size)
    step = micro_batch_size * world_size
    if epoch_quantum is None:
        return step
    quantum = _positive_int("epoch_quantum", epoch_quantum)
    if quantum % step:
        below, above = (quantum // step) * step, (quantum // step + 1) * step
        nearest = f"{below} or {above}" if below else f"{above}"
        raise DataError(
            f"epoch_quantum {quantum} is not a multiple of micro_batch_size x world_size = "
            f"{micro_batch_size} x {world_size} = {step} (the samples one micro-step consumes across all ranks); "
            f"nearest valid: {nearest}"
        )
    return quantum


def batches_per_epoch(num_samples: int, micro_batch_size: int, world_size: int, epoch_quantum: int | None = None) -> int:
    """Micro-batches each rank runs in one full epoch: ``floor(N/Q)·Q / (micro·world)``."""
    quantum = _quantum(micro_batch_size, world_size, epoch_quantum)
    return (num_samples // quantum) * quantum // (micro_batch_size * world_size)


class CursorSampler:
    """Batch sampler for training whose state is a global data cursor, so runs resume mid-epoch exactly.

    Sharding rule. Epoch ``e`` is a permutation ``P_e`` of all ``N`` samples that depends only on
    (seed, e) (identity when ``shuffle=False``). Only its first ``U = floor(N/Q)·Q`` positions are used, ``Q``
    being ``epoch_quantum`` (the global batch: micro × accumulation × world; default micro × world), so every
    epoch is whole optimizer steps and every rank runs the same number of micro-batches; the ``N − U`` samples
    left over change from epoch to epoch. A global cursor ``c`` counts samples consumed by all ranks in this
    epoch; it starts at 0 and moves by ``micro·world`` per micro-step. At cursor ``c`` rank ``r`` takes the
    samples at positions ``[c + r·micro, c + (r+1)·micro)`` of ``P_e``. Keys are ``(sample_index, epoch)``.

    Because the state is ``(epoch, c)`` and not a per-rank position, it means the same thing at any world
    size: resuming with other ranks or micro-batch (any with ``micro·world`` dividing ``c``) continues with
    exactly the samples at positions ``[c, U)`` — the ones not yet consumed. A cursor that the new
    ``micro·world`` does not divide is a DataError (it can only arise from saving mid-accumulation: checkpoint
    at optimizer-step boundaries, where ``c`` is a multiple of ``Q``).

    How the trainer drives it. Iterating (``iter(sampler)``, which ``iter(loader)`` does) snapshots the cursor
    and yields the rest of this epoch; it never moves the cursor, because DataLoader workers prefetch ahead of
    training. The trainer calls ``sampler.advance()`` once per micro-batch it has *consumed* (after
    ``backward``/``step``), on every rank, so ``state_dict()`` always describes consumed data::

        sampler.load_state_dict(ckpt["sampler"])            # or nothing, for a fresh run
        for epoch in range(sampler.epoch, max_epochs):
            if epoch != sampler.epoch:
                sampler.set_epoch(epoch)                    # cursor back to 0
            for noisy, clean in loader:                     # from the cursor to the epoch's end
                ... forward, backward, step ...
                sampler.advance()
                if at_step_boundary and want_checkpoint:
                    save(..., sampler=sampler.state_dict())

    ``len(sampler)`` is the number of micro-batches left for this rank in this epoch (same on all ranks).

    The permutation is numpy's PCG64 shuffle seeded by (seed, epoch); its output has not changed across numpy
    releases so far, and exact resume assumes it does not between saving and resuming.

    Cost: each rank computes the epoch's permutation once (O(N), ~0.5 s for 10 million samples) and keeps
    only its own ``U/world`` indices; nothing loops over ranks, so the per-epoch work does not grow with the
    world size.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 777,
        epoch_quantum: int | None = None,
        shuffle: bool = True,
    ) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.world_size = _positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise DataError(f"rank must be in [0, {self.world_size}) for world_size {self.world_size}, got {rank!r}")
        self.rank = int(rank)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.epoch_quantum = _quantum(self.micro_batch_size, self.world_size, epoch_quantum)
        self.shuffle = bool(shuffle)
        if self.num_samples < self.epoch_quantum:
            raise DataError(
                f"{self.num_samples} samples are fewer than one optimizer step of {self.epoch_quantum} samples "
                f"(epoch_quantum = global batch); an epoch would hold no step. Add data or lower the global batch"
            )
        self.step_samples = self.micro_batch_size * self.world_size
        self.samples_per_epoch = (self.num_samples // self.epoch_quantum) * self.epoch_quantum
        self.epoch = 0
        self.cursor = 0
        self._rows: np.ndarray | None = None
        self._rows_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // self.step_samples

    @property
    def epoch_done(self) -> bool:
        return self.cursor >= self.samples_per_epoch

    def __len__(self) -> int:
        return max(0, self.samples_per_epoch - self.cursor) // self.step_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """``P_epoch``: all sample indices in this epoch's order (int32 below 2**31 samples)."""
        dtype = np.int32 if self.num_samples < 2**31 else np.int64
        order = np.arange(self.num_samples, dtype=dtype)
        if self.shuffle:
            np.random.Generator(np.random.PCG64([self.seed, epoch])).shuffle(order)
        return order

    def _rank_rows(self) -> np.ndarray:
        """This rank's micro-batches of the current epoch, shape (batches_per_epoch, micro)."""
        if self._rows_epoch != self.epoch:
            used = self.permutation(self.epoch)[: self.samples_per_epoch]
            self._rows = used.reshape(-1, self.world_size, self.micro_batch_size)[:, self.rank, :].copy()
            self._rows_epoch = self.epoch
        assert self._rows is not None
        return self._rows

    def __iter__(self) -> Iterator[list[Key]]:
        # Snapshot now, not at the first next(): advance() calls during iteration must not shift it.
        rows, epoch, first = self._rank_rows(), self.epoch, self.cursor // self.step_samples
        return self._batches(rows, epoch, first)

    @staticmethod
    def _batches(rows: np.ndarray, epoch: int, first: int) -> Iterator[list[Key]]:
        for k in range(first, rows.shape[0]):
            yield [(i, epoch) for i in rows[k].tolist()]

    def advance(self, micro_batches: int = 1) -> None:
        """Record that ``micro_batches`` micro-steps (on every rank) have been consumed by training."""
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, (int, np.integer)) or micro_batches < 0:
            raise DataError(f"micro_batches must be an integer >= 0, got {micro_batches!r}")
        cursor = self.cursor + int(micro_batches) * self.step_samples
        if cursor > self.samples_per_epoch:
            raise DataError(
                f"advance({micro_batches}) moves the cursor to {cursor}, past the end of epoch {self.epoch} "
                f"({self.samples_per_epoch} samples); call set_epoch() for the next epoch"
            )
        self.cursor = cursor

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (cursor 0)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise DataError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)
        self.cursor = 0

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "epoch_quantum": self.epoch_quantum,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state, possibly saved at another world size or micro-batch.

        The same data (num_samples), seed and shuffle are required; anything else would make "the samples not
        yet consumed" a different set. A different ``epoch_quantum`` (global batch) is allowed: the epoch's
        used part becomes ``floor(N/Q')·Q'`` of the same permutation, nothing consumed is repeated, and if
        the cursor is already past it the epoch is complete (``len == 0``).
        """
        missing = {"epoch", "cursor", "seed", "num_samples"} - set(state)
        if missing:
            raise DataError(f"sampler state lacks {sorted(missing)}; got keys {sorted(state)}")
        for name, mine in (("num_samples", self.num_samples), ("seed", self.seed), ("shuffle", self.shuffle)):
            if name in state and state[name] != mine:
                raise DataError(
                    f"sampler state was saved with {name}={state[name]!r} but this run has {name}={mine!r}; "
                    "the order of the remaining samples would differ. Resume with the same data list and seed"
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or cursor < 0:
            raise DataError(f"sampler state has a negative epoch or cursor: epoch={epoch}, cursor={cursor}")
        if cursor % self.step_samples:
            raise DataError(
                f"cannot resume at data cursor {cursor}: it is not a multiple of micro_batch_size x world_size = "
                f"{self.micro_batch_size} x {self.world_size} = {self.step_samples}, so the not-yet-consumed samples "
                f"cannot be split into whole micro-batches on {self.world_size} rank(s). The checkpoint was saved "
                f"mid-accumulation; resume with a micro_batch_size x world_size that divides {cursor}, or from a "
                f"checkpoint at an optimizer-step boundary"
            )
        self.epoch, self.cursor = epoch, cursor


class EvalSampler:
    """Batch sampler for validation: every sample exactly once across ranks, same batch count on every rank.

    Rank ``r`` owns samples ``r, r+world, r+2·world, ...`` (no shuffle). Each rank's list is padded to
    ``per_rank = ceil(N/world)`` entries by repeating one of its samples (sample 0 for a rank with none), so
    at most one padding entry per rank; it is cut into micro-batches of ``micro_batch_size``, the last one
    shorter when needed — the same sizes on every rank, which keeps collective operations in the forward pass
    (e.g. ZeRO-3 parameter gathers) in lock-step.

    Keys are ``(sample_index, 0, weight)`` with weight 1.0 for real entries and 0.0 for padding, so with
    :class:`CropDataset` the loader yields ``(noisy, clean, weight)``. The trainer computes a per-sample loss,
    sums ``weight·loss`` and ``weight`` on each rank, all-reduces both sums and divides: the exact mean over
    the N samples. ``num_real`` is this rank's count of weight-1 entries.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, rank: int, world_size: int) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.world_size = _positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise DataError(f"rank must be in [0, {self.world_size}) for world_size {self.world_size}, got {rank!r}")
        self.rank = int(rank)
        self.per_rank = -(-self.num_samples // self.world_size)
        self.num_real = len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return -(-self.per_rank // self.micro_batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int, float]]]:
        real = range(self.rank, self.num_samples, self.world_size)
        filler = real[0] if len(real) else 0
        keys = [(i, 0, 1.0) for i in real] + [(filler, 0, 0.0)] * (self.per_rank - len(real))
        for k in range(0, self.per_rank, self.micro_batch_size):
            yield keys[k : k + self.micro_batch_size]

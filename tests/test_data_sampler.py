"""CursorSampler sharding and resume across world sizes; EvalSampler coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data import CursorSampler, DataError, EvalSampler, batches_per_epoch, build_loader


def ranks(num_samples, micro, world, quantum=None, seed=777):
    return [CursorSampler(num_samples, micro, r, world, seed=seed, epoch_quantum=quantum) for r in range(world)]


def consume(samplers, micro_steps):
    """Run ``micro_steps`` lock-step micro-batches on every rank; returns the keys consumed, in order."""
    iters = [iter(s) for s in samplers]
    taken = []
    for _ in range(micro_steps):
        for it in iters:
            taken.extend(next(it))
        for s in samplers:
            s.advance()
    return taken


def rest_of_epoch(samplers):
    return [key for s in samplers for batch in s for key in batch]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), micro=st.integers(1, 6), world=st.integers(1, 8), accum=st.integers(1, 3),
       epoch=st.integers(0, 3), seed=st.integers(0, 2**32))
def test_shards_are_disjoint_cover_the_used_part_and_have_equal_lengths(n, micro, world, accum, epoch, seed):
    quantum = micro * accum * world
    if n < quantum:
        with pytest.raises(DataError, match="fewer than one optimizer step"):
            CursorSampler(n, micro, 0, world, seed=seed, epoch_quantum=quantum)
        return
    samplers = ranks(n, micro, world, quantum, seed)
    for s in samplers:
        s.set_epoch(epoch)
    shards = [[key for batch in s for key in batch] for s in samplers]
    used = (n // quantum) * quantum
    assert {len(s) for s in samplers} == {batches_per_epoch(n, micro, world, quantum)}
    assert all(len(shard) == used // world for shard in shards)
    flat = [i for shard in shards for i, e in shard]
    assert len(set(flat)) == used  # disjoint
    assert all(e == epoch for shard in shards for _, e in shard)
    assert sorted(flat) == sorted(samplers[0].permutation(epoch)[:used].tolist())  # the used part, exactly
    assert all(len(batch) == micro for s in samplers for batch in s)


def test_epochs_shuffle_differently_and_leftovers_rotate():
    s = CursorSampler(103, 4, 0, 2, seed=1)
    first = [k for b in s for k in b]
    s.set_epoch(1)
    second = [k for b in s for k in b]
    assert [i for i, _ in first] != [i for i, _ in second]
    assert set(s.permutation(0)[96:]) != set(s.permutation(1)[96:])
    unshuffled = CursorSampler(10, 2, 1, 2, shuffle=False)
    assert list(unshuffled) == [[(2, 0), (3, 0)], [(6, 0), (7, 0)]]


def test_iteration_does_not_move_the_cursor_advance_does():
    s = CursorSampler(64, 4, 0, 2)
    assert len(list(s)) == 8 and s.cursor == 0
    it = iter(s)
    prefetched = [next(it) for _ in range(3)]  # workers prefetch ahead of training
    s.advance()
    assert s.state_dict()["cursor"] == 8 and len(s) == 7
    assert next(it) != prefetched[0]  # the live iterator keeps its own snapshot
    assert list(s)[0] == prefetched[1]  # a new iteration starts at the consumed cursor
    s.advance(7)
    assert s.epoch_done and len(s) == 0 and list(s) == []
    with pytest.raises(DataError, match="past the end of epoch"):
        s.advance()
    s.set_epoch(1)
    assert s.cursor == 0 and len(s) == 8


@pytest.mark.parametrize(
    "before, after",
    [((2, 4), (2, 4)), ((2, 4), (4, 2)), ((1, 2), (2, 1)), ((4, 1), (1, 3)), ((3, 2), (1, 6)), ((2, 4), (8, 1))],
)
def test_resume_on_another_world_size_yields_exactly_the_unconsumed_samples(before, after):
    (micro_a, world_a), (micro_b, world_b) = before, after
    quantum = 24  # the same global batch before and after: micro x accumulation x world
    n = 250
    old = ranks(n, micro_a, world_a, quantum)
    for s in old:
        s.set_epoch(3)
    consumed = consume(old, micro_steps=2 * quantum // (micro_a * world_a))  # two optimizer steps
    state = old[0].state_dict()
    assert state == old[-1].state_dict() and state["cursor"] == 48 and state["epoch"] == 3

    new = ranks(n, micro_b, world_b, quantum)
    for s in new:
        s.load_state_dict(state)
    remaining = rest_of_epoch(new)
    perm = old[0].permutation(3)[: (n // quantum) * quantum].tolist()
    assert sorted(i for i, _ in consumed) == sorted(perm[:48])
    assert sorted(i for i, _ in remaining) == sorted(perm[48:])
    assert {e for _, e in remaining} == {3}
    assert len({len(s) for s in new}) == 1


def test_resume_refuses_a_cursor_the_new_world_cannot_split():
    old = ranks(100, 2, 3, 12)
    consume(old, 1)  # mid-accumulation: cursor 6
    new = CursorSampler(100, 2, 0, 2, epoch_quantum=12)
    with pytest.raises(DataError, match="cursor 6: it is not a multiple of micro_batch_size x world_size = 2 x 2 = 4"):
        new.load_state_dict(old[0].state_dict())
    with pytest.raises(DataError, match="num_samples=100 but this run has num_samples=99"):
        CursorSampler(99, 2, 0, 3).load_state_dict(old[0].state_dict())
    with pytest.raises(DataError, match="seed=777 .* seed=1"):
        CursorSampler(100, 2, 0, 3, seed=1).load_state_dict(old[0].state_dict())


def test_another_global_batch_never_repeats_consumed_samples():
    old = ranks(100, 2, 2, 8)
    consumed = {i for i, _ in consume(old, 4)}  # cursor 16
    new = ranks(100, 4, 2, 40)  # the epoch's used part shrinks from 96 to 80 samples
    for s in new:
        s.load_state_dict(old[0].state_dict())
    remaining = {i for i, _ in rest_of_epoch(new)}
    assert not consumed & remaining and len(remaining) == 80 - 16


def test_bad_settings_name_the_numbers():
    with pytest.raises(DataError, match=r"epoch_quantum 10 is not a multiple of .* 2 x 2 = 4.*nearest valid: 8 or 12"):
        CursorSampler(100, 2, 0, 2, epoch_quantum=10)
    with pytest.raises(DataError, match="rank must be in"):
        CursorSampler(100, 2, 2, 2)
    with pytest.raises(DataError, match="micro_batch_size must be a positive integer"):
        CursorSampler(100, 0, 0, 2)
    assert batches_per_epoch(100, 2, 2, 8) == 24 and batches_per_epoch(100, 3, 1) == 33


def test_per_rank_memory_is_its_share():
    s = CursorSampler(1_000_000, 4, 5, 16, seed=3)
    assert len(s) == 1_000_000 // 64
    rows = s._rank_rows()
    assert rows.shape == (1_000_000 // 64, 4) and rows.dtype == np.int32


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), micro=st.integers(1, 5), world=st.integers(1, 7))
def test_eval_sampler_every_sample_once_with_weights(n, micro, world):
    samplers = [EvalSampler(n, micro, r, world) for r in range(world)]
    batches = [list(s) for s in samplers]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(samplers[0])
    assert len({tuple(len(x) for x in b) for b in batches}) == 1  # same batch sizes on every rank
    real = [i for b in batches for batch in b for i, _, w in batch if w == 1.0]
    assert sorted(real) == list(range(n))
    padding = [i for b in batches for batch in b for i, _, w in batch if w == 0.0]
    assert len(padding) <= world and all(0 <= i < n for i in padding)
    assert sum(s.num_real for s in samplers) == n


class _Echo(torch.utils.data.Dataset):
    """Returns its key, so a batch shows which samples it holds."""

    def __len__(self):
        return 60

    def __getitem__(self, key):
        return torch.tensor(key[0]), torch.tensor(key[1])


def test_checkpoint_through_a_prefetching_loader_resumes_exactly():
    sampler = CursorSampler(60, 3, 0, 1, epoch_quantum=6)
    loader = build_loader(_Echo(), sampler, num_workers=1, prefetch_factor=4, persistent_workers=False)
    consumed = []
    for k, (idx, epoch) in enumerate(loader):  # the worker runs up to 4 batches ahead of this loop
        consumed += idx.tolist()
        sampler.advance()
        if k == 5:
            state = sampler.state_dict()  # at an optimizer-step boundary (6 micro-steps x 3 = 18 samples)
            break
    assert state["cursor"] == 18 and len(consumed) == 18
    resumed = CursorSampler(60, 3, 0, 1, epoch_quantum=6)
    resumed.load_state_dict(state)
    rest = [i for idx, _ in build_loader(_Echo(), resumed, num_workers=0) for i in idx.tolist()]
    assert sorted(consumed + rest) == list(range(60)) and not set(consumed) & set(rest)

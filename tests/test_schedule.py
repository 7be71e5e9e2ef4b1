"""The LR schedule: warmup never at 0, the reference's plateau rule, cosine, and its state."""

import pytest

from launcher.training.schedule import LRSchedule


def test_warmup_is_linear_and_never_zero():
    s = LRSchedule(peak_lr=1e-3, warmup_steps=4)
    assert [s.lr(i) for i in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_plateau_halves_on_fifth_bad_epoch_and_stops_on_tenth():
    s = LRSchedule(peak_lr=1e-3)
    actions = [s.end_epoch(1.0)]  # first epoch: a new best
    actions += [s.end_epoch(1.0) for _ in range(10)]  # "not lower than the previous" counts as bad
    assert actions[0] == "improved"
    assert actions[1:5] == ["continue"] * 4
    assert actions[5] == "halve" and s.scale == 0.5 and s.lr(100) == pytest.approx(5e-4)
    assert actions[6:10] == ["continue"] * 4
    assert actions[10] == "stop"


def test_improvement_resets_the_count():
    s = LRSchedule(peak_lr=1e-3)
    for v in [1.0, 1.1, 1.2, 1.3, 1.4]:
        s.end_epoch(v)
    assert s.bad_epochs == 4
    assert s.end_epoch(0.9) == "improved" and s.bad_epochs == 0


def test_a_lower_loss_that_is_not_a_best_still_resets():
    s = LRSchedule(peak_lr=1e-3)
    for v in [1.0, 1.5, 1.4]:
        last = s.end_epoch(v)
    assert last == "continue" and s.bad_epochs == 0 and s.best_val_loss == 1.0


def test_cosine_decays_to_min_ratio():
    s = LRSchedule(peak_lr=1e-3, warmup_steps=10, kind="cosine", total_steps=110, min_lr_ratio=0.1)
    assert s.lr(10) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert s.lr(110) == pytest.approx(1e-4)


def test_state_round_trip():
    a = LRSchedule(peak_lr=1e-3)
    for v in [1.0, 1.2, 1.3]:
        a.end_epoch(v)
    b = LRSchedule(peak_lr=1e-3)
    b.load_state_dict(a.state_dict())
    assert (b.bad_epochs, b.prev_val_loss, b.best_val_loss, b.scale) == (2, 1.3, 1.0, 1.0)


def test_bad_kind():
    with pytest.raises(ValueError, match="plateau, cosine"):
        LRSchedule(peak_lr=1e-3, kind="step")


def test_a_raised_lr_warms_up_from_the_base_lr():
    """Goyal et al.'s gradual warmup: from base_lr (5e-4) to k × base_lr (2e-3) in equal increments."""
    s = LRSchedule(peak_lr=2e-3, warmup_steps=4, warmup_from_lr=5e-4)
    assert [s.lr(i) for i in range(6)] == pytest.approx([8.75e-4, 1.25e-3, 1.625e-3, 2e-3, 2e-3, 2e-3])
    cosine = LRSchedule(peak_lr=2e-3, warmup_steps=4, warmup_from_lr=5e-4, kind="cosine", total_steps=100)
    assert cosine.lr(0) == pytest.approx(8.75e-4) and cosine.lr(4) == pytest.approx(2e-3)


def test_warmup_start_must_lie_between_0_and_the_peak():
    with pytest.raises(ValueError, match="warmup_from_lr 0.002 must be in \\[0, peak_lr 0.001\\]"):
        LRSchedule(peak_lr=1e-3, warmup_steps=4, warmup_from_lr=2e-3)

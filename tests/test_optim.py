"""Learning-rate schedules: MAE's cosine and SimMIM's multi-step (docs/methods.md sections 2, 4)."""

import pytest

from mimaim.engine.optim import cosine_lr, lr_at


def test_lr_at_cosine_is_the_cosine_schedule():
    for epoch in (0.0, 0.5, 2.0, 5.3, 10.0):
        assert lr_at(epoch, 1e-3, 1e-5, 2, 10) == cosine_lr(epoch, 1e-3, 1e-5, 2, 10)


def test_multistep_warms_up_holds_then_drops_at_each_milestone():
    lr = 1e-4
    at = lambda e: lr_at(e, lr, 0.0, 10, 800, schedule="multistep", milestones=(700,), gamma=0.1)
    assert at(0.0) == 0.0
    assert at(5.0) == pytest.approx(lr / 2)  # linear warm-up
    assert at(10.0) == pytest.approx(lr)
    assert at(400.0) == pytest.approx(lr)  # flat peak, no decay before the milestone
    assert at(699.99) == pytest.approx(lr)
    assert at(700.0) == pytest.approx(lr * 0.1)  # bisect_right: the milestone epoch itself is already decayed
    assert at(799.0) == pytest.approx(lr * 0.1)
    two = lambda e: lr_at(e, 1.0, 0.0, 1, 10, schedule="multistep", milestones=(8, 5), gamma=0.5)
    assert [two(e) for e in (4.9, 5.0, 7.9, 8.0)] == pytest.approx([1.0, 0.5, 0.5, 0.25])


def test_multistep_matches_simmim_scheduler_per_step():
    """The same curve as SimMIM's MultiStepLRScheduler (lr_scheduler.py) with warmup_lr_init=0, step units."""
    import bisect
    steps_per_epoch, warm, ms, base = 7, 2, [5, 8], 3e-4
    warm_t, ms_t = warm * steps_per_epoch, [m * steps_per_epoch for m in ms]
    for t in range(10 * steps_per_epoch):
        official = t * base / warm_t if t < warm_t else base * 0.1 ** bisect.bisect_right(ms_t, t)
        ours = lr_at(t / steps_per_epoch, base, 0.0, warm, 10, "multistep", ms, 0.1)
        assert ours == pytest.approx(official, rel=1e-12, abs=1e-15)


def test_schedule_errors_name_the_fix():
    with pytest.raises(ValueError, match="choose one of: cosine, multistep"):
        lr_at(1.0, 1.0, 0.0, 1, 10, schedule="step")
    with pytest.raises(ValueError, match="needs milestones"):
        lr_at(1.0, 1.0, 0.0, 1, 10, schedule="multistep")
    with pytest.raises(ValueError, match="inside the warm-up"):
        lr_at(1.0, 1.0, 0.0, 5, 10, schedule="multistep", milestones=(3,))

"""The scheduler's decisions, driven with synthetic engine costs (no clocks involved)."""

import numpy as np
import pytest

from livecam.pipeline.scheduler import LOWER_AFTER_S, STEP_UP_AFTER_S, Mode, Scheduler

FPS = 30
BUDGET = 1 / FPS


def _drive(scheduler: Scheduler, cost_of, seconds: float, start: float = 0.0) -> float:
    """Feed calls at the pace the current mode implies; returns the end time."""
    now = start
    while now < start + seconds:
        mode = scheduler.mode
        scheduler.observe(mode, cost_of(mode), now=now)
        now += mode.batch * mode.stride / FPS
    return now


def test_fast_engine_stays_at_full_quality():
    s = Scheduler(FPS, ("full", "nearest"), (1, 2, 4), base_delay_s=0.08)
    _drive(s, lambda m: 0.2 * BUDGET, 10)
    assert s.mode == Mode("full", 1, 1)
    assert s.changes <= 1  # the delay was calibrated once from real measurements
    assert 0.08 + 0.2 * BUDGET < s.playout_delay < 0.08 + 0.5 * BUDGET


def test_overload_steps_down_until_it_keeps_up():
    s = Scheduler(FPS, ("full", "nearest"), (1,), base_delay_s=0.08)
    costs = {"full": 3 * BUDGET, "nearest": 1.8 * BUDGET}
    _drive(s, lambda m: costs[m.tier], 10)
    mode = s.mode
    assert costs[mode.tier] * FPS / (mode.batch * mode.stride) <= 0.75
    assert mode.stride in (3, 4)


def test_batching_is_used_when_it_pays():
    s = Scheduler(FPS, ("full",), (1, 2, 4, 8), base_delay_s=0.08)
    _drive(s, lambda m: 0.8 * BUDGET + 0.2 * BUDGET * m.batch, 10)  # a GPU-like cost curve
    assert s.mode.stride == 1 and s.mode.batch > 1


def test_headroom_steps_back_up_only_after_a_calm_period():
    s = Scheduler(FPS, ("full", "nearest"), (1,), base_delay_s=0.08)
    end = _drive(s, lambda m: 3 * BUDGET, 5)  # a load spike
    low = s.mode
    assert low.stride > 1
    end = _drive(s, lambda m: 0.1 * BUDGET, STEP_UP_AFTER_S * 0.5, start=end)
    assert s.mode == low  # hysteresis: not yet
    _drive(s, lambda m: 0.1 * BUDGET, STEP_UP_AFTER_S * 4, start=end)
    assert s.mode == Mode("full", 1, 1)


def test_playout_delay_covers_batch_wait_and_generation_time():
    s = Scheduler(FPS, ("full",), (1, 2, 4, 8), base_delay_s=0.08)
    cost = lambda m: 0.8 * BUDGET + 0.2 * BUDGET * m.batch  # noqa: E731 (batching pays)
    _drive(s, cost, 10)
    mode = s.mode
    assert mode.batch > 1  # so the wait for the batch's last frame is not zero
    wait = (mode.batch - 1) * mode.stride / FPS
    assert s.playout_delay >= 0.08 + wait + cost(mode)
    assert s.playout_delay < 0.08 + wait + 2 * cost(mode)


def test_playout_delay_grows_when_the_engine_slows_in_the_same_mode():
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.08)
    end = _drive(s, lambda m: 0.2 * BUDGET, 3)
    assert s.playout_delay < 0.08 + 0.5 * BUDGET
    _drive(s, lambda m: 0.6 * BUDGET, 3, start=end)  # slower, but no reason to step down
    assert s.mode == Mode("full", 1, 1)
    assert s.playout_delay >= 0.08 + 0.6 * BUDGET  # the generation time is covered again


def test_hopeless_load_keeps_latency_bounded():
    s = Scheduler(FPS, ("full", "tiny"), (1, 2, 4, 8), base_delay_s=0.08)
    _drive(s, lambda m: 0.3 + 0.01 * m.batch, 10)  # 9 frame budgets per call, whatever the mode
    assert s.mode.stride == 6
    assert s.playout_delay < 1.0  # no giant batches that would add seconds of delay


def test_cost_priors_for_unmeasured_tiers_and_batches():
    s = Scheduler(FPS, ("full", "nearest", "tiny"), (1, 2, 4), base_delay_s=0.08,
                  initial_cost_s=0.01)  # fmt: skip
    assert s.cost("full", 1) == 0.01
    assert s.cost("full", 4) == pytest.approx(0.01 * (0.5 + 0.5 * 4))  # half fixed, half per frame
    assert s.cost("nearest", 1) == pytest.approx(0.01 * 0.7)  # a tier down: 0.7 times
    assert s.cost("tiny", 1) == pytest.approx(0.01 * 0.7**2)
    s.observe(Mode("nearest", 1, 2), 0.02, now=0.0)  # the first measurement is taken as is
    assert s.cost("nearest", 2) == 0.02
    assert s.cost("nearest", 4) == pytest.approx(0.02 * (0.5 + 0.5 * 4 / 2))  # from batch 2
    assert s.cost("tiny", 4) == pytest.approx(0.02 * 1.5 * 0.7)  # from the nearest tier
    s.observe(Mode("full", 1, 4), 0.03, now=0.0)
    assert s.cost("full", 2) == pytest.approx(0.01 * 1.5)  # from batch 1, the closest
    s.observe(Mode("full", 1, 1), 0.02, now=0.0)  # later ones: a moving average
    assert s.cost("full", 1) == pytest.approx(0.01 + 0.2 * (0.02 - 0.01))
    assert s.utilisation(Mode("full", 2, 4), 0.06) == pytest.approx(0.06 * FPS / 8)


def test_playout_delay_before_and_after_the_first_measurements():
    s = Scheduler(FPS, ("full",), (1, 2), base_delay_s=0.08, initial_cost_s=0.01)
    assert s.playout_delay == pytest.approx(0.08 + 1.3 * 0.01)  # the estimate, with margin
    changed = [s.observe(Mode("full", 1, 1), 0.004, now=0.0) for _ in range(12)]
    assert changed == [False] * 9 + [True, False, False]  # re-derived at the 10th call
    assert s.changes == 1
    assert s.playout_delay == pytest.approx(0.08 + 1.1 * 0.004)  # p95 of the calls + 10 %
    for _ in range(5):  # slower than the delay allows: derived again
        s.observe(Mode("full", 1, 1), 0.01, now=0.0)
    assert s.changes >= 2 and s.playout_delay > 0.08 + 0.01
    s.mode = Mode("full", 2, 2)
    s._derive_delay()
    assert s.playout_delay - s._allowance == pytest.approx(0.08 + 2 / FPS)  # batch wait


def test_steps_back_up_from_the_first_step_down():
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.05)
    end = _drive(s, lambda m: 1.2 * BUDGET, 3)
    assert s.mode == Mode("full", 2, 1) and s.level == 1
    _drive(s, lambda m: 0.1 * BUDGET, STEP_UP_AFTER_S * 3, start=end)
    assert s.mode == Mode("full", 1, 1) and s.level == 0


def _drive_logged(s: Scheduler, cost_of, seconds: float, start: float = 0.0):
    """Like _drive, and checks observe's answer: True exactly when mode or delay changed."""
    now = start
    while now < start + seconds:
        mode, delay, changes = s.mode, s.playout_delay, s.changes
        changed = s.observe(mode, cost_of(mode), now=now)
        assert changed == (s.mode != mode or s.playout_delay != delay), (mode, s.mode)
        assert s.changes == changes + changed
        now += mode.batch * mode.stride / FPS
    return now


def test_observe_reports_every_change_and_only_changes():
    s = Scheduler(FPS, ("full", "nearest"), (1, 2, 4), base_delay_s=0.08)
    end = _drive_logged(s, lambda m: 0.8 * BUDGET + 0.2 * BUDGET * m.batch, 5)  # batching pays
    assert s.mode.batch > 1 and s.level == 0
    end = _drive_logged(s, lambda m: 3 * BUDGET, 5, start=end)
    _drive_logged(s, lambda m: 0.1 * BUDGET, STEP_UP_AFTER_S * 4, start=end)
    assert s.mode == Mode("full", 1, 1) and s.changes > 3


def test_nothing_keeps_up_the_coarsest_stride_with_the_first_batch():
    s = Scheduler(FPS, ("full", "tiny"), (1, 2, 4, 8), base_delay_s=0.08)
    _drive(s, lambda m: 0.3 + 0.01 * m.batch, 10)
    assert s.mode == Mode("tiny", 6, 1) and s.level == len(s.ladder) - 1


def test_cost_prior_scales_from_the_nearest_measured_batch():
    s = Scheduler(FPS, ("full",), (1, 4, 8), base_delay_s=0.08, initial_cost_s=0.01)
    s.observe(Mode("full", 1, 4), 0.05, now=0.0)
    assert s.cost("full", 8) == pytest.approx(0.05 * (0.5 + 0.5 * 8 / 4))


def test_a_moderate_slowdown_re_derives_the_delay():
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.08, initial_cost_s=0.004)
    for _ in range(10):
        s.observe(Mode("full", 1, 1), 0.004, now=0.0)
    for _ in range(10):
        s.observe(Mode("full", 1, 1), 0.006, now=0.0)  # 1.5 times slower
    assert s.playout_delay > 0.08 + 1.2 * (1.1 * 0.004)  # more than the re-derive threshold


def test_the_delay_follows_the_recent_calls_only():
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.08, initial_cost_s=0.004)
    for _ in range(40):
        s.observe(Mode("full", 1, 1), 0.02, now=0.0)
    for _ in range(28):  # p95 of the last 30 calls: 2 slow and 28 fast ones
        s.observe(Mode("full", 1, 1), 0.001, now=0.0)
    recent = [0.02] * 2 + [0.001] * 28
    assert s._generation_allowance() == pytest.approx(1.1 * np.percentile(recent, 95))


def test_the_delay_comes_down_once_the_calls_are_steadily_faster():
    """Slow first calls (a new connection, cold caches) set the delay; it comes down after
    LOWER_AFTER_S of faster ones, not on a short dip, and not more often than that."""
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.06, initial_cost_s=0.004)
    mode, t0 = Mode("full", 1, 1), 1000.0  # a monotonic clock's time
    for k in range(10):
        s.observe(mode, 0.02, now=t0 + k / FPS)  # calibrated on the slow start
    high = s.playout_delay
    assert high == pytest.approx(0.06 + 1.1 * 0.02)
    for k in range(10, 40):  # a full window of fast calls, but within LOWER_AFTER_S
        s.observe(mode, 0.008, now=t0 + k / FPS)
    assert s.playout_delay == high
    changed = [s.observe(mode, 0.008, now=t0 + LOWER_AFTER_S + k / FPS) for k in range(30)]
    assert changed.count(True) == 1  # once, then it waits again
    assert s.playout_delay == pytest.approx(0.06 + 1.1 * 0.008)
    assert s.mode == mode


def test_a_short_dip_does_not_lower_the_delay():
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.06, initial_cost_s=0.004)
    mode = Mode("full", 1, 1)
    for k in range(10):
        s.observe(mode, 0.02, now=k / FPS)
    high = s.playout_delay
    now = 10 / FPS
    for k in range(300):  # 10 s of calls: dips of 20 fast calls, shorter than the window
        s.observe(mode, 0.008 if k % 30 < 20 else 0.02, now=now + k / FPS)
    assert s.playout_delay == high  # every window's p95 still needs it


def test_a_long_latency_with_little_cost_raises_the_delay_not_the_stride():
    """A remote engine's calls: 5 ms of work, answered a 150 ms round trip later (several in
    flight). The delay covers the round trip; the mode stays at every frame."""
    s = Scheduler(FPS, ("full", "nearest"), (1, 2, 4), base_delay_s=0.08)
    now = 0.0
    while now < 10:
        mode = s.mode
        s.observe(mode, 0.005, now=now, latency=0.15)
        now += mode.batch * mode.stride / FPS
    assert s.mode == Mode("full", 1, 1)
    assert 0.08 + 0.15 <= s.playout_delay <= 0.08 + 0.15 * 1.1 + 1e-9  # p95 plus 10 %
    # as the call's own time, the same 150 ms is far more than a frame: it steps down
    slow = Scheduler(FPS, ("full", "nearest"), (1, 2, 4), base_delay_s=0.08)
    _drive(slow, lambda m: 0.15, 10)
    assert slow.mode.stride > 1

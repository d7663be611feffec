"""The scheduler's decisions, driven with synthetic engine costs (no clocks involved)."""

import itertools

import numpy as np
import pytest

from livecam.pipeline.scheduler import (
    LATENCY_CEILING_S,
    LOWER_AFTER_S,
    SLOWER_AFTER_S,
    STALE_AFTER_MAX_S,
    STALE_AFTER_S,
    STEP_DOWN_AT,
    STEP_UP_AFTER_S,
    STEP_UP_BELOW,
    TARGET_UTILISATION,
    Mode,
    Scheduler,
)

FPS = 30
BUDGET = 1 / FPS


def _modes_over(
    s: Scheduler, cost_of, seconds: float, start: float = 0.0
) -> tuple[list[tuple[float, Mode]], float]:
    """Feed calls at the pace the current mode implies: (time, mode) of each, and the end."""
    calls, now = [], start
    while now < start + seconds:
        mode = s.mode
        calls.append((now, mode))
        s.observe(mode, cost_of(mode), now=now)
        now += mode.batch * mode.stride / FPS
    return calls, now


def _drive(scheduler: Scheduler, cost_of, seconds: float, start: float = 0.0) -> float:
    """_modes_over's end time."""
    return _modes_over(scheduler, cost_of, seconds, start)[1]


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


def test_after_a_load_spike_the_better_tier_is_tried_again():
    """Something else takes the machine for 5 s: the scheduler steps down to the nearest
    tier. Once calm, full quality's cost (measured in the spike) is stale: it is tried again
    STALE_AFTER_S after its last measurement (it was never again, with that cost kept)."""
    s = Scheduler(FPS, ("full", "nearest"), (1,), base_delay_s=0.08)
    spike, end = _modes_over(s, lambda m: 3 * BUDGET if m.tier == "full" else 2 * BUDGET, 5)
    last_full = max(t for t, m in spike if m.tier == "full")
    calm, _ = _modes_over(s, lambda m: 0.1 * BUDGET, 30, end)
    back = next(t for t, m in calm if m == Mode("full", 1, 1))
    assert last_full + STALE_AFTER_S <= back <= last_full + STALE_AFTER_S + STEP_UP_AFTER_S + 1
    assert all(m == Mode("full", 1, 1) for t, m in calm if t >= back)  # and it stays


def _tries(calls: list[tuple[float, Mode]]) -> list[float]:
    """When the full tier was tried again after the nearest."""
    pairs = itertools.pairwise(calls)
    return [t for (_, before), (t, m) in pairs if before.tier == "nearest" != m.tier]


def test_a_tier_still_too_slow_is_tried_less_often_each_time():
    """Full quality takes 1.5 frame times, nearest 0.3 (calm): full is tried again after
    STALE_AFTER_S, then twice as long after each try that found it too slow, up to
    STALE_AFTER_MAX_S; one call each time (its first measurement replaces the prior)."""
    s = Scheduler(FPS, ("full", "nearest"), (1,), base_delay_s=0.08)
    calls, _ = _modes_over(s, lambda m: 1.5 * BUDGET if m.tier == "full" else 0.3 * BUDGET, 500)
    tries = _tries(calls)
    assert STALE_AFTER_S <= tries[0] <= STALE_AFTER_S + STEP_UP_AFTER_S + 1
    periods = [min(STALE_AFTER_S * 2**k, STALE_AFTER_MAX_S) for k in range(1, len(tries))]
    assert periods[-2:] == [STALE_AFTER_MAX_S] * 2  # (the run is long enough to reach the cap)
    for gap, period in zip(np.diff(tries), periods, strict=True):
        assert period <= gap <= period + STEP_UP_AFTER_S + 1
    settled = calls[next(i for i, (_, m) in enumerate(calls) if m.tier == "nearest") :]
    assert sum(1 for _, m in settled if m.tier == "full") == len(tries)  # one call a try


def test_a_try_that_holds_resets_the_wait_for_the_next():
    """Two failed tries (the next would wait 60 s); then full gets cheap and its try holds.
    After the next spike, full is tried again STALE_AFTER_S after it, not 60 s."""
    s = Scheduler(FPS, ("full", "nearest"), (1,), base_delay_s=0.08)
    slow_full = lambda m: 1.5 * BUDGET if m.tier == "full" else 0.3 * BUDGET  # noqa: E731
    calls, end = _modes_over(s, slow_full, 3 * STALE_AFTER_S + 2 * STEP_UP_AFTER_S + 2)
    failed = _tries(calls)
    assert len(failed) == 2
    calls, end = _modes_over(s, lambda m: 0.1 * BUDGET, 5 * STALE_AFTER_S + STEP_UP_AFTER_S, end)
    assert _tries(calls)[0] - failed[-1] >= 4 * STALE_AFTER_S
    assert s.mode == Mode("full", 1, 1)  # and the try held
    spike, end = _modes_over(s, lambda m: 3 * BUDGET if m.tier == "full" else 2 * BUDGET, 5, end)
    last_full = max(t for t, m in spike if m.tier == "full")
    calls, _ = _modes_over(s, slow_full, 30, end)
    assert last_full + STALE_AFTER_S <= _tries(calls)[0] <= last_full + STALE_AFTER_S + 4


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


def test_a_remote_engines_first_call_replaces_the_prior():
    """A call of 4.5 frame times: a remote engine's first reply sets the cost, and the step
    down goes at once to a mode that keeps up (calls at a pace planned on the prior would
    queue at its generator); a local engine's first call is averaged in as any other."""
    local, remote = (Scheduler(FPS, ("full", "tiny"), (1,), base_delay_s=0.08,
                               initial_cost_s=0.01) for _ in range(2))  # fmt: skip
    assert local.observe(Mode("full", 1, 1), 0.15, now=0.0)
    assert remote.observe(Mode("full", 1, 1), 0.15, now=0.0, latency=0.2)
    assert local.cost("full", 1) == pytest.approx(0.01 + 0.2 * (0.15 - 0.01))
    assert local.utilisation(local.mode, 0.15) > 1  # it will step down again
    assert remote.cost("full", 1) == 0.15
    assert remote.utilisation(remote.mode) <= TARGET_UTILISATION  # in one step
    remote.observe(Mode("full", 1, 1), 0.1, now=0.1, latency=0.15)  # later: a moving average
    assert remote.cost("full", 1) == pytest.approx(0.15 + 0.2 * (0.1 - 0.15))


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


def test_a_base_delay_without_room_keeps_the_coarsest_mode_and_reports_no_change():
    """Every mode's predicted delay is over the latency ceiling (base 0.19 s + 1.3 x 10 ms):
    calm calls leave the coarsest stride alone, and observe says so."""
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.19)
    end = _drive(s, lambda m: 2 * BUDGET, 3)
    assert s.mode == Mode("full", 6, 1) and s.level == len(s.ladder) - 1
    _drive_logged(s, lambda m: 0.01, STEP_UP_AFTER_S * 3, start=end)
    assert s.mode == Mode("full", 6, 1)


def test_a_calm_mode_that_a_better_level_could_not_sustain_is_kept():
    """At stride 2 a call of 0.8 frame times is calm (0.4 of the time), but every frame would
    need 0.8 (over the 0.75 target): no step up, and observe reports no change."""
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.05)
    end = _drive(s, lambda m: 1.2 * BUDGET, 3)
    assert s.mode == Mode("full", 2, 1)
    _drive_logged(s, lambda m: 0.8 * BUDGET, STEP_UP_AFTER_S * 3, start=end)
    assert s.mode == Mode("full", 2, 1)


def test_a_faster_engine_gives_up_batching_after_a_calm_period():
    s = Scheduler(FPS, ("full",), (1, 2, 4), base_delay_s=0.08)
    end = _drive(s, lambda m: 0.8 * BUDGET + 0.2 * BUDGET * m.batch, 5)  # batching pays
    assert s.level == 0 and s.mode.batch > 1
    for _ in range(3):  # batch-1 calls still in flight at the switch: the engine got faster
        s.observe(Mode("full", 1, 1), 0.2 * BUDGET, now=end)
    assert s.mode.batch > 1  # not at once
    _drive(s, lambda m: 0.2 * BUDGET * m.batch, STEP_UP_AFTER_S * 3, start=end)
    assert s.mode == Mode("full", 1, 1)  # batch 1 keeps up again: no batch wait


@pytest.mark.parametrize("base", [0.02, 0.033])  # 0.033: batch 2 exactly at the ceiling
def test_nothing_keeps_up_the_least_loaded_batch_under_the_latency_ceiling(base):
    """120 fps, stride 6: batch 1 loads the generator 1.2 times, batch 2 0.9 times; both are
    within the latency ceiling, so batch 2, the least overloaded, is kept."""
    fps, cost = 120, {1: 0.06, 2: 0.09}
    s = Scheduler(fps, ("full",), (1, 2), base_delay_s=base)
    assert base + 6 / fps + 1.3 * cost[2] <= 0.2  # batch 2's predicted delay
    now = 0.0
    for _ in range(300):
        mode = s.mode
        s.observe(mode, cost[mode.batch], now=now)
        now += mode.batch * mode.stride / fps
    assert s.mode == Mode("full", 6, 2)


def test_a_step_down_never_moves_up_the_ladder():
    """A late call of the previous mode makes full quality look affordable again; a step down
    from the current mode still goes down (going up waits for a calm period)."""
    s = Scheduler(FPS, ("full", "nearest"), (1,), base_delay_s=0.08)
    _drive(s, lambda m: 1.5 * BUDGET if m.tier == "full" else 0.5 * BUDGET, 1)
    assert s.mode == Mode("nearest", 1, 1) and s.level == 1
    assert not s.observe(Mode("full", 1, 1), 0.1 * BUDGET, now=1.0)  # now under the target
    assert s.observe(s.mode, 2 * BUDGET, now=1.1)  # the current mode falls behind
    assert s.level > 1 and s.mode.stride > 1


# The thresholds themselves. At 32 fps (a power of two) a call of x / 32 s loads the generator
# exactly x, so each test can sit exactly on a threshold.
FPS2 = 32


def test_a_generator_at_exactly_the_step_down_load_keeps_its_mode():
    s = Scheduler(FPS2, ("full",), (1, 2), base_delay_s=0.08, initial_cost_s=STEP_DOWN_AT / FPS2)
    changed = [s.observe(s.mode, STEP_DOWN_AT / FPS2, now=k / FPS2) for k in range(60)]
    assert s.mode == Mode("full", 1, 1) and changed.count(True) == 1  # the calibration only


def test_one_slow_call_does_not_step_down_from_a_mode_estimated_at_the_target_load():
    s = Scheduler(FPS2, ("full",), (1, 2), base_delay_s=0.08,
                  initial_cost_s=TARGET_UTILISATION / FPS2)  # fmt: skip
    assert not s.observe(Mode("full", 1, 2), 0.04, now=0.0)  # a late call of another mode
    assert s.mode == Mode("full", 1, 1)


def test_a_mode_exactly_at_the_target_load_and_the_latency_ceiling_is_planned():
    cost = TARGET_UTILISATION / FPS2
    base = LATENCY_CEILING_S - 1.3 * cost
    s = Scheduler(FPS2, ("full",), (1, 2), base_delay_s=base, initial_cost_s=cost)
    assert base + 1.3 * cost == LATENCY_CEILING_S
    assert s._plan(0) == Mode("full", 1, 1)  # not batch 2, not the next stride


def test_steps_up_exactly_when_the_calm_period_is_over():
    """Calls of one frame time step down to stride 2 at once (load 0.5 there: not calm); from
    the first call of 0.1 frame times (load 0.41 with the moving average) the generator is
    calm, and it steps up at the first call STEP_UP_AFTER_S later."""
    s = Scheduler(FPS2, ("full",), (1,), base_delay_s=0.05, initial_cost_s=1 / FPS2)
    now, calm_from, stepped_at = 0.0, None, None
    while stepped_at is None and now < 20:
        mode = s.mode
        if now >= 2 and calm_from is None:
            calm_from = now
        s.observe(mode, (0.1 if calm_from is not None else 1) / FPS2, now=now)
        if s.mode == Mode("full", 2, 1):
            assert s.utilisation(s.mode) >= STEP_UP_BELOW or calm_from is not None
        elif s.mode == Mode("full", 1, 1) and now > 0:
            stepped_at = now
        now += mode.batch * mode.stride / FPS2  # sums of 1/32 s: exact
    assert stepped_at == calm_from + STEP_UP_AFTER_S


def test_a_load_of_exactly_the_step_up_threshold_is_not_calm():
    """Full quality overloads, nearest runs at exactly STEP_UP_BELOW; late full calls make full
    look affordable, but the generator is not calm: no step up, however long."""
    s = Scheduler(FPS2, ("full", "nearest"), (1,), base_delay_s=0.08)
    now = 0.0
    while s.mode.tier == "full":
        s.observe(s.mode, 1.5 / FPS2, now=now)
        now += 1 / FPS2
    assert s.mode == Mode("nearest", 1, 1)
    for _ in range(3):
        s.observe(Mode("full", 1, 1), 0.1 / FPS2, now=now)
    assert s._plan(0) == Mode("full", 1, 1)  # affordable now
    for k in range(320):  # 10 s
        s.observe(s.mode, STEP_UP_BELOW / FPS2, now=now + k / FPS2)
        assert s.mode == Mode("nearest", 1, 1)


def _calibrated_on(seconds: float) -> tuple[Scheduler, Mode, float]:
    """One tier and batch 1, its delay derived at time 0 from ten calls of `seconds` each:
    the scheduler, its mode and that delay."""
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.06, initial_cost_s=0.004)
    mode = Mode("full", 1, 1)
    for _ in range(10):
        s.observe(mode, seconds, now=0.0)
    return s, mode, s.playout_delay


def test_the_delay_comes_down_exactly_lower_after_s_after_it_was_derived():
    s, mode, high = _calibrated_on(0.02)  # derived at 0.0
    for _ in range(30):
        s.observe(mode, 0.008, now=1.0)  # a full window of fast calls, too soon
    assert s.playout_delay == high
    assert s.observe(mode, 0.008, now=LOWER_AFTER_S)
    assert s.playout_delay == pytest.approx(0.06 + 1.1 * 0.008)


def test_a_window_needing_exactly_the_lowering_share_keeps_the_delay():
    """Calibrated on 20 ms calls; 16 ms calls need exactly 0.8 (LOWER_BELOW) of that."""
    s, mode, high = _calibrated_on(0.02)  # derived at 0.0
    assert 1.1 * 0.016 == 0.8 * (1.1 * 0.02)  # exact in floating point
    for k in range(60):
        s.observe(mode, 0.016, now=LOWER_AFTER_S + k / FPS)
    assert s.playout_delay == high


def test_a_slowdown_of_exactly_the_re_derive_share_keeps_the_delay():
    """Calibrated on 20 ms calls; 24 ms calls need exactly 1.2 times that: not more."""
    s, mode, high = _calibrated_on(0.02)  # derived at 0.0
    assert 1.1 * 0.024 == 1.2 * (1.1 * 0.02)  # exact in floating point
    changed = [s.observe(mode, 0.024, now=k / FPS) for k in range(20)]
    assert not any(changed) and s.playout_delay == high


def test_a_failed_step_up_starts_the_next_calm_period():
    """A base delay of 0.19 s leaves room under the latency ceiling only for calls under
    7.7 ms: the coarsest stride at once, calm from the next call. The attempt 3 s later finds
    nothing (10 ms calls); calls of 2 ms from 4 s make full quality fit, and the next attempt
    comes 3 s after the failed one."""
    s = Scheduler(FPS2, ("full",), (1,), base_delay_s=0.19, initial_cost_s=1 / FPS2)
    s.observe(s.mode, 1 / FPS2, now=0.0)
    assert s.mode == Mode("full", 6, 1)
    now, calm_from = 1 / FPS2, 1 / FPS2
    while s.mode.stride == 6 and now < 20:
        s.observe(s.mode, 0.01 if now < 4 else 0.002, now=now)
        now += 6 / FPS2  # exact
    assert s.mode == Mode("full", 1, 1)
    assert now - 6 / FPS2 == calm_from + 2 * STEP_UP_AFTER_S


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


def _round_trips(seconds: float, held_every: int = 0, rng_seed: int = 1) -> list[float]:
    """A remote engine's round trips over a 100 +- 20 ms network, 30 calls a second; with
    `held_every`, every so many calls a lost packet holds up four in a row (+ 150..90 ms)."""
    rng = np.random.default_rng(rng_seed)
    trips = list(0.13 + rng.uniform(-0.02, 0.02, int(seconds * FPS)))
    for start in range(held_every // 2, len(trips) - 4, held_every or len(trips)):
        for i, extra in enumerate((0.15, 0.13, 0.11, 0.09)):
            trips[start + i] += extra
    return trips


def _drive_round_trips(s: Scheduler, trips: list[float], start: float = 0.0) -> float:
    for k, trip in enumerate(trips):
        s.observe(s.mode, 0.005, now=start + k / FPS, latency=trip)
    return start + len(trips) / FPS


def test_round_trips_a_lost_packet_held_up_are_not_covered_by_the_delay():
    """At 1 % loss one call in seven or eight waits for a resent packet; the delay covers the
    usual round trips (p95 and 10 %) and not those, whose frames come late instead."""
    trips = _round_trips(10, held_every=30)  # 4 of every 30 calls held up: 13 %
    s = Scheduler(FPS, ("full", "nearest"), (1, 2, 4), base_delay_s=0.08)
    _drive_round_trips(s, trips)
    usual = 0.13 + 0.02
    assert s.mode == Mode("full", 1, 1)
    assert 0.08 + 0.13 < s.playout_delay <= 0.08 + 1.1 * usual + 1e-9


def test_a_network_that_got_slower_is_covered_after_slower_after_s():
    """Every round trip held up for a second and a half (retransmission timeouts on both
    connections, the replies behind them draining; a stalled hop): not covered. For
    SLOWER_AFTER_S without a break: the network itself got slower."""
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.08)
    now = _drive_round_trips(s, _round_trips(10, held_every=30))
    low = s.playout_delay
    slower = [t + 0.15 for t in _round_trips(SLOWER_AFTER_S + 1, rng_seed=2)]  # 250-300 ms
    held = int((SLOWER_AFTER_S - 0.5) * FPS)
    now = _drive_round_trips(s, slower[:held], start=now)
    assert s.playout_delay == low < 0.08 + 0.2
    _drive_round_trips(s, slower[held:], start=now)
    assert s.playout_delay >= 0.08 + 0.28


def test_round_trips_later_by_less_than_a_frame_are_covered_whatever_their_spread():
    """All round trips alike but one in ten 25 ms later (under a frame): no spread to speak
    of, yet those are jitter, not a lost packet's wait: the delay covers them."""
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.08)
    _drive_round_trips(s, [0.035 if k % 10 == 9 else 0.010 for k in range(300)])
    assert s.playout_delay >= 0.08 + 0.035


def test_the_margin_on_round_trips_is_on_their_jitter_not_on_the_path():
    """A 100 ms path with up to 20 ms of jitter: the delay covers the p95 and 10 % of what
    exceeds the fastest round trip (10 % of the whole would add 10 ms for the path)."""
    s = Scheduler(FPS, ("full",), (1,), base_delay_s=0.08)
    _drive_round_trips(s, [0.1 + 0.02 * (k % 2) for k in range(60)])
    assert s.playout_delay == pytest.approx(0.08 + 0.1 + 1.1 * 0.02)


def _remote(fps: int = 32) -> Scheduler:
    return Scheduler(fps, ("full",), (1,), base_delay_s=0.0625)


def _trip(s: Scheduler, latency: float, now: float) -> None:
    s.observe(s.mode, 0.005, now=now, latency=latency)


def test_a_round_trip_a_frame_over_the_usual_is_jitter_and_one_later_is_held_up():
    """The edges, in exact binary fractions (32 fps): over the median by exactly a frame is
    covered; by a frame and a half, held up (the spread of identical round trips is 0)."""
    s = _remote()
    for k in range(20):
        _trip(s, 0.125, k / 32)
    _trip(s, 0.125 + 1 / 32, 20 / 32)
    assert s._held_since is None and max(s._covered()) == 0.125 + 1 / 32
    _trip(s, 0.125 + 1.5 / 32, 21 / 32)
    assert s._held_since == 21 / 32 and max(s._covered()) == 0.125 + 1 / 32


def test_the_network_counts_as_slower_exactly_slower_after_s_into_a_hold_up():
    s = _remote()
    for k in range(20):
        _trip(s, 0.125, k / 32)
    _trip(s, 0.5, 1.0)
    _trip(s, 0.5, 1.0 + SLOWER_AFTER_S - 1 / 32)
    assert not s._slower
    _trip(s, 0.5, 1.0 + SLOWER_AFTER_S)
    assert s._slower


def test_with_half_the_recent_calls_held_up_the_allowance_stays_as_it_is():
    """Held-up calls are left out of the allowance; while fewer than half of the mode's calls
    are, it follows the others; from half on (a mode just switched to: its window is short,
    while the usual round trip is known from before), the few others tell nothing and it
    stays as it is."""
    s = _remote()
    for k in range(300):
        _trip(s, 0.125, k / 32)
    s._switch(1, Mode("full", 2, 1))
    for k in range(300, 316):
        _trip(s, 0.125, k / 32)
    for k in range(316, 331):  # 15 of the mode's 31 calls held up, for under SLOWER_AFTER_S
        _trip(s, 0.5, k / 32)
    s._allowance = kept = 0.0625
    assert s._generation_allowance() == pytest.approx(0.125)
    _trip(s, 0.5, 331 / 32)  # 16 of 32
    assert s._generation_allowance() == kept


def test_the_delay_covers_the_p95_of_10_s_of_round_trips_not_of_the_last_second():
    """Round trips of 10 ms, three of every 100 in a row 25 ms (jitter: under a frame later).
    In 300 of them (10 s) those are 3 %: the delay stays on the 10 ms. In the last 30 (a
    local engine's window) they would be its p95 whenever they were among them, and the
    delay would rise for each. A network that got slower (20 ms from then on) is covered
    within a second."""
    s = _remote()
    trips = [0.025 if k % 100 >= 97 else 0.010 for k in range(600)]
    for k, trip in enumerate(trips):
        _trip(s, trip, k / 32)
        if k >= 9:  # calibrated on the first 10
            assert s.playout_delay == pytest.approx(0.0625 + 0.010)
    for k in range(600, 632):
        _trip(s, 0.020, k / 32)
    assert s.playout_delay >= 0.0625 + 0.020


def test_a_delay_set_by_slow_first_round_trips_comes_down_before_300_are_in():
    """A new connection's first calls are slow (cold caches): the delay they set comes down
    LOWER_AFTER_S after it was derived, as a local engine's does, not only once 10 s of round
    trips are in (3 of the 170 by then: their p95 no longer needs it)."""
    s = _remote()
    for k in range(10):  # derived at the 10th call, 9/32 s
        _trip(s, 0.030 if k < 3 else 0.010, k / 32)
    high = s.playout_delay
    assert high == pytest.approx(0.0625 + 0.010 + 1.1 * 0.020)  # the fastest and 110 % more
    for k in range(10, 169):
        _trip(s, 0.010, k / 32)
    assert s.playout_delay == high
    _trip(s, 0.010, 169 / 32)  # LOWER_AFTER_S after 9/32 s
    assert s.playout_delay == pytest.approx(0.0625 + 0.010)


def test_the_round_trips_that_tell_what_is_usual_are_the_last_300():
    s = _remote()
    for k in range(400):
        _trip(s, 0.125 if k < 100 else 0.25, k / 32)
    assert list(s._round_trips) == [0.25] * 300

"""Adaptive generation: picks quality tier, stride and batch so the generator keeps up.

A mode is (tier, stride, batch): generate every `stride`-th frame, `batch` frames per engine
call, with the engine at `tier`. The scheduler keeps a moving estimate of each call's cost,
and the predicted utilisation of a mode is cost / (time the batch covers on the camera). It
steps down the quality ladder quickly when the generator falls behind and back up slowly
when there is headroom (hysteresis), and derives the playout delay from the active mode. On
a step up, costs measured STALE_AFTER_S ago or more are estimated afresh: measured in a load
spike, they would keep the better modes out of reach for good. A mode tried that way and
found still too slow waits twice as long for its next try (up to STALE_AFTER_MAX_S): each try
costs a late call.

The delay covers the p95 of the recent calls: a local engine's last 30, a remote engine's
last 300 round trips (10 s at 30 calls a second: the p95 of one second's 30 is their second
slowest, and a delay that chased each second's worst would ride well above what the calls
need). It leaves out a remote engine's calls that a lost packet held up: over TCP a lost
packet holds up every reply behind it until it is resent (a round trip or more), at 1 % loss
one call in seven or eight. Covering those would add that round trip to every frame's
latency; instead their frames come late and the camera shows the mouth before them (counted
on the dashboard), as a jitter buffer conceals a lost packet.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import numpy as np

STRIDES = (1, 2, 3, 4, 6)
TARGET_UTILISATION = 0.75  # plan modes to use at most this share of the frame time
STEP_DOWN_AT = 0.95  # measured utilisation above this: the generator is falling behind
STEP_UP_BELOW = 0.45  # below this for STEP_UP_AFTER_S: try the next better mode
STEP_UP_AFTER_S = 3.0
EWMA = 0.2  # weight of the newest cost measurement
TIER_PRIOR = 0.7  # an unmeasured tier is assumed this much cheaper than the one above it
RECENT_CALLS = 30  # a local engine's calls the delay covers (a second at 30 calls a second)
BATCH_OVERHEAD_PRIOR = 0.5  # an unmeasured batch size: assume this share of a call is fixed
LATENCY_CEILING_S = 0.2  # prefer a coarser stride to a batch that delays more than this
RECALIBRATE_AFTER = 10  # calls in a mode before its measured p95 may raise the playout delay
LOWER_AFTER_S = 5.0  # a delay the calls no longer need comes down at most this often
LOWER_BELOW = 0.8  # ... when the recent calls (30 or more) need less than this share of it
HELD_UP_SPREADS = 3.5  # a round trip this many robust spreads over the median: a loss held it
ROUND_TRIPS = 300  # round trips the delay covers, and that tell what is usual (10 s at 30/s)
SLOWER_AFTER_S = 2.0  # held up this long without a break: the network got slower, not lossy
STALE_AFTER_S = 15.0  # a cost not measured for this long is estimated afresh on a step up
STALE_AFTER_MAX_S = 120.0  # ... doubled after each try that found it still too slow, up to this


@dataclass(frozen=True)
class Mode:
    tier: str
    stride: int
    batch: int


class Scheduler:
    def __init__(
        self,
        fps: float,
        tiers: tuple[str, ...],
        batch_sizes: tuple[int, ...],
        base_delay_s: float,
        initial_cost_s: float = 0.01,
    ) -> None:
        self.fps = fps
        self.tiers = tiers
        self.batch_sizes = batch_sizes
        self.base_delay_s = base_delay_s
        self.ladder = [(tier, stride) for stride in STRIDES for tier in tiers]
        self.level = 0
        self._cost: dict[tuple[str, int], float] = {(tiers[0], batch_sizes[0]): initial_cost_s}
        self._measured_at: dict[tuple[str, int], float] = {}  # each cost's last measurement
        self._stale_after: dict[tuple[str, int], float] = {}  # doubled for each failed try
        self._trying: tuple[tuple[str, int], float] | None = None  # a step up to a fresh cost, when
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_CALLS)
        # a remote engine's round trips, over a longer window: its usual ones
        self._round_trips: collections.deque[float] = collections.deque(maxlen=ROUND_TRIPS)
        self._held_since: float | None = None  # since when every round trip was held up
        self._slower = False  # ... for SLOWER_AFTER_S or more
        self._calm_since: float | None = None
        self.mode = Mode(tiers[0], 1, batch_sizes[0])
        self.changes = 0  # mode or delay changes so far (what observe reported True for)
        self._derived_at: float | None = None  # when the delay was last re-derived by a call
        self._derive_delay()

    # -- cost model ---------------------------------------------------------------------------
    def cost(self, tier: str, batch: int) -> float:
        """Estimated seconds per engine call. Unmeasured: a batch is assumed half fixed cost,
        a lower tier TIER_PRIOR times cheaper than the nearest measured one."""
        if (tier, batch) in self._cost:
            return self._cost[(tier, batch)]
        rank = self.tiers.index
        source = min({t for t, _ in self._cost}, key=lambda t: abs(rank(t) - rank(tier)))
        known = [(b, c) for (t, b), c in self._cost.items() if t == source]
        b0, c0 = min(known, key=lambda bc: abs(bc[0] - batch))
        scale = BATCH_OVERHEAD_PRIOR + (1 - BATCH_OVERHEAD_PRIOR) * batch / b0
        return c0 * scale * TIER_PRIOR ** (rank(tier) - rank(source))

    def utilisation(self, mode: Mode, cost: float | None = None) -> float:
        cost = self.cost(mode.tier, mode.batch) if cost is None else cost
        return cost * self.fps / (mode.batch * mode.stride)

    def _generation_allowance(self) -> float:
        """p95 of the mode's recent calls and 10 %, or its estimated cost before there are
        any. Of round trips, 10 % of what exceeds the fastest: the path's own delay is the
        same for every call and needs no margin."""
        estimate = self.cost(self.mode.tier, self.mode.batch)
        if len(self._recent) < RECALIBRATE_AFTER:
            return estimate * 1.3
        covered = self._covered()
        if 2 * len(covered) <= len(self._recent):  # most held up, not for SLOWER_AFTER_S yet
            return self._allowance  # (the few others tell nothing: it stays as it is)
        p95 = float(np.percentile(covered, 95))
        floor = float(covered.min()) if self._round_trips else 0.0
        return floor + (p95 - floor) * 1.1

    def _covered(self) -> np.ndarray:
        """The recent calls the delay covers: all of them, but of round trips those that no
        lost packet held up, unless every call has been held up for SLOWER_AFTER_S (a loss
        is over sooner: the network itself got slower)."""
        values = np.array(self._recent)
        if not self._round_trips or self._slower:
            return values
        return values[values <= self._held_up_above()]

    def _held_up_above(self) -> float:
        """Held up: later than the usual round trip (the median of the longer window) by
        more than HELD_UP_SPREADS robust spreads (MAD) and more than a frame (less is
        jitter, whatever the spread)."""
        usual = np.array(self._round_trips)
        median = np.median(usual)
        spread = 1.4826 * np.median(np.abs(usual - median))  # sigma, were it normal
        return float(median + max(HELD_UP_SPREADS * spread, 1 / self.fps))

    def _note_round_trip(self, latency: float, now: float) -> None:
        self._round_trips.append(latency)
        if latency <= self._held_up_above():
            self._held_since = None
        elif self._held_since is None:
            self._held_since = now
        self._slower = self._held_since is not None and now - self._held_since >= SLOWER_AFTER_S

    def _batch_wait(self, mode: Mode) -> float:
        """How long the audio of a batch's last frame arrives after its first frame's."""
        return (mode.batch - 1) * mode.stride / self.fps

    def _derive_delay(self) -> None:
        """Audio of a batch's last frame must arrive, then the batch must be generated."""
        self._allowance = self._generation_allowance()
        self.playout_delay = self.base_delay_s + self._batch_wait(self.mode) + self._allowance

    def _needs_less(self, now: float) -> bool:
        """A window's worth of calls (a local engine's whole window) fits well inside the
        allowance, and the last re-derivation is long enough ago: the first calls (a new
        connection, cold caches) often set it."""
        return (
            len(self._recent) >= RECENT_CALLS
            and self._derived_at is not None
            and now - self._derived_at >= LOWER_AFTER_S
            and self._generation_allowance() < LOWER_BELOW * self._allowance
        )

    def _predicted_delay(self, mode: Mode) -> float:
        return self.base_delay_s + self._batch_wait(mode) + 1.3 * self.cost(mode.tier, mode.batch)

    def _plan(self, level: int) -> Mode | None:
        """The lowest-latency batch that keeps the ladder level under the target load and
        under the latency ceiling."""
        tier, stride = self.ladder[level]
        for batch in self.batch_sizes:
            mode = Mode(tier, stride, batch)
            if self.utilisation(mode) <= TARGET_UTILISATION:
                return mode if self._predicted_delay(mode) <= LATENCY_CEILING_S else None
        return None

    # -- feedback -----------------------------------------------------------------------------
    def observe(
        self, mode: Mode, seconds: float, now: float | None = None, latency: float | None = None
    ) -> bool:
        """Record one engine call: `seconds` of the generator's own time, and the `latency`
        from asking to faces where that is longer (a remote call: the round trip, while later
        calls go out meanwhile). The cost sets the mode; the latency, the playout delay.
        Returns True when the mode (and playout delay) changed."""
        key = (mode.tier, mode.batch)
        first_round_trip = latency is not None and self._recent.maxlen != ROUND_TRIPS
        # a remote engine's first call replaces the prior outright: calls sent at a pace
        # planned on a low estimate queue at its generator and hold up every later reply
        # (a local engine's only skip frames, and its first call may be a cold outlier)
        old = seconds if first_round_trip else self._cost.get(key, seconds)
        self._cost[key] = old + EWMA * (seconds - old)
        now = time.monotonic() if now is None else now
        self._measured_at[key] = now
        if self._trying and now - self._trying[1] >= STALE_AFTER_S:  # the try held
            self._stale_after.pop(self._trying[0], None)
            self._trying = None
        if latency is not None:
            if first_round_trip:
                self._recent = collections.deque(maxlen=ROUND_TRIPS)
            self._note_round_trip(latency, now)
        self._recent.append(seconds if latency is None else latency)
        if (
            len(self._recent) == RECALIBRATE_AFTER
            or (
                len(self._recent) > RECALIBRATE_AFTER
                and self._generation_allowance() > 1.2 * self._allowance
            )
            or self._needs_less(now)
        ):  # the first real measurements, slower than the delay allows, or steadily faster
            self._derive_delay()
            self._derived_at = now
            self.changes += 1
            return True
        measured = self.utilisation(self.mode, seconds)
        if measured > STEP_DOWN_AT and self.utilisation(self.mode) > TARGET_UTILISATION:
            return self._step_down()
        if self.utilisation(self.mode) < STEP_UP_BELOW:
            self._calm_since = self._calm_since or now
            if now - self._calm_since >= STEP_UP_AFTER_S:
                self._calm_since = now
                return self._step_up(now)
        else:
            self._calm_since = None
        return False

    def _step_down(self) -> bool:
        key = (self.mode.tier, self.mode.batch)
        if self._trying and self._trying[0] == key:  # still too slow: try it less often
            period = self._stale_after.get(key, STALE_AFTER_S)
            self._stale_after[key] = min(2 * period, STALE_AFTER_MAX_S)
        for level in range(self.level, len(self.ladder)):
            mode = self._plan(level)
            if mode is not None and mode != self.mode:
                return self._switch(level, mode)
        # nothing keeps up: the coarsest stride, with the least loaded batch that stays under
        # the latency ceiling (the camera keeps its rate with repeated frames either way)
        last = len(self.ladder) - 1
        tier, stride = self.ladder[last]
        modes = [Mode(tier, stride, batch) for batch in self.batch_sizes]
        bounded = [m for m in modes if self._predicted_delay(m) <= LATENCY_CEILING_S]
        return self._switch(last, min(bounded or modes[:1], key=self.utilisation))

    def _step_up(self, now: float) -> bool:
        if self.level == 0 and self.mode.batch == self.batch_sizes[0]:
            return False
        self._forget_stale(now)
        for level in range(self.level + 1):
            mode = self._plan(level)
            if mode is not None:
                unmeasured = (mode.tier, mode.batch) not in self._cost
                switched = self._switch(level, mode)  # False when it is the current mode
                if switched and unmeasured:
                    self._trying = ((mode.tier, mode.batch), now)
                return switched
        return False

    def _forget_stale(self, now: float) -> None:
        """Costs last measured STALE_AFTER_S ago or more (a load spike that made the
        scheduler step away from them) are estimated afresh from the current mode's, so a
        calm generator tries them again; where they are still too slow, it steps down again
        and tries no sooner than twice that long after (then four times, up to
        STALE_AFTER_MAX_S), until a try holds for STALE_AFTER_S."""
        current = (self.mode.tier, self.mode.batch)
        if current not in self._measured_at:  # nothing fresh to estimate them from
            return
        for key, at in list(self._measured_at.items()):
            if key != current and now - at >= self._stale_after.get(key, STALE_AFTER_S):
                del self._cost[key], self._measured_at[key]

    def _switch(self, level: int, mode: Mode) -> bool:
        if mode == self.mode:
            return False
        self.level, self.mode = level, mode
        self._trying = None
        self._recent.clear()
        self._derive_delay()
        self.changes += 1
        return True

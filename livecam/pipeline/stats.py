"""Counters and timings shared by the pipeline threads, and immutable snapshots of them."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np

WINDOW = 300  # timing samples kept per stage (10 s at 30 fps)


class StageTimer:
    """Bounded window of durations for one stage, with percentiles in milliseconds. One
    thread adds while others read: every access holds the lock."""

    def __init__(self) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def percentiles(self) -> tuple[float, float]:
        with self._lock:
            values = list(self._values)
        if not values:
            return 0.0, 0.0
        p50, p95 = np.percentile(values, [50, 95])
        return float(p50) * 1e3, float(p95) * 1e3


class RateMeter:
    """Events per second over the last couple of seconds (thread-safe, as StageTimer)."""

    def __init__(self, span_s: float = 2.0) -> None:
        self.span_s = span_s
        self._times: collections.deque[float] = collections.deque(maxlen=1000)
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        with self._lock:
            self._times.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            times = list(self._times)
        recent = [t for t in times if t > now - self.span_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)


@dataclass(frozen=True)
class Snapshot:
    """Everything the dashboard, the control socket and `livecam bench` show."""

    avatar: str
    engine: str
    tier: str
    stride: int
    batch: int
    sink: str
    source: str
    target_fps: float
    shown_fps: float
    generated_fps: float
    frames_shown: int
    frames_new: int
    frames_held: int  # between strided frames: mouth held, head still moving
    frames_repeated: int  # the due face was not ready in time
    frames_generated: int
    frames_skipped: int
    frames_late: int  # generated, but after their tick: the camera showed the mouth before
    frames_silent: int
    queue_depth: int
    queue_capacity: int
    queue_drops: int
    late_ticks: int
    audio_overruns: int
    level_db: float
    latency_ms: float
    playout_delay_ms: float
    stages_ms: dict[str, tuple[float, float]]
    warnings: tuple[str, ...] = ()
    uptime_s: float = 0.0
    # the microphone's input latency: measured (and how), asked for, granted by the device
    capture_ms: float = 0.0
    capture_basis: str = ""
    capture_requested_ms: float = 0.0
    capture_granted_ms: float = 0.0
    remote: str = ""  # remote generation: server, round trip, its queue ("" when local)

    @property
    def repeat_ratio(self) -> float:
        return self.frames_repeated / self.frames_shown if self.frames_shown else 0.0

    @property
    def skip_ratio(self) -> float:
        """Share of shown frames whose mouth was not generated for them (held or repeated)."""
        reused = self.frames_held + self.frames_repeated
        return reused / self.frames_shown if self.frames_shown else 0.0


@dataclass
class Counters:
    """Mutable counters; each is written by one thread only, read by snapshot() (the shown
    frames and their kinds under the lock, as they must add up)."""

    frames_shown: int = 0
    frames_new: int = 0
    frames_held: int = 0
    frames_repeated: int = 0
    frames_generated: int = 0
    frames_skipped: int = 0
    frames_late: int = 0
    frames_silent: int = 0
    queue_drops: int = 0
    late_ticks: int = 0
    stages: dict[str, StageTimer] = field(
        default_factory=lambda: collections.defaultdict(StageTimer)
    )
    shown_rate: RateMeter = field(default_factory=RateMeter)
    generated_rate: RateMeter = field(default_factory=RateMeter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_shown(self, kind: str) -> None:
        """One frame on the camera, its mouth "new", "held" or "repeated": counted together,
        so a snapshot never sees the frame without its kind."""
        with self.lock:
            if kind == "new":
                self.frames_new += 1
            elif kind == "held":
                self.frames_held += 1
            elif kind == "repeated":
                self.frames_repeated += 1
            else:
                raise ValueError(f"unknown kind of shown frame: {kind!r}")
            self.frames_shown += 1

    def shown_counts(self) -> tuple[int, int, int, int]:
        """(shown, new, held, repeated), read together."""
        with self.lock:
            return self.frames_shown, self.frames_new, self.frames_held, self.frames_repeated

    def time_stage(self, name: str, seconds: float) -> None:
        with self.lock:
            self.stages[name].add(seconds)

    def stage_percentiles(self) -> dict[str, tuple[float, float]]:
        with self.lock:
            return {name: timer.percentiles() for name, timer in self.stages.items()}

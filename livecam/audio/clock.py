"""Maps the capture stream's sample count onto the monotonic clock, drift included."""

from __future__ import annotations

import collections
import threading
import time

from livecam.constants import SAMPLE_RATE


class AudioClock:
    """Estimates the monotonic time at which absolute sample 0 was captured.

    Each audio block reports (arrival time, samples so far). Delivery jitter only ever makes
    blocks late, so the smallest recent offset is the best estimate; using only recent blocks
    lets the estimate follow the sound card's clock drift over a long call.
    """

    def __init__(self, window: int = 200) -> None:
        self._offsets: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self._origin: float | None = None

    def seed(self, start: float) -> None:
        """Provisional origin so frames can flow before the first block (dropped by it)."""
        with self._lock:
            if not self._offsets:
                self._origin = start

    def on_block(self, end_sample: int, arrival: float | None = None) -> None:
        arrival = time.monotonic() if arrival is None else arrival
        with self._lock:
            self._offsets.append(arrival - end_sample / SAMPLE_RATE)
            self._origin = min(self._offsets)

    @property
    def started(self) -> bool:
        return self._origin is not None

    def origin(self) -> float:
        """Monotonic time of sample 0 (the first block's time until one arrives)."""
        with self._lock:
            if self._origin is None:
                raise RuntimeError("no audio captured yet")
            return self._origin

    def stream_time(self, now: float | None = None) -> float:
        """Seconds of audio the stream has produced by `now`, extrapolated between blocks."""
        now = time.monotonic() if now is None else now
        return now - self.origin()

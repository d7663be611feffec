"""When captured or played samples really meet the sound card, measured from the stream itself.

PortAudio hands each callback the host's timing: `currentTime` and `inputBufferAdcTime` (when
the block's first sample was captured) or `outputBufferDacTime` (when it will be heard). Through
PulseAudio's or PipeWire's ALSA plugin these come from the server's latency figures: the first
second of a new stream can be hundreds of milliseconds off (start-up backlog) and single blocks
jitter by +-5 ms, so one block means little while the median of the last few hundred holds to a
millisecond or two. A host that gives no timing (zeros) leaves only the arrival times.

PulseAudio's capture stamps also wander: their one-second medians sink by up to 10 ms and come
back over 10-20 s. Against the played sound (`livecam bench --latency`) the truth is the top of
that wander, so a capture stream's estimate is the longest latency among its last ten
one-second medians. PipeWire's stamps over-read by up to 7 ms while a new stream settles, over
its first 10-15 s, then hold to about 1 ms; so the one-second medians count from 15 s on, and
until then the estimate is the running median. In seven bench runs on each server that was
-2.8 to -0.7 ms off the truth through PulseAudio (the 2 s running median: up to 8 ms low) and
-1.8 to +0.8 ms through PipeWire.
"""

from __future__ import annotations

import collections
import itertools
import statistics

from livecam.constants import SAMPLE_RATE

WINDOW = 200  # blocks in the running medians: 2 s of 10 ms blocks
SPAN_BLOCKS = 100  # blocks in one of a capture stream's one-second medians
SPANS = 10  # one-second medians kept: 10 s, most of a period of PulseAudio's wander
SETTLE_SPANS = 15  # a new stream's first seconds: a start-up backlog, PipeWire settling
MIN_BLOCKS = 50  # fewer valid blocks than this: no estimate yet
PLAUSIBLE_S = 0.5  # a host timestamp further off is start-up backlog or garbage


def host_delay(current_time: float, stamp: float, playback: bool = False) -> float | None:
    """Seconds from capture to now (ADC stamp) or from now to playing (DAC stamp), when the
    host gave real timing; None for zeros, a stamp on the wrong side or an implausible one."""
    if current_time <= 0 or stamp <= 0:
        return None
    delay = stamp - current_time if playback else current_time - stamp
    return delay if 0 < delay < PLAUSIBLE_S else None


class StreamTiming:
    """A running estimate of the monotonic time at which sample 0 of a stream met the card.

    `on_block` takes every callback's first sample index, arrival (monotonic) time and host
    delay (None without host timing). Each block with a delay gives one estimate of the time of
    sample 0; their median over the last WINDOW blocks is the answer. Capture streams subtract
    the delay (the sample was taken earlier), playback streams add it (it is heard later).
    """

    def __init__(self, playback: bool = False, window: int = WINDOW) -> None:
        self._sign = 1.0 if playback else -1.0
        self._stamped: collections.deque[float] = collections.deque(maxlen=window)
        self._arrived: collections.deque[float] = collections.deque(maxlen=window)

    def on_block(self, first: int, frames: int, arrival: float, delay: float | None) -> None:
        self._arrived.append(arrival - (first + frames) / SAMPLE_RATE)
        if delay is not None:
            self._stamped.append(arrival + self._sign * delay - first / SAMPLE_RATE)

    def origin(self) -> float | None:
        """Median monotonic time of sample 0 by the host's timestamps; None without enough."""
        stamped = tuple(self._stamped)  # the callback appends meanwhile: copy first
        return statistics.median(stamped) if len(stamped) >= MIN_BLOCKS else None

    def jitter(self) -> float | None:
        """How much later than the earliest one a block typically arrives (median lateness)."""
        arrived = tuple(self._arrived)
        if len(arrived) < MIN_BLOCKS:
            return None
        return statistics.median(arrived) - min(arrived)


class CaptureTiming(StreamTiming):
    """A capture stream's timing: the running median, or the earliest sample-0 time (the
    longest capture latency) among the medians of its last SPANS one-second spans after the
    first SETTLE_SPANS, so that a host whose stamps sink between timing updates is read at
    the top of its wander."""

    def __init__(self) -> None:
        super().__init__(playback=False)  # WINDOW holds a whole span
        self._spans: collections.deque[float] = collections.deque(maxlen=SPANS)
        self._stamped_blocks = 0

    def on_block(self, first: int, frames: int, arrival: float, delay: float | None) -> None:
        super().on_block(first, frames, arrival, delay)
        if delay is None:
            return
        self._stamped_blocks += 1
        done, partial = divmod(self._stamped_blocks, SPAN_BLOCKS)
        if partial == 0 and done > SETTLE_SPANS:
            span = itertools.islice(reversed(self._stamped), SPAN_BLOCKS)
            self._spans.append(statistics.median(span))

    @property
    def settling(self) -> bool:
        """True until the first span counts: the origin is the running median till then."""
        return not self._spans

    def origin(self) -> float | None:
        running = super().origin()
        if running is None:
            return None
        return min((running, *self._spans))

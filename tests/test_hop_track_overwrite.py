"""HopTrack when the capture thread overwrites audio between its check and its read (a starved
generator under emulation hit this: the worker thread died with IndexError)."""

import numpy as np

from livecam.audio.ring import AudioRing
from livecam.constants import SAMPLE_RATE
from livecam.features.lite import HopTrack


class RacingRing(AudioRing):
    """Writes a burst of audio right after HopTrack checked `start`, before it reads."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.race_once = True

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.race_once:
            self.race_once = False
            self.write(np.full(self.capacity, 0.1, np.float32))  # the old audio is gone now
        return super().read(start, stop)


def test_feed_resumes_when_audio_is_overwritten_during_the_read():
    ring = RacingRing(SAMPLE_RATE)
    ring.write(np.zeros(SAMPLE_RATE // 2, np.float32))
    track = HopTrack(64)
    track.feed(ring, ring.end)  # must not raise: it resumes at the ring's new start
    resumed = track.hops_done
    assert resumed * 320 >= ring.start  # nothing before the ring's new start is analysed
    assert track.get(resumed - 1) is None  # hops before the resume point are unknown
    track.feed(ring, ring.end)  # and it carries on from there
    assert track.hops_done > resumed and track.get(track.hops_done - 1) is not None

"""Per-stream state on the server's ingress: the stream's audio and its analysis.

A stream is pinned to its WebSocket (one ingress replica), so its audio context lives here
and each generation request carries only per-frame state (lite: the mouth shape; musetalk:
the voice weight and the audio window its features are encoded from): generators stay
stateless.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from livecam.audio.ring import AudioRing
from livecam.constants import SAMPLE_RATE
from livecam.engines.lite import MouthTrack
from livecam.remote.protocol import ProtocolError, audio_samples

RING_SECONDS = 10  # more than any analysis or feature window looks back
WINDOW_SECONDS = 8.5  # musetalk: its 8 s encoder context, and a margin


class StreamState:
    def __init__(self, stream: int, fps: float, encoding: str, idle: bool, engine: str,
                 tiers: tuple[str, ...], samples_needed: Callable[[int], int]) -> None:  # fmt: skip
        self.stream = stream
        self.fps = fps
        self.encoding = encoding  # of the faces sent back
        self.idle = idle  # blinks
        self.engine = engine
        self.samples_needed = samples_needed
        self.tiers = tiers  # the engine's, for checking requests
        self.ring = AudioRing(RING_SECONDS * SAMPLE_RATE)
        if engine == "lite":
            self.analysis = MouthTrack(fps)
        else:
            from livecam.features.voice import VoiceGate

            self.gate = VoiceGate(fps)

    def add_audio(self, start: int, payload: bytes) -> None:
        """Samples at absolute index `start`: a gap becomes silence, a resent overlap is
        skipped, so the ring always holds the stream's own timeline."""
        samples = audio_samples(payload)
        if start < 0:
            raise ProtocolError('"start" must be a non-negative sample index')
        end = self.ring.end
        if start > end:
            self.ring.write_silence(start - end)
        elif start < end:
            samples = samples[end - start :]
        if len(samples):
            self.ring.write(samples)

    def conditions(self, frames: list[int]) -> list[tuple[float, ...]]:
        """Per-frame state for the generator (the frames' audio must have arrived)."""
        needed = self.samples_needed(frames[-1])
        if needed > self.ring.end:
            raise ProtocolError(
                f"frame {frames[-1]} needs audio up to sample {needed}; {self.ring.end} received"
            )
        if self.engine == "lite":
            self.analysis.feed(self.ring, frames[-1])
            return [self.analysis.mouth(k) for k in frames]
        return [(w,) for w in self.gate.levels(self.ring, frames)]

    def window(self, frames: list[int]) -> tuple[int, np.ndarray | None]:
        """(absolute start, samples) of the audio a neural engine encodes for these frames."""
        if self.engine == "lite":
            return 0, None
        end = self.samples_needed(frames[-1])
        start = max(end - int(WINDOW_SECONDS * SAMPLE_RATE), self.ring.start, 0)
        return start, self.ring.read(start, end)

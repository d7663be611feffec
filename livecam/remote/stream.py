"""Per-stream state on the server's ingress: the stream's audio and its mouth analysis.

A stream is pinned to its WebSocket (one ingress replica), so its audio context lives here
and each generation request carries only per-frame mouth state: generators stay stateless.
"""

from __future__ import annotations

from livecam.audio.ring import AudioRing
from livecam.constants import SAMPLE_RATE
from livecam.engines.lite import MouthTrack
from livecam.remote.protocol import ProtocolError, audio_samples

RING_SECONDS = 10  # the analysis never looks further back


class StreamState:
    def __init__(self, stream: int, fps: float, encoding: str, idle: bool) -> None:
        self.stream = stream
        self.fps = fps
        self.encoding = encoding  # of the faces sent back
        self.idle = idle  # blinks
        self.ring = AudioRing(RING_SECONDS * SAMPLE_RATE)
        self.analysis = MouthTrack(fps)

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

    def mouths(self, frames: list[int]) -> list[tuple[float, float]]:
        needed = self.analysis.samples_needed(frames[-1])
        if needed > self.ring.end:
            raise ProtocolError(
                f"frame {frames[-1]} needs audio up to sample {needed}; {self.ring.end} received"
            )
        self.analysis.feed(self.ring, frames[-1])
        return [self.analysis.mouth(k) for k in frames]

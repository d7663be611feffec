"""A per-frame speech weight from the lite features' voicing: where a neural mouth fades in."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from livecam.audio.ring import AudioRing
from livecam.constants import HOP_LENGTH, HOPS_PER_SECOND
from livecam.features.lite import HopTrack

GATE_HOPS = 3  # the gate averages voicing over +-3 hops (140 ms): a soft fade in and out


class VoiceGate:
    """Per-frame speech weight 0..1 from the lite engine's voice activity, streamed by hop."""

    def __init__(self, fps: float, track_hops: int = 10 * HOPS_PER_SECOND) -> None:
        self.fps = fps
        self.track = HopTrack(track_hops)

    def _centre(self, frame: int) -> int:
        return math.floor((frame + 0.5) / self.fps * HOPS_PER_SECOND)

    def samples_needed(self, frame: int) -> int:
        return (self._centre(frame) + GATE_HOPS + 2) * HOP_LENGTH

    def levels(self, ring: AudioRing, frames: Sequence[int]) -> list[float]:
        self.track.feed(ring, self.samples_needed(frames[-1]))
        out = []
        for frame in frames:
            c = self._centre(frame)
            known = [self.track.get(h) for h in range(c - GATE_HOPS, c + GATE_HOPS + 1)]
            voiced = [v[2] for v in known if v is not None]
            out.append(float(np.mean(voiced)) if voiced else 0.0)
        return out

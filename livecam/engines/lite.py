"""The lite engine: spectral mouth features driving a precomputed bank of mouth shapes.

No weights and no torch: it runs on any CPU. Features are streamed hop by hop from the ring, so
offline rendering and live capture produce identical frames for identical audio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from livecam.audio.ring import AudioRing
from livecam.avatar import idle
from livecam.avatar.face import FaceRenderer
from livecam.avatar.model import Avatar
from livecam.constants import HOP_LENGTH, HOPS_PER_SECOND
from livecam.features.lite import HopTrack

TRACK_HOPS = 10 * HOPS_PER_SECOND  # keep 10 s of per-hop features, enough for any lateness


class MouthTrack:
    """The lite engine's audio side: per-frame mouth state streamed from the ring, avatar-free
    (the remote server keeps one per stream and renders faces elsewhere)."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self.track = HopTrack(TRACK_HOPS)

    def hop(self, frame: int) -> int:
        """The newest hop whose centre lies within the frame's span: the freshest mouth state
        for it, and no look-ahead beyond the half analysis window."""
        return math.floor((frame + 1) / self.fps * HOPS_PER_SECOND - 1e-9)

    def samples_needed(self, frame: int) -> int:
        return (self.hop(frame) + 1) * HOP_LENGTH  # hop h is complete once (h + 1) hops arrived

    def feed(self, ring: AudioRing, frame: int) -> None:
        """Analyse the ring's audio up to what `frame` needs."""
        self.track.feed(ring, self.samples_needed(frame))

    def mouth(self, frame: int) -> tuple[float, float]:
        """(openness, width) for a frame; closed if its hop is not (or no longer) known."""
        value = self.track.get(self.hop(frame))
        if value is None:
            return 0.0, 0.0
        return float(value[0]), float(value[1])


class LiteEngine:
    name = "lite"
    tiers = ("full", "nearest")  # nearest: snap to the closest bank shape instead of blending
    batch_sizes = (1, 2, 4)
    # A sound's onset shows as a visibly opening mouth this long after the sound's own time
    # plus the playout delay and the measured lag of frames to the sink: a median over where
    # the sound starts against the frames and hops (`livecam bench --latency`, file source:
    # -6.4 to -7.0 ms, both bundled avatars). Negative, as the playout delay holds the frame's
    # own length and the analysis look-ahead while a frame shows the mouth for its whole
    # period. The virtual microphone adds it to its delay, the estimate to its sum.
    response_s = -0.007
    warnings: tuple[str, ...] = ()

    def __init__(self, avatar: Avatar, fps: float, idle_motion: bool = True) -> None:
        self.fps = fps
        self.idle_motion = idle_motion
        self.tier = self.tiers[0]
        self.renderer = FaceRenderer(avatar)
        self.analysis = MouthTrack(fps)

    def for_avatar(self, avatar: Avatar) -> LiteEngine:
        other = LiteEngine(avatar, self.fps, self.idle_motion)
        other.analysis, other.tier = self.analysis, self.tier  # the audio analysis is avatar-free
        return other

    def samples_needed(self, frame: int) -> int:
        return self.analysis.samples_needed(frame)

    def mouth(self, frame: int) -> tuple[float, float]:
        """(openness, width) for a frame; closed if its hop is not (or no longer) known."""
        return self.analysis.mouth(frame)

    def set_tier(self, tier: str) -> None:
        if tier not in self.tiers:
            raise ValueError(f"unknown tier {tier!r} for the lite engine: {self.tiers}")
        self.tier = tier

    def face(self, frame: int, openness: float, width: float) -> np.ndarray:
        """The face for a frame with this mouth state (a new array)."""
        eyes = idle.blink(frame / self.fps) if self.idle_motion else 0.0
        if self.tier == "nearest":
            n_open, n_width = self.renderer.avatar.mouth.patches.shape[:2]
            openness = round(openness * (n_open - 1)) / (n_open - 1)
            width = round((width + 1) / 2 * (n_width - 1)) / (n_width - 1) * 2 - 1
        return self.renderer.render(openness, width, eyes, frame / self.fps)

    def generate(self, ring: AudioRing, frames: Sequence[int]) -> list[np.ndarray]:
        self.analysis.feed(ring, frames[-1])
        return [self.face(k, *self.mouth(k)) for k in frames]

    def generate_silent(self, frames: Sequence[int]) -> list[np.ndarray]:
        return [self.face(k, 0.0, 0.0) for k in frames]

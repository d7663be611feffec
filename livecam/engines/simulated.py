"""A slowed-down engine for tests and benchmarks: `--simulate-load FACTOR`."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from livecam.audio.ring import AudioRing
from livecam.avatar.model import Avatar
from livecam.engines.base import Engine


class SimulatedLoad:
    """Makes each generated frame cost `factor` frame budgets (1/fps), like a slow GPU.

    A call pays a fixed overhead plus a per-frame part, so batching helps a little, and each
    lower quality tier costs 40 % less than the one above it, so stepping down helps too.
    """

    OVERHEAD = 0.3  # share of a one-frame call that is fixed per call

    def __init__(self, engine: Engine, factor: float, fps: float) -> None:
        self.inner = engine
        self.factor = factor
        self.fps = fps
        self.name = f"{engine.name} (simulated load x{factor:g})"
        self.tiers, self.batch_sizes = engine.tiers, engine.batch_sizes
        self.response_s, self.warnings = engine.response_s, engine.warnings

    @property
    def tier(self) -> str:
        return self.inner.tier

    def set_tier(self, tier: str) -> None:
        self.inner.set_tier(tier)

    def samples_needed(self, frame: int) -> int:
        return self.inner.samples_needed(frame)

    def call_cost(self, n_frames: int) -> float:
        per_frame = self.factor / self.fps * 0.6 ** self.tiers.index(self.tier)
        return per_frame * (self.OVERHEAD + (1 - self.OVERHEAD) * n_frames)

    def generate(self, ring: AudioRing, frames: Sequence[int]) -> list[np.ndarray]:
        deadline = time.perf_counter() + self.call_cost(len(frames))
        faces = self.inner.generate(ring, frames)
        time.sleep(max(0.0, deadline - time.perf_counter()))
        return faces

    def generate_silent(self, frames: Sequence[int]) -> list[np.ndarray]:
        return self.inner.generate_silent(frames)

    def for_avatar(self, avatar: Avatar) -> SimulatedLoad:
        return SimulatedLoad(self.inner.for_avatar(avatar), self.factor, self.fps)

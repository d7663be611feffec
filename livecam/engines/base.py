"""The engine contract: audio in the ring + frame indices -> avatar-size face images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from livecam.audio.ring import AudioRing
from livecam.avatar.model import Avatar


class Engine(Protocol):
    name: str
    tier: str  # the active quality tier, shown on the dashboard
    tiers: tuple[str, ...]  # quality tiers, best first: the scheduler steps down this list
    batch_sizes: tuple[int, ...]  # frames per generate call the engine is warmed up for
    response_s: float  # a sound shows this long after its time + playout delay + send lag
    warnings: tuple[str, ...]  # shown on the dashboard (e.g. unpublished weights)

    def set_tier(self, tier: str) -> None:
        """Switch quality tier (one of `tiers`); ValueError for an unknown one."""
        ...

    def samples_needed(self, frame: int) -> int:
        """Absolute sample index (exclusive) the ring must reach before `frame` can be made."""
        ...

    def generate(self, ring: AudioRing, frames: Sequence[int]) -> list[np.ndarray]:
        """Face images (avatar-size, uint8 BGR, each a new array) for increasing frame indices
        (consecutive, or every n-th when the scheduler strides)."""
        ...

    def generate_silent(self, frames: Sequence[int]) -> list[np.ndarray]:
        """Idle faces for frames whose audio never arrived (stalled or missing microphone)."""
        ...

    def for_avatar(self, avatar: Avatar) -> Engine:
        """The same engine on another avatar: weights and audio analysis carry over."""
        ...


class Call(Protocol):
    """Faces being made for one `submit`."""

    busy_s: float  # the generator's own time for it (not the wait), once answered

    def wait(self, timeout: float) -> list[np.ndarray] | None:
        """The faces, or None while they are still not there after `timeout` seconds."""
        ...


@runtime_checkable
class PipelinedEngine(Protocol):
    """An engine whose calls take a round trip (remote): the pipeline keeps several in
    flight, so the round trip adds to the latency but does not limit the frame rate."""

    def submit(self, ring: AudioRing, frames: Sequence[int]) -> Call:
        """Start on `frames` (as `generate` would) and return at once."""
        ...

    def round_trip_s(self) -> float | None:
        """The network's round trip (not the generator's queue), which calls in flight cover;
        None before the first reply."""
        ...

    def follow_server(self) -> bool:
        """Take up the tiers, batch sizes and look-ahead of the engine the server it reached
        since runs (it was unreachable at the start, or came back running another); True
        where they changed: the pipeline then plans afresh."""
        ...

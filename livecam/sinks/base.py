"""The contract every output sink follows."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class SinkError(Exception):
    """Clear, actionable message for the user (no traceback shown)."""


class Sink(Protocol):
    """Receives finished frames from the output thread at a fixed frame rate.

    `send` gets a (height, width, 3) uint8 BGR frame of exactly the opened size and the
    float32 mono 16 kHz audio of that frame's time span (may be empty). It must never block
    for long, nor change the frame or hold on to it once it returns (it copies what it keeps):
    the caller draws a later frame into the same array. `close` is idempotent.
    """

    name: str  # shown on the dashboard
    latency_s: float  # latency this sink adds

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None: ...

    def close(self) -> None: ...


def check_frame(frame: np.ndarray, width: int, height: int) -> None:
    """Raise ValueError unless `frame` is a (height, width, 3) uint8 array."""
    if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
        raise ValueError(
            f"frame must be a ({height}, {width}, 3) uint8 BGR array, "
            f"got shape {frame.shape} dtype {frame.dtype}"
        )

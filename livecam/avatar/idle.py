"""Idle life for still-photo avatars: blinks and a slow head sway, pure functions of time."""

from __future__ import annotations

import math
import zlib

BLINK_EVERY_S = 4.0  # one blink per slot of this length, at a pseudo-random moment in it
BLINK_CLOSE_S = 0.07
BLINK_OPEN_S = 0.12


def _slot_offset(slot: int) -> float:
    """Deterministic pseudo-random blink moment within a slot (same for every run)."""
    return (zlib.crc32(slot.to_bytes(8, "little", signed=True)) % 1000) / 1000 * 3.2 + 0.3


def blink(t: float) -> float:
    """Eyelid closure 0 (open) .. 1 (closed) at time t seconds."""
    slot = math.floor(t / BLINK_EVERY_S)
    for s in (slot - 1, slot):
        dt = t - (s * BLINK_EVERY_S + _slot_offset(s))
        if 0 <= dt < BLINK_CLOSE_S:
            return dt / BLINK_CLOSE_S
        if BLINK_CLOSE_S <= dt < BLINK_CLOSE_S + BLINK_OPEN_S:
            return 1 - (dt - BLINK_CLOSE_S) / BLINK_OPEN_S
    return 0.0


def sway(t: float) -> tuple[float, float, float, float]:
    """Head motion at time t: (angle degrees, dx, dy in face-heights, scale factor).

    Incommensurate slow sines, so the motion never visibly repeats; breathing is a 4 s cycle.
    """
    tau = 2 * math.pi
    angle = 0.7 * math.sin(tau * 0.11 * t) + 0.3 * math.sin(tau * 0.29 * t + 1.3)
    dx = 0.004 * math.sin(tau * 0.07 * t + 0.5)
    breath = math.sin(tau * 0.25 * t)
    return angle, dx, 0.002 * breath, 1 + 0.002 * breath

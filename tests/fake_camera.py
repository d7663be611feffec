"""A fake pyvirtualcam backend, so the real library path runs without a device.

Use `register()` then open `pyvirtualcam.Camera(..., backend=FAKE)`; every opened backend is
appended to `FakeBackend.instances` and keeps copies of the frames it received and the
`time.monotonic()` of each.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import pyvirtualcam

FAKE = "fake"
DEFAULT_DEVICE = "/dev/video10"
MISSING_DEVICE = "/dev/video-missing"  # opening this fails like a real missing device
DENIED_DEVICE = "/dev/video-denied"  # fails like the real backend without permissions


class FakeBackend:
    """Implements pyvirtualcam's backend contract in memory."""

    instances: ClassVar[list[FakeBackend]] = []
    attempts: ClassVar[int] = 0  # every open, failed or not
    busy: ClassVar[set[str]] = set()  # devices another writer holds: open fails as for real
    gone: ClassVar[set[str]] = set()  # devices that vanished: open and send fail as for real

    def __init__(
        self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw: Any
    ) -> None:
        FakeBackend.attempts += 1
        if device == MISSING_DEVICE or device in FakeBackend.gone:
            raise RuntimeError(f"Device {device} does not exist.")
        if device in FakeBackend.busy:
            raise RuntimeError(f"Device {device} is not a video output device.")
        if device == DENIED_DEVICE:
            raise RuntimeError(
                f"Device {device} could not be opened due to missing permissions. Did you add "
                "your user to the 'video' group?"
            )
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self._device = device or DEFAULT_DEVICE
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.closed = False
        FakeBackend.instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        assert frame.ndim == 1 and frame.dtype == np.uint8 and frame.flags.c_contiguous
        if self._device in FakeBackend.gone:
            raise RuntimeError("write failed: No such device")
        self.frames.append(frame.copy())
        self.times.append(time.monotonic())

    def close(self) -> None:
        assert not self.closed, "pyvirtualcam closes a backend exactly once"
        self.closed = True

    def device(self) -> str:
        return self._device

    def native_fourcc(self) -> int | None:
        return self.fourcc


def register() -> None:
    """Register the fake backend (idempotent) and forget earlier instances."""
    pyvirtualcam.register_backend(FAKE, FakeBackend)
    _reset()


def unregister() -> None:
    """Remove the fake backend so later `backend=None` cameras do not pick it up."""
    pyvirtualcam.camera.BACKENDS.pop(FAKE, None)
    _reset()


def _reset() -> None:
    FakeBackend.instances.clear()
    FakeBackend.busy.clear()
    FakeBackend.gone.clear()
    FakeBackend.attempts = 0

"""Virtual camera sink via pyvirtualcam (v4l2loopback on Linux)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pyvirtualcam
from pyvirtualcam import PixelFormat

from livecam.constants import DEFAULT_FPS, DEFAULT_HEIGHT, DEFAULT_WIDTH
from livecam.sinks.base import SinkError, check_frame

MODPROBE = "sudo modprobe v4l2loopback devices=1 video_nr=10 card_label=LiveCam exclusive_caps=1"
APT_INSTALL = "sudo apt install v4l2loopback-dkms"
USERMOD = "sudo usermod -aG video $USER"


def loopback_devices() -> list[str]:
    """Existing v4l2loopback device nodes (virtual video4linux devices), sorted."""
    names = [Path(p).name for p in glob.glob("/sys/devices/virtual/video4linux/video*")]
    return sorted(f"/dev/{n}" for n in names if os.path.exists(f"/dev/{n}"))


def _module_installed() -> bool:
    """True if the v4l2loopback kernel module is loaded or installed for this kernel."""
    if os.path.isdir("/sys/module/v4l2loopback"):
        return True
    mod_dir = Path("/lib/modules") / os.uname().release
    return any(mod_dir.rglob("v4l2loopback.ko*")) if mod_dir.is_dir() else False


def _load_hint() -> str:
    hint = f"load the v4l2loopback module: `{MODPROBE}`"
    if not _module_installed():
        hint = f"install it with `{APT_INSTALL}`, then {hint}"
    return hint


def explain_error(error: str, device: str | None) -> str:
    """Turn a pyvirtualcam error message into a message with the exact fix."""
    low = error.lower()
    if "permission" in low or "denied" in low:
        what = device or "the virtual camera"
        return (
            f"no permission to open {what}: add yourself to the video group with "
            f"`{USERMOD}`, then log out and in again"
        )
    if device and "does not exist" in low:
        existing = ", ".join(loopback_devices()) or "none"
        return (
            f"virtual camera device {device} does not exist (loopback devices here: "
            f"{existing}); pass an existing one with --camera, or {_load_hint()}"
        )
    if "no v4l2 loopback device" in low or "does not exist" in low:
        return f"no virtual camera device found; {_load_hint()}"
    if "not a video output device" in low or "not a v4l2 device" in low:
        return (
            f"{device or 'the device'} is not a v4l2loopback output device "
            f"(loopback devices here: {', '.join(loopback_devices()) or 'none'}); "
            f"pass one with --camera, or {_load_hint()}"
        )
    return f"cannot open the virtual camera: {error.strip()}"


def _open_camera(
    width: int, height: int, fps: float, device: str | None, backend: str | None
) -> pyvirtualcam.Camera:
    if backend is not None and backend not in pyvirtualcam.camera.BACKENDS:
        known = ", ".join(sorted(pyvirtualcam.camera.BACKENDS)) or "none"
        raise SinkError(f"unknown virtual camera backend {backend!r} (available: {known})")
    try:
        return pyvirtualcam.Camera(
            width, height, fps, fmt=PixelFormat.BGR, device=device, backend=backend
        )
    except Exception as e:  # pyvirtualcam reports every backend failure as RuntimeError
        raise SinkError(explain_error(str(e), device)) from e


class VirtualCamSink:
    """Sends frames to a virtual camera. Pacing is the caller's job."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        device: str | None = None,
        backend: str | None = None,
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self._cam: pyvirtualcam.Camera | None = _open_camera(width, height, fps, device, backend)
        self.device: str = self._cam.device
        self.backend: str = self._cam.backend
        self.name = f"virtual camera {self.device} ({self.backend})"
        self.latency_s = 1.0 / fps  # the consumer reads at most one frame behind

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
        check_frame(frame, self.width, self.height)
        if self._cam is None:
            raise SinkError("the virtual camera is closed")
        self._cam.send(frame)

    def close(self) -> None:
        if self._cam is not None:
            self._cam.close()
            self._cam = None


def virtualcam_available(
    device: str | None = None,
    backend: str | None = None,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    fps: float = DEFAULT_FPS,
) -> str | None:
    """None if a virtual camera opens with these settings, else the reason with its fix."""
    try:
        VirtualCamSink(width, height, fps, device=device, backend=backend).close()
    except SinkError as e:
        return str(e)
    return None

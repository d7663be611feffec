"""Virtual camera sink via pyvirtualcam (v4l2loopback on Linux)."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import struct
import time
from pathlib import Path

import numpy as np
import pyvirtualcam
from pyvirtualcam import PixelFormat

from livecam.sinks.base import SinkError, check_frame

MODPROBE = "sudo modprobe v4l2loopback devices=1 video_nr=10 card_label=LiveCam exclusive_caps=1"
APT_INSTALL = "sudo apt install v4l2loopback-dkms"
USERMOD = "sudo usermod -aG video $USER"
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 8.0  # backoff between attempts to open a busy or gone camera

# V4L2 ABI (linux/videodev2.h): struct v4l2_capability is 104 bytes, device_caps at 88
V4L2_CAPABILITY_SIZE, V4L2_DEVICE_CAPS_OFFSET = 104, 88
VIDIOC_QUERYCAP, VIDIOC_STREAMON = 0x80685600, 0x40045612
V4L2_BUF_TYPE_VIDEO_OUTPUT = 2
V4L2_CAP_VIDEO_CAPTURE, V4L2_CAP_VIDEO_OUTPUT = 0x1, 0x2

log = logging.getLogger(__name__)


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


class CameraUnavailable(SinkError):
    """The camera cannot be opened now but may be later: missing device, another writer."""


def device_holders(device: str) -> list[str]:
    """'name (pid N)' of every other process that has `device` open (those /proc lets us see)."""
    try:
        target = os.stat(device)
    except OSError:
        return []
    found = []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        pid = int(fd_dir.split("/")[2])
        if pid == os.getpid():
            continue
        try:
            held = any(_same_file(os.path.join(fd_dir, fd), target) for fd in os.listdir(fd_dir))
            name = Path(f"/proc/{pid}/comm").read_text().strip() if held else ""
        except OSError:  # the process ended, or is not ours to look at
            continue
        if held:
            found.append(f"{name} (pid {pid})")
    return found


def _same_file(path: str, target: os.stat_result) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino, st.st_rdev) == (target.st_dev, target.st_ino, target.st_rdev)


def _capabilities(device: str) -> int | None:
    """The device's V4L2 device_caps, or None if it cannot be asked."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        cap = bytearray(V4L2_CAPABILITY_SIZE)
        fcntl.ioctl(fd, VIDIOC_QUERYCAP, cap)
        return struct.unpack_from("<I", cap, V4L2_DEVICE_CAPS_OFFSET)[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def release_output(device: str) -> None:
    """Let v4l2loopback offer `device` to the next writer. With exclusive_caps=1 it only does
    so when a *streaming* writer closes; pyvirtualcam writes with write(), so after it the
    device offers neither output nor capture ("not a video output device") until the module
    is reloaded (v4l2loopback 0.12). A STREAMON on the output from a fresh handle marks that
    handle a writer (even when it fails for want of buffers); closing it clears the state."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_NONBLOCK)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, VIDIOC_STREAMON, struct.pack("<I", V4L2_BUF_TYPE_VIDEO_OUTPUT))
    finally:
        os.close(fd)


def _stuck(device: str) -> bool:
    """True if the device offers neither output nor capture: no writer is active (a writing
    one makes it offer capture), it is only the state a write() producer left behind."""
    caps = _capabilities(device)
    return caps is not None and not caps & (V4L2_CAP_VIDEO_CAPTURE | V4L2_CAP_VIDEO_OUTPUT)


def explain_error(error: str, device: str | None) -> SinkError:
    """Turn a pyvirtualcam error message into an error with the exact fix; CameraUnavailable
    for what can clear up by itself (device missing, another program writing to it)."""
    low = error.lower()
    if "permission" in low or "denied" in low:
        what = device or "the virtual camera"
        return SinkError(
            f"no permission to open {what}: add yourself to the video group with "
            f"`{USERMOD}`, then log out and in again"
        )
    if device and "does not exist" in low:
        existing = ", ".join(loopback_devices()) or "none"
        return CameraUnavailable(
            f"virtual camera device {device} does not exist (loopback devices here: "
            f"{existing}); pass an existing one with --camera, or {_load_hint()}"
        )
    if "no v4l2 loopback device" in low or "does not exist" in low:
        return CameraUnavailable(f"no virtual camera device found; {_load_hint()}")
    if "not a video output device" in low and device:
        holders = device_holders(device)
        if holders or device in loopback_devices():  # a loopback device another writer holds
            who = ", ".join(holders) or "another program (not visible to this user)"
            return CameraUnavailable(
                f"{device} is in use: {who} is writing to it; close that program, and "
                "livecam takes the camera over as soon as it is free"
            )
    if "not a video output device" in low or "not a v4l2 device" in low:
        return SinkError(
            f"{device or 'the device'} is not a v4l2loopback output device "
            f"(loopback devices here: {', '.join(loopback_devices()) or 'none'}); "
            f"pass one with --camera, or {_load_hint()}"
        )
    return SinkError(f"cannot open the virtual camera: {error.strip()}")


def _open_camera(
    width: int, height: int, fps: float, device: str | None, backend: str | None
) -> pyvirtualcam.Camera:
    if backend is not None and backend not in pyvirtualcam.camera.BACKENDS:
        known = ", ".join(sorted(pyvirtualcam.camera.BACKENDS)) or "none"
        raise SinkError(f"unknown virtual camera backend {backend!r} (available: {known})")
    for attempt in range(2):
        try:
            return pyvirtualcam.Camera(
                width, height, fps, fmt=PixelFormat.BGR, device=device, backend=backend
            )
        except Exception as e:  # pyvirtualcam reports every backend failure as RuntimeError
            error = e
        if attempt or not (device and "not a video output" in str(error) and _stuck(device)):
            break
        log.info("%s was left unusable by an earlier writer; releasing it", device)
        release_output(device)
    raise explain_error(str(error), device) from error


class VirtualCamSink:
    """Sends frames to a virtual camera. Pacing is the caller's job.

    With `wait=True` a camera that is missing or held by another writer does not stop
    livecam: frames are dropped (the pipeline keeps running) and the camera is opened again
    with backoff. A camera that fails mid-run (module unloaded) is always reopened that way.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        device: str | None = None,
        backend: str | None = None,
        wait: bool = False,
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self._device, self._backend = device, backend
        self.latency_s = 1.0 / fps  # the consumer reads at most one frame behind
        self.problem: str | None = None  # why frames do not reach the camera right now
        self._cam: pyvirtualcam.Camera | None = None
        self._closed = False
        self._retry_at, self._backoff = 0.0, RETRY_FIRST_S
        try:
            self._cam = _open_camera(width, height, fps, device, backend)
        except CameraUnavailable as e:
            if not wait:
                raise
            self._unavailable(str(e))
        self._name()

    def _name(self) -> None:
        if self._cam is not None:
            self.device, self.backend = self._cam.device, self._cam.backend
        else:
            self.device, self.backend = self._device or "(any)", self._backend or "v4l2loopback"
        self.name = f"virtual camera {self.device} ({self.backend})"

    def _unavailable(self, reason: str) -> None:
        if reason != self.problem:
            log.warning("camera unavailable, frames are dropped until it opens: %s", reason)
        self.problem = reason
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, RETRY_MAX_S)

    def _reopen(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        try:
            self._cam = _open_camera(self.width, self.height, self.fps, self._device,
                                     self._backend)  # fmt: skip
        except SinkError as e:  # permission etc. can change too (udev, group): keep trying
            self._unavailable(str(e))
            return
        self._name()
        log.info("camera %s is open again, frames flow", self.device)
        self.problem, self._backoff = None, RETRY_FIRST_S

    @property
    def wire_format(self) -> str | None:
        """The pixel format readers get (pyvirtualcam converts the BGR frames to it)."""
        fmt = self._cam.native_fmt if self._cam is not None else None
        return fmt.name if fmt is not None else None

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
        check_frame(frame, self.width, self.height)
        if self._closed:
            raise SinkError("the virtual camera is closed")
        if self._cam is None:
            self._reopen()
            if self._cam is None:
                return
        try:
            self._cam.send(frame)
        except Exception as e:  # the device went away under us (e.g. module unloaded)
            self._drop_camera()
            self._unavailable(f"writing to {self.device} failed ({e}); reopening it")

    def _drop_camera(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            device, backend = cam.device, cam.backend  # unreadable once closed
            with contextlib.suppress(Exception):
                cam.close()
            if backend == "v4l2loopback":
                release_output(device)

    def close(self) -> None:
        self._closed = True
        self._drop_camera()

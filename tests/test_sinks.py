"""Virtual camera and memory sinks, and open_sink."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from livecam.sinks import SinkError, open_sink
from livecam.sinks.memory import MemorySink
from livecam.sinks.preview import PreviewSink
from livecam.sinks.virtualcam import (
    MODPROBE,
    VirtualCamSink,
    loopback_devices,
    virtualcam_available,
)
from tests import fake_camera
from tests.fake_camera import FAKE, FakeBackend

W, H, FPS = 64, 48, 30
NO_AUDIO = np.zeros(0, np.float32)
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="v4l2loopback backend")


pytestmark = pytest.mark.usefixtures("fake_cam")


def pattern(k: int = 0) -> np.ndarray:
    """A frame whose bytes differ per pixel, channel and frame number."""
    return ((np.arange(H * W * 3).reshape(H, W, 3) + k) % 251).astype(np.uint8)


def test_virtualcam_sends_frames_through_pyvirtualcam() -> None:
    sink = VirtualCamSink(W, H, FPS, backend=FAKE)
    for k in range(3):
        sink.send(pattern(k), NO_AUDIO)
    (cam,) = FakeBackend.instances
    assert len(cam.frames) == 3
    assert all(f.size == W * H * 3 for f in cam.frames)
    np.testing.assert_array_equal(cam.frames[2], pattern(2).reshape(-1))
    assert "/dev/video10" in sink.name and FAKE in sink.name
    assert sink.latency_s == pytest.approx(1 / FPS)
    sink.close()
    sink.close()  # idempotent
    assert cam.closed
    with pytest.raises(SinkError):
        sink.send(pattern(), NO_AUDIO)


def test_virtualcam_named_device() -> None:
    sink = VirtualCamSink(W, H, FPS, device="/dev/video7", backend=FAKE)
    assert sink.device == "/dev/video7" and "/dev/video7" in sink.name
    sink.close()


@pytest.mark.parametrize(
    "frame",
    [np.zeros((W, H, 3), np.uint8), np.zeros((H, W, 4), np.uint8), np.zeros((H, W, 3))],
)
def test_virtualcam_rejects_wrong_frames(frame: np.ndarray) -> None:
    sink = VirtualCamSink(W, H, FPS, backend=FAKE)
    with pytest.raises(ValueError, match=r"frame must be a \(48, 64, 3\) uint8 BGR array, got"):
        sink.send(frame, NO_AUDIO)
    assert FakeBackend.instances[0].frames == []
    sink.close()


def test_virtualcam_errors_name_the_fix() -> None:
    with pytest.raises(SinkError, match="does not exist") as e:
        VirtualCamSink(W, H, FPS, device=fake_camera.MISSING_DEVICE, backend=FAKE)
    assert fake_camera.MISSING_DEVICE in str(e.value) and MODPROBE in str(e.value)
    with pytest.raises(SinkError, match=r"sudo usermod -aG video \$USER"):
        VirtualCamSink(W, H, FPS, device=fake_camera.DENIED_DEVICE, backend=FAKE)
    with pytest.raises(SinkError, match="unknown virtual camera backend 'nope'"):
        VirtualCamSink(W, H, FPS, backend="nope")


@linux_only
@pytest.mark.skipif(Path("/dev/video99").exists(), reason="/dev/video99 exists here")
def test_real_backend_missing_device() -> None:
    with pytest.raises(SinkError, match="modprobe v4l2loopback") as e:
        VirtualCamSink(W, H, FPS, device="/dev/video99", backend="v4l2loopback")
    assert "/dev/video99 does not exist" in str(e.value)
    reason = virtualcam_available(device="/dev/video99", backend="v4l2loopback")
    assert reason is not None and MODPROBE in reason


@linux_only
@pytest.mark.skipif(bool(loopback_devices()), reason="a loopback device exists here")
def test_real_backend_no_device_at_all() -> None:
    with pytest.raises(SinkError, match=r"no virtual camera device found.*modprobe"):
        VirtualCamSink(W, H, FPS, backend="v4l2loopback")


def test_virtualcam_available_with_fake() -> None:
    assert virtualcam_available(backend=FAKE, width=W, height=H) is None
    assert FakeBackend.instances[0].closed


def test_memory_sink_counts_and_bounds() -> None:
    sink = MemorySink(W, H, FPS, keep=2)
    buf = pattern(0)
    for k in range(5):
        buf[:] = pattern(k)  # the caller reuses its buffer
        sink.send(buf, np.ones(10, np.float32))
    assert sink.frames_sent == 5 and sink.audio_samples == 50
    assert len(sink.times) == 5 and list(sink.times) == sorted(sink.times)
    assert [f[0, 0, 0] for f in sink.frames] == [pattern(3)[0, 0, 0], pattern(4)[0, 0, 0]]
    assert MemorySink(W, H, FPS).times.maxlen == 10_000
    with pytest.raises(ValueError, match="frame must be"):
        sink.send(np.zeros((1, 1, 3), np.uint8), NO_AUDIO)


def test_open_sink_kinds(tmp_path: Path) -> None:
    sink, warnings = open_sink("memory", width=W, height=H, fps=FPS)
    assert isinstance(sink, MemorySink) and warnings == []
    sink, warnings = open_sink("virtualcam", width=W, height=H, fps=FPS, backend=FAKE)
    assert isinstance(sink, VirtualCamSink) and warnings == []
    sink.close()
    with pytest.raises(SinkError, match=r"^--out PATH is required with --sink file$"):
        open_sink("file", width=W, height=H, fps=FPS)
    with pytest.raises(SinkError, match="unknown sink 'tv'"):
        open_sink("tv", width=W, height=H, fps=FPS)


def test_open_sink_auto_prefers_the_camera() -> None:
    sink, warnings = open_sink("auto", width=W, height=H, fps=FPS, backend=FAKE)
    assert isinstance(sink, VirtualCamSink) and warnings == []
    sink.close()


def test_open_sink_auto_falls_back_to_preview() -> None:
    sink, warnings = open_sink(
        "auto",
        width=W,
        height=H,
        fps=FPS,
        device=fake_camera.MISSING_DEVICE,
        backend=FAKE,
        port=0,
    )
    try:
        assert isinstance(sink, PreviewSink)
        assert any(MODPROBE in w for w in warnings)
        assert any(sink.url in w for w in warnings)
    finally:
        sink.close()

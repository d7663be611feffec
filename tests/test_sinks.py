"""Virtual camera and memory sinks, and open_sink."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from livecam.sinks import PREVIEW_PORTS, SinkError, SinkSettings, open_sink, virtualcam
from livecam.sinks.memory import MemorySink
from livecam.sinks.preview import PreviewSink
from livecam.sinks.virtualcam import (
    MODPROBE,
    CameraUnavailable,
    VirtualCamSink,
    device_holders,
    loopback_devices,
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
    assert MODPROBE in str(e.value)


@linux_only
@pytest.mark.skipif(bool(loopback_devices()), reason="a loopback device exists here")
def test_real_backend_no_device_at_all() -> None:
    with pytest.raises(SinkError, match=r"no virtual camera device found.*modprobe"):
        VirtualCamSink(W, H, FPS, backend="v4l2loopback")


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
    sink, warnings = open_sink("memory", SinkSettings(width=W, height=H, fps=FPS))
    assert isinstance(sink, MemorySink) and warnings == []
    sink, warnings = open_sink("virtualcam", SinkSettings(width=W, height=H, fps=FPS, backend=FAKE))
    assert isinstance(sink, VirtualCamSink) and warnings == []
    sink.close()
    with pytest.raises(SinkError, match=r"^--out PATH is required with --sink file$"):
        open_sink("file", SinkSettings(width=W, height=H, fps=FPS))
    with pytest.raises(SinkError, match="unknown sink 'tv'"):
        open_sink("tv", SinkSettings(width=W, height=H, fps=FPS))


def test_open_sink_auto_prefers_the_camera() -> None:
    sink, warnings = open_sink("auto", SinkSettings(width=W, height=H, fps=FPS, backend=FAKE))
    assert isinstance(sink, VirtualCamSink) and warnings == []
    sink.close()


def test_open_sink_auto_falls_back_to_preview() -> None:
    sink, warnings = open_sink(
        "auto",
        SinkSettings(
            width=W, height=H, fps=FPS, device=fake_camera.MISSING_DEVICE, backend=FAKE, port=0
        ),
    )
    try:
        assert isinstance(sink, PreviewSink)
        assert any(MODPROBE in w for w in warnings)
        assert any(sink.url in w for w in warnings)
    finally:
        sink.close()


def _listening(port: int) -> socket.socket | None:
    """A socket holding 127.0.0.1:port, as another program would; None where it is taken."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_open_sink_auto_serves_the_preview_on_the_next_free_port() -> None:
    held = [_listening(0)]
    first = held[0].getsockname()[1]
    settings = SinkSettings(width=W, height=H, fps=FPS, device=fake_camera.MISSING_DEVICE,
                            backend=FAKE, port=first)  # fmt: skip
    try:
        sink, warnings = open_sink("auto", settings)
        try:
            assert first < sink.port < first + PREVIEW_PORTS
            assert warnings[-1] == f"showing the preview at {sink.url} (port {first} is taken)"
        finally:
            sink.close()
        held += [_listening(port) for port in range(first + 1, first + PREVIEW_PORTS)]
        if None in held:
            pytest.skip("a port next to the test's was taken by another program")
        with pytest.raises(SinkError, match="already in use"):  # all ten taken: say so
            open_sink("auto", settings)
        with pytest.raises(SinkError, match=f"port {first} .*already in use"):
            open_sink("preview", settings)  # asked for by name: that port or nothing
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


@pytest.fixture
def held_device(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A 'device' node that another process (this test's child) holds open, as a writer would."""
    path = tmp_path / "video-held"
    path.write_bytes(b"")
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'rb'); sys.stdin.read()",
         str(path)], stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not device_holders(str(path)):  # until the child has opened it
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        yield str(path), child.pid
    finally:
        child.kill()
        child.wait()


def test_device_holders_names_the_other_writer(held_device) -> None:
    path, pid = held_device
    assert device_holders(path) == [f"{_comm(pid)} (pid {pid})"]
    assert device_holders("/nonexistent/video") == []


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_busy_camera_says_who_holds_it_and_is_taken_over_when_free(held_device, monkeypatch):
    path, pid = held_device
    FakeBackend.busy.add(path)
    with pytest.raises(CameraUnavailable, match=f"{path} is in use: .*pid {pid}.*close"):
        VirtualCamSink(W, H, FPS, device=path, backend=FAKE)  # no waiting: auto falls back
    monkeypatch.setattr(virtualcam, "RETRY_FIRST_S", 60.0)
    sink = VirtualCamSink(W, H, FPS, device=path, backend=FAKE, wait=True)
    assert f"pid {pid}" in (sink.problem or "") and sink.device == path
    attempts = FakeBackend.attempts
    sink.send(pattern(), NO_AUDIO)  # dropped; the next attempt waits for its backoff
    assert FakeBackend.attempts == attempts and FakeBackend.instances == []
    FakeBackend.busy.clear()
    sink._retry_at = 0.0  # the backoff has passed
    sink.send(pattern(1), NO_AUDIO)
    assert sink.problem is None and len(FakeBackend.instances) == 1
    np.testing.assert_array_equal(FakeBackend.instances[0].frames[0].reshape(H, W, 3), pattern(1))
    sink.close()


def test_backoff_doubles_up_to_its_limit() -> None:
    sink = VirtualCamSink(W, H, FPS, device=fake_camera.MISSING_DEVICE, backend=FAKE, wait=True)
    assert "does not exist" in (sink.problem or "")
    waits = []
    for _ in range(8):
        sink._retry_at = 0.0
        before = time.monotonic()
        sink.send(pattern(), NO_AUDIO)
        waits.append(sink._retry_at - before)
    assert waits[1] > 1.9 * waits[0] and max(waits) <= virtualcam.RETRY_MAX_S + 0.5
    assert waits[-1] > virtualcam.RETRY_MAX_S - 0.5
    sink.close()


def test_camera_gone_mid_run_is_reopened(monkeypatch) -> None:
    monkeypatch.setattr(virtualcam, "RETRY_FIRST_S", 0.0)
    device = "/dev/video-unplugged"
    sink = VirtualCamSink(W, H, FPS, device=device, backend=FAKE)
    sink.send(pattern(0), NO_AUDIO)
    first = FakeBackend.instances[0]
    FakeBackend.gone.add(device)  # e.g. the module was unloaded
    sink.send(pattern(1), NO_AUDIO)  # fails: the sink drops the camera, livecam keeps running
    assert first.closed and "reopening" in (sink.problem or "")
    sink.send(pattern(2), NO_AUDIO)
    assert "does not exist" in (sink.problem or "")
    FakeBackend.gone.clear()  # the module is back
    sink.send(pattern(3), NO_AUDIO)
    assert sink.problem is None and len(FakeBackend.instances) == 2
    assert len(first.frames) == 1 and len(FakeBackend.instances[1].frames) == 1
    sink.close()
    with pytest.raises(SinkError, match="closed"):
        sink.send(pattern(4), NO_AUDIO)


def test_open_sink_virtualcam_waits_for_a_missing_camera() -> None:
    sink, _ = open_sink("virtualcam", SinkSettings(width=W, height=H, fps=FPS,
                        device=fake_camera.MISSING_DEVICE, backend=FAKE))  # fmt: skip
    assert isinstance(sink, VirtualCamSink) and "does not exist" in (sink.problem or "")
    sink.close()
    with pytest.raises(SinkError, match="permission"):  # what cannot clear up still stops it
        open_sink("virtualcam", SinkSettings(width=W, height=H, fps=FPS,
                  device=fake_camera.DENIED_DEVICE, backend=FAKE))  # fmt: skip


def test_bench_times_the_camera_sink() -> None:
    from livecam.bench import camera_sink_cost

    cost = camera_sink_cost(pattern(), FPS, frames=5, backend=FAKE)
    assert cost["device"] == fake_camera.DEFAULT_DEVICE and cost["input"] == "BGR"
    assert len(FakeBackend.instances[0].frames) == 5 and FakeBackend.instances[0].closed
    assert 0 <= cost["ms_per_frame"]["p50"] <= cost["ms_per_frame"]["p95"]
    assert (
        "unknown virtual camera backend"
        in camera_sink_cost(pattern(), FPS, backend="nope")["unavailable"]
    )

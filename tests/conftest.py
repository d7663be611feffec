"""Shared fixtures: an isolated avatar cache, test audio, and a PulseAudio microphone."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from livecam.audio import pulse
from livecam.audio.virtual_mic import NAME_ENV
from tests import fake_camera

REPO = Path(__file__).resolve().parents[1]
JFK = REPO / "livecam" / "samples" / "jfk.wav"
SPEECH = REPO / "tests" / "data" / "speech_en.wav"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Avatar caches go to a per-session temp dir, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("livecam-cache")
    os.environ["LIVECAM_CACHE_DIR"] = str(path)
    # control sockets too: tests never collide with a livecam the user is running
    os.environ["LIVECAM_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("livecam-run"))
    # and the user's config.toml is not read (tests that need one set their own)
    os.environ["LIVECAM_CONFIG"] = str(path / "no-config.toml")
    # a virtual microphone of their own: a running user's "LiveCam Microphone" is never touched
    os.environ[NAME_ENV] = f"livecam_test_vmic_{uuid.uuid4().hex[:6]}"
    return path


def _ensure_pulseaudio() -> bool:
    """A PulseAudio server answers; returns True when this session had to start it."""
    if shutil.which("pulseaudio") is None or shutil.which("pactl") is None:
        message = "PulseAudio is not installed (apt-get install pulseaudio pulseaudio-utils)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if pulse.available():
        return False
    subprocess.run(["pulseaudio", "-D", "--exit-idle-time=-1"], capture_output=True, timeout=20)
    for _ in range(50):
        if pulse.available():
            return True
        time.sleep(0.1)
    pytest.fail("PulseAudio did not start (`pulseaudio -D --exit-idle-time=-1`)")


def _modules_named(name: str) -> list[str]:
    lines = pulse.pactl("list", "short", "modules").splitlines()
    return [line.split("\t")[0] for line in lines if line.split("\t")[1:2] == [name]]


@pytest.fixture(scope="session")
def pulse_mic():
    """A PulseAudio null sink whose monitor is the default microphone.

    Yields the sink name: `paplay --device=SINK file.wav` then speaks into the microphone.
    Everything is put back afterwards: the default source, module-suspend-on-idle, and the
    server itself when this session started it.
    """
    started = _ensure_pulseaudio()
    default_source = pulse.pactl("get-default-source")
    # a null sink left idle suspends, and its monitor then delivers nothing, unlike a real mic
    suspend = _modules_named("module-suspend-on-idle")
    for module in suspend:
        pulse.unload(module)
    name = f"livecam_test_{uuid.uuid4().hex[:6]}"
    modules = [
        pulse.pactl(
            "load-module",
            "module-null-sink",
            f"sink_name={name}",
            f"sink_properties=device.description={name}",
        ),
        pulse.pactl(
            "load-module",
            "module-remap-source",
            f"master={name}.monitor",
            f"source_name={name}_mic",
            f"source_properties=device.description={name}_mic",
        ),
    ]
    pulse.pactl("set-default-source", f"{name}_mic")
    try:
        yield name
    finally:
        for module in reversed(modules):
            pulse.unload(module)
        if started:
            subprocess.run(["pulseaudio", "--kill"], capture_output=True, timeout=20)
        else:
            if suspend:
                pulse.pactl("load-module", "module-suspend-on-idle")
            with contextlib.suppress(pulse.PulseError):  # it may have gone meanwhile
                pulse.pactl("set-default-source", default_source)


@pytest.fixture
def fake_cam():
    """The fake pyvirtualcam backend, registered for one test and removed after it."""
    fake_camera.register()
    try:
        yield fake_camera.FakeBackend.instances
    finally:
        fake_camera.unregister()

"""Shared fixtures: an isolated avatar cache, test audio, and a PulseAudio microphone."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from livecam.audio import pulse

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
    return path


def _ensure_pulseaudio() -> None:
    if shutil.which("pulseaudio") is None or shutil.which("pactl") is None:
        message = "PulseAudio is not installed (apt-get install pulseaudio pulseaudio-utils)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if pulse.available():
        return
    subprocess.run(["pulseaudio", "-D", "--exit-idle-time=-1"], capture_output=True, timeout=20)
    for _ in range(50):
        if pulse.available():
            return
        time.sleep(0.1)
    pytest.fail("PulseAudio did not start (`pulseaudio -D --exit-idle-time=-1`)")


@pytest.fixture(scope="session")
def pulse_mic():
    """A PulseAudio null sink whose monitor is the default microphone.

    Yields the sink name: `paplay --device=SINK file.wav` then speaks into the microphone.
    """
    _ensure_pulseaudio()
    # a null sink left idle suspends, and its monitor then delivers nothing, unlike a real mic
    pulse.unload("module-suspend-on-idle")
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

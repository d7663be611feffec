"""Shared fixtures: an isolated avatar cache, test audio, a microphone on a private
PulseAudio and PipeWire server, and a `livecam serve` app on a local Ray cluster."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from livecam.audio import pulse
from livecam.audio.virtual_mic import NAME_ENV
from tests import fake_camera, sound_servers

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


@pytest.fixture(scope="session", params=list(sound_servers.PROGRAMS))
def sound_server(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[str]:
    """A private PulseAudio, then a private PipeWire (pipewire-pulse + WirePlumber): every
    pactl call, PortAudio stream and child process of the tests reaches it via PULSE_SERVER.
    Yields "pulseaudio" or "pipewire"."""
    kind = request.param
    missing = sound_servers.missing(kind)
    if missing:
        message = (
            f"{kind} is not installed (no {', '.join(missing)}): "
            f"apt-get install {sound_servers.PACKAGES[kind]}"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        server = sound_servers.start(kind, tmp_path_factory.mktemp(kind))
    except sound_servers.ServerError as exc:
        pytest.fail(str(exc))
    previous = os.environ.get("PULSE_SERVER")
    os.environ["PULSE_SERVER"] = server.address
    try:
        yield kind
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = previous


@pytest.fixture(scope="session")
def pulse_mic(sound_server: str) -> Iterator[str]:
    """A null sink of the private server whose monitor is its default microphone.

    Yields the sink name: `paplay --device=SINK file.wav` then speaks into the microphone.
    """
    name = f"livecam_test_{uuid.uuid4().hex[:6]}"
    modules = pulse.create_fed_source(name, f"{name}_mic")
    pulse.pactl("set-default-source", f"{name}_mic")
    try:
        yield name
    finally:
        pulse.unload_all(modules)


@pytest.fixture
def fake_cam():
    """The fake pyvirtualcam backend, registered for one test and removed after it."""
    fake_camera.register()
    try:
        yield fake_camera.FakeBackend.instances
    finally:
        fake_camera.unregister()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """`livecam serve --engine lite --replicas 2` on a local Ray cluster, its URL; one for each
    module that uses it (start-up costs ~10 s), so Ray does not run beside the other tests."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from livecam.remote.server import start_app
    from tests.remote_server import TOKEN, free_port

    # 2 CPUs for the lite pool's two replicas, one for test_remote_serve's musetalk app
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="warning")
    try:
        yield start_app("lite", 2, TOKEN, "127.0.0.1", free_port())
    finally:
        serve.shutdown()
        ray.shutdown()

"""PortAudio lists devices once; livecam rescans for a sound server or microphone that came later.

Each case runs in a child process with a private PulseAudio server of its own (its own socket,
runtime dir and home), so the user's server and the test session's PortAudio are never touched.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    import sounddevice as sd
    from livecam.audio import portaudio
    from livecam.audio.sources import AudioDeviceError, resolve_input_device

    def start_server():
        server = subprocess.Popen(sys.argv[1:], stderr=subprocess.DEVNULL)
        for _ in range(100):
            if subprocess.run(["pactl", "info"], capture_output=True).returncode == 0:
                return server
            time.sleep(0.1)
        raise SystemExit("the private PulseAudio server did not start")

    sd.query_devices()  # PortAudio starts now, while no sound server runs
    try:
        resolve_input_device(None)
        raise SystemExit("a microphone was found with no sound server running")
    except AudioDeviceError as exc:
        print("before:", exc)
    server = start_server()
    try:
        print("after:", resolve_input_device(None)[1])
        stream = portaudio.track(sd.InputStream(samplerate=16000, channels=1))
        print("rescan while open:", portaudio.rescan())
        stream.close()
        print("rescan when closed:", portaudio.rescan())
    finally:
        server.terminate()
        server.wait()
    """
)


@pytest.fixture
def private_pulse(tmp_path: Path) -> tuple[dict, list[str]]:
    if shutil.which("pulseaudio") is None:
        if os.environ.get("CI"):
            pytest.fail("PulseAudio is not installed (apt-get install pulseaudio)")
        pytest.skip("PulseAudio is not installed")
    socket = tmp_path / "native"
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(tmp_path),
        "PULSE_SERVER": f"unix:{socket}",
        "PYTHONPATH": str(REPO),
    }
    server = ["pulseaudio", "-n", "--daemonize=no", "--use-pid-file=no", "--exit-idle-time=-1",
              f"--load=module-native-protocol-unix socket={socket} auth-anonymous=1",
              "--load=module-null-sink sink_name=livecam_private"]  # fmt: skip
    return env, server


def test_a_sound_server_started_after_portaudio_is_found(private_pulse):
    env, server = private_pulse
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *server], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["before"].startswith("no microphone found")
    assert lines["after"] in {"default", "pulse"}
    assert lines["rescan while open"] == "False"  # an open stream is never closed by a rescan
    assert lines["rescan when closed"] == "True"

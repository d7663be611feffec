"""PortAudio lists devices once; livecam rescans for a sound server or microphone that came later,
and `livecam start` waits for one, and gets both microphones back from a restarted server.

Each case runs in a child process with a private PulseAudio server of its own (its own socket,
runtime dir and home), so the user's server and the test session's PortAudio are never touched.
"""

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from livecam.audio.sources import WAITING
from livecam.audio.virtual_mic import NAME_ENV
from tests.conftest import JFK, REPO
from tests.helpers import (
    NotifySocket,
    daemon_status,
    loudest_rms,
    recorded,
    start_recording,
    status_until,
)

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


def test_start_without_a_microphone_waits_for_one_and_captures_it(private_pulse, tmp_path):
    """No sound server when the daemon starts: the camera runs on idle frames and says why;
    a server that comes later is found and its microphone captured, with no restart."""
    env, server = private_pulse
    env = {**env, "LIVECAM_RUNTIME_DIR": str(tmp_path / "run")}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "livecam", "start", "--sink", "memory", "--size", "320x240",
         "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pulse = None
    try:
        first = status_until(env, daemon, lambda s: s["frames_shown"] > 0, "no frames shown")
        time.sleep(2.5)  # past a look for a device
        waiting = daemon_status(env)
        assert waiting["source"] == "none"
        assert waiting["warnings"] == [WAITING + ": showing idle frames"]
        assert waiting["frames_shown"] > first["frames_shown"]  # the camera runs meanwhile
        assert waiting["frames_silent"] > 0 and waiting["frames_generated"] == 0
        pulse = subprocess.Popen(server, env=env, stderr=subprocess.DEVNULL)
        found = status_until(env, daemon, lambda s: s["source"] != "none", "never found")
        speech = subprocess.Popen(["paplay", "--device=livecam_private", str(JFK)], env=env)
        heard = status_until(env, daemon, lambda s: s["level_db"] > -40, "no speech captured")
        assert speech.wait(timeout=30) == 0
    finally:
        daemon.terminate()
        _, log = daemon.communicate(timeout=30)
        if pulse is not None:
            pulse.terminate()
            pulse.wait()
    assert daemon.returncode == 0, log
    assert found["source"] in {"default", "pulse"}
    assert heard["warnings"] == [] and heard["frames_generated"] > 0
    log = " ".join(log.split())  # rich wraps the log lines
    assert WAITING in log and f"microphone {found['source']!r} found" in log


def _start_server(server: list[str], env: dict) -> subprocess.Popen:
    """The private server, with a microphone fed by its null sink as the default input (else
    the default would become the LiveCam Microphone itself, the only source not a monitor)."""
    process = subprocess.Popen(server, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
        assert process.poll() is None and time.monotonic() < deadline, "PulseAudio did not start"
        time.sleep(0.1)
    remap = ["load-module", "module-remap-source", "master=livecam_private.monitor",
             "source_name=private_mic"]  # fmt: skip
    for command in (remap, ["set-default-source", "private_mic"]):
        subprocess.run(["pactl", *command], env=env, capture_output=True, check=True)
    return process


def _running_with_virtual_mic(env: dict) -> subprocess.Popen:
    """`livecam start --virtual-mic` on the private server, once it runs with no warning."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "livecam", "start", "--sink", "memory", "--size", "320x240",
         "--no-dashboard", "--virtual-mic"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        status_until(env, daemon, lambda s: s["frames_shown"] > 0 and not s["warnings"],
                      "never ran cleanly")  # fmt: skip
    except BaseException:
        daemon.kill()
        daemon.wait()
        raise
    return daemon


def test_a_restarted_sound_server_gets_both_microphones_back(private_pulse, tmp_path):
    """The sound server dies under a running `livecam start --virtual-mic` and comes back:
    the microphone is captured again and the LiveCam Microphone is made again and carries
    the speech, with no restart; after the stop nothing of it is left on the server."""
    env, server = private_pulse
    env = {**env, "LIVECAM_RUNTIME_DIR": str(tmp_path / "run")}
    virtual = f"livecam_test_restart_{os.getpid()}"
    env[NAME_ENV] = virtual
    pulse = _start_server(server, env)
    daemon = _running_with_virtual_mic(env)
    try:
        pulse.terminate()
        pulse.wait()
        lost = status_until(env, daemon, lambda s: len(s["warnings"]) == 2, "loss not told")
        pulse = _start_server(server, env)
        status_until(env, daemon, lambda s: not s["warnings"] and s["source"] != "none",
                      "never came back")  # fmt: skip
        speech = subprocess.Popen(["paplay", "--device=livecam_private", str(JFK)], env=env)
        recorder = start_recording(virtual, env)
        time.sleep(4.0)
        loudest = loudest_rms(recorded(recorder))
        speech.wait(timeout=30)
        daemon.terminate()
        _, log = daemon.communicate(timeout=30)
        left = subprocess.run(["pactl", "list", "short", "modules"], env=env,
                              capture_output=True, text=True).stdout  # fmt: skip
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        pulse.terminate()
        pulse.wait()
    assert daemon.returncode == 0, log
    assert any("the virtual microphone 'LiveCam Microphone' stopped" in w for w in lost["warnings"])
    assert loudest > 0.02  # the speech came through the virtual microphone made again
    assert virtual not in left  # its sink and source were removed at the stop
    log = " ".join(log.split())  # rich wraps the log lines: one line each way, not one a retry
    assert log.count("'LiveCam Microphone' stopped") == 1 and log.count("plays again") == 1


def test_a_hung_sound_server_stops_neither_the_dashboard_nor_the_watchdog(private_pulse, tmp_path):
    """The sound server hangs (SIGSTOP) under `livecam start --virtual-mic`: its devices are
    waited on from their own thread, so the status keeps coming and systemd's watchdog keeps
    being pinged while frames go out; when the server answers again (SIGCONT), both
    microphones play again, with no restart."""
    env, server = private_pulse
    folder = tempfile.mkdtemp(prefix="lc-notify-")  # short: a socket path has 108 bytes
    listener = NotifySocket(f"{folder}/notify")
    env = {**env, "LIVECAM_RUNTIME_DIR": str(tmp_path / "run"), "WATCHDOG_USEC": "1000000",
           NAME_ENV: f"livecam_hung_{os.getpid()}", "NOTIFY_SOCKET": listener.address}  # fmt: skip
    env.pop("WATCHDOG_PID", None)
    pulse = _start_server(server, env)
    daemon = _running_with_virtual_mic(env)
    try:
        pulse.send_signal(signal.SIGSTOP)
        hung_at = time.monotonic()
        time.sleep(8.0)  # the devices' calls wait on the server: pactl's timeout is 10 s
        hung = daemon_status(env)
        pings = [t for t, _ in listener.with_field("WATCHDOG=1") if t > hung_at]
        statuses = [t for t, m in listener.messages if m.startswith("STATUS=") and t > hung_at]
        pulse.send_signal(signal.SIGCONT)
        back = status_until(env, daemon, lambda s: not s["warnings"], "never came back")
        daemon.terminate()
        _, log = daemon.communicate(timeout=60)
    finally:
        pulse.send_signal(signal.SIGCONT)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        pulse.terminate()
        pulse.wait()
        listener.close()
        shutil.rmtree(folder)
    assert daemon.returncode == 0, log
    # both devices say what is wrong: the one waiting on the server keeps neither from it
    assert [w.split(" ")[:3] for w in hung["warnings"]] == [
        ["microphone", "'default'", "has"],
        ["the", "virtual", "microphone"],
    ], hung["warnings"]
    # a ping each half second while frames go out (WatchdogSec=1 s), the hang notwithstanding
    assert len(pings) >= 12 and max(b - a for a, b in itertools.pairwise(pings)) < 1.0, pings
    assert len(statuses) >= 6
    assert back["source"] != "none" and back["frames_shown"] > hung["frames_shown"]

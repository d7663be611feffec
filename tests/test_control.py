"""The control socket of a running `livecam start`: status, mute, stop, single instance."""

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import JFK


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVECAM_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def livecam(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livecam", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())  # fmt: skip


def _start_daemon() -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "livecam", "start", "--audio", str(JFK), "--loop", "--sink",
         "memory", "--size", "320x240", "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while livecam("status", "--json").returncode != 0:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the daemon did not come up"
        time.sleep(0.3)
    return proc


def test_status_mute_and_stop(runtime_dir):
    proc = _start_daemon()
    try:
        sock = runtime_dir / "livecam.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # only the user may control it
        time.sleep(1.5)
        status = json.loads(livecam("status", "--json").stdout)
        assert status["avatar"] == "astronaut" and status["frames_shown"] > 20
        assert status["frames_generated"] > 0
        assert "astronaut" in livecam("status").stdout  # the dashboard, rendered once

        assert livecam("mute").stdout.strip() == "muted"
        time.sleep(0.5)
        before = json.loads(livecam("status", "--json").stdout)
        time.sleep(1.0)
        after = json.loads(livecam("status", "--json").stdout)
        assert any("muted" in w for w in after["warnings"])
        assert after["frames_generated"] == before["frames_generated"]  # idle faces only
        assert after["frames_silent"] > before["frames_silent"]
        assert livecam("mute", "--off").stdout.strip() == "unmuted"

        switched = livecam("avatars", "switch", "portrait")
        assert switched.returncode == 0, switched.stderr
        assert json.loads(livecam("status", "--json").stdout)["avatar"] == "portrait"
        unknown = livecam("avatars", "switch", "nobody")
        assert unknown.returncode == 1 and "nobody" in unknown.stderr
        assert "Traceback" not in unknown.stderr
        assert json.loads(livecam("status", "--json").stdout)["avatar"] == "portrait"

        second = livecam("start", "--audio", str(JFK), "--sink", "memory", "--no-dashboard")
        assert second.returncode == 1 and "already running" in second.stderr

        assert livecam("stop").returncode == 0
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()  # removed on exit
    finally:
        proc.kill()


def test_commands_without_a_daemon_say_so(runtime_dir):
    for command in ("status", "stop", "mute"):
        result = livecam(command)
        assert result.returncode == 1 and "livecam is not running" in result.stderr
        assert "Traceback" not in result.stderr


def test_start_after_a_killed_daemon(runtime_dir):
    first = _start_daemon()
    first.kill()  # SIGKILL: no cleanup runs
    first.wait(timeout=30)
    assert (runtime_dir / "livecam.sock").exists()  # left behind
    assert "livecam is not running" in livecam("status").stderr
    second = _start_daemon()  # the lock is free, so the stale socket is replaced
    try:
        assert json.loads(livecam("status", "--json").stdout)["avatar"] == "astronaut"
        assert livecam("stop").returncode == 0
        assert second.wait(timeout=30) == 0
    finally:
        second.kill()


def test_a_second_start_refuses_while_clients_idle(runtime_dir):
    """Idle clients once made a busy daemon look crashed: a second start deleted its socket."""
    proc = _start_daemon()
    sock = runtime_dir / "livecam.sock"
    idle = []
    try:
        for _ in range(5):  # connected, never send a byte
            idle.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            idle[-1].connect(str(sock))
        second = livecam("start", "--audio", str(JFK), "--sink", "memory", "--no-dashboard")
        assert second.returncode == 1, second.stderr
        assert "already running" in second.stderr and "Traceback" not in second.stderr
        assert sock.exists() and proc.poll() is None  # the first daemon keeps its socket
        status = livecam("status", "--json", timeout=20)
        assert status.returncode == 0 and json.loads(status.stdout)["avatar"] == "astronaut"
        assert livecam("stop").returncode == 0
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        for conn in idle:
            conn.close()
        proc.kill()

"""The systemd user service: sd_notify datagrams from a real daemon, and the unit's install.

systemd is not needed: a test binds the notify datagram socket itself, as systemd does, and
reads what the daemon sends.
"""

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from livecam import live
from livecam.live import LiveOptions, build_pipeline
from livecam.service.notify import Notifier
from livecam.service.unit import TEMPLATE, unit_text
from tests.conftest import REPO, SPEECH
from tests.helpers import NotifySocket


@pytest.fixture
def notify_socket():
    folder = tempfile.mkdtemp(prefix="lc-notify-")  # short: a socket path has 108 bytes
    listener = NotifySocket(f"{folder}/notify")
    yield listener, f"{folder}/notify"
    listener.close()
    shutil.rmtree(folder)


def test_daemon_reports_ready_status_watchdog_and_stopping(notify_socket, tmp_path):
    listener, address = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "livecam", "start", "--audio", str(SPEECH), "--sink", "file",
         "--out", str(tmp_path / "out.mp4"), "--size", "320x240", "--duration", "4",
         "--no-dashboard"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    time.sleep(0.3)  # the last datagram is read
    messages = [m for _, m in listener.messages]
    assert messages, "the daemon sent nothing to NOTIFY_SOCKET"
    first = messages[0].splitlines()
    assert first[0] == "READY=1"
    assert first[1].startswith("STATUS=astronaut on file") and "fps shown" in first[1]
    assert messages[-1] == "STOPPING=1"
    pings = [t - started for t, _ in listener.with_field("WATCHDOG=1")]
    # WatchdogSec=1 s: a ping every half second while frames go out (4 s of them)
    assert len(pings) >= 5, messages
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert len(statuses) >= 2  # it changes as the fps settles


def test_a_wedged_output_stops_the_watchdog_but_not_the_status(notify_socket, monkeypatch):
    listener, address = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    pipeline = build_pipeline(
        LiveOptions(avatar="astronaut", audio_file=SPEECH, loop=True, sink="memory",
                    width=320, height=240, dashboard=False)
    )  # fmt: skip
    release, wedged_at = threading.Event(), []
    send = pipeline.sink.send

    def wedging_send(frame, audio):
        if pipeline.sink.frames_sent == 30:
            wedged_at.append(time.monotonic())
            release.wait()  # the output thread hangs here, as on a stuck driver call
        send(frame, audio)

    pipeline.sink.send = wedging_send
    stop = threading.Event()
    pipeline.start()
    loop = threading.Thread(target=live._loop, args=(pipeline, stop, None, None))
    loop.start()
    try:
        deadline = time.monotonic() + 20
        while not wedged_at and time.monotonic() < deadline:
            time.sleep(0.05)
        assert wedged_at, "the output never reached frame 30"
        time.sleep(2.5)
        pings = [t for t, _ in listener.with_field("WATCHDOG=1")]
        assert pings and pings[0] < wedged_at[0]  # it pinged while frames went out
        # frames sent just before the wedge may still earn one ping, a loop period (0.25 s) and
        # some scheduling later; after 1 s none: 1.5 s more is about 7 ping intervals (0.2 s)
        assert all(t < wedged_at[0] + 1.0 for t in pings)
        later = [t for t, m in listener.messages if m.startswith("STATUS=") and t > wedged_at[0]]
        assert later, "the status went quiet too: the main loop, not the output, stopped"
    finally:
        release.set()
        stop.set()
        loop.join(timeout=10)
        pipeline.stop()
    assert listener.messages[-1][1] == "STOPPING=1"


def test_abstract_notify_socket():
    name = f"livecam-test-{os.getpid()}"
    listener = NotifySocket(f"\0{name}")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        notifier.ready("starting")
        notifier.status("starting")  # unchanged: not sent again
        notifier.status("running")
        notifier.close()
        time.sleep(0.3)
        assert [m for _, m in listener.messages] == ["READY=1\nSTATUS=starting", "STATUS=running"]
    finally:
        listener.close()


def test_outside_systemd_nothing_is_sent_and_a_dead_socket_is_harmless(tmp_path):
    assert not Notifier({}).enabled
    Notifier({}).ready("x")
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    gone.ready("x")  # systemd went away: logged, the daemon runs on
    gone.watchdog()
    assert Notifier({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "5000000"}).watchdog_s == 5.0


# --- install / uninstall ---------------------------------------------------------------------


@pytest.fixture
def user_home(tmp_path, monkeypatch):
    """XDG_CONFIG_HOME in tmp, and a systemctl on PATH that logs its arguments (this machine
    runs no user manager); FAIL_ON makes it fail on that subcommand, as without a user bus."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'if [ -n "$FAIL_ON" ] && [ "$2" = "$FAIL_ON" ]; then\n'
        '  echo "Failed to connect to bus: No medium found" >&2; exit 1\n'
        "fi\n"
    )
    (bin_dir / "systemctl").chmod(0o755)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # fmt: skip
    return env, tmp_path / "config/systemd/user/livecam.service", log


def _livecam(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livecam", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_install_writes_a_valid_unit_enables_it_and_uninstall_removes_it(user_home):
    env, unit, log = user_home
    result = _livecam(env, "service", "install", "--camera", "/dev/video12")
    assert result.returncode == 0, result.stderr
    text = unit.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start == (
        f"ExecStart={sys.executable} -m livecam start --no-dashboard --sink virtualcam "
        "--camera /dev/video12"
    )
    assert log.read_text().splitlines() == [
        "--user daemon-reload",
        "--user enable --now livecam.service",
    ]
    said = " ".join(result.stdout.split())
    assert f"installed {unit}" in said and "config.toml ([start] table)" in said
    _verify_with_systemd(unit)
    result = _livecam(env, "service", "uninstall")
    assert result.returncode == 0 and not unit.exists()
    assert log.read_text().splitlines()[2:] == ["--user disable --now livecam.service",
                                                "--user daemon-reload"]  # fmt: skip
    again = _livecam(env, "service", "uninstall")
    assert again.returncode == 0 and "not installed" in again.stdout


def _verify_with_systemd(unit: Path) -> None:
    """systemd's own parser: every key known, the ExecStart program exists."""
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        return
    check = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0 and check.stderr == "", check.stderr


def test_install_without_a_user_manager_says_what_to_run(user_home):
    env, unit, _ = user_home
    result = _livecam({**env, "FAIL_ON": "daemon-reload"}, "service", "install")
    assert result.returncode == 1
    assert (
        f"{unit} is written" in result.stderr and "systemctl --user daemon-reload" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert unit.exists()


def test_unit_escapes_percent_and_spaces():
    text = unit_text("/dev/video10", python="/home/a b/100%/python")
    assert "ExecStart='/home/a b/100%%/python' -m livecam start" in text
    assert text.count("[Service]") == 1 and TEMPLATE.read_text().count("ExecStart=") == 1


def test_the_pools_system_unit_runs_livecam_serve_with_options_it_has(tmp_path):
    """systemd/livecam-serve.service (copied by hand to a GPU machine) passes systemd's
    parser, and its ExecStart asks `livecam serve` only for options it has."""
    shipped = (REPO / "systemd" / "livecam-serve.service").read_text()
    exec_start = next(line for line in shipped.splitlines() if line.startswith("ExecStart="))
    program, command, *args = exec_start.removeprefix("ExecStart=").split()
    assert program.endswith("/bin/livecam") and command == "serve"
    usage = subprocess.run([sys.executable, "-m", "livecam", "serve", *args, "--help"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert usage.returncode == 0, usage.stderr  # an unknown option fails (exit 2)
    for flag in (a for a in args if a.startswith("--")):
        assert flag in usage.stdout
    unit = tmp_path / "livecam-serve.service"
    unit.write_text(shipped.replace(program, f"{sys.executable} -m livecam"))
    _verify_with_systemd(unit)

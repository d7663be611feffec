"""Private sound servers for the tests: PulseAudio, or PipeWire with pipewire-pulse and
WirePlumber. Each gets its own runtime dir, home and socket (handed out as PULSE_SERVER), so
a server the user or another test session runs is never touched.

PipeWire needs no systemd: the three daemons start by hand. WirePlumber needs a D-Bus session
bus (without one it exits at once: "Cannot autolaunch D-Bus without X11 $DISPLAY"), so a
private `dbus-daemon --session` comes first; pipewire and pipewire-pulse merely log its absence.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = {
    "pulseaudio": ("pulseaudio", "pactl", "paplay", "parec"),
    "pipewire": ("pipewire", "pipewire-pulse", "wireplumber", "dbus-daemon", "pactl", "paplay"),
}
PACKAGES = {  # Debian packages that provide them
    "pulseaudio": "pulseaudio pulseaudio-utils",
    "pipewire": "pipewire pipewire-pulse wireplumber dbus pulseaudio-utils",
}
START_S = 20.0


class ServerError(Exception):
    """The server did not come up; the message names its log."""


@dataclass
class Server:
    kind: str
    address: str  # the value for PULSE_SERVER
    log: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for process in reversed(self.processes):  # pipewire-pulse ... dbus-daemon
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def missing(kind: str) -> list[str]:
    return [name for name in PROGRAMS[kind] if shutil.which(name) is None]


def _pactl(address: str, *args: str) -> str | None:
    env = {**os.environ, "PULSE_SERVER": address}
    result = subprocess.run(["pactl", *args], env=env, capture_output=True, text=True, timeout=10)
    return result.stdout if result.returncode == 0 else None


def _wait(server: Server, ready, what: str) -> None:
    deadline = time.monotonic() + START_S
    while not ready():
        if any(p.poll() is not None for p in server.processes) or time.monotonic() > deadline:
            server.stop()
            raise ServerError(f"{server.kind}: {what} did not come up; see {server.log}")
        time.sleep(0.1)


def start(kind: str, root: Path) -> Server:
    """Start a private server of `kind` ("pulseaudio" or "pipewire") under `root`."""
    runtime = root / "run"
    runtime.mkdir(mode=0o700, parents=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PULSE_SERVER", "DBUS_SESSION_BUS_ADDRESS", "PIPEWIRE_REMOTE"}
    }
    env.update(
        HOME=str(root),
        XDG_RUNTIME_DIR=str(runtime),
        XDG_CONFIG_HOME=str(root / "config"),
        XDG_STATE_HOME=str(root / "state"),
    )
    log = root / f"{kind}.log"
    out = log.open("ab")

    def spawn(*command: str) -> None:
        server.processes.append(
            subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        )

    if kind == "pulseaudio":
        socket = runtime / "native"
        server = Server(kind, f"unix:{socket}", log)
        spawn("pulseaudio", "-n", "--daemonize=no", "--use-pid-file=no",
              "--exit-idle-time=-1", f"--load=module-native-protocol-unix socket={socket} "
              "auth-anonymous=1")  # fmt: skip
        _wait(server, lambda: _pactl(server.address, "info") is not None, "pulseaudio")
        return server
    bus = runtime / "bus"
    env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={bus}"
    server = Server(kind, f"unix:{runtime / 'pulse' / 'native'}", log)
    spawn("dbus-daemon", "--session", f"--address=unix:path={bus}", "--nofork", "--nopidfile")
    _wait(server, bus.exists, "dbus-daemon")
    spawn("pipewire")
    _wait(server, (runtime / "pipewire-0").exists, "pipewire")
    spawn("wireplumber")
    spawn("pipewire-pulse")
    # ready when the session manager is connected: before it, streams are never linked
    _wait(server, lambda: _has_wireplumber(server.address), "pipewire-pulse with wireplumber")
    return server


def _has_wireplumber(address: str) -> bool:
    return "wireplumber" in (_pactl(address, "list", "short", "clients") or "")

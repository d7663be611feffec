"""`livecam service install|uninstall`: the systemd user unit, written, enabled and removed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from livecam.paths import config_home

UNIT_NAME = "livecam.service"
TEMPLATE = Path(__file__).with_name(UNIT_NAME)  # a link to the repository's systemd/ unit
HEADER = "# Written by `livecam service install`; `livecam service uninstall` removes it.\n"


class ServiceError(Exception):
    """The service could not be set up; the message says what to do."""


@dataclass
class Outcome:
    unit: Path
    done: list[str] = field(default_factory=list)  # the systemctl commands that ran


def unit_path() -> Path:
    return config_home() / "systemd" / "user" / UNIT_NAME


def unit_text(camera: str, python: str = sys.executable) -> str:
    """The shipped unit with ExecStart running this livecam (the interpreter it runs in)."""
    command = [python, "-m", "livecam", "start", "--no-dashboard", "--sink", "virtualcam",
               "--camera", camera]  # fmt: skip
    exec_start = shlex.join(command).replace("%", "%%")  # % starts a systemd specifier
    body = TEMPLATE.read_text().split("[Unit]", 1)[1]
    lines = [
        f"ExecStart={exec_start}" if line.startswith("ExecStart=") else line
        for line in ("[Unit]" + body).splitlines()
    ]
    return HEADER + "\n".join(lines) + "\n"


def install(camera: str, start: bool = True) -> Outcome:
    path = unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(unit_text(camera))
    partial.replace(path)
    outcome = Outcome(path)
    enable = ["enable", "--now", UNIT_NAME] if start else ["enable", UNIT_NAME]
    for args in (["daemon-reload"], enable):
        _systemctl(args, outcome, f"{path} is written, but")
    return outcome


def uninstall() -> Outcome | None:
    """None when no unit was installed."""
    path = unit_path()
    if not path.exists():
        return None
    outcome = Outcome(path)
    _systemctl(["disable", "--now", UNIT_NAME], outcome, "the unit is still in place:")
    path.unlink()
    _systemctl(["daemon-reload"], outcome, f"{path} is removed, but")
    return outcome


def _systemctl(args: list[str], outcome: Outcome, context: str) -> None:
    command = ["systemctl", "--user", *args]
    if shutil.which("systemctl") is None:
        raise ServiceError(f"{context} systemctl is not installed: this system has no systemd")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ServiceError(
            f"{context} `{shlex.join(command)}` failed: {result.stderr.strip()}. Run it in your "
            "desktop session (the user's systemd manager must be running: "
            "`loginctl enable-linger` keeps it up without a login)."
        )
    outcome.done.append(shlex.join(command))

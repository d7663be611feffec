"""Small PulseAudio/PipeWire-Pulse helpers: pactl calls and per-stream device choice."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator


class PulseError(Exception):
    """A pactl call failed, with its message."""


def pactl(*args: str) -> str:
    result = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise PulseError(f"`pactl {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout.strip()


def unload(module: str) -> None:
    subprocess.run(["pactl", "unload-module", module], capture_output=True, timeout=10)


def available() -> bool:
    """A PulseAudio-compatible server answers."""
    if shutil.which("pactl") is None:
        return False
    return subprocess.run(["pactl", "info"], capture_output=True, timeout=10).returncode == 0


SERVERS = ("pulseaudio", "pipewire")


def server_kind() -> str | None:
    """ "pipewire" (pipewire-pulse), "pulseaudio", or None when no server answers."""
    if not available():
        return None
    return "pipewire" if "PipeWire" in pactl("info") else "pulseaudio"


@contextlib.contextmanager
def device_override(variable: str, name: str) -> Iterator[None]:
    """Route the streams opened inside to a given sink or source (PULSE_SINK/PULSE_SOURCE,
    which libpulse reads when a stream connects); the previous value is restored after."""
    previous = os.environ.get(variable)
    os.environ[variable] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous

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


def create_fed_source(sink: str, source: str, description: str | None = None) -> list[str]:
    """A microphone that plays what is sent to it: a null sink `sink` and its monitor remapped
    as the source `source` (what apps list as a microphone). Returns the module ids, for
    `unload_all`; on failure nothing is left behind."""
    described = description or source
    sink_args = [
        f"sink_name={sink}",
        f"sink_properties='device.description=\"{described} (feed)\"'",
    ]
    source_args = [f"master={sink}.monitor", f"source_name={source}",
                   f"source_properties='device.description=\"{described}\"'"]  # fmt: skip
    modules = [pactl("load-module", "module-null-sink", *sink_args)]
    try:
        modules.append(pactl("load-module", "module-remap-source", *source_args))
    except PulseError:
        unload_all(modules)
        raise
    return modules


def unload_all(modules: list[str]) -> None:
    """Unload modules in reverse order of loading."""
    for module in reversed(modules):
        unload(module)

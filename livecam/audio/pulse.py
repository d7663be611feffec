"""Small PulseAudio/PipeWire-Pulse helpers: pactl calls and per-stream device choice."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator


class PulseError(Exception):
    """A pactl call failed, with its message."""


TIMEOUT_S = 10.0  # a hung server: pactl would wait for ever


def pactl(*args: str, timeout_s: float | None = None) -> str:
    command = f"`pactl {' '.join(args)}`"
    timeout_s = timeout_s or TIMEOUT_S
    try:
        result = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        answer = f"the sound server did not answer in {timeout_s:g} s"
        raise PulseError(f"{command}: {answer}") from None
    if result.returncode != 0:
        raise PulseError(f"{command} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def unload(module: str) -> None:
    with contextlib.suppress(PulseError):  # gone already, or no server: nothing to unload
        pactl("unload-module", module)


def available() -> bool:
    """A PulseAudio-compatible server answers."""
    if shutil.which("pactl") is None:
        return False
    try:
        pactl("info")
    except PulseError:
        return False
    return True


def _listed(kind: str, timeout_s: float | None, short: bool = False) -> list[dict]:
    """`pactl list [short] KIND` as JSON (pactl 16 and later; an older one is a PulseError)."""
    text = pactl("-f", "json", "list", *(["short"] if short else []), kind, timeout_s=timeout_s)
    try:
        return json.loads(text)
    except ValueError:
        raise PulseError(f"`pactl list {kind}` printed no JSON: {text[:80]!r}") from None


def sources(timeout_s: float | None = None) -> list[str]:
    """The server's source names, the monitors of its sinks last."""
    names = [source["name"] for source in _listed("sources", timeout_s, short=True)]
    return sorted(names, key=lambda name: name.endswith(".monitor"))


def sinks(timeout_s: float | None = None) -> dict[str, int]:
    """The server's sinks: name -> index."""
    return {sink["name"]: sink["index"] for sink in _listed("sinks", timeout_s, short=True)}


def streams_into(sink_index: int, timeout_s: float | None = None) -> int:
    """How many streams play into the sink of that index."""
    inputs = _listed("sink-inputs", timeout_s, short=True)
    return sum(stream["sink"] == sink_index for stream in inputs)


def record_stream(key: str, value: str, timeout_s: float | None = None) -> tuple[int, str] | None:
    """(index, source name) of the record stream whose property `key` is `value`, or None."""
    names = {source["index"]: source["name"] for source in _listed("sources", timeout_s, True)}
    for stream in _listed("source-outputs", timeout_s):
        if stream.get("properties", {}).get(key) == value:
            return stream["index"], names.get(stream["source"], "")
    return None


SERVERS = ("pulseaudio", "pipewire")


def server_kind() -> str | None:
    """ "pipewire" (pipewire-pulse), "pulseaudio", or None when no server answers."""
    if not available():
        return None
    return "pipewire" if "PipeWire" in pactl("info") else "pulseaudio"


@contextlib.contextmanager
def device_override(variable: str, name: str) -> Iterator[None]:
    """Route the streams opened inside to a given sink or source (PULSE_SINK/PULSE_SOURCE,
    which libpulse reads when a stream connects), or set their properties (PULSE_PROP:
    "key=value ...", added to what it held); the previous value is restored after."""
    previous = os.environ.get(variable)
    os.environ[variable] = f"{previous} {name}" if variable == "PULSE_PROP" and previous else name
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

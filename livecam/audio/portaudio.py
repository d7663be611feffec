"""livecam's PortAudio streams, and PortAudio's device list kept fresh.

PortAudio lists devices once, when it starts. A sound server started after that (PulseAudio
coming up after the daemon) or a microphone plugged in later stays invisible until PortAudio
restarts. A restart closes every open stream, so `rescan` does it only while none of the
streams opened through `track` is open.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable

from livecam.audio import pulse
from livecam.constants import BLOCK, SAMPLE_RATE

INSTALL = "sudo apt-get install libportaudio2"

# held while PortAudio restarts or opens a stream: the devices are watched from threads of
# their own (device_watch.py), and a restart must never run under another thread's open
_lock = threading.RLock()
_streams: weakref.WeakSet = weakref.WeakSet()


class PortAudioMissing(Exception):
    """The PortAudio library is not installed; the message names the fix."""


def load():
    """The sounddevice module. Importing it loads the PortAudio library, so it is imported on
    first use, and a missing library is one error naming the package, not a traceback."""
    try:
        import sounddevice as sd
    except OSError as exc:  # sounddevice: "PortAudio library not found"
        raise PortAudioMissing(f"{exc}; the microphone needs it: {INSTALL}") from None
    return sd


def exclusive() -> threading.RLock:
    """The lock to hold while reading PortAudio's device list: no restart runs meanwhile."""
    return _lock


def track(stream):
    """Remember an open sounddevice stream, so that no rescan closes it; returns it."""
    with _lock:
        _streams.add(stream)
    return stream


def rescan() -> bool:
    """Restart PortAudio so that it lists the devices present now; False (and nothing done)
    while one of livecam's streams is open."""
    sd = load()

    with _lock:
        if any(not stream.closed for stream in _streams):
            return False
        sd._terminate()
        sd._initialize()
        return True


def open_stream(
    callback: Callable,
    *,
    playback: bool,
    pulse_device: str | None = None,
    device: int | None = None,
    latency: float | str = "low",
    properties: dict[str, str] | None = None,
):
    """A stream in livecam's shape: 16 kHz mono float32 in BLOCK-sample blocks, on a PortAudio
    `device` or routed to a PulseAudio/PipeWire sink (playback) or source by name, with
    `properties` on the sound server's stream; tracked, so no rescan closes it. Not started
    yet."""
    sd = load()

    kind = sd.OutputStream if playback else sd.InputStream
    with _lock, contextlib.ExitStack() as routed:
        if pulse_device is not None:
            variable = "PULSE_SINK" if playback else "PULSE_SOURCE"
            routed.enter_context(pulse.device_override(variable, pulse_device))
        if properties:  # values without spaces: PULSE_PROP is "key=value key=value"
            tagged = " ".join(f"{key}={value}" for key, value in properties.items())
            routed.enter_context(pulse.device_override("PULSE_PROP", tagged))
        stream = kind(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=BLOCK,
                      device=device, latency=latency, callback=callback)  # fmt: skip
        return track(stream)

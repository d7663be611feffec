"""PortAudio's device list, kept fresh.

PortAudio lists devices once, when it starts. A sound server started after that (PulseAudio
coming up after the daemon) or a microphone plugged in later stays invisible until PortAudio
restarts. A restart closes every open stream, so `rescan` does it only while none of the
streams opened through `track` is open.
"""

from __future__ import annotations

import threading
import weakref

_lock = threading.Lock()
_streams: weakref.WeakSet = weakref.WeakSet()


def track(stream):
    """Remember an open sounddevice stream, so that no rescan closes it; returns it."""
    with _lock:
        _streams.add(stream)
    return stream


def rescan() -> bool:
    """Restart PortAudio so that it lists the devices present now; False (and nothing done)
    while one of livecam's streams is open."""
    import sounddevice as sd

    with _lock:
        if any(not stream.closed for stream in _streams):
            return False
        sd._terminate()
        sd._initialize()
        return True

"""Keeps the audio devices working, each from a thread of its own.

A device's `poll` (the microphone reopened after a stall, the virtual microphone made again
after a sound-server restart) may wait on the sound server: closing or opening a PortAudio
stream on a hung server blocks until it answers, a `pactl` call up to pulse.TIMEOUT_S. The
daemon's main loop draws the dashboard and pings systemd's watchdog, so it never waits on
them; and one device waiting does not keep the other from saying what is wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PERIOD_S = 0.25
JOIN_S = 15.0  # a poll in flight may be a pactl call waiting out its timeout


class DeviceWatch:
    """Calls each poll every PERIOD_S, on one thread per poll, until stopped. A poll that
    raises is logged (not again while it raises the same) and called again next time: one
    device's bug does not end the call."""

    def __init__(self, polls: list[Callable[[], None]]) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(poll,), name="device-watch", daemon=True)
            for poll in polls
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self, poll: Callable[[], None]) -> None:
        last_error = ""
        while not self._stop.wait(PERIOD_S):
            try:
                poll()
            except Exception as exc:
                said = f"{type(exc).__name__}: {exc}"
                if said != last_error:
                    log.exception("watching an audio device failed (trying on): %s", said)
                last_error = said

    def stop(self) -> None:
        """Stops the polls; returns once none runs (or after JOIN_S), so that no device is
        reopened behind the caller's own stops."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(JOIN_S)
        if any(thread.is_alive() for thread in self._threads):
            log.warning("an audio device is still waiting on the sound server")

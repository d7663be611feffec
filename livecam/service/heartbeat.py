"""What systemd hears from a running daemon: ready, how it is doing, and that it is alive."""

from __future__ import annotations

from livecam.pipeline.stats import Snapshot
from livecam.service.notify import Notifier

STATUS_EVERY_S = 1.0


def status_line(s: Snapshot) -> str:
    """One line for `systemctl status` and the log."""
    line = (
        f"{s.avatar} on {s.sink}: {s.shown_fps:.1f}/{s.target_fps:g} fps shown, "
        f"{100 * s.repeat_ratio:.1f}% repeated, latency {s.latency_ms:.0f} ms, "
        f"{s.audio_overruns} overruns"
    )
    return line + "".join(f"; {w}" for w in s.warnings)


class Heartbeat:
    """READY=1 once the first frame went out, STATUS= each second, and WATCHDOG=1 only while
    the output clock advances: a wedged pipeline stops the pings and systemd restarts it."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.ready = False
        self._next_status = 0.0
        self._next_ping = 0.0
        self._frames_at_ping = 0

    def beat(self, snap: Snapshot, now: float) -> None:
        if not self.notifier.enabled:
            return
        if not self.ready:
            if snap.frames_shown == 0:
                return
            self.notifier.ready(status_line(snap))
            self.ready = True
        elif now >= self._next_status:
            self.notifier.status(status_line(snap))
            self._next_status = now + STATUS_EVERY_S
        interval = self.notifier.watchdog_s
        if interval and now >= self._next_ping and snap.frames_shown > self._frames_at_ping:
            self.notifier.watchdog()
            self._frames_at_ping = snap.frames_shown
            self._next_ping = now + interval / 2

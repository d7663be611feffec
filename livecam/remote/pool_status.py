"""What `livecam serve` says while it runs: streams, faces made, batches, late calls, and a
change in the number of generator replicas.

The ingress counts each generator call once (where a stream sends a request on two
connections, it is made once); `livecam serve` reads the counts every few seconds and prints
what changed since the last read. Imports nothing heavy: the counts cross Ray as a dict.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class PoolCounters:
    calls: int = 0  # generator calls answered, made or late
    faces: int = 0  # faces made
    late: int = 0  # calls answered without faces: they queued past their client's wait
    batches: float = 0.0  # each call adds 1 / the streams in its batch: whole batches
    batch_s: float = 0.0  # ... and that share of its batch's time

    def count(self, faces: int, late: bool, batch_streams: int, seconds: float) -> None:
        self.calls += 1
        if late:
            self.late += 1
            return
        self.faces += faces
        self.batches += 1 / batch_streams
        self.batch_s += seconds / batch_streams

    def snapshot(self, streams: int, in_flight: int) -> dict:
        return {**asdict(self), "streams": streams, "in_flight": in_flight}


def status_line(before: dict, after: dict, seconds: float) -> str | None:
    """The pool over the `seconds` between two snapshots; None when nothing happened (no
    call, as many streams and generator replicas as before). Counts that went down come from
    a restarted ingress replica: counted from zero."""
    if after["calls"] < before["calls"]:
        before = {**before, **asdict(PoolCounters())}
    calls = after["calls"] - before["calls"]
    replicas = before.get("replicas"), after.get("replicas")  # (None: not read)
    resized = None not in replicas and replicas[0] != replicas[1]
    if not calls and after["streams"] == before["streams"] and not resized:
        return None
    faces = after["faces"] - before["faces"]
    batches = after["batches"] - before["batches"]
    late = after["late"] - before["late"]
    parts = [_count(after["streams"], "stream"), f"{faces / seconds:.0f} faces/s"]
    if resized:
        parts.insert(0, f"{_count(replicas[1], 'generator replica')} (were {replicas[0]})")
    if batches > 0:
        made = calls - late
        parts.append(
            f"{batches / seconds:.1f} batches/s of {made / batches:.1f} streams and "
            f"{faces / batches:.1f} frames, "
            f"{(after['batch_s'] - before['batch_s']) / batches * 1e3:.0f} ms each"
        )
    if late:
        parts.append(f"{late} of {calls} calls too late (overloaded)")
    parts.append(_count(after["in_flight"], "call") + " in flight")
    return "livecam serve: " + " · ".join(parts)


def report_status(
    stop: threading.Event,
    every_s: float,
    read: Callable[[], dict | None],
    say: Callable[[str], None],
) -> None:
    """Until `stop`: every `every_s` (0: never), a line on what the pool did meanwhile, from
    two `read`s of its counts. A read that gets None (the pool did not answer) is skipped:
    the next line covers the time since the last good one, so no change goes unsaid."""
    before = read() if every_s else None
    since = due = time.monotonic()  # of `before`; of the last read
    while not stop.wait(0.5):  # (signal handlers run between waits)
        if not every_s or time.monotonic() - due < every_s:
            continue
        now, due = read(), time.monotonic()
        if now is None:
            continue
        line = status_line(before, now, due - since) if before else None
        if line:
            say(line)
        before, since = now, due


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"

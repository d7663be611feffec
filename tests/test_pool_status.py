"""`livecam serve`'s status lines, from the ingress's counts (the running server prints them:
tests/test_remote_cluster.py)."""

from __future__ import annotations

import re
import threading

from livecam.remote.pool_status import PoolCounters, report_status, status_line


def test_a_status_line_tells_streams_faces_batches_and_late_calls():
    counters = PoolCounters()
    counters.count(faces=8, late=False, batch_streams=1, seconds=0.5)  # before the period
    counters.count(faces=0, late=True, batch_streams=0, seconds=0.0)
    before = counters.snapshot(streams=2, in_flight=0)
    for _ in range(2):  # one batch of two streams' calls, 4 frames each, 40 ms
        counters.count(faces=4, late=False, batch_streams=2, seconds=0.04)
    for _ in range(2):  # then one of one stream, 6 frames, 30 ms
        counters.count(faces=6, late=False, batch_streams=1, seconds=0.03)
        counters.count(faces=0, late=True, batch_streams=0, seconds=0.0)
    line = status_line(before, counters.snapshot(streams=3, in_flight=5), seconds=2.0)
    assert line == (
        "livecam serve: 3 streams · 10 faces/s · 1.5 batches/s of 1.3 streams and 6.7 frames, "
        "33 ms each · 2 of 6 calls too late (overloaded) · 5 calls in flight"
    )


def test_no_line_while_nothing_happens_and_one_when_a_stream_leaves():
    counters = PoolCounters()
    counters.count(faces=4, late=False, batch_streams=1, seconds=0.01)
    before = counters.snapshot(streams=1, in_flight=0)
    assert status_line(before, counters.snapshot(streams=1, in_flight=0), seconds=10.0) is None
    line = status_line(before, counters.snapshot(streams=0, in_flight=0), seconds=10.0)
    assert line == "livecam serve: 0 streams · 0 faces/s · 0 calls in flight"
    line = status_line(before, counters.snapshot(streams=2, in_flight=1), seconds=10.0)
    assert line == "livecam serve: 2 streams · 0 faces/s · 1 call in flight"
    before = counters.snapshot(streams=0, in_flight=0)
    line = status_line(before, counters.snapshot(streams=1, in_flight=0), seconds=10.0)
    assert line == "livecam serve: 1 stream · 0 faces/s · 0 calls in flight"


def test_counts_of_a_restarted_ingress_start_from_zero():
    old, new = PoolCounters(), PoolCounters()
    for _ in range(50):
        old.count(faces=4, late=False, batch_streams=1, seconds=0.01)
    new.count(faces=4, late=False, batch_streams=1, seconds=0.01)
    line = status_line(old.snapshot(1, 0), new.snapshot(1, 0), seconds=1.0)
    assert line == (
        "livecam serve: 1 stream · 4 faces/s · 1.0 batches/s of 1.0 streams and 4.0 frames, "
        "10 ms each · 0 calls in flight"
    )
    # restarted, with no call yet and the same streams: nothing happened
    assert status_line(old.snapshot(1, 0), PoolCounters().snapshot(1, 0), seconds=1.0) is None


def test_a_failed_read_is_skipped_and_the_next_line_covers_the_time_since_the_last_good_one():
    """Reads every 1 s (the loop wakes every 0.5 s): no answer at first, counts of 0, then 1
    call (a line), then no answer, then 3 calls (a line for the 2 calls over at least two
    periods), then nothing new."""
    counts = []
    for calls in (None, 0, 1, None, 3, 3, 3):
        if calls is None:
            counts.append(None)
            continue
        counters = PoolCounters()
        for _ in range(calls):
            counters.count(faces=2, late=False, batch_streams=1, seconds=0.01)
        counts.append(counters.snapshot(streams=1, in_flight=0))
    reads = iter(counts)
    stop, said = threading.Event(), []

    def read():
        found = next(reads, counts[-1])
        if found is counts[-1]:
            stop.set()
        return found

    report_status(stop, 1.0, read, said.append)
    assert len(said) == 2 and all(line.startswith("livecam serve: 1 stream · ") for line in said)
    # 4 faces since the good read before the failed one, at least 2 s before: at most 2/s
    # (over the last period alone it would say 4/s)
    faces_per_s = int(re.search(r" (\d+) faces/s", said[1])[1])
    assert 1 <= faces_per_s <= 2, said
    assert "1.0 streams and 2.0 frames" in said[1], said


def test_a_change_in_the_generator_replicas_is_said_even_when_nothing_else_changed():
    counters = PoolCounters()
    one = {**counters.snapshot(streams=1, in_flight=0), "replicas": 1}
    two = {**one, "replicas": 2}
    assert status_line(one, one, seconds=10.0) is None
    line = status_line(one, two, seconds=10.0)
    assert (
        line
        == "livecam serve: 2 generator replicas (were 1) · 1 stream · 0 faces/s · 0 calls in flight"
    )
    assert status_line(two, {**one, "replicas": 0}, 10.0).startswith(
        "livecam serve: 0 generator replicas (were 2) · "
    )
    # a count not read on one side (None) says nothing of a change
    assert status_line(one, {**one, "replicas": None}, seconds=10.0) is None

"""The pipeline's meters are written by the output and generator threads while the dashboard,
the control socket and the systemd heartbeat read them."""

import sys
import threading
import time

from livecam.pipeline.stats import RateMeter, StageTimer


def test_meters_read_while_written_from_another_thread():
    rate, timer = RateMeter(span_s=10.0), StageTimer()
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            rate.tick()
            timer.add(0.001)

    writer = threading.Thread(target=write)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as on a slow (emulated) machine
    writer.start()
    try:
        deadline = time.monotonic() + 2.0
        reads = 0
        while time.monotonic() < deadline:
            assert rate.rate() >= 0.0  # a mutated deque used to raise RuntimeError here
            assert timer.percentiles()[0] >= 0.0
            reads += 1
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(interval)
    assert reads > 10
